"""4-bit weight bundles (export/quantize.py): GGUF blocks carried over exactly, round-to-nearest
otherwise, and the export path that writes and checks them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softprompt.export import quantize as q
from softprompt.export.bundle import load_bundle

K, N = 96, 40  # 3 blocks of 32 along K; N not a multiple of anything


def _gguf_raw(weight: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's own quantizer (gguf.quants): raw blocks [N, K/32 * bytes per block]."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(weight, getattr(GGMLQuantizationType, kind))


def _weight(seed=0, n=N, k=K):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_block_conversion_is_exact(kind):
    """Blocks read from GGUF dequantise bit for bit as gguf does, and the MatMulNBits
    representation written for them holds the same numbers: Q4_0 with the default zero
    point 8; Q4_1 with zero point 0 (d * q) plus its minimum."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _gguf_raw(_weight(), kind)
    want = dequantize(raw, getattr(GGMLQuantizationType, kind))  # [N, K] float32
    blocks = q.from_gguf_blocks(raw, kind)
    np.testing.assert_array_equal(blocks.dequantize(), want)
    packed = q.pack_codes(blocks.codes)
    assert packed.shape == (N, K // 32, 16) and packed.dtype == np.uint8
    if kind == "Q4_0":
        np.testing.assert_array_equal(q.matmulnbits_dequantize(packed, blocks.scales, None), want)
    else:
        zero = np.zeros((N, 2), np.uint8)  # ceil(3 blocks / 2) bytes per row
        dq = q.matmulnbits_dequantize(packed, blocks.scales, zero)  # d * q, exact
        got = (dq.reshape(N, -1, 32) + blocks.mins[..., None]).reshape(N, K)
        np.testing.assert_array_equal(got, want)


def test_from_gguf_blocks_refuses_other_types():
    with pytest.raises(ValueError, match=r"'Q8_0' is not 4-bit; expected one of"):
        q.from_gguf_blocks(np.zeros((2, 34), np.uint8), "Q8_0")


def _matmul_graph(path, weights: list[np.ndarray], vocab: int):
    """x [B, S, K] -> x @ W0^T -> ... -> logits [B, S, vocab] (the last weight is [vocab, K]),
    weights as float32 initializers [K, N] in an external data file, as the exporter saves."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from softprompt.export.bundle import WEIGHTS_FILE

    nodes, inits, x = [], [], "inputs_embeds"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        y = "logits" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=f"mm{i}"))
        x = y
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "inputs_embeds", TensorProto.FLOAT, ["batch", "seq", weights[0].shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=WEIGHTS_FILE,
              size_threshold=0)
    return path


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"inputs_embeds": x})[0]


def test_gguf_q4_1_carried_over_exactly(tmp_path):
    """A graph whose weights are a GGUF file's Q4_1 tensors dequantised (one with its rows
    reordered, as transformers does to llama's q/k) gets exactly those blocks: on the identity
    the 4-bit graph returns the float graph's weights bit for bit. A weight absent from the
    file is rounded to nearest; the vocabulary projection stays float32."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize

    raws = [_gguf_raw(_weight(0, 64, K), "Q4_1"), _gguf_raw(_weight(1, K, 64), "Q4_1")]
    writer = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for i, raw in enumerate(raws):
        writer.add_tensor(f"blk.0.w{i}.weight", raw, raw_dtype=GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dq = [dequantize(r, GGMLQuantizationType.Q4_1) for r in raws]
    perm = np.random.default_rng(2).permutation(64)
    rtn = _weight(3, 64, K)
    vocab = _weight(4, 50, 64)
    weights = [dq[0][perm], dq[1], rtn, vocab]  # [64, K], [K, 64], [64, K], [50, 64]
    model = _matmul_graph(tmp_path / "model.onnx", weights, vocab=50)
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    want = _run(model, x)

    report = q.quantize_int4(model, gguf=tmp_path / "m.gguf")
    assert (report["exact"], report["rtn"], report["kept_float"]) == (2, 1, ["mm3"])
    got = _run(model, x)
    # the function now computed: the GGUF weights as they were, the third weight rounded to
    # nearest (llama.cpp Q4_1), the vocabulary projection float32
    expect = x.astype(np.float64)
    for w in (weights[0], weights[1], q.rtn_blocks(rtn).dequantize(), vocab):
        expect = expect @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5 * np.abs(expect).max())
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()  # the rounding did happen

    # the two carried-over weights on their own: identity in, float weights out, bit for bit
    import onnx

    graph = onnx.load(str(model))
    for i, w in enumerate(weights[:2]):
        single = tmp_path / f"single{i}"
        single.mkdir()
        _matmul_graph(single / "model.onnx", [w], vocab=w.shape[0])
        q.quantize_int4(single / "model.onnx", gguf=tmp_path / "m.gguf", keep_float=())
        eye = np.eye(w.shape[1], dtype=np.float32)[None]  # [1, K, K]
        np.testing.assert_array_equal(_run(single / "model.onnx", eye)[0], w.T)
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)


