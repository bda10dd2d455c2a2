"""End to end on a GPU: first correctness in float32 against PEFT, then speed in bf16.

    python bench/gpu_e2e.py --out "$OUT/e2e.json"      # GPU (H100/H200): checks, then timings; ~4 min
    python bench/gpu_e2e.py --cpu-smoke                # tiny config, CPU, float32: proves the code path
    python bench/gpu_e2e.py --cpu-smoke --checks-only  # the checks and their self-test alone (seconds)

Models: random weights (seeded) in two Llama shapes, the anchors' ones:
  llama-1b      hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab 128256
  smollm2-135m  hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152
("tiny" in --cpu-smoke: hidden 128, 2 layers.)

1. Checks, float32 (the GPU's, and PEFT's, in float32), each shape, --weights scaled (default):
   every matrix normal(0, 1/sqrt(fan_in)) and the embedding table normal(0, 1), so attention is
   peaked and logits spread; the anchors' normal(0, 0.02) weights make attention nearly uniform
   and outputs nearly flat, which hides position and prefix bugs (on the SmolLM2 shape the three
   classic ones below move a scored log-prob by 0.018-0.037 nats there, by 0.06-0.5 with scaled
   weights). Held to the float32 SCORE tolerance (softprompt/tolerances.py, 1e-4):
   - scores: ours (torch backend, Triton kernels, CUDA graphs) and eager (graphs off) against
     PEFT on batches of one prompt, and on a batch mixing two prompts and lengths (PEFT on each
     request alone);
   - engine: greedy generation, graphs vs eager (tokens identical), each token PEFT's argmax
     (PEFT's forward over the generated text: top log-prob - the token's <= tol), and rows
     joining and leaving the graphed decode pool equal to each request alone;
   - self-test (bench/mutations.py): the score check on the mixed batch, re-run on the eager
     runtime with each classic bug put in on purpose (request positions from 0, the last prefix
     key dropped, one future key visible, prompts swapped between rows), must FAIL each time. A
     mutation it does not catch fails the run: a check that cannot fail proves nothing.
2. Timings, bf16 (float32 in --cpu-smoke), the anchors' normal(0, 0.02) weights:
   B in {1, 16, 64} x P in {20, 100} x L in {32, 128}, llama-1b first, smollm2-135m while the time
   budget (--budget-s) lasts. Each request is L random ids whose last one is scored. Methods, each
   timed as one call that returns the scored log-probs on the host:
     peft    peft.PeftModelForCausalLM with a PROMPT_TUNING adapter: the P virtual tokens
             recomputed every call, logits at all P + L positions (what PEFT does);
     copied  transformers with the prompt's K/V computed once and copied into each row of a
             DynamicCache, request tokens on top, logits only at the scored position
             (softprompt.bench.methods.CopiedPrefix);
     ours    Runtime(backend="torch"): the cached prefix shared by all rows through the Triton
             kernels, vocabulary projection only where scored, CUDA graphs (runtime/graphs.py);
     eager   the same runtime with cuda_graphs=False: what the graphs buy.
   Speed only: each method's max |log-prob - PEFT's| in bf16 is recorded for information (the
   correctness is phase 1's); a non-finite result fails the point. Then greedy generation (B=4,
   P=20, 32-token contexts, 32 new tokens): ms per generated token, graphs vs eager.
   Timing: CUDA events, --warmup calls, then the median of --runs calls (>= 15). Columns name the
   baseline they divide: "ours vs PEFT" is PEFT ms / ours ms, "vs copied" copied ms / ours ms,
   "graphs" eager ms / ours ms. TFLOP/s uses softprompt.bench.flops.flops (work each method really
   does). When the anchors JSON is found (shared/anchors/ or --anchors), the anchor's PEFT and
   copied-cache figures (H200) are printed next to ours.

Exit status 1 on any failed check, uncaught mutation, graphs turned off, or non-finite timing
point. Needs torch, transformers, peft (and triton on CUDA); installs nothing; ``softprompt``
must be installed from this checkout (bench/gpu_check.sh does it).
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
# (B, P, L) of the float32 score checks; the mixed batch and the self-test use both P of the grid
GPU_CHECKS = ((1, 20, 32), (16, 100, 32), (16, 20, 128))
SMOKE_CHECKS = ((1, 3, 5), (4, 10, 8))


def _import_softprompt():
    """Import the installed ``softprompt``. A checkout is used installed: ``pip install --no-deps
    -e .`` maps its runtime/, prefix_kernels/, models/, export/, bench/ folders to the subpackages
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
                   "(default: ./gpu_e2e.json; /tmp/gpu_e2e_smoke.json with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU in float32")
    p.add_argument("--checks-only", action="store_true", help="phase 1 only: the float32 checks "
                   "and their self-test, no timings")
    p.add_argument("--weights", choices=["scaled", "random"], default="scaled",
                   help="weights of the float32 checks: scaled (default) or the anchors' "
                        "normal(0, 0.02)")
    p.add_argument("--runs", type=int, default=15, help="timed calls per method and point "
                   "(median reported; default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--tol", type=float, default=None,
                   help="max |log-prob diff| of the float32 checks (default: SCORE table, 1e-4)")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="stop starting new timing points after this many seconds since the start "
                        "(default 170: bench/gpu_check.sh kills this step at 240 s)")
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


