"""The measuring tools behind bench/RESULTS.md's CPU floor and int8 figures (bench/cpu_floor.py,
bench/int8_sensitivity.py), on tiny models: they measure what they say they measure."""

from __future__ import annotations

import numpy as np
import torch

from softprompt.bench import cpu_floor
from softprompt.bench.int8_sensitivity import SCHEMES, FakeInt8
from softprompt.models import load_model


def test_profile_splits_kernel_time_by_operator(tiny_bundles):
    f = cpu_floor.profile(tiny_bundles["llama"], B=2, P=3, L=5, repeats=3)
    assert f["min_ms"] <= f["median_ms"] <= f["max_ms"]
    assert 0 < f["gemm_ms"] < f["kernel_ms"]  # products plus everything else
    assert "MatMul" in f["top_ops"] and all(ms >= 0 for ms in f["top_ops"].values())


def test_peft_rows_are_read_by_point(tmp_path):
    import json

    rows = [{"backend": "peft", "B": 8, "L": 32, "P": 20, "median_ms": 500.0, "status": "ok"},
            {"backend": "onnx", "B": 8, "L": 32, "P": 20, "median_ms": 200.0, "status": "ok"},
            {"backend": "peft", "B": 1, "L": 32, "P": 20, "median_ms": 9.0, "status": "FAILED"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"command": "x", "env": {}, "results": rows}))
    assert cpu_floor.peft_ms(str(path)) == {(8, 32, 20): 500.0}


def test_fake_int8_rounds_the_linear_layers_and_restores_them(tiny_dirs):
    lm = load_model(tiny_dirs["llama"])
    model = lm.model.eval()
    x = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad():
        want = model(x).logits
    fake = FakeInt8(model)
    head = model.get_output_embeddings().weight
    assert all(m.weight is not head for m in fake.layers.values())  # vocab projection left out
    act, weight = SCHEMES["W8A8 (per-channel, per-token)"]
    fake.apply(act, weight)
    for name, m in fake.layers.items():  # int8 per channel: <= 255 levels, one scale per row
        w = m.weight.detach()
        steps = w / (fake.weights[name].abs().amax(1, keepdim=True) / 127)
        np.testing.assert_allclose(steps, steps.round(), atol=1e-3)
    with torch.no_grad():
        moved = model(x).logits
    assert not torch.equal(moved, want)
    fake.apply(None, None)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


def test_activation_schemes_round_to_int8_grids():
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 64)
    for name in ("A8 per-token", "A8 per-block-32", "A8 per-tensor"):
        act, _ = SCHEMES[name]
        y = act(x)
        assert y.shape == x.shape and not torch.equal(y, x)
        assert (y - x).abs().max() <= x.abs().max() / 127  # half a step of the coarsest scale
    row = SCHEMES["A8 per-token"][0](x)[0, 0]
    assert len(torch.unique(row)) <= 255


def test_generation_bench_times_each_method_and_float32_ids_match_hf(tiny_dirs, tmp_path, capsys):
    """``softprompt bench --generate`` (bench/generation.py) on a tiny model: a row per method and
    B with tokens/s > 0, and the float32 runtimes' greedy ids equal transformers' generate."""
    import json

    from softprompt.bench import driver

    out = tmp_path / "generate"
    rc = driver.main(["--generate", "--model", str(tiny_dirs["llama"]), "--methods", "hf,torch,onnx",
                      "--B", "1,2", "--L", "5", "--P", "3", "--new-tokens", "3", "--repeats", "1",
                      "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["B"]): r for r in data["results"]}
    assert set(rows) == {(m, B) for m in ("hf", "torch", "onnx") for B in (1, 2)}
    for (m, B), r in rows.items():
        assert r["status"] == "ok", (m, B, r["status"])
        assert r["N"] == 3 and r["tok_per_s"] > 0 and r["prefill_ms"] > 0
        assert len(r["times_ms"]) == 1
        if m != "hf":  # float32, the same function: the very same greedy ids on every row
            assert r["same_as_hf"] == B and r["agree_prefix"] == 3, (m, B)
    assert "--generate" in data["command"] and "--new-tokens 3" in data["command"]
    printed = capsys.readouterr().out
    assert "| torch | 2 | 5 | 3 | 3 | float32 | ok |" in printed
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()
