"""The engine: continuous batching under random arrival schedules, streaming, cancellation,
close, and incremental detokenising. Every result is compared with the same request run alone."""

import random
import threading
import time
import zlib

import numpy as np
import pytest

from softprompt.runtime.api import Runtime
from softprompt.runtime.prompts import SoftPrompt
from softprompt.runtime.sampling import Detokenizer
from tolerances import SCORE

E = 64


def _runtime(tiny_dirs, tiny_bundles, family, backend, **kw):
    """backend "torch-buckets": the torch backend with padded shape buckets (as under CUDA
    graphs), so rows that leave idle their pool slots in place and later rows join into them."""
    model = tiny_bundles[family] if backend == "onnx" else tiny_dirs[family]
    rt = Runtime.load(str(model), backend=backend.removesuffix("-buckets"), **kw)
    if backend.endswith("-buckets"):
        rt.backend.buckets = True
    for P, seed in ((3, 1), (17, 2), (40, 3)):
        rt.add_prompt(f"p{P}", SoftPrompt.random(P, E, seed=seed))
    return rt


def _seed(family: str, backend: str) -> int:
    """The workload seed of one parametrisation: from a CRC of its name, the same in every
    process (``hash()`` of a string changes with PYTHONHASHSEED; tests/test_hermetic.py checks)."""
    return zlib.crc32(f"{family}/{backend}".encode()) % 1000


def _workload(seed, n=18):
    """Mixed requests: scores, greedy and seeded-sampled generations, streams, over 4 prompts
    (None included) and lengths 1..23."""
    rng = random.Random(seed)
    work = []
    for i in range(n):
        prompt = rng.choice(["p3", "p17", "p40", None])
        ctx = [rng.randrange(4, 96) for _ in range(rng.randint(2, 23))]
        kind = ["score", "greedy", "sampled", "stream"][i % 4]
        if kind == "score":
            work.append((kind, {"prompt": prompt, "context": ctx,
                                "continuation": [rng.randrange(4, 96) for _ in range(rng.randint(1, 4))]}))
        else:
            kw = dict(max_new_tokens=rng.randint(1, 12), stop_at_eos=False)
            if kind == "sampled":
                kw.update(temperature=0.8, top_p=0.9, top_k=40, seed=rng.randrange(1000))
            work.append((kind, (prompt, ctx, kw)))
    return work


def _run_one(rt, kind, req):
    if kind == "score":
        return rt.score([req])[0].token_logprobs
    prompt, ctx, kw = req
    if kind == "stream":
        return [t for c in rt.stream(prompt, ctx, **kw) for t in c.token_ids]
    return rt.generate(prompt, [ctx], **kw)[0].token_ids


@pytest.mark.parametrize("family, backend", [("llama", "reference"), ("llama", "torch"),
                                             ("gpt2", "torch-buckets"), ("qwen2", "onnx"),
                                             ("llama", "onnx")])
