"""The CUDA variants (marked ``cuda``): what only a GPU can run, against the references the CPU
tests use. Collected everywhere, skipped without a CUDA device (conftest.py); on a GPU machine
``pytest -m cuda`` runs them alone (bench/gpu_check.sh does).

- the compiled Triton kernels (fused, cascade, the per-forward plan, write_kv) against
  ``prefix_attention_ref`` in float32, float16 and bfloat16, at odd sizes (1, 17, 37, 129);
- the cascade choice: with a rule that picks it, the torch backend's results equal those of the
  fused kernel and of the reference attention;
- CUDA graphs: captured and replayed forwards and decode steps against the eager ones;
- the torch backend on CUDA in float32 against the CPU reference backend (the float32 SCORE
  tolerance), and in bfloat16 (its SCORE row);
- the end-to-end check's mutation self-test through the compiled kernels (bench/mutations.py);
- ONNX Runtime's CUDA execution provider (IOBinding) against its CPU provider, where installed.
"""

import importlib

import numpy as np
import pytest
import torch

from tolerances import KERNEL, ONNX, SCORE

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_kernels")]

E = 64
# Hand-picked shapes: odd lengths (1, 17, 37, 129), every GQA ratio, ragged rows, mixed prompts.
CASES = {
    "prefill-g4-p17-l37-mixed": dict(B=3, H=8, Hkv=2, D=64, Pmax=17, prefix_lens=[17, 1, 0],
                                     prompt_idx=[2, 0, 1], Lq=37, Lk=37, q_lens=[37, 17, 1],
                                     kv_lens=[37, 17, 1]),
    "prefill-g1-p129-l129": dict(B=2, H=4, Hkv=4, D=128, Pmax=129, prefix_lens=[129], prompt_idx=[0, 0],
                                 Lq=129, Lk=129, q_lens=[129, 37], kv_lens=[129, 37]),
    "prefill-g3-chunked-after-cache": dict(B=2, H=9, Hkv=3, D=64, Pmax=37, prefix_lens=[37, 20],
                                           prompt_idx=[1, 0], Lq=17, Lk=129, q_lens=[17, 1],
                                           kv_lens=[129, 38]),
    "decode-g8-b17": dict(B=17, H=8, Hkv=1, D=64, Pmax=129, prefix_lens=[129, 17, 1], prompt_idx=[i % 3 for i in range(17)],
                          Lq=1, Lk=129, q_lens=[0 if i == 5 else 1 for i in range(17)],
                          kv_lens=[(i * 37) % 129 + 1 for i in range(17)]),
    "decode-d24-padded-head-dim": dict(B=2, H=8, Hkv=2, D=24, Pmax=1, prefix_lens=[1], prompt_idx=[0, 0],
                                       Lq=1, Lk=7, kv_lens=[7, 2]),
}
# (case, dtype): every case in bfloat16 (the CUDA default); float32 (IEEE dots, slow to compile)
# and float16 on a prefill and a decode case, so a fresh GPU compiles few variants
PAIRS = ([(name, torch.bfloat16) for name in CASES]
         + [(name, dtype) for name in ("prefill-g4-p17-l37-mixed", "decode-g8-b17")
            for dtype in (torch.float32, torch.float16)])


def _inputs(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D, Lq, Lk, Pmax = (case[k] for k in ("B", "H", "Hkv", "D", "Lq", "Lk", "Pmax"))
    N = len(case["prefix_lens"])

    def rand(*shape):  # [B, L, H, D] memory viewed as [B, H, L, D], as in a model
        return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).to("cuda", dtype).transpose(1, 2)

    def ints(x):
        return None if x is None else torch.tensor(x, dtype=torch.int32, device="cuda")

    return (rand(B, H, Lq, D), rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D), rand(N, Hkv, Pmax, D),
            rand(N, Hkv, Pmax, D), ints(case["prefix_lens"]), ints(case["prompt_idx"]),
            ints(case.get("kv_lens")), ints(case.get("q_lens")))


