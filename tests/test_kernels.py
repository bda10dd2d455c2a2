"""Prefix-attention kernels against their PyTorch reference, and the reference against a naive
per-row attention over an expanded copy of the prefix.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors here, on every machine (float32
and float16 only: the interpreter computes bfloat16 wrong). Their compiled CUDA variants, bfloat16
included, are in tests/test_cuda.py (marked ``cuda``); bench/gpu_kernels.py repeats these checks on
a GPU at real sizes.
"""

import importlib
import math
import os
import sys

import pytest
import torch

from tolerances import KERNEL

_BODIES = "softprompt.kernels._triton"  # the @triton.jit definitions; launchers look them up there
# must be set before the @triton.jit definitions run (conftest.py sets it); reload if something
# imported them earlier without it
_imported_before = _BODIES in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
if _imported_before:
    importlib.reload(sys.modules[_BODIES])

import softprompt.kernels as pa  # noqa: E402  (after TRITON_INTERPRET is set)

# the module, not the package's function of the same name: where plan_attention looks up its helpers
pa_mod = importlib.import_module("softprompt.kernels.prefix_attention")

DEVICE = "cpu"  # the CUDA variants: tests/test_cuda.py


def naive_attention(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens=None, q_lens=None,
                    scale=None):
    """Row by row, head by head, in float64: copy the row's prefix, concatenate its own keys, mask,
    softmax."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    kv_lens = [Lk] * B if kv_lens is None else kv_lens.tolist()
    q_lens = [Lq] * B if q_lens is None else q_lens.tolist()
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    lse = torch.full((B, H, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        n, P, kl, ql = int(prompt_idx[b]), int(prefix_lens[int(prompt_idx[b])]), kv_lens[b], q_lens[b]
        for h in range(H):
            keys = torch.cat([prefix_k[n, h // G, :P], k[b, h // G, :kl]]).double()  # [P + kl, D]
            vals = torch.cat([prefix_v[n, h // G, :P], v[b, h // G, :kl]]).double()
            for i in range(ql):
                pos = kl - ql + i
                visible = torch.tensor([True] * P + [j <= pos for j in range(kl)], dtype=torch.bool)
                if not visible.any():
                    continue
                s = (keys[visible] @ q[b, h, i].double()) * scale
                out[b, h, i] = torch.softmax(s, 0) @ vals[visible]
                lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


def make_inputs(case, dtype, device=DEVICE, seed=0):
    """Random inputs for a case dict; noncontig=True builds q/k/v/prefix as transposed views."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D, Lq, Lk = case["B"], case["H"], case["Hkv"], case["D"], case["Lq"], case["Lk"]
    plens = case["prefix_lens"]
    N, Pmax = len(plens), case["Pmax"]

    def rand(*shape):  # shape given in the memory order; returned permuted to the logical order
        t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return t.transpose(1, 2) if case.get("noncontig") else t

    if case.get("noncontig"):  # [B, Lq, H, D] projections viewed as [B, H, Lq, D], as in a model
        q, k, v = rand(B, Lq, H, D), rand(B, Lk, Hkv, D), rand(B, Lk, Hkv, D)
        pk, pv = rand(N, Pmax, Hkv, D), rand(N, Pmax, Hkv, D)
    else:
        q, k, v = rand(B, H, Lq, D), rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D)
        pk, pv = rand(N, Hkv, Pmax, D), rand(N, Hkv, Pmax, D)

    def ints(x):
        return None if x is None else torch.tensor(x, dtype=torch.int32, device=device)

    return (q, k, v, pk, pv, ints(plens), ints(case["prompt_idx"]), ints(case.get("kv_lens")),
            ints(case.get("q_lens")))


