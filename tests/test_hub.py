"""Hub ids for models and adapters, from a local hub-style cache the test builds (HF_HUB_OFFLINE=1).

The cache has the layout huggingface_hub writes (``models--owner--name/{blobs,refs,snapshots}``,
snapshot files linked to content-addressed blobs), so resolution runs huggingface_hub's own
offline code path; nothing reaches a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from softprompt.models import hub
from softprompt.models import loading as models
from softprompt.runtime.api import Runtime
from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
from softprompt.runtime.requests import Tokenizer
from tiny import HIDDEN

COMMIT = {"main": "a" * 40, "v2": "b" * 40}
IDS = {"prompt": "p", "context": [5, 9, 17, 4], "continuation": [11, 3]}


def add_to_cache(cache: Path, repo_id: str, files: Path, revision: str = "main") -> Path:
    """Put the files of directory ``files`` into ``cache`` as revision ``revision`` of
    ``repo_id``, the way huggingface_hub stores a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = COMMIT[revision]
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # relative spellings of hub ids are no local paths here
    return root


@pytest.fixture
def adapter_dir(tmp_path):
    return SoftPrompt.random(5, HIDDEN, seed=7, std=0.5).save_peft(tmp_path / "adapter")


def test_spelling_of_hub_ids():
    assert hub.parse("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        ("HuggingFaceTB/SmolLM2-135M-Instruct", None, None)
    assert hub.parse("owner/repo/model.Q4_K_M.gguf@v1") == ("owner/repo", "model.Q4_K_M.gguf", "v1")
    for path in ("default", "gpt2", "./a/b", "/a/b", "~/a/b", "a/b/c", "x.gguf", "d/p.safetensors"):
        assert hub.parse(path) is None, path


def test_model_hub_id_loads_from_the_cache_offline(cache, tiny_dirs):
    add_to_cache(cache, "someone/tiny-llama", tiny_dirs["llama"])
    lm = models.load_model("someone/tiny-llama")
    assert lm.source == "someone/tiny-llama" and lm.config.model_type == "llama"
    assert lm.fingerprint == models.load_model(tiny_dirs["llama"]).fingerprint  # same files
    rt = Runtime.load("someone/tiny-llama", backend="torch")
    local = Runtime.load(tiny_dirs["llama"], backend="torch")
    for r in (rt, local):
        r.add_prompt("p", SoftPrompt.random(4, HIDDEN, seed=1, std=0.5))
    a, b = rt.score([IDS, {**IDS, "context": "the movie was good"}]), local.score(
        [IDS, {**IDS, "context": "the movie was good"}])
    assert [x.logprob for x in a] == [x.logprob for x in b]


def test_revision_selects_the_snapshot(cache, tiny_dirs):
    add_to_cache(cache, "someone/tiny", tiny_dirs["llama"], "main")
    add_to_cache(cache, "someone/tiny", tiny_dirs["qwen2"], "v2")
    assert models.load_model("someone/tiny").config.model_type == "llama"
    assert models.load_model("someone/tiny@v2").config.model_type == "qwen2"
    assert models.load_model("someone/tiny", revision="v2").config.model_type == "qwen2"
    with pytest.raises(models.ModelError, match="names revision 'v2' but revision='main'"):
        models.load_model("someone/tiny@v2", revision="main")
    rt = Runtime.load("someone/tiny", backend="reference", revision="v2")
    assert rt.backend.model.config.model_type == "qwen2"


def test_local_path_wins_over_the_hub_id(cache, tiny_dirs, tmp_path):
    add_to_cache(cache, "someone/tiny", tiny_dirs["llama"])
    shutil.copytree(tiny_dirs["gpt2"], tmp_path / "someone" / "tiny")  # cwd is tmp_path
    assert models.load_model("someone/tiny").config.model_type == "gpt2"


def test_missing_model_id_offline_is_one_line_naming_how_to_fetch(cache):
    with pytest.raises(models.ModelError) as e:
        models.load_model("someone/not-cached@v3")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model 'someone/not-cached@v3' is not a local path and not in the "
                          f"Hugging Face cache ({cache})")
    assert "HF_HUB_OFFLINE" in msg and "`hf download someone/not-cached --revision v3`" in msg


