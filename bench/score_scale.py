"""Rows/s of the batch-scoring job: one process (softprompt.jobs) against Ray Data with 1 and 2
actors (softprompt.ray.score_dataset), the same rows, measured side by side in one run.

    python -m softprompt.bench.score_scale --rows 2000 --P 20 --L 16

Model: the default model's ONNX bundle if it was exported ($SOFTPROMPT_HOME/bundles/*/bundle.json
of SmolLM2), else a tiny random Llama (:func:`_tiny_llama`, the configuration of the tests' tiny
Llama, no tokenizer: the rows are token ids), exported to a temporary directory.
Rows: L random token ids as context + 1 id as continuation under one random soft prompt of P
virtual tokens (seed 0). Ray times include starting the actor pool (each actor loads the bundle
once), because a job pays it; the one-process time excludes loading the runtime.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _default_bundle() -> Path | None:
    from softprompt.models import softprompt_home

    for m in sorted((softprompt_home() / "bundles").glob("*/bundle.json")):
        meta = json.loads(m.read_text())
        name = str(meta.get("model_name") or meta.get("source"))
        if meta.get("dtype") in ("fp32", "float32") and not meta.get("weights") and \
                (name == "default" or "SmolLM2" in name):
            return m.parent
    return None


def _tiny_llama(path: Path) -> Path:
    """Save a randomly initialised 2-layer Llama (E 64, 4 query over 2 K/V heads, V 96; seed 0,
    weights N(0, 0.08)) into ``path``: the tests' tiny Llama, without its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--P", type=int, default=20)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="rows per forward / per actor call")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--chunk-rows", type=int, default=250,
                    help="rows per chunk of the `softprompt score --ray` file job")
    args = ap.parse_args(argv)

    import ray

    import softprompt.ray as sp_ray
    from softprompt.runtime.api import Runtime
    from softprompt.jobs import score_file

    tmp = Path(tempfile.mkdtemp(prefix="score_scale-"))
    bundle = _default_bundle()
    if bundle is None:
        from softprompt.export import export

        bundle = Path(export(_tiny_llama(tmp / "tiny"), tmp / "bundle", progress=False))
        model_desc = "tiny random Llama (2 layers, E=64, V=96), fp32 bundle"
    else:
        model_desc = f"default model SmolLM2-135M-Instruct, fp32 bundle {bundle.name}"
    rt = Runtime.load(bundle, backend="onnx", max_batch=args.batch)
    rng = np.random.default_rng(0)
    np.save(tmp / "p.npy", rng.standard_normal((args.P, rt.backend.hidden_size)).astype(np.float32))
    rt.add_prompt("p", tmp / "p.npy")
    from softprompt.bench.labels import runtime_label

    ran = runtime_label(rt)
    V = rt.backend.vocab_size
    rows = [{"prompt": "p", "context": rng.integers(3, V, args.L).tolist(),
             "continuation": [int(rng.integers(3, V))]} for _ in range(args.rows)]
    with open(tmp / "in.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    results = []
    t = time.perf_counter()
    score_file(rt, str(tmp / "in.jsonl"), str(tmp / "out.jsonl"), chunk_rows=1000)
    results.append(("one process (softprompt score)", time.perf_counter() - t))
    rt.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for n in [int(a) for a in args.actors.split(",")]:
        ds = ray.data.from_items(rows, override_num_blocks=max(n, args.rows // 500))
        t = time.perf_counter()
        out = sp_ray.score_dataset(ds, bundle, {"p": str(tmp / "p.npy")}, num_actors=n,
                                   batch_size=args.batch, runtime_kwargs={"max_batch": args.batch})
        got = out.take_all()
        assert len(got) == args.rows and not any(r["error"] for r in got)
        results.append((f"Ray Data, {n} actor{'s' * (n > 1)}", time.perf_counter() - t))
        t = time.perf_counter()  # the file job: one actor pool for all its chunks
        sp_ray.score_file(str(tmp / "in.jsonl"), str(tmp / f"ray{n}.jsonl"), bundle,
                          {"p": str(tmp / "p.npy")}, backend="onnx", num_actors=n,
                          batch_size=args.batch, runtime_kwargs={"max_batch": args.batch},
                          chunk_rows=args.chunk_rows)
        results.append((f"softprompt score --ray, {n} actor{'s' * (n > 1)}, "
                        f"{-(-args.rows // args.chunk_rows)} chunks", time.perf_counter() - t))
    ray.shutdown()
    print(f"device: {cpu_name()}, model: {model_desc}, {ran}, rows {args.rows}, P={args.P}, "
          f"L={args.L}+1, batch {args.batch}")
    print("| engine | wall s | rows/s |\n|---|---|---|")
    for name, s in results:
        print(f"| {name} | {s:.1f} | {args.rows / s:.0f} |")


if __name__ == "__main__":
    main()
