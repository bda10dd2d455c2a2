"""``softprompt inspect``: what a prompt's virtual tokens look like to the model, for every kind.

Embedding prompts (prompt tuning, P-tuning, CPT, one task of a multitask adapter): for each
virtual token, its nearest vocabulary tokens by cosine similarity and by L2 distance, on the
model's input-embedding table (the embedding module applied to every token id, so Gemma's
sqrt(E) scaling is in it, as in PEFT's text init and in a bundle's ``embeddings.npy``); its norm
and that norm's percentile among the vocabulary's norms; and, when the adapter records a text
initialisation (PEFT's ``prompt_tuning_init_text``), its distance from the token it started as
(PEFT's TEXT init: the text's ids with special tokens, repeated to P). Two prompts
(``--compare``) get their per-token and overall similarity. ``--plot`` draws the norms and a
2-D PCA of the virtual tokens among the vocabulary (matplotlib).

K/V prompts (prefix tuning, cartridges): per layer, the mean and max L2 norm of the prompt's
key and value vectors (per head, and over heads), next to the norms of the keys and values the
model itself makes for a sample text (``--sample``), so learned K/V outside the model's range
show; and the share of each layer's attention that the sample's tokens, placed after the prefix
(positions P..), put on the P prefix positions (averaged over heads and tokens). That runs the
model in transformers, float32, eager attention, the prompt's K/V as a ``DynamicCache``.
``--plot`` draws both per layer.

Several parts (``inspect A "text:..." B``: a composed prompt, or a multitask adapter's tasks) are
inspected one by one, each alone (a K/V part's attention is measured with that part alone
before the sample).

The embedding math is numpy only (float64): with an exported bundle as the model it runs on a
torch-free install (the bundle's ``embeddings.npy`` and ``tokenizer.json``); a Hugging Face model
loads through ``softprompt.models.load_model`` (torch), as K/V prompts always need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CHUNK = 8192  # vocabulary rows per float64 block


class InspectError(ValueError):
    """A prompt or model that cannot be inspected; the message says why."""


@dataclass
class Vocab:
    """The model's input-embedding table ``[V, E]`` float32, its name, and its tokenizer (a
    ``tokenizers.Tokenizer``, or None: token strings are then ``<id>``)."""

    table: np.ndarray
    name: str
    tokenizer: object | None = None

    def token(self, i: int) -> str:
        if self.tokenizer is None:
            return f"<{i}>"
        return self.tokenizer.decode([int(i)], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """The ids PEFT's TEXT init takes: the tokenizer's call, special tokens included."""
        if self.tokenizer is None:
            raise InspectError(f"model {self.name!r} has no tokenizer: cannot tokenize the init text")
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)


def load_vocab(model: str, lm=None) -> Vocab:
    """The table and tokenizer of an exported bundle (numpy, no torch) or of a model
    ``softprompt.models.load_model`` loads (torch; ``lm``: that model already loaded)."""
    root = Path(model)
    if lm is None and (root / "bundle.json").is_file():
        from tokenizers import Tokenizer

        from softprompt.export.bundle import check_files, load_table, read_manifest

        manifest = read_manifest(root)
        check_files(root, manifest)
        tok_file = root / "tokenizer.json"
        tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
        return Vocab(np.asarray(load_table(root, manifest), dtype=np.float32), str(root), tok)
    import torch

    from softprompt.models import display_name, load_model

    lm = lm or load_model(model)
    emb = lm.model.get_input_embeddings()
    V = int(emb.weight.shape[0])
    with torch.no_grad():
        table = np.concatenate([emb(torch.arange(a, min(a + CHUNK, V))).float().numpy()
                                for a in range(0, V, CHUNK)])
    tok = None if lm.tokenizer is None else lm.tokenizer.backend_tokenizer
    return Vocab(table, str(display_name(model)), tok)


class ModelHandle:
    """The model inspect reads, loaded at most once: its vocabulary (embedding prompts), and
    the transformers model in float32 with eager attention (K/V prompts; not from a bundle)."""

    def __init__(self, model: str):
        self.model = model
        self.is_bundle = (Path(model) / "bundle.json").is_file()
        self._lm = None
        self._vocab: Vocab | None = None

    def lm(self):
        if self.is_bundle:
            raise InspectError(f"{self.model} is an exported bundle: a K/V prompt is inspected by "
                               "running the model in transformers (float32, eager attention); "
                               "pass the Hugging Face model with --model")
        if self._lm is None:
            from softprompt.models import load_model

            self._lm = load_model(self.model, dtype="float32", device="cpu")
            self._lm.model.set_attn_implementation("eager")  # output_attentions needs it
        return self._lm

    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = load_vocab(self.model, None if self.is_bundle else self.lm())
        return self._vocab

    @property
    def name(self) -> str:
        from softprompt.models import display_name

        return str(self.model) if self.is_bundle else str(display_name(self.model))

    def count_tokens(self, text: str) -> int | None:
        """Tokens of a text part (tokenised alone, no special tokens, as the runtime does)."""
        tok = self.vocab().tokenizer if self.is_bundle else self.lm().tokenizer
        if tok is None:
            return None
        tok = getattr(tok, "backend_tokenizer", tok)
        return len(tok.encode(text, add_special_tokens=False).ids)


def load_parts(values) -> list:
    """The parts to inspect, from ``inspect``'s arguments (the syntax of ``--prompt``'s PART,
    see ``softprompt/cli.py``): each prompt loaded (any kind; every task of a multitask adapter
    unless ``PATH#T`` picks one, named ``NAME/t``), each ``text:TEXT`` part as its str."""
    from softprompt.cli import parse_part
    from softprompt.runtime.adapters import load_adapter
    from softprompt.runtime.prompts import SoftPrompt, SoftPromptError

    out: list = []
    for value in values:
        part = parse_part(value, "inspect")
        if part.text is not None:
            out.append(part.text)
            continue
        path = Path(part.source)
        try:
            if (path / "adapter_config.json").is_file():
                name = path.name if part.task is None else f"{path.name}/{part.task}"
                out += load_adapter(path, name, task=part.task)
            else:
                out.append(SoftPrompt.load(part.source, task=part.task))
        except SoftPromptError as e:
            raise InspectError(str(e)) from None
    return out


def load_prompt(source: str):
    """The one prompt (of any kind) in ``source``; a one-line InspectError otherwise."""
    parts = load_parts([source])
    if len(parts) != 1 or isinstance(parts[0], str):
        raise InspectError(f"{source} holds {len(parts)} prompts (a multitask adapter); pick one "
                           f"task as {source}#T")
    return parts[0]


def default_model(prompt) -> str:
    """The model a prompt names (PEFT's ``base_model_name_or_path``) when it can be loaded as
    is, else ``default``."""
    from softprompt.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME

    base = getattr(prompt, "base_model", None)
    if base and base != DEFAULT_MODEL_NAME and ((Path(base) / "config.json").is_file()
                                                or (Path(base) / "bundle.json").is_file()):
        return base
    return DEFAULT_MODEL


# ----------------------------------------------------------------------------------- math
def _blocks(table: np.ndarray):
    for a in range(0, len(table), CHUNK):
        yield a, np.asarray(table[a:a + CHUNK], dtype=np.float64)


def norms(table: np.ndarray) -> np.ndarray:
    """The L2 norm of every vocabulary row, float64 ``[V]``."""
    return np.concatenate([np.linalg.norm(b, axis=1) for _, b in _blocks(table)])


def nearest(prompt: np.ndarray, table: np.ndarray, k: int = 5,
            vocab_norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per virtual token (row of ``prompt [P, E]``), its ``k`` nearest vocabulary rows: (ids by
    cosine ``[P, k]``, their cosines, ids by L2 ``[P, k]``, their distances), best first."""
    x = np.asarray(prompt, dtype=np.float64)
    xn = np.linalg.norm(x, axis=1)
    tn = norms(table) if vocab_norms is None else vocab_norms
    cos = np.empty((len(x), len(tn)))
    d2 = np.empty((len(x), len(tn)))
    for a, b in _blocks(table):
        dot = x @ b.T
        n = tn[a:a + len(b)]
        cos[:, a:a + len(b)] = dot / np.maximum(xn[:, None] * n[None], 1e-300)
        d2[:, a:a + len(b)] = xn[:, None] ** 2 + n[None] ** 2 - 2 * dot
    k = min(k, len(tn))
    by_cos = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    by_l2 = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, by_l2, 1), 0.0))
    return by_cos, np.take_along_axis(cos, by_cos, 1), by_l2, dist


def percentile_of(values: np.ndarray, population: np.ndarray) -> np.ndarray:
    """For each value, the percentage of ``population`` strictly below it (0..100)."""
    pop = np.sort(population)
    return 100.0 * np.searchsorted(pop, values, side="left") / len(pop)


def text_init_ids(vocab: Vocab, text: str, num_virtual_tokens: int) -> list[int]:
    """PEFT's TEXT init ids: the text's ids, repeated to P and truncated (peft's
    ``PromptEmbedding``)."""
    ids = vocab.encode(text)
    if not ids:
        raise InspectError(f"init text {text!r} tokenizes to nothing")
    return (ids * -(-num_virtual_tokens // len(ids)))[:num_virtual_tokens]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-token cosine and L2 of the first min(P_a, P_b) virtual tokens of two prompts, and
    overall: their mean cosine, the cosine of the flattened prompts and the relative difference
    ``|a - b| / |a|`` (Frobenius)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[1] != b.shape[1]:
        raise InspectError(f"the prompts have hidden sizes {a.shape[1]} and {b.shape[1]}: "
                           "they belong to different models")
    p = min(len(a), len(b))
    a, b = a[:p], b[:p]
    cos = _cos(a, b)
    l2 = np.linalg.norm(a - b, axis=1)
    return {"compared_tokens": p, "per_token": [{"index": i, "cosine": float(c), "l2": float(d)}
                                                for i, (c, d) in enumerate(zip(cos, l2))],
            "mean_cosine": float(cos.mean()), "cosine": float(_cos(a.ravel(), b.ravel())),
            "relative_difference": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))}


def inspect(prompt, vocab: Vocab, k: int = 5, other=None) -> dict:
    """The report (also ``--json``'s output) of ``prompt`` (a SoftPrompt) against ``vocab``."""
    emb = prompt.embeddings
    V, E = vocab.table.shape
    if emb.shape[1] != E:
        raise InspectError(f"prompt {prompt.name!r} has hidden size {emb.shape[1]} but model "
                           f"{vocab.name!r} has {E}: pass the model it was trained for (--model)")
    vn = norms(vocab.table)
    pn = np.linalg.norm(emb.astype(np.float64), axis=1)
    pct = percentile_of(pn, vn)
    by_cos, cos, by_l2, dist = nearest(emb, vocab.table, k, vn)
    init_text = (prompt.metadata or {}).get("prompt_tuning_init_text") \
        if (prompt.metadata or {}).get("prompt_tuning_init") == "TEXT" else None
    init_ids = text_init_ids(vocab, init_text, len(emb)) if init_text else None
    tokens = []
    for i in range(len(emb)):
        t = {"index": i, "norm": float(pn[i]), "norm_percentile": float(pct[i]),
             "nearest": [{"id": int(j), "token": vocab.token(j), "cosine": float(c)}
                         for j, c in zip(by_cos[i], cos[i])],
             "nearest_l2": [{"id": int(j), "token": vocab.token(j), "l2": float(d)}
                            for j, d in zip(by_l2[i], dist[i])]}
        if init_ids is not None:
            v = np.asarray(vocab.table[init_ids[i]], np.float64)
            x = emb[i].astype(np.float64)
            t["init"] = {"id": int(init_ids[i]), "token": vocab.token(init_ids[i]),
                         "l2": float(np.linalg.norm(x - v)), "cosine": float(_cos(x, v))}
        tokens.append(t)
    q = np.percentile(vn, [0, 5, 50, 95, 100])
    report = {"prompt": prompt.name, "kind": prompt.kind, "model": vocab.name,
              "num_virtual_tokens": len(emb),
              "hidden_size": E, "vocab_size": V,
              "vocab_norm": dict(zip(("min", "p5", "median", "p95", "max"), map(float, q))),
              "init_text": init_text, "virtual_tokens": tokens}
    if init_ids is not None:
        report["init_distance"] = {"mean_l2": float(np.mean([t["init"]["l2"] for t in tokens])),
                                   "mean_cosine": float(np.mean([t["init"]["cosine"] for t in tokens]))}
    if other is not None:
        report["compare"] = {"with": other.name, **compare(emb, other.embeddings)}
    return report


# ------------------------------------------------------------------------------ K/V math
DEFAULT_SAMPLE = "The quick brown fox jumps over the lazy dog."


def norm_stats(x: np.ndarray) -> list[dict]:
    """Per layer of ``x [N, H, n, D]`` (keys or values), the L2 norms of its ``[D]`` vectors:
    ``{"mean", "max"}`` over heads and positions, ``"per_head_mean"`` / ``"per_head_max"``
    (``[H]``, over positions). float64."""
    n = np.linalg.norm(np.asarray(x, np.float64), axis=-1)  # [N, H, n]
    return [{"mean": float(layer.mean()), "max": float(layer.max()),
             "per_head_mean": layer.mean(-1).tolist(), "per_head_max": layer.max(-1).tolist()}
            for layer in n]


def sample_ids(lm, text: str) -> list[int]:
    """The sample's ids as the runtime tokenises a request's context (special tokens added)."""
    if lm.tokenizer is None:
        raise InspectError(f"model {lm.source!r} has no tokenizer: cannot tokenize --sample")
    ids = list(lm.tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids)
    if not ids:
        raise InspectError(f"--sample {text!r} tokenizes to nothing")
    return ids


def _kv_cache(model, keys=None, values=None):
    """A DynamicCache, holding ``keys``/``values [N, H, P, D]`` (batch 1) when given."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    if keys is not None:
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(torch.tensor(np.asarray(k, np.float32))[None],  # copies: the prompt's
                         torch.tensor(np.asarray(v, np.float32))[None], layer)  # arrays are read-only
    return cache


def model_kv(lm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values ``[N, H, T, D]`` float32 the model makes for ``ids`` (its cache after
    one forward: keys after RoPE, which keeps their norms)."""
    import torch

    from softprompt.models import cache_kwarg

    cache = _kv_cache(lm.model)
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(lm.model): cache})
    keys = np.stack([layer.keys[0].float().numpy() for layer in cache.layers])
    values = np.stack([layer.values[0].float().numpy() for layer in cache.layers])
    return keys, values


def prefix_attention(lm, keys: np.ndarray, values: np.ndarray, ids: list[int]) -> np.ndarray:
    """``[N, H]`` float64: per layer and query head, the attention weight the request ``ids``
    put on the P prefix positions, averaged over the request's tokens. The model runs in float32
    with eager attention and ``output_attentions``, the prefix ``keys``/``values [N, Hkv, P, D]``
    as its past (a DynamicCache), the request at positions P.. (as PEFT's prefix tuning)."""
    import torch

    from softprompt.models import cache_kwarg

    P, T = keys.shape[2], len(ids)
    cache = _kv_cache(lm.model, keys, values)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(P, P + T)[None],
                       attention_mask=torch.ones(1, P + T, dtype=torch.long), use_cache=True,
                       output_attentions=True, **{cache_kwarg(lm.model): cache})
    if not out.attentions or out.attentions[0] is None:
        raise InspectError(f"model {lm.source!r} returned no attention weights "
                           "(output_attentions needs eager attention)")
    return np.stack([a[0, :, :, :P].double().sum(-1).mean(-1).numpy() for a in out.attentions])


