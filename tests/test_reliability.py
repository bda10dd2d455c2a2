"""Fault injection: one bad request never harms another, registry changes are all-or-nothing,
nothing is left behind, and the memory the backends hold is what stats() reports, within
the budget."""

import gc
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.runtime.api import Runtime
from softprompt.runtime.cache import PrefixEntry
from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
from softprompt.runtime.requests import RequestError
from tolerances import SCORE

E = 64
GOOD = [{"prompt": "a", "context": [5, 6, 7], "continuation": [8, 9]},
        {"prompt": "b", "context": [9, 10]},
        {"prompt": None, "context": [4, 5, 6], "continuation": [7]}]


@pytest.fixture(scope="module")
def rt(tiny_bundles):
    rt = Runtime.load(str(tiny_bundles["llama"]), backend="onnx")
    rt.add_prompt("a", SoftPrompt.random(4, E, seed=1))
    rt.add_prompt("b", SoftPrompt.random(11, E, seed=2))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def alone(rt):
    return [rt.score([g])[0].token_logprobs for g in GOOD]


_junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(-2**70, 2**70),
    st.text(max_size=6), st.binary(max_size=6),
    st.lists(st.one_of(st.integers(-5, 200), st.floats(), st.booleans(), st.text(max_size=2)), max_size=5),
    st.just("a\ud800b"), st.just(["a"]), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_bad = st.fixed_dictionaries({"prompt": st.one_of(st.sampled_from(["a", "b", None, "zz"]), _junk),
                              "context": _junk}, optional={"continuation": _junk, "extra": _junk})


@settings(max_examples=60, deadline=None, derandomize=True,  # the same 60 examples in every run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(_bad, min_size=1, max_size=4), at=st.integers(0, 3))
def test_bad_requests_fail_alone_in_a_batch(rt, alone, bad, at):
    """Random junk in every field, mixed into a batch of good requests: each junk request
    gets a one-line error or a result, each good request exactly its result alone."""
    batch = GOOD[:at] + bad + GOOD[at:]
    res = rt.score(batch, errors="return")
    for i, r in enumerate(res):
        if i < at or i >= at + len(bad):
            g = i if i < at else i - len(bad)
            assert r.error is None
            np.testing.assert_allclose(r.token_logprobs, alone[g], **SCORE["float32"])
        elif r.error is not None:
            assert "\n" not in r.error and r.error
        else:
            assert np.isfinite(r.logprob)
    # the same junk through submit(): only its own future fails
    futs = [rt.submit(b) for b in bad] + [rt.submit(g) for g in GOOD]
    for f in futs[len(bad):]:
        assert f.result(timeout=60).error is None
    for f in futs[: len(bad)]:
        try:
            f.result(timeout=60)
        except RequestError as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize("request_, message", [
    ({"prompt": "a", "context": [5.7, 6.2]}, "context token ids must be integers, got float 5.7"),
    ({"prompt": "a", "context": [5, True]}, "context token ids must be integers, got bool True"),
    ({"prompt": "a", "context": b"ab"}, "context must be a string or a list of token ids, got bytes"),
    ({"prompt": "a", "context": "x\udc80"}, "context is not valid Unicode text"),
    ({"prompt": ["a"], "context": [5]}, r"prompt must be a name, a prompt or a \[P, E\] array, got list"),
    ({"prompt": "a", "context": [5], "continuation": [96]}, "outside the model's vocabulary"),
])
def test_coercions_are_refused(rt, request_, message):
    res = rt.score([GOOD[0], request_], errors="return")
    assert res[0].error is None
    assert res[1].error is not None and __import__("re").search(message, res[1].error)


def test_failed_replacement_leaves_the_registry_as_it_was(tiny_bundles):
    rt = Runtime.load(str(tiny_bundles["llama"]), backend="onnx", prefix_cache_bytes=64 << 10)
    rt.add_prompt("a", SoftPrompt.random(4, E, seed=1))
    rt.add_prompt("b", SoftPrompt.random(11, E, seed=2))
    want = rt.score(GOOD)
    old = rt.prompts["a"]
    with pytest.raises(SoftPromptError, match="prompt 'a': one prompt's prefix needs"):
        rt.add_prompt("a", SoftPrompt.random(500, E, seed=3))  # larger than the whole budget
    assert rt.prompts["a"] is old
    got = rt.score(GOOD)  # a batch with the old prompt and the others still works
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **SCORE["float32"])
    rt.close()


