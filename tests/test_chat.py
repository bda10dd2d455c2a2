"""Chat: the model's own chat template (runtime/chat.py), ``Runtime.chat`` / ``stream_chat``,
and ``POST /v1/chat/completions``, ``/tokenize``, ``/detokenize`` through the openai client.

The template is rendered as transformers renders it (checked against
``AutoTokenizer.apply_chat_template``), and the model sees the soft prompt's virtual tokens
first, then the templated conversation (checked against the reference backend, PEFT
semantics). The HTTP tests run a real uvicorn server on 127.0.0.1 (a free port) in a thread
over the same Runtime they compare with; the slow test runs ``softprompt serve default`` in a
subprocess with a demo prompt.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from softprompt import Runtime, SoftPrompt
from softprompt.runtime.chat import ChatTemplate, check_messages
from softprompt.runtime.requests import RequestError
from tiny import make_tiny_model
from tolerances import SCORE

ROOT = Path(__file__).resolve().parent.parent
TOL = SCORE["float32"]["atol"]
# a template with what real ones use: bos/eos variables, a loop, raise_exception, a namespace,
# trim_blocks/lstrip_blocks whitespace control and the generation prompt
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' and not loop.first %}
        {{ raise_exception('the system message must come first') }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
{{ m['role'] }} : {{ m['content'] }} {{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}assistant :{% endif %}"""
CHATS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "you are good"}, {"role": "user", "content": "i love this film"}],
    [{"role": "user", "content": "the food was"}, {"role": "assistant", "content": "very good ."},
     {"role": "user", "content": "and the service ?"}],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    plain = make_tiny_model("llama", root / "plain")  # the tiny tokenizer has no template
    chat = make_tiny_model("llama", root / "chat")
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat)
    SoftPrompt.random(4, 64, seed=1, std=0.5).save_peft(root / "p4")
    return {"root": root, "plain": plain, "chat": chat, "p4": root / "p4"}


@pytest.fixture(scope="module")
def rt(files):
    r = Runtime.load(files["chat"], backend="torch")
    r.add_prompt("p4", files["p4"])
    yield r
    r.close()


