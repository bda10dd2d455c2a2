"""The machine and software a figure was measured on: CPU model and installed package versions.

A leaf module (it imports nothing from the project), used by the exporter's records in
``bundle.json``, the benchmarks and ``softprompt info``.
"""

from __future__ import annotations

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