def _q8_gguf(path, table_raw):
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", table_raw, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tied_q8_0_table_is_stored_once_exactly(tmp_path):
    """A vocabulary projection tied to a Q8_0 table (the default model's case) is stored once,
    as the GGUF blocks: the host table and the graph's projection both dequantise them, bit for
    bit what they were; a table that does not match the file keeps ``embeddings.npy``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from softprompt.export.bundle import EMBEDDINGS_Q8, load_table

    v = 50
    raw = _gguf_raw(_weight(4, v, K), "Q8_0")
    table = dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32)  # [V, K]
    _q8_gguf(tmp_path / "m.gguf", raw)
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    for name, emb in (("tied", table), ("other", table + 1e-3)):
        root = tmp_path / name
        root.mkdir()
        np.save(root / "embeddings.npy", emb)
        model = _matmul_graph(root / "model.onnx", [emb], vocab=v)
        want = _run(model, x)
        report = q.quantize_int4(model, gguf=tmp_path / "m.gguf")
        if name == "other":
            assert report["vocab"] == "float32" and (root / "embeddings.npy").is_file()
            np.testing.assert_array_equal(_run(model, x), want)
            continue
        assert report["vocab"] == "q8_0 shared with the table"
        assert not (root / "embeddings.npy").exists()
        assert all((root / f).is_file() for f in EMBEDDINGS_Q8)
        np.testing.assert_array_equal(_run(model, x), want)  # the same float32 weight, folded
        got = load_table(root, {"vocab_size": v, "hidden_size": K, "embeddings": "q8_0"})
        assert got.shape == table.shape and len(got) == v
        np.testing.assert_array_equal(np.asarray(got), table)
        ids = np.array([[3, 0], [49, 3]])
        np.testing.assert_array_equal(got[ids], table[ids])  # rows dequantised on access
        np.testing.assert_array_equal(got[5:9], table[5:9])
        assert isinstance(got.codes, np.memmap) and not got.codes.flags.writeable
        graph_bytes = sum(f.stat().st_size for f in root.glob("model.onnx*"))
        assert graph_bytes < table.nbytes  # the table is not stored a second time


def test_q8_0_table_files_are_checked(tmp_path):
    """Wrong dtype or shape in either Q8_0 file: a one-line BundleError naming the file."""
    from softprompt.export.bundle import EMBEDDINGS_Q8, BundleError, load_table

    manifest = {"vocab_size": 4, "hidden_size": 64, "embeddings": "q8_0"}
    np.save(tmp_path / EMBEDDINGS_Q8[0], np.zeros((4, 64), np.int16))
    np.save(tmp_path / EMBEDDINGS_Q8[1], np.zeros((4, 2), np.float16))
    with pytest.raises(BundleError, match=r"embeddings_q8.npy: int16 \(4, 64\), expected int8"):
        load_table(tmp_path, manifest)
    np.save(tmp_path / EMBEDDINGS_Q8[0], np.zeros((4, 64), np.int8))
    np.save(tmp_path / EMBEDDINGS_Q8[1], np.zeros((4, 3), np.float16))
    with pytest.raises(BundleError, match=r"embeddings_scales.npy: float16 \(4, 3\), expected"):
        load_table(tmp_path, manifest)


def test_rtn_error_is_bounded(tmp_path):
    """Round-to-nearest: every weight within half a step d / 2 of the float, plus the fp16
    rounding of d and m (relative 2^-11 each: |dm| + 15 |dd|)."""
    w = _weight(7)
    blocks = q.rtn_blocks(w)
    d = np.repeat(blocks.scales, 32, axis=1)
    m = np.repeat(blocks.mins, 32, axis=1)
    err = np.abs(blocks.dequantize() - w)
    assert np.all(err <= d / 2 + 2.0**-11 * (np.abs(m) + 15 * d) + 1e-7)
    assert err.max() > d.min() / 4  # it is a 4-bit rounding, not a copy


def _null_drift(float_bundle, requests) -> float:
    """Mean |log-prob + log V| of the float graph's scores: the score drift of constant logits."""
    lp = q.request_logprobs(load_bundle(float_bundle), requests)
    return float(np.mean(np.abs(lp + np.log(load_bundle(float_bundle).vocab_size))))


