"""End-to-end batch scoring on a GPU: PEFT recompute vs a copied prefix cache vs ours (torch + Triton).

    python bench/gpu_e2e.py --out "$OUT/e2e.json"      # GPU (H100/H200), bf16, well under 150 s
    python bench/gpu_e2e.py --cpu-smoke                # tiny config, CPU, float32: proves the code path

Models: random bf16 weights (seeded, normal(0, 0.02)) in two Llama shapes, the anchors' ones:
  llama-1b      hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab 128256
  smollm2-135m  hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152
Points: B in {1, 16, 64} x P in {20, 100} x L in {32, 128}; llama-1b first, smollm2-135m while the
time budget (--budget-s) lasts. Each request is L random ids whose last one is scored (its
log-probability given the prompt and the L - 1 ids before it), all rows under one prompt.

Methods, each timed as one call that returns the scored log-probs on the host:
  peft    peft.PeftModelForCausalLM with a PROMPT_TUNING adapter: the P virtual tokens are
          recomputed every call, logits at all P + L positions (what PEFT does);
  copied  transformers with the prompt's K/V computed once and copied into each row of a
          DynamicCache, request tokens on top, logits only at the scored position
          (softprompt.bench.methods.CopiedPrefix);
  ours    Runtime(backend="torch") on CUDA: the cached prefix shared by all rows through the
          Triton prefix-attention kernels, vocabulary projection only where scored, each padded
          shape replayed as a CUDA graph (runtime/graphs.py; the default on CUDA);
  eager   the same runtime with cuda_graphs=False: what the graphs buy.

Then greedy generation (B=4, P=20, 32-token contexts, 32 new tokens): ours vs eager, tokens
compared and ms per generated token (decode steps replayed as CUDA graphs vs eager).

Before timing, ours (and copied, for context) is compared with PEFT on the timed batch: max
|log-prob difference| <= --tol (the project's bf16 SCORE tolerance, 0.1); a point where ours
fails is reported FAILED and ours is not timed there. Timing: CUDA events, --warmup calls, then
the median of --runs calls (>= 15). Achieved TFLOP/s uses softprompt.bench.flops.flops (work
each method really does). When the anchors JSON is found (shared/anchors/ or --anchors), the
anchor's PEFT and copied-cache figures (H200) are printed next to ours.

Needs torch, transformers, peft (and triton on CUDA); installs nothing. `softprompt` is imported
from this checkout when it is not installed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # LlamaConfig kwargs
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                     max_position_embeddings=4096, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                         max_position_embeddings=2048, rope_theta=100000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, max_position_embeddings=512),
}
GPU_GRID = dict(B=(1, 16, 64), P=(20, 100), L=(32, 128))
SMOKE_GRID = dict(B=(1, 4), P=(3, 10), L=(5, 8))


def _import_softprompt():
    """Import the installed ``softprompt``. A checkout is used installed: ``pip install --no-deps
    -e .`` maps its runtime/, kernels/, models/, export/, bench/ folders to the subpackages
    (bench/gpu_check.sh does it first)."""
    try:
        importlib.import_module("softprompt.runtime.api")
        importlib.import_module("softprompt.bench.driver")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("softprompt"):
            raise
        raise SystemExit(f"gpu_e2e: {e}; install this checkout first: "
                         f"pip install --no-deps -e {ROOT}") from None
    return f"from {Path(sys.modules['softprompt'].__file__).parent}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON result path, or a directory for e2e.json "
                   "(default: ./gpu_e2e.json)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU in float32")
    p.add_argument("--runs", type=int, default=15, help="timed calls per method and point "
                   "(median reported; default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--skip-checks", action="store_true", help="time only, no comparison with PEFT")
    p.add_argument("--tol", type=float, default=None,
                   help="max |log-prob diff| of ours vs PEFT (default: SCORE table, bf16 0.1 / fp32 1e-4)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="stop starting new points after this many seconds (default 120: "
                        "bench/gpu_check.sh kills this step at 150 s)")
    p.add_argument("--models", default=None, help="comma list among llama-1b,smollm2-135m")
    p.add_argument("--anchors", default=None, help="anchor baseline JSON (default: looked up)")
    args, unknown = p.parse_known_args(argv)
    if unknown:  # gpu_check.sh passes its extra arguments to every script
        print(f"# ignoring arguments meant for other scripts: {unknown}")
    return args


class Tok:
    """Stands in for a tokenizer: requests here are token ids, Runtime only keeps the object."""

    def __init__(self):
        from tokenizers import Tokenizer, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def build_model(torch, shape: str, device: str, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def load_anchors(path) -> dict:
    cands = [Path(path)] if path else [ROOT / "shared" / "anchors" / "2026-11-26-h200-anchor-baseline.json",
                                       Path("/work/shared/anchors/2026-11-26-h200-anchor-baseline.json")]
    for c in cands:
        if c.is_file():
            rows = json.loads(c.read_text())["rows"]
            return {(r["model"], r["B"], r["P"], r["L"]): r for r in rows}
    return {}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    how = _import_softprompt()
    import numpy as np
    import torch
    from peft import PeftModelForCausalLM, PromptTuningConfig

    from softprompt.bench.flops import Dims, flops
    from softprompt.bench.methods import CopiedPrefix
    from softprompt.models import LoadedModel
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.prompts import SoftPrompt

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device; use --cpu-smoke on a CPU machine")
        return 2
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    dname = "float32" if smoke else "bfloat16"
    tol = args.tol if args.tol is not None else (1e-4 if smoke else 1e-1)
    grid = SMOKE_GRID if smoke else GPU_GRID
    shapes = ["tiny"] if smoke else (args.models.split(",") if args.models else ["llama-1b", "smollm2-135m"])
    anchors = {} if smoke else load_anchors(args.anchors)
    runs, warmup = max(args.runs, 15), args.warmup
    env = {"device": torch.cuda.get_device_name() if not smoke else platform.processor() or "cpu",
           "dtype": dname, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": importlib.import_module("transformers").__version__,
           "peft": importlib.import_module("peft").__version__,
           "triton": _version("triton"), "python": platform.python_version(), "softprompt": how,
           "runs": runs, "warmup": warmup, "tol": tol, "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))

    def timed_once(fn) -> float:
        """ms of one call: CUDA events on the GPU (the call ends by copying results to host)."""
        if smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def timed(fn) -> list[float]:
        """ms per call of --runs calls after --warmup untimed ones."""
        for _ in range(warmup):
            fn()
        return [timed_once(fn) for _ in range(runs)]

    rows, skipped, gens, graph_stats = [], [], [], {}
    for shape in shapes:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(f"{shape}: all points (time budget)")
            continue
        t0 = time.perf_counter()
        base = build_model(torch, shape, device, dtype)
        mine = copy.deepcopy(base)  # ours re-registers the attention function on its model
        dims = Dims.from_model(base)
        lm = LoadedModel(mine, Tok(), f"random-{shape}-seed0", f"random:{shape}")
        limits = dict(max_batch=max(grid["B"]), max_batch_tokens=max(grid["B"]) * max(grid["L"]))
        rt = Runtime.load(lm, backend="torch", **limits)  # CUDA graphs: on by default on CUDA
        eager = Runtime.load(lm, backend="torch", cuda_graphs=False, **limits)
        if smoke:  # no CUDA graphs on CPU; still run ours through the padded shapes they use
            rt.backend.buckets = True
        copied = CopiedPrefix(base)
        table = base.get_input_embeddings().weight
        peft_models, rng = {}, np.random.default_rng(0)
        for P in grid["P"]:
            emb = table[torch.as_tensor(rng.integers(0, dims.vocab_size, P), device=device)].float()
            sp = SoftPrompt(emb.cpu().numpy(), name=f"p{P}")
            rt.add_prompt(sp.name, sp)  # prefix computed here, once
            eager.add_prompt(sp.name, sp)
            copied.prepare(sp.name, sp.embeddings)
            pm = PeftModelForCausalLM(base, PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=P),
                                      adapter_name=sp.name)
            with torch.no_grad():
                enc = pm.prompt_encoder[sp.name].embedding.weight
                enc.copy_(emb.to(enc.dtype))
            peft_models[P] = pm.eval()
        print(f"# {shape}: built, prompts prepared in {time.perf_counter() - t0:.1f} s")

        for B in grid["B"]:
            for P in grid["P"]:
                for L in grid["L"]:
                    if time.perf_counter() - t_start > args.budget_s:
                        skipped.append(f"{shape} B={B} P={P} L={L} (time budget)")
                        continue
                    g = torch.Generator().manual_seed(B * 1000 + P * 10 + L)
                    ids = torch.randint(0, dims.vocab_size, (B, L), generator=g).to(device)
                    ids_np = ids.cpu().numpy()
                    reqs = [{"prompt": f"p{P}", "context": r[:-1].tolist(),
                             "continuation": r[-1:].tolist()} for r in ids_np]
                    pm = peft_models[P]
                    mask = torch.ones(B, L, dtype=torch.long, device=device)

                    @torch.inference_mode()
                    def peft_call():
                        logits = pm(input_ids=ids, attention_mask=mask).logits  # [B, P+L, V]
                        lp = logits[:, P + L - 2].float().log_softmax(-1)
                        return lp.gather(-1, ids[:, -1:])[:, 0].cpu().numpy()

                    def copied_call():
                        return copied.logprobs(f"p{P}", ids, 1)[:, 0]

                    def ours_call():
                        return np.array([r.token_logprobs[0] for r in rt.score(reqs)])

                    def eager_call():
                        return np.array([r.token_logprobs[0] for r in eager.score(reqs)])

                    row = dict(model=shape, B=B, P=P, L=L, status="ok")
                    ours_ok = True
                    if not args.skip_checks:
                        want = peft_call()
                        row["ours_max_abs_diff"] = float(np.abs(ours_call() - want).max())
                        row["eager_max_abs_diff"] = float(np.abs(eager_call() - want).max())
                        row["copied_max_abs_diff"] = float(np.abs(copied_call() - want).max())
                        for m in ("ours", "eager"):
                            if not row[f"{m}_max_abs_diff"] <= tol:
                                ours_ok = False
                                row["status"] = f"FAILED: {m} vs peft {row[m + '_max_abs_diff']:.3g} > {tol}"
                    for name, fn in (("peft", peft_call), ("copied", copied_call), ("ours", ours_call),
                                     ("eager", eager_call)):
                        if name in ("ours", "eager") and not ours_ok:
                            continue
                        t = timed(fn)
                        ms = statistics.median(t)
                        row[f"{name}_ms"] = round(ms, 4)
                        row[f"{name}_min_ms"] = round(min(t), 4)
                        row[f"{name}_max_ms"] = round(max(t), 4)
                        method = "reference" if name == "peft" else "cached"
                        row[f"{name}_tflops"] = round(flops(dims, method, B, P, L, 1) / ms / 1e9, 3)
                    if ours_ok:
                        row["speedup_vs_peft"] = round(row["peft_ms"] / row["ours_ms"], 3)
                        row["speedup_vs_copied"] = round(row["copied_ms"] / row["ours_ms"], 3)
                        row["graphs_speedup"] = round(row["eager_ms"] / row["ours_ms"], 3)
                    a = anchors.get((shape, B, P, L))
                    if a:
                        row["anchor_peft_ms"], row["anchor_copied_ms"] = a["full_ms"], a["cached_ms"]
                        row["anchor_floor_ms"] = a["floor_ms"]
                    rows.append(row)
                    print(f"# {shape} B={B} P={P} L={L}: " + ", ".join(
                        f"{m} {row[m + '_ms']:.2f} ms" for m in ("peft", "copied", "ours", "eager")
                        if m + "_ms" in row) + f" [{row['status']}]", flush=True)
        if time.perf_counter() - t_start <= args.budget_s:
            gens.append(generation(shape, rt, eager, dims.vocab_size, smoke, timed_once))
        else:
            skipped.append(f"{shape}: generation (time budget)")
        graph_stats[shape] = {k: v for k, v in rt.stats().items() if "graph" in k}
        print(f"# {shape}: {graph_stats[shape]}")
        rt.close()
        eager.close()
        rt = eager = copied = peft_models = base = mine = lm = None  # free this shape's memory
        if not smoke:
            torch.cuda.empty_cache()

    print()
    print(markdown(rows))
    for g in gens:
        print(f"\ngeneration {g['model']} B={g['B']} P={g['P']} L={g['L']} new={g['new_tokens']}: "
              f"ours {g['ours_ms_per_token']:.2f} ms/token, eager {g['eager_ms_per_token']:.2f} "
              f"ms/token ({g['graphs_speedup']:.2f}x), tokens equal: {g['tokens_equal']}; "
              f"rows joining and leaving: {g['join_leave_ms_per_step']:.2f} ms/step, equal to alone: "
              f"{g['join_leave_tokens_equal']}")
    print(f"\ngraphs: {graph_stats}")
    if skipped:
        print(f"\nskipped: {'; '.join(skipped)}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    out = Path(args.out) if args.out else Path("gpu_e2e.json")
    if out.is_dir():
        out = out / "e2e.json"
    if smoke and not args.out:
        out = Path("/tmp") / "gpu_e2e_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows, "generation": gens, "graphs": graph_stats,
                               "skipped": skipped, "total_s": total}, indent=1))
    print(f"wrote {out}")
    disabled = [f"{m}: {g['graphs_disabled']}" for m, g in graph_stats.items() if g.get("graphs_disabled")]
    if disabled:
        print(f"FAILED: CUDA graphs turned themselves off: {disabled}")
    bad_gen = [g["model"] for g in gens if not (g["tokens_equal"] and g["join_leave_tokens_equal"])]
    if bad_gen:
        print(f"FAILED: greedy tokens differ between graphs and eager, or rows joining and "
              f"leaving the engine's decode steps differ from the request alone: {bad_gen}")
    return 1 if any(r["status"] != "ok" for r in rows) or disabled or bad_gen else 0


def generation(shape, rt, eager, vocab: int, smoke: bool, timed_once, B=4, P=20, L=32, new=32) -> dict:
    """Greedy generation through the CUDA-graph runtime and the eager one: same tokens, and the
    median ms per generated token over 3 calls after one warm-up (which captures the graphs)."""
    import numpy as np

    if smoke:
        P, L, new = 3, 5, 8
    ids = np.random.default_rng(1).integers(3, vocab, (B, L)).tolist()
    kw = dict(max_new_tokens=new, stop_at_eos=False)
    out = {}
    for name, r in (("ours", rt), ("eager", eager)):
        toks = [g.token_ids for g in r.generate(f"p{P}", ids, **kw)]  # warm-up (and capture)
        ms = statistics.median(timed_once(lambda: r.generate(f"p{P}", ids, **kw)) for _ in range(3))
        out[name] = (toks, ms / new)
    # The engine's decode steps with rows joining and leaving: streams of different lengths,
    # each started after the running ones took a step, so rows join the graphed decode pool
    # mid-generation and leave it at different steps. Each must equal its request run alone
    # on the eager runtime.
    lengths = [new // 2 + 3 * i for i in range(B)]
    streams, got = [], [[] for _ in range(B)]
    steps0, t0 = rt.engine.steps, time.perf_counter()
    for i, row in enumerate(ids):
        for k, s in enumerate(streams):
            c = next(s, None)
            got[k] += c.token_ids if c else []
        streams.append(rt.stream(f"p{P}", row, max_new_tokens=lengths[i], stop_at_eos=False))
    for k, s in enumerate(streams):
        got[k] += [t for c in s for t in c.token_ids]
    join_ms = (time.perf_counter() - t0) * 1e3 / max(1, rt.engine.steps - steps0)
    alone = [eager.generate(f"p{P}", [row], max_new_tokens=n, stop_at_eos=False)[0].token_ids
             for row, n in zip(ids, lengths)]
    return dict(model=shape, B=B, P=P, L=L, new_tokens=new, tokens_equal=out["ours"][0] == out["eager"][0],
                ours_ms_per_token=round(out["ours"][1], 4), eager_ms_per_token=round(out["eager"][1], 4),
                graphs_speedup=round(out["eager"][1] / out["ours"][1], 3),
                join_leave_tokens_equal=got == alone, join_leave_ms_per_step=round(join_ms, 4))


def markdown(rows) -> str:
    def f(x, fmt=".2f"):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    lines = ["| model | B | P | L | PEFT ms | copied ms | ours ms | vs PEFT | vs copied | ours TFLOP/s "
             "| eager ms (no graphs) | anchor PEFT / copied ms | ours-PEFT max diff | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        anchor = (f"{r['anchor_peft_ms']:.1f} / {r['anchor_copied_ms']:.1f}"
                  if "anchor_peft_ms" in r else "-")
        lines.append(f"| {r['model']} | {r['B']} | {r['P']} | {r['L']} | {f(r.get('peft_ms'))} | "
                     f"{f(r.get('copied_ms'))} | {f(r.get('ours_ms'))} | "
                     f"{f(r.get('speedup_vs_peft'))}x | {f(r.get('speedup_vs_copied'))}x | "
                     f"{f(r.get('ours_tflops'), '.1f')} | {f(r.get('eager_ms'))} | {anchor} | "
                     f"{f(r.get('ours_max_abs_diff'), '.3g')} | {r['status'].split(':')[0]} |")
    return "\n".join(lines)


def _version(pkg: str):
    try:
        return importlib.import_module(pkg).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