class ThreadServer:
    """``create_app(rt)`` under uvicorn on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, runtime):
        import uvicorn

        from softprompt.server import create_app

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(runtime, warmup=False, served_model_name="tiny"),
                                host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):  # up to ~20 s
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("server not ready after 20 s")
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(rt):
    s = ThreadServer(rt)
    yield s
    s.stop()


def _openai(server, cls=None):
    import openai

    return (cls or openai.OpenAI)(base_url=server.url + "/v1", api_key="unused", timeout=60,
                                  max_retries=0)


# ------------------------------------------------------------------------------ templates
def test_rendering_equals_transformers_apply_chat_template(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["chat"])
    with Runtime.load(files["chat"], backend="reference") as ref:
        for add in (True, False):
            for msgs in CHATS:
                want = tok.apply_chat_template(msgs, add_generation_prompt=add, tokenize=True,
                                               return_dict=False)
                text = tok.apply_chat_template(msgs, add_generation_prompt=add, tokenize=False)
                assert ref.chat_ids(msgs, add_generation_prompt=add) == want, text
    # the template read from the directory (chat_template.jinja) equals the tokenizer's, and so
    # does the legacy form: 'chat_template' in tokenizer_config.json (one, or a named list)
    assert (files["chat"] / "chat_template.jinja").is_file()
    assert ChatTemplate.from_dir(files["chat"]) == ChatTemplate.from_tokenizer(tok)
    for form in (TEMPLATE, [{"name": "default", "template": TEMPLATE},
                            {"name": "tool_use", "template": "x"}]):
        legacy = files["root"] / f"legacy{isinstance(form, list)}"
        legacy.mkdir()
        conf = json.loads((files["chat"] / "tokenizer_config.json").read_text())
        (legacy / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": form}))
        assert ChatTemplate.from_dir(legacy) == ChatTemplate.from_tokenizer(tok)
    assert ChatTemplate.from_dir(files["plain"]) is None


@pytest.mark.slow
def test_default_model_rendering_equals_transformers():
    from transformers import AutoTokenizer

    from softprompt.models.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    from softprompt.runtime.requests import Tokenizer

    ours = Tokenizer(tok.backend_tokenizer, chat_template=ChatTemplate.from_tokenizer(tok))
    from softprompt.runtime.chat import chat_ids

    for m in (msgs, msgs[1:2], msgs[:2]):
        for add in (True, False):
            assert chat_ids(ours, m, add) == tok.apply_chat_template(
                m, add_generation_prompt=add, tokenize=True, return_dict=False)


def test_messages_are_checked_with_one_line_errors(rt):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                          {"type": "text", "text": "world"}]}]
    assert check_messages(parts) == [{"role": "user", "content": "hello\nworld"}]
    # None-valued keys (an openai message object sent back) are dropped, as transformers does
    assert check_messages([{"role": "assistant", "content": "hi", "tool_calls": None}]) == [
        {"role": "assistant", "content": "hi"}]
    bad = {
        "must be a list": "hello",
        "messages is empty": [],
        "role must be one of": [{"role": "tool", "content": "x"}],
        "has no content": [{"role": "user"}],
        "must be a string or a list of text parts": [{"role": "user", "content": 3}],
        "must be a text part": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "unsupported field 'tool_calls'": [{"role": "assistant", "content": "", "tool_calls": []}],
        "not valid Unicode": [{"role": "user", "content": "a\ud800"}],
        "the system message must come first": [{"role": "user", "content": "hi"},
                                               {"role": "system", "content": "x"}],
    }
    for want, msgs in bad.items():
        with pytest.raises(RequestError, match=want) as e:
            rt.chat_ids(msgs)
        assert "\n" not in str(e.value)


def test_model_without_template_is_refused_clearly(files):
    from fastapi.testclient import TestClient

    from softprompt.server import create_app

    with Runtime.load(files["plain"], backend="reference") as plain:
        assert plain.tokenizer.chat_template is None
        with pytest.raises(RequestError, match="has no chat template"):
            plain.chat(None, CHATS[0])
        with TestClient(create_app(plain, warmup=False)) as client:
            r = client.post("/v1/chat/completions",
                            json={"model": plain.info.name, "messages": CHATS[0]})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "chat_template_missing" and "no chat template" in err["message"]
            r = client.post("/tokenize", json={"messages": CHATS[0]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"


# ------------------------------------------------------------------------------- runtime
def test_chat_is_generate_on_the_templated_ids_with_peft_placement(files, rt):
    """rt.chat == rt.generate over chat_ids, and == the reference backend (PEFT semantics:
    the virtual tokens, then the templated conversation's ids)."""
    ref = Runtime.load(files["chat"], backend="reference")
    ref.add_prompt("p4", files["p4"])
    try:
        for prompt in (None, "p4"):
            got = rt.chat(prompt, CHATS, max_new_tokens=6, stop_at_eos=False)
            assert isinstance(got, list) and len(got) == len(CHATS)
            plain = rt.generate(prompt, [rt.chat_ids(m) for m in CHATS], max_new_tokens=6,
                                stop_at_eos=False)
            want = ref.chat(prompt, CHATS, max_new_tokens=6, stop_at_eos=False)
            for g, p, w in zip(got, plain, want):
                assert g.token_ids == p.token_ids == w.token_ids and g.text == w.text
                np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=TOL)
        one = rt.chat("p4", CHATS[1], max_new_tokens=6, stop_at_eos=False)  # one: one result
        assert not isinstance(one, list) and one.token_ids == got[1].token_ids
    finally:
        ref.close()
    # a bad conversation fails alone with errors="return", and names itself with "raise"
    res = rt.chat(["p4", None], [CHATS[0], [{"role": "tool", "content": "x"}]],
                  max_new_tokens=2, errors="return")
    assert res[0].error is None and res[1].finish_reason == "error" and "role" in res[1].error
    with pytest.raises(RequestError, match="conversation 1: messages"):
        rt.chat("p4", [CHATS[0], [{"role": "tool", "content": "x"}]], max_new_tokens=2)
    with pytest.raises(RequestError, match="unknown generation arguments"):
        rt.chat("p4", CHATS[0], max_tokens=2)