def test_add_prompt_does_not_rename_the_callers_prompt(rt):
    sp = SoftPrompt.random(3, E, seed=9, name="mine")
    rt.add_prompt("theirs", sp)
    assert sp.name == "mine" and rt.prompts["theirs"].name == "theirs"
    rt.remove_prompt("theirs")


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_replacing_prompts_under_load_leaves_no_orphan(tiny_dirs, tiny_bundles, backend):
    """Threads score while another replaces and removes prompts: every result is the result of
    the version it was accepted with, and afterwards the cache holds exactly the registered
    prompts' prefixes (replaced versions are dropped once their last request finished)."""
    model = tiny_bundles["llama"] if backend == "onnx" else tiny_dirs["llama"]
    rt = Runtime.load(str(model), backend=backend)
    versions = [SoftPrompt.random(5, E, seed=s) for s in range(6)]
    rt.add_prompt("x", versions[0])
    req = {"prompt": "x", "context": [5, 6, 7], "continuation": [8]}
    want = {}
    for v in versions:
        rt.add_prompt("x", v)
        want[v.digest] = rt.score([req])[0].logprob
    stop, errors, seen = threading.Event(), [], []
    started = threading.Barrier(4)  # the 3 scorers, each with a first result, and this thread

    def scorer():
        try:
            seen.append(rt.score([req])[0].logprob)  # before any replacement: version 5's result
        except Exception as e:  # surfaced below
            errors.append(e)
        started.wait(60)
        while not stop.is_set():
            try:
                r = rt.score([req])[0]
                seen.append(r.logprob)
            except RequestError as e:  # only while "x" is removed
                if "unknown prompt 'x'" not in str(e):
                    errors.append(e)
            except Exception as e:  # surfaced below
                errors.append(e)

    threads = [threading.Thread(target=scorer) for _ in range(3)]
    for th in threads:
        th.start()
    started.wait(60)  # replacements start once every scorer runs, whatever the machine's load
    for k in range(30):
        rt.add_prompt("x", versions[k % len(versions)])
        if k % 7 == 3:
            rt.remove_prompt("x")
            rt.add_prompt("x", versions[(k + 1) % len(versions)])
    stop.set()
    for th in threads:
        th.join(60)
    assert not errors and seen
    values = np.array(list(want.values()))
    assert all(np.min(np.abs(values - s)) < 1e-4 for s in seen)  # always some version's result
    rt.remove_prompt("x")
    rt.add_prompt("y", versions[0])
    assert rt.stats()["entries"] == 1  # only y's prefix is left
    rt.close()


def _live_entry_bytes() -> int:
    gc.collect()
    return sum(o.nbytes for o in gc.get_objects() if type(o) is PrefixEntry and o.num_tokens)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_memory_held_is_within_budget_and_reported(tiny_dirs, tiny_bundles, backend):
    """200 prompts scored in mixed batches under a budget that holds a fraction of them: the
    prefix bytes really alive (every PrefixEntry in the process) plus the planned stacks stay
    within the budget and equal what stats() reports."""
    budget = 96 << 10
    model = tiny_bundles["qwen2"] if backend == "onnx" else tiny_dirs["qwen2"]
    before = _live_entry_bytes()
    rt = Runtime.load(str(model), backend=backend, prefix_cache_bytes=budget)
    for i in range(200):
        rt.add_prompt(f"p{i}", SoftPrompt.random(3 + i % 17, E, seed=i))
    for start in range(0, 200, 8):
        rt.score([{"prompt": f"p{i}", "context": [5, 6, i % 90 + 4]} for i in range(start, start + 8)])
    st = rt.stats()
    held = _live_entry_bytes() - before
    assert st["evictions"] > 0
    assert held == st["bytes"]
    assert st["bytes"] + st["stack_bytes"] <= budget
    rt.close()