def test_random_arrivals_equal_each_request_alone(tiny_dirs, tiny_bundles, family, backend):
    """Requests arriving at random moments from 6 threads (joining and leaving running
    generations, scores interleaved, mixed prompts) each get exactly their result alone:
    scores within the tolerance table, greedy and seeded tokens identical."""
    rt = _runtime(tiny_dirs, tiny_bundles, family, backend, max_batch=8, max_batch_tokens=96)
    work = _workload(seed=_seed(family, backend))  # stable across processes
    alone = [_run_one(rt, kind, req) for kind, req in work]
    got, errors = {}, []

    def caller(t):
        rng = random.Random(t)
        try:
            for i in range(t, len(work), 6):
                time.sleep(rng.random() * 0.02)
                got[i] = _run_one(rt, *work[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and len(got) == len(work)
    for i, (kind, _) in enumerate(work):
        if kind == "score":
            np.testing.assert_allclose(got[i], alone[i], **SCORE["float32"])
        else:
            assert got[i] == alone[i], (i, kind)
    assert rt.stats()["engine_running"] == 0
    rt.close()


class _Paused:
    """The engine thread held by a control call: everything submitted inside the ``with`` is
    queued and joins the first step after it, whatever the machine's speed."""

    def __init__(self, rt):
        self.rt, self.hold, self.held = rt, threading.Event(), threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self.rt.engine.call,
                                       args=(lambda: (self.held.set(), self.hold.wait(60)),))
        self.thread.start()
        assert self.held.wait(60)
        return self

    def __exit__(self, *exc):
        self.hold.set()
        self.thread.join(60)


def _on_done(fut, fn):
    """Run ``fn()`` on the engine thread as ``fut`` (a score) is delivered, that is at a known
    engine step; returns an Event set once it ran."""
    ran = threading.Event()
    fut.add_done_callback(lambda _: (fn(), ran.set()))
    return ran


def test_a_new_generation_gets_its_first_token_within_two_steps(tiny_dirs, tiny_bundles):
    """8 generations decode; a 9th submitted while they run (from the engine thread, as the
    step that started them is delivered) gets its first token within two steps, and runs
    beside all 8. Steps are counted, not timed."""
    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "onnx")
    seen = {}

    def arrive():  # on the engine thread, during the update of the step that started the 8
        seen["late"] = rt.stream("p3", [9, 9], max_new_tokens=30, stop_at_eos=False)
        probe = rt.submit({"prompt": "p3", "context": [5, 6, 7]})  # delivered with late's first step
        seen["probed"] = _on_done(probe, lambda: seen.setdefault("running", rt.engine.stats().engine_running))

    with _Paused(rt):
        streams = [rt.stream("p17", [5, 6, i + 7], max_new_tokens=40, stop_at_eos=False) for i in range(8)]
        arrived = _on_done(rt.submit({"prompt": "p3", "context": [5, 6, 7]}), arrive)
    assert arrived.wait(60)
    late = seen["late"]
    next(late)
    # submitted during step k (counted when it ends), admitted by step k + 1 at the latest
    assert 1 <= late.seq.first_token_step - late.seq.arrived_step <= 2
    assert seen["probed"].wait(60) and seen["running"] == 9
    for s in streams + [late]:
        s.close()
    rt.close()


def test_scores_are_not_starved_by_generations(tiny_dirs, tiny_bundles):
    """A score that arrives while long generations run completes within two steps, while they
    are still running (submitted and checked on the engine thread, at known steps)."""
    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "onnx", max_batch=4)
    seen = {}

    def arrive():  # the 4 generations have taken their first step
        seen["at"] = rt.engine.steps
        seen["score"] = score = rt.submit({"prompt": "p3", "context": [5, 6, 7], "continuation": [8]})
        seen["done"] = _on_done(score, lambda: seen.update(running=rt.engine.stats().engine_running,
                                                           steps=rt.engine.steps - seen["at"]))

    with _Paused(rt):
        streams = [rt.stream("p40", [5, i + 6], max_new_tokens=200, stop_at_eos=False) for i in range(4)]
        arrived = _on_done(rt.submit({"prompt": "p3", "context": [5, 6, 7]}), arrive)
    assert arrived.wait(60) and seen["done"].wait(60)
    assert np.isfinite(seen["score"].result(60).logprob)
    assert seen["running"] == 4 and seen["steps"] <= 2  # the generations were still going
    for s in streams:
        s.close()
    rt.close()


