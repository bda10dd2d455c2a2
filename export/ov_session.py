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
``check_graph`` serve either. ``OpenVinoDecoder`` is the same graph compiled for decode steps
in place on packed bfloat16 K/V buffers (the onnx backend's ``InPlaceDecoder`` under bfloat16).
"""

from __future__ import annotations

import dataclasses
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

    def __init__(self, model_file: str | Path, dtype: str = "bfloat16", float32_head: bool = True):
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
        self.model_file = Path(model_file)
        model = core.read_model(str(model_file))
        head = _split_head(model) if float32_head and dtype != "float32" else None
        self.head_dtype = "float32" if head is not None else dtype  # the vocabulary projection's
        self._compiled = compiled = _compile(core, model, dtype, model_file)
        self._request = compiled.create_infer_request()
        self._head = None
        if head is not None:  # [B, K, E] hidden states -> [B, K, V] logits, in float32
            self._head = _compile(core, head, "float32", model_file).create_infer_request()
        del model, head
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
            if self._head is not None and "logits" in names:
                by_name["logits"] = _project(self._head, by_name["logits"])
        return [np.asarray(by_name[n]) for n in names]


def _split_head(model):
    """The vocabulary projection taken off ``model`` (in place: its ``logits`` output becomes the
    projection's input, the hidden states ``[B, K, E]``) as a model of its own, or None (model
    unchanged) when ``logits`` is not ``MatMul(hidden, constant weight)``.

    Why: in bfloat16 the projection rounds the last hidden state and the tied embedding table
    to 8 bits of mantissa right before the log-softmax, the largest share of bfloat16's drift on
    the default model (mean |delta log-prob| against float32 0.058 -> 0.046 on random requests,
    0.091 -> 0.047 on the topic set, bench/RESULTS.md); in float32 it costs one more call and
    the projection's float32 weight read (+6 ms for a B=8 score call there)."""
    import openvino as ov
    import openvino.opset13 as ops

    result = next((r for r in model.get_results() if r.input_value(0).get_any_name() == "logits"), None)
    proj = result.input_value(0).get_node() if result is not None else None
    if proj is None or proj.get_type_name() != "MatMul" \
            or proj.input_value(1).get_node().get_type_name() != "Constant" \
            or any(proj.get_attributes().get(a) for a in ("transpose_a", "transpose_b")):
        return None
    hidden = proj.input_value(0)
    weight = proj.input_value(1).get_node().get_data()  # [E, V]
    x = ops.parameter([-1, -1, weight.shape[0]], ov.Type.f32, name="hidden")
    head = ov.Model([ops.matmul(x, ops.constant(weight), False, False)], [x], "vocabulary projection")
    proj.output(0).get_tensor().set_names(set())
    result.input(0).replace_source_output(hidden)
    hidden.get_tensor().set_names({"logits"})
    model.validate_nodes_and_infer_types()
    return head


def _project(head, hidden: np.ndarray) -> np.ndarray:
    """Logits ``[B, K, V]`` of ``hidden [B, K, E]`` through a split-off vocabulary projection
    (an infer request of ``_split_head``'s model), as an array the caller owns."""
    out = head.infer([np.ascontiguousarray(hidden, np.float32)], share_inputs=True, share_outputs=False)
    return next(iter(out.values()))


def _compile(core, model, dtype: str, model_file):
    """``model`` (a path or an ``ov.Model``) compiled for the CPU at ``dtype``'s precision, for
    latency; a failure is one ``BundleError`` line naming ``model_file``."""
    try:
        return core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": PRECISIONS[dtype], "PERFORMANCE_HINT": "LATENCY"})
    except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{model_file}: OpenVINO cannot compile it ({first})") from None


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16, same shape), rounded to nearest even
    (a NaN stays a NaN), as OpenVINO and torch convert them (numpy has no bfloat16 dtype)."""
    a = np.ascontiguousarray(a, np.float32)
    u = a.view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def from_bfloat16_bits(u: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they are, exactly."""
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


