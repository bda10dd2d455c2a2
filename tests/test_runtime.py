"""Runtime on tiny models: cached backends against the reference backend (PEFT semantics, float32,
each request alone), batch invariance, cache behaviour, generation, services, bad inputs."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from softprompt.runtime.api import Runtime
from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
from softprompt.runtime.requests import RequestError
from tolerances import SCORE

E = 64
CACHED = ["torch", "onnx"]


def _prompts():
    return {"p1": SoftPrompt.random(1, E, seed=1), "p20": SoftPrompt.random(20, E, seed=2),
            "p100": SoftPrompt.random(100, E, seed=3, std=0.5)}


@pytest.fixture(scope="session")
def rts(tiny_dirs, request):
    """rts(family, backend, **load_kwargs): one Runtime per key for the session, holding the
    three test prompts; onnx runtimes use the session's tiny bundles (exported on first use)."""
    made = {}

    def get(family, backend, **kw):
        key = (family, backend, tuple(sorted(kw.items())))
        if key not in made:
            model = (request.getfixturevalue("tiny_bundles")[family] if backend == "onnx"
                     else tiny_dirs[family])
            rt = Runtime.load(str(model), backend=backend, **kw)
            for name, sp in _prompts().items():
                rt.add_prompt(name, sp)
            made[key] = rt
        return made[key]

    return get


