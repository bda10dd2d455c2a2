"""The contract between the engine and a backend, and the one step every backend runs.

A backend owns a model and its prefix cache. The engine hands it one ``StepPlan`` per engine
step; ``Backend.step`` runs it and returns the step's results. Three backends keep this
contract: ``reference`` (PEFT semantics, recomputes everything), ``torch`` (transformers with a
cached prefix read by the registered attention function) and ``onnx`` (ONNX Runtime over an
exported bundle, numpy only).

What a step holds (``StepPlan``):
- the rows still generating (the backend's *decode state*, one per backend, rows in state
  order): ``keep`` says which of them stay (finished and cancelled rows leave first), and each
  kept row brings one new token ``decode_ids[b]`` (one forward, L = 1);
- newly admitted score rows (``scores``, a ``BatchPlan``): their target log-probs come back;
- newly admitted generations (``prefill``, a ``BatchPlan``): their tokens run once, their own
  K/V join the decode state, and their first new token is chosen.

Decode rows and new rows run as separate forwards so that a one-token decode row is never
padded to a prefill's length; all of it is one ``step`` call, between which rows join and leave.
Tokens are chosen on the backend's device (``runtime/sampling.py``): B ids and B log-probs
cross to the host, never B x V logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from .plan import BatchPlan
from .sampling import Sampler


@dataclass
class StepPlan:
    """keep: indices (state order) of decode-state rows that stay, or None for all of them.
    decode_ids: ``[Bd]`` the next input token of each kept row; decode_samplers: ``[Bd]``.
    scores: rows to score, or None. prefill: generations joining, or None, with
    ``capacity[b]`` (own tokens row b may reach: its length + max new tokens) and samplers."""

    keep: list[int] | None = None
    decode_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    decode_samplers: list[Sampler] = field(default_factory=list)
    scores: BatchPlan | None = None
    prefill: BatchPlan | None = None
    capacity: list[int] = field(default_factory=list)
    prefill_samplers: list[Sampler] = field(default_factory=list)


@dataclass
class StepOutput:
    """scores: per score row ``(target log-probs [n], is_greedy)``.
    next_ids / next_logprobs: ``[Bd + Bp]`` the chosen token of every decode-state row after
    the step (kept rows first, then the rows that joined) and its log-probability; next_top:
    the most likely alternatives of rows whose sampler asks for them (``Sampler.top_n``)."""

    scores: list = field(default_factory=list)
    next_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    next_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    next_top: list = field(default_factory=list)  # per row [(id, log-prob)] (its top_n), or []


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a backend (shape letters as in the package docstring).

    Attributes: ``name``; ``hidden_size`` E; ``vocab_size`` V; ``max_positions``;
    ``fingerprint`` (the model's content hash); ``dtype_name``.
    """

    name: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    fingerprint: str
    dtype_name: str

    def prepare(self, prompt) -> None:
        """Compute and cache the prompt's prefix (per layer K/V ``[Hkv, P, D]``) now."""

    def forget(self, prompt) -> None:
        """Drop the prompt's cached prefix (nothing else)."""

    def step(self, plan: StepPlan) -> StepOutput:
        """Run one engine step (see the module docstring)."""

    def reset(self) -> None:
        """Drop the decode state (every generating row), e.g. after a failed step."""

    def stats(self) -> dict:
        """Counters and memory: prefix-cache hits/misses/evictions, bytes by kind, ..."""

    def save_cache(self, path) -> int:
        """Write the prefix cache to ``path``; returns the entries written."""

    def load_cache(self, path) -> int:
        """Read a cache written by ``save_cache`` for this model and dtype; returns entries."""


class Stepper:
    """``step`` written once over five per-backend primitives:

    - ``score(plan) -> [(log-probs, is_greedy)]`` for a BatchPlan of score rows;
    - ``prefill(plan, capacity) -> (state, logits [B, V])``: run new rows, keep their K/V;
    - ``decode(state, ids [B]) -> logits [B, V]``: one token for every row of ``state``;
    - ``select(state, keep) -> state`` and ``join(state | None, new) -> state``;
    - ``pick(logits, samplers) -> (ids [B], log-probs [B], tops | None)``: choose on the
      device (``runtime/sampling.py``).
    """

    _state = None  # the decode state: rows generating, in the engine's order

    def step(self, plan: StepPlan) -> StepOutput:
        out = StepOutput()
        ids, lps, tops = [], [], []
        if self._state is not None and plan.keep is not None:
            self._state = self.select(self._state, plan.keep) if plan.keep else None
        if len(plan.decode_ids):
            if self._state is None:
                raise RuntimeError(f"{len(plan.decode_ids)} decode tokens but no row is generating")
            logits = self.decode(self._state, np.asarray(plan.decode_ids, np.int64))
            i, lp, top = self.pick(logits, plan.decode_samplers)
            ids.append(i)
            lps.append(lp)
            tops += top or [[] for _ in i]
        if plan.scores is not None:
            out.scores = self.score(plan.scores)
        if plan.prefill is not None:
            new, logits = self.prefill(plan.prefill, plan.capacity)
            i, lp, top = self.pick(logits, plan.prefill_samplers)
            ids.append(i)
            lps.append(lp)
            tops += top or [[] for _ in i]
            self._state = self.join(self._state, new)
        if ids:
            out.next_ids, out.next_logprobs = np.concatenate(ids), np.concatenate(lps)
            out.next_top = tops
        return out

    def reset(self) -> None:
        self._state = None
