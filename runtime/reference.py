"""The reference backend: PEFT semantics, the prompt recomputed on every call.

An embedding prompt's row runs ``model(inputs_embeds=[prompt ; embed(ids)])`` with positions
0..P+L-1 and logits at every position, exactly as ``peft.PeftModelForCausalLM`` does for a
``PROMPT_TUNING`` adapter on that request alone (PEFT cannot mix prompts in one batch; this
can, since right padding never changes a causal row's real positions). A prompt with K/V
segments runs as PEFT's prefix tuning does: the K/V (and whatever precedes them, run first) as
``past_key_values`` with an all-ones mask over them, the rest of the prompt's segments and the
request after them at positions P_past..; rows with pasts of different lengths are right-padded
and masked. It is the baseline the cached backends must reproduce and beat. Generation
recomputes the whole sequence each step.
"""

from __future__ import annotations

import numpy as np
import torch

from softprompt.models import ModelSpec, cache_kwarg

from .backend import StepperBackend
from .plan import BatchPlan
from .prompts import KV, Embeds
from .sampling import pick_torch
from .stats import BackendStats


class TorchModelMixin:
    """Shared by the torch backends: embedding lookup and the few facts the runtime needs."""

    def _init_model(self, lm):
        self.lm = lm
        self.model = lm.model
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.embed = self.model.get_input_embeddings()
        self.lm_head = self.model.get_output_embeddings()
        cfg = self.model.config
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.hidden_size = int(self.embed.weight.shape[1])
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None)
                                 or getattr(cfg, "n_positions", 1 << 30))
        self.fingerprint = lm.fingerprint
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        spec = ModelSpec.from_model(self.model)
        self.num_layers, self.num_kv_heads, self.head_dim = (spec.num_layers, spec.num_kv_heads,
                                                             spec.head_dim)
        self.num_heads = spec.num_heads

    def _tensor(self, a) -> torch.Tensor:
        """A prompt's float32 host array in the model's dtype, on its device."""
        return torch.tensor(a, device=self.device, dtype=self.dtype)

    def _segment_embeds(self, seg) -> torch.Tensor:
        """``[n, E]`` input embeddings of an ``Embeds`` or ``TokenIds`` segment (text goes
        through the model's own embedding module, so Gemma's scaling applies to it as in PEFT)."""
        return self._tensor(seg.rows) if isinstance(seg, Embeds) else self._embed_ids(list(seg.ids))

    def _embed_ids(self, ids) -> torch.Tensor:
        """``[L, E]``: the model's own input-embedding module (so Gemma's scaling applies)."""
        return self.embed(torch.as_tensor(ids, dtype=torch.long, device=self.device))