def _drift_ratio(bundle, float_bundle, requests) -> float:
    """Mean |score change| against the float graph, relative to that of constant logits."""
    got = q.request_logprobs(bundle, requests)
    want = q.request_logprobs(load_bundle(float_bundle), requests)
    return q.score_drift(got, want)["mean_abs_dlogprob"] / _null_drift(float_bundle, requests)


def test_export_int4_tiny_bundle(tiny_dirs, tiny_bundles, tmp_path):
    """``export(weights="int4")`` on a float model: round-to-nearest MatMulNBits, checked
    against PyTorch (validate.ROUNDED_DRIFT_RATIO) and its score drift recorded; the bundle
    serves scores through the Runtime close to the float32 bundle's: its drift stays under the
    same fraction of constant logits' drift, a bound broken graphs exceed
    (test_broken_rounded_graphs_are_refused)."""
    from softprompt import Runtime
    from softprompt.export import export
    from softprompt.export.validate import ROUNDED_DRIFT_RATIO

    out = export(tiny_dirs["llama"], tmp_path / "int4", weights="int4", progress=False)
    m = json.loads((out / "bundle.json").read_text())
    assert m["quantization"] == "int4" and m["weights"]["rtn"] == 14
    assert m["weights"]["exact"] == 0 and len(m["weights"]["kept_float"]) == 1
    v = m["validation"]
    scores = v["scores"]
    assert v["passed"] and scores["tokens"] == 8 * 31 and v["drift_ratio"] == ROUNDED_DRIFT_RATIO
    ratios = [v[f"drift_ratio_{use}"] for use in ("prefix", "request", "decode", "reference")]
    assert all(0 < r <= 0.2 for r in ratios), ratios  # measured 0.07-0.10 (validate.py)
    assert 0 < scores["mean_abs_dlogprob"] <= scores["max_abs_dlogprob"]
    graph_ops = {n.op_type for n in __import__("onnx").load(str(out / "model.onnx"),
                                                            load_external_data=False).graph.node}
    assert "MatMulNBits" in graph_ops
    bundle = load_bundle(out)
    req = q.drift_requests(bundle, batch=2, prompt_len=3, length=6, seed=1)
    assert 0 < _drift_ratio(bundle, tiny_bundles["llama"], req) <= ROUNDED_DRIFT_RATIO
    rt = Runtime.load(str(out), backend="onnx")
    r = rt.score([{"prompt": None, "context": [3, 4, 5], "continuation": [6]}])[0]
    assert r.error is None and np.isfinite(r.logprob)


def _zero_first_layer(monkeypatch):
    """Round the first 7 weights rounded to nearest (the first decoder layer's projections, in
    graph order) to zero blocks: a zeroed layer."""
    rtn, calls = q.rtn_blocks, []

    def zeroed(w, *args, **kwargs):
        blocks = rtn(w, *args, **kwargs)
        calls.append(w.shape)
        if len(calls) <= 7:
            blocks.scales[:] = 0
            if blocks.mins is not None:
                blocks.mins[:] = 0
        return blocks

    monkeypatch.setattr(q, "rtn_blocks", zeroed)
    return calls


class _ConstantLogits:
    """A bundle whose graph answers constant logits (its presents untouched)."""

    def __init__(self, bundle):
        self._bundle = bundle

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def run(self, *args, **kwargs):
        logits, pasts = self._bundle.run(*args, **kwargs)
        return np.zeros_like(logits), pasts


