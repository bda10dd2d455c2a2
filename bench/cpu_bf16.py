"""bfloat16 on this CPU: the GEMM rate and the scoring time of the paths that exist today.

    python -m softprompt.bench.cpu_bf16 [--repeats 7]

Measures, side by side in one process (torch threads = the CPU count): one score batch (default model, B=8 rows of
L=32 tokens, the last scored, a P=20 soft prompt) through PEFT's forward in float32 and
bfloat16, the onnx backend (float32) and the torch backend in float32 and bfloat16, and the
bfloat16 drift against float32 (|delta log-prob| over the batch); then a GEMM of a B=8, L=33
MLP shape and 2048^3 in float32 and bfloat16 (the matrix units' rate: AMX on Xeons that have
it, AVX-512 BF16 dot products elsewhere). Prints the CPU model and its
matrix units (``softprompt.machine.matrix_units``) with the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _median(fn, repeats: int) -> tuple[float, float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[0] * 1e3, ts[-1] * 1e3


def gemm(repeats: int) -> None:
    import torch

    for m, k, n in ((264, 576, 1536), (2048, 2048, 2048)):
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            med, lo, hi = _median(lambda: a @ b, repeats * (20 if m < 1000 else 1))
            print(f"GEMM {m}x{k}x{n} {str(dt)[6:]:9s} {2 * m * k * n / med / 1e6:7.0f} GFLOP/s "
                  f"(median {med:.2f} ms, {lo:.2f}-{hi:.2f})")


def scoring(repeats: int) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from softprompt import Runtime, SoftPrompt
    from softprompt.models.loading import default_model_dir

    rng = np.random.default_rng(0)
    ids = rng.integers(100, 20000, (8, 32))
    sp = SoftPrompt.random(20, 576, seed=1, std=0.5, name="p")
    reqs = [{"prompt": "p", "context": r[:-1].tolist(), "continuation": r[-1:].tolist()} for r in ids]
    got = {}

    def measure(name, fn, result, on=lambda f: f()):
        med, lo, hi = on(lambda: _median(fn, repeats))
        got[name] = on(result)
        print(f"{name:16s} score B=8 L=32 P=20: median {med:.0f} ms ({lo:.0f}-{hi:.0f})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = sp.save_peft(Path(tmp) / "p")
        x = torch.as_tensor(ids)
        for dt in ("float32", "bfloat16"):
            rt = Runtime.load("default", backend="torch", dtype=dt)
            rt.add_prompt("p", sp)
            base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=getattr(torch, dt))
            model = PeftModel.from_pretrained(base, adapter).eval()

            def peft_lp():
                with torch.inference_mode():
                    lp = model(input_ids=x).logits[:, -2].float().log_softmax(-1)
                return lp.gather(1, x[:, -1:])[:, 0].double().numpy()

            # PEFT runs on the runtime's engine thread, where the runtime's own forwards run: GNU
            # OpenMP gives each calling thread its own team, and two teams on 2 cores throttle
            # each other (bench/RESULTS.md, "The torch backend beside other torch threads")
            measure(f"peft {dt}", torch.inference_mode()(lambda: model(input_ids=x)), peft_lp,
                    on=rt.engine.call)
            measure(f"torch {dt}", lambda: rt.score(reqs),
                    lambda: np.array([r.logprob for r in rt.score(reqs)]))
            rt.close()
    rt = Runtime.load("default", backend="onnx")
    rt.add_prompt("p", sp)
    med, lo, hi = _median(lambda: rt.score(reqs), repeats)
    got["onnx float32"] = np.array([r.logprob for r in rt.score(reqs)])
    print(f"{'onnx float32':16s} score B=8 L=32 P=20: median {med:.0f} ms ({lo:.0f}-{hi:.0f})")
    rt.close()
    exact = got["peft float32"]
    for name, lp in got.items():
        d = np.abs(lp - exact)
        print(f"  {name:16s} |delta log-prob| vs peft float32: mean {d.mean():.4f}, max {d.max():.4f}")


def main(argv=None) -> int:
    import torch

    from softprompt.machine import cpu_model, matrix_units

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.cpu_bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(f"device: {cpu_model()} ({matrix_units()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    scoring(args.repeats)  # first: the GEMMs' OpenMP team on this thread would slow the engine's
    gemm(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