def test_closing_a_stream_frees_its_row_and_spares_the_others(tiny_dirs, tiny_bundles):
    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "torch")
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    want = rt.generate("p17", [[5, 6]], **kw)[0].token_ids
    doomed = rt.stream("p3", [7, 7], max_new_tokens=100, stop_at_eos=False)
    next(doomed)
    other = rt.stream("p17", [5, 6], **kw)
    first = next(other)
    doomed.close()
    rest = [t for c in other for t in c.token_ids]
    assert first.token_ids + rest == want
    deadline = time.monotonic() + 30
    while rt.stats()["engine_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.stats()["engine_running"] == 0
    rt.close()


def test_async_stream_and_cancellation(tiny_dirs, tiny_bundles):
    import asyncio

    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "onnx")
    want = rt.generate("p17", [[5, 6]], max_new_tokens=6, stop_at_eos=False)[0]

    async def main():
        chunks = [c async for c in rt.stream_async("p17", [5, 6], max_new_tokens=6, stop_at_eos=False)]

        async def forever():
            async for _ in rt.stream_async("p3", [5], max_new_tokens=400, stop_at_eos=False):
                pass

        task = asyncio.create_task(forever())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return chunks

    chunks = asyncio.run(main())
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text and chunks[-1].finish_reason == "length"
    deadline = time.monotonic() + 30
    while rt.stats()["engine_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.stats()["engine_running"] == 0  # the cancelled task's row was freed
    rt.close()


def test_unseeded_rows_differ_and_seeded_rows_repeat(tiny_dirs, tiny_bundles):
    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "onnx")
    kw = dict(max_new_tokens=8, temperature=1.5, stop_at_eos=False)
    free = rt.generate("p3", [[5, 6]] * 4, **kw)
    assert len({tuple(r.token_ids) for r in free}) > 1
    seeded = rt.generate("p3", [[5, 6]] * 3, seed=11, **kw)
    assert len({tuple(r.token_ids) for r in seeded}) == 1
    rt.close()


def test_submit_close_race_resolves_every_future(tiny_dirs, tiny_bundles):
    """submit() racing close(): every accepted future ends (result or cancellation) within a
    bounded wait, and a rejected submission raises at once; many rounds."""
    for round_ in range(40):
        rt = Runtime.load(str(tiny_bundles["llama"]), backend="onnx")
        rt.add_prompt("p", SoftPrompt.random(3, E, seed=1))
        accepted, barrier = [], threading.Barrier(3)

        def submitter():
            barrier.wait()
            for _ in range(30):
                try:
                    accepted.append(rt.submit({"prompt": "p", "context": [5, 6]}))
                except RuntimeError:
                    return

        subs = [threading.Thread(target=submitter) for _ in range(2)]
        for th in subs:
            th.start()
        barrier.wait()
        rt.close(drain=round_ % 2 == 0)
        for th in subs:
            th.join(30)
        for f in accepted:
            assert f.cancelled() or f.result(timeout=30).logprob < 0


@pytest.mark.parametrize("stop", [(), ("lo w",), ("o", "xyz"), ("d!",)])
def test_detokenizer_deltas_equal_the_full_decode(stop):
    """Deltas concatenate to the whole decode cut before the first stop string, also when a stop
    string spans tokens or a token ends with the start of one."""
    from tokenizers import Tokenizer, decoders, models

    from softprompt.runtime.requests import Tokenizer as Tok

    words = ["he", "llo", " wo", "rld", "!"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="!"))
    tok.decoder = decoders.Fuse()
    t = Tok(tok)
    ids = list(range(len(words)))
    d = Detokenizer(t, stop)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    deltas.append(d.flush())
    full = t.decode(ids)
    cuts = [full.find(s) for s in stop if s in full]
    want = full[: min(cuts)] if cuts else full
    assert "".join(deltas) == want == d.text
    assert d.stopped == bool(cuts)


class _StubBackend:
    """Records every StepPlan; scores are zeros, every chosen token is 7."""

    def __init__(self):
        self.plans = []

    def step(self, plan):
        from softprompt.runtime.backend import StepOutput

        self.plans.append(plan)
        n = len(plan.decode_ids) + (plan.prefill.B if plan.prefill else 0)
        scores = [(np.zeros(len(r.ids)), True) for r in plan.scores.rows] if plan.scores else []
        return StepOutput(scores, np.full(n, 7), np.zeros(n))

    def reset(self):
        pass


class _StubTokenizer:
    eos_token_ids = frozenset()

    def decode(self, ids):
        return "x" * len(ids)


def _step_tokens(plan):
    """Tokens of a step as the engine budgets them: decode rows + each new-row forward padded."""
    return (len(plan.decode_ids) + (plan.scores.B * plan.scores.L_max if plan.scores else 0)
            + (plan.prefill.B * plan.prefill.L_max if plan.prefill else 0))


