"""``softprompt inspect``: its numbers against a direct torch computation, PEFT's text init, the
comparison of two prompts, ``--json`` / ``--plot``, a torch-free run from a bundle, and (slow) the
shipped demo prompts on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from softprompt.runtime.prompts import SoftPrompt
from softprompt.train import inspect_prompt as ip

ROOT = Path(__file__).resolve().parent.parent


def _table(model) -> torch.Tensor:
    """The embedding module's output for every token id, float64, straight from transformers."""
    from softprompt.models import load_model

    module = load_model(model).model.get_input_embeddings()
    with torch.no_grad():
        return module(torch.arange(module.weight.shape[0])).double()


def _direct(table: torch.Tensor, emb: np.ndarray, k: int) -> dict:
    """The same figures, computed directly with torch in float64."""
    x = torch.tensor(emb, dtype=torch.float64)
    F = torch.nn.functional
    cos = F.normalize(x, dim=-1) @ F.normalize(table, dim=-1).T
    l2 = torch.cdist(x, table)
    vn = table.norm(dim=1)
    pn = x.norm(dim=1)
    c_val, c_id = cos.topk(k, dim=1)
    d_val, d_id = (-l2).topk(k, dim=1)
    return dict(cos_id=c_id.numpy(), cos=c_val.numpy(), l2_id=d_id.numpy(), l2=-d_val.numpy(),
                norm=pn.numpy(), pct=((vn[None] < pn[:, None]).double().mean(1) * 100).numpy(),
                table=table.numpy())


def _check(report: dict, want: dict) -> None:
    toks = report["virtual_tokens"]
    np.testing.assert_array_equal([[n["id"] for n in t["nearest"]] for t in toks], want["cos_id"])
    np.testing.assert_array_equal([[n["id"] for n in t["nearest_l2"]] for t in toks], want["l2_id"])
    np.testing.assert_allclose([[n["cosine"] for n in t["nearest"]] for t in toks], want["cos"], atol=1e-9)
    np.testing.assert_allclose([[n["l2"] for n in t["nearest_l2"]] for t in toks], want["l2"], atol=1e-6)
    np.testing.assert_allclose([t["norm"] for t in toks], want["norm"], rtol=1e-12)
    np.testing.assert_allclose([t["norm_percentile"] for t in toks], want["pct"], atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: the table carries sqrt(E)
def test_nearest_tokens_norms_and_percentiles_equal_a_direct_computation(tiny_dirs, family):
    model = str(tiny_dirs[family])
    vocab = ip.load_vocab(model)
    emb = SoftPrompt.random(6, vocab.table.shape[1], seed=3, std=0.3).embeddings.copy()
    emb[2] = vocab.table[17]  # a virtual token that is exactly a vocabulary row
    prompt = SoftPrompt(emb, name="p")
    report = ip.inspect(prompt, vocab, k=4)
    want = _direct(_table(model), emb, 4)
    np.testing.assert_allclose(vocab.table, want["table"], atol=1e-6)
    _check(report, want)
    t = report["virtual_tokens"][2]
    assert t["nearest"][0]["id"] == 17 and t["nearest"][0]["cosine"] == pytest.approx(1.0)
    assert t["nearest_l2"][0]["id"] == 17 and t["nearest_l2"][0]["l2"] == pytest.approx(0.0, abs=1e-5)
    assert t["nearest"][0]["token"] == vocab.tokenizer.decode([17])
    assert report["vocab_norm"]["median"] == pytest.approx(float(np.median(np.linalg.norm(want["table"], axis=1))))


@pytest.fixture(scope="module")
def text_init_adapter(tiny_dirs, tmp_path_factory):
    """An untrained PEFT PROMPT_TUNING adapter with TEXT init, saved by PEFT itself."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.models import load_model

    model = str(tiny_dirs["llama"])
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7,
                             prompt_tuning_init="TEXT", prompt_tuning_init_text="the movie was good",
                             tokenizer_name_or_path=model)
    pm = get_peft_model(load_model(model).model, cfg)
    out = tmp_path_factory.mktemp("adapter") / "init"
    pm.peft_config["default"].base_model_name_or_path = model
    pm.save_pretrained(str(out), save_embedding_layers=False)
    return out


def test_distance_from_the_text_init_follows_peft(text_init_adapter):
    prompt = ip.load_prompt(str(text_init_adapter))
    vocab = ip.load_vocab(ip.default_model(prompt))  # the adapter's base model, a local path
    report = ip.inspect(prompt, vocab, k=3)
    assert report["init_text"] == "the movie was good"
    inits = [t["init"] for t in report["virtual_tokens"]]
    # PEFT's TEXT init: the text's ids with special tokens (BOS here), repeated to P
    ids = vocab.tokenizer.encode("the movie was good").ids
    assert [i["id"] for i in inits] == (ids * 7)[:7]
    assert all(i["l2"] == 0.0 and i["cosine"] == pytest.approx(1.0) for i in inits)
    assert [t["nearest"][0]["id"] for t in report["virtual_tokens"]] == (ids * 7)[:7]
    assert report["init_distance"]["mean_l2"] == 0.0


def test_compare_two_prompts(tiny_dirs):
    a = SoftPrompt.random(5, 64, seed=1, name="a")
    b = SoftPrompt(a.embeddings[:4] + 0.1 * SoftPrompt.random(4, 64, seed=2).embeddings, name="b")
    r = ip.inspect(a, ip.load_vocab(str(tiny_dirs["llama"])), k=2, other=b)["compare"]
    x, y = a.embeddings[:4].astype(np.float64), b.embeddings.astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert r["with"] == "b" and r["compared_tokens"] == 4
    np.testing.assert_allclose([p["cosine"] for p in r["per_token"]], cos, atol=1e-12)
    np.testing.assert_allclose([p["l2"] for p in r["per_token"]], np.linalg.norm(x - y, axis=1), atol=1e-12)
    assert r["mean_cosine"] == pytest.approx(cos.mean())
    assert r["cosine"] == pytest.approx(float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y)))
    same = ip.compare(a.embeddings, a.embeddings)
    assert same["cosine"] == pytest.approx(1.0) and same["relative_difference"] == 0.0


def test_cli_json_text_and_plot(text_init_adapter, tmp_path, capsys):
    from softprompt.cli import main

    png = tmp_path / "p.png"
    assert main(["inspect", str(text_init_adapter), "--json", "--top-k", "3", "--plot", str(png),
                 "--compare", str(text_init_adapter)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in r["virtual_tokens"]] == list(range(7))
    t = r["virtual_tokens"][0]
    assert set(t) >= {"index", "norm", "norm_percentile", "nearest", "nearest_l2", "init"}
    assert set(t["nearest"][0]) == {"id", "token", "cosine"} and len(t["nearest"]) == 3
    assert r["compare"]["cosine"] == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(text_init_adapter), "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "init: 7 virtual tokens on" in text and "text init 'the movie was good'" in text
    assert len([ln for ln in text.splitlines() if ln[:2].strip().isdigit()]) == 7


def test_kv_prompts_and_mismatches_are_one_line(tmp_path, tiny_dirs):
    from softprompt.cli import main

    kv = tmp_path / "kv"
    kv.mkdir()
    (kv / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(kv), "--model", str(tiny_dirs["llama"])])
    msg = str(e.value)
    assert "is a PREFIX_TUNING adapter: a K/V prompt" in msg and "not served yet" in msg and "\n" not in msg
    SoftPrompt.random(3, 32).save_peft(tmp_path / "small")
    with pytest.raises(SystemExit, match="has hidden size 32 but model .* has 64: pass the model"):
        main(["inspect", str(tmp_path / "small"), "--model", str(tiny_dirs["llama"])])


BLOCK = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors", "peft"):
                raise ImportError(f"{name} is blocked: inspect from a bundle must run without it")
            return None

    sys.meta_path.insert(0, Refuse())
    from softprompt.cli import main
    main(["inspect", sys.argv[1], "--model", sys.argv[2], "--json", "--top-k", "4"])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
""")


