"""`softprompt serve` end to end: a real uvicorn server in a subprocess on 127.0.0.1 (free port),
talked to over HTTP; results compared with the same Runtime in-process.

Every server is started by a fixture that waits for /ready in a bounded loop and always
terminates it; every client call has a timeout; loops are bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tolerances import SCORE

# the cached-prefix path; the in-process Runtime uses the same
BACKEND = os.environ.get("SP_TEST_BACKEND", "torch")
KEY, ADMIN = "sk-test-user", "sk-test-admin"
ROOT = Path(__file__).resolve().parent.parent
TOL = SCORE["float32"]["atol"]
TEXTS = ["the movie was", "i love this film", "the food and service were", "hello world",
         "politics election vote", "a great game"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``softprompt serve`` in a subprocess; ``url``, ``client`` (httpx, user key), ``proc``."""

    def __init__(self, model_dir, prompt_dir, log: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
                   SOFTPROMPT_HOME=str(log.parent / "home"))
        self.log = log
        cmd = [sys.executable, "-m", "softprompt.cli", "serve", str(model_dir), "--backend",
               BACKEND, "--prompt", f"p5={prompt_dir}", "--port", str(self.port),
               "--served-model-name", "tiny", "--api-key", KEY, "--admin-key", ADMIN, *extra]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {KEY}"})

    def wait_ready(self) -> "Server":
        try:
            for _ in range(240):  # up to ~120 s: importing torch and transformers
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            raise RuntimeError(f"server not ready after 120 s:\n{self.output()}")
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        """{'name{labels}': value} of every sample on /metrics."""
        out = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


LONG = 6000  # tokens a "long" generation asks for: seconds even on a fast CPU