class OpenVinoDecoder:
    """Decode steps of a bfloat16 bundle under OpenVINO, in place on packed bfloat16 buffers.

    The bundle's graph returns ``present = Concat(past, new)``: each step writes the whole past
    out again, in float32 (converted from and to bfloat16 at every step), and each step's new
    shape makes OpenVINO prepare the graph again. Here the same graph is compiled once more
    with each ``present`` output replaced by the concatenation's second input (the step's own
    key or value, ``[B, Hkv, 1, D]``) and past and present exchanged as bfloat16: the host keeps
    packed buffers ``[B, Hkv, M, D]`` of bfloat16 bits (row b's keys at columns ``[0, n_b)``,
    the backend packs them), passes them whole (attention mask 1 on each row's keys and on the
    new column), and writes the new column at n_b. A buffer's shape changes only when it grows.
    Same contract as ``DecodeGraph`` (``storage`` says the buffers' dtype). The vocabulary
    projection stays in the graph, in bfloat16 (a decode step is bound by the weight bytes it
    reads; the session's float32 projection, ``OpenVinoSession.head_dtype``, split off the graph,
    measured 1.4 ms slower per B=8 step), so ``open``'s check compares the step with the
    bundle's graph compiled once more with its projection in bfloat16 too: equal
    (``DECODE_GRAPH``).

    bundle: an opened bundle whose session is an ``OpenVinoSession`` (bfloat16).
    """

    packed = True
    storage = "bfloat16"  # packed buffers hold bfloat16 bits (uint16)

    def __init__(self, bundle, compiled):
        self.bundle, self._compiled = bundle, compiled
        self.session = bundle.session  # its provider name, for engine_name
        self.manifest, self.compute_dtype = bundle.manifest, bundle.compute_dtype
        self.np_dtype, self.embeddings = bundle.np_dtype, bundle.embeddings
        self.path = bundle.path
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        # input name -> (address, shape) of the buffer the request reads it from: a packed
        # state's buffers stay put between steps, so they are handed to OpenVINO only when they
        # change (it keeps no reference: ``run`` checks every buffer before each step)
        self._bound: dict[str, tuple[int, tuple]] = {}

    @classmethod
    def open(cls, bundle, check: bool = True) -> OpenVinoDecoder:
        """Compile ``bundle``'s graph for in-place steps (a second copy of the weights in
        OpenVINO's memory) and, with ``check``, compare one step with the bundle's graph.

        Raises:
            BundleError: the bundle is not served by OpenVINO in bfloat16, or OpenVINO cannot
                compile the graph.
            DecodeGraphError: a ``present`` output is not ``Concat(past, new)`` on the sequence
                axis, or the step differs by more than ``DECODE_GRAPH`` (log-probs).
        """
        import openvino as ov

        from .decode_graph import DecodeGraphError, check_in_place

        session = bundle.session
        if not isinstance(session, OpenVinoSession) or session.dtype != "bfloat16":
            raise BundleError("in-place decode under OpenVINO needs a bundle opened with "
                              "compute_dtype='bfloat16'")
        core = ov.Core()
        model = core.read_model(str(session.model_file))
        for result in model.get_results():
            src = result.input_value(0)
            name = src.get_any_name()
            if not name.startswith("present."):
                continue
            cat = src.get_node()
            if not (cat.get_type_name() == "Concat" and cat.get_input_size() == 2
                    and cat.input_value(0).get_node().get_type_name() == "Parameter"
                    and cat.get_attributes().get("axis") in (2, -2)):
                raise DecodeGraphError(f"{session.model_file}: {name} is not Concat(past, new) "
                                       "on the sequence axis")
            new = cat.input_value(1)  # the step's own key or value [B, Hkv, 1, D]
            cat.output(0).get_tensor().set_names(set())
            result.input(0).replace_source_output(new)
            new.get_tensor().set_names({name})
        model.validate_nodes_and_infer_types()
        ppp = ov.preprocess.PrePostProcessor(model)
        for port in model.inputs:
            if port.get_any_name().startswith("past_key_values."):
                ppp.input(port.get_any_name()).tensor().set_element_type(ov.Type.bf16)
        for port in model.outputs:
            if port.get_any_name().startswith("present."):
                ppp.output(port.get_any_name()).tensor().set_element_type(ov.Type.bf16)
        decoder = cls(bundle, _compile(core, ppp.build(), "bfloat16", session.model_file))
        if check:  # against the bundle's graph with the same (bfloat16) vocabulary projection
            reference = bundle if session.head_dtype == "bfloat16" else dataclasses.replace(
                bundle, session=OpenVinoSession(session.model_file, "bfloat16", float32_head=False))
            check_in_place(decoder, reference=reference)
            del reference
        return decoder

    def run(self, inputs_embeds: np.ndarray, seqlens: np.ndarray, past: list) -> np.ndarray:
        """One token per row: ``inputs_embeds [B, 1, E]``; ``seqlens [B]`` keys row b holds
        (packed from column 0; its new token's position and column); ``past``: per layer
        ``(K, V)`` C-contiguous uint16 (bfloat16 bits) ``[B, Hkv, M, D]`` with M > max(seqlens),
        written at column ``seqlens[b]``. Returns logits ``[B, V]`` float32."""
        import openvino as ov

        B, M = len(seqlens), past[0][0].shape[2]
        mask = np.ones((B, M + 1), np.int64)  # the new key is column M of the graph's Concat
        mask[:, :M] = np.arange(M)[None] < seqlens[:, None]
        feed = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, np.float32),
                "attention_mask": mask, "position_ids": seqlens[:, None].astype(np.int64),
                "logits_index": np.zeros((B, 1), np.int64)}
        rows = np.arange(B)
        with self._lock:
            for i, (k, v) in enumerate(past):
                for name, a in ((f"past_key_values.{i}.key", k), (f"past_key_values.{i}.value", v)):
                    if a.dtype != np.uint16 or not a.flags.c_contiguous:
                        raise ValueError(f"{name}: expected a C-contiguous uint16 (bfloat16 bits) "
                                         f"buffer, got {a.dtype} {'' if a.flags.c_contiguous else 'non-'}contiguous")
                    where = (a.__array_interface__["data"][0], a.shape)
                    if self._bound.get(name) != where:
                        self._request.set_tensor(name, ov.Tensor(a, a.shape, ov.Type.bf16))
                        self._bound[name] = where
            out = self._request.infer(feed, share_inputs=True, share_outputs=True)
            by_name = {port.get_any_name(): value for port, value in out.items()}
            for i, (k, v) in enumerate(past):  # the step's own key and value: [B, Hkv, 1, D]
                k[rows, :, seqlens] = by_name[f"present.{i}.key"].view(np.uint16)[:, :, 0]
                v[rows, :, seqlens] = by_name[f"present.{i}.value"].view(np.uint16)[:, :, 0]
            return np.array(by_name["logits"][:, 0], np.float32)


def _value(info) -> GraphValue:
    """An ONNX ValueInfoProto as onnxruntime reports it: a name per dynamic axis, else its size."""
    dims = info.type.tensor_type.shape.dim
    return GraphValue(info.name, [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims])