# Hand-picked shapes: odd prefix/request lengths, every GQA ratio, ragged rows, mixed prompts.
CASES = {
    "prefill-g1-d16-mixed-prompts": dict(
        B=3, H=2, Hkv=2, D=16, Pmax=17, prefix_lens=[17, 1, 9], prompt_idx=[2, 0, 2],
        Lq=7, Lk=7, q_lens=[7, 3, 5], kv_lens=[7, 3, 5], dtype=torch.float32),
    "prefill-g4-d32-p100-l37": dict(
        B=2, H=4, Hkv=1, D=32, Pmax=100, prefix_lens=[100, 0, 57], prompt_idx=[0, 2],
        Lq=37, Lk=37, q_lens=[37, 20], kv_lens=[37, 20], dtype=torch.float16),
    "prefill-g3-d64-noncontig-lse": dict(
        B=3, H=6, Hkv=2, D=64, Pmax=17, prefix_lens=[17, 5, 0], prompt_idx=[1, 2, 0],
        Lq=37, Lk=37, q_lens=[37, 1, 30], kv_lens=[37, 1, 30], noncontig=True, lse=True,
        dtype=torch.float32),
    "prefill-g8-d16-chunked-after-cache": dict(  # kv_lens > q_lens with Lq > 1
        B=2, H=8, Hkv=1, D=16, Pmax=100, prefix_lens=[100], prompt_idx=[0, 0],
        Lq=7, Lk=37, q_lens=[7, 4], kv_lens=[37, 10], lse=True, dtype=torch.float16),
    "prefill-g1-no-prefix-padded-row": dict(  # prefix_lens 0 everywhere, one row with no query
        B=3, H=4, Hkv=4, D=32, Pmax=17, prefix_lens=[0, 0], prompt_idx=[0, 1, 1],
        Lq=7, Lk=7, q_lens=[0, 7, 1], kv_lens=[0, 7, 1], lse=True, dtype=torch.float32),
    "decode-g8-d64-p100": dict(
        B=4, H=8, Hkv=1, D=64, Pmax=100, prefix_lens=[100, 17, 1], prompt_idx=[0, 1, 2, 0],
        Lq=1, Lk=40, kv_lens=[40, 1, 23, 37], lse=True, dtype=torch.float16),
    "decode-g3-d16-idle-rows-noncontig": dict(
        B=3, H=3, Hkv=1, D=16, Pmax=17, prefix_lens=[0, 17], prompt_idx=[0, 1, 1],
        Lq=1, Lk=16, q_lens=[1, 1, 0], kv_lens=[5, 9, 0], noncontig=True, lse=True,
        dtype=torch.float32),
    "decode-g4-d24-padded-head-dim": dict(
        B=2, H=8, Hkv=2, D=24, Pmax=1, prefix_lens=[1], prompt_idx=[0, 0],
        Lq=1, Lk=7, kv_lens=[7, 2], dtype=torch.float32),
}


def _call(fn, case, inputs):
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = inputs
    return fn(q, k, v, pk, pv, plens, idx, kv_lens=kv_lens, q_lens=q_lens, return_lse=case.get("lse", False))


def _assert_matches(got, want, case, dtype):
    if case.get("lse"):
        (got, got_lse), (want, want_lse) = got, want
        torch.testing.assert_close(got_lse, want_lse, **KERNEL[torch.float32])
    torch.testing.assert_close(got, want, **KERNEL[dtype])


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive_per_row_attention(name):
    case = CASES[name]
    inputs = make_inputs(case, torch.float32, device="cpu")
    got = _call(pa.prefix_attention_ref, case, inputs)
    want, want_lse = naive_attention(*inputs)
    if case.get("lse"):
        got, got_lse = got
        torch.testing.assert_close(got_lse, want_lse.float(), **KERNEL[torch.float32])
    torch.testing.assert_close(got, want.float(), **KERNEL[torch.float32])


