"""Measure the export speed options side by side: is each one worth shipping?

    python -m softprompt.bench.export_options --model default --work /tmp/sp-bench

Exports the model once per variant (baseline fp32, --optimize, --dtype fp16,
--weights int4), loads every bundle on the CPU provider, then times the *request* use (B rows of L
tokens on top of a cached P-token prefix) round-robin across the variants, so load from
other processes hits them all alike, and reports the median. It also scores a fixed set of
20 (context, continuation) requests under one text-initialised soft prompt and reports how
far each variant's continuation log-probs move from the baseline. The baseline of both the
speed and the dlogprob columns is the first of ``--variants`` (fp32 by default); the header
names it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from softprompt.export.bundle import Bundle, load_bundle
from softprompt.machine import cpu_model

VARIANTS = {
    "fp32": {},
    "optimize": {"optimize": True},
    "fp16": {"dtype": "fp16"},
    "int4": {"weights": "int4"},
}

SCORING_SET = [
    ("The movie was long but the ending made it worth it. Overall it was", " great"),
    ("I waited an hour and the food arrived cold. The service was", " terrible"),
    ("The capital of France is", " Paris"),
    ("Water boils at one hundred degrees", " Celsius"),
    ("She opened the door and said", " hello"),
    ("The stock market fell sharply after the report, and investors were", " worried"),
    ("To make tea, first boil the", " water"),
    ("The team won the final game of the season and the fans", " cheered"),
    ("My phone battery died, so I plugged in the", " charger"),
    ("The election results will be announced", " tomorrow"),
    ("He read the book in one", " night"),
    ("The recipe calls for two cups of", " flour"),
    ("Cats like to sleep in the", " sun"),
    ("The new chip is faster and uses less", " power"),
    ("After the rain stopped, a rainbow appeared in the", " sky"),
    ("The price of the laptop dropped by twenty", " percent"),
    ("Please answer yes or no: is the sky blue? Answer:", " yes"),
    ("Translate to French: cat =>", " chat"),
    ("The opposite of hot is", " cold"),
    ("One, two, three, four,", " five"),
]


def _prefix(bundle: Bundle, prompt: np.ndarray, batch: int):
    """The prompt's K/V computed once ([1, ...]) and repeated over the batch rows."""
    P = prompt.shape[0]
    _, pres = bundle.run(prompt[None], np.ones((1, P), np.int64), np.arange(P)[None],
                         bundle.empty_past(1), np.array([[P - 1]]))
    return [(np.repeat(k, batch, 0), np.repeat(v, batch, 0)) for k, v in pres]


def request_inputs(bundle: Bundle, prompt: np.ndarray, batch: int, seq: int, seed: int = 0):
    P = prompt.shape[0]
    ids = np.random.default_rng(seed).integers(0, bundle.vocab_size, size=(batch, seq))
    return (bundle.embed(ids), np.ones((batch, P + seq), np.int64),
            np.tile(P + np.arange(seq), (batch, 1)), _prefix(bundle, prompt, batch),
            np.tile(np.arange(seq), (batch, 1)))


