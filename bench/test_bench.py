"""pytest-benchmark suite: single-request latency (B=1) and batch throughput (B=32) on the
default model (SmolLM2-135M-Instruct): PEFT (what users run today) beside the reference, torch,
onnx and onnx-int4 backends, in one benchmark group per point so the ratios are side by side.

Not part of the test run (pyproject's testpaths is tests/); run it explicitly:

    SOFTPROMPT_HOME=... pytest bench/ --benchmark-autosave          # saves .benchmarks/<machine>/NNNN_*.json
    pytest-benchmark compare 0001 0002 --columns=median,iqr,ops     # compare two saved runs
    SOFTPROMPT_BENCH_QUICK=1 pytest bench/ --benchmark-disable-gc   # short mode: B 1/4, L 8, 2 rounds

Every case scores B requests of L random ids (seeded) whose last id is the scored
continuation, all under one soft prompt of P virtual tokens (rows of the embedding table), with
one call per round: ``Runtime.score``, or for ``peft`` one ``PeftModelForCausalLM`` forward
(softprompt.bench.methods, the same ones ``softprompt bench`` times). The backend's
prefix is computed before timing (cached backends) and the first call is an untimed warm-up.
Each result's ``extra_info`` records the backend, device, dtype, B, L, P, sequences/s and achieved GFLOP/s (formula:
softprompt.bench.flops.flops).

Environment: SOFTPROMPT_BENCH_QUICK=1 (short mode), SOFTPROMPT_BENCH_ROUNDS (default 3),
SOFTPROMPT_BENCH_P (comma list, default 20), SOFTPROMPT_BENCH_BACKENDS (default
peft,reference,torch,onnx,onnx-int4). The onnx backends export the default model once into
$SOFTPROMPT_HOME/bundles through ``bundle_for`` if no bundle is cached (a few minutes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

QUICK = os.environ.get("SOFTPROMPT_BENCH_QUICK", "") not in ("", "0")
ROUNDS = int(os.environ.get("SOFTPROMPT_BENCH_ROUNDS", "2" if QUICK else "3"))
PS = [int(p) for p in os.environ.get("SOFTPROMPT_BENCH_P", "20").split(",")]
BACKENDS = os.environ.get("SOFTPROMPT_BENCH_BACKENDS",
                          "peft,reference,torch,onnx,onnx-int4").split(",")
L = 8 if QUICK else 32
CASES = {"latency": 1, "throughput": 4 if QUICK else 32}  # name -> B


@pytest.fixture(scope="module")
def model_facts():
    from softprompt.bench.flops import Dims
    from softprompt.models import load_model

    lm = load_model("default")
    return Dims.from_model(lm.model), lm.model.get_input_embeddings().weight.detach().numpy()


@pytest.fixture(scope="module", params=BACKENDS)
def method(request, model_facts):
    from softprompt.bench.methods import load_methods, make_prompt

    m = load_methods([request.param], "default", "cpu", "float32", max_batch=64,
                     max_batch_tokens=1 << 16, log=lambda msg: None)[request.param]
    if isinstance(m, str):
        pytest.fail(f"{request.param} did not load: {m}")
    for P in PS:
        sp = make_prompt(P, model_facts[1], seed=0)
        m.prepare(None if sp is None else sp.name, sp)
    return m


@pytest.mark.parametrize("P", PS)
@pytest.mark.parametrize("case", list(CASES))
def test_score(benchmark, method, model_facts, case, P):
    from softprompt.bench.driver import environment
    from softprompt.bench.flops import flops
    from softprompt.bench.methods import make_ids

    dims, _ = model_facts
    B = CASES[case]
    ids = make_ids(B, L, dims.vocab_size, seed=0)
    batch = method.requests(f"p{P}" if P else None, ids, 1)
    benchmark.group = f"{case} B={B} L={L} P={P}"
    out = benchmark.pedantic(method.run, args=(batch,), rounds=ROUNDS, warmup_rounds=1,
                             iterations=1)
    assert out.shape == (B, 1) and np.isfinite(out).all()
    med = benchmark.stats.stats.median
    env = environment("cpu", "float32")
    kind = method.name if method.name in ("reference", "peft") else "cached"
    benchmark.extra_info.update(
        backend=method.name, device=env["device_name"], dtype="float32", B=B, L=L, P=P,
        seq_per_s=round(B / med, 2), gflop_per_s=round(flops(dims, kind, B, P, L, 1) / med / 1e9, 2),
        torch_threads=env["torch_threads"], load_average=env["load_average"])