def test_reference_plan_is_made_once_per_forward_and_never_reused_across_forwards():
    """With the caller's Plans the reference plans masks and row groups once for the N layers of
    a forward; a new forward (new Plans) plans anew, and other lengths never reuse a plan."""
    case = CASES["prefill-g1-d16-mixed-prompts"]
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = make_inputs(case, torch.float32, device="cpu")
    plans = pa.Plans()
    pa.prefix_attention_ref(q, k, v, pk, pv, plens, idx, kv_lens, q_lens, plans=plans)
    plan = plans.ref
    pa.prefix_attention_ref(q * 2, k, v, pk, pv, plans=plans, prefix_lens=plens, prompt_idx=idx,
                            kv_lens=kv_lens, q_lens=q_lens)  # the next layer
    assert plans.ref is plan
    kv_lens[1] -= 1
    q_lens[1] -= 1
    fresh = pa.Plans()  # the next forward
    got = pa.prefix_attention_ref(q, k, v, pk, pv, plens, idx, kv_lens, q_lens, plans=fresh)
    assert fresh.ref is not plan
    want, _ = naive_attention(q, k, v, pk, pv, plens, idx, kv_lens, q_lens)
    torch.testing.assert_close(got, want.float(), **KERNEL[torch.float32])
    for mod in (pa, pa_mod, sys.modules["softprompt.kernels.reference"],
                sys.modules["softprompt.kernels.cascade"]):
        assert not hasattr(mod, "_last_ref_plan") and not hasattr(mod, "_last_plan")  # no module state


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kernel", ["prefix_attention", "prefix_attention_cascade"])
def test_kernel_matches_reference(kernel, name):
    case = CASES[name]
    dtype = case["dtype"]
    inputs = make_inputs(case, dtype)
    got = _call(getattr(pa, kernel), case, inputs)
    want = _call(pa.prefix_attention_ref, case, inputs)
    _assert_matches(got, want, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16])  # bfloat16: tests/test_cuda.py
def test_kernels_in_half_precision_match_reference(dtype):
    case = CASES["prefill-g3-d64-noncontig-lse"]
    inputs = make_inputs(case, dtype, seed=1)
    want = _call(pa.prefix_attention_ref, case, inputs)
    for fn in (pa.prefix_attention, pa.prefix_attention_cascade):
        _assert_matches(_call(fn, case, inputs), want, case, dtype)


def test_auto_dispatch_rule_and_result():
    many_rows = dict(B=16, H=2, Hkv=1, D=16, Pmax=256, prefix_lens=[256, 100], prompt_idx=[0] * 12 + [1] * 4,
                     Lq=1, Lk=5, kv_lens=[5, 4, 3, 2] * 4, dtype=torch.float32)
    # no rule measured yet (bench/gpu_kernels.py): the default path never picks the cascade
    assert not pa.use_cascade(B=16, N=2, Pmax=256, Lq=1)
    rule = importlib.import_module("softprompt.kernels.cascade").CANDIDATE_RULE
    assert pa.use_cascade(B=16, N=2, Pmax=256, Lq=1, rule=rule)
    assert not pa.use_cascade(B=4, N=2, Pmax=256, Lq=1, rule=rule)
    assert not pa.use_cascade(B=64, N=1, Pmax=20, Lq=1, rule=rule)
    inputs = make_inputs(many_rows, torch.float32)
    got = _call(pa.prefix_attention_auto, many_rows, inputs)
    want = _call(pa.prefix_attention_ref, many_rows, inputs)
    torch.testing.assert_close(got, want, **KERNEL[torch.float32])