def inspect_kv(prompt, handle: ModelHandle, sample: str = DEFAULT_SAMPLE) -> dict:
    """The report (``--json``'s output) of a K/V prompt (a ``KVPrompt``) on ``handle``'s model:
    per layer, the prompt's key/value norms, the model's own for ``sample``, and the share of
    attention ``sample``'s tokens put on the prefix."""
    from softprompt.models import ModelSpec

    lm = handle.lm()
    spec = ModelSpec.from_model(lm.model)
    N, H, D = prompt.geometry
    want = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if (N, H, D) != want:
        raise InspectError(f"K/V prompt {prompt.name!r} has {N} layers x {H} K/V heads x head size "
                           f"{D} but model {handle.name!r} has {want[0]} x {want[1]} x {want[2]}: "
                           "pass the model it was trained for (--model)")
    ids = sample_ids(lm, sample)
    P = prompt.num_virtual_tokens
    limit = spec.max_position_embeddings
    if limit and P + len(ids) > limit:
        raise InspectError(f"{P} prefix + {len(ids)} sample tokens exceed the model's {limit} "
                           "positions: pass a shorter --sample")
    mk, mv = model_kv(lm, ids)
    att = prefix_attention(lm, prompt.keys, prompt.values, ids)
    kn, vn, mkn, mvn = (norm_stats(x) for x in (prompt.keys, prompt.values, mk, mv))
    layers = [{"layer": i, "key_norm": kn[i], "value_norm": vn[i], "model_key_norm": mkn[i],
               "model_value_norm": mvn[i], "prefix_attention": float(att[i].mean()),
               "prefix_attention_per_head": att[i].tolist()} for i in range(N)]
    return {"prompt": prompt.name, "kind": prompt.kind, "model": handle.name,
            "num_virtual_tokens": P, "num_layers": N, "num_kv_heads": H, "head_dim": D,
            "sample": sample, "sample_tokens": len(ids), "layers": layers}


