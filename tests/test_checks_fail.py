"""The checks that vouch for correctness can fail: each is run against a bug put in on purpose
(bench/mutations.py: request positions from 0, the last prefix key dropped, one future key
visible, prompts swapped between rows) and must catch it, while passing without it.

- the end-to-end check (ours against PEFT's own forward, float32, the SCORE tolerance) on the
  tiny models, through the reference attention and the Triton kernels (interpreted here; the
  compiled variant is in tests/test_cuda.py);
- bench/gpu_e2e.py's checks phase in its CPU smoke mode, whose self-test fails the run on any
  mutation it does not catch;
- ``softprompt bench --refcheck``, which must report a broken backend FAILED and not time it.
(The int4 export bound's breakages, constant logits and a zeroed layer: tests/test_quantize.py.)
"""

import json

import numpy as np
import pytest
import torch

from tolerances import SCORE

TOL = SCORE["float32"]["atol"]


def _peft_and_runtime(tiny_dir, triton: bool):
    """A PEFT model holding two PROMPT_TUNING adapters (P=20 and P=5, random init), and the torch
    backend on CPU with the same two prompts."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from softprompt.runtime.api import Runtime
    from softprompt.runtime.prompts import SoftPrompt

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
                        adapter_name="p20")
    pm.add_adapter("p5", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5))
    rt = Runtime.load(str(tiny_dir), backend="torch", device="cpu", dtype="float32")
    rt.backend.triton = triton
    for name in ("p20", "p5"):
        emb = pm.prompt_encoder[name].embedding.weight.detach().float().numpy()
        rt.add_prompt(name, SoftPrompt(emb, name=name))
    return pm.eval(), rt


def _mixed_requests():
    rng = np.random.default_rng(3)
    return [{"prompt": ["p20", "p5"][i % 2], "context": rng.integers(4, 96, 3 + 2 * i).tolist(),
             "continuation": rng.integers(4, 96, 2).tolist()} for i in range(4)]


def _peft_alone(pm, reqs) -> np.ndarray:
    """PEFT's forward on each request alone: the continuation's log-probs [n, 2]."""
    out = []
    for r in reqs:
        pm.set_adapter(r["prompt"])
        P = pm.peft_config[r["prompt"]].num_virtual_tokens
        ids = r["context"] + r["continuation"]
        with torch.no_grad():
            lp = pm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        n = len(r["context"])
        out.append([lp[P + n - 1 + i, t].item() for i, t in enumerate(r["continuation"])])
    return np.array(out)


@pytest.mark.parametrize("family, triton", [("llama", False), ("llama", True), ("gpt2", False),
                                            ("qwen2", True)])
def test_end_to_end_check_fails_under_every_mutation(tiny_dirs, family, triton):
    """ours vs PEFT within the float32 SCORE tolerance; then under each mutation the same
    comparison fails (Llama/Qwen2: RoPE, GPT-2: learned positions)."""
    from softprompt.bench.mutations import MUTATIONS, max_abs_diff, self_test

    pm, rt = _peft_and_runtime(tiny_dirs[family], triton)
    reqs = _mixed_requests()
    want = _peft_alone(pm, reqs)

    def ours():
        return np.array([r.token_logprobs for r in rt.score(reqs)])

    assert max_abs_diff(ours(), want) <= TOL
    result = self_test(ours, want, TOL)
    assert [m for m in MUTATIONS if not result[m]["caught"]] == [], result
    assert all(result[m]["max_abs_diff"] > 10 * TOL for m in MUTATIONS), result  # by a margin
    assert max_abs_diff(ours(), want) <= TOL  # every mutation undone
    rt.close()


def test_mutations_change_what_they_say(tiny_dirs):
    """Each mutation moves only what it names: positions_from_0 leaves a prompt-less request
    alone (its positions start at 0 anyway); prompts_swapped leaves a one-prompt batch alone."""
    from softprompt.bench.mutations import mutated

    pm, rt = _peft_and_runtime(tiny_dirs["llama"], triton=False)
    plain = [{"prompt": None, "context": [5, 6, 7, 8], "continuation": [9]}]
    one = [{"prompt": "p20", "context": [5, 6, 7, 8], "continuation": [9]}] * 2
    want_plain, want_one = rt.score(plain)[0].token_logprobs, [r.token_logprobs for r in rt.score(one)]
    with mutated("positions_from_0"):
        np.testing.assert_array_equal(rt.score(plain)[0].token_logprobs, want_plain)
    with mutated("prompts_swapped"):
        np.testing.assert_array_equal([r.token_logprobs for r in rt.score(one)], want_one)
    with pytest.raises(ValueError, match="unknown mutation"):
        with mutated("nothing"):
            pass
    rt.close()


def test_gpu_e2e_cpu_smoke_checks_catch_every_mutation(tmp_path):
    """bench/gpu_e2e.py --cpu-smoke --checks-only: its float32 checks pass, and its self-test
    reports every mutation caught (it exits 1 otherwise)."""
    from softprompt.bench import gpu_e2e
    from softprompt.bench.mutations import MUTATIONS

    out = tmp_path / "e2e.json"
    assert gpu_e2e.main(["--cpu-smoke", "--checks-only", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["checks"] and all(r["status"] == "ok" for r in res["checks"])
    (test,) = res["self_test"]
    assert all(test[m]["caught"] and test[m]["max_abs_diff"] > 10 * test["tol"] for m in MUTATIONS)
    assert res["engine"][0]["status"] == "ok" and res["rows"] == []


def test_driver_refcheck_reports_a_broken_backend(tiny_dirs, tmp_path):
    """softprompt bench --refcheck: the torch backend with request positions from 0 differs
    from the float32 reference backend (which the mutation does not touch) and is reported
    FAILED, not timed; without the mutation it passes."""
    from softprompt.bench.driver import configure, run_benchmark
    from softprompt.bench.mutations import mutated

    args = configure(__import__("argparse").ArgumentParser()).parse_args(
        ["--model", str(tiny_dirs["llama"]), "--backends", "reference,torch", "--P", "5", "--B", "2",
         "--L", "6", "--repeats", "1", "--warmup", "0", "--refcheck", "--no-progress",
         "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)])
    ok, _ = run_benchmark(args, log=lambda msg: None)
    assert {r.backend: r.status for r in ok} == {"reference": "ok", "torch": "ok"}
    with mutated("positions_from_0"):
        broken, _ = run_benchmark(args, log=lambda msg: None)
    torch_row = next(r for r in broken if r.backend == "torch")
    assert torch_row.status == "FAILED" and torch_row.max_abs_diff > torch_row.tol
    assert torch_row.times_ms == []


def test_gpu_kernels_checks_fail_on_a_broken_kernel():
    """bench/gpu_kernels.py's checks (CPU smoke sizes, interpreted kernels) pass, and fail for a
    fused kernel that drops the last key of every prefix, while the untouched cascade passes."""
    import types

    import softprompt.kernels as pa
    from softprompt.bench import gpu_kernels
    from softprompt.tolerances import kernel_tol

    def drop_last_prefix_key(*args, **kwargs):
        if "prefix_lens" in kwargs:
            kwargs["prefix_lens"] = (kwargs["prefix_lens"] - 1).clamp(min=0)
        else:
            args = (*args[:5], (args[5] - 1).clamp(min=0), *args[6:])
        return pa.prefix_attention(*args, **kwargs)

    broken = types.SimpleNamespace(**{n: getattr(pa, n) for n in pa.__all__})
    broken.prefix_attention = drop_last_prefix_key
    for kernels, want_failed in ((pa, set()), (broken, {"prefix_attention"})):
        checks = gpu_kernels.run_checks(torch, kernels, kernel_tol, "cpu", [torch.float32], small=True)
        failed = {c["fn"].split(".")[0] for c in checks if not c["ok"]}  # output or its .lse
        assert failed == want_failed, failed
