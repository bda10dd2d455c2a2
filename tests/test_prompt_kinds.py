"""Every PEFT prompt-learning type, served from one prefix cache, equal to PEFT's own forward.

PEFT itself trains an adapter of every type on a tiny config of every family (a few optimizer
steps, ``save_pretrained``; tests/peft_kinds.py); the runtime loads it by path (and by a
hub-style cache id) and must match PEFT's forward on that request alone — scores, first tokens,
greedy generations (PEFT's forward applied token by token) — on every backend, with every type
mixed in one batch. Composed prompts equal PEFT with the text's ids placed first; inline prompts
equal their registered twins and are cached by content.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_kinds import (KINDS, PREFIX_KINDS, float64, peft_first_logprob, peft_greedy,
                        peft_logprobs, train_adapter)
from test_hub import add_to_cache
from tiny import FAMILIES
from tolerances import ONNX, SCORE, SCORE_DEFAULT_MODEL

from softprompt import ComposedPrompt, KVPrompt, Runtime, SoftPrompt, SoftPromptError
from softprompt.runtime.requests import RequestError

TOL = SCORE["float32"]["atol"]
BACKENDS = ("reference", "torch", "onnx")
CTX = [5, 9, 17, 4, 22, 8, 13]
TASKS = (1, 2)  # multitask: two of its three tasks (task 0 is what a wrong index would read)


@pytest.fixture(scope="session")
def adapters(tiny_dirs, tmp_path_factory):
    """{(family, kind): adapter dir} trained by PEFT once per session."""
    root = tmp_path_factory.mktemp("kinds")
    return {(f, k): train_adapter(tiny_dirs[f], k, root / f / k) for f in FAMILIES for k in KINDS}


def names(kind: str) -> list[tuple[str, int | None]]:
    """(registered name, multitask task id) of each prompt an adapter of ``kind`` registers
    (as tested here)."""
    return [(f"{kind}/{t}", t) for t in TASKS] if kind == "multitask" else [(kind, None)]


def load(family, backend, tiny_dirs, tiny_bundles) -> Runtime:
    model = tiny_bundles[family] if backend == "onnx" else tiny_dirs[family]
    return Runtime.load(str(model), backend=backend)


def want_scores(model_dir, adapter, kind, task, ids, prefix_ids=()) -> np.ndarray:
    """PEFT's log-probs of every token of ``ids`` it can score: the first one only when the
    prompt's last computed position predicts it (embedding kinds, or text after the prompt)."""
    lp = peft_logprobs(model_dir, adapter, ids, task_id=task, prefix_ids=prefix_ids)
    if kind in PREFIX_KINDS and not prefix_ids:
        return lp
    first = peft_first_logprob(model_dir, adapter, ids, task_id=task, prefix_ids=prefix_ids)
    return np.concatenate([[first], lp])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_type_equals_peft_in_one_mixed_batch(family, backend, adapters, tiny_dirs,
                                                    tiny_bundles):
    rt = load(family, backend, tiny_dirs, tiny_bundles)
    model_dir = tiny_dirs[family]
    for kind in KINDS:
        added = rt.add_prompt(kind, adapters[family, kind])
        if kind == "multitask":
            assert [p.name for p in added] == ["multitask/0", "multitask/1", "multitask/2"]
        assert {p.kind for p in (added if isinstance(added, list) else [added])} == {
            {"p_tuning_mlp": "p_tuning", "p_tuning_lstm": "p_tuning", "multitask":
             "multitask_prompt_tuning", "prefix_tuning_projection": "prefix_tuning"}.get(kind, kind)}
    every = [(kind, name, task) for kind in KINDS for name, task in names(kind)]
    reqs = []
    for i, (_, name, _) in enumerate(every):  # lengths differ per row: padding is exercised
        ctx = CTX[: 3 + i % 5]
        reqs += [{"prompt": name, "context": ctx},
                 {"prompt": name, "context": ctx[:2], "continuation": ctx[2:]}]
    mixed = rt.score(reqs)
    for i, (kind, name, task) in enumerate(every):
        ctx = CTX[: 3 + i % 5]
        want = want_scores(model_dir, adapters[family, kind], kind, task, ctx)
        got, cont = mixed[2 * i], mixed[2 * i + 1]
        np.testing.assert_allclose(got.token_logprobs, want, atol=TOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(cont.token_logprobs, want[-len(ctx[2:]):], atol=TOL, rtol=0,
                                   err_msg=name)
        alone = rt.score([reqs[2 * i]])[0]
        np.testing.assert_allclose(alone.token_logprobs, got.token_logprobs, atol=TOL, rtol=0)
    # greedy generation of every type in one batch: PEFT's forward applied token by token
    gens = rt.generate([name for _, name, _ in every], [CTX[:4]] * len(every),
                       max_new_tokens=4, stop_at_eos=False)
    for (kind, name, task), g in zip(every, gens):
        assert g.token_ids == peft_greedy(model_dir, adapters[family, kind], CTX[:4], 4,
                                          task_id=task), name
    rt.close()


def test_hub_ids_and_save_peft_round_trip(adapters, tiny_dirs, tmp_path, monkeypatch):
    """Every type loads by a hub-style cache id, and ``save_peft`` writes an adapter PEFT loads
    back to the same numbers (as its own type, or as PROMPT_TUNING for one task)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tiny_dirs["llama"]
    rt = Runtime.load(str(model_dir), backend="torch")
    for kind in KINDS:
        add_to_cache(cache, f"someone/{kind}", adapters["llama", kind])
        for name, task in names(kind):
            hub = f"someone/{kind}" if task is None else None
            sp = SoftPrompt.load(hub or adapters["llama", kind], task=task)
            rt.add_prompt(f"hub-{name}", sp)
            saved = sp.save_peft(tmp_path / "saved" / name.replace("/", "-"))
            want = want_scores(model_dir, adapters["llama", kind], kind, task, CTX)
            again = want_scores(model_dir, saved, kind if task is None else "prompt_tuning",
                                None, CTX)
            np.testing.assert_allclose(again, want, atol=1e-6, rtol=0, err_msg=name)
            got = rt.score([{"prompt": f"hub-{name}", "context": CTX}])[0]
            np.testing.assert_allclose(got.token_logprobs, want, atol=TOL, rtol=0, err_msg=name)
    tasks = rt.add_prompt("mt", "someone/multitask")  # a hub id registers every task too
    assert [p.name for p in tasks] == ["mt/0", "mt/1", "mt/2"]
    assert rt.prompts["mt/1"].digest == rt.prompts["hub-multitask/1"].digest
    rt.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_composed_prompts_equal_peft_with_the_text_first(backend, adapters, tiny_dirs,
                                                          tiny_bundles):
    rt = load("llama", backend, tiny_dirs, tiny_bundles)
    model_dir = tiny_dirs["llama"]
    text = "the movie was great ."
    text_ids = rt.tokenizer.encode(text, False)
    for kind in ("prompt_tuning", "prefix_tuning", "cartridge", "p_tuning_mlp"):
        sp = SoftPrompt.load(adapters["llama", kind])
        cp = rt.add_prompt(f"c-{kind}", [sp, text])
        assert isinstance(cp, ComposedPrompt) and cp.num_virtual_tokens == sp.num_virtual_tokens + len(text_ids)
        assert cp.scores_first  # the text's last token predicts the request's first
        want = want_scores(model_dir, adapters["llama", kind], kind, None, CTX, prefix_ids=text_ids)
        got = rt.score([{"prompt": f"c-{kind}", "context": CTX}])[0]
        np.testing.assert_allclose(got.token_logprobs, want, atol=TOL, rtol=0, err_msg=kind)
        gen = rt.generate(f"c-{kind}", [CTX[:4]], max_new_tokens=3, stop_at_eos=False)[0]
        assert gen.token_ids == peft_greedy(model_dir, adapters["llama", kind], CTX[:4], 3,
                                            prefix_ids=text_ids)
    # text alone: a shared system prompt, equal to the plain model on text + request
    rt.add_prompt("system", [text])
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        lp = base(input_ids=torch.tensor([text_ids + CTX])).logits[0].double().log_softmax(-1)
    want = [lp[len(text_ids) + j - 1, CTX[j]].item() for j in range(len(CTX))]
    got = rt.score([{"prompt": "system", "context": CTX}])[0]
    np.testing.assert_allclose(got.token_logprobs, want, atol=TOL, rtol=0)
    # a K/V prompt after text: K/V appended to the text's, request at positions after both
    kv = SoftPrompt.load(adapters["llama", "prefix_tuning"])
    rt.add_prompt("text-then-kv", [text, kv])
    assert not rt.prompts["text-then-kv"].scores_first
    with pytest.raises(RequestError, match="ends in K/V, which predicts no first token"):
        rt.score([{"prompt": "text-then-kv", "context": CTX[:1]}])
    rt.close()


def test_composed_and_kv_prompt_keys(adapters, tiny_dirs):
    """Equal prompts share one digest; a difference in any element never does."""
    kv = SoftPrompt.load(adapters["llama", "prefix_tuning"])
    assert isinstance(kv, KVPrompt)
    twin = KVPrompt(kv.keys.copy(), kv.values.copy())
    assert twin.digest == kv.digest
    keys = kv.keys.copy()
    keys[1, 0, 2, 3] += 1e-3
    assert KVPrompt(keys, kv.values).digest != kv.digest
    swapped = KVPrompt(kv.values, kv.keys)
    assert swapped.digest != kv.digest
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    a = rt.add_prompt("a", [kv, "the movie"])
    b = rt.add_prompt("b", [kv, "the film"])
    c = rt.add_prompt("c", ["the movie", kv])
    d = rt.add_prompt("d", [twin, "the movie"])
    assert len({a.digest, b.digest, c.digest}) == 3 and d.digest == a.digest
    emb = np.zeros((2, rt.info.hidden_size), np.float32)
    # the same numbers as embeddings and as K/V never collide
    assert SoftPrompt(emb).digest != KVPrompt(np.zeros((2, 2, 1, 16), np.float32),
                                              np.zeros((2, 2, 1, 16), np.float32)).digest
    rt.close()


@pytest.mark.parametrize("backend", ("torch", "onnx"))
def test_inline_prompts_equal_registered_and_are_cached_by_content(backend, adapters, tiny_dirs,
                                                                    tiny_bundles):
    rt = load("llama", backend, tiny_dirs, tiny_bundles)
    kv = SoftPrompt.load(adapters["llama", "prefix_tuning"])
    emb = SoftPrompt.load(adapters["llama", "prompt_tuning"])
    rt.add_prompt("kv", kv)
    rt.add_prompt("emb", emb)
    named = rt.score([{"prompt": "kv", "context": CTX}, {"prompt": "emb", "context": CTX}])
    before = rt.stats()
    inline = rt.score([{"prompt": KVPrompt(kv.keys, kv.values), "context": CTX},
                       {"prompt": emb.embeddings.copy(), "context": CTX}])
    after = rt.stats()
    for n, i in zip(named, inline):
        assert i.token_logprobs == pytest.approx(n.token_logprobs, abs=TOL)
    assert after["misses"] == before["misses"]  # equal content: the registered entries serve them
    # a new inline prompt: computed once, then a hit when sent again
    arr = np.random.default_rng(3).standard_normal((4, rt.info.hidden_size)).astype(np.float32)
    first = rt.score([{"prompt": arr, "context": CTX}])[0]
    mid = rt.stats()
    again = rt.score([{"prompt": arr.copy(), "context": CTX}])[0]
    end = rt.stats()
    assert mid["misses"] == after["misses"] + 1 and end["misses"] == mid["misses"]
    assert end["hits"] > mid["hits"] and again.token_logprobs == first.token_logprobs
    # one element different: its own entry, never the other's
    arr2 = arr.copy()
    arr2[3, 7] += 0.5
    other = rt.score([{"prompt": arr2, "context": CTX}])[0]
    assert rt.stats()["misses"] == end["misses"] + 1
    assert other.token_logprobs != first.token_logprobs
    # generation and streaming take inline prompts too
    g = rt.generate(KVPrompt(kv.keys, kv.values), [CTX[:4]], max_new_tokens=3, stop_at_eos=False)[0]
    assert g.token_ids == rt.generate("kv", [CTX[:4]], max_new_tokens=3, stop_at_eos=False)[0].token_ids
    # a bad inline prompt fails only its own request
    res = rt.score([{"prompt": np.zeros((3, 5), np.float32), "context": CTX},
                    {"prompt": "kv", "context": CTX}], errors="return")
    assert "hidden size 5" in res[0].error and res[1].error is None
    rt.close()


def test_other_peft_types_are_refused_in_one_line(tiny_dirs, tmp_path):
    from peft import AdaptionPromptConfig, LoraConfig, TaskType, get_peft_model

    from peft_kinds import load_base

    for name, cfg in (("lora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2,
                                          target_modules=["q_proj"])),
                      ("adaption", AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM,
                                                        adapter_len=3, adapter_layers=1))):
        get_peft_model(load_base(tiny_dirs["llama"]), cfg).save_pretrained(tmp_path / name)
        with pytest.raises(SoftPromptError) as e:
            SoftPrompt.load(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and "not served" in msg and "PREFIX_TUNING, CARTRIDGE" in msg


def test_kv_prompt_for_another_geometry_is_refused(adapters, tiny_dirs):
    kv = SoftPrompt.load(adapters["llama", "prefix_tuning"])  # 2 layers x 2 K/V heads x 16
    rt = Runtime.load(str(tiny_dirs["qwen2"]), backend="torch")  # 2 layers x 1 K/V head x 16
    with pytest.raises(SoftPromptError, match=r"has 2 layers x 2 K/V heads x head size 16 but the "
                                              r"model has 2 x 1 x 16"):
        rt.add_prompt("kv", kv)
    rt.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("torch", "onnx"))
def test_every_type_on_the_default_model(backend, tmp_path_factory):
    """One PEFT-trained adapter of every type on the real default model (Llama, 9 query heads
    over 3 K/V heads), all in one batch, equal to PEFT's forward on each request alone. The
    reference is PEFT in float64: with PEFT's N(0, 1) prefix init the float32 noise on this
    model is at SCORE's tolerance (PEFT's own eager and sdpa float32 forwards differ by 1.0e-4,
    PEFT float32 and float64 by 9e-5), so only the exact value tells a bug from rounding, within
    SCORE_DEFAULT_MODEL (relative beyond SCORE's floor); the onnx backend within ONNX, the
    exported graph's own budget against PyTorch (its export validation checks the same)."""
    tol = ONNX["float32"] if backend == "onnx" else SCORE_DEFAULT_MODEL["float32"]
    from softprompt.models.loading import default_model_dir

    model_dir = default_model_dir()
    root = tmp_path_factory.mktemp(f"default-kinds-{backend}")
    rt = Runtime.load("default", backend=backend)
    ids = rt.tokenizer.encode("Review: the soup was cold\nSentiment: negative", True)
    every = []
    for kind in KINDS:
        rt.add_prompt(kind, train_adapter(model_dir, kind, root / kind, num_virtual_tokens=8,
                                          steps=2))
        every += [(kind, name, task) for name, task in names(kind)]
    got = rt.score([{"prompt": name, "context": ids} for _, name, _ in every])
    for (kind, name, task), r in zip(every, got):
        with float64():
            want = want_scores(model_dir, root / kind, kind, task, ids)
        np.testing.assert_allclose(r.token_logprobs, want, err_msg=name, **tol)
    gens = rt.generate([name for _, name, _ in every], [ids] * len(every), max_new_tokens=3,
                       stop_at_eos=False)
    for (kind, name, task), g in zip(every, gens):
        assert g.token_ids == peft_greedy(model_dir, root / kind, ids, 3, task_id=task), name
    rt.close()


@pytest.mark.parametrize("backend", ("torch", "onnx"))
def test_saved_cache_keeps_kv_and_composed_prefixes(backend, adapters, tiny_dirs, tiny_bundles,
                                                    tmp_path):
    """A cache file holds K/V-ended prefixes (no first-token log-probs) beside the others; a
    fresh runtime that loads it computes nothing and scores the same."""
    rt = load("llama", backend, tiny_dirs, tiny_bundles)
    sources = {"kv": adapters["llama", "cartridge"], "emb": adapters["llama", "cpt"],
               "mix": [SoftPrompt.load(adapters["llama", "prefix_tuning"]), "the film"]}
    for name, src in sources.items():
        rt.add_prompt(name, src)
    reqs = [{"prompt": n, "context": CTX} for n in sources]
    assert rt.save_cache(tmp_path / "c.safetensors") == 3
    fresh = load("llama", backend, tiny_dirs, tiny_bundles)
    assert fresh.load_cache(tmp_path / "c.safetensors") == 3
    for name, src in sources.items():
        fresh.add_prompt(name, src)
    assert fresh.stats()["misses"] == 0
    for a, b in zip(fresh.score(reqs), rt.score(reqs)):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=TOL)
    rt.close()
    fresh.close()


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_kv_and_composed_prompts_through_the_triton_kernels(family, tiny_dirs):
    """The CUDA path's wiring under TRITON_INTERPRET=1: K/V prompts, text after K/V and text
    before an embedding prompt (computed through the kernels over the prefix so far), mixed with
    embedding prompts and none: scores and greedy tokens equal the reference's alone."""
    from softprompt import KVPrompt

    ref = Runtime.load(str(tiny_dirs[family]), backend="reference")
    rt = Runtime.load(str(tiny_dirs[family]), backend="torch")
    rt.backend.triton = True
    info, rng = ref.info, np.random.default_rng(5)
    shape = (info.num_layers, info.num_kv_heads, 37, info.head_dim)
    kv = KVPrompt(*(rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in range(2)))
    p20 = SoftPrompt.random(20, info.hidden_size, seed=2)
    for r in (ref, rt):
        for name, src in {"kv": kv, "kv-text": [kv, "the movie was great ."],
                          "text-emb": ["hello world", p20], "p20": p20}.items():
            r.add_prompt(name, src)
    names = ["kv", "kv-text", "text-emb", "p20", None]
    reqs = [{"prompt": names[i % 5], "context": rng.integers(4, 96, 2 + (i * 5) % 40).tolist()}
            for i in range(15)]
    for got, req in zip(rt.score(reqs), reqs):
        np.testing.assert_allclose(got.token_logprobs, ref.score([req])[0].token_logprobs,
                                   atol=TOL, rtol=0)
    ctx, prompts = [r["context"][:6] for r in reqs[:10]], [r["prompt"] for r in reqs[:10]]
    for p, c, g in zip(prompts, ctx, rt.generate(prompts, ctx, max_new_tokens=5, stop_at_eos=False)):
        assert g.token_ids == ref.generate(p, [c], max_new_tokens=5, stop_at_eos=False)[0].token_ids
    rt.close()
    ref.close()