# ---------------------------------------------------------------------------------- output
def format_report(r: dict) -> str:
    """The report as text: a header, one line per virtual token, the comparison if any."""
    vn = r["vocab_norm"]
    lines = [f"{r['prompt']}: {r['num_virtual_tokens']} virtual tokens on {r['model']} "
             f"(E={r['hidden_size']}, V={r['vocab_size']})",
             f"vocabulary norms: median {vn['median']:.3f} (5%: {vn['p5']:.3f}, 95%: {vn['p95']:.3f}, "
             f"max {vn['max']:.3f})"]
    if r.get("init_text"):
        d = r["init_distance"]
        lines.append(f"text init {r['init_text']!r}: mean L2 from it {d['mean_l2']:.3f}, mean cosine "
                     f"{d['mean_cosine']:.3f}")
    lines.append(" #    norm   pct  nearest by cosine | nearest by L2" + ("  | init token (L2, cos)"
                                                                          if r.get("init_text") else ""))
    for t in r["virtual_tokens"]:
        cos = ", ".join(f"{n['token']!r} {n['cosine']:.3f}" for n in t["nearest"])
        l2 = ", ".join(f"{n['token']!r} {n['l2']:.3f}" for n in t["nearest_l2"])
        line = f"{t['index']:2d} {t['norm']:7.3f} {t['norm_percentile']:5.1f}  {cos} | {l2}"
        if "init" in t:
            i = t["init"]
            line += f"  | {i['token']!r} ({i['l2']:.3f}, {i['cosine']:.3f})"
        lines.append(line)
    if "compare" in r:
        c = r["compare"]
        lines.append(f"against {c['with']} (first {c['compared_tokens']} tokens): mean cosine "
                     f"{c['mean_cosine']:.4f}, overall cosine {c['cosine']:.4f}, relative "
                     f"difference {c['relative_difference']:.4f}")
        lines.append("  per token cosine: " + " ".join(f"{p['cosine']:.2f}" for p in c["per_token"]))
    return "\n".join(lines)