def test_cascade_plan_is_reusable_across_layers():
    case = CASES["decode-g8-d64-p100"]
    inputs = make_inputs(case, torch.float32)
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = inputs
    plan = pa.plan_cascade(idx, pk.shape[0], q.shape[2], q.shape[1] // k.shape[1])
    want = pa.prefix_attention_ref(*inputs)
    for layer in range(2):
        got = pa.prefix_attention_cascade(q * (layer + 1), k, v, pk, pv, plens, idx, kv_lens, q_lens,
                                          plan=plan)
        want = pa.prefix_attention_ref(q * (layer + 1), k, v, pk, pv, plens, idx, kv_lens, q_lens)
        torch.testing.assert_close(got, want, **KERNEL[torch.float32])
    with pytest.raises(ValueError, match="plan was made for"):
        pa.prefix_attention_cascade(q[:2], k[:2], v[:2], pk, pv, plens, idx[:2], kv_lens[:2], plan=plan)
    # without a plan the last one is reused for the same prompt_idx tensor, never after it changed
    for new_idx in ([0, 1, 2, 0], [2, 2, 0, 1]):
        idx.copy_(torch.tensor(new_idx))
        for _ in range(2):
            got = pa.prefix_attention_cascade(q, k, v, pk, pv, plens, idx, kv_lens, q_lens)
            want = pa.prefix_attention_ref(q, k, v, pk, pv, plens, idx, kv_lens, q_lens)
            torch.testing.assert_close(got, want, **KERNEL[torch.float32])
    # under inference_mode (as the torch backend runs) tensors keep no version counter
    with torch.inference_mode():
        x = [t.clone() if t is not None else None for t in inputs]
        got = pa.prefix_attention_cascade(*x)
        torch.testing.assert_close(got, pa.prefix_attention_ref(*x), **KERNEL[torch.float32])


# --------------------------------------------------------------------------------------------
# The per-forward plan: plan_attention once, run_attention per layer
# --------------------------------------------------------------------------------------------


def _plan_for(inputs, kernel):
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = inputs
    return pa.plan_attention(q.shape, k.shape, pk.shape, plens, idx, kv_lens, q_lens, dtype=q.dtype,
                             kernel=kernel)


@pytest.mark.parametrize("name", ["prefill-g3-d64-noncontig-lse", "decode-g3-d16-idle-rows-noncontig"])
@pytest.mark.parametrize("kernel", ["reference", "fused", "cascade", "auto"])
def test_one_plan_serves_every_layer(kernel, name):
    """One plan, two layers (new q/k/v/prefix values, the same shapes and lengths): each layer's
    run_attention equals the per-call reference on that layer's tensors."""
    case = dict(CASES[name], lse=True)
    dtype = case["dtype"]
    plan = _plan_for(make_inputs(case, dtype), kernel)
    assert plan.kernel == ("fused" if kernel == "auto" else kernel)  # few rows: use_cascade says no
    for layer in (1, 2):
        inputs = make_inputs(case, dtype, seed=layer)
        got = pa.run_attention(plan, *inputs[:5], return_lse=True)
        _assert_matches(got, _call(pa.prefix_attention_ref, case, inputs), case, dtype)


def test_auto_plan_picks_the_cascade_once(monkeypatch):
    """No measured rule: auto runs the fused kernel; with one (here the candidate) that holds
    for these shapes, the plan picks the cascade and makes its row grouping once."""
    case = dict(B=16, H=2, Hkv=1, D=16, Pmax=256, prefix_lens=[256, 100], prompt_idx=[0] * 12 + [1] * 4,
                Lq=1, Lk=5, kv_lens=[5, 4, 3, 2] * 4)
    inputs = make_inputs(case, torch.float32)
    assert _plan_for(inputs, "auto").kernel == "fused"
    cascade_mod = importlib.import_module("softprompt.kernels.cascade")
    monkeypatch.setattr(cascade_mod, "MEASURED_RULE", cascade_mod.CANDIDATE_RULE)
    plan = _plan_for(inputs, "auto")
    assert plan.kernel == "cascade" and plan.cascade.key[:4] == (16, 2, 1, 2)
    torch.testing.assert_close(pa.run_attention(plan, *inputs[:5]), pa.prefix_attention_ref(*inputs),
                               **KERNEL[torch.float32])


def test_plan_checks_once_and_refuses_layer_tensors_it_was_not_made_for():
    case = CASES["prefill-g1-d16-mixed-prompts"]
    inputs = make_inputs(case, torch.float32)
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = inputs
    for kernel in ("reference", "fused", "cascade"):
        plan = _plan_for(inputs, kernel)
        wrong = {"q": (q[:, :, :5], k, v, pk, pv),  # another query length
                 "k": (q, k[..., :8], v, pk, pv),  # another head dim
                 "v": (q, k, v[:2], pk, pv),  # another batch
                 "prefix_k": (q, k, v, pk[:2], pv),  # another prompt count
                 "prefix_v": (q, k, v, pk, pv.half())}  # another dtype
        for name, args in wrong.items():
            planned = rf"^{name} must be \[3, .*\] torch.float32 on .* as planned, got"
            with pytest.raises(ValueError, match=planned):
                pa.run_attention(plan, *args)
    # what the plan checks, it checks from shapes alone, once
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        pa.plan_attention((3, 3, 7, 16), k.shape, pk.shape, plens, idx, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"prefix_k must be \[N, Hkv=2, Pmax, D=16\]"):
        pa.plan_attention(q.shape, k.shape, (3, 1, 17, 16), plens, idx, dtype=torch.float32)
    with pytest.raises(ValueError, match="prompt_idx must be a 1-D tensor of length 3"):
        pa.plan_attention(q.shape, k.shape, pk.shape, plens, idx[:2], dtype=torch.float32)
    with pytest.raises(ValueError, match="q.dtype must be one of"):
        pa.plan_attention(q.shape, k.shape, pk.shape, plens, idx, dtype=torch.int8)
    with pytest.raises(ValueError, match="kernel must be one of"):
        _plan_for(inputs, "flash")
    with pytest.raises(ValueError, match=r"prompt_idx values must lie in \[0, N=3\)"):  # the reference's plan
        _plan_for((q, k, v, pk, pv, plens, idx + 1, kv_lens, q_lens), "reference")


@pytest.mark.parametrize("triton", [False, True])
def test_torch_backend_plans_once_per_forward_not_per_layer(tiny_dirs, monkeypatch, triton):
    """The torch backend's forwards (a scoring batch, a generation's prefill and decode steps)
    check shapes and pick the kernel once per forward (plan_attention), and the reference's
    length check (a host sync) runs once per forward too; each layer only checks its own
    tensors against the plan."""
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.prompts import SoftPrompt

    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    be = rt.backend
    be.triton = triton
    rt.add_prompt("p5", SoftPrompt.random(5, be.hidden_size, seed=0))
    calls = dict.fromkeys(["forwards", "plans", "decisions", "lengths", "layers"], 0)

    def count(key, obj, attr):
        fn = getattr(obj, attr)

        def counted(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(obj, attr, counted)

    count("forwards", be, "_run")
    count("plans", pa_mod, "check_shapes")
    count("decisions", pa_mod, "use_cascade")
    count("lengths", sys.modules["softprompt.kernels.reference"], "check_lengths")
    count("layers", pa_mod, "_check_layer")
    rt.score([{"prompt": "p5", "context": [5, 6, 7], "continuation": [8]},
              {"prompt": None, "context": [9, 10]}])
    rt.generate("p5", [[5, 6, 7]], max_new_tokens=3, stop_at_eos=False)
    n = calls["forwards"]
    assert n >= 4 and be.num_layers > 1  # the score, the prefill, two decode steps at least
    assert calls["plans"] == n and calls["layers"] == n * be.num_layers
    assert (calls["decisions"], calls["lengths"]) == ((n, 0) if triton else (0, n))


def test_output_layout_makes_head_merge_free():
    case = CASES["prefill-g1-d16-mixed-prompts"]
    out = _call(pa.prefix_attention, case, make_inputs(case, torch.float32))
    assert out.shape == (3, 2, 7, 16) and out.transpose(1, 2).is_contiguous()


def test_offsets_past_int32_use_64_bit_arithmetic():
    """A prefix cache and a per-row buffer whose element offsets pass 2**31. The big tensors are
    allocated but never touched except the few slots used, so the OS backs only those pages."""
    dtype, D, Hkv, H, Pmax = torch.float16, 16, 1, 2, 256
    N = 2**31 // (Hkv * Pmax * D) + 2  # the last prompt starts past element 2**31
    pk = torch.empty(N, Hkv, Pmax, D, dtype=dtype, device=DEVICE)
    pv = torch.empty(N, Hkv, Pmax, D, dtype=dtype, device=DEVICE)
    for n in (0, N - 1):
        pk[n].normal_()
        pv[n].normal_()
    prefix_lens = torch.zeros(N, dtype=torch.int32, device=DEVICE)
    prefix_lens[0], prefix_lens[N - 1] = 17, 100
    prompt_idx = torch.tensor([N - 1, 0], dtype=torch.int32, device=DEVICE)  # int32 on purpose

    # decode buffers: row 1 starts past element 2**31 of one allocation
    cap, row_stride = 40, 2**31 + 1024
    storage = torch.empty(row_stride + Hkv * cap * D, dtype=dtype, device=DEVICE)
    kc = storage.as_strided((2, Hkv, cap, D), (row_stride, cap * D, D, 1))
    vc = torch.empty_like(storage).as_strided((2, Hkv, cap, D), (row_stride, cap * D, D, 1))
    kc.zero_()
    vc.zero_()
    g = torch.Generator().manual_seed(3)
    k_new = torch.randn(2, Hkv, 1, D, generator=g).to(DEVICE, dtype)
    v_new = torch.randn(2, Hkv, 1, D, generator=g).to(DEVICE, dtype)
    positions = torch.tensor([3, 37], dtype=torch.int32, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    pa.write_kv(kc, vc, k_new, v_new, positions)
    pa.write_kv_ref(kc_ref, vc_ref, k_new, v_new, positions)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)

    q = torch.randn(2, H, 1, D, generator=g).to(DEVICE, dtype)
    kv_lens = torch.tensor([4, 38], dtype=torch.int32, device=DEVICE)
    want = pa.prefix_attention_ref(q, kc, vc, pk, pv, prefix_lens, prompt_idx, kv_lens)
    for fn in (pa.prefix_attention, pa.prefix_attention_cascade):
        got = fn(q, kc, vc, pk, pv, prefix_lens, prompt_idx, kv_lens)
        torch.testing.assert_close(got, want, **KERNEL[dtype])


def test_write_kv_matches_reference_and_skips_idle_rows():
    g = torch.Generator().manual_seed(4)
    B, Hkv, cap, D = 3, 2, 9, 16
    cache = torch.randn(2, B, Hkv, cap, D, generator=g).to(DEVICE, torch.float16)
    new = torch.randn(2, B, 1, Hkv, 2 * D, generator=g).to(DEVICE, torch.float16)[..., :D].transpose(2, 3)
    positions = torch.tensor([4, -1, 8], device=DEVICE)
    got, want = cache.clone(), cache.clone()
    pa.write_kv(got[0], got[1], new[0], new[1], positions)
    pa.write_kv_ref(want[0], want[1], new[0], new[1], positions)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1], cache[:, 1], rtol=0, atol=0)  # idle row untouched
    torch.testing.assert_close(got[0, 0, :, 4], new[0, 0, :, 0], rtol=0, atol=0)


