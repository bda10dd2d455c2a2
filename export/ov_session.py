"""The bundle's graph under OpenVINO, for bfloat16 on a CPU's matrix units (AMX, AVX-512 BF16).

OpenVINO reads the same ``model.onnx`` ONNX Runtime does (the bundle stays the single artefact,
and no torch is needed) and, with ``INFERENCE_PRECISION_HINT=bf16``, runs its matrix products
in bfloat16 with float32 accumulation on the CPU's bf16 units: AMX tiles on Xeons from the 4th
generation on, AVX-512 BF16 dot products elsewhere (measured in bench/RESULTS.md). Inputs and
outputs stay float32, so the backend around it, the prefix cache and the decode state do not
change; only the values do, by bfloat16's rounding (the CPU-bfloat16 row of
``softprompt/tolerances.py``).

``OpenVinoSession`` has the part of ``onnxruntime.InferenceSession``'s interface a ``Bundle``
uses (``run``, ``get_inputs``, ``get_outputs``, ``get_providers``), so ``Bundle.run`` and
``check_graph`` serve either.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import BundleError

PROVIDER = "OpenVINO"  # what get_providers() names, as onnxruntime names its providers
# compute dtype -> OpenVINO's INFERENCE_PRECISION_HINT
PRECISIONS = {"bfloat16": "bf16", "float32": "f32"}
INSTALL_HINT = "pip install 'softprompt-runtime[openvino]'"


@dataclass(frozen=True)
class GraphValue:
    """A graph input or output as ``check_graph`` reads it: name and shape (an int per static
    axis, a string per dynamic one), as onnxruntime's ``NodeArg``."""

    name: str
    shape: list


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively here (``BF16`` among its
    optimisation capabilities: AMX-BF16 or AVX-512 BF16), rather than refusing or emulating it."""
    import openvino as ov

    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoSession:
    """``model.onnx`` compiled by OpenVINO for the CPU at ``dtype``'s precision.

    Args:
        model_file: the bundle's ``model.onnx`` (its external weights file beside it).
        dtype: compute dtype, ``"bfloat16"`` or ``"float32"``; inputs and outputs are float32
            either way.

    Raises:
        BundleError: OpenVINO is not installed, the CPU has no bfloat16 units, or OpenVINO
            cannot read or compile the graph (one line naming the file).
    """

    def __init__(self, model_file: str | Path, dtype: str = "bfloat16"):
        if dtype not in PRECISIONS:
            raise BundleError(f"OpenVINO compute dtype {dtype!r}; expected one of {tuple(PRECISIONS)}")
        try:
            import openvino as ov
        except ImportError:
            raise BundleError(f"{dtype} on CPU runs the bundle under OpenVINO, which is not "
                              f"installed: {INSTALL_HINT}") from None
        core = ov.Core()
        if dtype == "bfloat16" and not cpu_has_bf16(core):
            raise BundleError("this CPU has no bfloat16 units (neither AMX-BF16 nor AVX-512 BF16): "
                              "bfloat16 would be slower than float32 here; use dtype='float32'")
        self.dtype = dtype
        try:
            compiled = core.compile_model(str(model_file), "CPU", {
                "INFERENCE_PRECISION_HINT": PRECISIONS[dtype], "PERFORMANCE_HINT": "LATENCY"})
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{model_file}: OpenVINO cannot compile it ({first})") from None
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls from two threads take turns
        # names and axes as the ONNX file declares them (OpenVINO keeps no dynamic axis names)
        graph = onnx.load(str(model_file), load_external_data=False).graph
        self._inputs = [_value(v) for v in graph.input]
        self._outputs = [_value(v) for v in graph.output]

    def get_inputs(self) -> list[GraphValue]:
        return self._inputs

    def get_outputs(self) -> list[GraphValue]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph on ``feed`` (name -> array); the outputs named (all when None), as arrays
        the caller owns (copied out of OpenVINO's buffers, which the next call reuses)."""
        names = output_names or [o.name for o in self._outputs]
        with self._lock:
            result = self._request.infer(feed, share_inputs=True, share_outputs=False)
            by_name = {port.get_any_name(): value for port, value in result.items()}
        return [np.asarray(by_name[n]) for n in names]


def _value(info) -> GraphValue:
    """An ONNX ValueInfoProto as onnxruntime reports it: a name per dynamic axis, else its size."""
    dims = info.type.tensor_type.shape.dim
    return GraphValue(info.name, [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims])