def test_stream_chat_sync_and_async_equal_chat(rt):
    want = rt.chat("p4", CHATS[2], max_new_tokens=6, stop_at_eos=False)
    chunks = list(rt.stream_chat("p4", CHATS[2], max_new_tokens=6, stop_at_eos=False))
    assert "".join(c.text for c in chunks) == want.text
    assert [i for c in chunks for i in c.token_ids] == want.token_ids

    async def consume():
        return [c async for c in rt.stream_chat_async("p4", CHATS[2], max_new_tokens=6,
                                                      stop_at_eos=False)]

    chunks = asyncio.run(consume())
    assert [i for c in chunks for i in c.token_ids] == want.token_ids


# ---------------------------------------------------------------------------------- HTTP
def test_openai_client_chat_plain_and_stream_equal_rt_chat(server, rt):
    client = _openai(server)
    want = rt.chat("p4", CHATS[1], max_new_tokens=8, stop_at_eos=False, logprobs=2)
    got = client.chat.completions.create(model="p4", messages=CHATS[1], max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(rt.chat_ids(CHATS[1]))
    assert got.usage.completion_tokens == 8
    lps = choice.logprobs.content
    np.testing.assert_allclose([t.logprob for t in lps], want.token_logprobs, atol=TOL)
    for t, alts in zip(lps, want.top_logprobs):
        assert [a.token for a in t.top_logprobs] == [rt.tokenizer.decode([i]) for i, _ in alts]
    # max_completion_tokens, streamed, with usage: the same text, one event per token
    stream = client.chat.completions.create(model="p4", messages=CHATS[1],
                                            max_completion_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # greedy without ignore_eos, on the base model, equals rt.chat too
    w = rt.chat(None, CHATS[0], max_new_tokens=5)
    g = client.chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=5,
                                       temperature=0)
    assert g.choices[0].message.content == w.text
    assert g.choices[0].finish_reason == ("length" if w.finish_reason == "length" else "stop")


def test_seed_and_stop_as_the_runtime_does(server, rt):
    client = _openai(server)
    w = rt.chat("p4", CHATS[0], max_new_tokens=6, temperature=0.9, seed=5, stop_at_eos=False)
    g = client.chat.completions.create(model="p4", messages=CHATS[0], max_tokens=6,
                                       temperature=0.9, seed=5, extra_body={"ignore_eos": True})
    assert g.choices[0].message.content == w.text
    full = rt.chat("p4", CHATS[0], max_new_tokens=8, stop_at_eos=False).text
    words = full.split()
    stop = words[2] if len(words) > 2 else words[-1]
    w = rt.chat("p4", CHATS[0], max_new_tokens=8, stop_at_eos=False, stop=[stop])
    g = client.chat.completions.create(model="p4", messages=CHATS[0], max_tokens=8,
                                       temperature=0, stop=stop, extra_body={"ignore_eos": True})
    assert g.choices[0].message.content == w.text and stop not in w.text
    assert g.choices[0].finish_reason == "stop"


def test_async_openai_client_plain_and_stream(server, rt):
    import openai

    want = rt.chat("p4", CHATS[2], max_new_tokens=6, stop_at_eos=False).text

    async def run():
        client = _openai(server, openai.AsyncOpenAI)
        async with client:
            plain, stream = await asyncio.gather(
                client.chat.completions.create(model="p4", messages=CHATS[2], max_tokens=6,
                                               temperature=0, extra_body={"ignore_eos": True}),
                client.chat.completions.create(model="p4", messages=CHATS[2], max_tokens=6,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}))
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            return plain.choices[0].message.content, text

    assert asyncio.run(run()) == (want, want)


