"""runtime/graphs.py pieces that run without a GPU: the bucket sizes every padded forward uses,
and how CudaGraphs fills the static buffers a captured graph reads (capture and replay
themselves need CUDA: bench/gpu_check.sh runs them against the eager forward)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softprompt.runtime.graphs import CudaGraphs, bucket


def test_bucket_sizes():
    got = [bucket(n) for n in (0, 1, 2, 3, 5, 17, 40, 64, 65, 130, 1000)]
    assert got == [1, 1, 2, 4, 8, 32, 64, 64, 128, 192, 1024]
    for n in range(1, 600):
        b = bucket(n)
        assert n <= b and bucket(b) == b  # covers n, and a bucket is its own bucket
        assert b < 2 * n or n <= 1 or (n > 64 and b - n < 64)


def test_static_buffers_copy_reuse_and_persist():
    g = CudaGraphs()
    a = torch.arange(6.0).reshape(2, 3)
    buf = g._static(("x", None), a, reuse=False)
    assert buf is not a and torch.equal(buf, a)
    a2 = a + 1
    assert g._static(("x", None), a2, reuse=False) is buf and torch.equal(buf, a2)

    # reuse: copied when a different tensor arrives, skipped for the same one
    s1, s2 = torch.ones(4), torch.full((4,), 2.0)
    sbuf = g._static(("stack", 0), s1, reuse=True)
    s1.fill_(5.0)  # same object: not copied again (stacks are never changed in place)
    assert g._static(("stack", 0), s1, reuse=True) is sbuf and torch.equal(sbuf, torch.ones(4))
    g._static(("stack", 0), s2, reuse=True)
    assert torch.equal(sbuf, s2)

    # a persistent buffer passed back as the input is used as it is, never copied over
    own = g.persistent(("own_k", 0), (2, 5), torch.float32, "cpu")
    assert torch.equal(own, torch.zeros(2, 5))
    own[0, 0] = 7.0
    assert g._static(("own_k", 0), own, reuse=False) is own and own[0, 0] == 7.0
    assert g.persistent(("own_k", 0), (2, 5), torch.float32, "cpu") is own


def test_decode_buffers_are_kept_per_bucket_and_trimmed(tiny_dirs):
    """Under graphs the decode pool's K/V buffers persist per (rows, capacity) bucket for reuse;
    beyond decode_buffer_bytes the least recently used sets go (with their graphs), never the
    live pool's; rows joining a full pool move it to a larger bucket."""
    import numpy as np

    from softprompt.runtime.api import Runtime
    from softprompt.runtime.plan import BatchPlan
    from softprompt.runtime.prompts import SoftPrompt
    from softprompt.runtime.requests import ScoreRequest

    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    be = rt.backend
    be.graphs, be.buckets = CudaGraphs(), True
    be.graphs.disabled = "CPU test: eager forwards over the persistent buffers"
    rt.add_prompt("p", SoftPrompt.random(5, be.hidden_size, seed=0))
    rows = [rt.check(ScoreRequest("p", [5, 6, 7]))] * 3  # 3 rows -> bucket 4

    def own_shapes():
        return {k[1] for k in be.graphs.buffers if k[0][0] == "own_k"}

    new, _ = be.prefill(BatchPlan.build(rows, score=False), [13] * 3)  # capacity 13 -> 16
    state = be.join(None, new)
    assert own_shapes() == {(4, be.num_kv_heads, 16, be.head_dim)}
    be.decode(state, np.array([1, 2, 3]))
    state = be.select(state, [0])  # 1 row: compacted into a 1-row set; the 4-row set is kept
    assert len(own_shapes()) == 2

    be.decode_buffer_bytes = 0  # over budget: the next pool keeps only its own set
    new, _ = be.prefill(BatchPlan.build(rows[:2], score=False), [103] * 2)  # capacity -> 128
    state = be.join(state, new)  # 1 + 2 rows in a 1-row pool: a 4 x 128 pool
    assert own_shapes() == {(4, be.num_kv_heads, 128, be.head_dim)}
    assert be.decode(state, np.array([4, 5, 6])).shape == (3, be.vocab_size)


def test_drop_persistent_frees_buffers_and_their_graphs():
    g = CudaGraphs()
    a = g.persistent(("own_k", 0), (2, 3), torch.float32, "cpu")
    g.persistent(("own_v", 0), (2, 3), torch.float32, "cpu")
    g.persistent(("own_k", 0), (4, 3), torch.float32, "cpu")
    g._static(("emb", None), torch.ones(2, 3), reuse=False)
    uses = ((), (("own_k", 0), (2, 3), torch.float32), (("emb", None), (2, 3), torch.float32))
    other = ((), (("own_k", 0), (4, 3), torch.float32))
    g.graphs[uses], g.graphs[other] = ("graph", None), ("graph", None)
    assert g.drop_persistent((2, 3)) == 2 * a.nbytes
    assert list(g.graphs) == [other]
    assert sorted(k[0][0] for k in g.buffers) == ["emb", "own_k"]


