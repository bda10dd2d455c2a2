"""``softprompt inspect``: what a soft prompt's virtual tokens look like against the vocabulary.

For each virtual token: its nearest vocabulary tokens by cosine similarity and by L2 distance,
on the model's input-embedding table (the embedding module applied to every token id, so
Gemma's sqrt(E) scaling is in it, as in PEFT's text init and in a bundle's ``embeddings.npy``);
its norm and that norm's percentile among the vocabulary's norms; and, when the adapter records
a text initialisation (PEFT's ``prompt_tuning_init_text``), its distance from the token it
started as (PEFT's TEXT init: the text's ids with special tokens, repeated to P). Two prompts
(``--compare``) get their per-token and overall similarity. ``--plot`` draws the norms and a
2-D PCA of the virtual tokens among the vocabulary (matplotlib).

The math is numpy only (float64): with an exported bundle as the model it runs on a torch-free
install (the bundle's ``embeddings.npy`` and ``tokenizer.json``); a Hugging Face model loads
through ``softprompt.models.load_model`` (torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

KV_TYPES = ("PREFIX_TUNING", "CARTRIDGE")  # PEFT types whose prompt is keys and values
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


def load_vocab(model: str) -> Vocab:
    """The table and tokenizer of an exported bundle (numpy, no torch) or of a model
    ``softprompt.models.load_model`` loads (torch)."""
    root = Path(model)
    if (root / "bundle.json").is_file():
        from tokenizers import Tokenizer

        from softprompt.export.bundle import check_files, load_table, read_manifest

        manifest = read_manifest(root)
        check_files(root, manifest)
        tok_file = root / "tokenizer.json"
        tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
        return Vocab(np.asarray(load_table(root, manifest), dtype=np.float32), str(root), tok)
    import torch

    from softprompt.models import display_name, load_model

    lm = load_model(model)
    emb = lm.model.get_input_embeddings()
    V = int(emb.weight.shape[0])
    with torch.no_grad():
        table = np.concatenate([emb(torch.arange(a, min(a + CHUNK, V))).float().numpy()
                                for a in range(0, V, CHUNK)])
    tok = None if lm.tokenizer is None else lm.tokenizer.backend_tokenizer
    return Vocab(table, str(display_name(model)), tok)


def load_prompt(source: str):
    """The prompt as a ``SoftPrompt``; a K/V prompt (PREFIX_TUNING, CARTRIDGE) is a one-line
    InspectError: its virtual tokens are keys and values, not input embeddings."""
    from softprompt.models import read_json_object
    from softprompt.runtime.prompts import SoftPrompt, SoftPromptError

    cfg_file = Path(source) / "adapter_config.json"
    if cfg_file.is_file():
        cfg = read_json_object(cfg_file, 1 << 20, InspectError, "an adapter config")
        if cfg.get("peft_type") in KV_TYPES:
            raise InspectError(f"{source} is a {cfg['peft_type']} adapter: a K/V prompt (per-layer "
                               "keys and values, not input embeddings), which has no nearest "
                               "vocabulary tokens and is not served yet")
    try:
        return SoftPrompt.load(source)
    except SoftPromptError as e:
        raise InspectError(str(e)) from None


def default_model(prompt) -> str:
    """The model a prompt names (PEFT's ``base_model_name_or_path``) when it can be loaded as
    is, else ``default``."""
    from softprompt.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME

    base = prompt.base_model
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
    report = {"prompt": prompt.name, "model": vocab.name, "num_virtual_tokens": len(emb),
              "hidden_size": E, "vocab_size": V,
              "vocab_norm": dict(zip(("min", "p5", "median", "p95", "max"), map(float, q))),
              "init_text": init_text, "virtual_tokens": tokens}
    if init_ids is not None:
        report["init_distance"] = {"mean_l2": float(np.mean([t["init"]["l2"] for t in tokens])),
                                   "mean_cosine": float(np.mean([t["init"]["cosine"] for t in tokens]))}
    if other is not None:
        report["compare"] = {"with": other.name, **compare(emb, other.embeddings)}
    return report


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


def main(args, write: Callable[[str], None] = print) -> int:
    """``softprompt inspect`` (arguments from ``softprompt/train/cli.py``)."""
    prompt = load_prompt(args.prompt)
    other = load_prompt(args.compare) if args.compare else None
    vocab = load_vocab(args.model or default_model(prompt))
    report = inspect(prompt, vocab, args.top_k, other)
    if args.plot:
        plot(args.plot, prompt, vocab, report, other)
    write(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0


def add_parser(sub):
    """``softprompt inspect``'s parser (a lazy verb of ``softprompt/cli.py``)."""
    p = sub.add_parser("inspect", help="a soft prompt's virtual tokens against the vocabulary: "
                       "nearest tokens, norms, init distance, --compare, --plot",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", help="a PEFT adapter directory, .safetensors or .npy")
    p.add_argument("--model", default=None, help="'default', a Hugging Face directory or hub id, a "
                   ".gguf file, or an exported bundle directory (torch-free) (default: the "
                   "adapter's base model when it is a local path, else 'default')")
    p.add_argument("--compare", default=None, metavar="PROMPT_B", help="a second prompt: "
                   "per-token and overall similarity")
    p.add_argument("--top-k", type=int, default=5, help="nearest tokens per virtual token "
                   "(default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the norms and a 2-D PCA")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(args) -> int:
    from softprompt.models import ModelError

    try:
        return main(args)
    except (InspectError, ModelError) as e:
        raise SystemExit(f"softprompt inspect: {e}") from None