def test_hub_repo_that_is_not_a_model(cache, adapter_dir):
    add_to_cache(cache, "someone/an-adapter", adapter_dir)
    with pytest.raises(models.ModelError,
                       match="hub model 'someone/an-adapter' has no config.json"):
        models.load_model("someone/an-adapter")


def test_adapter_hub_id(cache, tiny_dirs, adapter_dir):
    add_to_cache(cache, "someone/my-prompt-tuning-adapter", adapter_dir)
    sp = SoftPrompt.load("someone/my-prompt-tuning-adapter")
    assert sp.name == "my-prompt-tuning-adapter"
    assert sp.digest == SoftPrompt.load(adapter_dir).digest
    rt = Runtime.load(tiny_dirs["llama"], backend="torch")
    rt.add_prompt("hub", "someone/my-prompt-tuning-adapter@main")
    rt.add_prompt("local", adapter_dir)
    hub_r, local_r = rt.score([{**IDS, "prompt": "hub"}, {**IDS, "prompt": "local"}])
    assert hub_r.logprob == local_r.logprob
    with pytest.raises(SoftPromptError) as e:
        rt.add_prompt("x", "someone/missing-adapter")
    assert "\n" not in str(e.value) and str(e.value).startswith(
        "soft prompt adapter 'someone/missing-adapter' is not a local path and not in the "
        "Hugging Face cache")


def test_offline_read_at_call_time_not_import_time(cache, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # as if imported before the env was set
    assert hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()
    assert hub.cache_dir() == cache


def test_cli_and_exporter_take_hub_ids(cache, tiny_dirs, adapter_dir, tmp_path):
    from softprompt.cli import main

    add_to_cache(cache, "someone/tiny-llama", tiny_dirs["llama"])
    add_to_cache(cache, "someone/adapter", adapter_dir)
    (tmp_path / "in.jsonl").write_text(json.dumps({**IDS, "prompt": "s"}) + "\n")
    assert main(["score", "someone/tiny-llama", "--backend", "torch", "--prompt",
                 "s=someone/adapter", "-i", str(tmp_path / "in.jsonl"),
                 "-o", str(tmp_path / "out.jsonl")]) == 0
    got = json.loads((tmp_path / "out.jsonl").read_text())
    rt = Runtime.load(tiny_dirs["llama"], backend="torch")
    rt.add_prompt("s", adapter_dir)
    assert got["logprob"] == pytest.approx(rt.score([{**IDS, "prompt": "s"}])[0].logprob,
                                           abs=1e-6)

    from softprompt.export import export, load_bundle

    out = export("someone/tiny-llama", tmp_path / "bundle", progress=False)
    bundle = load_bundle(out)
    assert bundle.manifest["source"] == "someone/tiny-llama"
    tok = Tokenizer.for_bundle(bundle)  # BOS/EOS as the tokenizer declares them, torch-free
    assert (tok.bos_token_id, tok.eos_token_id, tok.prefix_token_id) == (1, 2, 1)
    assert bundle.fingerprint == models.load_model(tiny_dirs["llama"]).fingerprint
    assert torch.equal(torch.from_numpy(bundle.embeddings[:3].copy()),
                       models.load_model(tiny_dirs["llama"]).model.get_input_embeddings()
                       .weight[:3])


def test_single_gguf_file_of_a_repository(cache, tmp_path):
    files = tmp_path / "gguf_repo"
    files.mkdir()
    (files / "model.Q4_K_M.gguf").write_bytes(b"GGUF stand-in")  # resolved, not converted here
    add_to_cache(cache, "someone/models-gguf", files)
    path = hub.resolve("someone/models-gguf/model.Q4_K_M.gguf", error=models.ModelError)
    assert path.name == "model.Q4_K_M.gguf" and path.read_bytes() == b"GGUF stand-in"
    with pytest.raises(models.ModelError, match=r"fetch it first with `hf download "
                                                r"someone/models-gguf other.gguf`"):
        models.load_model("someone/models-gguf/other.gguf")
