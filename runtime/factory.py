"""Backend construction, in one place: which backend serves a model, and building it.

``Runtime.load`` calls ``build``. A bundle directory (``bundle.json``) is served by the onnx
backend as it is; any other model is loaded through ``softprompt.models`` for the torch and
reference backends, or exported once into a bundle (``softprompt.export.bundle_for``) for onnx.

Defaults, in one place (``default_device``, ``default_dtype``, ``resolve_backend``): the device
is ``$SOFTPROMPT_DEVICE`` when set (``cpu``, ``cuda``, ``cuda:1``), else cuda when a CUDA device
is present, else cpu; the dtype float32 on CPU and bfloat16 on CUDA; ``auto`` picks torch on a
CUDA default device and onnx otherwise. The test suite sets ``SOFTPROMPT_DEVICE=cpu`` so its CPU
tests (and the servers and jobs they start) compute on CPU in float32 on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backend import Backend
from .requests import Tokenizer

BACKENDS = ("auto", "onnx", "torch", "reference")


@dataclass(frozen=True)
class Built:
    """A backend, its tokenizer and the model's display name."""

    backend: Backend
    tokenizer: Tokenizer
    model_name: str | None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def default_device() -> str:
    """``$SOFTPROMPT_DEVICE`` if set, else ``"cuda"`` when a CUDA device is present, else ``"cpu"``."""
    return os.environ.get("SOFTPROMPT_DEVICE") or ("cuda" if cuda_available() else "cpu")


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA, float32 elsewhere."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def is_bundle(model: object) -> bool:
    return isinstance(model, (str, Path)) and (Path(model) / "bundle.json").is_file()


def resolve_backend(backend: str, model: object, device: str | None = None) -> str:
    """``backend`` checked, with ``auto`` resolved: torch when the device (``device``, else the
    default device) is CUDA, onnx on CPU (and for a bundle, which only onnx serves)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        on_cuda = str(device or default_device()).startswith("cuda")
        return "torch" if on_cuda and not is_bundle(model) else "onnx"
    return backend


def build(model: object, backend: str = "auto", *, device: str | None = None,
          dtype: str | None = None, prefix_cache_bytes: int = 1 << 30,
          providers: Sequence[str] | None = None, bundle_dir: str | Path | None = None,
          cuda_graphs: bool | None = None) -> Built:
    """The backend for ``model`` (arguments as ``Runtime.load`` documents them)."""
    backend = resolve_backend(backend, model, device)
    if cuda_graphs is not None and backend != "torch":
        raise ValueError(f"cuda_graphs applies to backend='torch' only, got backend={backend!r}")
    if backend == "onnx":
        from softprompt.export import bundle_for

        from .onnx_backend import OnnxBackend

        path = Path(model) if is_bundle(model) else bundle_for(model, dtype=dtype,  # type: ignore[arg-type]
                                                              out_dir=bundle_dir)
        onnx = OnnxBackend(path, providers=providers, prefix_cache_bytes=prefix_cache_bytes)
        return Built(onnx, onnx.tokenizer, onnx.model_name)
    if is_bundle(model):
        raise ValueError(f"{model} is an ONNX bundle: it serves only backend='onnx' "
                         "(the torch backends need the Hugging Face model)")
    from softprompt.models import display_name, load_model

    device = default_device() if device is None else device
    dtype = default_dtype(device) if dtype is None else dtype
    lm = load_model(model, dtype=dtype, device=device)
    be: Backend
    if backend == "torch":
        from .torch_backend import TorchBackend

        be = TorchBackend(lm, prefix_cache_bytes=prefix_cache_bytes, cuda_graphs=cuda_graphs)
    else:
        from .reference import ReferenceBackend

        be = ReferenceBackend(lm)
    return Built(be, Tokenizer.for_model(lm), display_name(lm.source))
