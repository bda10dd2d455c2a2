"""``softprompt bench``: batch-scoring throughput over prompt length P x batch B x request length L.

    softprompt bench --backends reference,copied,torch,onnx --P 0,1,5,20,100,150 --B 8 --L 32 \\
        --refcheck --out bench/out
    python -m softprompt.bench.driver --quick --refcheck        # same driver, a few seconds
    softprompt bench --kv-prompt --P 20,512,2048 --B 1,8 --L 32 --repeats 3 --refcheck \\
        --out bench/out/kv-prompt                               # long K/V prompts (long_kv.py)

What one point measures. A batch of B requests, each L random token ids (seeded, the same for
every backend), all under one soft prompt of P virtual tokens (rows of the model's embedding
table, seeded; P = 0 means no prompt, i.e. the plain base model, for every backend). The last
``--score-tokens`` ids of each request are its continuation and their log-probabilities are
returned: that is batch scoring as in log-likelihood evaluation / classification over one label
token. The wall time of one call that scores the whole batch is measured: ``Runtime.score`` for
the runtime backends (request validation and batching included), one ``model(...)`` call plus
the per-row prefix copy for ``copied``.

Methods (``--backends``):
  peft       the baseline users run today: ``peft.PeftModelForCausalLM`` loaded with
             ``PeftModel.from_pretrained(base, adapter_dir)`` from the same soft prompt saved as
             a PEFT PROMPT_TUNING adapter, one forward over the batch (P = 0: the base model),
             then log-softmax of its logits at the scored positions, as a user would. Every
             speedup column is measured against it.
  reference  Runtime(backend="reference"): PEFT semantics, the P virtual tokens are recomputed
             in every call and logits are computed at all P + L positions (as PEFT does); the
             correctness oracle of ``--refcheck``.
  copied     plain transformers with the prompt's K/V computed once and COPIED into every row
             as a ``DynamicCache`` (the "copied prefix cache" of the anchors), request tokens on
             top; logits only where a score needs them (``logits_to_keep``).
  torch      Runtime(backend="torch"): the cached prefix is shared, never copied per row
             (Triton kernels on CUDA, the PyTorch reference attention on CPU).
  onnx       Runtime(backend="onnx"): the float32 bundle under ONNX Runtime with the cached
             prefix (exported once into $SOFTPROMPT_HOME/bundles if needed, or ``--bundle``).
  onnx-int4  the same over the model's 4-bit weight bundle (``softprompt export --weights
             int4``; exported once next to the float32 bundle if needed, or ``--bundle-int4``).

The prefix of the cached methods is computed once per prompt before timing (amortised over all
requests of that prompt, which is the point of caching); it is not part of any timed call.

Timing: per point, each backend in turn runs ``--warmup`` untimed calls and then ``--repeats``
timed calls back to back (``--interleave`` instead alternates the backends call by call, so slow
drifts of machine load hit all alike; but ONNX Runtime's spinning worker threads then steal the
cores from the next torch call, so it is off by default). Reported: median and min/max/IQR of
wall ms per batch, sequences/s, request tokens/s, achieved GFLOP/s (see :func:`flops`), the
speedup over ``peft`` (``speedup_vs_peft``: peft's median ms / the backend's median ms;
``speedup_best``: the same of minima, robust to bursts of load from other processes) and the
ideal speedup (P + L) / L of not recomputing the prompt. ``peft`` is the only baseline: without
it among ``--backends`` the speedup columns stay empty (and the run says so).

``--refcheck``: before timing, every backend's log-probs on the point's batch are compared with
the float32 ``reference`` backend on the same batch and device; tolerance = the project's SCORE
table (softprompt/tolerances.py) for the backend's dtype, and the ONNX table's for ``onnx`` (the
graph is compared to PyTorch within 1e-2; for ``onnx-int4`` the 4-bit bundle's score tolerance
``INT4_SCORE_ATOL``). A backend that fails is reported FAILED at that
point and is not timed.

``--kv-prompt``: a K/V prompt (PEFT PREFIX_TUNING) of each P instead of a soft prompt, its own
methods side by side (``--kv-methods``: PEFT's prefix-tuning forward, the torch and onnx
runtimes with that adapter, and an equally long text in the context, plain and as a cached
composed prompt); default P 20,512,2048 and B 1,8. Described in bench/long_kv.py.

``--generate``: greedy generation instead of scoring, tokens/s of one ``generate`` call over B
rows of L context ids and N = ``--new-tokens`` new tokens under a P-token soft prompt (one L and
one P; default B 1,8,32, L 32, P 20, N 32), the runtimes (``--methods``: torch, onnx, onnx-int4
and their bf16 forms) beside transformers' ``generate`` with the prompt as ``inputs_embeds``
(``hf``, ``hf-bf16``), and llama.cpp over ``--gguf`` where ``llama-cpp-python`` is installed (no
soft prompt); one warm-up call per method and B (``--warmup`` is not read), a check column of rows
whose greedy ids equal hf's. Described in bench/generation.py.

This file is the CLI and the sweep (points, timing, results.csv/json/md, the reproducing
command); the FLOP model is bench/flops.py, the methods and their tolerances bench/methods.py,
the figures bench/plots.py, the K/V-prompt mode bench/long_kv.py, the generation mode
bench/generation.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from softprompt.machine import cpu_model  # noqa: F401 - also imported from here by other bench scripts
from softprompt.bench.flops import Dims, flops, rates
from softprompt.bench.methods import (ALL_BACKENDS, BASELINE, RuntimeMethod, load_methods, make_ids,
                                      make_prompt, tolerance)
from softprompt.bench.plots import plot

LESTER_P = (0, 1, 5, 20, 100, 150)  # prompt lengths studied by Lester et al. (2021)


# --------------------------------------------------------------------------------- points
@dataclass
class Result:
    backend: str
    B: int
    L: int
    P: int
    n_score: int
    dtype: str
    device: str
    status: str = "ok"  # ok | FAILED (refcheck) | ERROR: ... | UNAVAILABLE: ...
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    seq_per_s: float | None = None
    tok_per_s: float | None = None
    gflop: float | None = None
    gflop_per_s: float | None = None
    speedup_vs_peft: float | None = None  # of medians
    speedup_best: float | None = None  # of minima, over peft
    speedup_vs_text: float | None = None  # --kv-prompt: plain-text's median / this median
    ideal_speedup: float | None = None
    max_abs_diff: float | None = None
    tol: float | None = None
    times_ms: list = field(default_factory=list)


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run_benchmark(args, log=print) -> tuple[list[Result], dict]:
    """Load every backend, then for each (B, L, P): refcheck (optional), warm up, time."""
    import torch
    from tqdm import tqdm

    from softprompt.models import load_model

    _defaults(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    from softprompt.runtime.factory import default_device, default_dtype

    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    env = environment(device, dtype)
    max_b = max(args.B)
    max_tokens = max(args.B) * max(args.L)
    methods = load_methods(args.backends, args.model, device, dtype, max_b, max_tokens,
                           args.bundle, log, bundle_int4=args.bundle_int4)
    # The refcheck oracle is the float32 reference backend; the FLOP model and the prompts read
    # the torch model (the oracle's, else any torch-based backend's, else a fresh CPU load).
    check_rt = None
    if args.refcheck:
        ref = methods.get("reference")
        if isinstance(ref, RuntimeMethod) and dtype == "float32":
            check_rt = ref
        else:
            from softprompt.runtime.api import Runtime

            check_rt = RuntimeMethod("reference", Runtime.load(
                args.model, backend="reference", device=device, dtype="float32",
                max_batch=max_b, max_batch_tokens=max_tokens))
    lm = check_rt.rt.backend.lm if check_rt else next(
        (m.rt.backend.lm for m in methods.values()
         if isinstance(m, RuntimeMethod) and hasattr(m.rt.backend, "lm")), None)
    if lm is None:  # only copied/onnx: the loader is fast once the model is converted
        lm = load_model(args.model, device="cpu")
    dims = Dims.from_model(lm.model)
    table = lm.model.get_input_embeddings().weight.detach().float().cpu().numpy()
    env["model"] = {"name": args.model, **asdict(dims)}

    prompts = {P: make_prompt(P, table, args.seed) for P in args.P}
    everyone = list(methods.values()) + ([check_rt] if check_rt else [])
    for i, m in enumerate(everyone):
        if isinstance(m, str) or any(m is o for o in everyone[:i]):
            continue
        for P, sp in prompts.items():
            m.prepare(None if sp is None else sp.name, sp)

    results: list[Result] = []
    grid = [(B, L, P) for B in args.B for L in args.L for P in args.P]
    bar = tqdm(total=len(grid) * len(methods), desc="bench", unit="pt", disable=args.no_progress)
    for B, L, P in grid:
        n = args.score_tokens
        key = None if P == 0 else f"p{P}"
        ids = make_ids(B, L, dims.vocab_size, args.seed)
        want = check_rt.run(check_rt.requests(key, ids, n)) if check_rt else None
        live, res = {}, {}
        for name, m in methods.items():
            r = Result(name, B, L, P, n,
                       "float32" if name == "onnx-int4" or (name == "onnx" and dtype == "bfloat16"
                                                             and device.startswith("cuda")) else dtype,
                       device, ideal_speedup=(P + L) / L,
                       gflop=flops(dims, name, B, P, L, n) / 1e9)
            res[name] = r
            results.append(r)
            if isinstance(m, str):
                r.status = f"UNAVAILABLE: {m}"
                continue
            batch = m.requests(key, ids, n)
            try:
                got = m.run(batch)
            except Exception as e:  # noqa: BLE001
                r.status = f"ERROR: {type(e).__name__}: {e}"
                log(f"{name} B={B} L={L} P={P}: {r.status}")
                continue
            if want is not None:
                r.tol = tolerance(name, r.dtype, device)
                r.max_abs_diff = float(np.max(np.abs(got - want)))
                if not r.max_abs_diff <= r.tol:
                    r.status = "FAILED"
                    log(f"{name} B={B} L={L} P={P}: refcheck FAILED, max |diff| "
                        f"{r.max_abs_diff:.3g} > {r.tol:g}")
                    continue
            live[name] = (m, batch)

        def timed(name):
            m, batch = live[name]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.run(batch)  # returns host numpy: the device work is finished
            res[name].times_ms.append((time.perf_counter() - t0) * 1e3)

        if args.interleave:
            for name, (m, batch) in live.items():
                for _ in range(args.warmup):
                    m.run(batch)
            for _ in range(args.repeats):
                for name in live:
                    timed(name)
        else:
            for name, (m, batch) in live.items():
                for _ in range(args.warmup):
                    m.run(batch)
                for _ in range(args.repeats):
                    timed(name)
        for name, r in res.items():
            bar.update(1)
            if not r.times_ms:
                continue
            t = sorted(r.times_ms)
            r.median_ms = statistics.median(t)
            r.min_ms, r.max_ms = t[0], t[-1]
            r.q1_ms, r.q3_ms = _quartiles(t)
            r.seq_per_s, r.tok_per_s, r.gflop_per_s = rates(B, L, r.gflop, r.median_ms)
        base = res.get(BASELINE)
        for r in res.values():
            if base is not None and base.median_ms and r.median_ms:
                r.speedup_vs_peft = base.median_ms / r.median_ms
                r.speedup_best = base.min_ms / r.min_ms
        bar.set_postfix_str(f"B={B} L={L} P={P}")
    bar.close()
    return results, env


# ------------------------------------------------------------------------------- reporting
def environment(device: str, dtype: str) -> dict:
    import torch

    from softprompt.machine import package_versions

    versions = package_versions()
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    else:
        dev = cpu_model()
    return {"device": device, "device_name": dev, "dtype": dtype, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "versions": versions, "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def command_line(args) -> str:
    """The exact command that reproduces this run (every option spelled out)."""
    _defaults(args)
    parts = ["softprompt", "bench", "--model", args.model]
    if getattr(args, "kv_prompt", False):
        parts += ["--kv-prompt", "--kv-methods", ",".join(args.kv_methods)]
    else:
        parts += ["--backends", ",".join(args.backends)]
    parts += ["--P", ",".join(map(str, args.P)), "--B", ",".join(map(str, args.B)),
             "--L", ",".join(map(str, args.L)), "--score-tokens", str(args.score_tokens),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.device:
        parts += ["--device", args.device]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.bundle:
        parts += ["--bundle", args.bundle]
    if args.bundle_int4:
        parts += ["--bundle-int4", args.bundle_int4]
    if args.refcheck:
        parts.append("--refcheck")
    if args.interleave:
        parts.append("--interleave")
    parts += ["--out", args.out]
    env = f"SOFTPROMPT_HOME={shlex.quote(os.environ['SOFTPROMPT_HOME'])} " \
        if "SOFTPROMPT_HOME" in os.environ else ""
    return env + shlex.join(parts)


def table(results: list[Result]) -> str:
    head = ("| backend | B | L | P | status | median ms | min-max ms | seq/s | tok/s | GFLOP/s "
            "| speedup vs peft (peft median / median) | speedup vs peft (peft min / min) "
            "| ideal (P+L)/L | max abs diff vs reference |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"
        lines.append(
            f"| {r.backend} | {r.B} | {r.L} | {r.P} | {r.status.split(':')[0]} | "
            f"{f(r.median_ms, '.1f')} | {f(r.min_ms, '.1f')}-{f(r.max_ms, '.1f')} | "
            f"{f(r.seq_per_s, '.1f')} | {f(r.tok_per_s, '.0f')} | {f(r.gflop_per_s, '.1f')} | "
            f"{f(r.speedup_vs_peft, '.2f')} | {f(r.speedup_best, '.2f')} | "
            f"{f(r.ideal_speedup, '.2f')} | "
            f"{f(r.max_abs_diff, '.2g')} |")
    return "\n".join(lines)


def write_outputs(results: list, env: dict, cmd: str, out: Path, render=None,
                  plots: bool = True) -> list[Path]:
    """results.csv/.json/.md (the table by ``render``, default ``table``) and, with ``plots``,
    the sweep's plots into ``out``. ``results``: dataclass rows of one type (``Result``, or
    another mode's); the CSV leaves out their per-call ``*times_ms`` lists."""
    render = render or table
    out.mkdir(parents=True, exist_ok=True)
    cols = [k for k in type(results[0]).__dataclass_fields__ if not k.endswith("times_ms")] \
        if results else []
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in results:
            w.writerow({k: getattr(r, k) for k in cols})
    (out / "results.json").write_text(json.dumps(
        {"command": cmd, "env": env, "results": [asdict(r) for r in results]}, indent=1))
    (out / "results.md").write_text(f"`{cmd}`\n\n{render(results)}\n")
    return [out / "results.csv", out / "results.json", out / "results.md",
            *(plot(results, env, out) if plots else [])]