def test_bad_inputs_raise_one_line_errors():
    case = CASES["prefill-g1-d16-mixed-prompts"]
    q, k, v, pk, pv, plens, idx, kv_lens, q_lens = make_inputs(case, torch.float32)
    for fn in (pa.prefix_attention, pa.prefix_attention_cascade, pa.prefix_attention_auto,
               pa.prefix_attention_ref):
        with pytest.raises(ValueError, match=r"k must be \[B=3, Hkv, Lk, D=16\]"):
            fn(q, k[:, :, :, :8], v, pk, pv, plens, idx)
        with pytest.raises(ValueError, match="multiple of key/value heads"):
            fn(q[:, :1], k, v, pk, pv, plens, idx)
        with pytest.raises(ValueError, match="prefix_v.dtype must equal q.dtype"):
            fn(q, k, v, pk, pv.half(), plens, idx)
        with pytest.raises(ValueError, match="prompt_idx must be an integer tensor"):
            fn(q, k, v, pk, pv, plens, idx.float())
        with pytest.raises(ValueError, match="kv_lens must be a 1-D tensor of length 3"):
            fn(q, k, v, pk, pv, plens, idx, kv_lens=kv_lens[:2])
    with pytest.raises(ValueError, match=r"prompt_idx values must lie in \[0, N=3\)"):
        pa.prefix_attention_ref(q, k, v, pk, pv, plens, idx + 1)
    with pytest.raises(ValueError, match="q_lens <= kv_lens"):
        pa.prefix_attention_ref(q, k, v, pk, pv, plens, idx, kv_lens=kv_lens - 1, q_lens=q_lens)


def test_module_imports_and_reference_runs_without_triton():
    """A CPU-only install has no Triton: the module must import, the reference must work, and the
    kernels must say what to use instead."""
    import subprocess

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import importlib, torch\n"
        "pa = importlib.import_module('softprompt.kernels')\n"
        "q = torch.randn(1, 2, 3, 16); k = torch.randn(1, 1, 3, 16); pk = torch.randn(1, 1, 4, 16)\n"
        "args = (q, k, k, pk, pk, torch.tensor([4]), torch.tensor([0]))\n"
        "assert pa.prefix_attention_ref(*args).shape == (1, 2, 3, 16)\n"
        "try:\n"
        "    pa.prefix_attention(*args)\n"
        "except RuntimeError as e:\n"
        "    assert 'use prefix_attention_ref' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
