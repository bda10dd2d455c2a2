"""The torch backend: the transformers model itself, with the prompt prefix read from the cache.

Per request only the request's own L tokens go through the model. Attention is a function
registered in transformers' attention registry (``softprompt_prefix``): when a forward carries
a ``softprompt_batch`` it attends each row's queries over its prompt's cached prefix
``[N_prompts, Hkv, P_max, D]`` (shared, indexed by ``prompt_idx``, never copied per row) and
then causally over the row's own keys, through the Triton kernel on CUDA and its PyTorch
reference on CPU. Without a ``softprompt_batch`` it is plain SDPA, so the same model also
computes the prefixes themselves. The vocabulary projection runs only where a score or the
next token needs it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .cache import PrefixCache, PrefixEntry
from .graphs import CudaGraphs, bucket
from .models import ModelSpec
from .reference import TorchModelMixin
from .requests import Row

ATTN_NAME = "softprompt_prefix"
_registered = False


@dataclass
class PrefixBatch:
    """What the registered attention function reads during one forward of B rows.

    prefix_k / prefix_v: per layer ``[Np, Hkv, P_max, D]``, the batch's distinct prompts.
    prefix_lens: ``[Np]`` int32; prompt_idx: ``[B]`` int32 (row -> prompt).
    kv_lens: ``[B]`` own keys valid per row; q_lens: ``[B]`` new queries per row.
    own_k / own_v: per layer ``[B, Hkv, cap, D]`` per-row K/V kept during generation, or None.
    decoding: True when each row brings one new token whose K/V are written at kv_lens - 1.
    triton: attend through the Triton kernels instead of their PyTorch references.
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


def _kernels(triton: bool):
    """(attend, write_kv): the Triton kernels, or their PyTorch references (the CPU path)."""
    from softprompt import kernels

    if triton:
        return kernels.prefix_attention_auto, kernels.write_kv
    return kernels.prefix_attention_ref, kernels.write_kv_ref


def _prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      softprompt_batch: PrefixBatch | None = None, **kwargs):
    """query: [B, H, L, D]; key/value: [B, Hkv, L, D] (RoPE applied). Returns ([B, L, H, D], None)."""
    if softprompt_batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    b, i = softprompt_batch, module.layer_idx
    attend, write_kv = _kernels(b.triton)
    if b.own_k is not None:
        if b.decoding:  # append this step's K/V to each row's buffer, attend over the buffer
            write_kv(b.own_k[i], b.own_v[i], key, value, b.kv_lens - 1)
            key, value = b.own_k[i], b.own_v[i]
        else:  # prefill: keep the request's K/V for the decode steps that follow
            b.own_k[i][:, :, : key.shape[2]] = key
            b.own_v[i][:, :, : value.shape[2]] = value
    out = attend(query, key, value, b.prefix_k[i], b.prefix_v[i], b.prefix_lens, b.prompt_idx,
                 kv_lens=b.kv_lens, q_lens=b.q_lens, scale=scaling)
    return out.transpose(1, 2), None


