"""The machine and software a figure was measured on: CPU model, its matrix units, and installed
package versions.

A leaf module (it imports nothing from the project), used by the exporter's records in
``bundle.json``, the benchmarks and ``softprompt info``.
"""

from __future__ import annotations

PACKAGES = ("softprompt-runtime", "torch", "transformers", "peft", "onnx", "onnxruntime",
            "openvino", "triton", "numpy", "tokenizers")


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


MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def matrix_units(flags: frozenset[str] | None = None) -> str:
    """One line naming the CPU's vector and matrix units that bound GEMM speed, e.g.
    ``"avx2 avx512f avx512_bf16; no AMX"``: bfloat16 runs at the matrix units' rate only with
    ``amx_bf16`` (Intel Xeon 4th gen+), about 6x float32; ``avx512_bf16`` alone gives dot
    products, not tiles."""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in MATRIX_FLAGS if f in flags]
    amx = "AMX bf16" if "amx_bf16" in flags else "no AMX"
    return f"{' '.join(have) or 'none of ' + ' '.join(MATRIX_FLAGS)}; {amx}"


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
