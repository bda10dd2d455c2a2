"""Decode steps in place: a bundle's decode graph (export/decode_graph.py, each layer's attention
as ONNX Runtime's GroupQueryAttention on K/V buffers shared by past and present) and OpenVINO's
in-place decoder (export/ov_session.py, bfloat16 buffers) against the bundle's own graph, and
the onnx backend's packed decode state against its dense one through joins, departures, growth,
a row whose positions are not its key count and a switch between decoders of different
storage."""

import numpy as np
import pytest

from softprompt.export.bundle import load_bundle
from softprompt.export.decode_graph import DecodeGraph, DecodeGraphError, check_in_place
from softprompt.export.ov_session import OpenVinoDecoder, from_bfloat16_bits, to_bfloat16_bits
from softprompt.runtime.api import Runtime
from softprompt.runtime.plan import BatchPlan
from softprompt.runtime.prompts import SoftPrompt
from softprompt.runtime.requests import ScoreRequest, log_softmax
from tolerances import DECODE_GRAPH, SCORE_CPU_BF16

TOL = DECODE_GRAPH["float32"]["atol"]
TOL_BF16 = DECODE_GRAPH["bfloat16"]["atol"]


def _lp(x):
    return log_softmax(np.asarray(x, np.float64))


def _rows(b, lengths, seed=0):
    """Random-token rows of ``lengths`` through the bundle's graph: (their dense presents, the
    next token's embeddings [B, 1, E])."""
    rng = np.random.default_rng(seed)
    B, S = len(lengths), max(lengths)
    emb = b.embeddings[rng.integers(0, b.vocab_size, (B, S + 1))].astype(np.float32)
    mask = (np.arange(S)[None] < np.array(lengths)[:, None]).astype(np.int64)
    _, dense = b.run(emb[:, :S], mask, np.arange(S)[None].repeat(B, 0), b.empty_past(B),
                     np.zeros((B, 1), np.int64))
    return dense, emb[np.arange(B), lengths][:, None], mask


def _one_step(b, store=lambda a: a, dtype=np.float32):
    """Rows of lengths 3, 11, 0, 7 (odd lengths, a row with no keys) through ``b``, then one
    token more: (lengths, the next tokens' embeddings [4, 1, E], the bundle graph's log-probs for
    that step, and a function giving fresh packed buffers ``[4, Hkv, 13, D]`` of ``dtype``
    holding the rows' keys and values through ``store``)."""
    lengths = np.array([3, 11, 0, 7])
    dense, new, mask = _rows(b, lengths)
    mask = np.concatenate([mask, np.ones((4, 1), np.int64)], 1)
    want, _ = b.run(new, mask, lengths[:, None], dense, np.zeros((4, 1), np.int64))

    def packed():
        shape = (4, b.num_kv_heads, 13, b.head_dim)
        past = [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in dense]
        for (k, v), (dk, dv) in zip(past, dense):
            k[:, :, :11], v[:, :, :11] = store(dk), store(dv)
        return past

    return lengths, new, _lp(want[:, 0]), packed


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_decode_graph_equals_the_bundle_graph(tiny_bundles, family):
    """Odd lengths, a row with no keys; the control (the new token one column early, i.e. a
    position off by one and a key overwritten) lies outside the tolerance."""
    b = load_bundle(tiny_bundles[family])
    g = DecodeGraph.open(b, check=False)
    lengths, new, want, packed = _one_step(b)
    assert np.abs(_lp(g.run(new, lengths, packed())) - want).max() <= TOL
    early = np.maximum(lengths - 1, 0)
    assert np.abs(_lp(g.run(new, early, packed())) - want).max() > 10 * TOL


def test_decode_graph_writes_in_place(tiny_bundles):
    """The new key and value of row b land at column seqlens[b] of the very buffers passed in;
    every other column is unchanged."""
    b = load_bundle(tiny_bundles["llama"])
    g = DecodeGraph.open(b)
    lengths = np.array([2, 5])
    dense, new, _ = _rows(b, lengths, seed=1)
    shape = (2, b.num_kv_heads, 9, b.head_dim)
    past = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in dense]
    for (k, v), (dk, dv) in zip(past, dense):
        k[:, :, :5], v[:, :, :5] = dk, dv
    before = [(k.copy(), v.copy()) for k, v in past]
    pointers = [(k.ctypes.data, v.ctypes.data) for k, v in past]
    g.run(new, lengths, past)
    assert [(k.ctypes.data, v.ctypes.data) for k, v in past] == pointers
    for (k, v), (k0, v0) in zip(past, before):
        for a, a0 in ((k, k0), (v, v0)):
            for r, n in enumerate(lengths):
                assert np.abs(a[r, :, n]).max() > 0  # written
                cols = [c for c in range(9) if c != n]
                np.testing.assert_array_equal(a[r][:, cols], a0[r][:, cols])


