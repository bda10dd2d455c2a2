"""bfloat16 on the CPU: every backend that offers it (onnx under OpenVINO, torch with bfloat16
weights) against PEFT in float32 and in bfloat16 on the single request (SCORE_CPU_BF16), batch
invariance in bfloat16, and what ``dtype="auto"`` picks on a CPU with and without AMX (the
capability stubbed)."""

import numpy as np
import pytest
import torch

from peft_kinds import peft_logprobs, reference_dtype, train_adapter
from softprompt.export.errors import BundleError
from softprompt.runtime import factory
from softprompt.runtime.api import Runtime
from tolerances import SCORE, SCORE_CPU_BF16

BF16_BACKENDS = ["onnx", "torch"]  # the backends that compute bfloat16 on a CPU
KINDS = ("prompt_tuning", "prefix_tuning")  # an embedding prompt and a K/V prompt
AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
NO_AMX = frozenset({"avx2", "avx512f", "avx512_bf16"})


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {k: train_adapter(tiny_dirs["llama"], k, root / k, num_virtual_tokens=12) for k in KINDS}


@pytest.fixture(scope="module")
def bf16(tiny_dirs, tiny_bundles, adapters):
    """bf16(backend): a bfloat16 Runtime on the tiny Llama holding both adapters."""
    made = {}

    def get(backend):
        if backend not in made:
            model = tiny_bundles["llama"] if backend == "onnx" else tiny_dirs["llama"]
            rt = Runtime.load(str(model), backend=backend, dtype="bfloat16", device="cpu")
            for kind, path in adapters.items():
                rt.add_prompt(kind, path)
            made[backend] = rt
        return made[backend]

    yield get
    for rt in made.values():
        rt.close()


@pytest.fixture(scope="module")
def rts_reference(tiny_dirs, adapters):
    """The float32 reference (PEFT semantics) on the tiny Llama with both adapters."""
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="reference", device="cpu")
    for kind, path in adapters.items():
        rt.add_prompt(kind, path)
    yield rt
    rt.close()


def _requests(seed=0, n=12):
    """(adapter kind, token ids) pairs of lengths 2..40; the first id is the context."""
    rng = np.random.default_rng(seed)
    return [(KINDS[i % 2], rng.integers(4, 96, int(rng.integers(2, 41))).tolist()) for i in range(n)]


def _score(rt, reqs):
    out = rt.score([{"prompt": k, "context": ids[:1], "continuation": ids[1:]} for k, ids in reqs])
    return np.concatenate([o.token_logprobs for o in out])


