"""softprompt.runtime: serve soft prompts with a prefix K/V computed once per prompt.

Shape letters used in every docstring and comment of the project:
    B batch rows, P virtual (soft-prompt) tokens, L request tokens, S = P + L key length,
    H query heads, Hkv key/value heads, D head dim, E hidden size, N layers, V vocab.

Data path: ``api.py`` (Runtime: loading, validation, the prompt registry), ``engine.py`` (one
thread schedules every caller's scores and generations into shared steps), ``plan.py`` (one
forward's host-side plan), ``backend.py`` (the Backend protocol and its one ``step``),
``torch_backend.py`` / ``onnx_backend.py`` / ``reference.py`` (prefix once, then only the
request's tokens), ``sampling.py`` (tokens chosen on the device), ``cache.py`` (PrefixCache:
per-layer K/V ``[Hkv, P, D]`` per prompt, LRU by bytes).

Nothing here imports torch at import time: a CPU server that runs an exported ONNX bundle
needs only onnxruntime, numpy and tokenizers.
"""

from .prompts import SoftPrompt, SoftPromptError
from .requests import GenerateParams, RequestError, ScoreRequest


def __getattr__(name):
    if name == "Runtime":
        from .api import Runtime

        return Runtime
    raise AttributeError(f"module 'softprompt.runtime' has no attribute {name!r}")


__all__ = ["Runtime", "SoftPrompt", "SoftPromptError", "ScoreRequest", "GenerateParams",
           "RequestError"]