def test_a_graph_of_another_shape_is_refused(tiny_bundles):
    """GPT-2 (learned positions, no RoPE) keeps decoding on its own graph: one-line reason."""
    b = load_bundle(tiny_bundles["gpt2"])
    with pytest.raises(DecodeGraphError) as e:
        DecodeGraph.open(b)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_openvino_decoder_equals_the_bundle_graph(tiny_bundles, family):
    """OpenVINO in place on bfloat16 buffers against the bundle's graph under OpenVINO (dense
    float32 past, its vocabulary projection in bfloat16 as the decoder's): odd lengths, a row
    with no keys; the control (one column early) lies outside the tolerance; the new key lands
    at column n_b of the buffers passed in, nothing else moves."""
    import dataclasses

    from softprompt.export.ov_session import OpenVinoSession

    served = load_bundle(tiny_bundles[family], compute_dtype="bfloat16")
    d = OpenVinoDecoder.open(served, check=False)
    b = dataclasses.replace(served, session=OpenVinoSession(served.session.model_file, float32_head=False))
    assert (served.session.head_dtype, b.session.head_dtype) == ("float32", "bfloat16")
    lengths, new, want, packed = _one_step(b, to_bfloat16_bits, np.uint16)
    past = packed()
    before = [(k.copy(), v.copy()) for k, v in past]
    pointers = [(k.ctypes.data, v.ctypes.data) for k, v in past]
    assert np.abs(_lp(d.run(new, lengths, past)) - want).max() <= TOL_BF16
    assert [(k.ctypes.data, v.ctypes.data) for k, v in past] == pointers
    for (k, v), (k0, v0) in zip(past, before):
        for a, a0 in ((k, k0), (v, v0)):
            for r, n in enumerate(lengths):
                assert np.abs(from_bfloat16_bits(a[r, :, n])).max() > 0  # written
                np.testing.assert_array_equal(np.delete(a[r], n, 1), np.delete(a0[r], n, 1))
    early = np.maximum(lengths - 1, 0)
    assert np.abs(_lp(d.run(new, early, packed())) - want).max() > TOL_BF16
    # new buffers are read, not the ones the request last held (it keeps their addresses)
    assert np.abs(_lp(d.run(new, lengths, packed())) - want).max() <= TOL_BF16
    with pytest.raises(ValueError, match="expected a C-contiguous uint16"):
        d.run(new, lengths, [(k.astype(np.float32), v) for k, v in packed()])
    assert check_in_place(d, reference=b) <= TOL_BF16


def test_bfloat16_bits_round_as_torch_does():
    """to_bfloat16_bits: torch's float32 -> bfloat16 rounding (nearest even, ties, overflow to
    inf, subnormals, signs); NaN stays NaN; from_bfloat16_bits gives the values back exactly."""
    import torch

    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 4096),
                        np.array([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38, -3.4e38, 1e-40,
                                  np.inf, -np.inf], np.float32)]).astype(np.float32)
    bits = to_bfloat16_bits(a)
    want = torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    np.testing.assert_array_equal(from_bfloat16_bits(bits), torch.from_numpy(a).bfloat16().float().numpy())
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32)))).all()


def _runtime(path, decode_graphs=True, dtype=None):
    rt = Runtime.load(str(path), backend="onnx", dtype=dtype)
    rt.backend.decode_graphs = decode_graphs
    for name, n, seed in (("p1", 1, 1), ("p20", 20, 2), ("p100", 100, 3)):
        rt.add_prompt(name, SoftPrompt.random(n, 64, seed=seed, std=0.5))
    return rt


def _only(rt, decoder=None):
    """``rt`` with decode steps on ``decoder`` (one of its in-place decoders) or, with None, on
    its bundle's own graph: nothing else to pick from."""
    be = rt.backend
    be.decoders = [be.bundle] + ([decoder] if decoder is not None else [])
    be.decode_plan, be.decode_ms = {}, {}
    return rt


@pytest.fixture(params=["float32", "bfloat16"])
def in_place_and_dense(request, tiny_bundles):
    """(runtime decoding in place, runtime decoding on the bundle's graph, tolerance): float32
    on the decode graph, bfloat16 on OpenVINO's decoder (the dense one under OpenVINO too)."""
    path = tiny_bundles["llama"]
    if request.param == "float32":
        return _runtime(path), _runtime(path, False), TOL
    fused, dense = _runtime(path, dtype="bfloat16"), _runtime(path, False, dtype="bfloat16")
    ov = [d for d in fused.backend.decoders if isinstance(d, OpenVinoDecoder)]
    assert len(ov) == 1 and fused.backend.dtype_name == "bfloat16"
    return _only(fused, ov[0]), _only(dense), TOL_BF16