def pca2(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean ``[E]``, the top two principal axes ``[E, 2]``) of the vocabulary table."""
    mean = np.zeros(table.shape[1])
    for _, b in _blocks(table):
        mean += b.sum(0)
    mean /= len(table)
    cov = np.zeros((table.shape[1],) * 2)
    for _, b in _blocks(table):
        c = b - mean
        cov += c.T @ c
    w, v = np.linalg.eigh(cov)
    return mean, v[:, np.argsort(w)[::-1][:2]]


def plot(path: str, prompt, vocab: Vocab, report: dict, other=None, sample: int = 4000) -> None:
    """Two panels into ``path``: the vocabulary's norms (histogram) with each virtual token's
    norm marked, and the vocabulary (a seeded sample) and the virtual tokens projected on the
    vocabulary's top two principal axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vn = norms(vocab.table)
    mean, axes = pca2(vocab.table)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(vn), size=min(sample, len(vn)), replace=False))
    vxy = (np.asarray(vocab.table[pick], np.float64) - mean) @ axes
    fig, (h, s) = plt.subplots(1, 2, figsize=(12, 5))
    h.hist(vn, bins=80, color="0.7", label="vocabulary")
    for i, t in enumerate(report["virtual_tokens"]):
        h.axvline(t["norm"], color="C3", alpha=0.6, lw=1, label="virtual tokens" if i == 0 else None)
    h.set_xlabel("L2 norm")
    h.set_ylabel("vocabulary tokens")
    h.set_title(f"norms: {report['prompt']} on {report['model']}")
    h.legend()
    s.scatter(vxy[:, 0], vxy[:, 1], s=3, color="0.75", label=f"vocabulary ({len(pick)} sampled)")
    for p, color in ((prompt, "C3"), (other, "C0")):
        if p is None:
            continue
        xy = (p.embeddings.astype(np.float64) - mean) @ axes
        s.scatter(xy[:, 0], xy[:, 1], s=25, color=color, label=p.name)
        for i, (x, y) in enumerate(xy):
            s.annotate(str(i), (x, y), fontsize=7, color=color)
    s.set_title("PCA of the vocabulary (top 2 axes)")
    s.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_kv_report(r: dict) -> str:
    """A K/V report as text: a header and one row per layer."""
    def pair(d: dict) -> str:
        return f"{d['mean']:.3f} ({d['max']:.3f})".rjust(18)

    L = r["layers"]
    lines = [f"{r['prompt']}: {r['kind']}, {r['num_virtual_tokens']} K/V positions on {r['model']} "
             f"({r['num_layers']} layers x {r['num_kv_heads']} K/V heads x head size {r['head_dim']})",
             f"sample {r['sample']!r} ({r['sample_tokens']} tokens): the model's own K/V norms for "
             "it, and the share of its attention on the prefix",
             "L2 norm of the key / value vectors: mean (max) over heads and positions",
             f"{'layer':>5s}  {'keys':>18s}  {'model keys':>18s}  {'values':>18s}  "
             f"{'model values':>18s}  {'prefix attention':>16s}"]
    for x in L:
        lines.append(f"{x['layer']:5d}  {pair(x['key_norm'])}  {pair(x['model_key_norm'])}  "
                     f"{pair(x['value_norm'])}  {pair(x['model_value_norm'])}  "
                     f"{x['prefix_attention']:16.3f}")

    def ratio(a: str, b: str) -> float:
        return float(np.mean([x[a]["mean"] / max(x[b]["mean"], 1e-300) for x in L]))

    lines.append(f"keys {ratio('key_norm', 'model_key_norm'):.2f}x and values "
                 f"{ratio('value_norm', 'model_value_norm'):.2f}x the model's norms (mean over "
                 f"layers); {100 * np.mean([x['prefix_attention'] for x in L]):.1f}% of the "
                 "sample's attention on the prefix (mean over layers)")
    return "\n".join(lines)


