"""Check and time the prefix-attention kernels on a GPU (or a tiny smoke run on CPU).

    python bench/gpu_kernels.py --out "$OUT/kernels.json"      # GPU: checks at real sizes, then timings
    python bench/gpu_kernels.py --cpu-smoke                    # CPU, TRITON_INTERPRET=1, tiny sizes

1. Checks: every kernel (prefill, decode, cascade, auto, write_kv) against prefix_attention_ref
   in float32/float16/bfloat16 at real sizes, plus a case whose element offsets pass 2**31.
   Any mismatch (tolerances: softprompt.tolerances.kernel_tol) exits with status 1 before any timing.
2. Timings (bf16, H=32, Hkv=8, D=64, one prompt shared by all rows): prefix_attention,
   prefix_attention_cascade (plan made once, as for all layers of a forward) and "auto":
   run_attention with a plan_attention(kernel="auto") plan made once, as the torch backend runs
   each layer of a forward (the plan, checks and the cascade decision, are not timed), against one
   scaled_dot_product_attention call over K/V holding a per-row copy of the prefix with a boolean
   mask (full over the prefix, causal over own tokens), both with enable_gqa (K/V at Hkv heads)
   and with K/V heads repeated to H. Median of CUDA-event times after warm-up; achieved bandwidth
   against the bytes floor (formula in `bytes_floor`).
3. Dispatch, the measurement that sets `use_cascade` (prefix_kernels/cascade.py): the points where the
   cascade beats the fused kernel; for each rule (none, which the default path follows until a
   rule is measured; the untimed candidate ``CANDIDATE_RULE``; and the best ``CascadeRule`` over
   a small grid of thresholds fitted to these timings) how often it picks the faster kernel and
   the ms it loses against always picking the faster one. The fitted rule is printed as the line
   to put into prefix_kernels/cascade.py (``MEASURED_RULE``) when it loses less than "none".

Speedup columns name what they divide: "kernel vs SDPA" is the faster SDPA's ms / the kernel's ms.

Needs torch, triton and this package installed (``pip install -e .``): it imports
``softprompt.kernels`` and the tolerance table ``softprompt.tolerances``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

def parse_args():
    p = argparse.ArgumentParser(
        description="Check prefix-attention kernels against the reference, then time them.")
    p.add_argument("--out", default=None,
                   help="JSON result path (default: $OUT/kernels.json if $OUT is set, "
                        "else bench/out/gpu_kernels.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the same code path at tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before each measurement")
    p.add_argument("--skip-checks", action="store_true", help="time only (not for reporting)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(torch, *, B, H, Hkv, D, Lq, Lk, prefix_lens, prompt_idx, kv_lens=None, q_lens=None,
                Pmax=None, dtype, device, noncontig=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    N, Pmax = len(prefix_lens), Pmax or max(max(prefix_lens), 1)

    def rand(*shape):  # noncontig: memory [B, L, H, D] viewed as [B, H, L, D], as in a model
        if noncontig:
            shape = (shape[0], shape[2], shape[1], shape[3])
        t = (torch.randn(*shape, generator=g) * 0.5).to(device=device, dtype=dtype)
        return t.transpose(1, 2) if noncontig else t

    ints = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return dict(q=rand(B, H, Lq, D), k=rand(B, Hkv, Lk, D), v=rand(B, Hkv, Lk, D),
                prefix_k=rand(N, Hkv, Pmax, D), prefix_v=rand(N, Hkv, Pmax, D),
                prefix_lens=ints(prefix_lens), prompt_idx=ints(prompt_idx), kv_lens=ints(kv_lens),
                q_lens=ints(q_lens))


def check_cases(small: bool):
    """(name, shape kwargs). Real sizes on GPU; the same structure, shrunk, for --cpu-smoke."""
    if small:
        return [
            ("prefill-g4-mixed", dict(B=3, H=4, Hkv=1, D=16, Lq=7, Lk=7, prefix_lens=[17, 0, 5],
                                      prompt_idx=[2, 0, 2], q_lens=[7, 2, 5], kv_lens=[7, 2, 5],
                                      noncontig=True)),
            ("decode-g2-idle", dict(B=3, H=4, Hkv=2, D=32, Lq=1, Lk=20, prefix_lens=[20, 3],
                                    prompt_idx=[1, 0, 0], q_lens=[1, 0, 1], kv_lens=[20, 0, 9])),
        ]
    ragged = [37, 1, 20, 37, 5, 0, 33, 12]
    return [
        ("prefill-h32-hkv8-d64-p1024-mixed", dict(
            B=8, H=32, Hkv=8, D=64, Lq=37, Lk=37, prefix_lens=[1024, 100, 0],
            prompt_idx=[0, 1, 2, 0, 0, 1, 0, 2], q_lens=ragged, kv_lens=ragged, noncontig=True)),
        ("decode-h32-hkv8-d64-b64", dict(
            B=64, H=32, Hkv=8, D=64, Lq=1, Lk=2048, prefix_lens=[1024, 100, 20, 0],
            prompt_idx=[i % 4 for i in range(64)], q_lens=[0 if i % 13 == 5 else 1 for i in range(64)],
            kv_lens=[(i * 37) % 2048 + 1 for i in range(64)])),
        ("prefill-h16-hkv4-d128-chunked", dict(
            B=4, H=16, Hkv=4, D=128, Lq=64, Lk=300, prefix_lens=[100, 20], prompt_idx=[0, 1, 1, 0],
            q_lens=[64, 17, 1, 40], kv_lens=[300, 17, 129, 41])),
        ("prefill-h24-hkv8-d64-g3", dict(
            B=4, H=24, Hkv=8, D=64, Lq=129, Lk=129, prefix_lens=[20], prompt_idx=[0, 0, 0, 0])),
        ("decode-h32-hkv32-d128", dict(
            B=16, H=32, Hkv=32, D=128, Lq=1, Lk=512, prefix_lens=[100], prompt_idx=[0] * 16,
            kv_lens=[(i * 31) % 512 + 1 for i in range(16)], noncontig=True)),
    ]


def run_checks(torch, pa, kernel_tol, device, dtypes, small: bool) -> list[dict]:
    results = []
    torch.manual_seed(0)  # the few inputs drawn from the global generator below

    def record(name, dtype, fn_name, got, want, tol):
        err = (got.float() - want.float()).abs()
        finite = torch.isfinite(want)
        max_err = float(err[finite].max()) if bool(finite.any()) else 0.0
        try:
            torch.testing.assert_close(got, want, **tol)
            ok = True
        except AssertionError:
            ok = False
        results.append(dict(case=name, dtype=str(dtype).replace("torch.", ""), fn=fn_name, ok=ok,
                            max_abs_err=max_err))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:38s} {str(dtype):15s} {fn_name:26s} "
              f"max|err|={max_err:.2e}")

    for i, (name, shape) in enumerate(check_cases(small)):
        # float32 (IEEE dots) compiles slowly: check it on the first two cases only
        for dtype in dtypes if i < 2 else [d for d in dtypes if d != torch.float32]:
            x = make_inputs(torch, dtype=dtype, device=device, **shape)
            want, want_lse = pa.prefix_attention_ref(**x, return_lse=True)
            for fn_name in ("prefix_attention", "prefix_attention_cascade", "prefix_attention_auto"):
                got, got_lse = getattr(pa, fn_name)(**x, return_lse=True)
                record(name, dtype, fn_name, got, want, kernel_tol(dtype))
                record(name, dtype, fn_name + ".lse", got_lse, want_lse, kernel_tol(torch.float32))
            if shape["Lq"] == 1:  # the decode step as the backend runs it: append K/V, then attend
                kc, vc = x["k"].clone(), x["v"].clone()
                kr, vr = x["k"].clone(), x["v"].clone()
                k_new, v_new = x["k"][:, :, :1] * 2, x["v"][:, :, :1] * 2
                pos = x["kv_lens"].long() - 1  # -1 for empty rows: skipped
                pa.write_kv(kc, vc, k_new, v_new, pos)
                pa.write_kv_ref(kr, vr, k_new, v_new, pos)
                record(name, dtype, "write_kv", torch.stack([kc, vc]), torch.stack([kr, vr]),
                       dict(rtol=0, atol=0))

    # element offsets past 2**31: prompt N-1 of a huge prefix cache, row 1 of a huge decode buffer
    dtype, D, Hkv, H, Pmax = torch.float16, 16, 1, 2, 256
    N = 2**31 // (Hkv * Pmax * D) + 2
    pk = torch.empty(N, Hkv, Pmax, D, dtype=dtype, device=device)
    pv = torch.empty(N, Hkv, Pmax, D, dtype=dtype, device=device)
    for n in (0, N - 1):
        pk[n].normal_()
        pv[n].normal_()
    plens = torch.zeros(N, dtype=torch.int32, device=device)
    plens[0], plens[N - 1] = 17, 100
    idx = torch.tensor([N - 1, 0], dtype=torch.int32, device=device)
    cap, row_stride = 40, 2**31 + 1024
    # allocated, never touched except the two rows in use (on CPU only those pages get memory)
    kc = torch.empty(row_stride + Hkv * cap * D, dtype=dtype, device=device).as_strided(
        (2, Hkv, cap, D), (row_stride, cap * D, D, 1)).zero_()
    vc = torch.empty(row_stride + Hkv * cap * D, dtype=dtype, device=device).as_strided(
        (2, Hkv, cap, D), (row_stride, cap * D, D, 1)).zero_()
    k_new = torch.randn(2, Hkv, 1, D, device=device, dtype=dtype)
    v_new = torch.randn(2, Hkv, 1, D, device=device, dtype=dtype)
    pos = torch.tensor([3, 37], dtype=torch.int32, device=device)
    kr, vr = kc.clone(), vc.clone()  # dense [2, Hkv, cap, D] copies
    pa.write_kv(kc, vc, k_new, v_new, pos)
    pa.write_kv_ref(kr, vr, k_new, v_new, pos)
    record("int64-offsets", dtype, "write_kv", torch.stack([kc, vc]), torch.stack([kr, vr]),
           dict(rtol=0, atol=0))
    q = torch.randn(2, H, 1, D, device=device, dtype=dtype)
    kv_lens = torch.tensor([4, 38], dtype=torch.int32, device=device)
    want = pa.prefix_attention_ref(q, kc, vc, pk, pv, plens, idx, kv_lens)
    for fn_name in ("prefix_attention", "prefix_attention_cascade"):
        record("int64-offsets", dtype, fn_name, getattr(pa, fn_name)(q, kc, vc, pk, pv, plens, idx, kv_lens),
               want, kernel_tol(dtype))
    del pk, pv, kc, vc
    return results


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------


def bytes_floor(B, P, L, H, Hkv, D, elt):
    """Bytes that must move at least once: the shared prefix K and V read once (one prompt), plus
    each row's own Q and O ([H, L, D]) and own K and V ([Hkv, L, D])."""
    return (2 * Hkv * P * D + B * (2 * H * L * D + 2 * Hkv * L * D)) * elt


