"""Long K/V prompts: the onnx backend's batch path (past buffers kept between batches, one row
read in place, score rows split into graph calls by prefix length) gives every row what it gets
alone, and equals the path before it (one call, a fresh past) to 1e-5; the bench's
``--kv-prompt`` mode and the onnx profile run on a tiny model (bench/long_kv.py).

Tiny llama (2 layers, 2 K/V heads, head size 16, 512 positions): a 200-token K/V prompt beside
short soft and K/V prompts and rows without a prompt, in mixed batches.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from tolerances import SCORE

from softprompt import KVPrompt, Runtime, SoftPrompt
from softprompt.runtime import onnx_backend
from softprompt.runtime.onnx_backend import group_rows

TOL = SCORE["float32"]["atol"]
LONG = 200


def kv(P: int, seed: int, name: str) -> KVPrompt:
    rng = np.random.default_rng(seed)
    return KVPrompt(rng.standard_normal((2, 2, P, 16), dtype=np.float32),
                    rng.standard_normal((2, 2, P, 16), dtype=np.float32), name=name)


@pytest.fixture(scope="module")
def rts(tiny_dirs, tiny_bundles):
    out = {"onnx": Runtime.load(str(tiny_bundles["llama"]), backend="onnx"),
           "torch": Runtime.load(str(tiny_dirs["llama"]), backend="torch")}
    for rt in out.values():
        rt.add_prompt("long", kv(LONG, 1, "long"))
        rt.add_prompt("long2", kv(LONG, 2, "long2"))
        rt.add_prompt("kv5", kv(5, 3, "kv5"))
        rt.add_prompt("soft3", SoftPrompt.random(3, 64, seed=4))
    yield out
    for rt in out.values():
        rt.close()


def req(prompt, n: int, seed: int) -> dict:
    ids = np.random.default_rng(seed).integers(3, 96, n).tolist()
    return {"prompt": prompt, "context": ids[:-2], "continuation": ids[-2:]}


MIXED = [req("long", 7, 0), req(None, 4, 1), req("kv5", 6, 2), req("soft3", 5, 3),
         req("long", 3, 4), req("soft3", 8, 5), req(None, 6, 6), req("kv5", 4, 7)]
# one request length: split by prefix length only, two calls of several rows each
SAME_L = [req(p, 6, 20 + i) for i, p in enumerate(["long", None, "kv5", "long", "soft3", "kv5", None])]


def scores(rt, requests) -> list[np.ndarray]:
    return [np.asarray(r.token_logprobs) for r in rt.score(requests)]


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


@pytest.mark.parametrize("backend,split", [("onnx", False), ("onnx", True), ("torch", False)])
def test_mixed_long_and_short_prompts_equal_each_request_alone(rts, backend, split, monkeypatch):
    """split: a graph call costs next to nothing, so the onnx backend splits the batch by prefix
    length (the tiny model's 200-token prompt alone does not make it pay)."""
    if split:
        monkeypatch.setattr(onnx_backend, "CALL_TOKENS", 1.0)
    rt = rts[backend]
    for batch in (MIXED, SAME_L):
        alone = [scores(rt, [r])[0] for r in batch]
        assert_close(scores(rt, batch), alone, TOL)
        assert_close(scores(rt, batch[::-1]), alone[::-1], TOL)  # other slots, same kept shapes


def test_onnx_groups_rows_by_prefix_length_and_equals_one_call(rts, monkeypatch):
    """The mixed batch runs as more than one graph call, and its log-probs equal those of the
    ungrouped single call over a past padded to 200 (to 1e-5)."""
    rt = rts["onnx"]
    monkeypatch.setattr(onnx_backend, "CALL_TOKENS", 1.0)  # a call costs next to nothing: split
    for batch, calls in ((SAME_L, 2), (MIXED, None)):
        before = rt.stats()["batches"]
        grouped = scores(rt, batch)
        n = rt.stats()["batches"] - before
        assert n == calls if calls else n > 1
        with monkeypatch.context() as m:
            m.setattr(onnx_backend, "group_rows",
                      lambda prefix_lens, q_lens, max_positions=None: [np.arange(len(q_lens))])
            before = rt.stats()["batches"]
            one_call = scores(rt, batch)
            assert rt.stats()["batches"] - before == 1
        assert_close(grouped, one_call, 1e-5)


def test_kept_past_slots_reused_overwritten_and_cleared(rts, monkeypatch):
    """One graph call per batch (no grouping): batches of the same shape reuse one kept past;
    a slot that held the long prompt and now holds a short one (or none) has its tail zeroed,
    and every result equals the row alone."""
    rt = rts["onnx"]
    be = rt.backend
    monkeypatch.setattr(onnx_backend, "group_rows",
                        lambda prefix_lens, q_lens, max_positions=None: [np.arange(len(q_lens))])
    batches = [[req("long", 6, 10), req("kv5", 6, 11), req(None, 6, 12)],
               [req("kv5", 6, 13), req("long2", 6, 14), req("long", 6, 15)],
               [req(None, 6, 16), req("soft3", 6, 17), req("long", 6, 18)]]
    for batch in batches + batches[::-1]:
        assert_close(scores(rt, batch), [scores(rt, [r])[0] for r in batch], TOL)
    kept = be._pasts[(3, LONG)]
    held = [n for _, n in kept.held]
    for i, n in enumerate(held):  # past each slot's prefix, zeros
        for k, v in kept.arrays:
            assert not k[i, :, n:].any() and not v[i, :, n:].any()
    assert rt.stats()["stack_bytes"] == sum(p.nbytes for p in be._pasts.values())


def test_one_row_reads_its_cache_entry_in_place(rts):
    be = rts["onnx"].backend
    entry = be.entry(rts["onnx"].prompts["long"])
    past = be._past([entry], ["x"], LONG)
    assert all(np.shares_memory(k, ek) and np.shares_memory(v, ev)
               for (k, v), ek, ev in zip(past, entry.keys, entry.values))


def test_kept_pasts_stay_within_the_cache_budget(tiny_bundles):
    """A budget that holds the prefixes but not a kept past: the past serves its batch and is
    not kept; results stay right."""
    rt = Runtime.load(str(tiny_bundles["llama"]), backend="onnx", prefix_cache_bytes=120 << 10)
    rt.add_prompt("long", kv(LONG, 1, "long"))  # 2 x 2 x 2 x 200 x 16 x 4 B = 100 KiB
    batch = [req("long", 5, i) for i in range(4)]
    alone = [scores(rt, [r])[0] for r in batch]
    assert_close(scores(rt, batch), alone, TOL)
    st = rt.stats()
    assert st["stack_bytes"] == 0 and st["bytes"] + st["stack_bytes"] <= st["max_bytes"]
    rt.close()


def test_group_rows_splits_by_prefix_length_only_when_it_pays():
    q = np.full(8, 32)
    same = group_rows(np.full(8, 2048), q)
    assert [g.tolist() for g in same] == [list(range(8))]
    near = group_rows(np.array([20, 25, 30, 0, 20, 25, 30, 5]), q)
    assert [g.tolist() for g in near] == [list(range(8))]  # padding to 30 costs less than a call
    split = group_rows(np.array([2048, 20, 20, 20, 20, 20, 20, 20]), q)
    assert sorted(g.tolist() for g in split) == [[0], list(range(1, 8))]
    capped = group_rows(np.full(64, 2048), np.full(64, 32), max_positions=10 * 2048)
    assert all(len(g) <= 10 for g in capped)
    assert sorted(np.concatenate(capped).tolist()) == list(range(64))


def test_bench_kv_prompt_mode_runs_on_a_tiny_model(tiny_dirs, tiny_bundles, tmp_path):
    """softprompt bench --kv-prompt: PEFT's prefix-tuning forward, the runtimes with that
    adapter, plain text in the context and the runtimes with it as a composed prompt, all timed
    and each within its tolerance of its baseline."""
    from softprompt.bench.driver import configure
    from softprompt.bench.long_kv import KV_METHODS, kv_table, run_kv_benchmark

    args = configure(argparse.ArgumentParser()).parse_args(
        ["--kv-prompt", "--model", str(tiny_dirs["llama"]), "--bundle", str(tiny_bundles["llama"]),
         "--P", "5,200", "--B", "2", "--L", "6", "--repeats", "1", "--warmup", "0",
         "--refcheck", "--device", "cpu", "--out", str(tmp_path)])
    results, env = run_kv_benchmark(args, log=lambda msg: None)
    assert [(r.backend, r.P) for r in results] == [(m, P) for P in (5, 200) for m in KV_METHODS]
    assert all(r.status == "ok" and len(r.times_ms) == 1 for r in results)
    checked = [r for r in results if r.backend not in ("peft-prefix", "plain-text")]
    assert all(r.max_abs_diff is not None and r.max_abs_diff <= r.tol for r in checked)
    assert env["text_tokens"] == {5: 5, 200: 200}
    assert "onnx-kv" in kv_table(results)


def test_onnx_profile_runs_on_a_tiny_model(tiny_dirs, tiny_bundles):
    from softprompt.bench.long_kv import profile_onnx

    out = profile_onnx(B=3, P=LONG, L=6, repeats=1, model=str(tiny_bundles["llama"]), log=lambda m: None)
    for label in ("before", "after"):
        for case in ("same batch", "prompt changes", "mixed P"):
            assert out[f"{label}: {case}"]["min_ms"] > 0
    assert out["memcpy GB/s (past-sized keys, out of cache)"] > 0
    assert "Concat" in out["ORT profiler: kernel ms by op"] or out["ORT profiler: kernel ms by op"]


def test_cost_model_calibration_fits_the_graph_calls(tiny_bundles):
    from softprompt.bench.long_kv import calibrate

    grid = ((1, 1, 0), (1, 4, 0), (2, 4, 0), (2, 4, 100), (1, 4, 200), (2, 2, 200))
    out = calibrate(bundle=tiny_bundles["llama"], repeats=1, grid=grid, log=lambda m: None)
    assert [(p["B"], p["L"], p["P"]) for p in out["points"]] == list(grid)
    assert all(p["min_ms"] > 0 for p in out["points"])
    assert out["fit_tokens"]["tok"] == 1.0