@pytest.mark.parametrize("ref_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_scores_within_tolerance_of_peft(bf16, tiny_dirs, adapters, backend, ref_dtype):
    """bfloat16 log-probs against PEFT's (float32 and bfloat16) on each request alone: mean and
    max |delta| within SCORE_CPU_BF16; and the same rows scored under the other adapter are
    beyond it, so the bound tells a right prefix from a wrong one."""
    rt = bf16(backend)
    assert rt.backend.dtype_name == "bfloat16"
    reqs = _requests()
    got = _score(rt, reqs)
    swapped = _score(rt, [(KINDS[1 - KINDS.index(k)], ids) for k, ids in reqs])
    with reference_dtype(getattr(torch, ref_dtype)):
        want = np.concatenate([peft_logprobs(tiny_dirs["llama"], adapters[k], ids) for k, ids in reqs])
    tol = SCORE_CPU_BF16[ref_dtype]
    d = np.abs(got - want)
    assert d.mean() <= tol["mean"] and d.max() <= tol["max"], (d.mean(), d.max())
    assert np.abs(swapped - want).mean() > tol["mean"]


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_batch_invariance(bf16, backend):
    """In bfloat16 too, a request scores the same alone and in any batch (SCORE's bfloat16
    tolerance)."""
    rt = bf16(backend)
    reqs = [{"prompt": k, "context": ids[:-3], "continuation": ids[-3:]} for k, ids in _requests(1)
            if len(ids) > 3] + [{"prompt": None, "context": [5, 6, 7], "continuation": [8]}]
    alone = [rt.score([r])[0] for r in reqs]
    for perm in (list(range(len(reqs)))[::-1], np.random.default_rng(2).permutation(len(reqs)).tolist()):
        for got, r in zip(rt.score([reqs[i] for i in perm]), perm):
            np.testing.assert_allclose(got.token_logprobs, alone[r].token_logprobs, **SCORE["bfloat16"])


def test_bf16_decode_on_every_candidate(bf16, rts_reference):
    """onnx in bfloat16 may decode on OpenVINO (bfloat16), ONNX Runtime (float32), OpenVINO in
    place on bfloat16 buffers or the float32 bundle's decode graph (in place), whichever its
    calibration found faster for the batch size: generation through each, forced, gives tokens
    whose log-probs are the float32 reference's for those tokens (SCORE_CPU_BF16)."""
    from softprompt.runtime.onnx_backend import engine_name

    rt = bf16("onnx")
    be = rt.backend
    assert [engine_name(d) for d in be.decoders] == [
        "OpenVINO bfloat16", "CPUExecutionProvider float32", "OpenVINO bfloat16 in place",
        "CPUExecutionProvider float32 in place"]
    assert set(be.decode_plan) == {1, 8, 32} and set(be.decode_plan.values()) <= {0, 1, 2, 3}
    names, ctxs = [KINDS[0], KINDS[1], None], [[5, 6, 7], [9] * 11, [4, 40]]
    for i in range(len(be.decoders)):
        be.decode_plan = dict.fromkeys(be.decode_plan, i)
        assert be.decoder(3) is be.decoders[i]
        out = rt.generate(names, ctxs, max_new_tokens=8, stop_at_eos=False)
        want = rts_reference.score([{"prompt": n, "context": c, "continuation": g.token_ids}
                                    for n, c, g in zip(names, ctxs, out)])
        d = np.abs(np.concatenate([g.token_logprobs for g in out]) -
                   np.concatenate([w.token_logprobs for w in want]))
        assert d.mean() <= SCORE_CPU_BF16["float32"]["mean"] and d.max() <= SCORE_CPU_BF16["float32"]["max"]


def test_bf16_prefix_is_computed_in_float32(bf16, tiny_bundles, adapters):
    """onnx in bfloat16 computes each prompt's prefix once on its float32 session: the log-prob
    of the first token after the prompt (read from the prefix alone) is float32's exactly."""
    rt = bf16("onnx")
    assert rt.backend.prefix_bundle.compute_dtype == "float32"
    f32 = Runtime.load(str(tiny_bundles["llama"]))
    f32.add_prompt("prompt_tuning", adapters["prompt_tuning"])
    req = [{"prompt": "prompt_tuning", "context": [7, 8]}]  # a context alone: all its tokens scored
    got, want = rt.score(req)[0].token_logprobs, f32.score(req)[0].token_logprobs
    np.testing.assert_allclose(got[0], want[0], **SCORE["float32"])
    assert got[1] != want[1]  # the request's own tokens: bfloat16
    f32.close()


def test_auto_dtype_follows_the_cpu(monkeypatch):
    """dtype='auto': bfloat16 on CUDA and on a CPU with AMX-BF16; float32 on one with AVX-512
    BF16 dot products only, or neither."""
    assert factory.auto_dtype("cpu", AMX) == "bfloat16"
    assert factory.auto_dtype("cpu", NO_AMX) == "float32"
    assert factory.auto_dtype("cpu", frozenset()) == "float32"
    assert factory.auto_dtype("cuda", frozenset()) == "bfloat16"
    monkeypatch.setattr("softprompt.machine.cpu_flags", lambda: AMX)
    assert factory.resolve_dtype("auto", "cpu") == "bfloat16"
    assert factory.resolve_dtype(None, "cpu") == "float32"  # the default stays exact
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        factory.resolve_dtype("bf16", "cpu")


@pytest.mark.parametrize("flags, want", [(AMX, "bfloat16"), (NO_AMX, "float32")])
def test_auto_load_serves_the_pick(tiny_dirs, tiny_bundles, monkeypatch, flags, want):
    """Runtime.load(dtype='auto') on a stubbed CPU: a bundle is served in bfloat16 under
    OpenVINO with AMX and in float32 under ONNX Runtime without; without OpenVINO, a model
    directory goes to the torch backend in bfloat16 (and a bundle stays float32)."""
    monkeypatch.setattr("softprompt.machine.cpu_flags", lambda: flags)
    rt = Runtime.load(str(tiny_bundles["llama"]), dtype="auto")
    assert (rt.backend.name, rt.backend.dtype_name) == ("onnx", want)
    assert rt.backend.bundle.session.get_providers()[0] == ("OpenVINO" if want == "bfloat16"
                                                            else "CPUExecutionProvider")
    rt.close()
    monkeypatch.setattr(factory, "openvino_available", lambda: False)
    rt = Runtime.load(str(tiny_dirs["llama"]), dtype="auto", device="cpu")
    assert (rt.backend.name, rt.backend.dtype_name) == ("torch" if want == "bfloat16" else "onnx", want)
    rt.close()
    rt = Runtime.load(str(tiny_bundles["llama"]), dtype="auto")
    assert rt.backend.dtype_name == "float32"
    rt.close()


def test_bf16_refused_without_bf16_units(tiny_bundles, monkeypatch):
    """Asked for bfloat16 on a CPU without bf16 units, the bundle is refused in one line
    (emulated bfloat16 is slower than float32), not served slowly."""
    monkeypatch.setattr("softprompt.export.ov_session.cpu_has_bf16", lambda core=None: False)
    with pytest.raises(BundleError, match="no bfloat16 units") as e:
        Runtime.load(str(tiny_bundles["llama"]), dtype="bfloat16")
    assert "\n" not in str(e.value)


def test_prefix_cache_file_keeps_its_dtype(bf16, tiny_bundles, adapters, tmp_path):
    """A prefix cache saved in float32 is not loaded into a bfloat16 runtime (nor back)."""
    f32 = Runtime.load(str(tiny_bundles["llama"]))
    f32.add_prompt("prompt_tuning", adapters["prompt_tuning"])
    f32.save_cache(tmp_path / "f32.cache")
    with pytest.raises(Exception, match="float32"):
        bf16("onnx").load_cache(tmp_path / "f32.cache")
    bf16("onnx").save_cache(tmp_path / "bf16.cache")
    with pytest.raises(Exception, match="bfloat16"):
        f32.load_cache(tmp_path / "bf16.cache")
    f32.close()


@pytest.mark.parametrize("flags, want", [(AMX, "--dtype auto serves bfloat16 on AMX"),
                                         (NO_AMX, "no AMX: --dtype auto falls back to float32"),
                                         (frozenset(), "no bfloat16 path")])
def test_info_names_the_cpu_path(monkeypatch, capsys, flags, want):
    """``softprompt info`` says in one line what the CPU serves, and that a CPU without AMX
    falls back to float32."""
    from softprompt.cli import main

    monkeypatch.setattr("softprompt.machine.cpu_flags", lambda: flags)
    main(["info"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "cpu path" in line]
    assert len(lines) == 1 and want in lines[0], lines


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_vocabulary_projection_is_split_off_in_float32(tiny_bundles, family):
    """Under bfloat16 the session projects onto the vocabulary in float32 (recorded with the
    bundle's bfloat16 validation and shown by ``softprompt info``): the graph without its
    projection, compiled in float32, then the split-off projection, equals ONNX Runtime's
    float32 logits (ONNX tolerance); the projection alone is hidden @ W in float32; a graph
    whose logits are not MatMul(hidden, weight) is left whole (None)."""
    import openvino as ov
    import openvino.opset13 as ops

    from softprompt.cli import _bf16_record
    from softprompt.export.bundle import load_bundle, read_manifest
    from softprompt.export.ov_session import OpenVinoSession, _compile, _project, _split_head
    from tolerances import KERNEL, ONNX

    path = tiny_bundles[family]
    record = read_manifest(path)["validation"]["bfloat16"]  # measured at export, as served
    assert record["vocabulary_projection"] == "float32" and record["passed"]
    assert "vocabulary projection in float32" in _bf16_record(record)
    assert OpenVinoSession(path / "model.onnx").head_dtype == "float32"
    assert OpenVinoSession(path / "model.onnx", float32_head=False).head_dtype == "bfloat16"
    core = ov.Core()
    model = core.read_model(str(path / "model.onnx"))
    head = _split_head(model)
    assert head is not None and model.output(0).get_partial_shape()[2].get_length() == 64
    b = load_bundle(path)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 5, 64)).astype(np.float32)
    args = (emb, np.ones((2, 5), np.int64), np.arange(5)[None].repeat(2, 0), b.empty_past(2),
            np.arange(5)[None].repeat(2, 0))
    want, _ = b.run(*args)
    feed = {"inputs_embeds": emb, "attention_mask": args[1], "position_ids": args[2], "logits_index": args[4]}
    for i, (k, v) in enumerate(args[3]):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    hidden = next(iter(_compile(core, model, "float32", path).create_infer_request().infer(feed).values()))
    proj = _compile(core, head, "float32", path).create_infer_request()
    np.testing.assert_allclose(_project(proj, hidden), want, **ONNX["float32"])
    w = next(n for n in head.get_ops() if n.get_type_name() == "Constant").get_data()
    np.testing.assert_allclose(_project(proj, hidden), hidden @ w, **KERNEL[torch.float32])
    x = ops.parameter([-1, 3], ov.Type.f32, name="x")
    other = ov.Model([ops.relu(x)], [x])
    other.output(0).get_tensor().set_names({"logits"})
    assert _split_head(other) is None and other.output(0).get_node().input_value(0).get_node().get_type_name() == "Relu"