def test_scheduler_keeps_every_step_within_its_budgets():
    """Deterministic admission on a stub backend: no step exceeds max_batch_tokens (unless one
    oversized row runs alone), generations never exceed max_batch rows, a large score call is
    split longest rows first, and arrival order is kept."""
    from softprompt.runtime.engine import Engine
    from softprompt.runtime.generation import Generation
    from softprompt.runtime.requests import GenerateParams, Row

    be = _StubBackend()
    eng = Engine(be, max_batch=3, max_batch_tokens=40)
    hold, held = threading.Event(), threading.Event()
    blocker = threading.Thread(target=eng.call, args=(lambda: (held.set(), hold.wait(30)),))
    blocker.start()
    assert held.wait(30)  # everything below is queued before the first step
    done = []
    gens = [Generation(Row(None, [5] * n, 1), GenerateParams(max_new_tokens=m), _StubTokenizer(),
                       lambda c, i=i: c.finish_reason and done.append(i))
            for i, (n, m) in enumerate([(4, 3), (6, 5), (3, 2), (5, 4), (2, 6)])]
    eng.submit_generations(gens[:3])
    big = eng.submit_scores([Row(None, [5] * n, 1) for n in (3, 12, 7, 9, 2, 12, 5)])
    huge = eng.submit_scores([Row(None, [5] * 50, 1)])  # longer than the budget: runs alone
    eng.submit_generations(gens[3:])
    hold.set()
    assert len(big.result(30)) == 7 and len(huge.result(30)) == 1
    eng.close()
    assert sorted(done) == [0, 1, 2, 3, 4]
    for plan in be.plans:
        alone = plan.scores is not None and plan.scores.L_max == 50
        assert _step_tokens(plan) <= 40 or (alone and plan.scores.B == 1 and plan.prefill is None)
        assert len(plan.decode_ids) + (plan.prefill.B if plan.prefill else 0) <= 3
        assert plan.scores is None or plan.scores.B <= 3
    score_lens = [r for p in be.plans if p.scores for r in p.scores.q_lens.tolist()]
    assert score_lens == [12, 12, 9, 7, 5, 3, 2, 50]  # the big call longest first, then the next
    assert [g.token_ids for g in gens] == [[7] * m for m in (3, 5, 2, 4, 6)]


def test_cancelled_async_score_and_classify_drop_their_rows(tiny_dirs, tiny_bundles):
    """Cancelling the task awaiting score_async / classify_async (a client that went away)
    drops the rows the engine has not started and releases the prompt they held; a call
    submitted alongside is unaffected."""
    import asyncio

    rt = _runtime(tiny_dirs, tiny_bundles, "llama", "reference")
    hold, held = threading.Event(), threading.Event()

    async def main():
        blocker = asyncio.get_running_loop().run_in_executor(
            None, rt.engine.call, lambda: (held.set(), hold.wait(30)))
        assert await asyncio.to_thread(held.wait, 30)  # the engine is between steps, paused
        reqs = [{"prompt": "p3", "context": [5, 6, 7], "continuation": [8]}] * 6
        gone = [asyncio.ensure_future(rt.score_async(reqs)),
                asyncio.ensure_future(rt.classify_async("p17", [[5, 6], [7, 8]], ["a", "b"]))]
        kept = asyncio.ensure_future(rt.score_async(reqs[:2]))
        await asyncio.sleep(0.05)  # all three are queued behind the paused engine
        assert sum(rt.registry._held.values()) == 6 + 4 + 2  # every queued row holds its prompt
        for task in gone:
            task.cancel()
        await asyncio.sleep(0.05)
        hold.set()
        await blocker
        got = await kept
        for task in gone:
            assert task.cancelled()
        return got

    got = asyncio.run(main())
    assert len(got) == 2 and all(r.error is None for r in got)
    assert rt.engine.rows_scored == 2  # the cancelled calls' 10 rows never ran
    assert sum(rt.registry._held.values()) == 0  # their prompt holds were released
    rt.close()