def time_requests(bundles: dict[str, Bundle], prompt: np.ndarray, batch: int, seq: int,
                  repeats: int) -> dict[str, float]:
    """Median seconds of one request run per variant, measured round-robin."""
    inputs = {k: request_inputs(b, prompt, batch, seq) for k, b in bundles.items()}
    times = {k: [] for k in bundles}
    for k, b in bundles.items():  # warm-up
        b.run(*inputs[k])
    for _ in range(repeats):
        for k, b in bundles.items():
            t0 = time.perf_counter()
            b.run(*inputs[k])
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def score(bundle: Bundle, prompt: np.ndarray) -> np.ndarray:
    """Summed continuation log-prob of each SCORING_SET request (one padded batch)."""
    tok = bundle.tokenizer
    rows = [(tok.encode(c, add_special_tokens=False).ids,
             tok.encode(c + x, add_special_tokens=False).ids) for c, x in SCORING_SET]
    rows = [(ctx, full[len(ctx):]) if full[:len(ctx)] == ctx else
            (ctx, tok.encode(x, add_special_tokens=False).ids)
            for (ctx, full), (_, x) in zip(rows, SCORING_SET)]
    B, P = len(rows), prompt.shape[0]
    L = max(len(c) + len(x) for c, x in rows)
    K = max(len(x) for _, x in rows)
    ids = np.zeros((B, L), np.int64)
    mask = np.zeros((B, P + L), np.int64)
    mask[:, :P] = 1
    index = np.zeros((B, K), np.int64)
    for b, (c, x) in enumerate(rows):
        ids[b, :len(c) + len(x)] = c + x
        mask[b, P:P + len(c) + len(x)] = 1
        index[b, :len(x)] = len(c) - 1 + np.arange(len(x))  # logits that predict x
    logits, _ = bundle.run(bundle.embed(ids), mask, np.tile(P + np.arange(L), (B, 1)),
                           _prefix(bundle, prompt, B), index)
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.array([sum(logp[b, j, t] for j, t in enumerate(x)) for b, (_, x) in enumerate(rows)])


def text_prompt(bundle: Bundle, text: str, num_virtual_tokens: int) -> np.ndarray:
    """PEFT's TEXT init, torch-free: the text's token embeddings repeated to P rows."""
    ids = bundle.tokenizer.encode(text, add_special_tokens=False).ids
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    return np.asarray(bundle.embeddings[ids], np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--work", required=True, help="directory for the variant bundles")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --work")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    command = "python -m softprompt.bench.export_options " + shlex.join(
        sys.argv[1:] if argv is None else argv)

    work = Path(args.work)
    names = args.variants.split(",")
    export_s = {}
    for name in names:
        out = work / name
        if not (args.reuse and (out / "bundle.json").is_file()):
            from softprompt.export import export

            export(args.model, out, progress=False, **VARIANTS[name])
        export_s[name] = json.loads((out / "bundle.json").read_text())["total_seconds"]
    bundles = {n: load_bundle(work / n) for n in names}
    base = bundles[names[0]]
    prompt = text_prompt(base, "Classify the sentiment of this review as positive or negative.",
                         args.prefix)
    secs = time_requests(bundles, prompt, args.batch, args.seq, args.repeats)
    ref = score(base, prompt)
    tokens = args.batch * args.seq
    print(f"# {command}")
    print(f"# device: CPU ({cpu_model()}, {os.cpu_count()} cores), ORT CPU provider, "
          f"B={args.batch}, L={args.seq} on a cached P={args.prefix} prefix, "
          f"median of {args.repeats} round-robin runs")
    first = names[0]
    print(f"| variant | dtype | bundle MiB | export+validate s | request ms | tokens/s | "
          f"speed vs {first} ({first} ms / variant ms) | mean abs dlogprob vs {first} | "
          f"max abs dlogprob vs {first} |")
    print("|---|---|---|---|---|---|---|---|---|")
    figures = {}
    for n in names:
        b = bundles[n]
        size = sum(f["size"] for f in b.manifest["files"].values()) / 2**20
        d = np.abs(score(b, prompt) - ref)
        figures[n] = {"ms": secs[n] * 1e3, "speedup": secs[first] / secs[n], "baseline": first,
                      "mean_dlogprob": float(d.mean()), "max_dlogprob": float(d.max()),
                      "mib": size, "export_s": export_s[n]}
        print(f"| {n} | {b.dtype}{' int4 weights' if b.manifest.get('quantization') else ''} "
              f"| {size:.0f} | {export_s[n]:.0f} | {secs[n] * 1e3:.1f} | "
              f"{tokens / secs[n]:.0f} | {figures[n]['speedup']:.2f}x | {d.mean():.4f} | "
              f"{d.max():.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