def timer(torch, device, runs, warmup):
    if device == "cuda":
        def measure(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def measure(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return measure


def sdpa_inputs(torch, x, H, Hkv, P):
    """Per-row copy of the prefix (what a plain cache does) and the boolean mask [B, 1, L, P + L]."""
    B, L = x["q"].shape[0], x["q"].shape[2]
    k = torch.cat([x["prefix_k"][x["prompt_idx"].long(), :, :P], x["k"]], dim=2)  # [B, Hkv, P + L, D]
    v = torch.cat([x["prefix_v"][x["prompt_idx"].long(), :, :P], x["v"]], dim=2)
    i = torch.arange(L, device=k.device)
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=k.device), i[None, :] <= i[:, None]], dim=1)
    mask = mask.expand(B, 1, L, P + L)
    rep = H // Hkv
    return k, v, mask, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def time_point(torch, pa, measure, *, B, N, P, L, H, Hkv, D, dtype, device) -> tuple[dict, object]:
    """{name: median ms} of every contender at one (B, N prompts, P, L), and the auto plan. Its
    inputs are locals, freed when it returns (before the next point allocates its own)."""
    F = torch.nn.functional
    x = make_inputs(torch, B=B, H=H, Hkv=Hkv, D=D, Lq=L, Lk=L, prefix_lens=[P] * N,
                    prompt_idx=[i % N for i in range(B)], q_lens=[L] * B, kv_lens=[L] * B, dtype=dtype,
                    device=device, noncontig=True)
    k, v, mask, k_rep, v_rep = sdpa_inputs(torch, x, H, Hkv, P)
    q = x["q"]
    plan = pa.plan_cascade(x["prompt_idx"], N, L, H // Hkv)
    # once per forward in the torch backend (checks, cascade or not); each layer then only runs it
    auto = pa.plan_attention(q.shape, x["k"].shape, x["prefix_k"].shape, x["prefix_lens"],
                             x["prompt_idx"], x["kv_lens"], x["q_lens"], dtype=dtype)
    layer = (q, x["k"], x["v"], x["prefix_k"], x["prefix_v"])
    fns = {
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "sdpa_expanded": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask),
        "kernel": lambda: pa.prefix_attention(**x),
        "cascade": lambda: pa.prefix_attention_cascade(**x, plan=plan),
        "auto": lambda: pa.run_attention(auto, *layer),
    }
    return {name: measure(fn) for name, fn in fns.items()}, auto


