"""export/: ONNX bundles whose input is embeddings, checked against PyTorch and transformers.

Each tiny family is exported once per session (conftest ``tiny_bundles``); the default
model once more (slow).
"""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from tolerances import ONNX

from softprompt.export import BundleError, ExportValidationError, export, load_bundle
from softprompt.export import cli as export_cli
from softprompt.export.validate import VALIDATION_ATOL, VALIDATION_CASES, clip_case, validate_bundle
from softprompt.export.wrapper import ExportWrapper
from softprompt.models import ModelError, load_model
from softprompt.runtime.prompts import SoftPrompt
from tiny import FAMILIES, make_tiny_model

ATOL = ONNX["float32"]["atol"]


def plain_logits(model, prompt: np.ndarray, ids) -> np.ndarray:
    """transformers on ``[prompt, embed(ids)]`` in float32: logits of the request tokens."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([torch.tensor(prompt), emb(torch.tensor(ids))])[None]
        return model(inputs_embeds=embeds).logits[0, len(prompt):].numpy()


def check_mixed_batch(bundle, model, prompts, id_lists, atol):
    """Prompts of different lengths and requests of different lengths in one batch: the
    prefix use (past 0, rows right-padded), the request use on that padded prefix, and a
    decode step must each match plain transformers on the row alone."""
    B, P, L = len(prompts), max(len(p) for p in prompts), max(len(i) for i in id_lists)
    p_rows = np.array([len(p) for p in prompts])
    l_rows = np.array([len(i) for i in id_lists])
    embeds = np.zeros((B, P, bundle.hidden_size), np.float32)
    ids = np.zeros((B, L), np.int64)
    for b, (p, i) in enumerate(zip(prompts, id_lists)):
        embeds[b, :len(p)], ids[b, :len(i)] = p, i
    mask = (np.arange(P) < p_rows[:, None]).astype(np.int64)
    _, past = bundle.run(embeds, mask, np.tile(np.arange(P), (B, 1)), bundle.empty_past(B),
                         (p_rows - 1)[:, None])
    mask = np.concatenate([mask, np.arange(L) < l_rows[:, None]], 1).astype(np.int64)
    logits, past = bundle.run(bundle.embed(ids), mask, p_rows[:, None] + np.arange(L),
                              past, np.tile(np.arange(L), (B, 1)))
    nxt = np.array([int(np.argmax(logits[b, l_rows[b] - 1])) for b in range(B)])
    mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
    step, _ = bundle.run(bundle.embed(nxt[:, None]), mask, (p_rows + l_rows)[:, None], past,
                         np.zeros((B, 1), np.int64))
    for b in range(B):
        want = plain_logits(model, prompts[b], list(id_lists[b]) + [int(nxt[b])])
        np.testing.assert_allclose(logits[b, :l_rows[b]], want[:-1], atol=atol, rtol=0)
        np.testing.assert_allclose(step[b, 0], want[-1], atol=atol, rtol=0)


def test_validation_tolerance_is_the_table():
    assert VALIDATION_ATOL == {k: v["atol"] for k, v in ONNX.items()}
    assert set(VALIDATION_CASES) >= {(3, 9, 20), (1, 1, 1), (8, 32, 100)}


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest(family, tiny_bundles, tiny_dirs):
    bundle = load_bundle(tiny_bundles[family])
    m, cfg = bundle.manifest, load_model(tiny_dirs[family]).model.config
    assert (m["model_type"], m["num_layers"], m["hidden_size"], m["vocab_size"]) == \
        (family, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert (bundle.num_heads, bundle.head_dim) == (4, 16)
    assert bundle.num_kv_heads == {"llama": 2, "gpt2": 4, "qwen2": 1, "gemma": 4}[family]
    assert bundle.eos_token_ids == [2] and m["bos_token_id"] == 1
    assert {"model.onnx", "model.onnx.data", "embeddings.npy", "tokenizer.json",
            "tokenizer_config.json"} <= set(m["files"])
    assert m["validation"]["passed"] and m["validation"]["max_abs_request"] <= ATOL
    assert set(m["versions"]) == {"torch", "transformers", "onnx", "onnxruntime", "softprompt"}
    assert [i.name for i in bundle.session.get_inputs()][:3] == \
        ["inputs_embeds", "attention_mask", "position_ids"]
    assert bundle.session.get_outputs()[1].shape == ["batch", bundle.num_kv_heads,
                                                     "total_sequence", 16]
    assert bundle.embeddings.shape == (96, 64) and bundle.embeddings.dtype == np.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_three_uses_on_fresh_shapes(family, tiny_bundles, tiny_dirs):
    wrapper = ExportWrapper(load_model(tiny_dirs[family]).model)
    figures = validate_bundle(wrapper, load_bundle(tiny_bundles[family]),
                              cases=((2, 5, 7), (4, 3, 2)), seed=1)
    assert figures["passed"] and figures["max_abs_reference"] <= ATOL


def test_validation_clips_shapes_to_max_positions(tiny_bundles, tiny_dirs):
    assert clip_case(8, 32, 100, 256) == (8, 32, 100)
    b, seq, prefix = clip_case(2, 300, 200, 256)  # tiny gpt2 has n_positions=256
    assert prefix + seq + 1 <= 256 and seq >= 1 and prefix >= 1
    wrapper = ExportWrapper(load_model(tiny_dirs["gpt2"]).model)
    figures = validate_bundle(wrapper, load_bundle(tiny_bundles["gpt2"]), cases=((2, 300, 200),))
    assert figures["cases"] == [[b, seq, prefix]]


def test_validation_raises_on_a_different_model(tiny_bundles, tmp_path):
    other = load_model(make_tiny_model("llama", tmp_path / "other", seed=1)).model
    with pytest.raises(ExportValidationError, match="differ by"):
        validate_bundle(ExportWrapper(other), load_bundle(tiny_bundles["llama"]),
                        cases=((2, 3, 4),))


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_prompt_made_after_export_is_a_graph_input(family, tiny_bundles, tiny_dirs):
    bundle, model = load_bundle(tiny_bundles[family]), load_model(tiny_dirs[family]).model
    std = float(bundle.embeddings.std())
    prompts = [SoftPrompt.random(6, 64, seed=3, std=std).embeddings,
               SoftPrompt.random(11, 64, seed=4, std=std).embeddings]
    ids = bundle.tokenizer.encode("the movie was really good").ids
    check_mixed_batch(bundle, model, prompts[:1], [ids], ATOL)  # one row alone
    check_mixed_batch(bundle, model, prompts, [ids, [7, 9, 11]], ATOL)  # padded rows


def test_tampered_bundle_is_refused(tiny_bundles, tmp_path):
    src = tiny_bundles["llama"]

    def copy():
        dst = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, dst)
        return dst

    for name in ("tokenizer.json", "model.onnx", "embeddings.npy"):
        b = copy()
        data = bytearray((b / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (b / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=rf"{name}: sha256"):
            load_bundle(b)
    b = copy()
    (b / "embeddings.npy").unlink()
    with pytest.raises(BundleError, match=r"embeddings.npy: file missing"):
        load_bundle(b)
    # the big weights file too: hashed on a bundle's first load, and always with verify="full"
    b = copy()
    data = bytearray((b / "model.onnx.data").read_bytes())
    data[100] ^= 0x01
    (b / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx.data: sha256"):
        load_bundle(b)
    with pytest.raises(BundleError, match=r"model.onnx.data: sha256"):
        load_bundle(b, verify="full")
    (b / "model.onnx.data").write_bytes(bytes(data[:-4]))
    with pytest.raises(BundleError, match=r"model.onnx.data: size"):
        load_bundle(b)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, vocab_size=96).save_pretrained(tmp_path / "neox")
    with pytest.raises(ModelError, match="gpt_neox.*not supported.*llama, gpt2, qwen2, gemma"):
        export(tmp_path / "neox", tmp_path / "out", progress=False)


def test_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tiny_dirs, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(tiny_dirs["llama"], tmp_path, progress=False)


def test_fp16_export_is_validated_against_float32(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["llama"])  # a LoadedModel is accepted and left as it was
    out = export(lm, tmp_path / "b", progress=False, dtype="fp16")
    assert next(lm.model.parameters()).dtype == torch.float32
    bundle = load_bundle(out)
    v = bundle.manifest["validation"]
    assert v["passed"] and v["cases"] == [list(c) for c in VALIDATION_CASES]
    assert bundle.np_dtype == np.float16 and v["atol"] == ONNX["float16"]["atol"]
    assert "top-1 log-probs" in v["metric"]  # against the float32 model
    assert bundle.session.get_inputs()[0].type == "tensor(float16)"
    assert bundle.session.get_outputs()[0].type == "tensor(float)"


def test_cli_exports_with_optimize(tiny_dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="softprompt")
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tiny_dirs["gpt2"]), str(tmp_path / "b"),
                              "--optimize", "--quiet"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert manifest["optimized"] and manifest["validation"]["passed"]
    args = parser.parse_args(["export", str(tmp_path / "missing"), str(tmp_path / "c"), "--quiet"])
    assert args.func(args) == 1 and "is not a model" in capsys.readouterr().err


# --------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory):
    out = export("default", tmp_path_factory.mktemp("default") / "bundle", progress=False)
    return load_bundle(out)


@pytest.mark.slow
def test_default_model_end_to_end(default_bundle):
    v = default_bundle.manifest["validation"]
    assert v["passed"] and [8, 32, 100] in v["cases"]
    lm = load_model("default")
    tok = default_bundle.tokenizer
    # two prompts that did not exist at export time, P=20 and P=100, in one mixed batch
    std = float(np.asarray(default_bundle.embeddings[:4096]).std())
    prompts = [SoftPrompt.random(20, 576, seed=11, std=std).embeddings,
               SoftPrompt.from_text("Classify the sentiment of the review.", lm, 100).embeddings]
    ids = [tok.encode("The film was a delight from start to finish.").ids,
           tok.encode("Terrible service.").ids]
    check_mixed_batch(default_bundle, lm.model, prompts, ids, ATOL)


@pytest.mark.slow
def test_default_bundle_scores_like_reference(default_bundle):
    """Issue 3 done-when: prompts made after export (P=20, P=100), one mixed batch through the
    Runtime's onnx backend, within 1e-2 of the reference backend on each request alone."""
    from softprompt.runtime.api import Runtime

    onnx_rt = Runtime.load(str(default_bundle.path), backend="onnx")
    ref = Runtime.load("default", backend="reference")
    std = float(np.asarray(default_bundle.embeddings[:4096]).std())
    prompts = {"p20": SoftPrompt.random(20, 576, seed=3, std=std),
               "p100": SoftPrompt.random(100, 576, seed=4, std=std)}
    for rt in (onnx_rt, ref):
        for name, sp in prompts.items():
            rt.add_prompt(name, sp)
    reqs = [{"prompt": "p20", "context": "The film was a delight.", "continuation": " Loved it."},
            {"prompt": "p100", "context": "Terrible service and cold food.", "continuation": " Never again."},
            {"prompt": "p100", "context": "The match ended in a draw"},
            {"prompt": "p20", "context": "Q: What is 2+2?\nA:", "continuation": " 4"}]
    got = onnx_rt.score(reqs)
    for g, r in zip(got, reqs):
        w = ref.score([r])[0]
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=ATOL, rtol=0)
    assert onnx_rt.stats()["misses"] == 2  # each prefix computed once, at add_prompt


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_attention_equals_transformers_eager(groups):
    """The attention traced into GQA graphs computes transformers' eager attention (K/V repeated
    per group) without repeating K/V, on a padded additive mask."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from softprompt.export.wrapper import attention_bias, grouped_attention

    g = torch.Generator().manual_seed(groups)
    b, hkv, s, past, d = 2, 2, 5, 7, 16
    q = torch.randn(b, hkv * groups, s, d, generator=g)
    k, v = (torch.randn(b, hkv, past + s, d, generator=g) for _ in range(2))
    mask = torch.ones(b, past + s, dtype=torch.long)
    mask[1, :3] = 0  # a padded prefix row
    bias = attention_bias(mask, past, s, torch.float32)
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    want, _ = eager_attention_forward(module.eval(), q, k, v, bias, scaling=d**-0.5)
    got, _ = grouped_attention(module, q, k, v, bias, scaling=d**-0.5)
    assert got.shape == (b, s, hkv * groups, d)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gqa_graphs_do_not_repeat_keys_and_values(tiny_bundles):
    """llama and qwen2 (grouped K/V heads) are exported with grouped_attention: no per-layer
    Expand of K and V; gemma (here one K/V head per query head) keeps its own."""
    import onnx

    for family in ("llama", "qwen2"):
        graph = onnx.load(str(tiny_bundles[family] / "model.onnx"), load_external_data=False)
        expands = sum(n.op_type == "Expand" for n in graph.graph.node)
        assert expands < 2, f"{family}: {expands} Expand nodes"  # was 2 per layer (K and V)
