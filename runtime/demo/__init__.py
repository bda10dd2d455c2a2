"""Demo tasks and their example soft prompts.

Two small classification tasks, each with a hand-written labelled data set in this folder
(``<task>_train.jsonl`` / ``<task>_test.jsonl``, one ``{"text": ..., "label": ...}`` per line)
and a 20-token soft prompt trained on it with PEFT, shipped under ``prompts/<task>/`` as a
PEFT ``PROMPT_TUNING`` adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
Retrain them with ``python -m softprompt.train.demo`` (``softprompt train`` on each task; the
trainer lives in the top layer, which this package must not import).

A request is classified by scoring each label's continuation after ``Task.format(text)``
(with the soft prompt in front) and picking the highest summed log-probability. Every
label continuation starts with a space and is a single token of the default model's
tokenizer (SmolLM2-135M-Instruct), and tokenizing ``context + label`` gives the context's
tokens followed by the label's own tokens (that tokenizer adds no BOS), so scoring token ids
and scoring text agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = DEMO_DIR / "prompts"


@dataclass(frozen=True)
class Task:
    """A classification task as a prompt format.

    template: the context, with ``{text}`` where the input goes.
    labels: the continuations to score, each with its leading space (``" positive"``).
    init_text: PEFT ``PromptTuningInit.TEXT`` initialisation of the soft prompt.
    """

    name: str
    template: str
    labels: tuple[str, ...]
    init_text: str

    def format(self, text: str) -> str:
        """The context string the labels are scored after."""
        return self.template.format(text=text.strip())

    @property
    def label_names(self) -> tuple[str, ...]:
        """Labels as written in the data files (no leading space)."""
        return tuple(label.strip() for label in self.labels)

    def label_index(self, name: str) -> int:
        return self.label_names.index(name.strip())


TASKS: dict[str, Task] = {
    "sentiment": Task(
        name="sentiment",
        template="Review: {text}\nSentiment:",
        labels=(" positive", " negative"),
        init_text="Classify the sentiment of the review as positive or negative.",
    ),
    "topic": Task(
        name="topic",
        template="Text: {text}\nTopic:",
        labels=(" sports", " politics", " technology", " food"),
        init_text="Classify the topic of the text as sports, politics, technology or food.",
    ),
}


def load_examples(task: str | Task, split: str = "test") -> list[dict]:
    """The hand-written examples of ``task`` (``"train"`` or ``"test"``) as dicts with
    ``text`` and ``label`` (a label name without its leading space)."""
    name = task.name if isinstance(task, Task) else task
    if name not in TASKS:
        raise KeyError(f"unknown demo task {name!r}; expected one of {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = DEMO_DIR / f"{name}_{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["Task", "TASKS", "PROMPTS_DIR", "DEMO_DIR", "load_examples"]
