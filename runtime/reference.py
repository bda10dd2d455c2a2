"""The reference backend: PEFT prompt-tuning semantics, virtual tokens recomputed every call.

Each row runs ``model(inputs_embeds=[prompt ; embed(ids)])`` with positions 0..P+L-1 and
logits at every position, exactly as ``peft.PeftModelForCausalLM`` does for a
``PROMPT_TUNING`` adapter on that request alone (PEFT cannot mix prompts in one batch; this
can, since right padding never changes a causal row's real positions). It is the baseline the
cached backends must reproduce and beat. Generation recomputes the whole sequence each step.
"""

from __future__ import annotations

import numpy as np
import torch

from .backend import StepperBackend
from .plan import BatchPlan
from .requests import prompt_len
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

    def _prompt_tensor(self, prompt) -> torch.Tensor:
        """``[P, E]`` in the model's dtype/device (P = 0 when there is no prompt)."""
        if prompt is None:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        return torch.tensor(prompt.embeddings, device=self.device, dtype=self.dtype)

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

    def _forward(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Right-padded batch of ``[S_b, E]`` sequences -> logits ``[B, S_max, V]`` (all positions)."""
        s_max = max(s.shape[0] for s in seqs)
        emb = torch.zeros(len(seqs), s_max, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(seqs), s_max, dtype=torch.long, device=self.device)
        for b, s in enumerate(seqs):
            emb[b, : s.shape[0]] = s
            mask[b, : s.shape[0]] = 1
        pos = torch.arange(s_max, device=self.device).expand(len(seqs), -1)
        self.tokens_computed += int(mask.sum())
        return self.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits

    def _sequence(self, prompt, ids) -> torch.Tensor:
        return torch.cat([self._prompt_tensor(prompt), self._embed_ids(ids)])

    @torch.inference_mode()
    def score(self, plan: BatchPlan) -> list:
        logits = self._forward([self._sequence(r.prompt, r.ids) for r in plan.rows])
        dev = self.device
        # the whole sequence is recomputed, so column c of the request sits at position P + c
        # and a first token is predicted at P - 1 (the last virtual token)
        rows = torch.as_tensor(np.concatenate([plan.target_rows, plan.first_rows]), device=dev)
        at = torch.as_tensor(np.concatenate([plan.prefix_lens[plan.target_rows] + plan.target_cols,
                                             plan.prefix_lens[plan.first_rows] - 1]), device=dev)
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
        logits = self._forward([self._sequence(p, ids) for p, ids in state])
        last = torch.tensor([prompt_len(p) + len(ids) - 1 for p, ids in state], device=self.device)
        return logits[torch.arange(len(state), device=self.device), last]