def test_generation_decodes_in_place(tiny_bundles):
    """Runtime.generate on a bundle decodes on its decode graph; greedy tokens equal those of
    the same backend decoding on the bundle's graph."""
    fused, dense = _runtime(tiny_bundles["llama"]), _runtime(tiny_bundles["llama"], False)
    names, ctxs = ["p20", None, "p100"], [[5, 6, 7], [9], [4] * 12]
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    got, want = fused.generate(names, ctxs, **kw), dense.generate(names, ctxs, **kw)
    assert isinstance(fused.backend.decoder(3), DecodeGraph)
    assert not any(isinstance(d, DecodeGraph) for d in dense.backend.decoders)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_packed_state_equals_dense_through_joins_departures_and_growth(in_place_and_dense):
    """Backend steps on the packed state (decode graph; OpenVINO's decoder in bfloat16) and the
    dense one (bundle graph), fed the same tokens: equal log-probs after prefill, decode, rows
    leaving, rows joining, the buffers growing past their first capacity; a state whose next
    position is not its key count stays dense and still equals."""
    rt_f, rt_d, TOL = in_place_and_dense
    be_f, be_d = rt_f.backend, rt_d.backend

    def plan(rt, reqs):
        return BatchPlan.build([rt.check(ScoreRequest(p, c)) for p, c in reqs], score=False)

    first = [("p20", [5, 6, 7]), (None, [9, 8]), ("p100", [4] * 6)]
    later = [("p1", [5]), (None, [7, 7, 7, 7])]
    s_f, l_f = be_f.prefill(plan(rt_f, first), [7, 2, 6])  # capacities below what follows
    s_d, l_d = be_d.prefill(plan(rt_d, first), [7, 2, 6])
    np.testing.assert_allclose(_lp(l_f), _lp(l_d), atol=TOL)

    for _ in range(3):
        ids = np.asarray(l_d).argmax(-1)
        l_f, l_d = be_f.decode(s_f, ids), be_d.decode(s_d, ids)
        assert np.abs(_lp(l_f) - _lp(l_d)).max() <= TOL
    assert s_f.packed and not s_d.packed and s_f.storage == be_f.dtype_name
    capacity = s_f.mask.shape[1]
    s_f, s_d = be_f.select(s_f, [0, 2]), be_d.select(s_d, [0, 2])
    l_f, l_d = l_f[[0, 2]], l_d[[0, 2]]
    new_f, n_f = be_f.prefill(plan(rt_f, later), [30, 30])
    new_d, n_d = be_d.prefill(plan(rt_d, later), [30, 30])
    s_f, s_d = be_f.join(s_f, new_f), be_d.join(s_d, new_d)
    assert s_f.packed
    l_f, l_d = np.concatenate([l_f, n_f]), np.concatenate([l_d, n_d])
    for _ in range(capacity):  # past the capacity packing gave the first rows
        ids = np.asarray(l_d).argmax(-1)
        l_f, l_d = be_f.decode(s_f, ids), be_d.decode(s_d, ids)
        assert np.abs(_lp(l_f) - _lp(l_d)).max() <= TOL
    assert s_f.packed and s_f.mask.shape[1] > capacity
    np.testing.assert_array_equal(s_f.lens, s_f.next_pos)

    s_f, _ = be_f.prefill(plan(rt_f, first), [8] * 3)  # positions shifted: not packable
    s_d, l_d = be_d.prefill(plan(rt_d, first), [8] * 3)
    s_f.next_pos, s_d.next_pos = s_f.next_pos + 3, s_d.next_pos + 3
    ids = np.asarray(l_d).argmax(-1)
    l_f, l_d = be_f.decode(s_f, ids), be_d.decode(s_d, ids)
    assert not s_f.packed
    assert np.abs(_lp(l_f) - _lp(l_d)).max() <= TOL


