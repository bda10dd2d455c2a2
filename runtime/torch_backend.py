"""The torch backend: the transformers model itself, with the prompt prefix read from the cache.

Per request only the request's own L tokens go through the model. Attention is
``softprompt_attention``, registered in transformers' attention registry as ``ATTN_NAME``
(``register_attention``): when a forward carries a ``softprompt_batch`` it attends each row's
queries over its prompt's cached prefix ``[N_prompts, Hkv, P_max, D]`` (shared, indexed by
``prompt_idx``; the Triton kernels never copy it per row) and then causally over the row's own
keys, through the Triton kernels on CUDA and PyTorch on CPU (below), as planned once per forward
by ``plan_forward`` (``kernels.plan_attention``: checks and the kernel choice; each layer then
only runs ``kernels.run_attention``, or ``SdpaPlan.attend`` on CPU). Without a
``softprompt_batch`` it is plain SDPA, so the same model also computes the prefixes themselves.
The vocabulary projection runs only where a score or the next token needs it.

On CPU (the PyTorch path, ``triton=False``) each layer attends in one
``scaled_dot_product_attention`` call over ``[prompt prefix ; own keys]`` with a mask made once
per forward from the reference's checked plan (``SdpaPlan``) instead of the reference's ~35 small
ops per layer (decode steps that would re-read a long prefix per row keep the reference). And
idle OpenMP teams are handed back (``release_openmp_threads``): the loading thread's at load, a
caller's as it hands the engine work, the engine's when it runs out of work (the engine's hooks
``on_caller_thread`` / ``on_engine_idle``), so the engine thread's team is the only one while it
computes: GNU OpenMP throttles every team's spin-wait once a process holds more OpenMP threads
than cores.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cache import PrefixCache, PrefixEntry
from .graphs import CudaGraphs, bucket
from .reference import TorchModelMixin
from .backend import StepperBackend
from .plan import BatchPlan, prompt_slots
from .prompts import KV
from .sampling import pick_torch
from .stats import BackendStats

if TYPE_CHECKING:
    from softprompt.kernels import AttentionPlan

ATTN_NAME = "softprompt_prefix"  # transformers' attention-registry name of softprompt_attention below
_registered = False


@dataclass
class PrefixBatch:
    """What ``softprompt_attention`` reads during one forward of B rows.

    prefix_k / prefix_v: per layer ``[Np, Hkv, P_max, D]``, the batch's distinct prompts.
    prefix_lens: ``[Np]`` int32; prompt_idx: ``[B]`` int32 (row -> prompt).
    kv_lens: ``[B]`` own keys valid per row; q_lens: ``[B]`` new queries per row.
    own_k / own_v: per layer ``[B, Hkv, cap, D]`` per-row K/V kept during generation, or None.
    decoding: True when each row brings one new token whose K/V are written at kv_lens - 1.
    triton: attend through the Triton kernels instead of their PyTorch references.
    plan: this forward's ``kernels.AttentionPlan`` (``plan_forward``), made once before the model
        runs and read by every layer; None on batches that only carry inputs between steps.
    sdpa: without Triton, this forward's ``SdpaPlan`` (made from ``plan`` by ``plan_batch``).
    """

    prefix_k: list
    prefix_v: list
    prefix_lens: torch.Tensor
    prompt_idx: torch.Tensor
    kv_lens: torch.Tensor
    q_lens: torch.Tensor
    own_k: list | None = None
    own_v: list | None = None
    decoding: bool = False
    triton: bool = False  # Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or references
    plan: AttentionPlan | None = None
    sdpa: SdpaPlan | None = None  # the PyTorch path's per-forward masks (``plan_batch``)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_forward(b: PrefixBatch, num_heads: int, q_len: int) -> AttentionPlan:
    """The attention plan of one forward over ``b`` with ``q_len`` new tokens per row, made
    before the model runs (under CUDA graphs: inside the captured forward, from its static
    inputs): every layer's shapes and the index tensors are checked once and the kernel is picked
    once (Triton fused or cascade by ``kernels.use_cascade``, or the PyTorch reference)."""
    from softprompt import kernels

    pk = b.prefix_k[0]  # [Np, Hkv, P_max, D], the same in every layer
    B, Hkv, D = b.prompt_idx.shape[0], pk.shape[1], pk.shape[3]
    k_len = b.own_k[0].shape[2] if b.decoding else q_len  # decode attends over the row's buffer
    return kernels.plan_attention((B, num_heads, q_len, D), (B, Hkv, k_len, D), tuple(pk.shape),
                                  b.prefix_lens, b.prompt_idx, b.kv_lens, b.q_lens, dtype=pk.dtype,
                                  kernel="auto" if b.triton else "reference")


@dataclass
class SdpaPlan:
    """One forward's attention on the PyTorch path (``triton=False``: the CPU default), made once
    from its checked ``AttentionPlan`` (``plan.ref``: the reference's masks, lengths read on the
    host once) and read by every layer: each row's queries attend over ``[its prompt's prefix ;
    its own keys]`` in one ``scaled_dot_product_attention`` call per layer (``attend``), the
    prefix gathered per row (a few rows x P x Hkv x D per layer), with the same masks and float32
    softmax as ``kernels.attend_reference``, which runs ~35 small ops per layer.

    rows: ``[B]`` int64 prompt of each row, or None when the stack holds one prompt (expanded).
    P: prefix columns (the stack's P_max); K: own keys any row sees (the longest kv_len).
    mask: ``[B, 1, Lq, P + K]`` bool, key visible to query; pad: ``[B, 1, Lq, 1]`` bool, queries
        past q_lens (their output is 0), or None when every query is real.
    write: decoding, where each row's new K/V go in its buffer, as ``kernels.write_kv_ref``
        (rows at a position in [0, cap); idle slots write nowhere): ``[B, Hkv, 1, D]`` positions
        for ``scatter_`` when every row writes, else (rows ``[n]``, positions ``[n]``).
    """

    rows: torch.Tensor | None
    P: int
    K: int
    mask: torch.Tensor
    pad: torch.Tensor | None
    write: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    keys: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, Hkv, P + K, D] K and V, every layer's

    @classmethod
    def make(cls, b: PrefixBatch) -> SdpaPlan:
        plan = b.plan
        assert plan is not None and plan.ref is not None, "plan_forward(kernel='reference') first"
        ref, (B, _, Lq, D, Hkv, _, N, P) = plan.ref, plan.dims
        idx = plan.prompt_idx.long()
        seen = torch.arange(P, device=idx.device) < plan.prefix_lens.long()[idx][:, None]  # [B, P]
        mask = torch.cat([seen[:, None].expand(B, Lq, P), ref.own_ok], -1)[:, None]
        pad = None if bool(ref.q_ok.all()) else ~ref.q_ok[:, None, :, None]
        out = cls(None if N == 1 else idx, P, ref.K, mask, pad)
        if b.decoding and b.own_k is not None:
            pos = b.kv_lens.long() - 1
            ok = (pos >= 0) & (pos < b.own_k[0].shape[2])
            if bool(ok.all()):
                out.write = pos.view(B, 1, 1, 1).expand(B, Hkv, 1, D)
            else:
                rows = torch.nonzero(ok).squeeze(1)
                out.write = rows, pos[rows]
        return out

    def write_kv(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """``cache[b, :, pos[b]] = new[b, :, 0]`` for the planned rows (``kernels.write_kv_ref``)."""
        if isinstance(self.write, torch.Tensor):
            cache.scatter_(2, self.write, new)
        elif self.write is not None:
            rows, pos = self.write
            cache[rows, :, pos] = new[rows, :, 0]

    def attend(self, q, k, v, prefix_k, prefix_v, scale) -> torch.Tensor:
        """One layer: q ``[B, H, Lq, D]``, own k/v ``[B, Hkv, Lk, D]``, prefix ``[N, Hkv, P, D]``;
        returns ``[B, H, Lq, D]`` in q.dtype."""
        import torch.nn.functional as F

        B, H = q.shape[:2]
        if self.rows is None:
            pk, pv = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
        else:
            pk, pv = prefix_k.index_select(0, self.rows), prefix_v.index_select(0, self.rows)
        if self.keys is None:  # one buffer per forward, refilled by each layer: fresh large
            shape = (B, k.shape[1], self.P + self.K, k.shape[3])  # tensors per layer page-fault
            self.keys = torch.empty(shape, dtype=k.dtype, device=k.device), \
                torch.empty(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys
        torch.cat([pk, k[:, :, : self.K]], 2, out=keys)  # [B, Hkv, P + K, D]
        torch.cat([pv, v[:, :, : self.K]], 2, out=values)
        dtype = q.dtype
        if dtype != torch.float32:  # float32 softmax and sums, as the reference
            q, keys, values = q.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale,
                                             enable_gqa=H != keys.shape[1])
        if self.pad is not None:  # padding queries (a row that sees no key: NaN) give 0
            out = out.masked_fill(self.pad, 0.0)
        return out if out.dtype == dtype else out.to(dtype)


# A decode step re-reads the prefix of each row beyond its prompt's first: SdpaPlan copies it
# per row and layer, the reference reads each prompt's once (its queries stacked into one product).
# Past this many re-read prefix tokens ((B - N) x P) the reference's decode step is the faster
# (measured on 2 cores: B=8 rows of one prompt, P=512 -> SDPA 0.8-0.94x the reference's time,
# P=2048 -> 2.8-2.9x; prefills and scores take SDPA at every size measured, up to B=32, P=2048).
SDPA_DECODE_MAX_REREAD = 4096


def plan_batch(b: PrefixBatch, num_heads: int, q_len: int) -> None:
    """Plan one forward over ``b`` before the model runs: ``b.plan`` (``plan_forward``) and, on
    the PyTorch path, ``b.sdpa`` (``SdpaPlan``; None leaves it to ``kernels.run_attention``'s
    reference: decode steps that would re-read a long prefix per row)."""
    b.plan = plan_forward(b, num_heads, q_len)
    dims = b.plan.dims
    reread = (dims.B - dims.N) * dims.Pmax if b.decoding else 0
    b.sdpa = None if b.triton or reread > SDPA_DECODE_MAX_REREAD else SdpaPlan.make(b)


def softprompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         softprompt_batch: PrefixBatch | None = None, **kwargs):
    """Every layer's attention (registered as ``ATTN_NAME``). query: [B, H, L, D]; key/value:
    [B, Hkv, L, D] (RoPE applied). Returns ([B, L, H, D], None).

    With ``softprompt_batch`` (passed to the model by ``TorchBackend._run``):
    ``kernels.run_attention`` with the batch's plan (Triton), or the batch's ``SdpaPlan`` (the
    PyTorch path), made once for this forward by ``plan_batch``; this layer only checks its own
    tensors against the plan. Without: plain SDPA."""
    if softprompt_batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    from softprompt import kernels

    b, i, sdpa = softprompt_batch, module.layer_idx, softprompt_batch.sdpa
    if b.own_k is not None:
        if b.decoding:  # append this step's K/V to each row's buffer, attend over the buffer
            if sdpa is not None:
                sdpa.write_kv(b.own_k[i], key)
                sdpa.write_kv(b.own_v[i], value)
            else:
                write_kv = kernels.write_kv if b.triton else kernels.write_kv_ref
                write_kv(b.own_k[i], b.own_v[i], key, value, b.kv_lens - 1)
            key, value = b.own_k[i], b.own_v[i]
        else:  # prefill: keep the request's K/V for the decode steps that follow
            b.own_k[i][:, :, : key.shape[2]] = key
            b.own_v[i][:, :, : value.shape[2]] = value
    if sdpa is None:
        out = kernels.run_attention(b.plan, query, key, value, b.prefix_k[i], b.prefix_v[i],
                                    scale=scaling)
    else:
        # the module (the package's prefix_attention is its function of that name)
        pa = sys.modules["softprompt.kernels.prefix_attention"]  # imported with kernels
        pa._check_layer(b.plan, query, key, value, b.prefix_k[i], b.prefix_v[i])
        out = sdpa.attend(query, key, value, b.prefix_k[i], b.prefix_v[i], scaling)
    return out.transpose(1, 2), None


def register_attention() -> None:
    """Register ``softprompt_attention`` as ``ATTN_NAME`` in transformers' attention registry once.

    No mask builder is registered for it, on purpose: transformers then skips mask creation
    (``attention_mask`` stays None). The prefix attention needs no mask (lengths say it all) and
    the plain-SDPA path, which computes prefixes one prompt at a time, is causal without one.
    Skipping it also skips transformers' packed-sequence check, a host sync that CUDA graph
    capture would refuse."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, softprompt_attention)
    _registered = True


_gomp: list | None = None  # the GNU OpenMP runtimes torch runs on, found once


def release_openmp_threads() -> bool:
    """Hand back the calling thread's GNU OpenMP thread team (``omp_pause_resource_all``); the
    thread's next parallel op starts a new one. Returns False where torch does not run on GNU
    OpenMP (nothing to do).

    GNU OpenMP keeps one team per thread that ran a parallel region, for the thread's life, and
    once the process holds more OpenMP threads than cores it cuts every team's spin-wait between
    parallel regions (``GOMP_SPINCOUNT``'s throttled count), so each of the thousands of small
    parallel ops of a forward waits for its workers to wake up. The torch backend runs on its
    engine thread while the model was loaded on the caller's thread, whose team would otherwise
    stay: on 2 cores that made the engine thread 1.1-1.5x slower than the same call made alone
    (B=1 generation to B=8 generation). Any thread that ran torch work beside a runtime may call
    this when done with it."""
    global _gomp
    if _gomp is None:
        found = []  # assigned once complete: a concurrent first caller never sees half a list
        if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
            try:
                with open("/proc/self/maps") as f:  # the libgomp torch loaded, by its path
                    paths = sorted({line.split(maxsplit=5)[-1].strip() for line in f
                                    if os.path.basename(line.rstrip()).startswith("libgomp")})
            except OSError:
                paths = []
            for path in paths:
                try:
                    lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
                    pause = lib.omp_pause_resource_all  # OpenMP 5.0 (GCC 9+)
                except (OSError, AttributeError):
                    continue
                pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
                found.append(pause)
        _gomp = found
    return bool(_gomp) and all(pause(1) == 0 for pause in _gomp)  # 1: omp_pause_soft


@dataclass
class _GenState:
    """The decode state: per-row own K/V in a pool of slots, rows joining and leaving.

    own_k / own_v: per layer ``[Bp, Hkv, cap, D]`` (under CUDA graphs: persistent buffers that
    the captured decode steps write in place). slots: the pool slot of each generating row, in
    the engine's order; other slots are idle (zero lengths). prompts: ``[Bp]`` each slot's
    SoftPrompt (or None). kv_lens / next_pos / active: ``[Bp]`` own keys, next position, 1 for a
    generating slot. batch: the PrefixBatch the decode steps read, rebuilt on join/select.
    """

    own_k: list
    own_v: list
    slots: list
    prompts: list
    kv_lens: torch.Tensor
    next_pos: torch.Tensor
    active: torch.Tensor
    batch: PrefixBatch | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.own_k, *self.own_v))


