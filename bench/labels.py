"""What a benchmark ran on, read from the objects it ran, so its labels cannot drift from its
arguments: the backend, device and dtype of a Runtime, and the length of a prompt.

Every tool in bench/ prints these next to its figures instead of typed constants (a label that
said "P=20" or "float32" whatever ran is how RESULTS.md once misreported a run).
"""

from __future__ import annotations


def runtime_label(rt) -> str:
    """``onnx: float32 bundle on CPUExecutionProvider`` / ``torch: cpu, float32``."""
    be = rt.backend
    bundle = getattr(be, "bundle", None)
    if bundle is not None:
        manifest = getattr(bundle, "manifest", {}) or {}
        weights = ", int4 weights" if manifest.get("quantization") == "int4" else ""
        providers = bundle.session.get_providers()
        return f"{be.name}: {bundle.dtype} bundle{weights} on {providers[0]}"
    device, dtype = getattr(be, "device", "?"), getattr(be, "dtype", "?")
    return f"{be.name}: {device}, {str(dtype).removeprefix('torch.')}"


def prompt_lengths(rt, names) -> str:
    """``P=20`` (one length), ``P=20/40`` (several): the registered prompts' virtual tokens."""
    lengths = sorted({rt.prompts[n].num_virtual_tokens for n in names})
    return "P=" + "/".join(map(str, lengths))