def test_a_state_moves_between_decoders_of_different_storage(tiny_bundles):
    """bfloat16 serving may step a state on the float32 decode graph at one batch size and on
    OpenVINO's decoder at another: the packed buffers change dtype (float32 <-> bfloat16 bits)
    on the way. Against the same steps on each decoder's dense counterpart (the bundle's graph
    under ONNX Runtime, under OpenVINO): equal within DECODE_GRAPH while the past is what the
    dense path holds; once a bfloat16-rounded past is back on a float32 graph, within the
    bfloat16 bound (SCORE_CPU_BF16's max)."""
    rt = _runtime(tiny_bundles["llama"], dtype="bfloat16")
    be = rt.backend
    ort_graph, ov_graph = (next(d for d in be.decoders if isinstance(d, kind))
                           for kind in (DecodeGraph, OpenVinoDecoder))
    ort_dense = next(d for d in be.decoders if d is ort_graph.bundle)
    reqs = [("p20", [5, 6, 7]), (None, [9, 8]), ("p1", [4] * 6)]
    plan = BatchPlan.build([rt.check(ScoreRequest(p, c)) for p, c in reqs], score=False)
    (s_f, l_f), (s_d, _) = be.prefill(plan, [8] * 3), be.prefill(plan, [8] * 3)
    bound = SCORE_CPU_BF16["float32"]["max"]
    for i, (fused, dense, tol, storage, dtype) in enumerate((
            (ort_graph, ort_dense, TOL, "float32", np.float32),
            (ov_graph, be.bundle, TOL_BF16, "bfloat16", np.uint16),
            (ort_graph, ort_dense, bound, "float32", np.float32),
            (ov_graph, be.bundle, bound, "bfloat16", np.uint16))):
        ids = np.asarray(l_f).argmax(-1)
        l_f, l_d = be._step(fused, s_f, ids), be._step(dense, s_d, ids)
        assert s_f.packed and s_f.storage == storage and s_f.past[0][0].dtype == dtype
        assert np.abs(_lp(l_f) - _lp(l_d)).max() <= tol, i
    np.testing.assert_array_equal(s_f.lens, s_d.lens)


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_decode_graph_is_fused(tiny_dirs, tiny_bundles, tmp_path, weights):
    """The rewritten graph: one GroupQueryAttention per layer, every RMSNorm one
    SimplifiedLayerNormalization, q/k/v and gate/up one projection each (MatMul, or MatMulNBits
    with its minimums' MatMul), nothing left of the traced attention; and it equals the
    bundle's graph (DecodeGraph.open checks one step)."""
    from collections import Counter

    import onnx

    from softprompt.export import export
    from softprompt.export.decode_graph import rewrite

    path = tiny_bundles["llama"] if weights == "float" else export(
        tiny_dirs["llama"], tmp_path / "int4", weights="int4", progress=False)
    b = load_bundle(path)
    model, held = rewrite(onnx.load(str(path / "model.onnx"), load_external_data=False), b.num_heads,
                          b.num_kv_heads, b.head_dim, b.num_layers, 64, str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    n = b.num_layers
    assert ops["GroupQueryAttention"] == n and ops["SimplifiedLayerNormalization"] == 2 * n + 1
    assert ops["Split"] == 2 * n and len(held) == 2 * n * (1 if weights == "float" else 4)
    if weights == "float":
        assert ops["MatMul"] == 4 * n + 1  # qkv, o, gate/up, down; the vocabulary projection
    else:
        assert ops["MatMulNBits"] == 4 * n
    assert not {"Softmax", "Pow", "ReduceMean", "Neg", "Reciprocal"} & set(ops)
    assert {i.name for i in model.graph.input} >= {"seqlens_k", "total_sequence_length"}
    assert not {"attention_mask", "position_ids"} & {i.name for i in model.graph.input}
    DecodeGraph.open(b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_steps_bench_reports_both_calls(tiny_bundles, dtype):
    """``python -m softprompt.bench.decode_steps`` on a tiny bundle: a memory line naming the
    engine, then one line per batch size and past with both calls' times and the ratio of their
    medians."""
    import re

    from softprompt.bench.decode_steps import run

    lines: list[str] = []
    run([str(tiny_bundles["llama"])], [1, 3], [5], rounds=1, block=2, log=lines.append,
        dtypes=(dtype,))
    engine = "OpenVINO bfloat16" if dtype == "bfloat16" else "ONNX Runtime float32"
    assert len(lines) == 3 and f"({engine}): decode graph opened" in lines[0]
    for line in lines[1:]:
        graph, inplace, ratio = map(float, re.findall(
            r"graph +([\d.]+) ms.*in place +([\d.]+) ms.*in place ([\d.]+)x", line)[0])
        assert graph > 0 and inplace > 0 and ratio > 0  # times printed to 0.01 ms: no closer check
    assert [re.search(r"B=(\d+)", line)[1] for line in lines[1:]] == ["1", "3"]


def test_a_decode_graph_that_fails_to_open_fails_no_request(tiny_bundles, monkeypatch, caplog):
    """ONNX Runtime refusing the rewritten graph (any error) leaves decode on the bundle's
    graph with one warning; generation gives the same tokens as with decode graphs off."""
    def refuse(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : made up\nsecond line")

    monkeypatch.setattr(DecodeGraph, "open", refuse)
    broken, dense = _runtime(tiny_bundles["llama"]), _runtime(tiny_bundles["llama"], False)
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    with caplog.at_level("WARNING", logger="softprompt.runtime.onnx_backend"):
        got = broken.generate(["p20", None], [[5, 6], [7]], **kw)
    want = dense.generate(["p20", None], [[5, 6], [7]], **kw)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert not any(isinstance(d, DecodeGraph) for d in broken.backend.decoders)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : made up" in warnings[0]
    assert "second line" not in warnings[0]