def build_model(torch, shape: str, device: str, dtype, weights: str = "random", seed: int = 0):
    """A LlamaForCausalLM of ``shape``: weights "random" (every matrix normal(0, 0.02), as the
    anchors) or "scaled" (matrices normal(0, 1/sqrt(fan_in)), the embedding table normal(0, 1))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 if weights == "random" else (1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)
                p.normal_(0.0, std)
    return model.eval().requires_grad_(False)


def load_anchors(path) -> dict:
    cands = [Path(path)] if path else [ROOT / "shared" / "anchors" / "2026-11-26-h200-anchor-baseline.json",
                                       Path("/work/shared/anchors/2026-11-26-h200-anchor-baseline.json")]
    for c in cands:
        if c.is_file():
            rows = json.loads(c.read_text())["rows"]
            return {(r["model"], r["B"], r["P"], r["L"]): r for r in rows}
    return {}


class Setup:
    """One shape in one dtype: the model PEFT wraps, a copy our two runtimes serve (graphs on:
    ``rt``; off: ``eager``), the prompts p{P} (random rows of the embedding table) registered in
    both, and one PEFT model per P holding the same prompt."""

    def __init__(self, torch, shape, device, dtype, weights, Ps, limits, smoke):
        import numpy as np
        from peft import PeftModelForCausalLM, PromptTuningConfig

        from softprompt.bench.flops import Dims
        from softprompt.models import LoadedModel
        from softprompt.runtime.api import Runtime
        from softprompt.runtime.prompts import SoftPrompt

        self.torch, self.device, self.smoke = torch, device, smoke
        self.base = build_model(torch, shape, device, dtype, weights)
        mine = copy.deepcopy(self.base)  # ours re-registers the attention function on its model
        self.dims = Dims.from_model(self.base)
        lm = LoadedModel(mine, Tok(), f"random-{shape}-{weights}-seed0", f"random:{shape}")
        dname = str(dtype).removeprefix("torch.")
        self.rt = Runtime.load(lm, backend="torch", device=device, dtype=dname, **limits)
        self.eager = Runtime.load(lm, backend="torch", device=device, dtype=dname, cuda_graphs=False,
                                  **limits)
        if smoke:  # no CUDA graphs on CPU; still run ours through the padded shapes they use
            self.rt.backend.buckets = True
        table = self.base.get_input_embeddings().weight
        self.peft, rng = {}, np.random.default_rng(0)
        self.prompts = {}
        for P in Ps:
            emb = table[torch.as_tensor(rng.integers(0, self.dims.vocab_size, P), device=device)].float()
            sp = SoftPrompt(emb.cpu().numpy(), name=f"p{P}")
            self.prompts[P] = sp
            self.rt.add_prompt(sp.name, sp)  # prefix computed here, once
            self.eager.add_prompt(sp.name, sp)
            pm = PeftModelForCausalLM(self.base, PromptTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=P),
                                      adapter_name=sp.name)
            with torch.no_grad():
                enc = pm.prompt_encoder[sp.name].embedding.weight
                enc.copy_(emb.to(enc.dtype))
            self.peft[P] = pm.eval()

    def peft_last(self, P: int, ids):
        """PEFT's log-prob of each row's last id given its prompt and the ids before it: [B]."""
        torch = self.torch
        with torch.inference_mode():
            mask = torch.ones_like(ids)
            logits = self.peft[P](input_ids=ids, attention_mask=mask).logits  # [B, P + L, V]
            lp = logits[:, -2].float().log_softmax(-1)
            return lp.gather(-1, ids[:, -1:])[:, 0].cpu().numpy()

    def greedy_gap(self, P: int, ids, tokens) -> float:
        """How far each of ``tokens`` (a greedy continuation of ``ids``) is from PEFT's own
        greedy choice at that step: max over steps of (PEFT's top log-prob - the token's). 0 when
        every token is PEFT's argmax; a near tie may leave a difference within the tolerance."""
        torch = self.torch
        full = torch.as_tensor([list(a) + list(t) for a, t in zip(ids, tokens)], device=self.device)
        with torch.inference_mode():
            logits = self.peft[P](input_ids=full, attention_mask=torch.ones_like(full)).logits
            lp = logits[:, P + len(ids[0]) - 1: -1].float().log_softmax(-1)  # [B, new, V]
            chosen = lp.gather(-1, full[:, len(ids[0]):, None])[..., 0]
            return float((lp.max(-1).values - chosen).max())

    def close(self):
        self.rt.close()
        self.eager.close()


