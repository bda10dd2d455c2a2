"""The torch backend on CPU: the threads its forwards run on (the engine thread's torch thread
count, the loading thread's OpenMP team handed back) and the attention its forwards take there
(``SdpaPlan``), checked against the kernels' PyTorch reference."""

import threading
import time

import pytest
import torch

from softprompt import kernels
from softprompt.runtime import torch_backend as tb
from softprompt.runtime.api import Runtime
from tolerances import KERNEL


@pytest.mark.parametrize("threads", [1, None])
def test_the_engine_thread_runs_with_the_configured_torch_threads(tiny_dirs, threads):
    """The engine thread, which runs every forward, uses the torch thread count set where the
    runtime was loaded (torch.set_num_threads before Runtime.load, or torch's default)."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        want = torch.get_num_threads()
        rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch", device="cpu")
        try:
            rt.score([{"prompt": None, "context": [5, 6, 7]}])  # a forward on the engine thread
            assert rt.engine.call(torch.get_num_threads) == want
        finally:
            rt.close()
    finally:
        torch.set_num_threads(before)


def test_the_torch_backend_on_cpu_hands_back_idle_openmp_teams(tiny_dirs, monkeypatch):
    """GNU OpenMP keeps a team per thread that ran a parallel op and throttles every team once
    the process holds more OpenMP threads than cores. So on CPU the loading thread hands its team
    back at load, each thread that hands the engine work hands back its own as it does, and the
    engine thread hands back its own when it runs out of work."""
    calls = []
    release = tb.release_openmp_threads

    def spy():
        calls.append((threading.current_thread(), release()))
        return calls[-1][1]

    monkeypatch.setattr(tb, "release_openmp_threads", spy)
    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch", device="cpu")
    try:
        assert calls[0][0] is threading.current_thread()  # at load, before the engine starts
        worker = threading.Thread(target=lambda: rt.score([{"prompt": None, "context": [5, 6, 7]}]))
        worker.start()
        worker.join()
        deadline = time.monotonic() + 60  # the engine's idle hook runs just after the step

        def engine_after_worker():
            threads = [t for t, _ in calls]
            return worker in threads and any(t.name == "softprompt-engine"
                                             for t in threads[threads.index(worker):])

        while not engine_after_worker() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine_after_worker()
    finally:
        rt.close()
    try:
        with open("/proc/self/maps") as f:
            gomp = any("/libgomp" in line for line in f)
    except OSError:
        gomp = False
    if gomp:  # torch runs on GNU OpenMP here: the runtime was found and every release worked
        assert all(ok is True for _, ok in calls)


def _batch(dtype, prompts, decoding, idle, gen):
    """A PrefixBatch of 5 rows (GQA 4/2 heads, D=16) over ``prompts`` prefixes of up to 9
    tokens (one of them empty when there are several), its queries and own K/V."""
    B, H, Hkv, D, P, cap = 5, 4, 2, 16, 9, 12

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    i32 = dict(dtype=torch.int32)
    prefix_k, prefix_v = randn(prompts, Hkv, P, D), randn(prompts, Hkv, P, D)
    prefix_lens = torch.tensor([9, 0, 4][:prompts], **i32)
    prompt_idx = torch.tensor([0, 2, 1, 0, 2] if prompts == 3 else [0] * B, **i32)
    if decoding:  # row 3's buffer fills up; an idle row (no key, no query) writes nowhere
        Lq, kv = 1, [5, 1, 0 if idle else 2, 12, 7]
        q_lens = torch.tensor([0 if n == 0 else 1 for n in kv], **i32)
        own_k, own_v = randn(B, Hkv, cap, D), randn(B, Hkv, cap, D)
        k, v = randn(B, Hkv, 1, D), randn(B, Hkv, 1, D)
    else:  # a prefill with padded queries
        Lq, kv = 6, [6, 3, 1, 6, 2]
        q_lens = torch.tensor(kv, **i32)
        own_k = own_v = None
        k, v = randn(B, Hkv, Lq, D), randn(B, Hkv, Lq, D)
    b = tb.PrefixBatch([prefix_k], [prefix_v], prefix_lens, prompt_idx, torch.tensor(kv, **i32),
                       q_lens, None if own_k is None else [own_k], None if own_v is None else [own_v],
                       decoding=decoding)
    return b, randn(B, H, Lq, D), k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompts", [1, 3])
@pytest.mark.parametrize("decoding,idle", [(False, False), (True, False), (True, True)])
def test_sdpa_plan_equals_the_reference_attention(dtype, prompts, decoding, idle):
    """The CPU path's attention (one SDPA call per layer over [prefix ; own keys]) equals
    kernels.run_attention's reference, padded queries and a row that sees no key included, and
    its decode write equals kernels.write_kv_ref."""
    b, q, k, v = _batch(dtype, prompts, decoding, idle, torch.Generator().manual_seed(prompts))
    tb.plan_batch(b, q.shape[1], q.shape[2])
    assert b.sdpa is not None and b.plan is not None and b.plan.kernel == "reference"
    if decoding:
        want_k, want_v = b.own_k[0].clone(), b.own_v[0].clone()
        kernels.write_kv_ref(want_k, want_v, k, v, b.kv_lens - 1)
        b.sdpa.write_kv(b.own_k[0], k)
        b.sdpa.write_kv(b.own_v[0], v)
        assert torch.equal(b.own_k[0], want_k) and torch.equal(b.own_v[0], want_v)
        k, v = b.own_k[0], b.own_v[0]
    for scale in (None, 0.3):
        want = kernels.run_attention(b.plan, q, k, v, b.prefix_k[0], b.prefix_v[0], scale=scale)
        got = b.sdpa.attend(q, k, v, b.prefix_k[0], b.prefix_v[0], scale)
        assert got.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got, want, **KERNEL[dtype])