# ------------------------------------------------------------------------------------ CLI
def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {s!r}")
    return vals


def _kv_methods(s: str) -> list[str]:
    from softprompt.bench.long_kv import KV_METHODS

    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in KV_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {KV_METHODS}")
    return names


def _defaults(args) -> None:
    """Fill in the grid options left unset: P and B by mode (``--kv-prompt`` or not)."""
    kv = getattr(args, "kv_prompt", False)
    if args.P is None:
        from softprompt.bench.long_kv import KV_P

        args.P = list(KV_P if kv else LESTER_P)
    if args.B is None:
        from softprompt.bench.long_kv import KV_B

        args.B = list(KV_B if kv else (8,))


def _backends(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in ALL_BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from {ALL_BACKENDS}")
    return names


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory or a "
                        ".gguf file (default: %(default)s)")
    p.add_argument("--backends", type=_backends, default=list(ALL_BACKENDS),
                   help="comma-separated among peft, reference, copied, torch, onnx, onnx-int4 "
                        "(default: all)")
    p.add_argument("--P", type=_ints, default=None,
                   help="virtual-token counts; 0 = no prompt (default: Lester et al.'s grid "
                        "0,1,5,20,100,150; with --kv-prompt 20,512,2048)")
    p.add_argument("--B", type=_ints, default=None, help="batch sizes (default: 8; with "
                   "--kv-prompt 1,8)")
    p.add_argument("--L", type=_ints, default=[32], help="request lengths in tokens (default: 32)")
    p.add_argument("--score-tokens", type=int, default=1,
                   help="trailing tokens of each request scored as its continuation (default: 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA); bfloat16 on "
                        "CPU runs onnx's float32 bundle under OpenVINO in bfloat16, on CUDA onnx "
                        "stays float32; onnx-int4 is always a float32 graph")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per point (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per backend and point "
                   "(default: 2)")
    p.add_argument("--interleave", action="store_true",
                   help="alternate backends call by call instead of timing each in a block")
    p.add_argument("--refcheck", action="store_true",
                   help="check log-probs against the float32 reference before timing; a backend "
                        "that fails is reported FAILED and not timed")
    p.add_argument("--out", default="bench/out", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of token ids and prompts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                   "torch's choice)")
    p.add_argument("--bundle", default=None, help="ONNX bundle directory for backend onnx "
                   "(default: exported once under $SOFTPROMPT_HOME/bundles)")
    p.add_argument("--bundle-int4", default=None, help="4-bit bundle directory for backend "
                   "onnx-int4 (default: exported once next to the float32 bundle)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: P 0,5,20, B 2, L 8, 2 repeats, 1 warm-up (overrides those)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--kv-prompt", action="store_true",
                   help="long K/V prompts: a PEFT PREFIX_TUNING prompt of each P, PEFT's forward "
                        "beside the runtimes and an equally long text in the context "
                        "(bench/long_kv.py; CPU, float32)")
    p.add_argument("--kv-methods", type=_kv_methods,
                   default="peft-prefix,torch-kv,onnx-kv,plain-text,torch-text,onnx-text",
                   help="with --kv-prompt: comma-separated among peft-prefix, torch-kv, onnx-kv, "
                        "plain-text, torch-text, onnx-text (default: all)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: combine earlier results.json files into --out (a later "
                        "file replaces the points it contains)")
    from softprompt.bench.generation import add_options

    add_options(p)  # --generate, --new-tokens, --methods, --gguf
    p.set_defaults(func=run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` verb to the ``softprompt`` command."""
    p = subparsers.add_parser("bench", help="benchmark backends over prompt length x batch x "
                              "request length (CSV, JSON, plots)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure(p)


def merge(paths: list[str], out: Path) -> int:
    """Combine results.json files into one report (CSV, JSON, table, plots) in ``out``.

    Points are keyed by (B, L, P); a later file replaces every row of a point it contains, so
    each point's speedups still come from one run (use it to re-measure points that a burst of
    load from other processes spoiled, or to append a second L)."""
    points: dict = {}
    commands, envs = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        commands.append(data["command"])
        envs.append(data["env"])
        rows: dict = {}
        for r in data["results"]:
            r = {k: v for k, v in r.items() if k in Result.__dataclass_fields__}  # older files
            rows.setdefault((r["B"], r["L"], r["P"]), []).append(Result(**r))
        points.update(rows)
    results = [r for key in sorted(points) for r in points[key]]
    env = dict(envs[-1], merged_from=[str(p) for p in paths],
               load_average=[e.get("load_average") for e in envs])
    cmd = " ; ".join(commands)
    print(table(results))
    files = write_outputs(results, env, cmd, out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def run(args) -> int:
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.generate:
        from softprompt.bench.generation import run_generate

        return run_generate(args)
    if args.quick:
        args.P, args.B, args.L, args.repeats, args.warmup = [0, 5, 20], [2], [8], 2, 1
        if args.kv_prompt:
            args.P = [5, 20]
    _defaults(args)
    if args.kv_prompt:
        return run_kv(args)
    if args.score_tokens < 1 or any(L <= args.score_tokens for L in args.L):
        raise SystemExit("softprompt bench: need 1 <= --score-tokens < every L")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("softprompt bench: --repeats must be >= 1 and --warmup >= 0")
    cmd = command_line(args)

    def log(msg):
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    print(f"command: {cmd}", flush=True)
    results, env = run_benchmark(args, log)
    print(f"device: {env['device']} ({env['device_name']}), dtype {env['dtype']}, torch threads "
          f"{env['torch_threads']}, load average {env['load_average']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(table(results))
    if BASELINE not in args.backends:
        print(f"no speedups: the speedup columns divide by {BASELINE}, which was not among --backends")
    files = write_outputs(results, env, cmd, Path(args.out))
    print("wrote " + ", ".join(str(f) for f in files))
    bad = [r for r in results if r.status != "ok"]
    for r in bad:
        print(f"not timed: {r.backend} B={r.B} L={r.L} P={r.P}: {r.status}")
    return 1 if any(r.status == "FAILED" for r in results) else 0


def run_kv(args) -> int:
    """``--kv-prompt``: bench/long_kv.py's methods at each point; results.csv/json/md in --out."""
    from softprompt.bench.long_kv import kv_table, run_kv_benchmark

    if any(P < 1 for P in args.P):
        raise SystemExit("softprompt bench --kv-prompt: every P must be >= 1")
    if args.score_tokens < 1 or any(L <= args.score_tokens for L in args.L):
        raise SystemExit("softprompt bench: need 1 <= --score-tokens < every L")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("softprompt bench: --repeats must be >= 1 and --warmup >= 0")
    cmd = command_line(args)
    print(f"command: {cmd}", flush=True)
    results, env = run_kv_benchmark(args, lambda msg: print(f"bench: {msg}", file=sys.stderr,
                                                            flush=True))
    print(f"device: {env['device_name']}, float32, torch threads {env['torch_threads']}, load "
          f"average {env['load_average']} -> {env['load_average_end']}")
    print(kv_table(results))
    written = write_outputs(results, env, cmd, Path(args.out), render=kv_table, plots=False)
    print(f"wrote {', '.join(map(str, written))}")
    return 1 if any(r.status == "FAILED" for r in results) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softprompt.bench.driver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    args = configure(p).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
