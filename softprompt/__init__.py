"""softprompt-runtime: serve soft prompts (prompt tuning) with a cached, shared prefix.

    from softprompt import Runtime
    rt = Runtime.load("default")            # SmolLM2-135M-Instruct; onnx on CPU, torch+Triton on CUDA
    rt.add_prompt("sentiment", "runtime/demo/prompts/sentiment")
    rt.classify("sentiment", ["Review: loved it\\nSentiment:"], [" positive", " negative"])

Subpackages: ``softprompt.runtime`` (Runtime, prompts, prefix cache, backends),
``softprompt.kernels`` (Triton prefix attention + references), ``softprompt.export`` (ONNX
bundles), ``softprompt.bench`` (the benchmark driver). Importing this package does not import
torch: a CPU server with onnxruntime, numpy and tokenizers can serve an exported bundle.
"""

import os as _os

# In a source checkout the subpackages live in the sibling folders runtime/, kernels/,
# export/, bench/ (pyproject maps them on install). Searching the checkout root too makes
# `import softprompt.runtime` work there without an install (PYTHONPATH=., the GPU machine).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and \
        _os.path.isfile(_os.path.join(_root, "runtime", "api.py")) and _root not in __path__:
    __path__.append(_root)

from softprompt.runtime.prompts import SoftPrompt, SoftPromptError  # noqa: E402
from softprompt.runtime.requests import (ClassifyResult, GenerateResult,  # noqa: E402
                                         RequestError, ScoreRequest, ScoreResult)

__version__ = "0.1.0"

PACKAGES = ("softprompt-runtime", "torch", "transformers", "peft", "onnx", "onnxruntime",
            "triton", "numpy", "tokenizers")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark and validation records."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(packages=PACKAGES) -> dict:
    """{distribution: installed version or None}, without importing any of them."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def __getattr__(name):  # Runtime pulls in backends lazily; keep `import softprompt` light
    if name == "Runtime":
        from softprompt.runtime.api import Runtime

        return Runtime
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")


__all__ = ["Runtime", "SoftPrompt", "SoftPromptError", "ScoreRequest", "ScoreResult",
           "ClassifyResult", "GenerateResult", "RequestError", "__version__"]