def test_torch_free_from_a_bundle_gives_the_same_report(tiny_llama_bundle, tiny_dirs, tmp_path):
    prompt = SoftPrompt.random(5, 64, seed=4, std=0.2)
    prompt.save_peft(tmp_path / "p")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", BLOCK, str(tmp_path / "p"), str(tiny_llama_bundle)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    want = ip.inspect(ip.load_prompt(str(tmp_path / "p")), ip.load_vocab(str(tiny_dirs["llama"])), k=4)
    for g, w in zip(got["virtual_tokens"], want["virtual_tokens"]):
        assert [n["id"] for n in g["nearest"]] == [n["id"] for n in w["nearest"]]
        assert [n["token"] for n in g["nearest"]] == [n["token"] for n in w["nearest"]]
        np.testing.assert_allclose([n["cosine"] for n in g["nearest"]], [n["cosine"] for n in w["nearest"]], atol=1e-6)
        assert g["norm_percentile"] == pytest.approx(w["norm_percentile"])


@pytest.mark.slow
def test_demo_prompts_on_the_default_model(capsys):
    """The shipped demo prompts: nearest tokens per virtual token printed, and the numbers
    equal a direct computation."""
    from softprompt.cli import main
    from softprompt.runtime.demo import PROMPTS_DIR

    vocab, table = ip.load_vocab("default"), _table("default")
    for task in ("sentiment", "topic"):
        assert main(["inspect", str(PROMPTS_DIR / task), "--top-k", "3"]) == 0
        text = capsys.readouterr().out
        rows = [ln for ln in text.splitlines() if ln[:2].strip().isdigit()]
        assert len(rows) == 20 and "on SmolLM2-135M-Instruct" in text
        prompt = ip.load_prompt(str(PROMPTS_DIR / task))
        report = ip.inspect(prompt, vocab, k=3)
        _check(report, _direct(table, prompt.embeddings, 3))
        for ln, t in zip(rows, report["virtual_tokens"]):
            assert repr(t["nearest"][0]["token"]) in ln and f"{t['norm']:7.3f}" in ln
    args = SimpleNamespace(prompt=str(PROMPTS_DIR / "sentiment"), compare=str(PROMPTS_DIR / "topic"),
                           model=None, top_k=1, plot=None, json=True)
    assert ip.main(args) == 0
    r = json.loads(capsys.readouterr().out)["compare"]
    assert r["compared_tokens"] == 20 and -1 <= r["cosine"] < 1