def mixed_requests(seed=0):
    """One batch mixing P in {0, 1, 20, 100}, L in {1, 7, 64}, with and without continuations."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(4, 96, n).tolist()

    return [
        {"prompt": "p1", "context": ids(7), "continuation": ids(3)},
        {"prompt": "p100", "context": ids(1), "continuation": ids(1)},
        {"prompt": "p20", "context": ids(64)},
        {"prompt": "p1", "context": ids(1)},
        {"prompt": "p100", "context": ids(60), "continuation": ids(4)},
        {"prompt": "p20", "context": ids(7), "continuation": ids(1)},
        {"prompt": None, "context": ids(7), "continuation": ids(2)},
        {"prompt": "p100", "context": ids(7)},
    ]


def assert_scores_close(got, want, dtype="float32"):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **SCORE[dtype])


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_reference_matches_peft(tiny_dirs, family, tmp_path):
    """backend='reference' on a PEFT-saved adapter equals PEFT's own forward (float32, 1e-4)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20))
    pm.save_pretrained(tmp_path / "ad")
    rt = Runtime.load(str(tiny_dirs[family]), backend="reference")
    rt.add_prompt("peft", tmp_path / "ad")
    ctx, cont = [5, 9, 14, 3, 40], [7, 8, 21]
    got = rt.score([{"prompt": "peft", "context": ctx, "continuation": cont}])[0]
    with torch.no_grad():
        lp = pm.eval()(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    want = [lp[20 + len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]
    np.testing.assert_allclose(got.token_logprobs, want, **SCORE["float32"])


@pytest.mark.parametrize("backend", CACHED)
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_cached_mixed_batch_equals_reference_alone(rts, family, backend):
    """A batch mixing prompts (P 0/1/20/100) and lengths (L 1/7/64) gives every request the
    reference result it gets alone."""
    reqs = mixed_requests()
    ref = rts(family, "reference")
    want = [ref.score([r])[0] for r in reqs]
    got = rts(family, backend).score(reqs)
    assert_scores_close(got, want)


@pytest.mark.parametrize("backend", CACHED)
def test_batch_invariance_and_padding(rts, backend):
    rt = rts("llama", backend)
    reqs = mixed_requests(seed=1)
    alone = [rt.score([r])[0] for r in reqs]
    for perm in (list(range(len(reqs)))[::-1], [3, 0, 6, 2, 7, 1, 5, 4]):
        batched = rt.score([reqs[i] for i in perm])
        assert_scores_close(batched, [alone[i] for i in perm])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_torch_backend_through_triton_kernels(rts, tiny_dirs, family):
    """The CUDA path's wiring (Triton prefill/decode kernels called from the registered
    attention function, decode K/V written by write_kv), run on CPU under TRITON_INTERPRET=1:
    scores and greedy tokens equal the reference's."""
    ref = rts(family, "reference")
    rt = Runtime.load(str(tiny_dirs[family]), backend="torch")
    rt.backend.triton = True
    for name, sp in _prompts().items():
        rt.add_prompt(name, sp)
    reqs = mixed_requests(seed=4)
    assert_scores_close(rt.score(reqs), [ref.score([r])[0] for r in reqs])
    names, ctxs = ["p20", None, "p100"], [[5, 6, 7], [9, 9], [4] * 9]
    want = [ref.generate(n, [c], max_new_tokens=5, stop_at_eos=False)[0].token_ids
            for n, c in zip(names, ctxs)]
    got = rt.generate(names, ctxs, max_new_tokens=5, stop_at_eos=False)
    assert [g.token_ids for g in got] == want


@pytest.mark.parametrize("triton, persistent", [(False, False), (True, False), (True, True)])
def test_bucketed_shapes_change_no_result(rts, tiny_dirs, triton, persistent):
    """The padded shapes CUDA graphs are captured for (rows, tokens, prompts, prefix length and
    decode capacity rounded up by graphs.bucket; padding rows idle) change no real row's result:
    scores, and greedy generation where rows stop at different steps, so finished rows are first
    idled in place and then compacted into a smaller bucket. Reference attention and the Triton
    kernels (interpreted on CPU); with `persistent`, the decode K/V live in the per-bucket
    buffers CUDA graphs write in place (a CudaGraphs that runs eagerly, as on CPU it must)."""
    from softprompt.runtime.graphs import CudaGraphs

    ref = rts("llama", "reference")
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.backend.buckets, rt.backend.triton = True, triton
    if persistent:
        rt.backend.graphs = CudaGraphs()
        rt.backend.graphs.disabled = "CPU test: eager forwards over the persistent buffers"
    for name, sp in _prompts().items():
        rt.add_prompt(name, sp)
    reqs = mixed_requests(seed=5)[:5]  # B = 5 -> 8 rows, L_max = 64, P_max = 100 -> 128
    assert_scores_close(rt.score(reqs), [ref.score([r])[0] for r in reqs])

    names = ["p20", None, "p100", "p1", "p20", "p100"]
    ctxs = [[5, 6, 7], [9, 9], [4] * 9, [30], [8, 12, 16, 20], [7, 7]]
    free = [ref.generate(n, [c], max_new_tokens=8, stop_at_eos=False)[0] for n, c in zip(names, ctxs)]
    stops = [rt.tokenizer.decode(f.token_ids[k: k + 2]) for f, k in zip(free[:3], (0, 2, 4))]
    kw = dict(max_new_tokens=8, stop=[s for s in stops if s.strip()], stop_at_eos=False)
    want = [ref.generate(n, [c], **kw)[0] for n, c in zip(names, ctxs)]
    got = rt.generate(names, ctxs, **kw)
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
    reasons = {g.finish_reason for g in got}
    assert reasons == {"stop", "length"}, reasons


def test_zero_virtual_tokens_equals_base_model(rts, tiny_dirs):
    """prompt=None is the plain base model (the P = 0 point of the benchmark sweep)."""
    from transformers import AutoModelForCausalLM

    rt = rts("gpt2", "torch")
    ids = [5, 9, 14, 3, 40, 7]
    got = rt.score([{"prompt": None, "context": ids}])[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    np.testing.assert_allclose(got.token_logprobs, want, **SCORE["float32"])


@pytest.mark.parametrize("backend", CACHED)
def test_tiny_cache_budget_evicts_and_stays_right(rts, backend):
    """A budget of about one prefix forces evictions; results stay equal, counters show the
    recomputation."""
    big = rts("qwen2", backend)
    one = big.backend.entry(big.prompts["p100"]).nbytes  # room for p100 alone, or p1 + p20
    rt = rts("qwen2", backend, prefix_cache_bytes=int(one * 1.2))
    before = rt.stats()
    reqs = mixed_requests(seed=2)
    for _ in range(2):
        got = [rt.score([r])[0] for r in reqs]
        assert_scores_close(got, big.score(reqs))
    s = rt.stats()
    assert s["evictions"] > before["evictions"]
    assert s["misses"] - before["misses"] > 3  # prefixes were computed again after eviction
    assert s["bytes"] <= s["max_bytes"]


def test_cache_memory_does_not_grow_with_batch(tiny_dirs):
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.add_prompt("p", SoftPrompt.random(20, E, seed=9))
    rt.score([{"prompt": "p", "context": [5, 6, 7]}])
    one = rt.stats()["bytes"]
    rt.score([{"prompt": "p", "context": [5, 6, 7, i % 90 + 4]} for i in range(64)])
    s = rt.stats()
    assert s["bytes"] == one and s["entries"] == 1
    layers, hkv, d = 2, 2, 16  # tiny llama: K and V [Hkv, P, D] per layer + [V] first log-probs
    assert one == 2 * layers * hkv * 20 * d * 4 + 96 * 4


def test_replace_and_remove_prompt_invalidate_exactly_its_entry(tiny_dirs):
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.add_prompt("a", SoftPrompt.random(5, E, seed=1))
    rt.add_prompt("b", SoftPrompt.random(5, E, seed=2))
    req = [{"prompt": "a", "context": [5, 6, 7], "continuation": [8]}]
    first = rt.score(req)[0].logprob
    rt.add_prompt("a", SoftPrompt.random(5, E, seed=3))
    assert rt.stats()["entries"] == 2  # old 'a' dropped, new 'a' added, 'b' untouched
    ref = Runtime.load(str(tiny_dirs["llama"]), backend="reference")
    ref.add_prompt("a", SoftPrompt.random(5, E, seed=3))
    second = rt.score(req)[0].logprob
    assert second != first
    np.testing.assert_allclose(second, ref.score(req)[0].logprob, **SCORE["float32"])
    rt.remove_prompt("a")
    assert rt.stats()["entries"] == 1 and rt.backend.cache.stats().entries == 1
    with pytest.raises(RequestError, match="unknown prompt 'a'; known: \\['b'\\]"):
        rt.score(req)


@pytest.mark.parametrize("backend", CACHED)
def test_save_and_load_cache(rts, tiny_dirs, backend, tmp_path):
    rt = rts("llama", backend)
    assert rt.save_cache(tmp_path / "cache.safetensors") == 3
    fresh = Runtime.load(rt.backend.bundle.path if backend == "onnx" else str(tiny_dirs["llama"]),
                         backend=backend)
    assert fresh.load_cache(tmp_path / "cache.safetensors") == 3
    for name, sp in _prompts().items():
        fresh.add_prompt(name, sp)
    s = fresh.stats()
    assert s["misses"] == 0 and s["entries"] == 3
    assert_scores_close(fresh.score(mixed_requests()), rt.score(mixed_requests()))


@pytest.mark.parametrize("backend", CACHED)
def test_greedy_generation_equals_reference(rts, backend):
    ref, rt = rts("llama", "reference"), rts("llama", backend)
    names = ["p20", "p1", "p100", None]
    ctxs = [[5, 6, 7], [9], [4] * 30, [11, 12]]
    want = [ref.generate(n, [c], max_new_tokens=12, stop_at_eos=False)[0] for n, c in zip(names, ctxs)]
    got = rt.generate(names, ctxs, max_new_tokens=12, stop_at_eos=False)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(g.finish_reason == "length" and len(g.token_ids) == 12 for g in got)


@pytest.mark.parametrize("backend", ["reference", "torch", "onnx"])
def test_greedy_pick_is_the_logits_argmax(rts, backend):
    """A greedy row's token is the argmax of the logits its backend computed, its log-prob is
    that logit's log-softmax, and a row asking for top_n alternatives gets exactly the top_n
    most likely (only B ids, B log-probs and the asked alternatives leave the backend)."""
    from softprompt.runtime.plan import BatchPlan
    from softprompt.runtime.requests import ScoreRequest, log_softmax
    from softprompt.runtime.sampling import Sampler

    rt = rts("llama", backend)
    rows = [rt.check(r) for r in (ScoreRequest("p20", [5, 6, 7]), ScoreRequest(None, [9, 8]),
                                  ScoreRequest("p100", [4] * 6))]
    _, logits = rt.backend.prefill(BatchPlan.build(rows, score=False), [8] * 3)
    logits = np.asarray(logits.float() if hasattr(logits, "float") else logits, np.float64)
    samplers = [Sampler(top_n=n) for n in (0, 3, 5)]
    ids, lps, tops = rt.backend.pick(logits.astype(np.float32) if backend == "onnx" else
                                     torch.from_numpy(logits), samplers)
    want = log_softmax(logits)
    assert ids.tolist() == logits.argmax(-1).tolist()
    np.testing.assert_allclose(lps, want[np.arange(3), ids], atol=1e-5)
    for b, s in enumerate(samplers):  # the top_n most likely of each row, most likely first
        assert [i for i, _ in tops[b]] == np.argsort(-want[b], kind="stable")[: s.top_n].tolist()
        np.testing.assert_allclose([v for _, v in tops[b]], want[b][[i for i, _ in tops[b]]], atol=1e-5)


def test_generation_stops_per_row(rts):
    rt = rts("llama", "torch")
    free = rt.generate("p20", [[5, 6, 7]], max_new_tokens=8, stop_at_eos=False)[0]
    stop = rt.tokenizer.decode(free.token_ids[2:4])
    assert stop and stop in free.text
    rows = rt.generate("p20", [[5, 6, 7], [9, 9]], max_new_tokens=8, stop=[stop], stop_at_eos=False)
    assert rows[0].finish_reason == "stop" and rows[0].text == free.text[: free.text.find(stop)]
    alone = rt.generate("p20", [[9, 9]], max_new_tokens=8, stop=[stop], stop_at_eos=False)[0]
    assert rows[1].token_ids == alone.token_ids  # the other row went on after row 0 left


def test_seeded_sampling_is_batch_invariant(rts):
    rt = rts("gemma", "torch")
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    alone = rt.generate("p1", [[5, 6]], **kw)[0]
    batch = rt.generate(["p100", "p1"], [[8, 8, 8], [5, 6]], **kw)
    assert batch[1].token_ids == alone.token_ids
    assert rt.generate("p1", [[5, 6]], **{**kw, "seed": 8})[0].token_ids != alone.token_ids


def test_submit_many_threads(rts):
    """16 threads x 50 requests through submit(): every result equals its single-request
    reference. The engine is paused while they submit (a control call holds its thread), so all
    800 are queued before its first step whatever the machine's load, and must share steps."""
    ref, rt = rts("llama", "reference"), rts("llama", "torch")
    rng = np.random.default_rng(3)
    pool = [{"prompt": ["p1", "p20", "p100"][i % 3], "context": rng.integers(4, 96, 1 + i % 9).tolist(),
             "continuation": rng.integers(4, 96, 1 + i % 3).tolist()} for i in range(24)]
    want = [ref.score([r])[0] for r in pool]
    got, errors = {}, []
    hold, held = threading.Event(), threading.Event()
    submitted = threading.Barrier(17)  # the 16 workers and this thread

    def worker(t):
        try:
            futs = [(k, rt.submit(pool[(t * 50 + k) % len(pool)])) for k in range(50)]
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)
            futs = []
        submitted.wait(60)
        try:
            for k, f in futs:
                got[(t, k)] = f.result(timeout=120)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    steps = rt.engine.steps
    blocker = threading.Thread(target=rt.engine.call, args=(lambda: (held.set(), hold.wait(120)),))
    blocker.start()
    assert held.wait(60)  # the engine thread is busy: nothing submitted can run yet
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    submitted.wait(60)  # every request is queued
    hold.set()
    for th in threads:
        th.join(300)
    blocker.join(60)
    assert not errors
    assert len(got) == 800
    for (t, k), res in got.items():
        w = want[(t * 50 + k) % len(pool)]
        np.testing.assert_allclose(res.token_logprobs, w.token_logprobs, **SCORE["float32"])
    assert rt.engine.steps - steps < 100  # requests really shared steps (800 rows, max_batch 64)


def test_submit_bad_request_fails_only_its_future(tiny_dirs):
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.add_prompt("p", SoftPrompt.random(3, E, seed=1))
    good = [rt.submit({"prompt": "p", "context": [5, 6], "continuation": [7]}) for _ in range(3)]
    bad = rt.submit({"prompt": "nope", "context": [5, 6]})
    assert all(np.isfinite(f.result(timeout=30).logprob) for f in good)
    with pytest.raises(RequestError, match="unknown prompt 'nope'"):
        bad.result(timeout=30)
    rt.close()


def test_async_submit(rts):
    rt = rts("qwen2", "torch")
    req = {"prompt": "p20", "context": [5, 6, 7], "continuation": [8, 9]}

    async def main():
        return await asyncio.gather(*(rt.submit_async(req) for _ in range(10)))

    res = asyncio.run(main())
    want = rt.score([req])[0].token_logprobs
    for r in res:
        np.testing.assert_allclose(r.token_logprobs, want, **SCORE["float32"])


def test_close_without_drain_cancels(tiny_dirs):
    """Work accepted but not yet run is cancelled by close(drain=False): score futures are
    cancelled, generations end with finish_reason 'cancelled'; nothing is left waiting."""
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.add_prompt("p", SoftPrompt.random(3, E, seed=1))
    hold, held = threading.Event(), threading.Event()
    blocker = threading.Thread(target=rt.engine.call,
                               args=(lambda: (held.set(), hold.wait(30)),))
    blocker.start()
    assert held.wait(30)  # the engine thread is busy: nothing queued can run
    futs = [rt.submit({"prompt": "p", "context": [5, 6]}) for _ in range(20)]
    stream = rt.stream("p", [5, 6], max_new_tokens=4)
    closer = threading.Thread(target=rt.close, kwargs={"drain": False})
    closer.start()
    for _ in range(6000):  # bounded: up to 60 s for close() to mark the engine closed
        if rt.engine.closed:
            break
        time.sleep(0.01)
    assert rt.engine.closed
    hold.set()
    closer.join(30)
    blocker.join(30)
    assert all(f.cancelled() for f in futs)
    assert [c.finish_reason for c in stream][-1] == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        rt.submit({"prompt": "p", "context": [5]})


@pytest.mark.parametrize("request_, message", [
    ({"prompt": "missing", "context": [5]}, r"request 0: unknown prompt 'missing'; known: \['p1', 'p100', 'p20'\]"),
    ({"prompt": "p1", "context": []}, "request 0: empty context: expected at least one token"),
    ({"prompt": "p1", "context": [5], "continuation": []}, "empty continuation"),
    ({"prompt": "p100", "context": [5] * 420}, r"input too long: 100 virtual \+ 420 request tokens = 520 positions, the model has 512"),
    ({"prompt": "p1", "context": [5, 400]}, r"context has token ids outside the model's vocabulary \[0, 96\): \[400\]"),
    ({"prompt": "p1", "context": 3.5}, "context must be a string or a list of token ids, got float"),
    ({"prompt": "p1", "text": "x"}, "unknown request fields"),
    ({"prompt": "p1", "context": [5.7, 6.2]}, "context token ids must be integers, got float 5.7"),
    ({"prompt": "p1", "context": [True, 6]}, "context token ids must be integers, got bool True"),
    ({"prompt": "p1", "context": ["5"]}, "context token ids must be integers, got str '5'"),
    ({"prompt": "p1", "context": b"abc"}, "context must be a string or a list of token ids, got bytes"),
    ({"prompt": "p1", "context": "a\ud800b"}, "context is not valid Unicode text"),
    ({"prompt": ["p1"], "context": [5]}, r"prompt must be a name, a prompt or a \[P, E\] array, got list"),
    ({"prompt": None, "context": [5]}, "nothing to score"),
])
def test_bad_requests_one_line_errors(rts, request_, message):
    rt = rts("llama", "torch")
    with pytest.raises(RequestError, match=message) as e:
        rt.score([{"prompt": "p1", "context": [5, 6]}, request_][1:])
    assert "\n" not in str(e.value)


def test_bad_request_in_batch_does_not_fail_the_others(rts):
    rt = rts("llama", "torch")
    good = {"prompt": "p20", "context": [5, 6, 7], "continuation": [9]}
    res = rt.score([good, {"prompt": "zzz", "context": [5]}, good], errors="return")
    assert res[1].error.startswith("unknown prompt 'zzz'")
    assert res[0].error is None and res[0].logprob == res[2].logprob < 0


def test_add_prompt_errors(rts, tiny_dirs):
    rt = rts("llama", "torch")
    with pytest.raises(SoftPromptError, match="hidden size 32 but the model's hidden size is 64"):
        rt.add_prompt("bad", SoftPrompt.random(4, 32))
    with pytest.raises(SoftPromptError, match="0 virtual tokens"):
        rt.add_prompt("bad", np.zeros((0, E), np.float32))
    with pytest.raises(SoftPromptError, match="600 virtual tokens but the model has only 512 positions"):
        Runtime.load(str(tiny_dirs["llama"]), backend="reference",
                     max_virtual_tokens=2048).add_prompt("long", SoftPrompt.random(600, E))


def test_classify_and_text(rts):
    rt = rts("llama", "torch")
    ref = rts("llama", "reference")
    ctxs = ["the movie was good", "the food was bad"]
    got = rt.classify("p20", ctxs, ["positive", "negative"])
    want = ref.classify("p20", ctxs, ["positive", "negative"])
    for g, w in zip(got, want):
        assert g.label == w.label and abs(sum(g.probs.values()) - 1) < 1e-9
        np.testing.assert_allclose(list(g.logprobs.values()), list(w.logprobs.values()), **SCORE["float32"])
    with pytest.raises(RequestError, match="at least 2 distinct"):
        rt.classify("p20", ctxs, ["x", "x"])


def test_unknown_backend_and_bundle_misuse(tiny_dirs):
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of"):
        Runtime.load(str(tiny_dirs["llama"]), backend="fast")
