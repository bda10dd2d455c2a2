"""Self-checks of tests/peft_kinds.py: every PEFT prompt-learning kind trains, saves and loads on
every tiny family, and the reference helpers compute what PEFT computes (checked against direct
transformers computations from the saved tensors, which also pins the layout table)."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import peft_kinds as pk
from tiny import FAMILIES

IDS = [5, 17, 33, 8, 61, 12, 40]
PREFIX_IDS = [9, 70, 21]
TOL = 1e-5

# Third-party deprecations PEFT 0.21.2 trips on transformers 5.24 (see peft_kinds' docstring).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`past_key_values` is deprecated:FutureWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:Position ids are not supported:UserWarning",
)


@pytest.fixture(scope="module")
def adapter(tiny_dirs, tmp_path_factory):
    """adapter(family, kind) -> adapter dir, trained once per module."""
    root = tmp_path_factory.mktemp("peft_kinds")
    made = {}

    def get(family, kind):
        if (family, kind) not in made:
            made[family, kind] = pk.train_adapter(tiny_dirs[family], kind, root / f"{family}-{kind}")
        return made[family, kind]

    return get


def saved(adapter_dir):
    return load_file(adapter_dir / "adapter_model.safetensors")


def task_of(kind):
    return 1 if kind == "multitask" else None


def expected_shapes(base, kind, n=6, tasks=3):
    cfg = base.config
    E, L = cfg.hidden_size, cfg.num_hidden_layers
    if kind in pk.PREFIX_KINDS:
        heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or E // cfg.num_attention_heads
        return {"prompt_embeddings": (n, L * 2 * heads * head_dim)}
    shapes = {"prompt_embeddings": (n, E)}
    if kind == "multitask":
        shapes.update(prefix_task_cols=(tasks, n, pk.NUM_RANKS),
                      prefix_task_rows=(tasks, pk.NUM_RANKS, E))
    return shapes


def direct_logprobs(base, prompt, seq, start, targets):
    """log-probs of ``targets`` from rows start-1.. of base(inputs_embeds=[prompt; embed(seq)])."""
    with torch.no_grad():
        embeds = base.get_input_embeddings()(torch.tensor([seq]))
        embeds = torch.cat([torch.as_tensor(prompt)[None].to(embeds.dtype), embeds], dim=1)
        logits = base(inputs_embeds=embeds).logits[0].double()
    lp = torch.log_softmax(logits[start - 1:start - 1 + len(targets)], dim=-1)
    return lp.gather(1, torch.tensor(targets).view(-1, 1))[:, 0].numpy()


@pytest.mark.parametrize("kind", pk.KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_trains_saves_loads(family, kind, adapter, tiny_dirs):
    ad = adapter(family, kind)
    assert (ad / "adapter_config.json").is_file()
    model = pk.load_peft(tiny_dirs[family], ad)
    assert pk.is_prefix(model) == (kind in pk.PREFIX_KINDS)
    shapes = {k: v.shape for k, v in saved(ad).items()}
    assert shapes == expected_shapes(model.get_base_model(), kind)

    lp = pk.peft_logprobs(tiny_dirs[family], ad, IDS, task_id=task_of(kind))
    assert lp.shape == (len(IDS) - 1,) and lp.dtype == np.float64
    assert np.isfinite(lp).all() and (lp <= 0).all()
    lp2 = pk.peft_logprobs(tiny_dirs[family], ad, IDS, task_id=task_of(kind), prefix_ids=PREFIX_IDS)
    assert lp2.shape == lp.shape and np.isfinite(lp2).all()
    assert np.abs(lp2 - lp).max() > 1e-3  # the prefix_ids are really in the context

    first = pk.peft_first_logprob(tiny_dirs[family], ad, IDS, task_id=task_of(kind),
                                  prefix_ids=PREFIX_IDS)
    assert np.isfinite(first) and first <= 0
    if kind in pk.PREFIX_KINDS:
        with pytest.raises(ValueError):
            pk.peft_first_logprob(tiny_dirs[family], ad, IDS)
    else:
        assert np.isfinite(pk.peft_first_logprob(tiny_dirs[family], ad, IDS, task_id=task_of(kind)))


@pytest.mark.parametrize("kind", pk.EMBEDDING_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_kinds_match_inputs_embeds(family, kind, adapter, tiny_dirs):
    """PEFT's numbers = prepend the saved rows (multitask: shared * (cols[t] @ rows[t])) unscaled
    as input embeddings of the plain model; first and later targets, with and without prefix_ids."""
    ad = adapter(family, kind)
    w = saved(ad)
    prompt = w["prompt_embeddings"]
    if kind == "multitask":
        t = task_of(kind)
        prompt = prompt * (w["prefix_task_cols"][t] @ w["prefix_task_rows"][t])
    base = pk.load_base(tiny_dirs[family])
    P = len(prompt)
    for prefix in ([], PREFIX_IDS):
        seq = prefix + IDS
        start = P + len(prefix)
        want = direct_logprobs(base, prompt, seq, start, IDS)  # ids[0] .. ids[-1]
        got = pk.peft_logprobs(tiny_dirs[family], ad, IDS, task_id=task_of(kind), prefix_ids=prefix)
        np.testing.assert_allclose(got, want[1:], rtol=0, atol=TOL)
        first = pk.peft_first_logprob(tiny_dirs[family], ad, IDS, task_id=task_of(kind),
                                      prefix_ids=prefix)
        assert abs(first - want[0]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cpt_rows_are_token_embeddings_plus_delta(family, adapter, tiny_dirs):
    """CPT saves embed(cpt_token_ids) + delta (embed as the model's module gives it, so scaled by
    sqrt(E) on gemma); the type-4 label token's delta never trains."""
    ids, types = pk.cpt_layout(6)
    base = pk.load_base(tiny_dirs[family])
    with torch.no_grad():
        emb = base.get_input_embeddings()(torch.tensor(ids)).numpy()
    rows = saved(adapter(family, "cpt"))["prompt_embeddings"]
    assert types[-1] == 4
    np.testing.assert_allclose(rows[-1], emb[-1], rtol=0, atol=1e-6)
    delta = np.linalg.norm(rows[:-1] - emb[:-1], axis=1)
    assert (delta > 1e-3).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_multitask_task_matters(family, adapter, tiny_dirs):
    ad = adapter(family, "multitask")
    lps = [pk.peft_logprobs(tiny_dirs[family], ad, IDS, task_id=t) for t in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(lps[a] - lps[b]).max() > 1e-2


@pytest.mark.parametrize("kind", pk.PREFIX_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_kv_reproduces_peft(family, kind, adapter, tiny_dirs):
    """peft_prefix_kv, fed to the plain model as a DynamicCache with request positions P.., gives
    PEFT's log-probs; and its layout is the saved row reshaped [L, 2, H_kv, D]."""
    from transformers import DynamicCache

    ad = adapter(family, kind)
    keys, values = pk.peft_prefix_kv(tiny_dirs[family], ad)
    base = pk.load_base(tiny_dirs[family])
    cfg = base.config
    L, H, P, D = keys.shape
    assert L == cfg.num_hidden_layers and P == 6
    assert H == getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert keys.dtype == values.dtype == np.float32 and values.shape == keys.shape

    rows = saved(ad)["prompt_embeddings"].reshape(P, L, 2, H, D)
    np.testing.assert_array_equal(keys, rows[:, :, 0].transpose(1, 2, 0, 3))
    np.testing.assert_array_equal(values, rows[:, :, 1].transpose(1, 2, 0, 3))

    for prefix in ([], PREFIX_IDS):
        seq = prefix + IDS
        cache = DynamicCache(config=cfg)
        for layer in range(L):
            cache.update(torch.from_numpy(keys[layer])[None], torch.from_numpy(values[layer])[None],
                         layer)
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([seq]), cache=cache,
                          position_ids=torch.arange(P, P + len(seq))[None]).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)[len(prefix):len(seq) - 1]
        want = lp.gather(1, torch.tensor(IDS[1:]).view(-1, 1))[:, 0].numpy()
        got = pk.peft_logprobs(tiny_dirs[family], ad, IDS, prefix_ids=prefix)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["prompt_tuning", "cpt", "prefix_tuning"])
def test_greedy_matches_uncached_generate_on_gpt2(kind, adapter, tiny_dirs):
    """An independent path for peft_greedy: PeftModel.generate without a KV cache (valid on gpt2
    for every kind; up to EOS, where generate stops)."""
    ad = adapter("gpt2", kind)
    greedy = pk.peft_greedy(tiny_dirs["gpt2"], ad, IDS, 6)
    model = pk.load_peft(tiny_dirs["gpt2"], ad)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([IDS]), max_new_tokens=6, do_sample=False,
                             use_cache=False)[0, len(IDS):].tolist()
    assert out and greedy[:len(out)] == out
    lp = pk.peft_logprobs(tiny_dirs["gpt2"], ad, IDS + greedy[:1])
    assert lp[-1] > np.log(1 / model.config.vocab_size)  # argmax beats uniform
