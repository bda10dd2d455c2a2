"""From data to a served prompt: ``softprompt train`` and ``softprompt inspect``.

    from softprompt.train import TrainConfig, train
    metrics = train(TrainConfig(data="train.jsonl", eval="held.jsonl", out="prompts/mine",
                                labels=("positive", "negative"), template="Review: {text}\\nSentiment:"))

Top layer (it imports ``softprompt.runtime``, ``softprompt.models``, ``softprompt.jobs``; nothing
below imports it). Modules, one concern each:

- ``data.py``: training rows (JSONL through the batch job's reader, CSV, Parquet) and the task
  (``{context, continuation}``, or ``{text, label}`` with a label set and a template);
- ``run.py``: ``train``: PEFT's ``get_peft_model`` (prompt tuning, P-tuning, prefix tuning,
  cartridges) + transformers' ``Trainer`` (checkpoints each epoch, resume, best epoch),
  evaluation through a ``Runtime`` (``RuntimeEvaluator``);
- ``upload.py``: hot swap into a running server (``POST /v1/prompts``);
- ``inspect_prompt.py``: ``softprompt inspect`` (numpy only; torch-free from a bundle);
- ``cli.py``: ``softprompt train``'s flags; ``demo.py``: retrains the two demo prompts.

Details: docs/training.md.
"""

from .data import Example, Task, TrainError
from .run import SERVED_TYPES, TRAINED_TYPES, RuntimeEvaluator, TrainConfig, train
from .upload import upload

__all__ = ["Example", "RuntimeEvaluator", "SERVED_TYPES", "TRAINED_TYPES", "Task", "TrainConfig",
           "TrainError", "train", "upload"]