@pytest.mark.parametrize("mode", ["drift_ratio", "logprob_atol"])
def test_constant_logits_fail_the_log_prob_bounds(tiny_dirs, tiny_bundles, mode):
    """A graph that outputs constant logits fails both log-prob checks of validate_bundle (the
    rounded graphs' relative bound, and the float16 graphs' absolute one) and the score-drift
    bound test_export_int4_tiny_bundle holds a rounded bundle to."""
    from softprompt.export import ExportValidationError
    from softprompt.export.validate import ROUNDED_DRIFT_RATIO, VALIDATION_ATOL, validate_bundle
    from softprompt.export.wrapper import ExportWrapper
    from softprompt.models import load_model

    wrapper = ExportWrapper(load_model(tiny_dirs["llama"]).model)
    bundle = load_bundle(tiny_bundles["llama"])
    validate_bundle(wrapper, bundle, **{mode: ROUNDED_DRIFT_RATIO if mode == "drift_ratio"
                                        else VALIDATION_ATOL["float16"]})  # the intact graph passes
    bound = {"drift_ratio": ROUNDED_DRIFT_RATIO} if mode == "drift_ratio" else \
        {"logprob_atol": VALIDATION_ATOL["float16"]}
    with pytest.raises(ExportValidationError, match="constant logits would|top-1 log-probs differ"):
        validate_bundle(wrapper, _ConstantLogits(bundle), **bound)
    req = q.drift_requests(bundle, batch=2, prompt_len=3, length=6, seed=1)
    assert _drift_ratio(_ConstantLogits(bundle), tiny_bundles["llama"], req) > ROUNDED_DRIFT_RATIO


def test_a_zeroed_layer_is_refused(tiny_dirs, tiny_bundles, tmp_path, monkeypatch):
    """The first decoder layer's 4-bit weights rounded to zero: ``export(weights="int4")``
    refuses the graph, and without validation its score drift exceeds the test's bound."""
    from softprompt.export import ExportValidationError, export
    from softprompt.export.validate import ROUNDED_DRIFT_RATIO

    calls = _zero_first_layer(monkeypatch)
    with pytest.raises(ExportValidationError, match="the rounded graph is broken"):
        export(tiny_dirs["llama"], tmp_path / "zeroed", weights="int4", progress=False)
    assert len(calls) == 14 and not (tmp_path / "zeroed").exists()
    _zero_first_layer(monkeypatch)  # counted afresh
    out = export(tiny_dirs["llama"], tmp_path / "unchecked", weights="int4", validate=False,
                 progress=False)
    req = q.drift_requests(load_bundle(out), batch=2, prompt_len=3, length=6, seed=1)
    assert _drift_ratio(load_bundle(out), tiny_bundles["llama"], req) > ROUNDED_DRIFT_RATIO


def test_export_int4_refuses_fp16(tiny_dirs, tmp_path):
    from softprompt.export import export

    with pytest.raises(ValueError, match=r"weights='int4' is not supported with dtype='fp16'"):
        export(tiny_dirs["llama"], tmp_path / "x", dtype="fp16", weights="int4", progress=False)


def test_bundle_for_picks_int4_only_within_tolerance(tiny_dirs, tmp_path, monkeypatch):
    """bundle_for: weights="int4" derives the 4-bit sibling from the float32 bundle once; the
    default pick serves it only when it recorded a score drift within the tolerance (the tiny
    random model's round-to-nearest drift is not) and a faster scoring batch than float32;
    create=False exports nothing."""
    from softprompt.export import bundle_for

    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    model = tiny_dirs["llama"]
    assert bundle_for(model, create=False) is None
    int4 = bundle_for(model, weights="int4")
    fp32 = bundle_for(model, dtype="float32")
    assert int4.name == fp32.name + "-int4" and int4.parent == fp32.parent
    m = json.loads((int4 / "bundle.json").read_text())
    assert m["quantization"] == "int4" and m["fingerprint"] == \
        json.loads((fp32 / "bundle.json").read_text())["fingerprint"]
    assert m["validation"]["scores"]["within_tolerance"] is False  # random weights, RTN
    assert bundle_for(model) == fp32 and bundle_for(model, create=False) == fp32
    assert set(m["weights"]["request_ms"]) >= {"float32", "int4", "device"}
    m["validation"]["scores"]["within_tolerance"] = True  # as an exact GGUF carry-over records
    m["weights"]["request_ms"].update(float32=2.0, int4=3.0)  # ... but slower: still float32
    (int4 / "bundle.json").write_text(json.dumps(m))
    assert bundle_for(model) == fp32
    m["weights"]["request_ms"].update(float32=3.0, int4=2.0)  # within tolerance and faster
    (int4 / "bundle.json").write_text(json.dumps(m))
    assert bundle_for(model) == int4 and bundle_for(model, create=False) == int4
    assert bundle_for(model, dtype="float32") == fp32  # asking for float32 gets float32
