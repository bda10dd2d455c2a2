"""What outside probes found over HTTP, each pinned by a test: the server keeps the library's
promises. Its requests go through the runtime's one validation (``Runtime.check``), request
bodies are strict (nothing converted), every completions path checks the model's positions, a
bad item of /v1/score or /v1/classify fails only itself, tiny temperatures are greedy, and echo
returns each prompt token's alternatives. Ends with a property test: junk in every field of
every endpoint, mixed with good requests, never a 5xx and never a changed neighbour.

The app runs in-process (``fastapi.testclient.TestClient``) over the tiny Llama (512 positions);
the onnx and reference backends join for the library-level checks.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tolerances import SCORE

BACKEND = os.environ.get("SP_TEST_BACKEND", "torch")
TOL = SCORE["float32"]["atol"]
SURROGATE = "\ud800abc"  # a lone surrogate: not Unicode text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("probes") / "llama")


@pytest.fixture(scope="module")
def served(model_dir):
    """(TestClient, Runtime, base model id): the app in-process, prompt ``p4`` registered."""
    from fastapi.testclient import TestClient

    from softprompt import Runtime, SoftPrompt
    from softprompt.server import create_app

    rt = Runtime.load(model_dir, backend=BACKEND)
    rt.add_prompt("p4", SoftPrompt.random(4, rt.info.hidden_size, seed=3, std=0.5))
    with TestClient(create_app(rt, warmup=False, served_model_name="tiny")) as c:  # closes rt
        for _ in range(200):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        yield c, rt, "tiny"


@pytest.fixture
def client(served):
    return served[0]


@pytest.fixture
def rt(served):
    return served[1]


def post(c, path: str, body):
    """POST ``body`` as Python's json writes it: lone surrogates escaped, NaN as ``NaN``."""
    return c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def error_of(r, status: int = 400, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


def close(a, b) -> bool:
    """Equal JSON values, floats within the score tolerance; ``id``/``created`` ignored."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - {"id", "created"}
        return keys == set(b) - {"id", "created"} and all(close(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=0, abs_tol=TOL)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------ 1. lone surrogates
def test_lone_surrogate_is_a_400_or_its_own_item_error(client, rt):
    """A lone surrogate is refused as text everywhere (never a 500), and on /v1/score and
    /v1/classify it fails only its own item: the neighbours get their alone results."""
    for body in ({"model": "p4", "prompt": SURROGATE, "max_tokens": 1},
                 {"model": "p4", "prompt": ["the movie was", SURROGATE], "max_tokens": 0,
                  "echo": True, "logprobs": 1},
                 {"model": "tiny", "prompt": [SURROGATE], "max_tokens": 2, "stream": True}):
        assert "Unicode" in error_of(post(client, "/v1/completions", body), 400, "prompt")
    good = {"prompt": "p4", "context": "the movie was", "continuation": "good"}
    got = post(client, "/v1/score", {"requests": [
        {"prompt": "p4", "context": "the movie was", "continuation": SURROGATE}, good,
        {"prompt": "p4", "context": SURROGATE}]})
    assert got.status_code == 200, got.text
    data = got.json()["data"]
    assert "Unicode" in data[0]["error"] and "Unicode" in data[2]["error"]
    alone = post(client, "/v1/score", {"requests": [good]}).json()
    assert close(dict(data[1], index=0), alone["data"][0]) and data[1]["error"] is None
    assert got.json()["usage"] == alone["usage"]  # the refused items count no tokens
    body = {"prompt": "p4", "contexts": [SURROGATE, "the food was"], "labels": ["good", "bad"]}
    data = post(client, "/v1/classify", body).json()["data"]
    assert "Unicode" in data[0]["error"]
    alone = post(client, "/v1/classify", dict(body, contexts=["the food was"])).json()["data"][0]
    assert close(dict(data[1], index=0), alone)
    # the library says the same in Python, and its tokenizer can no longer be reached with one
    from softprompt.runtime.requests import RequestError

    with pytest.raises(RequestError, match="Unicode"):
        rt.check({"prompt": "p4", "context": SURROGATE})
    with pytest.raises(RequestError, match="Unicode"):
        rt.tokenizer.encode(SURROGATE, True)


# ------------------------------------------------------------------ 2. strict types
@pytest.mark.parametrize("field,value", [
    ("prompt", [1, 2.0]), ("prompt", [True, 2]), ("prompt", [1, "2"]), ("prompt", [[1], [2.0]]),
    ("max_tokens", "2"), ("max_tokens", 2.0), ("max_tokens", True), ("temperature", "0"),
    ("temperature", True), ("top_p", "1"), ("seed", 1.0), ("logprobs", True), ("echo", 1),
    ("stop", [1]), ("stream", "true"), ("n", 1.0), ("top_k", "5"), ("logit_bias", {"1": "2"}),
    ("temperature", float("nan")), ("top_p", float("inf")),
])
def test_strict_types_are_refused_not_converted(client, field, value):
    body = {"model": "p4", "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}
    body[field] = value
    error_of(post(client, "/v1/completions", body), 400, field)


def test_strict_types_on_score_and_classify_fail_only_their_item(client, rt):
    """{"context": [1.0, 2], "continuation": [true]} is refused (it scored token 1 for true);
    on /v1/score and /v1/classify the wrong-shaped item gets its own error. The runtime refuses
    the same values in Python."""
    good = {"prompt": None, "context": [5, 6, 7, 8]}
    bad = [{"context": [1.0, 2], "continuation": [True]}, {"context": [1, 2], "continuation": [True]},
           {"context": ["1", 2]}, {"context": 5}, {"context": [5, 6], "prompt": 4}, 7, "ctx",
           {"context": [5, 6], "extra": 1}, {"continuation": [5]}]
    got = post(client, "/v1/score", {"requests": [bad[0], good, *bad[1:]]})
    assert got.status_code == 200, got.text
    data = got.json()["data"]
    alone = post(client, "/v1/score", {"requests": [good]}).json()
    assert close(dict(data[1], index=0), alone["data"][0]) and data[1]["error"] is None
    assert all(d["error"] and d["logprob"] is None for i, d in enumerate(data) if i != 1)
    assert "context: expected" in data[0]["error"] and "unknown field 'extra'" in data[8]["error"]
    assert got.json()["usage"] == alone["usage"]
    body = {"prompt": "p4", "contexts": [[5, 6.0], [5, 6], [True], "the food was"],
            "labels": ["good", "bad"]}
    data = post(client, "/v1/classify", body).json()["data"]
    assert data[0]["error"] and data[2]["error"] and not data[1]["error"] and not data[3]["error"]
    for bad_labels in (["good", 1], "good", ["good"]):
        error_of(post(client, "/v1/classify", dict(body, labels=bad_labels)), 400)
    from softprompt.runtime.requests import RequestError

    for req in ({"context": [1.0, 2]}, {"context": [1, 2], "continuation": [True]},
                {"context": [1, "2"]}, {"context": [1, 2], "top_logprobs": True}):
        with pytest.raises(RequestError):
            rt.check(req)


# ------------------------------------------------------------------ 3. positions
def test_every_completions_path_checks_the_model_positions(client, rt):
    """4 virtual + 600 tokens on a 512-position model is a 400 whatever the options (it was a
    200 with max_tokens 0 and no logprobs); the limit itself is exact."""
    assert rt.info.max_positions == 512
    long = [5] * 600
    for extra in ({"max_tokens": 0}, {"max_tokens": 0, "echo": True},
                  {"max_tokens": 0, "echo": True, "logprobs": 1}, {"max_tokens": 1},
                  {"max_tokens": 1, "stream": True}, {"max_tokens": 0, "stream": True}):
        for prompt in (long, [[5, 6], long], " ".join(["good"] * 600)):
            body = {"model": "p4", "prompt": prompt, "temperature": 0, **extra}
            assert "too long" in error_of(post(client, "/v1/completions", body), 400, "prompt")
    fits = {"model": "p4", "prompt": [5] * 508, "max_tokens": 0, "echo": True}
    assert post(client, "/v1/completions", fits).status_code == 200  # 4 + 508 = 512
    assert "too long" in error_of(post(client, "/v1/completions", dict(fits, max_tokens=1)))
    assert post(client, "/v1/completions", dict(fits, prompt=[5] * 507, max_tokens=1,
                                                 temperature=0)).status_code == 200
    data = post(client, "/v1/score", {"requests": [{"prompt": "p4", "context": long},
                                                   {"prompt": "p4", "context": [5] * 508}]}).json()
    assert "too long" in data["data"][0]["error"] and data["data"][1]["error"] is None


# ------------------------------------------------------------------ 4. tiny temperatures
def test_temperatures_too_small_to_tell_from_greedy_are_greedy(client, rt):
    """1e-320 overflowed logits / T to inf (rows picked log-prob -10 tokens): any temperature
    below sampling.GREEDY_BELOW (1e-5) is greedy, in Python and over HTTP; 0.7 still samples."""
    from softprompt.runtime.sampling import GREEDY_BELOW, Sampler, pick_numpy

    ctx = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = rt.generate("p4", ctx, max_new_tokens=4, temperature=0, stop_at_eos=False, logprobs=1)
    for t in (1e-320, 5e-324, 1e-300, 1e-30, 1e-6, GREEDY_BELOW / 2):
        got = rt.generate("p4", ctx, max_new_tokens=4, temperature=t, seed=3, stop_at_eos=False,
                          logprobs=1)
        for g, w in zip(got, greedy):
            assert g.token_ids == w.token_ids, t
            assert all(top[0][0] == i for top, i in zip(g.top_logprobs, g.token_ids))  # the argmax
            np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=TOL)
    sampled = {tuple(rt.generate("p4", ctx[:1], max_new_tokens=4, temperature=0.7, seed=s,
                                 stop_at_eos=False)[0].token_ids) for s in range(6)}
    assert len(sampled) > 1  # 0.7 samples
    # near the boundary, large logits never overflow (the scaled logits are <= 0)
    logits = np.array([[3e4, 2.9e4, -3e4, 0.0]], np.float32)
    for t in (1e-320, 1e-30, GREEDY_BELOW, 1e-3, 0.7):
        ids, lps, _ = pick_numpy(logits, [Sampler(t, seed=1)])
        assert ids[0] == 0 and np.isfinite(lps).all(), t
    body = {"model": "p4", "prompt": ctx[1], "max_tokens": 4, "ignore_eos": True, "logprobs": 1}
    want = post(client, "/v1/completions", dict(body, temperature=0)).json()["choices"][0]
    for t in (1e-320, 1e-30):
        got = post(client, "/v1/completions", dict(body, temperature=t)).json()["choices"][0]
        assert got["text"] == want["text"] and close(got["logprobs"], want["logprobs"]), t


# ------------------------------------------------------------------ 5. echo top_logprobs
def test_echo_fills_top_logprobs_for_prompt_tokens(client, rt):
    """echo + logprobs=n: every prompt token has its n most likely alternatives from the
    scoring forward (null only for a first token nothing predicts, without a soft prompt); they
    are the alternatives generation reports at the same position."""
    ids = [5, 9, 14, 20, 7]
    for model, prompt in (("p4", "p4"), ("tiny", None)):
        body = {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 3,
                "temperature": 0}
        lp = post(client, "/v1/completions", body).json()["choices"][0]["logprobs"]
        tops = lp["top_logprobs"]
        assert len(tops) == len(lp["tokens"]) == len(ids) + 1
        if prompt is None:
            assert tops[0] is None and lp["token_logprobs"][0] is None
        for j in range(0 if prompt else 1, len(ids)):
            # keys are decoded text: special tokens all decode to "" and share one key
            assert 1 <= len(tops[j]) <= 3 and max(tops[j].values()) >= lp["token_logprobs"][j] - 1e-6
            if j == 0:
                continue  # predicted by the last virtual token: no generation starts from nothing
            want = rt.generate(prompt, [ids[:j]], max_new_tokens=1, logprobs=3,
                               stop_at_eos=False)[0].top_logprobs[0]
            want = {rt.tokenizer.decode([i]): v for i, v in want}
            assert tops[j].keys() == want.keys()
            np.testing.assert_allclose([tops[j][k] for k in want], list(want.values()), atol=TOL)
        # logprobs=0: token log-probs, no alternatives
        lp0 = post(client, "/v1/completions", dict(body, logprobs=0)).json()["choices"][0]["logprobs"]
        assert lp0["top_logprobs"][1:] == [{}] * len(ids)


@pytest.mark.parametrize("backend", ["reference", "torch", "onnx"])
def test_score_top_logprobs_equal_generation_alternatives_on_every_backend(backend, model_dir,
                                                                           tiny_llama_bundle):
    """ScoreResult.top_logprobs (``top_logprobs=n`` on a request) on each backend: per scored
    token the n most likely ids of its position, equal to generation's ``logprobs=n`` there,
    the same alone and in a mixed batch, and cut to each row's own n."""
    from softprompt import Runtime, SoftPrompt

    with Runtime.load(tiny_llama_bundle if backend == "onnx" else model_dir, backend=backend) as r:
        r.add_prompt("p4", SoftPrompt.random(4, r.info.hidden_size, seed=3, std=0.5))
        reqs = [{"prompt": "p4", "context": [5, 9, 14, 20], "top_logprobs": 3},
                {"prompt": None, "context": [5, 9, 14, 20], "top_logprobs": 2},
                {"prompt": "p4", "context": [5, 9], "continuation": [14, 20], "top_logprobs": 1},
                {"prompt": "p4", "context": [5, 9, 14, 20, 33, 40]}]
        mixed = r.score(reqs)
        for q, got in zip(reqs, mixed):
            n = q.get("top_logprobs", 0)
            assert len(got.top_logprobs) == (len(got.tokens) if n else 0)
            alone = r.score([q])[0]
            assert [[i for i, _ in t] for t in got.top_logprobs] == \
                [[i for i, _ in t] for t in alone.top_logprobs]
            ctx = q["context"] + (q.get("continuation") or [])
            first = len(ctx) - len(got.tokens)
            for j, (alts, lp, tok) in enumerate(zip(got.top_logprobs, got.token_logprobs, got.tokens)):
                assert len(alts) == n and alts[0][1] >= lp - 1e-6
                assert all(a[1] >= b[1] for a, b in zip(alts, alts[1:]))
                if got.is_greedy:
                    assert alts[0][0] == tok
                if first + j == 0:
                    continue  # predicted by the last virtual token: no generation starts from nothing
                gen = r.generate(q["prompt"], [ctx[: first + j]], max_new_tokens=1, logprobs=n,
                                 stop_at_eos=False)[0]
                assert [i for i, _ in gen.top_logprobs[0]] == [i for i, _ in alts]
                np.testing.assert_allclose([v for _, v in alts], [v for _, v in gen.top_logprobs[0]],
                                           atol=TOL)


# ------------------------------------------------------------------ the property test
GOOD = {
    "completions": [
        {"model": "p4", "prompt": "the movie was", "max_tokens": 2, "temperature": 0, "seed": 1},
        {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1, "echo": True, "logprobs": 2,
         "temperature": 0.9, "seed": 2},
        {"model": "p4", "prompt": ["i love this film", [8, 9]], "max_tokens": 0, "echo": True,
         "logprobs": 1},
    ],
    "score": [{"prompt": "p4", "context": "the movie was", "continuation": "good"},
              {"prompt": None, "context": [5, 6, 7, 8]},
              {"prompt": "p4", "context": [9, 10], "continuation": [11]}],
    "classify": ["the food was", [5, 6, 7], "a great game"],
}
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                     "stop", "logprobs", "echo", "stream", "stream_options", "ignore_eos", "n",
                     "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix",
                     "user", "bogus"]
