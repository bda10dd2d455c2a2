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


def test_bad_prompts_and_mismatches_are_one_line(tmp_path, tiny_dirs, tiny_llama_bundle):
    from softprompt.cli import main

    kv = tmp_path / "kv"
    kv.mkdir()
    (kv / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(kv), "--model", str(tiny_dirs["llama"])])
    msg = str(e.value)
    assert msg.startswith("softprompt inspect: ") and "no adapter_model.safetensors" in msg and "\n" not in msg
    SoftPrompt.random(3, 32).save_peft(tmp_path / "small")
    with pytest.raises(SystemExit, match="has hidden size 32 but model .* has 64: pass the model"):
        main(["inspect", str(tmp_path / "small"), "--model", str(tiny_dirs["llama"])])
    gpt2_kv(4).save_peft(tmp_path / "gpt2kv")  # 4 K/V heads; the tiny llama has 2
    with pytest.raises(SystemExit, match=r"has 2 layers x 4 K/V heads x head size 16 but model .* "
                                         r"has 2 x 2 x 16: pass the model it was trained for"):
        main(["inspect", str(tmp_path / "gpt2kv"), "--model", str(tiny_dirs["llama"])])
    with pytest.raises(SystemExit, match="is an exported bundle: a K/V prompt is inspected by running"):
        main(["inspect", str(tmp_path / "gpt2kv"), "--model", str(tiny_llama_bundle)])
    with pytest.raises(SystemExit, match="--compare compares two embedding prompts"):
        main(["inspect", str(tmp_path / "gpt2kv"), "--compare", str(tmp_path / "small"),
              "--model", str(tiny_dirs["gpt2"])])


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


# ------------------------------------------------------------------------------ K/V prompts
SAMPLE = "the movie was very good"


def random_kv(model_dir, P: int = 5, seed: int = 0, std: float = 1.0, name: str = "kv"):
    """A KVPrompt of the model's geometry from a seeded normal array."""
    from softprompt.models import ModelSpec, load_model
    from softprompt.runtime.prompt_kinds import KVPrompt

    spec = ModelSpec.from_model(load_model(str(model_dir)).model)
    rng = np.random.default_rng(seed)
    shape = (spec.num_layers, spec.num_kv_heads, P, spec.head_dim)
    return KVPrompt(rng.standard_normal(shape, dtype=np.float32) * std,
                    rng.standard_normal(shape, dtype=np.float32) * std, name=name)


def gpt2_kv(P: int, seed: int = 1):
    """A KVPrompt of the tiny gpt2's geometry (2 layers x 4 heads x 16), without loading it."""
    from softprompt.runtime.prompt_kinds import KVPrompt

    rng = np.random.default_rng(seed)
    return KVPrompt(rng.standard_normal((2, 4, P, 16), dtype=np.float32),
                    rng.standard_normal((2, 4, P, 16), dtype=np.float32), name="gpt2kv",
                    peft_type="CARTRIDGE")


