"""N concurrent callers against one batched call, side by side in one run (the engine's target).

    python -m softprompt.bench.concurrency --model default --backends onnx,torch --out bench/out/concurrency

For each backend, on one Runtime with the demo sentiment prompt (its P, the backend's device and
dtype are read from the runtime and printed with the figures):

- generation: ``--gen-callers`` threads each call ``rt.generate`` for one row of
  ``--new-tokens`` greedy tokens, against one ``rt.generate`` call with the same rows, and
  against the same rows called one after another (what a runtime without continuous batching
  does: each caller waits for the previous one). Texts must be equal in all three.
- scoring: ``--score-callers`` threads each call ``rt.score`` for one request, against one
  ``rt.score`` call with all of them. Scores must agree within the tolerance table.
- joining: while ``--gen-callers`` generations decode, one more arrives; the engine steps
  between its arrival and its first token, and the time that took.

Each measurement is the median of ``--repeats`` runs after one warm-up, the batched and the
concurrent forms interleaved so that machine noise hits both alike. Writes concurrency.json,
concurrency.md and concurrency.png under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

CONTEXTS = ["Review: The soup was cold and the waiter ignored us.\nSentiment:",
            "Review: Best pizza I have had in years, friendly staff.\nSentiment:",
            "Review: Overpriced, tiny portions, never again.\nSentiment:",
            "Review: A cosy place with lovely music and great coffee.\nSentiment:",
            "Review: The fries were soggy but the burger was fine.\nSentiment:",
            "Review: Wonderful service, we will come back soon.\nSentiment:",
            "Review: Noisy room and the fish smelled off.\nSentiment:",
            "Review: Fresh ingredients, generous plates, fair prices.\nSentiment:"]


def _threads(fn, n: int) -> list:
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(rt, prompt: str, gen_callers: int, new_tokens: int, score_callers: int,
            repeats: int) -> dict:
    ctx = [CONTEXTS[i % len(CONTEXTS)] for i in range(gen_callers)]
    kw = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    reqs = [{"prompt": prompt, "context": CONTEXTS[i % len(CONTEXTS)],
             "continuation": [" positive", " negative"][i % 2]} for i in range(score_callers)]

    def gen_batched():
        return [r.text for r in rt.generate(prompt, ctx, **kw)]

    def gen_concurrent():
        return _threads(lambda i: rt.generate(prompt, [ctx[i]], **kw)[0].text, gen_callers)

    def gen_sequential():
        return [rt.generate(prompt, [c], **kw)[0].text for c in ctx]

    def score_batched():
        return [r.logprob for r in rt.score(reqs)]

    def score_concurrent():
        return _threads(lambda i: rt.score([reqs[i]])[0].logprob, score_callers)

    forms = {"gen_batched": gen_batched, "gen_concurrent": gen_concurrent,
             "gen_sequential": gen_sequential, "score_batched": score_batched,
             "score_concurrent": score_concurrent}
    times = {k: [] for k in forms}
    outs = {k: f() for k, f in forms.items()}  # warm-up, and the results to compare
    for _ in range(repeats):
        for k, f in forms.items():
            t, _ = _timed(f)
            times[k].append(t)
    assert outs["gen_concurrent"] == outs["gen_batched"] == outs["gen_sequential"], \
        "concurrent generations differ from the batched call"
    np.testing.assert_allclose(outs["score_concurrent"], outs["score_batched"], atol=1e-4, rtol=0)

    # joining: gen_callers streams decoding, one more arrives
    streams = [rt.stream(prompt, c, max_new_tokens=4 * new_tokens, stop_at_eos=False) for c in ctx]
    for s in streams:
        next(s)
    t0 = time.perf_counter()
    late = rt.stream(prompt, CONTEXTS[0], max_new_tokens=4, stop_at_eos=False)
    next(late)
    ttft = time.perf_counter() - t0
    join_steps = late.seq.first_token_step - late.seq.arrived_step
    for s in streams + [late]:
        s.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    rng = {k: (min(v), max(v)) for k, v in times.items()}
    return {"median_s": med, "min_max_s": rng,
            "gen_ratio": med["gen_concurrent"] / med["gen_batched"],
            "gen_sequential_ratio": med["gen_sequential"] / med["gen_batched"],
            "score_ratio": med["score_concurrent"] / med["score_batched"],
            "join_steps": join_steps, "join_ttft_s": ttft}


def markdown(results: dict, env: dict, args) -> str:
    ran = "; ".join(f"{r['runtime']}, prompt {r['prompt']} (demo sentiment)" for r in results.values())
    lines = [f"Device: {env['device_name']} ({env['cpu_count']} cores); {ran}; model "
             f"`{args.model}`, load average at start "
             f"{env['load_average'][0]:.1f}. {args.gen_callers} generations x {args.new_tokens} "
             f"greedy tokens; {args.score_callers} scores of ~16 context tokens + 1 label; "
             f"median of {args.repeats} (min-max).", "",
             "| backend | 1 call, all rows | concurrent callers | concurrent / 1 call | one after another "
             "| one after another / 1 call |",
             "|---|---|---|---|---|---|"]
    for be, r in results.items():
        m, mm = r["median_s"], r["min_max_s"]

        def cell(k):
            return f"{m[k] * 1e3:.0f} ms ({mm[k][0] * 1e3:.0f}-{mm[k][1] * 1e3:.0f})"

        lines.append(f"| {be} generate | {cell('gen_batched')} | {cell('gen_concurrent')} | "
                     f"**{r['gen_ratio']:.2f}x** | {cell('gen_sequential')} | "
                     f"{r['gen_sequential_ratio']:.2f}x |")
        lines.append(f"| {be} score | {cell('score_batched')} | {cell('score_concurrent')} | "
                     f"**{r['score_ratio']:.2f}x** | | |")
    lines += ["", f"| backend | a generation joining {args.gen_callers} running ones: engine steps to "
                  "first token | time to first token |", "|---|---|---|"]
    for be, r in results.items():
        lines.append(f"| {be} | {r['join_steps']} | {r['join_ttft_s'] * 1e3:.0f} ms |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(results)
    x = np.arange(len(names))
    ax.bar(x - 0.25, [results[n]["gen_sequential_ratio"] for n in names], 0.25,
           label="generate, callers one after another")
    ax.bar(x, [results[n]["gen_ratio"] for n in names], 0.25, label="generate, concurrent callers")
    ax.bar(x + 0.25, [results[n]["score_ratio"] for n in names], 0.25, label="score, concurrent callers")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel("wall time / one batched call")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "concurrency.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softprompt.bench.concurrency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--backends", default="onnx,torch")
    p.add_argument("--gen-callers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--score-callers", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out/concurrency")
    args = p.parse_args(argv)
    from softprompt import Runtime
    from softprompt.bench.driver import environment
    from softprompt.bench.labels import prompt_lengths, runtime_label
    from softprompt.runtime.demo import PROMPTS_DIR
    from softprompt.runtime.factory import default_device, default_dtype

    env = environment(default_device(), default_dtype(default_device()))
    results = {}
    for be in args.backends.split(","):
        rt = Runtime.load(args.model, backend=be)
        rt.add_prompt("sentiment", PROMPTS_DIR / "sentiment")
        results[be] = measure(rt, "sentiment", args.gen_callers, args.new_tokens,
                              args.score_callers, args.repeats)
        results[be].update(runtime=runtime_label(rt), prompt=prompt_lengths(rt, ["sentiment"]))
        rt.close()
        print(be, json.dumps({k: v for k, v in results[be].items() if "ratio" in k or "join" in k
                              or k in ("runtime", "prompt")}),
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m softprompt.bench.concurrency " + shlex.join(argv if argv is not None else sys.argv[1:])
    (out / "concurrency.json").write_text(json.dumps({"env": env, "command": cmd, "results": results},
                                                     indent=1))
    md = markdown(results, env, args) + f"\nCommand: `{cmd}`\n"
    (out / "concurrency.md").write_text(md)
    plot(results, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
