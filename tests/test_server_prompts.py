"""Inline prompts per request and composed prompts over HTTP (softprompt/server/inline.py,
routes/models.py), end to end: a real ``softprompt serve`` in a subprocess on 127.0.0.1 (a free
port; tests/test_server.py's ``Server``), compared with the same Runtime in-process.

- ``soft_prompt`` (base64 safetensors) and vLLM's ``prompt_embeds`` (base64 ``torch.save``) on
  completions, chat, score and classify equal the same prompt registered by name;
- the same inline prompt sent twice is one prefix-cache miss then hits; two prompts that differ
  in one element are two entries;
- bad payloads are 400 with a one-line message (never failing a concurrent good request),
  oversize ones 413 (body limit; the inline limit of ``create_app(max_inline_bytes=...)``);
- ``POST /v1/prompts`` with JSON segments equals ``Runtime.add_prompt(name, [parts])``.

Every client call has a timeout; the server fixture waits for /ready in a bounded loop and
always stops the server.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_server import ADMIN, BACKEND, KEY, ROOT, TOL, Server

TEXTS = ["the movie was", "i love this film", "the food and service were", "hello world"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
BODY_LIMIT = 300_000  # --max-body-bytes of the server


def _emb(p: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((p, 64), dtype=np.float32) * 0.5


def st_b64(arr: np.ndarray, **meta: str) -> str:
    """base64 of safetensors bytes holding one tensor (what ``soft_prompt`` carries)."""
    from safetensors.numpy import save

    return base64.b64encode(save({"embeddings": arr}, metadata=meta or None)).decode()


def pt_b64(arr: np.ndarray, **kw) -> str:
    """base64 of ``torch.save(tensor)`` (what vLLM's ``prompt_embeds`` carries)."""
    import torch

    buf = io.BytesIO()
    torch.save(torch.from_numpy(arr), buf, **kw)
    return base64.b64encode(buf.getvalue()).decode()


P5 = _emb(5, 1)  # registered as p5 on the server and in-process


@pytest.fixture(scope="module")
def files(tiny_dirs, tmp_path_factory):
    from softprompt import SoftPrompt

    root = tmp_path_factory.mktemp("server_prompts")
    model = root / "llama"
    shutil.copytree(tiny_dirs["llama"], model)  # the tiny Llama, with a chat template
    (model / "chat_template.jinja").write_text(TEMPLATE)
    SoftPrompt(P5).save_peft(root / "p5")
    return {"root": root, "model": model, "p5": root / "p5"}


@pytest.fixture(scope="module")
def env(files):
    """(server, in-process runtime): the runtime loads while the server starts."""
    from softprompt import Runtime

    s = Server(files["model"], files["p5"], files["root"] / "server.log",
               "--max-body-bytes", str(BODY_LIMIT))
    rt = None
    try:
        rt = Runtime.load(files["model"], backend=BACKEND)
        rt.add_prompt("p5", files["p5"])
        yield s.wait_ready(), rt
    finally:
        s.stop()
        if rt is not None:
            rt.close()


@pytest.fixture(scope="module")
def server(env):
    return env[0]


@pytest.fixture(scope="module")
def rt(env):
    return env[1]


def _post(server, path, body, **kw):
    return server.client.post(path, json=body, **kw)


def _error(resp, status, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and "\n" not in err["message"], err  # one line
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _choice(server, body) -> dict:
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


# ------------------------------------------------------------------------------ behaviour
def test_inline_completion_equals_named_prompt(server, rt):
    """soft_prompt and prompt_embeds with model = the base model give the named prompt's tokens
    and log-probs (generated, and echoed prompt log-probs), as the runtime does in Python."""
    from softprompt import SoftPrompt

    base = {"prompt": TEXTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    named = _choice(server, dict(base, model="p5"))
    for field, payload in (("soft_prompt", st_b64(P5)), ("prompt_embeds", pt_b64(P5))):
        got = _choice(server, dict(base, model="tiny", **{field: payload}))
        assert got["text"] == named["text"] and got["logprobs"]["tokens"] == named["logprobs"]["tokens"]
        np.testing.assert_allclose(got["logprobs"]["token_logprobs"],
                                   named["logprobs"]["token_logprobs"], atol=TOL, rtol=0)
    want = rt.generate(SoftPrompt(P5), [TEXTS[0]], max_new_tokens=6, stop_at_eos=False)[0]
    assert named["text"] == want.text
    # echo + logprobs: the prompt's own log-probs, as for a named prompt (the first token too:
    # the inline prompt predicts it)
    echo = {"model": "tiny", "prompt": TEXTS[2], "max_tokens": 0, "echo": True, "logprobs": 1,
            "soft_prompt": st_b64(P5)}
    got = _choice(server, echo)
    assert got["text"] == TEXTS[2]
    want = rt.score([{"prompt": SoftPrompt(P5), "context": TEXTS[2]}])[0].token_logprobs
    np.testing.assert_allclose(got["logprobs"]["token_logprobs"], want, atol=TOL, rtol=0)
    assert None not in got["logprobs"]["token_logprobs"]
    # several prompts in one request all go under the inline prompt
    many = _post(server, "/v1/completions", dict(base, model="tiny", prompt=TEXTS[:3],
                                                 soft_prompt=st_b64(P5))).json()["choices"]
    want = rt.generate("p5", TEXTS[:3], max_new_tokens=6, stop_at_eos=False)
    assert [c["text"] for c in many] == [w.text for w in want]


def test_inline_chat_score_and_classify_equal_named(server, rt):
    from softprompt import SoftPrompt

    msgs = [{"role": "user", "content": "i love this film"}]
    chat = {"messages": msgs, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    named = _post(server, "/v1/chat/completions", dict(chat, model="p5")).json()
    inline = _post(server, "/v1/chat/completions", dict(chat, model="tiny", soft_prompt=st_b64(P5))).json()
    assert inline["choices"][0]["message"]["content"] == named["choices"][0]["message"]["content"]
    assert inline["usage"] == named["usage"]
    # score: an item's inline prompt beside named ones; a bad payload is that item's error
    other = _emb(3, 21)
    items = [{"soft_prompt": st_b64(other), "context": TEXTS[0], "continuation": " good"},
             {"prompt": "p5", "context": TEXTS[1]},
             {"prompt_embeds": pt_b64(other), "context": TEXTS[1]},
             {"soft_prompt": "not base64!", "context": TEXTS[1]},
             {"prompt": "p5", "soft_prompt": st_b64(other), "context": TEXTS[1]},
             {"soft_prompt": st_b64(other), "prompt_embeds": pt_b64(other), "context": TEXTS[1]}]
    got = _post(server, "/v1/score", {"requests": items}).json()["data"]
    want = rt.score([{"prompt": SoftPrompt(other), "context": TEXTS[0], "continuation": " good"},
                     {"prompt": "p5", "context": TEXTS[1]},
                     {"prompt": SoftPrompt(other), "context": TEXTS[1]}])
    for g, w in zip(got, want):
        assert g["error"] is None and g["tokens"] == w.tokens
        np.testing.assert_allclose(g["token_logprobs"], w.token_logprobs, atol=TOL, rtol=0)
    assert "soft_prompt: not valid base64" in got[3]["error"]
    assert "send one or the other" in got[4]["error"] and "not both" in got[5]["error"]
    # classify: a call-level inline prompt
    body = {"contexts": [TEXTS[0], TEXTS[3]], "labels": [" good", " bad"], "soft_prompt": st_b64(other)}
    got = _post(server, "/v1/classify", body).json()["data"]
    want = rt.classify(SoftPrompt(other), [TEXTS[0], TEXTS[3]], [" good", " bad"])
    for g, w in zip(got, want):
        assert g["label"] == w.label
        np.testing.assert_allclose([g["probs"][k] for k in w.probs], list(w.probs.values()), atol=TOL)
    _error(_post(server, "/v1/classify", dict(body, prompt="p5")), 400, "prompt")


def test_same_inline_prompt_is_a_cache_hit_and_one_element_changes_the_entry(server):
    """Prefix-cache counters on /metrics: a new inline prompt is one miss (one new entry), the
    same bytes again only hits, a prompt differing in one element is a new miss and entry."""
    a = _emb(4, 31)
    b = a.copy()
    b[2, 7] += 1.0

    def score(arr):
        before = server.metrics()
        r = _post(server, "/v1/score", {"requests": [{"soft_prompt": st_b64(arr), "context": TEXTS[0]}]})
        assert r.status_code == 200 and r.json()["data"][0]["error"] is None, r.text
        after = server.metrics()
        d = {k: after[f"softprompt:prefix_cache_{k}"] - before[f"softprompt:prefix_cache_{k}"]
             for k in ("hits_total", "misses_total", "entries")}
        return r.json()["data"][0]["token_logprobs"], d

    lp_a, first = score(a)
    assert first["misses_total"] == 1 and first["entries"] == 1 and first["hits_total"] == 0
    lp_a2, again = score(a)
    assert again["misses_total"] == 0 and again["entries"] == 0 and again["hits_total"] >= 1
    assert lp_a2 == lp_a
    lp_b, other = score(b)
    assert other["misses_total"] == 1 and other["entries"] == 1
    assert lp_b != lp_a
    # the same content through prompt_embeds is the same entry (the digest is the content's)
    before = server.metrics()["softprompt:prefix_cache_misses_total"]
    r = _post(server, "/v1/score", {"requests": [{"prompt_embeds": pt_b64(a), "context": TEXTS[0]}]})
    assert r.json()["data"][0]["token_logprobs"] == lp_a
    assert server.metrics()["softprompt:prefix_cache_misses_total"] == before
    assert server.metrics()['softprompt:prompt_tokens_total{endpoint="score",prompt="(inline)"}'] > 0


def test_bad_payloads_are_400_one_line_and_never_fail_a_concurrent_good_one(server, rt):
    base = {"model": "tiny", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0}
    bad = [  # (body changes, param, words in the message)
        ({"soft_prompt": "%%%not base64"}, "soft_prompt", "not valid base64"),
        ({"soft_prompt": base64.b64encode(b"\x08" + b"\x00" * 7 + b"{}garbage").decode()},
         "soft_prompt", "not a valid safetensors payload"),
        ({"soft_prompt": st_b64(_emb(3, 1)[:, :10].copy())}, "soft_prompt", "expected [P, 64]"),
        ({"soft_prompt": st_b64(np.full((2, 64), np.nan, np.float32))}, "soft_prompt", "NaN"),
        ({"soft_prompt": st_b64(np.zeros((2, 64), np.int32))}, "soft_prompt", "floating-point"),
        ({"prompt_embeds": pt_b64(_emb(2, 1)[None].copy())}, "prompt_embeds", "2-D floating-point"),
        ({"prompt_embeds": pt_b64(_emb(2, 1), _use_new_zipfile_serialization=False)},
         "prompt_embeds", "not a torch.save payload"),
        ({"prompt_embeds": base64.b64encode(b"PK\x03\x04 junk").decode()}, "prompt_embeds",
         "not a torch.save payload"),
        ({"soft_prompt": st_b64(P5), "prompt_embeds": pt_b64(P5)}, "prompt_embeds", "not both"),
        ({"soft_prompt": st_b64(P5), "model": "p5"}, "model", "one or the other"),
        ({"soft_prompt": st_b64(P5), "prompt": ""}, "prompt", "at least one prompt token"),
        ({"soft_prompt": st_b64(P5), "prompt": None}, "prompt", "at least one prompt token"),
        ({"soft_prompt": 5}, "soft_prompt", "string"),
    ]
    good = [dict(base, prompt=t, soft_prompt=st_b64(P5)) for t in TEXTS]
    want = [w.text for w in rt.generate("p5", TEXTS, max_new_tokens=4)]
    bads = [("bad", dict(base, **change), param, words) for change, param, words in bad]
    goods = [("good", body, i, None) for i, body in enumerate(good)] * 4
    jobs = [j for pair in zip(bads, goods) for j in pair] + goods[len(bads):]  # interleaved

    def call(job):
        return job, _post(server, "/v1/completions", job[1])

    with ThreadPoolExecutor(8) as pool:
        for (kind, _, param, words), resp in pool.map(call, jobs):
            if kind == "good":
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0]["text"] == want[param]
            else:
                assert words in _error(resp, 400, param)["message"]
    _error(_post(server, "/v1/completions", dict(base, model="gpt-4", soft_prompt=st_b64(P5))),
           404, "model", "model_not_found")
    # over the body limit (--max-body-bytes): 413 before anything is decoded
    big = st_b64(_emb(BODY_LIMIT // 256 + 1, 2))
    _error(_post(server, "/v1/completions", dict(base, soft_prompt=big)), 413, code="body_too_large")
    assert _post(server, "/v1/completions", good[0]).status_code == 200


def test_inline_limit_413_and_a_torch_free_server_refuses_prompt_embeds(files, monkeypatch):
    """create_app(max_inline_bytes=N): a larger inline prompt is 413 (completions, score items,
    composed segments alike); where torch cannot be imported, prompt_embeds is a 400 naming
    soft_prompt (in-process app: the decoder's torch import replaced)."""
    from fastapi.testclient import TestClient

    from softprompt import Runtime
    from softprompt.server import create_app, inline

    small, large = st_b64(_emb(2, 5)), st_b64(_emb(40, 5))  # 40 x 64 x 4 bytes > 4096
    runtime = Runtime.load(files["model"], backend=BACKEND)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    app = create_app(runtime, warmup=False, served_model_name="tiny", max_inline_bytes=4096,
                     admin_keys=[ADMIN])
    with TestClient(app, headers=admin) as c:  # leaving it closes the runtime
        deadline = time.monotonic() + 60
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": TEXTS[0], "max_tokens": 1}
        assert c.post("/v1/completions", json=dict(body, soft_prompt=small)).status_code == 200
        for path, payload, param in (
                ("/v1/completions", dict(body, soft_prompt=large), "soft_prompt"),
                ("/v1/completions", dict(body, prompt_embeds=pt_b64(_emb(40, 5))), "prompt_embeds"),
                ("/v1/score", {"requests": [{"context": TEXTS[0]},
                                            {"context": TEXTS[0], "soft_prompt": large}]}, "soft_prompt"),
                ("/v1/prompts", {"name": "c", "segments": [{"soft_prompt": large}]}, "segments")):
            err = _error(c.post(path, json=payload), 413, param, "inline_prompt_too_large")
            assert "above the limit of 4096 bytes" in err["message"]
        monkeypatch.setattr(inline, "_torch", lambda: None)
        err = _error(c.post("/v1/completions", json=dict(body, prompt_embeds=pt_b64(_emb(2, 5)))),
                     400, "prompt_embeds", "torch_unavailable")
        assert "send soft_prompt" in err["message"]
        assert c.post("/v1/completions", json=dict(body, soft_prompt=small)).status_code == 200


def test_inline_decoding_imports_no_torch():
    """The decoder of a torch-free server: a process where torch cannot be imported refuses
    prompt_embeds in one line naming soft_prompt, and reads soft_prompt without torch."""
    child = textwrap.dedent("""
        import importlib.abc, sys

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "safetensors", "peft"):
                    raise ImportError(f"{name} is blocked")

        sys.meta_path.insert(0, Refuse())
        import base64, types
        import numpy as np
        from softprompt.runtime.requests import ModelInfo
        from softprompt.runtime import safetensors_np
        from softprompt.server import create_app  # the server package imports without torch
        from softprompt.server.errors import APIError
        from softprompt.server.inline import decode

        rt = types.SimpleNamespace(info=ModelInfo("m", "onnx", 64, 96, 512, "f", "float32", 2, 2, 16),
                                   max_virtual_tokens=4096)
        try:
            decode(base64.b64encode(b"PK whatever").decode(), "prompt_embeds", rt, 1 << 20)
        except APIError as e:
            print(e.status_code, e.code, e.detail)
        sys.path.insert(0, sys.argv[1])
        arr = np.ones((3, 64), np.float32)
        safetensors_np.save_file({"x": arr}, sys.argv[1] + "/p.safetensors")
        raw = open(sys.argv[1] + "/p.safetensors", "rb").read()
        print(decode(base64.b64encode(raw).decode(), "soft_prompt", rt, 1 << 20).num_virtual_tokens)
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
    """)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", child, tmp], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, p = proc.stdout.strip().splitlines()
    assert refused.startswith("400 torch_unavailable prompt_embeds") and "send soft_prompt" in refused
    assert p == "3"


def test_composed_upload_equals_add_prompt(server, rt):
    """POST /v1/prompts {name, segments}: a registered prompt, text and an inline soft prompt,
    composed in order, score as Runtime.add_prompt(name, [p5, text, sp]) does in Python; the
    model card says its kind and parts."""
    from softprompt import SoftPrompt

    admin = {"Authorization": f"Bearer {ADMIN}"}
    tail = _emb(2, 41)
    body = {"name": "qa", "segments": [{"prompt": "p5"}, {"text": "the movie was"},
                                       {"soft_prompt": st_b64(tail)}]}
    _error(_post(server, "/v1/prompts", body), 403)  # the user key may not
    r = _post(server, "/v1/prompts", body, headers=admin)
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["kind"] == "composed" and card["num_virtual_tokens"] == 5 + 3 + 2
    assert [p.get("name", p.get("text")) for p in card["parts"]] == ["p5", "the movie was", "inline"]
    assert card["parts"][1]["tokens"] == 3
    rt.add_prompt("qa", [rt.prompts["p5"], "the movie was", SoftPrompt(tail)])
    items = [{"prompt": "qa", "context": t, "continuation": " good"} for t in TEXTS]
    got = _post(server, "/v1/score", {"requests": items}).json()["data"]
    for g, w in zip(got, rt.score(items)):
        np.testing.assert_allclose(g["token_logprobs"], w.token_logprobs, atol=TOL, rtol=0)
    cards = {m["id"]: m for m in server.client.get("/v1/models").json()["data"]}
    assert cards["qa"]["parts"] == card["parts"] and cards["p5"]["kind"] == "prompt_tuning"
    assert cards["tiny"]["kind"] == "base" and cards["p5"].get("parts") is None
    want = rt.generate("qa", [TEXTS[1]], max_new_tokens=4)[0].text
    assert _choice(server, {"model": "qa", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0})["text"] == want
    # strict JSON: unknown keys, a segment of two kinds, an unknown prompt, empty text
    for bad, param in (({"name": "x", "segments": [{"text": "a"}], "extra": 1}, "extra"),
                       ({"name": "x", "segments": [{"txt": "a"}]}, "txt"),
                       ({"name": "x", "segments": [{"text": "a", "prompt": "p5"}]}, "segments"),
                       ({"name": "x", "segments": []}, "segments"),
                       ({"name": "x", "segments": [{"prompt": "nope"}]}, "segments"),
                       ({"name": "x", "segments": [{"text": ""}]}, "segments"),
                       ({"name": "x", "segments": [{"soft_prompt": "@@"}]}, "segments"),
                       ({"name": "tiny", "segments": [{"text": "a"}]}, "name")):
        _error(_post(server, "/v1/prompts", bad, headers=admin), 400, param)
    assert "x" not in {m["id"] for m in server.client.get("/v1/models").json()["data"]}
    assert server.client.delete("/v1/prompts/qa", headers=admin).json()["deleted"] is True


def test_multitask_upload_registers_every_task(server, files, rt):
    """A MULTITASK_PROMPT_TUNING adapter uploaded through POST /v1/prompts registers NAME/0 ..
    NAME/T-1 (as add_prompt does) and answers their cards; each can be deleted by name."""
    from softprompt.runtime import safetensors_np

    d = files["root"] / "mt"
    d.mkdir(exist_ok=True)
    cfg = {"peft_type": "MULTITASK_PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
           "token_dim": 64, "num_tasks": 2, "num_transformer_submodules": 1}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(5)
    safetensors_np.save_file({"prompt_embeddings": _emb(3, 6),
                              "prefix_task_cols": rng.standard_normal((2, 3, 2), dtype=np.float32),
                              "prefix_task_rows": rng.standard_normal((2, 2, 64), dtype=np.float32)},
                             d / "adapter_model.safetensors")
    upload = [("file", (f, (d / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = server.client.post("/v1/prompts", data={"name": "mt"}, files=upload, headers=admin)
    assert r.status_code == 200, r.text
    cards = r.json()["data"]
    assert [(c["id"], c["kind"], c["num_virtual_tokens"]) for c in cards] == [
        ("mt/0", "multitask_prompt_tuning", 3), ("mt/1", "multitask_prompt_tuning", 3)]
    rt.add_prompt("mt", d)
    items = [{"prompt": "mt/1", "context": TEXTS[0], "continuation": " good"}]
    got = _post(server, "/v1/score", {"requests": items}).json()["data"][0]
    np.testing.assert_allclose(got["token_logprobs"], rt.score(items)[0].token_logprobs, atol=TOL, rtol=0)
    for name in ("mt/0", "mt/1"):
        assert server.client.delete(f"/v1/prompts/{name}", headers=admin).json()["deleted"] is True
    assert not {"mt/0", "mt/1"} & {m["id"] for m in server.client.get("/v1/models").json()["data"]}


def test_openai_client_sends_soft_prompt_in_extra_body(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    kw = dict(prompt=TEXTS[3], max_tokens=8, temperature=0)
    named = client.completions.create(model="p5", extra_body={"ignore_eos": True}, **kw)
    inline = client.completions.create(model="tiny", extra_body={"ignore_eos": True,
                                                                 "soft_prompt": st_b64(P5)}, **kw)
    assert inline.choices[0].text == named.choices[0].text and inline.usage == named.usage
    with pytest.raises(openai.BadRequestError, match="one or the other"):
        client.completions.create(model="p5", extra_body={"soft_prompt": st_b64(P5)}, **kw)