class TorchBackend(TorchModelMixin, StepperBackend):
    name = "torch"

    def __init__(self, lm, prefix_cache_bytes: int = 1 << 30, triton: bool | None = None,
                 cuda_graphs: bool | None = None, buckets: bool | None = None,
                 decode_buffer_bytes: int = 4 << 30):
        """
        triton: attend through the Triton kernels (default: on CUDA), else their PyTorch references.
        cuda_graphs: replay forwards and decode steps as CUDA graphs, one per padded shape
            (runtime/graphs.py; default: on CUDA with Triton). Needs CUDA and the Triton
            kernels; implies buckets.
        buckets: pad rows, tokens, prompts and prefix length of every forward to
            ``graphs.bucket`` sizes (default: with CUDA graphs). Padding rows and tokens are
            idle (zero lengths) and never change a real row's result.
        decode_buffer_bytes: under CUDA graphs, per-row decode K/V buffers are kept per
            (rows, capacity) bucket for reuse by later generations, least recently used first
            out beyond this many bytes (a generation's own buffers are always kept). With
            graphs a backend runs one generation at a time: starting one closes the previous.
        """
        self._init_model(lm)
        on_cuda = self.device.type == "cuda"
        self.triton = on_cuda if triton is None else triton
        if cuda_graphs is None:
            cuda_graphs = on_cuda and self.triton
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, got {self.device}")
        if cuda_graphs and not self.triton:
            raise ValueError("cuda_graphs=True needs triton=True: the PyTorch reference attention "
                             "reads lengths on the host, which graph capture forbids")
        self.graphs = CudaGraphs() if cuda_graphs else None
        self.buckets = bool(cuda_graphs) if buckets is None else buckets
        if self.graphs is not None and not self.buckets:
            raise ValueError("cuda_graphs=True needs buckets=True (a graph is captured per padded shape)")
        register_attention()
        self.model.set_attn_implementation(ATTN_NAME)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name, geometry=dict(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab_size))
        self._stacks: OrderedDict[tuple, tuple] = OrderedDict()  # planned prefix stacks, reused
        self.decode_buffer_bytes = decode_buffer_bytes
        self.tokens_computed = 0
        self.batches = 0
        if self.device.type == "cpu":  # the engine thread will run every forward: its OpenMP
            release_openmp_threads()  # team must be the only one (see release_openmp_threads)

    def _pad(self, n: int) -> int:
        return bucket(n) if self.buckets else n

    # ------------------------------------------------------------------- engine thread hooks
    def on_caller_thread(self) -> None:
        """Run by the engine on each thread that hands it work (``engine.Engine``): on CPU that
        thread's OpenMP team goes (``release_openmp_threads``), e.g. one left by torch work it
        did before, so the engine thread's team is the only one while it computes."""
        if self.device.type == "cpu":
            release_openmp_threads()

    def on_engine_idle(self) -> None:
        """Run by the engine on its thread whenever it runs out of work: on CPU the engine's
        OpenMP team goes until the next forward, so torch work on another thread meanwhile
        (PEFT beside the runtime, say) runs unthrottled too, and idle workers stop spinning."""
        if self.device.type == "cpu":
            release_openmp_threads()

    # ----------------------------------------------------------------------------- prefix
    @torch.inference_mode()
    def _compute_prefix(self, prompt) -> PrefixEntry:
        """The prompt's segments in order, once: per-layer K/V ``[Hkv, P, D]`` and the first-token
        log-probs (None when the prompt ends in K/V). K/V segments are inserted as they are;
        embeddings and text run through the model after everything before them, read as a
        cached prefix by the same attention as requests."""
        shape = (self.num_kv_heads, 0, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)] * self.num_layers
        values = list(keys)
        last = None
        for seg in prompt.segments():
            if isinstance(seg, KV):
                new_k, new_v, last = [self._tensor(k) for k in seg.keys], \
                    [self._tensor(v) for v in seg.values], None
            else:
                new_k, new_v, last = self._extend(keys, values, self._segment_embeds(seg))
            keys = [torch.cat([a, b], 1) for a, b in zip(keys, new_k)]
            values = [torch.cat([a, b], 1) for a, b in zip(values, new_v)]
        first = None if last is None else self.lm_head(last).float().log_softmax(-1)  # [V]
        return PrefixEntry(keys, values, first)

    def _extend(self, keys: list, values: list, emb: torch.Tensor):
        """Run ``emb [n, E]`` at positions P.. over the prefix ``keys``/``values`` (per layer
        ``[Hkv, P, D]``): its own per-layer K/V ``[Hkv, n, D]`` and its last hidden state ``[E]``."""
        P, n = keys[0].shape[1], emb.shape[0]
        stack = [(k if P else torch.zeros(self.num_kv_heads, 1, self.head_dim, dtype=self.dtype,
                                          device=self.device))[None] for k in keys]
        vstack = [(v if P else s[0])[None] for v, s in zip(values, stack)]
        i32 = dict(dtype=torch.int32, device=self.device)
        own_k, own_v = (
            [torch.zeros(1, self.num_kv_heads, n, self.head_dim, dtype=self.dtype, device=self.device)
             for _ in range(self.num_layers)] for _ in range(2))
        batch = PrefixBatch(stack, vstack, torch.tensor([P], **i32), torch.zeros(1, **i32),
                            torch.tensor([n], **i32), torch.tensor([n], **i32), own_k, own_v,
                            triton=self.triton)
        plan_batch(batch, self.num_heads, q_len=n)
        pos = torch.arange(P, P + n, device=self.device)[None]
        out = self.model.base_model(inputs_embeds=emb[None], position_ids=pos, use_cache=False,
                                    softprompt_batch=batch)
        self.tokens_computed += n
        return [k[0] for k in own_k], [v[0] for v in own_v], out.last_hidden_state[0, -1]

    def entry(self, prompt) -> PrefixEntry:
        return self.cache.get_or_compute(prompt.digest, lambda: self._compute_prefix(prompt))

    def prepare(self, prompt) -> None:
        self.entry(prompt)
        self._trim_stacks()  # the kept stacks must still fit beside the grown cache

    def forget(self, prompt) -> None:
        self.cache.invalidate(prompt.digest)
        self._stacks.clear()

    def stats(self) -> BackendStats:
        stacks = [t for ks, vs, _, _ in self._stacks.values() for t in (*ks, *vs)]
        state = self._state
        decode = []
        if state is not None:  # its own K/V, and its prefix stack when no longer kept above
            decode = [*state.own_k, *state.own_v]
            if state.batch is not None and all(t is not state.batch.prefix_k[0] for t in stacks):
                decode += [*state.batch.prefix_k, *state.batch.prefix_v]
        seen = {id(t) for t in (*stacks, *decode)}
        graph_bufs = 0
        if self.graphs is not None:  # static and persistent buffers not counted above
            graph_bufs = _nbytes(t for t in self.graphs.buffers.values() if id(t) not in seen)
        stacks, decode = _nbytes(stacks), _nbytes(decode)
        return BackendStats(self.cache.stats(), stack_bytes=stacks, decode_bytes=decode,
                            graph_buffer_bytes=graph_bufs, tokens_computed=self.tokens_computed,
                            batches=self.batches,
                            graphs=self.graphs.stats() if self.graphs is not None else None)

    def save_cache(self, path) -> int:
        return self.cache.save(path, to_numpy=lambda t: t.float().cpu().numpy())

    def load_cache(self, path) -> int:
        self._stacks.clear()
        return self.cache.load(path, from_numpy=lambda a: torch.from_numpy(a).to(
            self.device, self.dtype if a.ndim == 3 else torch.float32))

    def _stack(self, prompts: list, empty_slot: bool) -> tuple[list, list, torch.Tensor, list]:
        """Per layer ``[Np, Hkv, P_max, D]`` for the batch's distinct prompts, plus one empty slot
        (length 0) for rows without a prompt when ``empty_slot``; Np and P_max padded to buckets
        when ``self.buckets``. Planned once per set of prompts and reused while their cache
        entries live. Kept stacks count against the prefix-cache budget (``_trim_stacks``) and
        hold their entries only weakly, so an evicted prefix is really freed.
        Returns (keys, values, lengths ``[Np]`` int32, entries)."""
        key = (tuple(p.digest for p in prompts), empty_slot)
        entries = [self.entry(p) for p in prompts]  # counts hits, recomputes evicted prefixes
        hit = self._stacks.get(key)
        if hit is not None and all(e is h() for e, h in zip(entries, hit[3])):
            self._stacks.move_to_end(key)
            return (*hit[:3], entries)
        n = self._pad(len(entries) + empty_slot)
        p_max = self._pad(max([1] + [e.num_tokens for e in entries]))
        lens = torch.zeros(n, dtype=torch.int32)
        lens[: len(entries)] = torch.tensor([e.num_tokens for e in entries], dtype=torch.int32)
        ks, vs = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(n, self.num_kv_heads, p_max, self.head_dim,
                            dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            for i, e in enumerate(entries):
                k[i, :, : e.num_tokens] = e.keys[layer]
                v[i, :, : e.num_tokens] = e.values[layer]
            ks.append(k)
            vs.append(v)
        lens = lens.to(self.device)
        self._stacks[key] = (ks, vs, lens, [weakref.ref(e) for e in entries])
        self._trim_stacks()
        return ks, vs, lens, entries

    def _stack_bytes(self) -> int:
        return sum(_nbytes(ks) + _nbytes(vs) for ks, vs, _, _ in self._stacks.values())

    def _trim_stacks(self) -> None:
        """Keep at most 4 planned stacks, and only while cache + stacks fit the cache budget
        (the newest goes too when it does not fit: it then serves its own batch only)."""
        while self._stacks and (len(self._stacks) > 4 or
                                self.cache.bytes + self._stack_bytes() > self.cache.max_bytes):
            self._stacks.popitem(last=False)

    def _own_buffers(self, rows: int, capacity: int, name: str = "own") -> tuple[list, list]:
        """Per layer ``[rows, Hkv, capacity, D]`` K/V buffers. Under graphs they are persistent
        buffers of that shape (``name``: "own" for the decode pool, "new" for a prefill), which
        captured forwards write in place."""
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        if self.graphs is None:
            return tuple([torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)] for _ in range(2))
        return tuple([self.graphs.persistent((f"{name}_{kv}", i), shape, self.dtype, self.device)
                      for i in range(self.num_layers)] for kv in ("k", "v"))

    def _batch(self, plan: BatchPlan, capacity: int = 0):
        """A PrefixBatch for the plan's rows, their embeddings ``[B, L_max, E]`` and positions
        ``[B, L_max]``, and the PrefixEntry of each of ``plan.prompts``. With buckets, B and L_max are padded (rows
        past plan.B are idle: zero lengths, prompt slot 0). ``capacity``: give each row an own
        K/V buffer of that many tokens (a prefill), written by the forward."""
        ks, vs, lens, entries = self._stack(plan.prompts, plan.empty_slot)
        B, L = plan.B, plan.L_max
        Bp, Lp = self._pad(B), self._pad(L)
        ids = torch.zeros(Bp, Lp, dtype=torch.long)
        ids[:B, :L] = torch.from_numpy(plan.ids)
        pos = torch.zeros(Bp, Lp, dtype=torch.long)
        pos[:B, :L] = torch.from_numpy(plan.positions)
        pos[:B, L:] = pos[:B, L - 1: L]  # padding columns repeat the last real position
        meta = torch.zeros(2, Bp, dtype=torch.int32)  # [q_lens; prompt_idx], padding rows 0
        meta[0, :B] = torch.from_numpy(plan.q_lens)
        meta[1, :B] = torch.from_numpy(plan.prompt_idx)
        meta, emb_ids, pos = (t.to(self.device) for t in (meta, ids, pos))  # one copy each
        emb = self.embed(emb_ids)  # [Bp, Lp, E]; padding embeds token 0, never read
        seq_lens, prompt_idx = meta[0], meta[1]
        own_k, own_v = self._own_buffers(Bp, self._pad(capacity), "new") if capacity else (None, None)
        batch = PrefixBatch(ks, vs, lens, prompt_idx, seq_lens, seq_lens.clone(), own_k, own_v,
                            triton=self.triton)
        self.tokens_computed += plan.tokens
        self.batches += 1
        return batch, emb, pos, entries

    def _run(self, b: PrefixBatch, emb: torch.Tensor, pos: torch.Tensor, project: bool = False):
        """The model over ``emb [B, L, E]`` at ``pos [B, L]`` with batch ``b``: the last hidden
        states ``[B, L, E]``, or with ``project`` the logits of position 0, ``[B, V]`` (decode).
        Through a CUDA graph when enabled: then the result is the graph's static output, valid
        until the next call."""
        decoding, triton = b.decoding, b.triton
        # own K/V buffers go in under the names they were made with (persistent buffers are
        # keyed by name): "own" for the decode pool, "new" for a prefill's rows
        own = ("own_k", "own_v") if decoding else ("new_k", "new_v")

        def forward(emb, pos, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, **kv):
            batch = PrefixBatch(prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens,
                                kv.get(own[0]), kv.get(own[1]), decoding, triton)
            plan_batch(batch, self.num_heads, q_len=emb.shape[1])  # once, not per layer
            # Each layer's attention is softprompt_attention (registered as ATTN_NAME by
            # register_attention): transformers hands it `softprompt_batch`, and it runs
            # kernels.run_attention(batch.plan, <that layer's q, k, v, prefix K/V>).
            out = self.model.base_model(inputs_embeds=emb, position_ids=pos, use_cache=False,
                                        softprompt_batch=batch)
            hidden = out.last_hidden_state
            return self.lm_head(hidden[:, 0]) if project else hidden

        inputs = {"emb": emb, "pos": pos, "prefix_k": b.prefix_k, "prefix_v": b.prefix_v,
                  "prefix_lens": b.prefix_lens, "prompt_idx": b.prompt_idx, "kv_lens": b.kv_lens,
                  "q_lens": b.q_lens, own[0]: b.own_k, own[1]: b.own_v}
        if self.graphs is None:
            return forward(**inputs)
        return self.graphs.run(forward, inputs, reuse=("prefix_k", "prefix_v"),
                               tag=(decoding, project))

    # ------------------------------------------------------------------------------ score
    @torch.inference_mode()
    def score(self, plan: BatchPlan) -> list:
        batch, emb, pos, entries = self._batch(plan)
        hidden = self._run(batch, emb, pos)  # [B, L_max, E]
        # Only the positions that predict a target go through the vocabulary projection.
        sel = torch.from_numpy(np.stack([plan.target_rows, plan.target_cols, plan.target_ids]))
        sel = sel.to(self.device)  # [3, T], one copy
        logits = self.lm_head(hidden[sel[0], sel[1]]).float()  # [T, V]
        all_lp = logits.log_softmax(-1)  # [T, V]
        lp = all_lp.gather(-1, sel[2][:, None])[:, 0]  # [T]
        top = logits.argmax(-1) == sel[2]
        # A row scored from its first token takes it from its prompt's cached first-token
        # log-probs (predicted by the last virtual token): gathered for all such rows at once.
        if len(plan.first_rows):
            table = torch.stack([e.first_logprobs if e.first_logprobs is not None else  # [Np, V]
                                 torch.full((self.vocab_size,), float("nan"), device=self.device)
                                 for e in entries])  # NaN: a K/V-ended prompt has no first token
            at = torch.from_numpy(np.stack([plan.prompt_idx[plan.first_rows].astype(np.int64),
                                            plan.first_ids])).to(self.device)
            first = table[at[0]].float()  # [F, V]
            lp = torch.cat([lp, first.gather(-1, at[1][:, None])[:, 0]])
            top = torch.cat([top, first.argmax(-1) == at[1]])
            all_lp = torch.cat([all_lp, first]) if plan.max_top_n else all_lp
        out = torch.stack([lp.double(), top.double()]).cpu().numpy()  # the one device-to-host copy
        T = len(plan.target_rows)
        lp, top = out[0], out[1].astype(bool)
        own_alt = first_alt = None
        if plan.max_top_n:  # asked for: the same log-probs' most likely ids, as pick_torch
            val, idx = torch.topk(all_lp, min(plan.max_top_n, all_lp.shape[-1]), dim=-1)
            val, idx = val.double().cpu().numpy(), idx.cpu().numpy().astype(np.int64)
            own_alt, first_alt = (idx[:T], val[:T]), (idx[T:], val[T:])
        return plan.assemble(lp[:T], top[:T], lp[T:], top[T:], own_alt, first_alt)

    # ------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def prefill(self, plan: BatchPlan, capacity):
        batch, emb, pos, _ = self._batch(plan, capacity=max(max(capacity), plan.L_max))
        hidden = self._run(batch, emb, pos)
        B = plan.B
        last = torch.from_numpy(np.stack([np.arange(B), plan.last_cols])).to(self.device)
        logits = self.lm_head(hidden[last[0], last[1]])  # [B, V]
        nxt = torch.from_numpy(plan.prefix_lens + plan.past_lens + plan.q_lens).to(self.device)
        new = _GenState(batch.own_k, batch.own_v, list(range(B)), [r.prompt for r in plan.rows],
                        batch.kv_lens[:B].clone(), nxt, torch.ones(B, dtype=torch.int32, device=self.device))
        return new, logits

    def _slot_batch(self, state: _GenState) -> None:
        """Rebuild the decode PrefixBatch after rows joined or left: the prefix stack of the
        generating rows' prompts and each slot's index into it (idle slots: 0)."""
        distinct, live_idx, no_prompt = prompt_slots([state.prompts[s] for s in state.slots])
        ks, vs, lens, _ = self._stack(distinct, no_prompt)
        idx = torch.zeros(len(state.prompts), dtype=torch.int32)
        idx[state.slots] = torch.from_numpy(live_idx)
        prompt_idx = idx.to(self.device)
        state.kv_lens = state.kv_lens * state.active
        state.batch = PrefixBatch(ks, vs, lens, prompt_idx, state.kv_lens, state.active,
                                  state.own_k, state.own_v, decoding=True, triton=self.triton)

    @torch.inference_mode()
    def decode(self, state: _GenState, next_ids: np.ndarray):
        """One token for each generating row (``next_ids`` in the engine's order): ``[n, V]``."""
        b = state.batch
        state.kv_lens = b.kv_lens = b.kv_lens + state.active  # idle slots stay at 0 (write nowhere)
        b.q_lens = state.active
        ids = torch.zeros(len(state.active), dtype=torch.long)
        ids[state.slots] = torch.as_tensor(next_ids, dtype=torch.long)
        emb = self._embed_ids(ids)[:, None]  # [Bp, 1, E]
        logits = self._run(b, emb, state.next_pos[:, None], project=True)  # [Bp, V]
        state.next_pos = state.next_pos + state.active
        self.tokens_computed += len(next_ids)
        return logits[torch.tensor(state.slots, device=self.device)]

    @torch.inference_mode()
    def select(self, state: _GenState, keep: list[int]) -> _GenState:
        """Keep the rows at positions ``keep`` of the engine's order: the others' slots go idle
        in place (nothing is copied) and later rows join into them. When the rows left fit a
        smaller bucket the pool is compacted into it; without buckets (the CPU default) that is
        every time a row leaves, since an idle slot would cost a whole row of compute."""
        slots = [state.slots[k] for k in keep]
        Bp = len(state.active)
        active = torch.zeros(Bp, dtype=torch.int32)
        active[slots] = 1
        state.active, state.slots = active.to(self.device), slots
        if self._pad(len(slots)) < Bp:
            return self._repool(state, None, self._pad(len(slots)), state.own_k[0].shape[2])
        self._slot_batch(state)
        return state

    @torch.inference_mode()
    def join(self, state: _GenState | None, new: _GenState) -> _GenState:
        """Move the new rows' K/V into free slots of the pool (copying only them); a pool with
        too few slots or too little capacity is reallocated one bucket larger."""
        cap_new = new.own_k[0].shape[2]
        if state is None:
            return self._repool(None, new, self._pad(len(new.slots)), cap_new)
        cap = state.own_k[0].shape[2]
        free = [s for s in range(len(state.active)) if s not in set(state.slots)]
        if len(free) < len(new.slots) or cap < cap_new:
            return self._repool(state, new, self._pad(len(state.slots) + len(new.slots)),
                                max(cap, cap_new))
        dst = torch.tensor(free[: len(new.slots)], device=self.device)
        src = torch.tensor(new.slots, device=self.device)
        for pool, rows in ((state.own_k, new.own_k), (state.own_v, new.own_v)):
            for layer in range(self.num_layers):
                pool[layer][dst, :, :cap_new] = rows[layer][src]  # cap_new <= cap here
        for d, sl in zip(dst.tolist(), new.slots):
            state.prompts[d] = new.prompts[sl]
        state.kv_lens = state.kv_lens.index_copy(0, dst, new.kv_lens[src].to(state.kv_lens.dtype))
        state.next_pos = state.next_pos.index_copy(0, dst, new.next_pos[src].to(state.next_pos.dtype))
        state.active = state.active.index_fill(0, dst, 1)
        state.slots = state.slots + dst.tolist()
        self._slot_batch(state)
        return state

    def _repool(self, state: _GenState | None, new: _GenState | None, rows: int, cap: int) -> _GenState:
        """A pool of ``rows`` slots x ``cap`` tokens holding the generating rows of ``state``
        then those of ``new``, in order (slots 0..n-1)."""
        parts = [(st, st.slots) for st in (state, new) if st is not None]
        own_k, own_v = self._own_buffers(rows, cap, "own")
        n, kv, nxt, prompts = 0, [], [], []
        for st, sl in parts:
            src = torch.tensor(sl, device=self.device)
            width = min(cap, st.own_k[0].shape[2])
            for pool, old in ((own_k, st.own_k), (own_v, st.own_v)):
                for layer in range(self.num_layers):
                    pool[layer][n: n + len(sl)].zero_()
                    pool[layer][n: n + len(sl), :, :width] = old[layer][src, :, :width]
            kv.append(st.kv_lens[src])
            nxt.append(st.next_pos[src])
            prompts += [st.prompts[s] for s in sl]
            n += len(sl)
        pad = rows - n
        dev = self.device
        kv_lens = torch.cat(kv + [torch.zeros(pad, dtype=torch.int32, device=dev)]).to(torch.int32)
        next_pos = torch.cat(nxt + [torch.zeros(pad, dtype=torch.long, device=dev)]).long()
        active = (torch.arange(rows, device=dev) < n).to(torch.int32)
        out = _GenState(own_k, own_v, list(range(n)), prompts + [None] * pad, kv_lens, next_pos, active)
        self._slot_batch(out)
        if self.graphs is not None:  # the pool was touched last: trimming always keeps it
            self.graphs.trim_persistent(self.decode_buffer_bytes)
        return out

    def pick(self, logits, samplers):
        return pick_torch(logits, samplers)