class ReferenceBackend(TorchModelMixin, StepperBackend):
    name = "reference"

    def __init__(self, lm):
        self._init_model(lm)
        self.tokens_computed = 0

    def prepare(self, prompt) -> None:  # nothing is cached: that is the point of this backend
        pass

    def forget(self, prompt) -> None:
        pass

    def stats(self) -> BackendStats:
        return BackendStats(tokens_computed=self.tokens_computed)

    def save_cache(self, path) -> int:
        raise RuntimeError("the reference backend has no prefix cache (it recomputes every call)")

    load_cache = save_cache

    def _forward(self, rows: list) -> tuple[torch.Tensor, list[int]]:
        """Rows ``(prompt, ids)`` recomputed from scratch, right-padded into one batch: logits
        ``[B, S_max, V]`` at every computed position, and per row the offset of its request's
        first token in them (its prompt's trailing, computed part)."""
        items = [self._row(p, ids) for p, ids in rows]
        pasts = [past for past, _ in items]
        logits = self._run([seq for _, seq in items], pasts)
        return logits, [seq.shape[0] - len(ids) for (_, seq), (_, ids) in zip(items, rows)]

    def _row(self, prompt, ids) -> tuple[list | None, torch.Tensor]:
        """(the row's past: per layer (K, V) ``[Hkv, n, D]`` of its prompt up to its last K/V
        segment, or None; the ``[S, E]`` embeddings computed after it: the prompt's other
        segments, then the request's ids)."""
        segs = prompt.segments() if prompt is not None else ()
        last_kv = max((i for i, s in enumerate(segs) if isinstance(s, KV)), default=-1)
        past = None
        for seg in segs[: last_kv + 1]:
            if isinstance(seg, KV):
                new = [(self._tensor(k), self._tensor(v)) for k, v in zip(seg.keys, seg.values)]
            else:  # a computed segment before a K/V one: run it on the past so far, keep its K/V
                new = self._extend(past, self._segment_embeds(seg))
            past = new if past is None else [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                                             for (k0, v0), (k1, v1) in zip(past, new)]
        seq = [self._segment_embeds(s) for s in segs[last_kv + 1:]] + [self._embed_ids(ids)]
        return past, torch.cat(seq)

    def _extend(self, past, emb: torch.Tensor) -> list:
        """Per layer (K, V) ``[Hkv, n, D]`` of ``emb [n, E]`` run after ``past``."""
        cache = self._cache([past])
        self._run([emb], [past], cache)
        P = 0 if past is None else past[0][0].shape[1]
        return [(layer.keys[0, :, P:], layer.values[0, :, P:]) for layer in cache.layers]

    def _cache(self, pasts: list):
        """A DynamicCache of the rows' pasts right-padded to the longest ``[B, Hkv, P_max, D]``."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        p_max = max((0 if p is None else p[0][0].shape[1]) for p in pasts)
        if p_max == 0:
            return cache
        shape = (len(pasts), self.num_kv_heads, p_max, self.head_dim)
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            for b, p in enumerate(pasts):
                if p is not None:
                    n = p[layer][0].shape[1]
                    k[b, :, :n], v[b, :, :n] = p[layer]
            cache.update(k, v, layer)
        return cache

    def _run(self, seqs: list[torch.Tensor], pasts: list, cache=None) -> torch.Tensor:
        """Right-padded ``[S_b, E]`` sequences after their pasts (None: none) -> logits
        ``[B, S_max, V]``. Positions continue each row's past; the mask covers its real past
        and tokens only. ``cache``: the pasts' DynamicCache to use (and extend)."""
        B, s_max = len(seqs), max(s.shape[0] for s in seqs)
        lens = [0 if p is None else p[0][0].shape[1] for p in pasts]
        p_max = max(lens)
        emb = torch.zeros(B, s_max, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(B, p_max + s_max, dtype=torch.long, device=self.device)
        pos = torch.zeros(B, s_max, dtype=torch.long, device=self.device)
        for b, (s, n) in enumerate(zip(seqs, lens)):
            emb[b, : s.shape[0]] = s
            mask[b, :n] = 1
            mask[b, p_max: p_max + s.shape[0]] = 1
            pos[b] = n + torch.arange(s_max, device=self.device)
        self.tokens_computed += sum(s.shape[0] for s in seqs)
        if cache is None and p_max:
            cache = self._cache(pasts)
        kw = {} if cache is None else {cache_kwarg(self.model): cache, "use_cache": True}
        return self.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, **kw).logits

    @torch.inference_mode()
    def score(self, plan: BatchPlan) -> list:
        logits, offsets = self._forward([(r.prompt, r.ids) for r in plan.rows])
        off = np.asarray(offsets, np.int64)
        dev = self.device
        # column c of the request sits at offset + c of the computed positions, and a first
        # token is predicted at offset - 1 (the prompt's last computed position)
        rows = torch.as_tensor(np.concatenate([plan.target_rows, plan.first_rows]), device=dev)
        at = torch.as_tensor(np.concatenate([off[plan.target_rows] + plan.target_cols,
                                             off[plan.first_rows] - 1]), device=dev)
        ids = torch.as_tensor(np.concatenate([plan.target_ids, plan.first_ids]), device=dev)
        sel = logits[rows, at].float()  # [T + F, V]
        all_lp = sel.log_softmax(-1)
        lp = all_lp.gather(-1, ids[:, None])[:, 0].double().cpu().numpy()
        top = (sel.argmax(-1) == ids).cpu().numpy()
        T = len(plan.target_rows)
        own_alt = first_alt = None
        if plan.max_top_n:  # the same log-probs' most likely ids, as generation's pick_torch
            val, idx = torch.topk(all_lp, min(plan.max_top_n, all_lp.shape[-1]), dim=-1)
            val, idx = val.double().cpu().numpy(), idx.cpu().numpy().astype(np.int64)
            own_alt, first_alt = (idx[:T], val[:T]), (idx[T:], val[T:])
        return plan.assemble(lp[:T], top[:T], lp[T:], top[T:], own_alt, first_alt)

    # generation: the state is the list of [prompt, ids so far], recomputed every step
    @torch.inference_mode()
    def prefill(self, plan: BatchPlan, capacity):
        state = [[r.prompt, list(r.ids)] for r in plan.rows]
        return state, self._next(state)

    @torch.inference_mode()
    def decode(self, state, next_ids: np.ndarray):
        for row, t in zip(state, next_ids):
            row[1].append(int(t))
        return self._next(state)

    def select(self, state, keep: list[int]):
        return [state[i] for i in keep]

    def join(self, state, new):
        return (state or []) + new

    def pick(self, logits, samplers):
        return pick_torch(logits, samplers)

    def _next(self, state) -> torch.Tensor:
        """Next-token logits ``[B, V]`` of every row (the whole sequence recomputed)."""
        logits, offsets = self._forward([(p, ids) for p, ids in state])
        last = torch.tensor([o + len(ids) - 1 for o, (_, ids) in zip(offsets, state)],
                            device=self.device)
        return logits[torch.arange(len(state), device=self.device), last]
