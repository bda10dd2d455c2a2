"""softprompt-runtime: serve soft prompts (prompt tuning) with a cached, shared prefix.

    from softprompt import Runtime
    rt = Runtime.load("default")            # SmolLM2-135M-Instruct; onnx on CPU, torch+Triton on CUDA
    rt.add_prompt("sentiment", "runtime/demo/prompts/sentiment")
    rt.classify("sentiment", ["Review: loved it\\nSentiment:"], [" positive", " negative"])

Subpackages: ``softprompt.runtime`` (Runtime, prompts, prefix cache, backends),
``softprompt.kernels`` (Triton prefix attention + references), ``softprompt.models`` (loading
a Hugging Face model), ``softprompt.export`` (ONNX bundles), ``softprompt.bench`` (the
benchmark driver); ``softprompt.machine`` (CPU model, package versions). pyproject.toml maps
the folders, so a checkout is used through an install (``pip install -e .``). Importing this
package does not import torch: a CPU server with onnxruntime, numpy and tokenizers can serve an
exported bundle.
"""

from softprompt.machine import PACKAGES, cpu_model, package_versions  # noqa: F401 - their old home
from softprompt.runtime.prompt_kinds import ComposedPrompt, KVPrompt, Text
from softprompt.runtime.prompts import Prompt, SoftPrompt, SoftPromptError
from softprompt.runtime.requests import (ClassifyResult, GenerateResult, RequestError,
                                         ScoreRequest, ScoreResult)

__version__ = "0.1.0"


def __getattr__(name):  # Runtime pulls in backends lazily; keep `import softprompt` light
    if name == "Runtime":
        from softprompt.runtime.api import Runtime

        return Runtime
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")


__all__ = ["Runtime", "SoftPrompt", "KVPrompt", "ComposedPrompt", "Text", "Prompt",
           "SoftPromptError", "ScoreRequest", "ScoreResult",
           "ClassifyResult", "GenerateResult", "RequestError", "__version__"]
