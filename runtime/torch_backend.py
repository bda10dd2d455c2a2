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

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .cache import PrefixCache, PrefixEntry
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
    """Register ``softprompt_prefix`` (attention + SDPA's mask builder) with transformers once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _prefix_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


@dataclass
class _GenState:
    batch: PrefixBatch
    next_pos: torch.Tensor  # [B] position id of each row's next token


class TorchBackend(TorchModelMixin):
    name = "torch"

    def __init__(self, lm, prefix_cache_bytes: int = 1 << 30, triton: bool | None = None):
        """triton: use the Triton kernels (default: on CUDA); else their PyTorch references."""
        self._init_model(lm)
        self.triton = self.device.type == "cuda" if triton is None else triton
        register_attention()
        self.model.set_attn_implementation(ATTN_NAME)
        spec = ModelSpec.from_model(self.model)
        self.num_layers, self.num_kv_heads, self.head_dim = (spec.num_layers, spec.num_kv_heads,
                                                             spec.head_dim)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name)
        self._stacks: OrderedDict[tuple, tuple] = OrderedDict()  # planned prefix stacks, reused
        self.tokens_computed = 0
        self.batches = 0

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
        return {**self.cache.stats(), "tokens_computed": self.tokens_computed,
                "batches": self.batches}

    def save_cache(self, path) -> int:
        return self.cache.save(path, to_numpy=lambda t: t.float().cpu().numpy())

    def load_cache(self, path) -> int:
        self._stacks.clear()
        return self.cache.load(path, from_numpy=lambda a: torch.from_numpy(a).to(
            self.device, self.dtype if a.ndim == 3 else torch.float32))

    def _stack(self, prompts: list) -> tuple[list, list, torch.Tensor, list]:
        """Per layer ``[Np, Hkv, P_max, D]`` for the batch's distinct prompts (planned once per
        set of prompts and reused while their cache entries live), lengths ``[Np]``, entries."""
        key = tuple(p.digest for p in prompts)
        entries = [self.entry(p) for p in prompts]  # counts hits, recomputes evicted prefixes
        hit = self._stacks.get(key)
        if hit is not None and all(e is h for e, h in zip(entries, hit[3])):
            self._stacks.move_to_end(key)
            return hit
        p_max = max([1] + [e.num_tokens for e in entries])
        lens = torch.tensor([e.num_tokens for e in entries], dtype=torch.int32, device=self.device)
        ks, vs = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(len(entries), self.num_kv_heads, p_max, self.head_dim,
                            dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            for n, e in enumerate(entries):
                k[n, :, : e.num_tokens] = e.keys[layer]
                v[n, :, : e.num_tokens] = e.values[layer]
            ks.append(k)
            vs.append(v)
        self._stacks[key] = (ks, vs, lens, entries)
        while len(self._stacks) > 4:
            self._stacks.popitem(last=False)
        return ks, vs, lens, entries

    def _batch(self, rows: list[Row], capacity: int = 0):
        """Assemble a PrefixBatch, the request embeddings ``[B, L_max, E]``, positions
        ``[B, L_max]`` and ``{digest: PrefixEntry}`` of the batch's prompts."""
        distinct = list({r.prompt.digest: r.prompt for r in rows if r.prompt is not None}.values())
        index = {p.digest: n for n, p in enumerate(distinct)}
        ks, vs, lens, entries = self._stack(distinct)
        if any(r.prompt is None for r in rows):  # P = 0 rows point at an extra empty slot
            index[None] = len(distinct)
            ks = [torch.cat([k, k.new_zeros(1, *k.shape[1:])]) for k in ks]
            vs = [torch.cat([v, v.new_zeros(1, *v.shape[1:])]) for v in vs]
            lens = torch.cat([lens, lens.new_zeros(1)])
        B, l_max = len(rows), max(len(r.ids) for r in rows)
        ids = torch.zeros(B, l_max, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.ids)] = torch.tensor(r.ids)
        emb = self.embed(ids.to(self.device))  # [B, L_max, E]; padding embeds token 0, unread
        p = torch.tensor([r.num_virtual for r in rows], device=self.device)
        pos = p[:, None] + torch.arange(l_max, device=self.device)  # row b starts at its P
        seq_lens = torch.tensor([len(r.ids) for r in rows], dtype=torch.int32, device=self.device)
        prompt_idx = torch.tensor([index[r.prompt.digest if r.prompt else None] for r in rows],
                                  dtype=torch.int32, device=self.device)
        own_k = own_v = None
        if capacity:
            shape = (B, self.num_kv_heads, capacity, self.head_dim)
            own_k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(self.num_layers)]
            own_v = [torch.zeros_like(k) for k in own_k]
        batch = PrefixBatch(ks, vs, lens, prompt_idx, seq_lens, seq_lens.clone(), own_k, own_v,
                            triton=self.triton)
        self.tokens_computed += int(sum(len(r.ids) for r in rows))
        self.batches += 1
        return batch, emb, pos, dict(zip(index, entries))

    def _hidden(self, batch: PrefixBatch, emb, pos) -> torch.Tensor:
        out = self.model.base_model(inputs_embeds=emb, position_ids=pos, use_cache=False,
                                    softprompt_batch=batch)
        return out.last_hidden_state  # [B, L_max, E]

    # ------------------------------------------------------------------------------ score
    @torch.inference_mode()
    def logprobs(self, rows: list[Row]) -> list[np.ndarray]:
        batch, emb, pos, entries = self._batch(rows)
        hidden = self._hidden(batch, emb, pos)
        # Only the positions that predict a target go through the vocabulary projection.
        sel_b, sel_t, tgt = [], [], []
        for b, r in enumerate(rows):
            sel_b += [b] * len(r.own_targets)
            sel_t += [j - 1 for j in r.own_targets]
            tgt += [r.ids[j] for j in r.own_targets]

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=self.device)

        lp = self.lm_head(hidden[t(sel_b), t(sel_t)])  # [T, V], T = targets in the batch
        lp = lp.float().log_softmax(-1).gather(-1, t(tgt)[:, None])[:, 0].cpu().numpy()
        out, at = [], 0
        for r in rows:
            n = len(r.own_targets)
            vals = lp[at: at + n]
            at += n
            if r.target_start == 0:  # the first token is predicted by the last virtual token
                first = entries[r.prompt.digest].first_logprobs[r.ids[0]].float().cpu().numpy()
                vals = np.concatenate([first[None], vals])
            out.append(vals)
        return out

    # ------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def start(self, rows: list[Row], max_new_tokens: int):
        l_max = max(len(r.ids) for r in rows)
        batch, emb, pos, _ = self._batch(rows, capacity=l_max + max_new_tokens)
        hidden = self._hidden(batch, emb, pos)
        last = batch.kv_lens.long() - 1
        logits = self.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
        next_pos = torch.tensor([r.num_virtual + len(r.ids) for r in rows], device=self.device)
        return _GenState(batch, next_pos), logits.float().cpu().numpy()

    @torch.inference_mode()
    def step(self, state: _GenState, next_ids: np.ndarray):
        b = state.batch
        b.decoding = True
        b.kv_lens = b.kv_lens + 1
        b.q_lens = torch.ones_like(b.kv_lens)
        emb = self._embed_ids(next_ids)[:, None]  # [B, 1, E]
        hidden = self._hidden(b, emb, state.next_pos[:, None])
        state.next_pos = state.next_pos + 1
        self.tokens_computed += len(next_ids)
        return self.lm_head(hidden[:, 0]).float().cpu().numpy()

    def select(self, state: _GenState, keep: list[int]) -> _GenState:
        """Drop finished rows so later steps compute only the rows still generating."""
        b, idx = state.batch, torch.tensor(keep, device=self.device)
        b.prompt_idx, b.kv_lens, b.q_lens = b.prompt_idx[idx], b.kv_lens[idx], b.q_lens[idx]
        b.own_k = [k[idx] for k in b.own_k]
        b.own_v = [v[idx] for v in b.own_v]
        state.next_pos = state.next_pos[idx]
        return state