def _norms(x) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: mean and max over heads and positions, per-head mean and max, of the L2
    norms of x [N, H, n, D] (straight numpy, float64)."""
    n = np.sqrt((np.asarray(x, np.float64) ** 2).sum(-1))
    return n.mean((1, 2)), n.max((1, 2)), n.mean(2), n.max(2)


def _check_norms(layers: list, key: str, x) -> None:
    mean, mx, head_mean, head_max = _norms(x)
    np.testing.assert_allclose([r[key]["mean"] for r in layers], mean, rtol=1e-6)
    np.testing.assert_allclose([r[key]["max"] for r in layers], mx, rtol=1e-6)
    np.testing.assert_allclose([r[key]["per_head_mean"] for r in layers], head_mean, rtol=1e-6)
    np.testing.assert_allclose([r[key]["per_head_max"] for r in layers], head_max, rtol=1e-6)


def test_kv_norms_equal_a_direct_computation(tiny_dirs):
    """The prompt's norms against numpy; the model's own against its layer-0 key and value
    projections computed by hand (RoPE rotates the keys but keeps their norms)."""
    model = str(tiny_dirs["llama"])
    kv = random_kv(model, P=5, std=0.5)
    handle = ip.ModelHandle(model)
    r = ip.inspect_kv(kv, handle, SAMPLE)
    assert (r["kind"], r["num_virtual_tokens"], r["num_layers"], r["num_kv_heads"], r["head_dim"]) == \
        ("prefix_tuning", 5, 2, 2, 16)
    assert [x["layer"] for x in r["layers"]] == [0, 1]
    _check_norms(r["layers"], "key_norm", kv.keys)
    _check_norms(r["layers"], "value_norm", kv.values)

    lm = handle.lm()
    ids = lm.tokenizer(SAMPLE)["input_ids"]
    assert r["sample_tokens"] == len(ids) >= 3
    attn = lm.model.model.layers[0].self_attn
    with torch.no_grad():
        x = lm.model.model.layers[0].input_layernorm(lm.model.model.embed_tokens(torch.tensor(ids)))
        k = attn.k_proj(x).view(len(ids), 2, 16).transpose(0, 1).double().numpy()  # [H, T, D]
        v = attn.v_proj(x).view(len(ids), 2, 16).transpose(0, 1).double().numpy()
    _check_norms(r["layers"][:1], "model_key_norm", k[None])
    _check_norms(r["layers"][:1], "model_value_norm", v[None])
    # layer 1 against the model's own cache, read back from a plain forward
    keys, values = ip.model_kv(lm, ids)
    assert keys.shape == values.shape == (2, 2, len(ids), 16)
    np.testing.assert_allclose(np.linalg.norm(keys[0], axis=-1), np.linalg.norm(k, axis=-1), rtol=1e-5)
    _check_norms(r["layers"], "model_key_norm", keys)
    _check_norms(r["layers"], "model_value_norm", values)


def test_prefix_attention_equals_a_hand_computation(tiny_dirs):
    """GPT-2's first layer by hand: the sample at positions P.., its queries against the
    prefix keys then its own (causal), softmax, the weight on the first P keys per head,
    averaged over the sample's tokens."""
    model = str(tiny_dirs["gpt2"])
    kv = gpt2_kv(P=4)
    handle = ip.ModelHandle(model)
    r = ip.inspect_kv(kv, handle, SAMPLE)
    m = handle.lm().model.transformer
    ids = handle.lm().tokenizer(SAMPLE)["input_ids"]
    P, T, H, D = 4, len(ids), 4, 16
    with torch.no_grad():
        h = m.wte(torch.tensor(ids)) + m.wpe(torch.arange(P, P + T))
        q, k, _ = m.h[0].attn.c_attn(m.h[0].ln_1(h)).double().split(H * D, dim=-1)
    q, k = q.view(T, H, D).transpose(0, 1), k.view(T, H, D).transpose(0, 1)
    keys = torch.cat([torch.tensor(np.array(kv.keys[0]), dtype=torch.float64), k], dim=1)  # [H, P + T, D]
    scores = q @ keys.transpose(1, 2) / D ** 0.5  # [H, T, P + T]
    causal = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    want = weights[:, :, :P].sum(-1).mean(-1).numpy()  # [H]
    got = r["layers"][0]
    np.testing.assert_allclose(got["prefix_attention_per_head"], want, atol=1e-6)
    assert got["prefix_attention"] == pytest.approx(float(want.mean()), abs=1e-6)
    assert 0.05 < got["prefix_attention"] < 0.95  # a real mix, not a degenerate case


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_prefix_attention_of_the_models_own_kv_equals_a_plain_forward(tiny_dirs, family):
    """A prompt whose K/V are the model's own for a text: the mass the sample puts on the
    prefix equals, in one plain forward over text + sample (no cache), the attention of the
    sample's rows on the text's positions; every figure is a share in [0, 1]."""
    from softprompt.runtime.prompt_kinds import KVPrompt

    model = str(tiny_dirs[family])
    handle = ip.ModelHandle(model)
    lm = handle.lm()
    text_ids = lm.tokenizer("i liked this film and the food")["input_ids"]
    kv = KVPrompt(*ip.model_kv(lm, text_ids), name="own")
    r = ip.inspect_kv(kv, handle, SAMPLE)
    ids = lm.tokenizer(SAMPLE)["input_ids"]
    P = len(text_ids)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([text_ids + ids]), output_attentions=True)
    want = np.stack([a[0, :, P:, :P].double().sum(-1).mean(-1).numpy() for a in out.attentions])
    got = np.array([x["prefix_attention_per_head"] for x in r["layers"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    shares = got.ravel().tolist() + [x["prefix_attention"] for x in r["layers"]]
    assert all(0.0 <= s <= 1.0 for s in shares)
    # and the model's own K/V are, by construction, in the model's range
    for x in r["layers"]:
        assert 0.5 < x["key_norm"]["mean"] / x["model_key_norm"]["mean"] < 2


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    """A prefix-tuning adapter (random K/V of the tiny llama) and a prompt-tuning one."""
    root = tmp_path_factory.mktemp("kinds")
    random_kv(tiny_dirs["llama"], P=3, seed=5).save_peft(root / "prefix", str(tiny_dirs["llama"]))
    SoftPrompt.random(4, 64, seed=6, std=0.3).save_peft(root / "soft", str(tiny_dirs["llama"]))
    return root


def test_cli_kv_json_text_and_plot(adapters, tmp_path, capsys):
    from softprompt.cli import main

    png = tmp_path / "kv.png"
    assert main(["inspect", str(adapters / "prefix"), "--json", "--plot", str(png),
                 "--sample", SAMPLE]) == 0  # the model: the adapter's base model
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "prefix_tuning" and r["prompt"] == "prefix" and r["sample"] == SAMPLE
    assert set(r["layers"][0]) == {"layer", "key_norm", "value_norm", "model_key_norm",
                                   "model_value_norm", "prefix_attention",
                                   "prefix_attention_per_head"}
    assert set(r["layers"][0]["key_norm"]) == {"mean", "max", "per_head_mean", "per_head_max"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kv = ip.load_prompt(str(adapters / "prefix"))
    _check_norms(r["layers"], "key_norm", kv.keys)
    assert main(["inspect", str(adapters / "prefix"), "--sample", SAMPLE]) == 0
    text = capsys.readouterr().out
    rows = [ln.split() for ln in text.splitlines() if ln[:5].strip().isdigit()]
    assert [int(x[0]) for x in rows] == [0, 1]
    for x, layer in zip(rows, r["layers"]):
        assert x[1] == f"{layer['key_norm']['mean']:.3f}" and x[-1] == f"{layer['prefix_attention']:.3f}"
    assert "prefix attention" in text and "of the sample's attention on the prefix" in text


def test_cli_composed_and_multitask_inspect_each_part(adapters, tiny_dirs, tmp_path, capsys):
    import peft_kinds as pk

    from softprompt.cli import main

    model = str(tiny_dirs["llama"])
    png = tmp_path / "c.png"
    assert main(["inspect", str(adapters / "soft"), "text:the movie", str(adapters / "prefix"),
                 "--model", model, "--json", "--top-k", "2", "--plot", str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "composed" and [p["kind"] for p in r["parts"]] == \
        ["prompt_tuning", "text", "prefix_tuning"]
    assert r["parts"][1] == {"kind": "text", "text": "the movie", "tokens": 2}
    assert len(r["parts"][0]["virtual_tokens"]) == 4 and len(r["parts"][2]["layers"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-0.png", "c-2.png"]

    mt = pk.train_adapter(model, "multitask", tmp_path / "mt", steps=1, num_tasks=3)
    assert main(["inspect", str(mt), "--model", model, "--json", "--top-k", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "multitask_prompt_tuning"
    assert [p["prompt"] for p in r["parts"]] == ["mt/0", "mt/1", "mt/2"]
    assert main(["inspect", f"{mt}#1", "--model", model, "--json", "--top-k", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["prompt"] == "mt/1" and one["virtual_tokens"] == r["parts"][1]["virtual_tokens"]