def test_bad_chat_requests_and_unknown_routes_get_openai_errors(server):
    import openai

    client = _openai(server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHATS[0], max_tokens=1)
    cases = [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": CHATS[0], "n": 2}, "n"),
        ({"messages": CHATS[0], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": CHATS[0], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHATS[0], "max_tokens": 100000}, "messages"),
        ({"messages": CHATS[0], "frobnicate": 1}, "frobnicate"),
    ]
    for extra, param in cases:
        r = server.client.post("/v1/chat/completions", json={"model": "p4", **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    for method, path, status in (("POST", "/v1/chat/completion", 404), ("GET", "/v2/x", 404),
                                 ("GET", "/v1/chat/completions", 405)):
        r = server.client.request(method, path)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and path in err["message"]


def test_tokenize_detokenize_round_trip(server, rt):
    text = "the movie was very good"
    r = server.client.post("/tokenize", json={"model": "p4", "prompt": text}).json()
    assert r["tokens"] == rt.tokenizer.encode(text, True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == rt.info.max_positions - 4
    back = server.client.post("/detokenize", json={"model": "p4", "tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    r = server.client.post("/tokenize", json={"messages": CHATS[1],
                                              "return_token_strs": True}).json()
    assert r["tokens"] == rt.chat_ids(CHATS[1]) and len(r["token_strs"]) == r["count"]
    assert r["max_model_len"] == rt.info.max_positions
    back = server.client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert rt.tokenizer.encode(back, False) == r["tokens"]  # special tokens kept
    bad = server.client.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = server.client.post("/tokenize", json={"prompt": "a", "messages": CHATS[0]})
    assert both.status_code == 400


def test_bundle_carries_the_template_and_chats_without_torch(files, rt):
    """The exported bundle lists and hashes chat_template.jinja; a process that cannot import
    torch or transformers chats over it, as the torch backend does."""
    from softprompt.export import export

    bundle = export(files["chat"], files["root"] / "bundle", progress=False)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert "chat_template.jinja" in manifest["files"]  # listed and hashed like every file
    from softprompt.export.bundle import BundleError, load_bundle

    tampered = files["root"] / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / "chat_template.jinja").write_text(TEMPLATE.replace("assistant", "user"))
    with pytest.raises(BundleError, match="chat_template.jinja"):
        load_bundle(tampered, verify="full")
    del manifest["files"]["chat_template.jinja"]
    (tampered / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not list chat_template.jinja"):
        load_bundle(tampered, verify="full")
    want = rt.chat("p4", CHATS[1], max_new_tokens=6, stop_at_eos=False)
    child = f"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Refuse())
from softprompt.runtime.api import Runtime
with Runtime.load({str(bundle)!r}, backend="onnx") as rt:
    rt.add_prompt("p4", {str(files["p4"])!r})
    r = rt.chat("p4", {CHATS[1]!r}, max_new_tokens=6, stop_at_eos=False)
    print(json.dumps({{"ids": rt.chat_ids({CHATS[1]!r}), "out": r.token_ids}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SOFTPROMPT_HOME=str(files["root"] / "home"))
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == rt.chat_ids(CHATS[1]) and got["out"] == want.token_ids


# ---------------------------------------------------------------------------- default model
@pytest.mark.slow
def test_default_model_openai_chat_equals_rt_chat(tmp_path):
    """`softprompt serve default --prompt topic=...` answers the openai client's chat calls
    (plain and streamed) as rt.chat does for a greedy request."""
    import openai

    from softprompt.runtime.demo import PROMPTS_DIR

    port = _free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "default", "--prompt",
                             f"topic={PROMPTS_DIR / 'topic'}", "--port", str(port), "--no-warmup"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        with Runtime.load("default") as rt:
            rt.add_prompt("topic", PROMPTS_DIR / "topic")
            msgs = [{"role": "user", "content": "What is the topic of: The striker scored twice."}]
            want = rt.chat("topic", msgs, max_new_tokens=12)
            for _ in range(240):  # up to ~120 s
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   timeout=120, max_retries=0)
            got = client.chat.completions.create(model="topic", messages=msgs, max_tokens=12,
                                                 temperature=0)
            assert got.choices[0].message.content == want.text and want.text
            assert got.usage.prompt_tokens == len(rt.chat_ids(msgs))
            chunks = client.chat.completions.create(model="topic", messages=msgs, max_tokens=12,
                                                    temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