def register_attention() -> None:
    """Register ``softprompt_prefix`` with transformers' attention registry once.

    No mask builder is registered for it, on purpose: transformers then skips mask creation
    (``attention_mask`` stays None). The prefix attention needs no mask (lengths say it all) and
    the plain-SDPA path, which computes prefixes one prompt at a time, is causal without one.
    Skipping it also skips transformers' packed-sequence check, a host sync that CUDA graph
    capture would refuse."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _prefix_attention)
    _registered = True


@dataclass
class _GenState:
    batch: PrefixBatch
    next_pos: torch.Tensor  # [B] position id of each row's next token
    slots: list  # batch row of each still-generating request, in the caller's order
    active: torch.Tensor  # [B] int32: 1 for rows still generating, 0 for idle/padding rows
    closed: bool = False  # superseded by a newer generation (CUDA graphs: one at a time)


class TorchBackend(TorchModelMixin):
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
        spec = ModelSpec.from_model(self.model)
        self.num_layers, self.num_kv_heads, self.head_dim = (spec.num_layers, spec.num_kv_heads,
                                                             spec.head_dim)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name)
        self._stacks: OrderedDict[tuple, tuple] = OrderedDict()  # planned prefix stacks, reused
        self.decode_buffer_bytes = decode_buffer_bytes
        self._generation = None  # weak reference to the live generation state (graphs)
        self.tokens_computed = 0
        self.batches = 0

    def _pad(self, n: int) -> int:
        return bucket(n) if self.buckets else n

    # ----------------------------------------------------------------------------- prefix
    @torch.inference_mode()
    def _compute_prefix(self, prompt) -> PrefixEntry:
        """Run the P virtual tokens once: per-layer K/V ``[Hkv, P, D]`` + first-token log-probs."""
        emb = self._prompt_tensor(prompt)[None]  # [1, P, E]
        pos = torch.arange(emb.shape[1], device=self.device)[None]
        out = self.model.base_model(inputs_embeds=emb, position_ids=pos, use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in 5.2x
        keys = [layer.keys[0].clone() for layer in cache.layers]  # [Hkv, P, D]
        values = [layer.values[0].clone() for layer in cache.layers]
        first = self.lm_head(out.last_hidden_state[0, -1]).float().log_softmax(-1)  # [V]
        return PrefixEntry(keys, values, first)

    def entry(self, prompt) -> PrefixEntry:
        return self.cache.get_or_compute(prompt.digest, lambda: self._compute_prefix(prompt))

    def prepare(self, prompt) -> None:
        self.entry(prompt)

    def forget(self, prompt) -> None:
        self.cache.invalidate(prompt.digest)
        self._stacks.clear()

    def stats(self) -> dict:
        graphs = self.graphs.stats() if self.graphs is not None else {}
        return {**self.cache.stats(), "tokens_computed": self.tokens_computed,
                "batches": self.batches, **graphs}

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
        entries live. Returns (keys, values, lengths ``[Np]`` int32, entries)."""
        key = (tuple(p.digest for p in prompts), empty_slot)
        entries = [self.entry(p) for p in prompts]  # counts hits, recomputes evicted prefixes
        hit = self._stacks.get(key)
        if hit is not None and all(e is h for e, h in zip(entries, hit[3])):
            self._stacks.move_to_end(key)
            return hit
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
        self._stacks[key] = (ks, vs, lens.to(self.device), entries)
        while len(self._stacks) > 4:
            self._stacks.popitem(last=False)
        return self._stacks[key]

    def _own_buffers(self, rows: int, capacity: int) -> tuple[list, list]:
        """Per layer ``[rows, Hkv, capacity, D]`` decode K/V buffers. Under graphs they are the
        persistent buffers of that shape, which the captured decode steps write in place."""
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        if self.graphs is None:
            return tuple([torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)] for _ in range(2))
        return tuple([self.graphs.persistent((name, i), shape, self.dtype, self.device)
                      for i in range(self.num_layers)] for name in ("own_k", "own_v"))

    def _batch(self, rows: list[Row], capacity: int = 0):
        """Assemble a PrefixBatch, the request embeddings ``[B, L_max, E]``, positions
        ``[B, L_max]`` and ``{digest: PrefixEntry}`` of the batch's prompts. With buckets, B and
        L_max are padded (rows past len(rows) are idle: zero lengths, prompt slot 0)."""
        distinct = list({r.prompt.digest: r.prompt for r in rows if r.prompt is not None}.values())
        index = {p.digest: n for n, p in enumerate(distinct)}
        no_prompt = any(r.prompt is None for r in rows)
        ks, vs, lens, entries = self._stack(distinct, no_prompt)
        if no_prompt:  # P = 0 rows point at the empty slot after the prompts
            index[None] = len(distinct)
        B, l_max = len(rows), max(len(r.ids) for r in rows)
        Bp, Lp = self._pad(B), self._pad(l_max)
        ids = torch.zeros(Bp, Lp, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.ids)] = torch.tensor(r.ids)
        emb = self.embed(ids.to(self.device))  # [B, L_max, E]; padding embeds token 0, unread

        pad = [0] * (Bp - B)  # padding rows: no tokens, prompt slot 0
        meta = torch.tensor([[r.num_virtual for r in rows] + pad, [len(r.ids) for r in rows] + pad,
                             [index[r.prompt.digest if r.prompt else None] for r in rows] + pad],
                            dtype=torch.int32).to(self.device)  # [3, Bp], one copy
        pos = meta[0, :, None].long() + torch.arange(Lp, device=self.device)  # row b starts at its P
        pos.clamp_(max=self.max_positions - 1)  # padding positions only: they are never read
        seq_lens, prompt_idx = meta[1], meta[2]
        own_k, own_v = self._own_buffers(Bp, self._pad(capacity)) if capacity else (None, None)
        batch = PrefixBatch(ks, vs, lens, prompt_idx, seq_lens, seq_lens.clone(), own_k, own_v,
                            triton=self.triton)
        self.tokens_computed += int(sum(len(r.ids) for r in rows))
        self.batches += 1
        return batch, emb, pos, dict(zip(index, entries))

    def _run(self, b: PrefixBatch, emb: torch.Tensor, pos: torch.Tensor, project: bool = False):
        """The model over ``emb [B, L, E]`` at ``pos [B, L]`` with batch ``b``: the last hidden
        states ``[B, L, E]``, or with ``project`` the logits of position 0, ``[B, V]`` (decode).
        Through a CUDA graph when enabled: then the result is the graph's static output, valid
        until the next call."""
        decoding, triton = b.decoding, b.triton

        def forward(emb, pos, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens,
                    own_k, own_v):
            batch = PrefixBatch(prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens,
                                own_k, own_v, decoding, triton)
            out = self.model.base_model(inputs_embeds=emb, position_ids=pos, use_cache=False,
                                        softprompt_batch=batch)
            hidden = out.last_hidden_state
            return self.lm_head(hidden[:, 0]) if project else hidden

        inputs = dict(emb=emb, pos=pos, prefix_k=b.prefix_k, prefix_v=b.prefix_v,
                      prefix_lens=b.prefix_lens, prompt_idx=b.prompt_idx, kv_lens=b.kv_lens,
                      q_lens=b.q_lens, own_k=b.own_k, own_v=b.own_v)
        if self.graphs is None:
            return forward(**inputs)
        return self.graphs.run(forward, inputs, reuse=("prefix_k", "prefix_v"),
                               tag=(decoding, project))

    # ------------------------------------------------------------------------------ score
    @torch.inference_mode()
    def logprobs(self, rows: list[Row]) -> list[np.ndarray]:
        batch, emb, pos, entries = self._batch(rows)
        hidden = self._run(batch, emb, pos)  # [B, L_max, E]
        # Only the positions that predict a target go through the vocabulary projection.
        sel_b, sel_t, tgt = [], [], []
        for b, r in enumerate(rows):
            sel_b += [b] * len(r.own_targets)
            sel_t += [j - 1 for j in r.own_targets]
            tgt += [r.ids[j] for j in r.own_targets]
        sel = torch.tensor([sel_b, sel_t, tgt], dtype=torch.long).to(self.device)  # [3, T], one copy
        lp = self.lm_head(hidden[sel[0], sel[1]]).float().log_softmax(-1)  # [T, V]
        lp = lp.gather(-1, sel[2][:, None])[:, 0]  # [T]
        # A row scored from its first token takes it from its prompt's cached first-token
        # log-probs (predicted by the last virtual token): gathered for all such rows at once.
        firsts = [r for r in rows if r.target_start == 0]
        if firsts:
            digests = list({r.prompt.digest: None for r in firsts})
            table = torch.stack([entries[d].first_logprobs for d in digests])  # [Np, V]
            at = torch.tensor([[digests.index(r.prompt.digest) for r in firsts],
                               [r.ids[0] for r in firsts]], dtype=torch.long).to(self.device)
            lp = torch.cat([lp, table[at[0], at[1]].float()])  # [T + F]
        lp = lp.cpu().numpy()  # the call's one device-to-host copy
        out, at, f = [], 0, len(tgt)
        for r in rows:
            n = len(r.own_targets)
            vals = lp[at: at + n]
            at += n
            if r.target_start == 0:
                vals = np.concatenate([lp[f: f + 1], vals])
                f += 1
            out.append(vals)
        return out

    # ------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def start(self, rows: list[Row], max_new_tokens: int, greedy: bool = False):
        if self.graphs is not None:  # its decode buffers are shared: close the previous generation
            previous = self._generation() if self._generation is not None else None
            if previous is not None:
                previous.closed = True
        l_max = max(len(r.ids) for r in rows)
        batch, emb, pos, _ = self._batch(rows, capacity=l_max + max_new_tokens)
        hidden = self._run(batch, emb, pos)
        B = len(rows)
        real = torch.arange(B, device=self.device)
        logits = self.lm_head(hidden[real, batch.kv_lens[:B].long() - 1])  # [B, V]
        Bp = batch.prompt_idx.shape[0]
        next_pos = torch.zeros(Bp, dtype=torch.long, device=self.device)
        next_pos[:B] = torch.tensor([r.num_virtual + len(r.ids) for r in rows], device=self.device)
        active = (torch.arange(Bp, device=self.device) < B).to(torch.int32)
        state = _GenState(batch, next_pos, list(range(B)), active)
        if self.graphs is not None:
            self._generation = weakref.ref(state)
            # no other generation is live: older decode buffer sets may go (the newest stays)
            self.graphs.trim_persistent(self.decode_buffer_bytes)
        return state, self._to_host(logits, greedy)

    @torch.inference_mode()
    def step(self, state: _GenState, next_ids: np.ndarray, greedy: bool = False):
        """One token for each generating row (``next_ids`` in the caller's order): ``[n, V]``
        logits, or with ``greedy`` their argmax ids ``[n]``."""
        _check_open(state)
        b = state.batch
        b.decoding = True
        b.kv_lens = b.kv_lens + state.active  # idle rows stay put (and write nowhere: -1)
        b.q_lens = state.active
        ids = torch.zeros(len(state.active), dtype=torch.long)
        ids[state.slots] = torch.as_tensor(next_ids, dtype=torch.long)
        emb = self._embed_ids(ids)[:, None]  # [B, 1, E]
        logits = self._run(b, emb, state.next_pos[:, None], project=True)  # [B, V]
        state.next_pos = state.next_pos + state.active
        self.tokens_computed += len(next_ids)
        slots = torch.tensor(state.slots, device=self.device)
        return self._to_host(logits[slots], greedy)

    def select(self, state: _GenState, keep: list[int]) -> _GenState:
        """Keep only the rows at positions ``keep`` of the caller's order. Rows are compacted
        into a smaller batch when it is smaller (with buckets: a smaller bucket); otherwise the
        dropped rows are made idle in place."""
        _check_open(state)
        b, slots = state.batch, [state.slots[k] for k in keep]
        n, dev = self._pad(len(slots)), self.device
        if n == len(state.active):  # same batch size: idle the dropped rows, copy nothing
            state.active = torch.zeros_like(state.active)
            state.active[torch.tensor(slots, device=dev)] = 1
            b.kv_lens = b.kv_lens * state.active
            state.slots = slots
            return state
        idx = torch.tensor(slots + [slots[0]] * (n - len(slots)), device=dev)  # padding: idled copies
        state.active = (torch.arange(n, device=dev) < len(slots)).to(torch.int32)
        b.prompt_idx, b.kv_lens = b.prompt_idx[idx], b.kv_lens[idx] * state.active
        b.q_lens = state.active
        cap = b.own_k[0].shape[2]
        own_k, own_v = self._own_buffers(n, cap)
        for dst, src in ((own_k, b.own_k), (own_v, b.own_v)):
            for layer in range(self.num_layers):
                dst[layer].copy_(src[layer][idx])  # src[idx] is a gathered copy: safe in place
        b.own_k, b.own_v = own_k, own_v
        state.next_pos = state.next_pos[idx]
        state.slots = list(range(len(slots)))
        return state


def _check_open(state: _GenState) -> None:
    if state.closed:
        raise RuntimeError("this generation was closed by a newer one: under CUDA graphs a "
                           "TorchBackend runs one generation at a time (Runtime.generate "
                           "serialises them)")
