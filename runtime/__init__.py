"""softprompt.runtime: serve soft prompts with a prefix K/V computed once per prompt.

Shape letters used in every docstring and comment of the project:
    B batch rows, P virtual (soft-prompt) tokens, L request tokens, S = P + L key length,
    H query heads, Hkv key/value heads, D head dim, E hidden size, N layers, V vocab.

The request path, one file a step (docs/architecture.md draws it):
``api.py`` (Runtime: the facade) -> ``requests.py`` (``make_row``: the one validation) ->
``registry.py`` (prompt versions, held by accepted requests) -> ``engine.py`` (one thread owns
the backend) -> ``scheduler.py`` (admission: ``schedule() -> StepPlan``, ``update``; rows of
``generation.py``) -> ``plan.py`` (one forward's host-side plan) -> ``backend.py`` (the Backend
protocol and ``StepperBackend.step`` over five primitives) -> ``torch_backend.py`` /
``onnx_backend.py`` / ``reference.py`` (built by ``factory.py``; prefix once from ``cache.py``,
then only the request's tokens) -> ``sampling.py`` (tokens chosen on the device) ->
``streams.py`` (futures and streams back to callers). ``stats.py``: the typed counters.
Prompts of every kind: ``prompts.py`` (the ``Prompt`` interface, its segments, ``SoftPrompt``),
``prompt_kinds.py`` (K/V, text, composed; ``check_prompt``), ``adapters.py`` (PEFT's types).

Nothing here imports torch at import time: a CPU server that runs an exported ONNX bundle
needs only onnxruntime, numpy and tokenizers.
"""

from .prompt_kinds import ComposedPrompt, KVPrompt, Text
from .prompts import Prompt, SoftPrompt, SoftPromptError
from .requests import GenerateParams, RequestError, ScoreRequest


def __getattr__(name):
    if name == "Runtime":
        from .api import Runtime

        return Runtime
    raise AttributeError(f"module 'softprompt.runtime' has no attribute {name!r}")


__all__ = ["Runtime", "SoftPrompt", "KVPrompt", "ComposedPrompt", "Text", "Prompt",
           "SoftPromptError", "ScoreRequest", "GenerateParams",
           "RequestError"]
