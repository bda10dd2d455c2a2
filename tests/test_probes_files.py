"""Files from outside probes: JSON nested 20,000 deep wherever JSON is read from disk or uploaded
(one-line errors of each reader's own type, never a RecursionError or a 500), and bundles keyed
by the weights' content (the same model reached by another path reuses one bundle, and bundles
keyed the old way are adopted instead of exported again)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from softprompt.export import BundleError, bundle_for, load_bundle
from softprompt.jobs import JobError, jsonl_rows, score_file
from softprompt.models import ModelError, content_key, load_model, loads_json
from softprompt.models.files import json_depth_exceeds
from softprompt.runtime.api import Runtime
from softprompt.runtime.cache import CacheError, PrefixCache
from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
from softprompt.runtime.safetensors_np import SafetensorsError, load_file, save_file
from test_hub import add_to_cache
from tiny import HIDDEN

DEEP = 20_000
DEEP_JSON = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _deep_safetensors(path: Path) -> Path:
    """A safetensors file whose header is a JSON object nested DEEP levels."""
    header = DEEP_JSON.encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


# ------------------------------------------------------------------- the bounded parser
def test_loads_json_bounds_nesting_without_recursing():
    for text in (DEEP_JSON, "[" * 101 + "]" * 101, '{"x": ' * 5000 + "1" + "}" * 5000):
        with pytest.raises(json.JSONDecodeError, match="nested deeper than 100 levels"):
            loads_json(text)
    assert loads_json("[" * 100 + "]" * 100) is not None
    # brackets inside strings, escaped quotes and backslashes do not count
    tricky = json.dumps({"s": "[" * 500 + '\\"[[[' + "{" * 300, "t": ["\\", "\\\\\"[[["]})
    assert loads_json(tricky) == json.loads(tricky)
    assert not json_depth_exceeds(tricky.encode(), 3)
    assert json_depth_exceeds(b"[" * 20_000_000 + b"]" * 20_000_000)  # 40 MB: no recursion


# ------------------------------------------------------------------------------ prompts
def test_deep_header_in_a_prompt_file_or_adapter_is_a_soft_prompt_error(tmp_path, tiny_llama_bundle):
    bad = _deep_safetensors(tmp_path / "deep.safetensors")
    with pytest.raises(SafetensorsError, match="nested deeper than"):
        load_file(bad)
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    try:
        with pytest.raises(SoftPromptError, match="nested deeper than") as e:
            rt.add_prompt("p", bad)
        _one_line(e.value)
        adapter = SoftPrompt.random(4, HIDDEN, seed=1).save_peft(tmp_path / "adapter")
        (adapter / "adapter_config.json").write_text(DEEP_JSON)
        with pytest.raises(SoftPromptError, match="adapter_config.json: corrupt JSON") as e:
            rt.add_prompt("p", adapter)
        _one_line(e.value)
        weights = SoftPrompt.random(4, HIDDEN, seed=1).save_peft(tmp_path / "adapter2")
        _deep_safetensors(weights / "adapter_model.safetensors")
        with pytest.raises(SoftPromptError, match="nested deeper than"):
            rt.add_prompt("p", weights)
        assert "p" not in rt.prompts
    finally:
        rt.close()


def test_deep_header_upload_is_a_400(tmp_path, tiny_llama_bundle):
    from fastapi.testclient import TestClient

    from softprompt.server import create_app

    bad = _deep_safetensors(tmp_path / "deep.safetensors").read_bytes()
    config = json.dumps({"peft_type": "PROMPT_TUNING"})
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    with TestClient(create_app(rt, warmup=False), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        r = c.post("/v1/prompts", data={"name": "deep"},
                   files=[("file", ("deep.safetensors", bad, "application/octet-stream"))])
        assert r.status_code == 400, r.text
        assert "nested deeper than" in r.json()["error"]["message"]
        r = c.post("/v1/prompts", data={"name": "deep"},
                   files=[("file", ("adapter_config.json", DEEP_JSON.encode(), "application/json")),
                          ("file", ("adapter_model.safetensors", bad, "application/octet-stream"))])
        assert r.status_code == 400, r.text
        r = c.post("/v1/prompts", data={"name": "deep"},
                   files=[("file", ("adapter_config.json", config.encode(), "application/json")),
                          ("file", ("adapter_model.safetensors", bad, "application/octet-stream"))])
        assert r.status_code == 400 and "nested deeper than" in r.text, r.text
        assert c.get("/v1/models/deep").status_code == 404


# ------------------------------------------------------------------------------- caches
def test_deep_cache_file_is_a_cache_error(tmp_path, tiny_llama_bundle):
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    try:
        rt.add_prompt("p", SoftPrompt.random(4, HIDDEN, seed=2, std=0.5))
        rt.score([{"prompt": "p", "context": [5, 6]}])
        good = tmp_path / "cache.safetensors"
        assert rt.save_cache(good) == 1
        with pytest.raises(CacheError, match="nested deeper than") as e:
            rt.load_cache(_deep_safetensors(tmp_path / "deep.safetensors"))
        _one_line(e.value)
        arrays, meta = load_file(good)  # a valid file whose entry record nests deep
        save_file(arrays, tmp_path / "deep-record.safetensors", {**meta, "entry0": DEEP_JSON})
        with pytest.raises(CacheError, match="entry 0: record missing or not JSON"):
            rt.load_cache(tmp_path / "deep-record.safetensors")
        assert rt.load_cache(good) == 1
    finally:
        rt.close()
    cache = PrefixCache(fingerprint="f", dtype="float32")
    with pytest.raises(CacheError):
        cache.load(tmp_path / "deep.safetensors")


# ------------------------------------------------------------------------------ bundles
def _rewrite_listed(bundle: Path, name: str, data: bytes) -> None:
    """Replace a file of a bundle and record its new size and sha256 in bundle.json."""
    (bundle / name).write_bytes(data)
    m = json.loads((bundle / "bundle.json").read_text())
    m["files"][name] = {**m["files"][name], "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "bundle.json").write_text(json.dumps(m))


def test_deep_bundle_files_are_bundle_errors(tmp_path, tiny_llama_bundle, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    b = shutil.copytree(tiny_llama_bundle, tmp_path / "b")
    manifest = (b / "bundle.json").read_text()
    (b / "bundle.json").write_text(DEEP_JSON)
    with pytest.raises(BundleError, match="bundle.json: corrupt JSON .*nested deeper") as e:
        load_bundle(b)
    _one_line(e.value)
    (b / "bundle.json").write_text(manifest)
    load_bundle(b)  # writes the verification record ...
    records = list((tmp_path / "home" / "verified").glob("*.json"))
    assert len(records) == 1
    records[0].write_text(DEEP_JSON)  # ... which, unreadable, only costs the hash again
    load_bundle(b)
    _rewrite_listed(b, "tokenizer_config.json", DEEP_JSON.encode())
    with pytest.raises(BundleError, match="tokenizer_config.json: corrupt JSON") as e:
        Runtime.load(b, backend="onnx")
    _one_line(e.value)


# ------------------------------------------------------------------- models, jobs, memos
def test_deep_model_files_are_model_errors(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    d = shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    (d / "config.json").write_text(DEEP_JSON)
    with pytest.raises(ModelError, match="config.json: corrupt JSON") as e:
        load_model(d)
    _one_line(e.value)
    shutil.copyfile(tiny_dirs["llama"] / "config.json", d / "config.json")
    (d / "softprompt_fingerprint.json").write_text(DEEP_JSON)
    with pytest.raises(ModelError, match="softprompt_fingerprint.json: corrupt JSON"):
        load_model(d)
    (d / "softprompt_fingerprint.json").unlink()
    (d / "tokenizer_config.json").write_text(DEEP_JSON)
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        load_model(d)
    shutil.copyfile(tiny_dirs["llama"] / "tokenizer_config.json", d / "tokenizer_config.json")
    key = content_key(d)
    for memo in (tmp_path / "home" / "fingerprints").glob("*.json"):
        memo.write_text(DEEP_JSON)  # unreadable memos are recomputed, not trusted or fatal
    assert content_key(d) == key
    assert load_model(d).fingerprint == load_model(tiny_dirs["llama"]).fingerprint
    _deep_safetensors(d / "model.safetensors")
    with pytest.raises(ModelError, match="not a valid safetensors file .*nested deeper"):
        content_key(d)


def test_deep_jsonl_row_and_checkpoint(tmp_path, tiny_llama_bundle):
    (tmp_path / "in.jsonl").write_text('{"context": [5, 6]}\n{"context": ' + "[" * DEEP + "]" * DEEP
                                       + '}\n{"context": [7, 8]}\n')
    with open(tmp_path / "in.jsonl", "rb") as f:
        rows = list(jsonl_rows(f))
    assert [n for n, *_ in rows] == [1, 2, 3] and "nested deeper than" in rows[1][1]
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    try:
        out = tmp_path / "out.jsonl"
        score_file(rt, str(tmp_path / "in.jsonl"), str(out), chunk_rows=2)
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["line"] for r in recs] == [1, 2, 3] and "error" in recs[1]
        (tmp_path / "out.jsonl.ckpt.json").write_text(DEEP_JSON)
        with pytest.raises(JobError, match="unreadable .*nested deeper") as e:
            score_file(rt, str(tmp_path / "in.jsonl"), str(out), chunk_rows=2, resume=True)
        _one_line(e.value)
    finally:
        rt.close()


# ------------------------------------------------------------------- bundles by content
@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").mkdir()
    return tmp_path / "home"


def _no_export(monkeypatch):
    import softprompt.export.exporter as exporter

    def refuse(*a, **k):
        raise AssertionError("exported a second time")

    monkeypatch.setattr(exporter, "export", refuse)
    monkeypatch.setattr(exporter, "int4_bundle", refuse)


def test_same_weights_by_another_path_reuse_one_bundle(home, tmp_path, tiny_dirs, monkeypatch):
    src = tiny_dirs["llama"]
    first = bundle_for(src)
    copy = shutil.copytree(src, tmp_path / "copy")
    resharded = tmp_path / "resharded"  # the same tensors in two files, another header order
    resharded.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, resharded / f.name)
    arrays, _ = load_file(src / "model.safetensors")
    names = sorted(arrays)
    save_file({n: arrays[n] for n in names[::2]}, resharded / "model-00001-of-00002.safetensors")
    save_file({n: arrays[n] for n in names[1::2]}, resharded / "model-00002-of-00002.safetensors",
              {"format": "pt"})
    add_to_cache(tmp_path / "hf", "someone/tiny-llama", src)
    _no_export(monkeypatch)
    for other in (copy, resharded, "someone/tiny-llama"):
        assert bundle_for(other, create=False) == first, other
    rt = Runtime.load("someone/tiny-llama", backend="onnx")
    ref = Runtime.load(first, backend="onnx")
    try:
        assert Path(rt.backend.bundle.path) == first
        req = [{"context": [5, 9, 17, 4], "continuation": [11, 3]}]
        assert rt.score(req)[0].logprob == ref.score(req)[0].logprob
    finally:
        rt.close()
        ref.close()
    (copy / "tokenizer_config.json").write_text(
        (copy / "tokenizer_config.json").read_text().replace("<unk>", "<unknown>"))
    assert content_key(copy) != content_key(src)  # another tokenizer: another bundle
    assert bundle_for(copy, create=False) is None


def test_bundles_keyed_the_old_way_are_adopted(home, tmp_path, tiny_dirs, monkeypatch):
    """A bundle named by a model's fingerprint (as before content keys) is served for that
    model, and for a copy that reaches the same content with another fingerprint (as a hub
    snapshot of the converted default model does), through a link; nothing is exported."""
    src = shutil.copytree(tiny_dirs["llama"], tmp_path / "converted")
    fp = "f" * 64  # a converted GGUF's recorded fingerprint, unlike its files' hash
    (src / "softprompt_fingerprint.json").write_text(json.dumps({"fingerprint": fp}))
    made = bundle_for(src)
    legacy = made.with_name(f"{fp[:16]}-fp32")
    made.rename(legacy)
    m = json.loads((legacy / "bundle.json").read_text())
    (legacy / "bundle.json").write_text(json.dumps({**m, "fingerprint": fp, "source": str(src)}))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in src.iterdir():
        if f.name != "softprompt_fingerprint.json":
            shutil.copyfile(f, snapshot / f.name)
    add_to_cache(tmp_path / "hf", "someone/converted", snapshot)
    assert load_model("someone/converted").fingerprint != fp
    _no_export(monkeypatch)
    got = bundle_for("someone/converted", create=False)  # found by the source it records
    assert got == made and got.is_symlink() and got.resolve() == legacy.resolve()
    assert bundle_for(src) == made and bundle_for(snapshot, create=False) == made
    rt = Runtime.load("someone/converted", backend="onnx")
    try:
        assert rt.backend.fingerprint == fp and rt.score([{"context": [5, 6, 7]}])[0].error is None
    finally:
        rt.close()
    shutil.rmtree(legacy)  # the link dangles: the bundle is gone, so it would be exported again
    assert bundle_for(src, create=False) is None


@pytest.mark.slow
def test_default_model_by_a_local_hub_id_reuses_the_default_bundle(tmp_path, monkeypatch):
    """The default model loaded as `default`, then by a hub-style id whose snapshot is a copy of
    the converted directory (without its fingerprint record, as an upload would be): one
    bundle, no second export (the probe saw 119 s and another 628 MiB)."""
    from softprompt.models import default_model_dir

    default = Runtime.load("default", backend="onnx")
    bundle = Path(default.backend.bundle.path)
    req = [{"context": "Review: Great soup.\nSentiment:", "continuation": " positive"}]
    want = default.score(req)[0].logprob
    default.close()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in default_model_dir().iterdir():
        if f.name != "softprompt_fingerprint.json":
            shutil.copyfile(f, snapshot / f.name)
    add_to_cache(tmp_path / "hf", "HuggingFaceTB/SmolLM2-135M-Instruct", snapshot)
    shutil.rmtree(snapshot)
    _no_export(monkeypatch)
    assert bundle_for("HuggingFaceTB/SmolLM2-135M-Instruct", create=False) == bundle_for(
        "default", create=False)
    rt = Runtime.load("HuggingFaceTB/SmolLM2-135M-Instruct", backend="onnx")
    try:
        assert Path(rt.backend.bundle.path).resolve() == bundle.resolve()
        assert rt.score(req)[0].logprob == want
    finally:
        rt.close()
    assert np.isfinite(want)


def test_int4_sibling_derived_through_another_path(home, tmp_path, tiny_dirs):
    """The 4-bit sibling of a float32 bundle made from the same content under another
    fingerprint (its source since moved away) is derived from the model at hand, under the
    fingerprint the float32 bundle recorded."""
    src = shutil.copytree(tiny_dirs["llama"], tmp_path / "converted")
    (src / "softprompt_fingerprint.json").write_text(json.dumps({"fingerprint": "e" * 64}))
    fp32 = bundle_for(src, dtype="float32")
    snapshot = shutil.copytree(src, tmp_path / "snapshot",
                               ignore=shutil.ignore_patterns("softprompt_fingerprint.json"))
    shutil.rmtree(src)
    int4 = bundle_for(snapshot, weights="int4")
    assert int4 == fp32.with_name(fp32.name + "-int4")
    assert json.loads((int4 / "bundle.json").read_text())["fingerprint"] == "e" * 64
