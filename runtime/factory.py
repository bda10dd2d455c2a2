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


DTYPES = ("auto", "float32", "float16", "bfloat16")


def auto_dtype(device: str, flags: frozenset[str] | None = None) -> str:
    """What ``dtype="auto"`` serves: bfloat16 on CUDA; on a CPU, bfloat16 where it has AMX-BF16
    tiles (about 6x its float32 GEMM rate, bench/RESULTS.md), else float32. AVX-512 BF16 dot
    products alone do not make the pick: ``dtype="bfloat16"`` uses them when asked.
    ``flags``: the CPU's feature flags (default ``softprompt.machine.cpu_flags()``)."""
    from softprompt.machine import cpu_flags

    if str(device).startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if "amx_bf16" in (cpu_flags() if flags is None else flags) else "float32"


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``dtype`` checked, None made the device's default and ``auto`` resolved (``auto_dtype``)."""
    if dtype is None:
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    return auto_dtype(device) if dtype == "auto" else dtype


def openvino_available() -> bool:
    """Whether OpenVINO (the bfloat16 CPU engine of the onnx backend) is installed."""
    from softprompt.export.ov_session import openvino_available as available

    return available()


def is_bundle(model: object) -> bool:
    return isinstance(model, (str, Path)) and (Path(model) / "bundle.json").is_file()


def resolve_backend(backend: str, model: object, device: str | None = None,
                    dtype: str | None = None) -> str:
    """``backend`` checked, with ``auto`` resolved: torch when the device (``device``, else the
    default device) is CUDA, onnx on CPU (and for a bundle, which only onnx serves); for
    bfloat16 on CPU (``dtype``, resolved), onnx under OpenVINO when it is installed, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if is_bundle(model):
            return "onnx"
        if str(device or default_device()).startswith("cuda"):
            return "torch"
        return "torch" if dtype == "bfloat16" and not openvino_available() else "onnx"
    return backend


def cpu_decoders(model: object, path: Path, bf16: bool) -> list:
    """The other bundles decode steps on CPU may run on (``OnnxBackend.decoders``): under
    bfloat16, the same float32 graph under ONNX Runtime; and the model's exact 4-bit sibling
    when it exists (never written here) and its recorded score drift is within tolerance, or the
    float32 bundle when the 4-bit one is served."""
    from softprompt.export import bundle_for
    from softprompt.export.bundle import load_bundle, read_manifest

    found = [path] if bf16 else []
    if not is_bundle(model):
        int4 = bundle_for(model, dtype="float32", weights="int4", create=False)
        flt = bundle_for(model, dtype="float32", weights="float", create=False)
        for other in (int4, flt):
            if other is None or Path(other) == Path(path):
                continue
            scores = ((read_manifest(Path(other)).get("validation") or {}).get("scores") or {}) \
                if other == int4 else {"within_tolerance": True}
            if scores.get("within_tolerance"):
                found.append(other)
    return [load_bundle(p) for p in found]


def build(model: object, backend: str = "auto", *, device: str | None = None,
          dtype: str | None = None, prefix_cache_bytes: int = 1 << 30,
          providers: Sequence[str] | None = None, bundle_dir: str | Path | None = None,
          cuda_graphs: bool | None = None) -> Built:
    """The backend for ``model`` (arguments as ``Runtime.load`` documents them)."""
    on_device = default_device() if device is None else device
    asked = dtype
    dtype = None if dtype is None else resolve_dtype(dtype, on_device)
    if asked == "auto" and dtype == default_dtype(on_device):
        dtype = None  # auto picked the default: served as the default is (the bundle pick)
    backend = resolve_backend(backend, model, device, dtype)
    if cuda_graphs is not None and backend != "torch":
        raise ValueError(f"cuda_graphs applies to backend='torch' only, got backend={backend!r}")
    if backend == "onnx":
        from softprompt.export import bundle_for

        from .onnx_backend import OnnxBackend

        # bfloat16 on CPU: the float32 graph, computed in bfloat16 by OpenVINO
        cpu_bf16 = dtype == "bfloat16" and not providers
        if cpu_bf16 and asked == "auto" and not openvino_available():
            dtype, cpu_bf16 = None, False  # auto never fails for want of an optional engine
        if is_bundle(model):
            path = Path(model)  # type: ignore[arg-type]
        elif cpu_bf16:
            path = bundle_for(model, dtype="float32", out_dir=bundle_dir, weights="float")
        else:
            path = bundle_for(model, dtype=dtype, out_dir=bundle_dir)
        decoders = [] if providers else cpu_decoders(model, path, cpu_bf16)
        onnx = OnnxBackend(path, providers=providers, prefix_cache_bytes=prefix_cache_bytes,
                           compute_dtype="bfloat16" if cpu_bf16 else None, decoders=decoders)
        if decoders:
            onnx.calibrate_decode()
        return Built(onnx, onnx.tokenizer, onnx.model_name)
    if is_bundle(model):
        raise ValueError(f"{model} is an ONNX bundle: it serves only backend='onnx' "
                         "(the torch backends need the Hugging Face model)")
    from softprompt.models import display_name, load_model

    device = on_device
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