class _ReplayGraph:
    """Stands in for a captured CUDA graph on CPU: a replay re-runs the captured function on the
    captured (static) inputs and writes into the captured output, which is what a real replay
    does. Index plans are forgotten first because a real replay runs no Python (the plan's
    computation is part of the graph)."""

    def __init__(self, fn, args, out, corrupt=False):
        self.fn, self.args, self.out, self.corrupt = fn, args, out, corrupt

    def replay(self):
        self.out.copy_(self.fn(**self.args))
        if self.corrupt:
            self.out.add_(1.0)


class CpuGraphs(CudaGraphs):
    """CudaGraphs with the three CUDA calls replaced (eager warm-up, _ReplayGraph, no sync), so
    that everything else (buffers, keys, capture checks, fallback, LRU) runs for real on CPU."""

    def __init__(self, fail: str | None = None, corrupt: bool = False, **kw):
        super().__init__(**kw)
        self.fail, self.corrupt = fail, corrupt

    def _warm_up(self, fn, args):
        return fn(**args).clone()

    def _record(self, fn, args):
        if self.fail:
            raise RuntimeError(self.fail)
        out = fn(**args)
        return _ReplayGraph(fn, args, out, self.corrupt), out

    def _synchronize(self):
        pass


def _graphed_runtime(tiny_dirs, graphs):
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.prompts import SoftPrompt

    rt = Runtime.load(str(tiny_dirs["llama"]), backend="torch")
    rt.backend.graphs, rt.backend.buckets, rt.backend.triton = graphs, True, True
    for P in (1, 20, 100):
        rt.add_prompt(f"p{P}", SoftPrompt.random(P, rt.backend.hidden_size, seed=P))
    return rt


def _traffic(rt):
    """Scores of a mixed batch (twice: the second replays) and a greedy generation whose rows
    stop at different steps (prefill, decode steps, idling and compaction)."""
    reqs = [{"prompt": "p20", "context": [5, 6, 7, 8], "continuation": [9]},
            {"prompt": "p100", "context": [9]}, {"prompt": None, "context": [4, 4, 4]},
            {"prompt": "p1", "context": [7] * 9, "continuation": [3, 3]},
            {"prompt": "p20", "context": [3, 3, 3]}]
    scores = [[r.token_logprobs for r in rt.score(reqs)] for _ in range(2)]
    gens = [g.token_ids for g in rt.generate(["p20", "p100", None], [[5, 6], [9], [4, 4]],
                                             max_new_tokens=6, stop_at_eos=False)]
    return scores, gens


@pytest.fixture(scope="module")
def eager_traffic(tiny_dirs):
    """_traffic's results from the plain eager torch backend (PyTorch reference attention,
    unpadded shapes): what every graphed variant must reproduce."""
    rt = _graphed_runtime(tiny_dirs, None)
    rt.backend.triton = False
    return _traffic(rt)


@pytest.mark.parametrize("cascade", [False, True])
def test_graph_runner_replays_and_matches_eager(tiny_dirs, eager_traffic, monkeypatch, cascade):
    """With the device calls stood in for, the CUDA-graph path (static buffers, one graph per
    shape key, replays, decode buffers written in place; Triton kernels, fused or cascade)
    gives the eager path's results, and the second call of each shape replays instead of
    capturing."""
    import importlib

    import numpy as np

    pa = importlib.import_module("softprompt.kernels.prefix_attention")  # the module, not the function
    monkeypatch.setattr(pa, "use_cascade", lambda B, N, Pmax, Lq: cascade)
    want_scores, want_gens = eager_traffic
    rt = _graphed_runtime(tiny_dirs, CpuGraphs())
    scores, gens = _traffic(rt)
    for got, want in zip(scores, want_scores):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert gens == want_gens
    st = rt.stats()
    assert st["graphs_disabled"] is None and st["graph_captures"] >= 3  # score, prefill, decode
    assert st["graph_replays"] >= 1 + 4  # the second score, and the decode steps after the first
    captures = st["graph_captures"]
    _traffic(rt)
    assert rt.stats()["graph_captures"] == captures  # every shape seen before: replays only


@pytest.mark.parametrize("fail, corrupt, reason", [
    ("operation not permitted when stream is capturing", False, "RuntimeError: operation not permitted"),
    (None, True, "the replayed graph differs from the eager forward by"),
])
def test_failed_or_wrong_capture_falls_back_to_eager_once(tiny_dirs, eager_traffic, fail, corrupt,
                                                         reason):
    """A capture that raises, or whose replay disagrees with the eager forward, turns graphs off
    with one warning; the call returns the eager result and later calls run eagerly."""
    import numpy as np

    want_scores, want_gens = eager_traffic
    rt = _graphed_runtime(tiny_dirs, CpuGraphs(fail=fail, corrupt=corrupt))
    with pytest.warns(RuntimeWarning, match="CUDA graphs turned off") as caught:
        scores, gens = _traffic(rt)
    assert len([w for w in caught if "CUDA graphs" in str(w.message)]) == 1
    assert reason in rt.stats()["graphs_disabled"] and rt.stats()["graphs"] == 0
    for got, want in zip(scores, want_scores):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert gens == want_gens


