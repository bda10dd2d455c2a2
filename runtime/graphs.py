"""CUDA graphs for the torch backend's forwards: one captured graph per padded shape.

Why: transformers' eager forward launches several hundred small kernels per call, and at small
batches on a GPU that launch overhead, not the arithmetic, sets the time. The anchors
(shared/anchors, H200, Llama-1B shape, B=1, P=20, L=32, bf16) measured 13.2 ms for the eager
forward and 2.0 ms for the same forward replayed as a CUDA graph through
``torch.compile(mode="reduce-overhead")``; decode steps (L = 1) are launch-bound at every batch.

How: the torch backend pads every forward to a *bucket* (``bucket``: rows B and tokens L to
powers of two, then multiples of 64; prompts N to a power of two; prefix length P_max and the
per-row decode capacity likewise), so a few shapes cover all traffic. For each distinct set of
input shapes, ``CudaGraphs.run`` warms the forward up eagerly on a side stream (this also
compiles the Triton kernels), captures it once, replays it, and checks the replay against the
eager warm-up output: a capture that fails or disagrees turns graphs off for this backend with
one warning and the eager result is returned, so a graph can never change an answer. Later calls
with the same shapes copy their inputs into the graph's static buffers and replay.

Static buffers are keyed by (name, shape, dtype) and shared by every graph that takes such an
input (graphs replay one at a time and every input is copied in before a replay); the graphs'
intermediates share one memory pool for the same reason (a replay may overwrite the memory
behind an earlier replay's output, never the output of the graph being replayed). Inputs that
are already a registered buffer (``persistent``: the per-row decode K/V buffers, written in
place by the captured ``write_kv``) are used as they are; large inputs marked ``reuse`` (the
stacked prompt prefixes) are copied only when a different tensor arrives. The output of a replay
is the graph's own static tensor: consume it before the next ``run``.

Not thread-safe: the runtime serialises backend calls under its lock.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from .stats import GraphStats


def bucket(n: int, step: int = 64) -> int:
    """Padded size for n: the next power of two up to ``step``, then the next multiple of it.

    1, 2, 3, 5, 40, 64, 65, 130 -> 1, 2, 4, 8, 64, 64, 128, 192 (step 64). Powers of two keep
    small batches to few shapes; multiples of ``step`` cap the padding waste of long ones.
    """
    if n <= 1:
        return 1
    if n <= step:
        return 1 << (n - 1).bit_length()
    return -(-n // step) * step


def _flat(inputs: dict) -> list[tuple[tuple, torch.Tensor]]:
    """[((name, i), tensor)] for a dict of tensors and lists of tensors (i = None for a tensor)."""
    out = []
    for name, val in inputs.items():
        if isinstance(val, (list, tuple)):
            out += [((name, i), t) for i, t in enumerate(val)]
        elif val is not None:
            out.append(((name, None), val))
    return out


def _rebuild(inputs: dict, statics: dict) -> dict:
    return {name: ([statics[(name, i)] for i in range(len(val))] if isinstance(val, (list, tuple))
                   else (None if val is None else statics[(name, None)]))
            for name, val in inputs.items()}


class CudaGraphs:
    """Captured forwards keyed by the shapes of their inputs, replayed with copied-in inputs.

    Args:
        max_graphs: graphs kept (least recently used are dropped, with their memory pools).
        rtol, atol: agreement required between the first replay and the eager warm-up.
    """

    def __init__(self, max_graphs: int = 32, rtol: float = 2e-2, atol: float = 2e-2):
        self.max_graphs = max_graphs
        self.rtol, self.atol = rtol, atol
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._persistent: OrderedDict[tuple, list] = OrderedDict()  # shape -> its buffers' keys, LRU first
        self._src: dict[tuple, weakref.ref] = {}
        self.pool = None  # one memory pool for all graphs: they replay one at a time
        self.captures = 0
        self.replays = 0
        self.disabled: str | None = None  # why graphs were turned off, once they were

    def stats(self) -> GraphStats:
        return GraphStats(len(self.graphs), self.captures, self.replays, self.disabled)

    def persistent(self, name: tuple, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A zeroed buffer that lives as long as this object, e.g. per-row decode K/V written in
        place by a captured forward. Pass it back to ``run`` as input ``name`` = (input, list
        index or None), e.g. ``("own_k", layer)``, and it is used without a copy."""
        shape = tuple(shape)
        key = (name, shape, dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.zeros(shape, dtype=dtype, device=device)
            self._persistent.setdefault(shape, []).append(key)
        self._persistent.move_to_end(shape)
        return buf

    def trim_persistent(self, max_bytes: int) -> None:
        """Drop the least recently used shapes of persistent buffers (and their graphs) while
        they hold more than max_bytes, always keeping the most recently used shape."""
        while len(self._persistent) > 1 and sum(
                self.buffers[k].nbytes for keys in self._persistent.values() for k in keys) > max_bytes:
            self.drop_persistent(next(iter(self._persistent)))

    def drop_persistent(self, shape: tuple) -> int:
        """Free the persistent buffers of this shape and the graphs captured with them.
        Returns the bytes freed."""
        gone = self._persistent.pop(tuple(shape), [])
        freed = sum(self.buffers.pop(k).nbytes for k in gone)
        for key in [k for k in self.graphs if any(part in gone for part in k[1:])]:
            del self.graphs[key]
        return freed

    def _static(self, name: tuple, src: torch.Tensor, reuse: bool) -> torch.Tensor:
        key = (name, tuple(src.shape), src.dtype)
        buf = self.buffers.get(key)
        if buf is src:  # a persistent buffer
            return buf
        if buf is None:
            buf = self.buffers[key] = torch.empty(src.shape, dtype=src.dtype, device=src.device)
        last = self._src.get(key)
        if not (reuse and last is not None and last() is src):
            buf.copy_(src)
            if reuse:
                self._src[key] = weakref.ref(src)
            else:
                self._src.pop(key, None)
        return buf

    def run(self, fn: Callable[..., torch.Tensor], inputs: dict, reuse: tuple = (),
            tag: tuple = ()) -> torch.Tensor:
        """``fn(**inputs)`` through a CUDA graph captured for these input shapes.

        inputs: name -> tensor, list of tensors, or None (non-tensor arguments belong in fn).
        reuse: names of inputs copied in only when a different tensor object arrives.
        tag: what else (besides input shapes) tells graphs apart, e.g. fn's flags.
        Returns fn's output tensor (the graph's static output after a replay).
        """
        if self.disabled:
            return fn(**inputs)
        flat = _flat(inputs)
        key = (tag, *((name, tuple(t.shape), t.dtype) for name, t in flat))
        statics = {name: self._static(name, t, name[0] in reuse) for name, t in flat}
        args = _rebuild(inputs, statics)
        hit = self.graphs.get(key)
        if hit is not None:
            self.graphs.move_to_end(key)
            hit[0].replay()
            self.replays += 1
            return hit[1]
        return self._capture(key, fn, args)

    def _capture(self, key: tuple, fn, args: dict) -> torch.Tensor:
        """Warm up, capture, replay once and check against the eager result; on any failure
        turn graphs off (one warning) and return the eager result."""
        expected = self._warm_up(fn, args)
        try:  # fn makes its index plans per call, so the graph plans from its static inputs
            graph, out = self._record(fn, args)
            graph.replay()
            self._synchronize()
            if not torch.allclose(out.float(), expected.float(), rtol=self.rtol, atol=self.atol):
                err = (out.float() - expected.float()).abs().max().item()
                raise RuntimeError(f"the replayed graph differs from the eager forward by {err:.3g}")
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to eager, once, loudly
            self.disabled = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.graphs.clear()
            warnings.warn(f"CUDA graphs turned off for this backend, running eagerly: {self.disabled}",
                          RuntimeWarning, stacklevel=3)
            return expected
        self.captures += 1
        self.graphs[key] = (graph, out)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return out

    # The three CUDA calls, apart so that tests can stand in for the device ----------------------

    def _warm_up(self, fn, args: dict) -> torch.Tensor:
        """Run fn eagerly twice on a side stream (Triton compiles, cuBLAS picks its kernels, as
        capture requires); returns a copy of the result, the reference for the replay check."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                expected = fn(**args).clone()
        torch.cuda.current_stream().wait_stream(side)
        return expected

    def _record(self, fn, args: dict) -> tuple:
        """Capture fn(**args) into a CUDA graph in the shared pool: (graph, static output)."""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(**args)
        return graph, out

    def _synchronize(self) -> None:
        torch.cuda.current_stream().synchronize()