def plot_kv(path: str, report: dict) -> None:
    """Two panels into ``path``: per layer, the prompt's and the model's mean key and value
    norms (the max as a marker), and the share of the sample's attention on the prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = report["layers"]
    x = [r["layer"] for r in L]
    fig, (n, a) = plt.subplots(1, 2, figsize=(12, 5))
    for key, color, label in (("key_norm", "C0", "keys"), ("value_norm", "C3", "values")):
        n.plot(x, [r[key]["mean"] for r in L], color=color, marker="o", label=f"prompt {label}")
        n.scatter(x, [r[key]["max"] for r in L], color=color, marker="^", s=18)
        n.plot(x, [r["model_" + key]["mean"] for r in L], color=color, ls="--",
               label=f"model {label} (sample)")
        n.scatter(x, [r["model_" + key]["max"] for r in L], color=color, marker="v", s=18)
    n.set_xlabel("layer")
    n.set_ylabel("L2 norm per head vector: mean (line), max (triangles)")
    n.set_title(f"K/V norms: {report['prompt']} on {report['model']}")
    n.legend(fontsize=8)
    a.bar(x, [r["prefix_attention"] for r in L], color="C2")
    a.set_ylim(0, 1)
    a.set_xlabel("layer")
    a.set_ylabel("attention on the prefix")
    a.set_title(f"share of the sample's attention on the {report['num_virtual_tokens']} prefix "
                "positions")
    from matplotlib.ticker import MaxNLocator

    for ax in (n, a):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _part_plot_path(path: str, i: int, n: int) -> str:
    """The plot of part ``i`` of ``n``: ``path`` itself for one part, else ``stem-i.suffix``."""
    if n == 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}"))


def main(args, write: Callable[[str], None] = print) -> int:
    """``softprompt inspect`` (arguments from ``add_parser``)."""
    from softprompt.runtime.prompt_kinds import KVPrompt
    from softprompt.runtime.prompts import SoftPrompt

    values = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    parts = load_parts(values)
    prompts = [p for p in parts if not isinstance(p, str)]
    other = load_prompt(args.compare) if args.compare else None
    if other is not None and not (len(parts) == 1 and isinstance(parts[0], SoftPrompt)
                                  and isinstance(other, SoftPrompt)):
        raise InspectError("--compare compares two embedding prompts (one each); got "
                           f"{', '.join(getattr(p, 'kind', 'text') for p in parts + [other])}")
    handle = ModelHandle(args.model or default_model(prompts[0] if prompts else None))
    sample = getattr(args, "sample", None) or DEFAULT_SAMPLE
    reports, texts = [], []
    for i, part in enumerate(parts):
        plot_to = _part_plot_path(args.plot, i, len(parts)) if args.plot else None
        if isinstance(part, str):
            r = {"kind": "text", "text": part, "tokens": handle.count_tokens(part)}
            t = f"text {part!r} ({r['tokens']} tokens)"
        elif isinstance(part, KVPrompt):
            r = inspect_kv(part, handle, sample)
            t = format_kv_report(r)
            if plot_to:
                plot_kv(plot_to, r)
        else:
            vocab = handle.vocab()
            r = inspect(part, vocab, args.top_k, other)
            t = format_report(r)
            if plot_to:
                plot(plot_to, part, vocab, r, other)
        reports.append(r)
        texts.append(t)
    if len(parts) == 1:
        report, text = reports[0], texts[0]
    else:
        kind = "composed" if len(values) > 1 else "multitask_prompt_tuning"
        report = {"kind": kind, "parts": reports}
        what = "parts" if kind == "composed" else "tasks"
        text = "\n".join([f"{kind} prompt: {len(parts)} {what}, each inspected alone"]
                         + [f"--- part {i}: {t}" for i, t in enumerate(texts)])
    write(json.dumps(report, ensure_ascii=False) if args.json else text)
    return 0


def add_parser(sub):
    """``softprompt inspect``'s parser (a lazy verb of ``softprompt/cli.py``)."""
    p = sub.add_parser("inspect", help="a prompt of any kind: virtual tokens against the "
                       "vocabulary (nearest tokens, norms, init distance, --compare); K/V norms "
                       "and prefix attention per layer; --plot",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="+", metavar="PART",
                   help="a PEFT adapter directory of any prompt-learning type (a multitask "
                        "adapter: every task, or PATH#T for task T), .safetensors or .npy, or a "
                        "hub id; several PARTs (text:TEXT among them) are a composed prompt, "
                        "each part inspected alone")
    p.add_argument("--model", default=None, help="'default', a Hugging Face directory or hub id, a "
                   ".gguf file, or an exported bundle directory (torch-free; embedding prompts "
                   "only) (default: the adapter's base model when it is a local path, else "
                   "'default')")
    p.add_argument("--compare", default=None, metavar="PROMPT_B", help="a second embedding "
                   "prompt: per-token and overall similarity")
    p.add_argument("--top-k", type=int, default=5, help="nearest tokens per virtual token "
                   "(default: %(default)s)")
    p.add_argument("--sample", default=DEFAULT_SAMPLE, metavar="TEXT",
                   help="K/V prompts: the request whose attention on the prefix is measured, and "
                        "whose own K/V norms the prompt's are set against (default: %(default)r)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the norms and a 2-D PCA "
                   "(embedding prompts) or the per-layer norms and prefix attention (K/V prompts); "
                   "several parts: OUT-0.png, OUT-1.png, ...")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(args) -> int:
    from softprompt.models import ModelError

    try:
        return main(args)
    except (InspectError, ModelError) as e:
        raise SystemExit(f"softprompt inspect: {e}") from None
