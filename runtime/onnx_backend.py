"""The ONNX backend: an exported bundle under ONNX Runtime, numpy only (no torch needed).

The bundle's graph takes ``inputs_embeds`` and ``past_key_values.*``, so:
1. a prompt's prefix is the graph run over its P embeddings with an empty past, once; the
   ``present.*`` outputs ``[1, Hkv, P, D]`` go into the PrefixCache;
2. a batch of new rows (a ``BatchPlan``) runs only its L tokens, with each row's cached prefix
   assembled into the past (``[B, Hkv, P_max, D]``, right-padded, ``attention_mask`` 0 on the
   padding) and ``position_ids`` from the plan; ``logits_index`` asks the graph for the
   vocabulary projection only at the positions a score (or the next token) needs;
3. generating rows form one decode state: per layer K/V ``[B, Hkv, S, D]`` with a mask
   ``[B, S]``. Rows with different past lengths share it (a row that joined later has mask-0
   gaps); each decode step appends one column; rows that leave are dropped and columns no
   remaining row uses are trimmed. ONNX Runtime returns a new ``present`` every call, so the
   state is its output, never a copy the backend makes per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from softprompt.models import display_name

from .backend import StepperBackend
from .cache import PrefixCache, PrefixEntry
from .plan import BatchPlan, top_alternatives
from .prompts import KV, Embeds
from .requests import Tokenizer, log_softmax
from .sampling import pick_numpy
from .stats import BackendStats


@dataclass
class _GenState:
    past: list  # per layer (K, V) [B, Hkv, S, D]
    mask: np.ndarray  # [B, S] int64: 1 where a row has a key
    next_pos: np.ndarray  # [B] position id of each row's next token

    @property
    def nbytes(self) -> int:
        return _past_bytes(self.past)


def _past_bytes(past) -> int:
    """Bytes of a per-layer [(K, V)] past."""
    return sum(k.nbytes + v.nbytes for k, v in past)


class OnnxBackend(StepperBackend):
    name = "onnx"

    def __init__(self, path, providers=None, prefix_cache_bytes: int = 1 << 30):
        from softprompt.export.bundle import load_bundle

        self.bundle = b = load_bundle(path, providers=providers)
        self.hidden_size, self.vocab_size = b.hidden_size, b.vocab_size
        self.num_layers, self.num_kv_heads, self.head_dim = b.num_layers, b.num_kv_heads, b.head_dim
        self.max_positions = b.max_position_embeddings
        self.fingerprint = b.fingerprint
        self.dtype_name = b.manifest["dtype"]
        self.model_name = display_name(b.manifest.get("model_name") or b.manifest.get("source"))
        self.tokenizer = Tokenizer.for_bundle(b)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name, geometry=dict(
            num_layers=b.num_layers, num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
            vocab_size=b.vocab_size))
        empty = [k[0] for k, _ in b.empty_past(1)]  # N x [Hkv, 0, D]
        self._empty = PrefixEntry(empty, empty, np.zeros(0, np.float32))  # P = 0 rows
        self._last_past = (None, None)  # (row prompt digests, per-layer past) of the last batch
        self.tokens_computed = 0
        self.batches = 0

    # ----------------------------------------------------------------------------- prefix
    def _compute_prefix(self, prompt) -> PrefixEntry:
        """The prompt's segments in order, once: K/V segments join the past as they are,
        embeddings and text run through the graph on the past so far (its ``present.*`` is the
        new past). Per-layer K/V ``[Hkv, P, D]`` and first-token log-probs (None when the prompt
        ends in K/V)."""
        b = self.bundle
        past = b.empty_past(1)  # N x (K, V) [1, Hkv, 0, D]
        first = None
        for seg in prompt.segments():
            if isinstance(seg, KV):
                past = [(np.concatenate([k, kk[None].astype(b.np_dtype)], 2),
                         np.concatenate([v, vv[None].astype(b.np_dtype)], 2))
                        for (k, v), kk, vv in zip(past, seg.keys, seg.values)]
                first = None
                continue
            emb = (seg.rows if isinstance(seg, Embeds) else b.embeddings[list(seg.ids)])
            P, n = past[0][0].shape[2], emb.shape[0]
            logits, past = b.run(emb[None].astype(b.np_dtype), np.ones((1, P + n), np.int64),
                                 np.arange(P, P + n)[None], past, np.array([[n - 1]], np.int64))
            first = log_softmax(logits[0, 0]).astype(np.float32)
            self.tokens_computed += n
        return PrefixEntry([k[0] for k, _ in past], [v[0] for _, v in past], first)

    def entry(self, prompt) -> PrefixEntry:
        if prompt is None:
            return self._empty
        return self.cache.get_or_compute(prompt.digest, lambda: self._compute_prefix(prompt))

    def prepare(self, prompt) -> None:
        self.entry(prompt)
        last = self._last_past[1]  # the kept past must still fit beside the grown cache
        if last and not self._fits(last):
            self._last_past = (None, None)

    def _fits(self, past) -> bool:
        """Whether an assembled past may be kept: cache + past within the cache budget."""
        return self.cache.bytes + _past_bytes(past) <= self.cache.max_bytes

    def forget(self, prompt) -> None:
        self.cache.invalidate(prompt.digest)
        self._last_past = (None, None)

    def stats(self) -> BackendStats:
        last = self._last_past[1]
        stacks = _past_bytes(last) if last else 0
        decode = self._state.nbytes if self._state is not None else 0
        return BackendStats(self.cache.stats(), stack_bytes=stacks, decode_bytes=decode,
                            tokens_computed=self.tokens_computed, batches=self.batches)

    def save_cache(self, path) -> int:
        return self.cache.save(path)

    def load_cache(self, path) -> int:
        self._last_past = (None, None)
        return self.cache.load(path)

    # ------------------------------------------------------------------------------ batch
    def _run_plan(self, plan: BatchPlan, index: np.ndarray):
        """The graph over the plan's new tokens on top of their prefixes: (logits ``[B, K, V]``
        at ``index [B, K]``, presents per layer ``[B, Hkv, P_max + L_max, D]``, mask, entries)."""
        b = self.bundle
        entries = [self.entry(p) for p in plan.prompts] + [self._empty]  # the empty slot last
        rows = [entries[i] for i in plan.prompt_idx]
        B, L = plan.B, plan.L_max
        p_max = max(e.num_tokens for e in rows)
        # ORT takes a dense past, one copy of the prefix per row; batch scoring sends the
        # same prompts in the same order again and again, so the last one is kept and reused.
        key = (tuple(e.num_tokens for e in rows), tuple(
            p.digest for p in plan.prompts), tuple(plan.prompt_idx.tolist()))
        if self._last_past[0] == key:
            past = self._last_past[1]
        else:
            past = []
            for layer in range(b.num_layers):
                k = np.zeros((B, b.num_kv_heads, p_max, b.head_dim), b.np_dtype)
                v = np.zeros_like(k)
                for i, e in enumerate(rows):
                    k[i, :, : e.num_tokens] = e.keys[layer]
                    v[i, :, : e.num_tokens] = e.values[layer]
                past.append((k, v))
            self._last_past = (key, past) if self._fits(past) else (None, None)
        mask = np.zeros((B, p_max + L), np.int64)
        for i, e in enumerate(rows):
            mask[i, : e.num_tokens] = 1
        mask[:, p_max:] = np.arange(L)[None] < plan.q_lens[:, None]
        emb = b.embeddings[plan.ids].astype(b.np_dtype, copy=False)  # [B, L, E]
        self.tokens_computed += plan.tokens
        self.batches += 1
        logits, presents = b.run(emb, mask, plan.positions, past, index)
        return logits, presents, mask, entries

    def score(self, plan: BatchPlan) -> list:
        # logits_index [B, K]: the columns predicting each row's own targets, padded by
        # repeating one (rows without own targets read column 0, unused)
        per_row = [plan.target_cols[plan.target_rows == r] for r in range(plan.B)]
        K = max(1, max(len(c) for c in per_row))
        index = np.array([np.pad(c, (0, K - len(c)), mode="edge") if len(c) else np.zeros(K, int)
                          for c in per_row], np.int64)
        logits, _, _, entries = self._run_plan(plan, index)  # [B, K, V]
        # the k-th own target of row r sits at index[r, k]: its order in the plan's targets
        slot = np.concatenate([np.arange(len(c)) for c in per_row]).astype(np.int64)
        sel = logits[plan.target_rows, slot].astype(np.float64)  # [T, V]
        own_all = log_softmax(sel)
        own_lp = own_all[np.arange(len(sel)), plan.target_ids]
        own_top = sel.argmax(-1) == plan.target_ids
        first = np.stack([entries[plan.prompt_idx[r]].first_logprobs for r in plan.first_rows]) \
            if len(plan.first_rows) else np.zeros((0, self.vocab_size), np.float32)
        first_lp = first[np.arange(len(first)), plan.first_ids]
        first_top = first.argmax(-1) == plan.first_ids if len(first) else np.zeros(0, bool)
        own_alt = first_alt = None
        if plan.max_top_n:  # asked for: the same log-probs' most likely ids, as pick_numpy
            own_alt = top_alternatives(own_all, plan.max_top_n)
            first_alt = top_alternatives(first.astype(np.float64), plan.max_top_n)
        return plan.assemble(own_lp, own_top, first_lp, first_top, own_alt, first_alt)

    # ------------------------------------------------------------------------- generation
    def prefill(self, plan: BatchPlan, capacity):
        logits, presents, mask, entries = self._run_plan(plan, plan.last_cols[:, None])
        next_pos = plan.prefix_lens + plan.past_lens + plan.q_lens
        return _GenState(presents, mask, next_pos), logits[:, 0]

    def decode(self, state: _GenState, next_ids: np.ndarray):
        b = self.bundle
        state.mask = np.concatenate([state.mask, np.ones((len(next_ids), 1), np.int64)], axis=1)
        emb = b.embeddings[next_ids][:, None].astype(b.np_dtype)  # [B, 1, E]
        logits, state.past = b.run(emb, state.mask, state.next_pos[:, None], state.past,
                                   np.zeros((len(next_ids), 1), np.int64))
        state.next_pos = state.next_pos + 1
        self.tokens_computed += len(next_ids)
        return logits[:, 0]

    def select(self, state: _GenState, keep: list[int]) -> _GenState:
        mask = state.mask[keep]
        cols = np.flatnonzero(mask.any(0))  # columns some remaining row still uses
        state.past = [(k[keep][:, :, cols], v[keep][:, :, cols]) for k, v in state.past]
        state.mask, state.next_pos = mask[:, cols], state.next_pos[keep]
        return state

    def join(self, state: _GenState | None, new: _GenState) -> _GenState:
        """Rows of ``new`` after those of ``state``; the shorter past is right-padded (mask 0)."""
        if state is None:
            return new
        S = max(state.mask.shape[1], new.mask.shape[1])

        def pad(a, axis):
            width = [(0, 0)] * a.ndim
            width[axis] = (0, S - a.shape[axis])
            return np.pad(a, width)

        state.past = [(np.concatenate([pad(k0, 2), pad(k1, 2)]), np.concatenate([pad(v0, 2), pad(v1, 2)]))
                      for (k0, v0), (k1, v1) in zip(state.past, new.past)]
        state.mask = np.concatenate([pad(state.mask, 1), pad(new.mask, 1)])
        state.next_pos = np.concatenate([state.next_pos, new.next_pos])
        return state

    @staticmethod
    def pick(logits, samplers):
        return pick_numpy(logits, samplers)