@pytest.mark.parametrize("name, dtype", PAIRS, ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in PAIRS])
def test_compiled_kernels_match_the_reference(name, dtype):
    import softprompt.kernels as pa

    x = _inputs(CASES[name], dtype)
    want, want_lse = pa.prefix_attention_ref(*x, return_lse=True)
    for fn in (pa.prefix_attention, pa.prefix_attention_cascade):
        got, lse = fn(*x, return_lse=True)
        torch.testing.assert_close(got, want, **KERNEL[dtype])
        torch.testing.assert_close(lse, want_lse, **KERNEL[torch.float32])
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = x
    for kernel in ("fused", "cascade", "auto"):
        plan = pa.plan_attention(q.shape, k.shape, pk.shape, plens, idx, kv_lens, q_lens, dtype=dtype,
                                 kernel=kernel)
        for layer in (1, 2):  # one plan, every layer
            y = _inputs(CASES[name], dtype, seed=layer)
            torch.testing.assert_close(pa.run_attention(plan, *y[:5]), pa.prefix_attention_ref(*y),
                                       **KERNEL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_compiled_write_kv_matches_the_reference(dtype):
    import softprompt.kernels as pa

    g = torch.Generator().manual_seed(4)
    B, Hkv, cap, D = 17, 3, 37, 64
    cache = torch.randn(2, B, Hkv, cap, D, generator=g).to("cuda", dtype)
    new = torch.randn(2, B, 1, Hkv, D, generator=g).to("cuda", dtype).transpose(2, 3)
    pos = torch.tensor([(i * 7) % cap if i % 5 else -1 for i in range(B)], device="cuda")
    got, want = cache.clone(), cache.clone()
    pa.write_kv(got[0], got[1], new[0], new[1], pos)
    pa.write_kv_ref(want[0], want[1], new[0], new[1], pos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ the runtime
def _prompts():
    from softprompt.runtime.prompts import SoftPrompt

    return {"p1": SoftPrompt.random(1, E, seed=1), "p20": SoftPrompt.random(20, E, seed=2),
            "p100": SoftPrompt.random(100, E, seed=3, std=0.5)}


def _requests(seed=0, n=24):
    """Mixed prompts (none, P 1/20/100), lengths 1..64, with and without continuations; n >= 16
    rows so a cascade rule with min_rows 16 can apply."""
    rng = np.random.default_rng(seed)
    names = ["p1", "p20", "p100", None]
    return [{"prompt": names[i % 4], "context": rng.integers(4, 96, 1 + (i * 7) % 64).tolist(),
             **({"continuation": rng.integers(4, 96, 1 + i % 3).tolist()} if i % 3 else {})}
            for i in range(n)]


def _load(model, **kw):
    from softprompt.runtime.api import Runtime

    rt = Runtime.load(str(model), **kw)
    for name, sp in _prompts().items():
        rt.add_prompt(name, sp)
    return rt


@pytest.fixture(scope="module")
def cpu_reference(tiny_dirs):
    """{family: the float32 reference backend on CPU}: each request's expected result alone."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = _load(tiny_dirs[family], backend="reference", device="cpu", dtype="float32")
        return made[family]

    return get


def _alone(ref, reqs):
    return [ref.score([r])[0] for r in reqs]


def _assert_close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **SCORE[dtype])


@pytest.mark.parametrize("family, dtype", [("llama", "float32"), ("gpt2", "float32"), ("qwen2", "float32"),
                                           ("gemma", "float32"), ("llama", "bfloat16")])
def test_torch_backend_on_cuda_equals_the_cpu_reference(tiny_dirs, cpu_reference, family, dtype):
    """The torch backend on CUDA (compiled kernels, CUDA graphs on) scores a mixed batch as the
    float32 reference on CPU scores each request alone, within the SCORE row of its dtype."""
    reqs = _requests(seed=1)
    rt = _load(tiny_dirs[family], backend="torch", device="cuda", dtype=dtype)
    assert rt.backend.triton and rt.backend.graphs is not None
    _assert_close(rt.score(reqs), _alone(cpu_reference(family), reqs), dtype)
    _assert_close(rt.score(reqs), _alone(cpu_reference(family), reqs), dtype)  # replayed
    assert rt.stats()["graphs_disabled"] is None
    rt.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graphs_replay_equals_eager(tiny_dirs, family):
    """Captured forwards and decode steps replay the eager results: scores within the float32
    kernel tolerance, greedy tokens identical, rows joining and leaving the decode pool."""
    reqs = _requests(seed=2)
    graphed = _load(tiny_dirs[family], backend="torch", device="cuda", dtype="float32")
    eager = _load(tiny_dirs[family], backend="torch", device="cuda", dtype="float32", cuda_graphs=False)
    for _ in range(2):  # capture, then replay
        for g, w in zip(graphed.score(reqs), eager.score(reqs)):
            np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **KERNEL[torch.float32])
    names, ctxs = ["p20", None, "p100", "p1"], [[5, 6, 7], [9, 9], [4] * 9, [8] * 30]
    kw = dict(max_new_tokens=12, stop_at_eos=False)
    for _ in range(2):
        got = [g.token_ids for g in graphed.generate(names, ctxs, **kw)]
        assert got == [g.token_ids for g in eager.generate(names, ctxs, **kw)]
    streams = [graphed.stream(n, c, max_new_tokens=4 + 3 * i, stop_at_eos=False)
               for i, (n, c) in enumerate(zip(names, ctxs))]
    joined = [[t for c in s for t in c.token_ids] for s in streams]
    alone = [eager.generate(n, [c], max_new_tokens=4 + 3 * i, stop_at_eos=False)[0].token_ids
             for i, (n, c) in enumerate(zip(names, ctxs))]
    assert joined == alone
    st = graphed.stats()
    assert st["graphs_disabled"] is None and st["graph_captures"] >= 3 and st["graph_replays"] >= 3
    graphed.close()
    eager.close()


def test_cascade_choice_equals_both_paths(tiny_dirs, cpu_reference, monkeypatch):
    """With a rule that takes the cascade for these shapes (24 rows, 100-token prefix), the torch
    backend's scores equal the fused kernel's and the reference attention's (each run eagerly)."""
    cascade_mod = importlib.import_module("softprompt.kernels.cascade")
    reqs = [dict(r, prompt="p100") for r in _requests(seed=3)]
    rt = _load(tiny_dirs["llama"], backend="torch", device="cuda", dtype="float32", cuda_graphs=False)
    fused = rt.score(reqs)
    rule = cascade_mod.CascadeRule(min_rows=16, rows_per_prompt=4, min_prefix=64, prefix_per_query=1)
    monkeypatch.setattr(cascade_mod, "MEASURED_RULE", rule)
    kernels, picked = importlib.import_module("softprompt.kernels"), []
    plan = kernels.plan_attention  # what the torch backend calls once per forward

    def spy(*args, **kwargs):
        picked.append(plan(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(kernels, "plan_attention", spy)
    cascaded = rt.score(reqs)
    assert any(p.kernel == "cascade" for p in picked)
    for g, w in zip(cascaded, fused):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **KERNEL[torch.float32])
    _assert_close(cascaded, _alone(cpu_reference("llama"), reqs), "float32")
    rt.close()


def test_mutations_are_caught_through_the_compiled_kernels(tiny_dirs):
    """bench/mutations.py on CUDA: the check ours vs the reference fails under every mutation
    (positions from 0 and a dropped prefix key through the Triton kernels), passes without."""
    from softprompt.bench.mutations import MUTATIONS, max_abs_diff, self_test

    reqs = [{"prompt": ["p20", "p100"][i % 2], "context": [5 + i, 9, 14, 3, 40, 7, 8][: 7 - i],
             "continuation": [21, 30]} for i in range(4)]  # two prompts: prompts_swapped shows
    ref = _load(tiny_dirs["llama"], backend="reference", device="cpu", dtype="float32")
    want = np.array([r.token_logprobs for r in ref.score(reqs)])
    rt = _load(tiny_dirs["llama"], backend="torch", device="cuda", dtype="float32", cuda_graphs=False)

    def ours():
        return np.array([r.token_logprobs for r in rt.score(reqs)])

    tol = SCORE["float32"]["atol"]
    assert max_abs_diff(ours(), want) <= tol
    caught = self_test(ours, want, tol)
    assert all(caught[m]["caught"] for m in MUTATIONS), caught
    rt.close()
    ref.close()


def test_onnx_cuda_provider_equals_cpu(tiny_bundles):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
    reqs = _requests(seed=5)
    cpu = _load(tiny_bundles["llama"], backend="onnx")
    gpu = _load(tiny_bundles["llama"], backend="onnx",
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.backend.bundle.use_io_binding
    for g, w in zip(gpu.score(reqs), cpu.score(reqs)):
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, **ONNX["float32"])
    # decode steps through IOBinding (greedy tokens are not compared: the CUDA provider may use
    # TF32, which can flip a near tie of this random model)
    got = gpu.generate(["p20", "p100"], [[5, 6, 7], [4] * 9], max_new_tokens=6, stop_at_eos=False)
    assert [len(g.token_ids) for g in got] == [6, 6]
    cpu.close()
    gpu.close()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_and_composed_prompts_on_cuda_equal_the_cpu_reference(tiny_dirs, cpu_reference, family):
    """K/V prompts (inserted as they are), compositions with text (computed through the compiled
    kernels over the K/V before them) and embedding prompts, mixed in one batch on CUDA with
    graphs on: scores equal the float32 reference alone, greedy tokens identical."""
    from softprompt import KVPrompt

    ref = cpu_reference(family)
    info = ref.info
    rng = np.random.default_rng(5)
    shape = (info.num_layers, info.num_kv_heads, 37, info.head_dim)
    kv = KVPrompt(*(rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in range(2)))
    sources = {"kv": kv, "kv-text": [kv, "the movie was great ."],
               "text-emb": ["hello world", _prompts()["p20"]]}
    rt = _load(tiny_dirs[family], backend="torch", device="cuda", dtype="float32")
    for r in (ref, rt):
        for name, src in sources.items():
            r.add_prompt(name, src)
    names = ["kv", "kv-text", "text-emb", "p20", None]
    reqs = [{"prompt": names[i % 5], "context": rng.integers(4, 96, 2 + (i * 5) % 40).tolist()}
            for i in range(20)]
    _assert_close(rt.score(reqs), _alone(ref, reqs), "float32")
    ctx = [r["context"][:6] for r in reqs[:10]]
    prompts = [r["prompt"] for r in reqs[:10]]
    got = rt.generate(prompts, ctx, max_new_tokens=5, stop_at_eos=False)
    for p, c, g in zip(prompts, ctx, got):
        assert g.token_ids == ref.generate(p, [c], max_new_tokens=5, stop_at_eos=False)[0].token_ids
    rt.close()
