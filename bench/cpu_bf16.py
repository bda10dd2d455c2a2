"""bfloat16 on this CPU: scoring speed and drift of every path, side by side, and the GEMM rate.

    python -m softprompt.bench.cpu_bf16 [--repeats 7] [--points 8x20,8x100,1x20]

Scoring (default model, one call scoring B rows of L = 32 context + 1 scored token under a P
soft prompt, per ``--points`` BxP): PEFT's forward in float32 and bfloat16 (what users run
today), the onnx backend in float32 (ONNX Runtime) and bfloat16 (the same bundle under
OpenVINO), and the torch backend in bfloat16; median and min-max of ``--repeats`` calls after a
warm-up, and each path's speedup over PEFT in both dtypes. Drift: |delta log-prob| against PEFT
in float32 over 64 random requests (P=20), and on the two demo sets (every example x label,
against the float32 onnx backend, which equals PEFT within 1e-4) with each path's accuracy.
Then a GEMM of a B=8, L=33 MLP shape and 2048^3 in float32 and bfloat16 (the matrix units'
rate: AMX on Xeons that have it, AVX-512 BF16 dot products elsewhere). Prints the CPU model and
its matrix units (``softprompt.machine.matrix_units``) with the figures.

PEFT runs on the torch runtime's engine thread, where that runtime's own forwards run: GNU
OpenMP gives each calling thread its own team, and two teams on 2 cores throttle each other.
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


def scoring(repeats: int, points: list[tuple[int, int]]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from softprompt import Runtime, SoftPrompt
    from softprompt.models.loading import default_model_dir
    from softprompt.runtime.demo import PROMPTS_DIR, TASKS, load_examples

    rng = np.random.default_rng(0)
    sp = {P: SoftPrompt.random(P, 576, seed=P, std=0.5, name=f"p{P}") for P in {P for _, P in points} | {20}}
    drift_ids = rng.integers(100, 20000, (64, 33))

    def reqs(ids, P):
        return [{"prompt": f"p{P}", "context": r[:-1].tolist(), "continuation": r[-1:].tolist()} for r in ids]

    paths = {"onnx float32": dict(backend="onnx", dtype="float32"),
             "onnx bfloat16": dict(backend="onnx", dtype="bfloat16"),
             "torch bfloat16": dict(backend="torch", dtype="bfloat16")}
    rts = {}
    for name, kw in paths.items():
        rts[name] = rt = Runtime.load("default", **kw)
        for prompt in sp.values():
            rt.add_prompt(prompt.name, prompt)
    host = rts["torch bfloat16"]  # PEFT's forwards run on its engine thread (module docstring)
    times: dict[tuple[int, int], dict[str, tuple]] = {pt: {} for pt in points}
    drift = {}
    with tempfile.TemporaryDirectory() as tmp:
        peft = {}  # dtype -> one PeftModel holding an adapter per P (set_adapter picks it)
        for dt in ("float32", "bfloat16"):
            base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=getattr(torch, dt))
            for P, prompt in sp.items():
                path = str(prompt.save_peft(Path(tmp) / f"{dt}-p{P}"))
                if dt not in peft:
                    peft[dt] = PeftModel.from_pretrained(base, path, adapter_name=f"p{P}").eval()
                else:
                    peft[dt].load_adapter(path, adapter_name=f"p{P}")

        def peft_lp(dt, P, ids):
            model = peft[dt]
            model.set_adapter(f"p{P}")
            x = torch.as_tensor(ids)
            with torch.inference_mode():
                lp = model(input_ids=x).logits[:, -2].float().log_softmax(-1)
            return lp.gather(1, x[:, -1:])[:, 0].double().numpy()

        for B, P in points:
            ids = rng.integers(100, 20000, (B, 33))
            for dt in ("float32", "bfloat16"):
                times[(B, P)][f"peft {dt}"] = host.engine.call(lambda: _median(lambda: peft_lp(dt, P, ids), repeats))
            for name, rt in rts.items():
                times[(B, P)][name] = _median(lambda: rt.score(reqs(ids, P)), repeats)
            t = times[(B, P)]
            for name, (med, lo, hi) in t.items():
                print(f"{name:16s} B={B} P={P} L=32+1: median {med:6.0f} ms ({lo:.0f}-{hi:.0f})  "
                      f"{t['peft float32'][0] / med:5.2f}x PEFT-fp32, {t['peft bfloat16'][0] / med:5.2f}x PEFT-bf16",
                      flush=True)
        exact = np.concatenate([host.engine.call(lambda: peft_lp("float32", 20, drift_ids[i:i + 8]))
                                for i in range(0, 64, 8)])
        drift["peft bfloat16"] = np.concatenate([host.engine.call(lambda: peft_lp("bfloat16", 20, drift_ids[i:i + 8]))
                                                 for i in range(0, 64, 8)]) - exact
    for name, rt in rts.items():
        drift[name] = np.array([r.logprob for r in rt.score(reqs(drift_ids, 20))]) - exact
    print("drift vs PEFT float32, 64 random requests (P=20, L=32+1):")
    for name, d in drift.items():
        print(f"  {name:16s} mean |delta| {np.abs(d).mean():.4f}, max {np.abs(d).max():.4f}")
    print("demo sets (every example x label; accuracy, and drift vs onnx float32 = PEFT within 1e-4):")
    for task_name, task in TASKS.items():
        ex = load_examples(task_name, "test")
        rows = [{"prompt": task_name, "context": task.format(e["text"]), "continuation": label}
                for e in ex for label in task.labels]
        gold = np.array([task.label_index(e["label"]) for e in ex])
        lps = {}
        for name, rt in rts.items():
            rt.add_prompt(task_name, PROMPTS_DIR / task_name)
            lps[name] = np.array([r.logprob for r in rt.score(rows)]).reshape(len(ex), len(task.labels))
        for name, lp in lps.items():
            d = np.abs(lp - lps["onnx float32"])
            print(f"  {task_name:9s} {name:16s} accuracy {np.mean(lp.argmax(1) == gold):.3f}, "
                  f"mean |delta| {d.mean():.4f}, max {d.max():.4f}")
    for rt in rts.values():
        rt.close()


def main(argv=None) -> int:
    import torch

    from softprompt.machine import cpu_model, matrix_units

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.cpu_bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--points", default="8x20,8x100,1x20", help="BxP score points (default: %(default)s)")
    args = p.parse_args(argv)
    points = [tuple(int(v) for v in pt.split("x")) for pt in args.points.split(",")]
    print(f"device: {cpu_model()} ({matrix_units()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    scoring(args.repeats, points)  # first: the GEMMs' OpenMP team on this thread would slow the engine's
    gemm(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