def run_timings(torch, pa, device, dtype, sizes, runs, warmup) -> list[dict]:
    H, Hkv, D = sizes["H"], sizes["Hkv"], sizes["D"]
    measure = timer(torch, device, runs, warmup)
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    points = [(B, N, P, L) for P in sizes["P"] for L in sizes["L"] for B in sizes["B"]
              for N in sizes["N"] if N == 1 or B >= 2 * N]  # several prompts only where rows share them
    for B, N, P, L in points:
        ms, auto = time_point(torch, pa, measure, B=B, N=N, P=P, L=L, H=H, Hkv=Hkv, D=D,
                              dtype=dtype, device=device)
        floor_b = N * bytes_floor(B // N, P, L, H, Hkv, D, elt)
        best_sdpa = min(ms["sdpa_gqa"], ms["sdpa_expanded"])
        row = dict(B=B, N=N, P=P, L=L, H=H, Hkv=Hkv, D=D, dtype=str(dtype).replace("torch.", ""),
                   **{f"{n}_ms": round(t, 4) for n, t in ms.items()},
                   auto_choice="cascade" if auto.kernel == "cascade" else "kernel",
                   speedup_kernel=round(best_sdpa / ms["kernel"], 2),
                   speedup_cascade=round(best_sdpa / ms["cascade"], 2),
                   floor_bytes=floor_b,
                   kernel_GBps=round(floor_b / ms["kernel"] / 1e6, 1),
                   cascade_GBps=round(floor_b / ms["cascade"] / 1e6, 1))
        rows.append(row)
        print(f"  B={B:3d} N={N} P={P:5d} L={L:3d}  sdpa={best_sdpa:.4f}  kernel={ms['kernel']:.4f}  "
              f"cascade={ms['cascade']:.4f}  auto={ms['auto']:.4f} ms", flush=True)
    return rows


def rule_cost(rows, rule) -> tuple[int, float]:
    """(points where ``rule`` picks the faster of fused and cascade, ms it loses over the grid
    against always picking the faster one); rule None: always fused (the default path)."""
    from softprompt.kernels.cascade import use_cascade

    agree, lost = 0, 0.0
    for r in rows:
        pick = "cascade" if rule is not None and use_cascade(r["B"], r["N"], r["P"], r["L"], rule) else "kernel"
        faster = "cascade" if r["cascade_ms"] < r["kernel_ms"] else "kernel"
        agree += pick == faster
        lost += r[f"{pick}_ms"] - min(r["kernel_ms"], r["cascade_ms"])
    return agree, lost


def fit_rule(rows):
    """The CascadeRule over a small grid of thresholds that loses the least time on ``rows``."""
    import itertools

    from softprompt.kernels.cascade import CascadeRule

    best = None
    for t in itertools.product((1, 4, 16, 64), (1, 2, 4, 8), (0, 64, 256, 1024), (1, 4, 16)):
        rule = CascadeRule(*t)
        agree, lost = rule_cost(rows, rule)
        if best is None or lost < best[2] - 1e-9:
            best = (rule, agree, lost)
    return best


def dispatch_summary(rows, device: str = "cuda") -> dict:
    """Where the cascade beats the fused kernel, and what each rule for use_cascade would cost:
    the measurement that sets MEASURED_RULE in prefix_kernels/cascade.py."""
    from softprompt.kernels.cascade import CANDIDATE_RULE, MEASURED_RULE

    wins = [(r["B"], r["N"], r["P"], r["L"]) for r in rows if r["cascade_ms"] < r["kernel_ms"]]
    rules = {"default (MEASURED_RULE)": MEASURED_RULE, "none (always fused)": None,
             "CANDIDATE_RULE (untimed guess)": CANDIDATE_RULE}
    fitted, _, _ = fit_rule(rows)
    rules["fitted to these timings"] = fitted
    costs = {name: rule_cost(rows, rule) for name, rule in rules.items()}
    lines = [f"dispatch: cascade faster than the fused kernel at (B, N, P, L) = {wins or 'none'}"]
    lines += [f"  rule {name}: {rule}: picks the faster kernel at {a}/{len(rows)} points, "
              f"{lost:.4f} ms lost over the grid" for (name, rule), (a, lost) in zip(rules.items(), costs.values())]
    if device != "cuda":
        lines.append("  CPU smoke: interpreter timings set nothing (run this on a GPU)")
    elif costs["fitted to these timings"][1] < costs["none (always fused)"][1]:
        lines.append(f"  measured: set MEASURED_RULE = {fitted!r} in prefix_kernels/cascade.py (these shapes, "
                     "this GPU; re-measure on others)")
    else:
        lines.append("  measured: no rule beats always fused on this grid; keep MEASURED_RULE = None")
    return dict(cascade_wins=wins, points=len(rows), fitted_rule=fitted._asdict(),
                rules={name: {"rule": None if rule is None else rule._asdict(), "agrees": a,
                              "ms_lost": round(lost, 4)}
                       for (name, rule), (a, lost) in zip(rules.items(), costs.values())},
                summary="\n".join(lines))


def markdown(rows) -> str:
    head = ("| B | N prompts | P | L | SDPA gqa ms | SDPA expanded ms | kernel ms | cascade ms "
            "| auto ms (choice) | kernel vs SDPA (best SDPA ms / kernel ms) | cascade vs SDPA "
            "(best SDPA ms / cascade ms) | kernel GB/s | cascade GB/s |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['B']} | {r['N']} | {r['P']} | {r['L']} | {r['sdpa_gqa_ms']:.4f} "
                     f"| {r['sdpa_expanded_ms']:.4f} | {r['kernel_ms']:.4f} | {r['cascade_ms']:.4f} "
                     f"| {r['auto_ms']:.4f} ({r['auto_choice']}) "
                     f"| {r['speedup_kernel']:.2f}x | {r['speedup_cascade']:.2f}x "
                     f"| {r['kernel_GBps']:.1f} | {r['cascade_GBps']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module defines its @triton.jit functions
    import torch

    import softprompt.kernels as pa  # after TRITON_INTERPRET is set
    from softprompt.tolerances import kernel_tol

    if args.cpu_smoke:
        device, dtypes, tdtype = "cpu", [torch.float32, torch.float16], torch.float32
        sizes = dict(H=4, Hkv=2, D=16, B=[1, 4], N=[1, 2], P=[5, 20], L=[1, 4])
        runs, warmup = min(args.runs, 2), min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke on a CPU machine", file=sys.stderr)
            return 2
        device, dtypes, tdtype = "cuda", [torch.float32, torch.float16, torch.bfloat16], torch.bfloat16
        sizes = dict(H=32, Hkv=8, D=64, B=[1, 16, 64], N=[1, 4], P=[20, 100, 1024], L=[1, 32])
        runs, warmup = args.runs, args.warmup

    import triton

    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), interpret=os.environ.get("TRITON_INTERPRET") == "1")
    command = " ".join([Path(sys.executable).name] + sys.argv)
    print(f"# prefix-attention kernels: {env}\n# reproduce: {command}", flush=True)
    out_path = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "kernels.json" if os.environ.get("OUT")
        else Path("bench/out/gpu_kernels.json"))
    result = dict(env=env, command=command, checks=[], timings=[],
                  timing_dtype=str(tdtype).replace("torch.", ""), runs=runs, warmup=warmup,
                  timing="cuda events, median" if device == "cuda" else "perf_counter, median")

    failed = []
    if not args.skip_checks:
        print("## checks against prefix_attention_ref", flush=True)
        t0 = time.perf_counter()
        result["checks"] = run_checks(torch, pa, kernel_tol, device, dtypes, small=args.cpu_smoke)
        failed = [c for c in result["checks"] if not c["ok"]]
        print(f"  {len(result['checks']) - len(failed)}/{len(result['checks'])} ok "
              f"in {time.perf_counter() - t0:.1f} s")
    if not failed:
        print(f"## timings ({result['timing']} of {runs} after {warmup} warm-up), {tdtype}", flush=True)
        result["timings"] = run_timings(torch, pa, device, tdtype, sizes, runs, warmup)
        print(markdown(result["timings"]))
        result["dispatch"] = dispatch_summary(result["timings"], device)
        print(result["dispatch"]["summary"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"# wrote {out_path}")
    if failed:
        print(f"FAILED: {len(failed)} kernel checks: {[(c['case'], c['dtype'], c['fn']) for c in failed]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