def requests(name, ids) -> list:
    return [{"prompt": name, "context": r[:-1].tolist(), "continuation": r[-1:].tolist()} for r in ids]


def last_logprobs(rt, reqs):
    import numpy as np

    return np.array([r.token_logprobs[-1] for r in rt.score(reqs)])


def mixed_batch(torch, S: Setup, Ps, n: int, L: int):
    """n rows alternating the prompts of Ps, lengths L/2..L: (requests, PEFT on each alone)."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    reqs, want = [], []
    for i in range(n):
        P, length = Ps[i % len(Ps)], max(2, L - (i * L) // (2 * n))
        ids = torch.randint(0, S.dims.vocab_size, (1, length), generator=g).to(S.device)
        reqs += requests(f"p{P}", ids.cpu().numpy())
        want.append(S.peft_last(P, ids)[0])
    return reqs, np.array(want)


def run_checks(torch, S: Setup, shape, points, Ps, tol, smoke) -> tuple[list, dict, dict]:
    """Phase 1 on one shape: score rows, the mutation self-test, the engine check."""
    from softprompt.bench.mutations import max_abs_diff, self_test

    rows = []
    for B, P, L in points:
        ids = torch.randint(0, S.dims.vocab_size, (B, L),
                            generator=torch.Generator().manual_seed(B * 1000 + P * 10 + L)).to(S.device)
        want = S.peft_last(P, ids)
        reqs = requests(f"p{P}", ids.cpu().numpy())
        rows.append(check_row(shape, f"B={B} P={P} L={L}", S, reqs, want, tol))
    n = 4 if smoke else 8
    L = max(p[2] for p in points)
    reqs, want = mixed_batch(torch, S, Ps, n, L)
    rows.append(check_row(shape, f"mixed B={n} P={'/'.join(map(str, Ps))} L<={L}", S, reqs, want, tol))
    mutations = self_test(lambda: last_logprobs(S.eager, reqs), want, tol)
    base = max_abs_diff(last_logprobs(S.eager, reqs), want)  # unmutated again: nothing left behind
    for name, m in mutations.items():
        print(f"  self-test {shape} {name:20s} max |eager - PEFT| {m['max_abs_diff']:.3g}: "
              f"{'caught' if m['caught'] else 'NOT CAUGHT'}", flush=True)
    engine = engine_check(S, shape, Ps[0], smoke, tol)
    return rows, {"shape": shape, "tol": tol, "after": base, **mutations}, engine


def check_row(shape, point, S: Setup, reqs, want, tol) -> dict:
    from softprompt.bench.mutations import max_abs_diff

    row = {"model": shape, "point": point, "tol": tol, "status": "ok"}
    for m, rt in (("ours", S.rt), ("eager", S.eager)):
        row[f"{m}_max_abs_diff"] = d = max_abs_diff(last_logprobs(rt, reqs), want)
        if not d <= tol:
            row["status"] = f"FAILED: {m} vs PEFT {d:.3g} > {tol:g}"
    print(f"  check {shape} {point}: ours {row['ours_max_abs_diff']:.3g}, eager "
          f"{row['eager_max_abs_diff']:.3g} (max |log-prob - PEFT|, tol {tol:g}) [{row['status']}]",
          flush=True)
    return row


def engine_check(S: Setup, shape: str, P: int, smoke: bool, tol: float, B=4, L=32, new=16) -> dict:
    """Greedy tokens: graphs == eager, each PEFT's argmax (within ``tol`` of PEFT's top log-prob,
    so a near tie cannot fail it); rows joining and leaving == each row alone."""
    import numpy as np

    if smoke:
        L, new = 5, 8
    ids = np.random.default_rng(1).integers(3, S.dims.vocab_size, (B, L)).tolist()
    kw = dict(max_new_tokens=new, stop_at_eos=False)
    ours = [g.token_ids for g in S.rt.generate(f"p{P}", ids, **kw)]
    ours_again = [g.token_ids for g in S.rt.generate(f"p{P}", ids, **kw)]  # replayed graphs
    eager = [g.token_ids for g in S.eager.generate(f"p{P}", ids, **kw)]
    gap = S.greedy_gap(P, ids, eager)
    lengths = [new // 2 + 3 * i for i in range(B)]
    joined = join_and_leave(S.rt, f"p{P}", ids, lengths)
    alone = [S.eager.generate(f"p{P}", [row], max_new_tokens=n, stop_at_eos=False)[0].token_ids
             for row, n in zip(ids, lengths)]
    out = {"model": shape, "B": B, "P": P, "L": L, "new_tokens": new,
           "graphs_equal_eager": ours == eager == ours_again, "peft_top_gap": gap,
           "equal_peft": gap <= tol, "join_leave_equal_alone": joined == alone}
    out["status"] = "ok" if all(v for k, v in out.items() if k.startswith(("graphs", "equal", "join"))) \
        else "FAILED"
    print(f"  engine {shape}: greedy graphs == eager {out['graphs_equal_eager']}, PEFT's argmax "
          f"{out['equal_peft']} (top log-prob - chosen <= {gap:.3g}), rows joining and leaving == "
          f"alone {out['join_leave_equal_alone']} [{out['status']}]", flush=True)
    return out


def join_and_leave(rt, name, ids, lengths) -> list:
    """Streams of different lengths, each started after the running ones took a step, so rows
    join the decode pool mid-generation and leave it at different steps: their tokens."""
    streams, got = [], [[] for _ in ids]
    for i, row in enumerate(ids):
        for k, s in enumerate(streams):
            c = next(s, None)
            got[k] += c.token_ids if c else []
        streams.append(rt.stream(name, row, max_new_tokens=lengths[i], stop_at_eos=False))
    for k, s in enumerate(streams):
        got[k] += [t for c in s for t in c.token_ids]
    return got


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    how = _import_softprompt()
    import torch

    from softprompt.bench.flops import flops
    from softprompt.bench.methods import CopiedPrefix
    from softprompt.tolerances import SCORE

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device; use --cpu-smoke on a CPU machine")
        return 2
    device = "cpu" if smoke else "cuda"
    fast = torch.float32 if smoke else torch.bfloat16
    grid = SMOKE_GRID if smoke else GPU_GRID
    shapes = ["tiny"] if smoke else (args.models.split(",") if args.models else ["llama-1b", "smollm2-135m"])
    anchors = {} if smoke else load_anchors(args.anchors)
    tol = args.tol if args.tol is not None else SCORE["float32"]["atol"]
    runs, warmup = max(args.runs, 15), args.warmup
    env = {"device": torch.cuda.get_device_name() if not smoke else platform.processor() or "cpu",
           "check_dtype": "float32", "check_weights": args.weights, "check_tol": tol,
           "timing_dtype": str(fast).removeprefix("torch."), "timing_weights": "random",
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "transformers": importlib.import_module("transformers").__version__,
           "peft": importlib.import_module("peft").__version__,
           "triton": _version("triton"), "python": platform.python_version(), "softprompt": how,
           "runs": runs, "warmup": warmup, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "command": " ".join([Path(sys.executable).name] + (sys.argv if argv is None else
                                                              ["bench/gpu_e2e.py", *argv]))}
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))
    limits = dict(max_batch=max(grid["B"]), max_batch_tokens=max(grid["B"]) * max(grid["L"]))
    Ps = list(grid["P"])

    # ---- 1. checks, float32 ------------------------------------------------------------------
    print(f"## 1. checks: float32, {args.weights} weights, against PEFT in float32 (tol {tol:g})")
    checks, selftests, engines = [], [], []
    for shape in shapes:
        S = Setup(torch, shape, device, torch.float32, args.weights, Ps, limits, smoke)
        rows, mutations, engine = run_checks(torch, S, shape, SMOKE_CHECKS if smoke else GPU_CHECKS,
                                             Ps, tol, smoke)
        checks += rows
        selftests.append(mutations)
        engines.append(engine)
        S.close()
        S = None
        if not smoke:
            torch.cuda.empty_cache()
    print(f"# checks done in {time.perf_counter() - t_start:.0f} s")

    # ---- 2. timings --------------------------------------------------------------------------
    rows, skipped, gens, graph_stats = [], [], [], {}
    for shape in [] if args.checks_only else shapes:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(f"{shape}: all points (time budget)")
            continue
        t0 = time.perf_counter()
        S = Setup(torch, shape, device, fast, "random", Ps, limits, smoke)
        copied = CopiedPrefix(S.base)
        for P, sp in S.prompts.items():
            copied.prepare(sp.name, sp.embeddings)
        print(f"## 2. timings {shape} ({env['timing_dtype']}): built, prompts prepared in "
              f"{time.perf_counter() - t0:.1f} s")
        for B in grid["B"]:
            for P in grid["P"]:
                for L in grid["L"]:
                    if time.perf_counter() - t_start > args.budget_s:
                        skipped.append(f"{shape} B={B} P={P} L={L} (time budget)")
                        continue
                    rows.append(time_point(torch, S, copied, shape, B, P, L, anchors, flops, fast,
                                           runs, warmup, smoke))
        if time.perf_counter() - t_start <= args.budget_s:
            gens.append(generation_timing(S, shape, smoke, lambda fn: timed_once(torch, fn, smoke)))
        else:
            skipped.append(f"{shape}: generation (time budget)")
        graph_stats[shape] = {k: v for k, v in S.rt.stats().items() if "graph" in k}
        print(f"# {shape}: {graph_stats[shape]}")
        S.close()
        S = copied = None  # free this shape's memory
        if not smoke:
            torch.cuda.empty_cache()

    print("\n## float32 checks against PEFT\n")
    print(check_markdown(checks, selftests, engines))
    if rows:
        print(f"\n## timings ({env['timing_dtype']}, median of {runs} after {warmup} warm-up)\n")
        print(markdown(rows))
    for g in gens:
        print(f"\ngeneration {g['model']} B={g['B']} P={g['P']} L={g['L']} new={g['new_tokens']}: "
              f"ours {g['ours_ms_per_token']:.2f} ms/token, eager {g['eager_ms_per_token']:.2f} "
              f"ms/token (graphs: eager / ours = {g['graphs_speedup']:.2f}x), tokens equal: "
              f"{g['tokens_equal']}")
    print(f"\ngraphs: {graph_stats}")
    if skipped:
        print(f"\nskipped: {'; '.join(skipped)}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    out = Path(args.out) if args.out else Path("/tmp/gpu_e2e_smoke.json" if smoke else "gpu_e2e.json")
    if out.is_dir():
        out = out / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "checks": checks, "self_test": selftests, "engine": engines,
                               "rows": rows, "generation": gens, "graphs": graph_stats,
                               "skipped": skipped, "total_s": total}, indent=1))
    print(f"wrote {out}")
    failures = [f"check {r['model']} {r['point']}: {r['status']}" for r in checks if r["status"] != "ok"]
    failures += [f"self-test {t['shape']}: {m} NOT caught (max |diff| {t[m]['max_abs_diff']:.3g} "
                 f"<= {t['tol']:g}): the check cannot see this bug" for t in selftests
                 for m in t if isinstance(t[m], dict) and not t[m]["caught"]]
    failures += [f"self-test {t['shape']}: the unmutated runtime no longer passes ({t['after']:.3g})"
                 for t in selftests if not t["after"] <= t["tol"]]
    failures += [f"engine {e['model']}: {e}" for e in engines if e["status"] != "ok"]
    failures += [f"CUDA graphs turned themselves off: {m}: {g['graphs_disabled']}"
                 for m, g in graph_stats.items() if g.get("graphs_disabled")]
    failures += [f"timing {r['model']} B={r['B']} P={r['P']} L={r['L']}: {r['status']}"
                 for r in rows if r["status"] != "ok"]
    failures += [f"generation {g['model']}: graphs and eager tokens differ" for g in gens
                 if not g["tokens_equal"]]
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


def timed_once(torch, fn, smoke) -> float:
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


def time_point(torch, S: Setup, copied, shape, B, P, L, anchors, flops, dtype, runs, warmup, smoke) -> dict:
    """One timed point: each method's max |log-prob - PEFT's| (information), then its times."""
    import numpy as np

    from softprompt.bench.mutations import max_abs_diff

    ids = torch.randint(0, S.dims.vocab_size, (B, L),
                        generator=torch.Generator().manual_seed(B * 1000 + P * 10 + L)).to(S.device)
    reqs = requests(f"p{P}", ids.cpu().numpy())
    fns = {"peft": lambda: S.peft_last(P, ids), "copied": lambda: copied.logprobs(f"p{P}", ids, 1)[:, 0],
           "ours": lambda: last_logprobs(S.rt, reqs), "eager": lambda: last_logprobs(S.eager, reqs)}
    row = dict(model=shape, B=B, P=P, L=L, dtype=str(dtype).removeprefix("torch."), status="ok")
    want = fns["peft"]()
    for name in ("ours", "eager", "copied"):
        row[f"{name}_max_abs_diff_vs_peft"] = d = max_abs_diff(fns[name](), want)
        if not np.isfinite(d):
            row["status"] = f"FAILED: {name} gave non-finite log-probs"
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t = [timed_once(torch, fn, smoke) for _ in range(runs)]
        ms = statistics.median(t)
        row[f"{name}_ms"], row[f"{name}_min_ms"], row[f"{name}_max_ms"] = (round(ms, 4), round(min(t), 4),
                                                                          round(max(t), 4))
        method = "reference" if name == "peft" else "cached"
        row[f"{name}_tflops"] = round(flops(S.dims, method, B, P, L, 1) / ms / 1e9, 3)
    row["ours_vs_peft"] = round(row["peft_ms"] / row["ours_ms"], 3)  # PEFT ms / ours ms
    row["ours_vs_copied"] = round(row["copied_ms"] / row["ours_ms"], 3)  # copied ms / ours ms
    row["graphs_speedup"] = round(row["eager_ms"] / row["ours_ms"], 3)  # eager ms / ours ms
    a = anchors.get((shape, B, P, L))
    if a:
        row["anchor_peft_ms"], row["anchor_copied_ms"] = a["full_ms"], a["cached_ms"]
        row["anchor_floor_ms"] = a["floor_ms"]
    print(f"# {shape} B={B} P={P} L={L}: " + ", ".join(f"{m} {row[m + '_ms']:.2f} ms" for m in fns)
          + f" [{row['status']}]", flush=True)
    return row


def generation_timing(S: Setup, shape: str, smoke: bool, timed, B=4, P=20, L=32, new=32) -> dict:
    """Greedy generation through the CUDA-graph runtime and the eager one: same tokens, and the
    median ms per generated token over 3 calls after one warm-up (which captures the graphs)."""
    import numpy as np

    if smoke:
        P, L, new = 3, 5, 8
    ids = np.random.default_rng(1).integers(3, S.dims.vocab_size, (B, L)).tolist()
    kw = dict(max_new_tokens=new, stop_at_eos=False)
    out = {}
    for name, r in (("ours", S.rt), ("eager", S.eager)):
        toks = [g.token_ids for g in r.generate(f"p{P}", ids, **kw)]  # warm-up (and capture)
        ms = statistics.median(timed(lambda: r.generate(f"p{P}", ids, **kw)) for _ in range(3))
        out[name] = (toks, ms / new)
    return dict(model=shape, B=B, P=P, L=L, new_tokens=new, tokens_equal=out["ours"][0] == out["eager"][0],
                ours_ms_per_token=round(out["ours"][1], 4), eager_ms_per_token=round(out["eager"][1], 4),
                graphs_speedup=round(out["eager"][1] / out["ours"][1], 3))


def check_markdown(checks, selftests, engines) -> str:
    lines = ["| model | batch | ours: max abs diff vs PEFT | eager (no graphs) | tol | status |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['point']} | {r['ours_max_abs_diff']:.3g} | {r['eager_max_abs_diff']:.3g} "
              f"| {r['tol']:g} | {r['status'].split(':')[0]} |" for r in checks]
    lines += ["", "| model | mutation (mixed batch, eager) | max abs diff vs PEFT | caught by the check |",
              "|---|---|---|---|"]
    lines += [f"| {t['shape']} | {m} | {t[m]['max_abs_diff']:.3g} | {'yes' if t[m]['caught'] else 'NO'} |"
              for t in selftests for m in t if isinstance(t[m], dict)]
    lines += ["", "| model | greedy tokens: graphs == eager | each PEFT's argmax (PEFT top log-prob - "
              "chosen) | joining/leaving rows == alone |", "|---|---|---|---|"]
    lines += [f"| {e['model']} | {e['graphs_equal_eager']} | {e['equal_peft']} ({e['peft_top_gap']:.2g}) "
              f"| {e['join_leave_equal_alone']} |" for e in engines]
    return "\n".join(lines)


def markdown(rows) -> str:
    def f(x, fmt=".2f"):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    lines = ["| model | dtype | B | P | L | PEFT ms | copied ms | ours ms | ours vs PEFT (PEFT ms / ours ms) "
             "| ours vs copied (copied ms / ours ms) | ours TFLOP/s | eager ms (no graphs) "
             "| anchor PEFT / copied ms (H200) | ours max abs diff vs PEFT | status |",
             "|" + "---|" * 15]
    for r in rows:
        anchor = (f"{r['anchor_peft_ms']:.1f} / {r['anchor_copied_ms']:.1f}"
                  if "anchor_peft_ms" in r else "-")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['B']} | {r['P']} | {r['L']} | {f(r.get('peft_ms'))} | "
                     f"{f(r.get('copied_ms'))} | {f(r.get('ours_ms'))} | "
                     f"{f(r.get('ours_vs_peft'))}x | {f(r.get('ours_vs_copied'))}x | "
                     f"{f(r.get('ours_tflops'), '.1f')} | {f(r.get('eager_ms'))} | {anchor} | "
                     f"{f(r.get('ours_max_abs_diff_vs_peft'), '.3g')} | {r['status'].split(':')[0]} |")
    return "\n".join(lines)


def _version(pkg: str):
    try:
        return importlib.import_module(pkg).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