def _long_tiny_llama(path: Path) -> Path:
    """tests/tiny.py's Llama with 8192 positions, so one request can outlast a timeout or a
    probe by a wide margin whatever the machine's speed."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config, tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 8192
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from softprompt import SoftPrompt

    root = tmp_path_factory.mktemp("server")
    SoftPrompt.random(5, 64, seed=1, std=0.5).save_peft(root / "p5")
    SoftPrompt.random(3, 64, seed=2, std=0.5).save_peft(root / "p3")
    return {"model": _long_tiny_llama(root / "llama"), "p5": root / "p5", "p3": root / "p3",
            "root": root}


@pytest.fixture(scope="module")
def servers(files):
    """Four servers started at once (their start-up, mostly imports, overlaps): the main one,
    one with --max-queue 1, one with a short --request-timeout (apart, so a request held to
    fill the queue never races the timeout), one to receive SIGTERM."""
    args = {"main": ("--max-body-bytes", "200000"),
            "queue": ("--max-queue", "1"),
            "timeout": ("--request-timeout", "0.5"),
            "sigterm": ()}
    started = {}
    try:
        for name, extra in args.items():
            started[name] = Server(files["model"], files["p5"], files["root"] / f"{name}.log", *extra)
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def rt(files):
    from softprompt import Runtime

    r = Runtime.load(files["model"], backend=BACKEND)
    r.add_prompt("p5", files["p5"])
    yield r
    r.close()


def _post(server, path, body, **kw):
    return server.client.post(path, json=body, **kw)


def _assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------------ behaviour
def test_openai_client_completions_and_stream(server, rt):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "p5"]
    want = rt.generate("p5", [TEXTS[0]], max_new_tokens=8, stop_at_eos=False)[0]
    got = client.completions.create(model="p5", prompt=TEXTS[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 8
    assert got.usage.prompt_tokens == len(rt.tokenizer.encode(TEXTS[0], True))
    chunks = list(client.completions.create(model="p5", prompt=TEXTS[0], max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert len(chunks) == 8  # one event per token
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)


def test_echo_logprobs_equal_runtime_score(server, rt):
    for model, prompt in (("p5", "p5"), ("tiny", None)):
        body = {"model": model, "prompt": TEXTS[2], "max_tokens": 0, "echo": True, "logprobs": 1}
        choice = _post(server, "/v1/completions", body).json()["choices"][0]
        assert choice["text"] == TEXTS[2]
        want = rt.score([{"prompt": prompt, "context": TEXTS[2]}])[0].token_logprobs
        got = choice["logprobs"]["token_logprobs"]
        if prompt is None:  # nothing predicts the first token without a soft prompt
            assert got[0] is None
            got = got[1:]
        assert len(got) == len(want) == len(rt.tokenizer.encode(TEXTS[2], True)) - (prompt is None)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_greedy_completions_equal_runtime_generate(server, rt):
    body = {"model": "p5", "prompt": TEXTS, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    got = _post(server, "/v1/completions", body).json()
    want = rt.generate("p5", TEXTS, max_new_tokens=6)
    assert [c["index"] for c in got["choices"]] == list(range(len(TEXTS)))
    for c, w in zip(got["choices"], want):
        assert c["text"] == w.text
        assert c["finish_reason"] == ("length" if w.finish_reason == "length" else "stop")
        np.testing.assert_allclose(c["logprobs"]["token_logprobs"], w.token_logprobs, atol=TOL)
    assert got["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    # logprobs=3: each generated token's 3 most likely alternatives, as the runtime gives them
    body = {"model": "p5", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 3}
    top = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["top_logprobs"]
    w = rt.generate("p5", [TEXTS[0]], max_new_tokens=4, logprobs=3)[0]
    assert len(top) == len(w.token_ids) and all(len(t) == 3 for t in w.top_logprobs)
    for g, alts in zip(top, w.top_logprobs):
        want_top = {rt.tokenizer.decode([i]): v for i, v in alts}
        assert g.keys() == want_top.keys()
        np.testing.assert_allclose([g[k] for k in want_top], list(want_top.values()), atol=TOL)
    # sampling with a seed is reproducible and matches the runtime's seeded sampler
    body = {"model": "p5", "prompt": TEXTS[1], "max_tokens": 6, "temperature": 0.8,
            "top_p": 0.9, "seed": 7, "ignore_eos": True}
    w = rt.generate("p5", [TEXTS[1]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=7,
                    stop_at_eos=False)[0]
    assert _post(server, "/v1/completions", body).json()["choices"][0]["text"] == w.text


def test_score_and_classify_match_runtime_with_per_item_errors(server, rt):
    items = [{"prompt": "p5", "context": TEXTS[0], "continuation": " good"},
             {"prompt": "nope", "context": TEXTS[1]},
             {"prompt": None, "context": [5, 6, 7, 8]},
             {"prompt": "p5", "context": ""}]
    got = _post(server, "/v1/score", {"requests": items}).json()["data"]
    want = rt.score(items, errors="return")
    assert [g["index"] for g in got] == [0, 1, 2, 3]
    for g, w in zip(got, want):
        assert g["error"] == w.error
        if w.error is None:
            np.testing.assert_allclose(g["token_logprobs"], w.token_logprobs, atol=TOL)
            assert g["tokens"] == w.tokens and g["is_greedy"] == w.is_greedy
    assert "unknown prompt 'nope'" in got[1]["error"] and got[3]["error"]
    body = {"prompt": "p5", "contexts": [TEXTS[0], TEXTS[3]], "labels": [" good", " bad"]}
    got = _post(server, "/v1/classify", body).json()["data"]
    want = rt.classify("p5", [TEXTS[0], TEXTS[3]], [" good", " bad"])
    for g, w in zip(got, want):
        assert g["label"] == w.label
        np.testing.assert_allclose([g["probs"][k] for k in w.probs], list(w.probs.values()), atol=TOL)
    _assert_error(_post(server, "/v1/classify", dict(body, labels=[" good"])), 400)
    _assert_error(_post(server, "/v1/classify", dict(body, prompt="nope")), 404, "prompt")


def test_200_requests_from_32_clients_each_equal_in_process(server, rt):
    """A mix of score and greedy completion requests, 32 at a time; each answer equals the
    same request run alone in-process."""
    jobs = []
    for i in range(200):
        text = TEXTS[i % len(TEXTS)] + " w" + str(i % 17)
        if i % 2:
            jobs.append(("score", {"requests": [{"prompt": "p5", "context": text,
                                                 "continuation": " good"}]}))
        else:
            jobs.append(("complete", {"model": "p5", "prompt": text, "max_tokens": 4,
                                      "temperature": 0}))
    want_s = rt.score([b["requests"][0] for k, b in jobs if k == "score"])
    want_g = rt.generate("p5", [b["prompt"] for k, b in jobs if k == "complete"], max_new_tokens=4)

    def call(job):
        kind, body = job
        r = _post(server, "/v1/score" if kind == "score" else "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs))
    it_s, it_g = iter(want_s), iter(want_g)
    for (kind, _), res in zip(jobs, results):
        if kind == "score":
            np.testing.assert_allclose(res["data"][0]["token_logprobs"], next(it_s).token_logprobs,
                                       atol=TOL)
        else:
            assert res["choices"][0]["text"] == next(it_g).text


def test_bad_requests_get_openai_errors_and_never_affect_others(server):
    url = "/v1/completions"
    headers = {"Content-Type": "application/json"}
    err = _assert_error(server.client.post(url, content=b'{"model": "p5", "prompt": ', headers=headers), 400)
    assert "not valid JSON" in err["message"]
    _assert_error(_post(server, url, {"model": "p5", "prompt": "hi", "max_tokenz": 3}), 400, "max_tokenz")
    _assert_error(_post(server, url, {"model": "p5", "prompt": "hi", "temperature": -1}), 400, "temperature")
    _assert_error(_post(server, url, {"model": "p5", "prompt": "hi", "n": 2}), 400, "n")
    _assert_error(_post(server, url, {"model": "p5", "prompt": [100000]}), 400, "prompt")
    _assert_error(_post(server, url, {"model": "p5", "prompt": "hi", "max_tokens": 100000}), 400)
    _assert_error(_post(server, url, {"model": "gpt-4", "prompt": "hi"}), 404, "model", "model_not_found")
    _assert_error(_post(server, url, {"model": "p5", "prompt": "x " * 150000}), 413, code="body_too_large")
    _assert_error(httpx.post(server.url + url, json={"model": "p5", "prompt": "hi"}), 401,
                  code="invalid_api_key")
    _assert_error(httpx.post(server.url + url, json={"model": "p5", "prompt": "hi"},
                             headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    ok = _post(server, url, {"model": "p5", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_prompts_upload_and_delete_with_admin_key(server, files, rt):
    p3 = files["p3"]
    upload = [("file", ("adapter_config.json", (p3 / "adapter_config.json").read_bytes())),
              ("file", ("adapter_model.safetensors", (p3 / "adapter_model.safetensors").read_bytes()))]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    _assert_error(server.client.post("/v1/prompts", data={"name": "p3"}, files=upload), 403)
    _assert_error(httpx.post(server.url + "/v1/prompts", data={"name": "p3"}, files=upload), 401)
    pickle = [("file", ("adapter_model.bin", b"\x80\x04K\x01."))]
    _assert_error(server.client.post("/v1/prompts", data={"name": "p3"}, files=pickle,
                                     headers=admin), 400, "file")
    bad = [("file", ("p.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "))]
    _assert_error(server.client.post("/v1/prompts", data={"name": "p3"}, files=bad,
                                     headers=admin), 400)
    r = server.client.post("/v1/prompts", data={"name": "p3"}, files=upload, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["num_virtual_tokens"] == 3 and r.json()["base_model"] == "tiny"
    cards = {m["id"]: m for m in server.client.get("/v1/models").json()["data"]}
    assert cards["p3"]["num_virtual_tokens"] == 3 and cards["p5"]["num_virtual_tokens"] == 5
    body = {"model": "p3", "prompt": TEXTS[1], "max_tokens": 0, "echo": True, "logprobs": 1}
    got = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["token_logprobs"]
    rt.add_prompt("p3", p3)
    np.testing.assert_allclose(got, rt.score([{"prompt": "p3", "context": TEXTS[1]}])[0].token_logprobs,
                               atol=TOL)
    assert server.client.delete("/v1/prompts/p3", headers=admin).json()["deleted"] is True
    _assert_error(server.client.delete("/v1/prompts/p3", headers=admin), 404)
    _assert_error(_post(server, "/v1/completions", body), 404, "model")


def test_metrics_count_tokens_and_latency(server):
    before = server.metrics()
    r = _post(server, "/v1/completions", {"model": "p5", "prompt": TEXTS[3], "max_tokens": 5,
                                         "ignore_eos": True, "temperature": 0}).json()
    after = server.metrics()
    lab = '{endpoint="completions",prompt="p5"}'

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("softprompt:generation_tokens_total" + lab) == r["usage"]["completion_tokens"] == 5
    assert delta("softprompt:prompt_tokens_total" + lab) == r["usage"]["prompt_tokens"]
    for h in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds"):
        assert delta(f"softprompt:{h}_count{lab}") == 1
    assert delta("softprompt:engine_generated_tokens_total") == 5
    for name in ("prefix_cache_hits_total", "prefix_cache_misses_total", "prefix_cache_bytes",
                 "num_requests_running", "num_requests_waiting", "engine_batch_rows"):
        assert "softprompt:" + name in after, name
    assert after['softprompt:http_requests_total{endpoint="completions",status="200"}'] >= 1


def test_disconnect_mid_stream_frees_the_row(server):
    before = server.metrics()["softprompt:engine_generated_tokens_total"]
    body = {"model": "p5", "prompt": TEXTS[0], "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30, headers=server.client.headers) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    m = _until_idle(server)  # the engine drops the row at its next step
    assert m["softprompt:http_requests_in_flight"] == 0 and m["softprompt:num_requests_running"] == 0
    assert m["softprompt:engine_generated_tokens_total"] - before < LONG
    ok = _post(server, "/v1/completions", {"model": "p5", "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_every_runtime_metric_is_exported_for_onnx(tiny_llama_bundle):
    """Each entry of metrics.RUNTIME_METRICS (read by attribute from RuntimeStats) is on
    /metrics for an onnx runtime, with the value the runtime reports (in-process app)."""
    from fastapi.testclient import TestClient

    from softprompt import Runtime, SoftPrompt
    from softprompt.server import create_app
    from softprompt.server.metrics import RUNTIME_METRICS

    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    rt.add_prompt("p4", SoftPrompt.random(4, rt.info.hidden_size, seed=3, std=0.5))
    with TestClient(create_app(rt, warmup=False)) as c:  # leaving it closes the runtime
        deadline = time.monotonic() + 60  # bounded: fails an app that never gets ready
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/v1/score", json={"requests": [{"prompt": "p4", "context": [5, 6, 7]}]})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3, r.text
        text = c.get("/metrics").text
        stats = rt.stats()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    assert stats.cache is not None and stats.engine.rows_scored >= 1
    for m in RUNTIME_METRICS:
        name = m.name + ("_total" if m.kind == "counter" else "")
        assert name in samples, name
        if m.kind == "counter":  # gauges (rows running now) may move between the two reads
            assert samples[name] == m.read(stats), name


# --------------------------------------------------------------- servers of their own
def _until_idle(s) -> dict:
    """/metrics once the server has no request in flight and no row running (bounded poll: the
    deadline only fails a server that never gets there)."""
    deadline = time.monotonic() + 60
    while True:
        m = s.metrics()
        if (m["softprompt:http_requests_in_flight"] == 0 and m["softprompt:num_requests_running"] == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_full_queue_gets_429(servers):
    """--max-queue 1: while one request is held (a stream that only ends when the client leaves),
    the next is refused with 429; once it left, requests are served again."""
    s = servers["queue"]
    body = {"model": "p5", "prompt": TEXTS[0], "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    with s.client.stream("POST", "/v1/completions", json=body) as held:
        lines = held.iter_lines()
        assert next(lines).startswith("data: ")  # accepted and generating
        busy = _post(s, "/v1/score", {"requests": [{"prompt": "p5", "context": "hi"}]})
        _assert_error(busy, 429, code="queue_full")
        assert busy.headers["Retry-After"] == "1"
    m = _until_idle(s)  # the held stream's client went away: its row is dropped
    assert m["softprompt:http_requests_in_flight"] == 0 and m["softprompt:num_requests_running"] == 0
    ok = _post(s, "/v1/score", {"requests": [{"prompt": "p5", "context": "hi"}]})
    assert ok.status_code == 200


def test_request_timeout_ends_a_long_request_and_frees_its_row(servers):
    """--request-timeout 0.5 against requests of LONG tokens (seconds even on a fast machine):
    a stream gets an error event then [DONE], a plain request 504; their rows are freed."""
    s = servers["timeout"]
    body = {"model": "p5", "prompt": TEXTS[0], "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    with s.client.stream("POST", "/v1/completions", json=body) as held:
        events = [ln for ln in held.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "timeout"
    slow = _post(s, "/v1/completions", dict(body, stream=False))
    _assert_error(slow, 504, code="timeout")
    m = _until_idle(s)
    assert m["softprompt:http_requests_in_flight"] == 0 and m["softprompt:num_requests_running"] == 0
    ok = _post(s, "/v1/score", {"requests": [{"prompt": "p5", "context": "hi"}]})
    assert ok.status_code == 200


def test_sigterm_under_load_finishes_every_accepted_request(servers):
    """12 requests (half streamed); SIGTERM once the server has accepted every one and at least
    one is still running, as its /metrics says (in flight now, plus answered since the start:
    the gauge drops before the counter rises, so a request is never counted twice), not after a
    guessed delay: every accepted request gets its whole answer, then the server exits 0."""
    s = servers["sigterm"]
    n, new = 12, 400  # long enough that the 12 overlap
    answered = 'softprompt:http_requests_total{endpoint="completions",status="200"}'
    before = s.metrics().get(answered, 0.0)
    results: list = [None] * n

    def client(i):
        body = {"model": "p5", "prompt": TEXTS[i % len(TEXTS)], "max_tokens": new,
                "ignore_eos": True, "temperature": 0, "stream": bool(i % 2)}
        with httpx.Client(base_url=s.url, timeout=120, headers=s.client.headers) as c:
            if not body["stream"]:
                results[i] = c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
                return
            with c.stream("POST", "/v1/completions", json=body) as r:
                events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            results[i] = len(events) - 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while True:  # until every request is accepted (bounded: fails a server that stalls)
        m = s.metrics()
        in_flight, done = m["softprompt:http_requests_in_flight"], m.get(answered, 0.0) - before
        if in_flight + done >= n or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert in_flight + done == n and in_flight >= 1, (in_flight, done)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert s.proc.wait(120) == 0, s.output()
    assert results == [new] * n  # every accepted request got its whole answer
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
