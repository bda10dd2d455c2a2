"""Where one ONNX scoring batch spends its CPU time, and the floor the float32 GEMMs set.

    python -m softprompt.bench.cpu_floor --B 1,8 --P 20,100 --L 32 \
        --against bench/out/cpu-xeon-idle/results.json

For each bundle (the default model's float32 and 4-bit bundles unless ``--bundle`` is given)
and each (B, P, L) it times the bare graph call of the request use (``Bundle.run``: B rows of L
tokens on a cached P-token prefix, logits at one position per row, as ``softprompt bench``
scores, but without the runtime's validation, batching or past assembly), then runs it again
under ONNX Runtime's profiler and sums kernel time per operator type. The linear layers
(``MatMul``, ``MatMulNBits``) are most of it; their time is a floor no graph rewrite removes at
this precision. The profiler adds a little time to every kernel, so GEMM ms is an upper
estimate; a hard lower bound is ``peak floor`` = the batch's FLOPs (``softprompt bench``'s FLOP
model) at the best float32 GEMM rate this machine reaches on large matrices (numpy's
``2048 x 2048`` float32 matmul, best of 5).

Every ratio names what it divides; PEFT ms and end-to-end ms come from ``--against`` (a
``softprompt bench`` results.json measured at the same points, its ``peft`` rows and the
bundle's own ``onnx`` / ``onnx-int4`` rows):

    end to end vs PEFT       PEFT ms / the bundle's Runtime.score ms (both from --against)
    graph-only bound         PEFT ms / graph ms: an upper bound on the end-to-end ratio (the
                             runtime's own work is left out), not a speedup
    GEMM ceiling             PEFT ms / GEMM ms: the most ONNX Runtime's kernels allow
    peak ceiling             PEFT ms / peak floor ms: the most float32 arithmetic allows
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GEMM_OPS = ("MatMul", "MatMulNBits", "FusedMatMul", "Gemm")


def profile(bundle_dir: Path, B: int, P: int, L: int, repeats: int) -> dict:
    """Median wall ms of ``repeats`` request-use runs, then kernel ms per op type (profiled)."""
    import onnxruntime as ort

    from softprompt.export.bundle import load_bundle
    from softprompt.export.quantize import request_args

    timed = load_bundle(bundle_dir)
    args = request_args(timed, B, L, P)
    for _ in range(2):
        timed.run(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        timed.run(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    del timed
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    prof = load_bundle(bundle_dir, session_options=opts)
    for _ in range(2 + repeats):
        prof.run(*args)
    events = json.loads(Path(prof.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][2:]  # after the warm-up runs
    start = min(e["ts"] for e in runs)
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / len(runs)
    gemm = sum(ms for op, ms in per_op.items() if op.split(".")[-1] in GEMM_OPS)
    return {"median_ms": float(np.median(times)), "min_ms": float(min(times)),
            "max_ms": float(max(times)), "kernel_ms": sum(per_op.values()), "gemm_ms": gemm,
            "top_ops": {op: round(ms, 2) for op, ms in per_op.most_common(8)}}


def kernel_rates(shapes=((32, 576, 1536), (256, 576, 1536), (32, 1536, 576), (256, 1536, 576)),
                 threads: int = 1, repeats: int = 60) -> list[dict]:
    """GFLOP/s of one product ``[M, K] x [K, N]`` under ONNX Runtime's CPU kernels, the default
    model's projection shapes: float32 ``MatMul``, 4-bit ``MatMulNBits`` at float32 compute
    (accuracy_level 0) and at int8 compute (4), and int8 ``DynamicQuantizeMatMul``; the kernels
    alternate call by call, median of ``repeats``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = []
    for m, k, n in shapes:
        codes = rng.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        scales = (rng.random((n, k // 32)) * 0.01 + 0.005).astype(np.float32)
        weight = (scales[..., None] * (codes - 8.0)).reshape(n, k).astype(np.float32)

        def session(node, inits):
            g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
                "A", TensorProto.FLOAT, ["M", k])], [helper.make_tensor_value_info(
                    "Y", TensorProto.FLOAT, ["M", n])], inits)
            model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            return ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])

        nbits = lambda level: session(helper.make_node(  # noqa: E731
            "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
            block_size=32, accuracy_level=level), [numpy_helper.from_array(packed, "B"),
                                                   numpy_helper.from_array(scales, "S")])
        kernels = {
            "MatMul float32": session(helper.make_node("MatMul", ["A", "B"], ["Y"]), [
                numpy_helper.from_array(np.ascontiguousarray(weight.T), "B")]),
            "MatMulNBits 4-bit, float32 compute": nbits(0),
            "MatMulNBits 4-bit, int8 compute": nbits(4),
            "DynamicQuantizeMatMul int8": session(helper.make_node(
                "DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain="com.microsoft"), [
                numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "B"),
                numpy_helper.from_array(np.full((n,), 0.01, np.float32), "S")]),
        }
        a = rng.standard_normal((m, k)).astype(np.float32)
        times: dict = {name: [] for name in kernels}
        for sess in kernels.values():
            for _ in range(3):
                sess.run(None, {"A": a})
        for _ in range(repeats):
            for name, sess in kernels.items():
                times[name].append(_timed(lambda: sess.run(None, {"A": a})))
        for name, ts in times.items():
            out.append({"M": m, "K": k, "N": n, "kernel": name, "threads": threads,
                        "ms": float(np.median(ts)) * 1e3,
                        "gflops": 2 * m * k * n / float(np.median(ts)) / 1e9})
    return out


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate (GFLOP/s) of numpy's BLAS on ``n x n`` matrices, all cores."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_ms(path: str | None, backend: str) -> dict:
    """(B, L, P) -> ``backend``'s median ms from a ``softprompt bench`` results.json."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    rows = data["results"] if isinstance(data, dict) else data
    return {(r["B"], r["L"], r["P"]): r["median_ms"] for r in rows
            if r["backend"] == backend and r.get("status", "ok") == "ok"}


def peft_ms(path: str | None) -> dict:
    """(B, L, P) -> PEFT's median ms from a ``softprompt bench`` results.json."""
    return bench_ms(path, "peft")