JUNK = [None, True, False, 0, -1, 1, 5, 2**70, 1.5, 1e-320, float("nan"), float("inf"), "",
        "0", "2", SURROGATE, "p4", "hello world", [], [1, 2.0], [True, 2], [1, "2"], [-1],
        [10**6], [[1, 2], [3.0]], [[]], {"a": 1}, {"include_usage": 1}, [5] * 600]


def _completion_junk(draw, base: dict):
    field = draw(st.sampled_from([*COMPLETION_FIELDS, None]))
    value = draw(st.sampled_from(JUNK))
    if field is None:
        return value  # the whole body
    if field == "stream" and value is True:
        value = "yes"  # a stream's answer is events, compared elsewhere
    if field == "seed" and value is None:
        value = 3  # unseeded sampling differs run to run by design
    return {**base, field: value}


@st.composite
def examples(draw):
    """(endpoint, items): each item a good request or one with junk in one field."""
    endpoint = draw(st.sampled_from(["completions", "score", "classify"]))
    items = []
    for _ in range(draw(st.integers(2, 4))):
        base = draw(st.sampled_from(GOOD[endpoint]))
        if draw(st.booleans()):
            items.append(base)
        elif endpoint == "completions":
            items.append(_completion_junk(draw, base))
        elif endpoint == "score":
            field = draw(st.sampled_from(["prompt", "context", "continuation", "bogus", None]))
            value = draw(st.sampled_from(JUNK))
            items.append(value if field is None else {**base, field: value})
        else:
            items.append(draw(st.sampled_from(JUNK)))
    call = {}
    if endpoint == "classify":
        call = {"prompt": "p4", "labels": ["good", "bad"]}
        if draw(st.integers(0, 4)) == 0:  # now and then junk in the call's own fields
            call[draw(st.sampled_from(["prompt", "labels", "bogus"]))] = draw(st.sampled_from(JUNK))
    return endpoint, items, call


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ex=examples())
def test_junk_in_every_field_never_5xx_and_never_changes_a_neighbour(served, ex):
    """Junk in any field of any endpoint, mixed with good requests: never a 5xx; each bad
    request its own 4xx (completions) or each bad item its own error (score, classify); every
    answer equal to the one it gets alone (good neighbours exactly their alone results)."""
    c = served[0]
    endpoint, items, call = ex
    path = f"/v1/{endpoint}"

    def body(part: list):
        if endpoint == "score":
            return {"requests": part}
        if endpoint == "classify":
            return {**call, "contexts": part}
        return part[0]

    alone = [post(c, path, body([it])) for it in items]
    if endpoint == "completions":  # concurrent requests share the engine's steps
        with ThreadPoolExecutor(len(items)) as pool:
            mixed = list(pool.map(lambda it: post(c, path, body([it])), items))
        for it, a, m in zip(items, alone, mixed):
            assert a.status_code < 500 and m.status_code < 500, (it, m.text)
            assert a.status_code == m.status_code, (it, a.text, m.text)
            assert close(a.json(), m.json()), (it, a.text, m.text)
        return
    m = post(c, path, body(items))
    assert m.status_code < 500 and all(a.status_code < 500 for a in alone), (items, m.text)
    if m.status_code != 200:  # a call-level field is wrong: every part is refused the same way
        assert all(a.status_code == m.status_code for a in alone), (items, m.text)
        assert m.json()["error"]["message"]
        return
    data = m.json()["data"]
    assert len(data) == len(items)
    for i, (it, a) in enumerate(zip(items, alone)):
        assert a.status_code == 200, (it, a.text)
        assert close(dict(data[i], index=0), a.json()["data"][0]), (it, data[i], a.text)
    if endpoint == "score":  # tokens counted from the checked items only
        assert m.json()["usage"]["prompt_tokens"] == sum(a.json()["usage"]["prompt_tokens"]
                                                         for a in alone)