def test_warmup_captures_the_shapes_real_traffic_then_replays(tiny_dirs):
    """Runtime.warmup runs the bucketed shapes once, so real requests of those shapes only
    replay: 3 rows of 5 tokens (buckets 4 x 8, covered by warming 4 x 8), and generations of 3
    rows, 7 context + 3 new tokens (decode capacity 10 -> 16, as warming 8 + 2)."""
    rt = _graphed_runtime(tiny_dirs, CpuGraphs())
    with pytest.raises(ValueError, match="batch_sizes must be a non-empty list of integers >= 1"):
        rt.warmup(batch_sizes=[0])
    assert rt.warmup(batch_sizes=(4,), lengths=(8,), prompts=["p20"], new_tokens=2) > 0
    st = rt.stats()
    assert st["graph_captures"] >= 3 and st["requests_served"] == 0
    rt.score([{"prompt": "p20", "context": [5, 6, 7, 8, 9]}] * 3)
    rt.generate("p20", [[5, 6, 7, 8, 9, 10, 11]] * 3, max_new_tokens=3, stop_at_eos=False)
    assert rt.stats()["graph_captures"] == st["graph_captures"]
    assert rt.stats()["graph_replays"] > st["graph_replays"]


def test_cuda_graphs_need_cuda(tiny_dirs):
    from softprompt.models import load_model
    from softprompt.runtime.torch_backend import TorchBackend

    from softprompt.runtime.api import Runtime

    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        TorchBackend(lm, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs applies to backend='torch' only"):
        Runtime.load(lm, backend="reference", cuda_graphs=False)
    assert TorchBackend(lm).graphs is None  # default on CPU: eager, unpadded


class _HostSyncs(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (on CUDA each is a device sync,
    which CUDA graph capture refuses, and which stalls the eager pipeline too) or make a tensor
    from host data (``torch.tensor(...)``: a host-to-device copy a graph would not repeat)."""

    SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "unique", "_unique2",
             "masked_select", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_graphed_forwards_never_read_device_values(tiny_dirs, family):
    """What a CUDA graph captures (the padded model forward with the Triton kernels: scoring,
    generation prefill, decode steps before and after rows finish) never reads a tensor's value
    on the host, so capture cannot be refused for a sync. The detector itself is checked on
    transformers' packed-sequence test, which does sync and which the backend avoids."""
    import numpy as np

    from softprompt.runtime.api import Runtime
    from softprompt.runtime.plan import BatchPlan
    from softprompt.runtime.prompts import SoftPrompt
    from softprompt.runtime.requests import ScoreRequest

    rt = Runtime.load(str(tiny_dirs[family]), backend="torch")
    be = rt.backend
    be.buckets, be.triton = True, True
    for P in (1, 20, 100):
        rt.add_prompt(f"p{P}", SoftPrompt.random(P, be.hidden_size, seed=P))
    reqs = [ScoreRequest("p20", [5, 6, 7, 8]), ScoreRequest("p100", [9]), ScoreRequest(None, [4, 4]),
            ScoreRequest("p1", [7] * 9), ScoreRequest("p20", [3, 3, 3])]
    rows = [rt.check(r) for r in reqs]
    seen, run = [], be._run

    def checked(*args, **kwargs):
        with _HostSyncs() as mode:
            out = run(*args, **kwargs)
        seen.extend(mode.seen)
        return out

    be._run = checked
    be.score(BatchPlan.build(rows))
    new, _ = be.prefill(BatchPlan.build(rows, score=False), [12] * len(rows))
    state = be.join(None, new)
    be.decode(state, np.full(len(rows), 5))
    state = be.select(state, [0, 2, 3, 4])  # 5 -> 4 rows: compacted into the 4-row bucket
    be.decode(state, np.full(4, 6))
    state = be.select(state, [0, 1, 3])  # 4 -> 3 rows: the dropped row idles in place
    be.decode(state, np.full(3, 7))
    new, _ = be.prefill(BatchPlan.build(rows[:1], score=False), [12])
    state = be.join(state, new)  # a row joins the idle slot
    be.decode(state, np.full(4, 8))
    state = be.select(state, [0, 2])  # 4 -> 2 rows: compacted into the 2-row bucket
    be.decode(state, np.full(2, 9))
    assert seen == []

    from transformers.masking_utils import find_packed_sequence_indices

    with _HostSyncs() as mode:
        find_packed_sequence_indices(torch.arange(6)[None])
    assert mode.seen  # the detector sees a host read where there is one