def bench_backend(bundle_dir: Path) -> str:
    """The ``softprompt bench`` backend that serves this bundle: onnx-int4 or onnx."""
    manifest = json.loads((Path(bundle_dir) / "bundle.json").read_text())
    return "onnx-int4" if manifest.get("quantization") == "int4" else "onnx"


def main(argv=None) -> int:
    from softprompt.bench.driver import _ints
    from softprompt.bench.flops import Dims, flops
    from softprompt.machine import cpu_model
    from softprompt.models import load_model

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.cpu_floor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", default=None, metavar="DIR",
                   help="bundle directory (repeatable; default: the default model's float32 "
                        "and 4-bit bundles)")
    p.add_argument("--B", type=_ints, default=[1, 8])
    p.add_argument("--P", type=_ints, default=[20, 100])
    p.add_argument("--L", type=_ints, default=[32])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--against", default=None, metavar="RESULTS_JSON",
                   help="softprompt bench results.json with peft rows at the same points")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    p.add_argument("--kernels", action="store_true",
                   help="only compare ONNX Runtime's float32, 4-bit and int8 product kernels on "
                        "the model's projection shapes (one thread)")
    args = p.parse_args(argv)
    if args.kernels:
        print(f"device: {cpu_model()}; onnxruntime CPU kernels, one thread, median of 60")
        print("| M | K | N | kernel | ms | GFLOP/s |\n|---|---|---|---|---|---|")
        for r in kernel_rates():
            print(f"| {r['M']} | {r['K']} | {r['N']} | {r['kernel']} | {r['ms']:.3f} | "
                  f"{r['gflops']:.0f} |")
        return 0
    if args.bundle:
        bundles = [Path(b) for b in args.bundle]
    else:
        from softprompt.export import bundle_for

        bundles = [bundle_for("default", weights="float"), bundle_for("default", weights="int4")]
    peft = peft_ms(args.against)
    dims = Dims.from_model(load_model("default").model)
    peak = peak_gflops()
    command = "python -m softprompt.bench.cpu_floor " + shlex.join(argv or sys.argv[1:])
    print(f"command: {command}\ndevice: {cpu_model()}, float32 activations, "
          f"load average {os.getloadavg()[0]:.2f}, peak float32 GEMM {peak:.0f} GFLOP/s")
    print("| bundle | B | L | P | graph ms (median) | min-max ms | GEMM ms | other ms | PEFT ms "
          "(--against) | end-to-end ms (--against) | end to end vs PEFT (PEFT / end-to-end ms) | "
          "graph-only bound (PEFT / graph ms) | GEMM ceiling (PEFT / GEMM ms) | GFLOP | "
          "peak floor ms | peak ceiling (PEFT / peak floor ms) | top ops (ms) |")
    print("|" + "---|" * 17)
    figures = []
    for d in bundles:
        e2e = bench_ms(args.against, bench_backend(d))
        for B in args.B:
            for L in args.L:
                for P in args.P:
                    f = profile(d, B, P, L, args.repeats)
                    base, whole = peft.get((B, L, P)), e2e.get((B, L, P))
                    gflop = flops(dims, "onnx", B, P, L, 1) / 1e9
                    f.update(bundle=d.name, B=B, L=L, P=P, peft_ms=base, end_to_end_ms=whole,
                             gflop=gflop, peak_gflops=peak, peak_floor_ms=gflop / peak * 1e3)
                    figures.append(f)

                    def over(ms, base=base):
                        return f"{base / ms:.2f}x" if base and ms else "-"

                    ops = ", ".join(f"{k} {v:.1f}" for k, v in list(f["top_ops"].items())[:4])
                    print(f"| {d.name} | {B} | {L} | {P} | {f['median_ms']:.1f} | "
                          f"{f['min_ms']:.1f}-{f['max_ms']:.1f} | {f['gemm_ms']:.1f} | "
                          f"{f['kernel_ms'] - f['gemm_ms']:.1f} | "
                          f"{'-' if base is None else f'{base:.1f}'} | "
                          f"{'-' if whole is None else f'{whole:.1f}'} | {over(whole)} | "
                          f"{over(f['median_ms'])} | {over(f['gemm_ms'])} | "
                          f"{gflop:.1f} | {f['peak_floor_ms']:.1f} | {over(f['peak_floor_ms'])} | {ops} |",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "device": cpu_model(),
                                               "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
