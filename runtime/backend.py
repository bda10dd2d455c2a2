"""The contract between the engine and a backend, and the one step every backend runs.

A backend owns a model and its prefix cache. The scheduler (``scheduler.py``) builds one
``StepPlan`` per engine step; ``Backend.step`` runs it and returns a ``StepOutput``. Three
backends keep this contract: ``reference`` (PEFT semantics, recomputes everything), ``torch``
(transformers with a cached prefix read by the registered attention function) and ``onnx``
(ONNX Runtime over an exported bundle, numpy only). All three subclass ``StepperBackend``, which
writes ``step`` once over five abstract per-backend primitives.

What a step holds (``StepPlan``):
- the rows still generating (the backend's *decode state*): ``keep`` says which of them stay
  (finished and cancelled rows leave first), and each kept row brings one new token
  ``decode_ids[b]`` (one forward, L = 1);
- newly admitted score rows (``scores``, a ``BatchPlan``): their target log-probs come back
  (with each row's ``top_n`` most likely alternatives per target when it asks for them);
- newly admitted generations (``prefill``, a ``BatchPlan``): their tokens run once, their own
  K/V join the decode state, and their first new token is chosen.

The decode state's row order is data, owned by the scheduler: ``StepPlan.state_ids`` lists the
rows of the state after the step (kept rows in order, then the joining rows), and
``StepperBackend.step`` checks that its own state matches it, so the two can never drift apart.

Decode rows and new rows run as separate forwards so that a one-token decode row is never
padded to a prefill's length; all of it is one ``step`` call, between which rows join and leave.
Tokens are chosen on the backend's device (``runtime/sampling.py``): B ids and B log-probs
cross to the host, never B x V logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from .plan import BatchPlan
from .prompts import Prompt
from .sampling import Sampler
from .stats import BackendStats

TopAlternatives = list[list[tuple[int, float]]]  # per row: its top_n (id, log-prob), or []
Picked = tuple[np.ndarray, np.ndarray, "TopAlternatives | None"]  # ids [B], log-probs [B], tops
# (target log-probs [n], every target is the argmax, per target the row's Row.top_n most likely
# (id, log-prob) or [] when it wants none)
ScoredRow = tuple[np.ndarray, bool, TopAlternatives]


@dataclass
class StepPlan:
    """One engine step (see the module docstring).

    keep: indices (state order) of decode-state rows that stay, or None for all of them.
    decode_ids: ``[Bd]`` int64, the next input token of each kept row; decode_samplers: ``[Bd]``.
    scores: rows to score, or None. prefill: generations joining, or None, with
        ``capacity[b]`` (own tokens row b may reach: its length + max new tokens) and samplers.
    state_ids: ids of the decode state's rows after the step (kept rows, then joining rows),
        as the scheduler numbers them; the backend checks its state against it.
    """

    keep: list[int] | None = None
    decode_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    decode_samplers: list[Sampler] = field(default_factory=list)
    scores: BatchPlan | None = None
    prefill: BatchPlan | None = None
    capacity: list[int] = field(default_factory=list)
    prefill_samplers: list[Sampler] = field(default_factory=list)
    state_ids: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows the step computes: decode rows, score rows and joining rows."""
        return (len(self.decode_ids) + (self.scores.B if self.scores else 0)
                + (self.prefill.B if self.prefill else 0))


@dataclass
class StepOutput:
    """scores: per score row ``(target log-probs [n], is_greedy, alternatives)`` (alternatives:
    per target its ``Row.top_n`` most likely ``(id, log-prob)``, [] for none), in ``plan.scores``
    order.
    next_ids / next_logprobs: ``[Bd + Bp]`` the chosen token of every decode-state row after
    the step (kept rows first, then the rows that joined) and its log-probability; next_top:
    per such row the most likely alternatives its sampler asked for (``Sampler.top_n``), or []."""

    scores: list[ScoredRow] = field(default_factory=list)
    next_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    next_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    next_top: TopAlternatives = field(default_factory=list)


@runtime_checkable
class Backend(Protocol):
    """What the engine and the runtime need from a backend (shape letters as in the package
    docstring). Every method is called from the engine thread only."""

    name: str
    hidden_size: int  # E
    vocab_size: int  # V
    max_positions: int
    fingerprint: str  # the model's content hash
    dtype_name: str  # compute dtype, e.g. "float32"
    num_layers: int  # N, and the K/V geometry a K/V prompt must have
    num_kv_heads: int  # Hkv
    head_dim: int  # D

    def prepare(self, prompt: Prompt) -> None:
        """Compute and cache the prompt's prefix (per layer K/V ``[Hkv, P, D]``) now, from its
        segments in order (``prompts.Prompt``)."""

    def forget(self, prompt: Prompt) -> None:
        """Drop the prompt's cached prefix (nothing else)."""

    def step(self, plan: StepPlan) -> StepOutput:
        """Run one engine step (see the module docstring)."""

    def reset(self) -> None:
        """Drop the decode state (every generating row), e.g. after a failed step."""

    def stats(self) -> BackendStats:
        """Counters and memory by kind."""

    def save_cache(self, path: str | PathLike[str]) -> int:
        """Write the prefix cache to ``path``; returns the entries written."""

    def load_cache(self, path: str | PathLike[str]) -> int:
        """Read a cache written by ``save_cache`` for this model and dtype; returns entries."""


State = TypeVar("State")  # a backend's decode state: the K/V of every generating row
Logits = Any  # [B, V]: a numpy array (onnx) or a torch tensor on the backend's device


class StepperBackend(ABC, Generic[State]):
    """A ``Backend`` whose ``step`` is written once, here, over five per-backend primitives.

    Subclasses set the ``Backend`` attributes and implement ``score``, ``prefill``, ``decode``,
    ``select``/``join``, ``pick`` plus the cache methods; the decode state (``State``, opaque
    here) and its row ids are kept here.
    """

    name: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    fingerprint: str
    dtype_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    _state: State | None = None  # the decode state: rows generating, in ``_state_ids`` order
    _state_ids: list[int] = []  # noqa: RUF012 - replaced, never mutated in place

    # ---------------------------------------------------------------- per-backend primitives
    @abstractmethod
    def score(self, plan: BatchPlan) -> list[ScoredRow]:
        """Per row of ``plan``: (log-probs of its targets in order, is_greedy, alternatives),
        by ``plan.assemble`` (alternatives computed for ``plan.max_top_n`` when it is > 0)."""

    @abstractmethod
    def prefill(self, plan: BatchPlan, capacity: list[int]) -> tuple[State, Logits]:
        """Run new rows (row b may grow to ``capacity[b]`` own tokens); their state and the
        logits ``[B, V]`` of each row's last token."""

    @abstractmethod
    def decode(self, state: State, ids: np.ndarray) -> Logits:
        """One token ``ids [B]`` for every row of ``state`` (its K/V grow by one); logits ``[B, V]``."""

    @abstractmethod
    def select(self, state: State, keep: list[int]) -> State:
        """The state of rows ``keep`` (indices into ``state``, in order; non-empty)."""

    @abstractmethod
    def join(self, state: State | None, new: State) -> State:
        """``state``'s rows followed by ``new``'s."""

    @abstractmethod
    def pick(self, logits: Logits, samplers: list[Sampler]) -> Picked:
        """Choose each row's token on the device (``runtime/sampling.py``)."""

    @abstractmethod
    def prepare(self, prompt: Prompt) -> None: ...

    @abstractmethod
    def forget(self, prompt: Prompt) -> None: ...

    @abstractmethod
    def stats(self) -> BackendStats: ...

    @abstractmethod
    def save_cache(self, path: str | PathLike[str]) -> int: ...

    @abstractmethod
    def load_cache(self, path: str | PathLike[str]) -> int: ...

    # --------------------------------------------------------------------------- the step
    def step(self, plan: StepPlan) -> StepOutput:
        out = StepOutput()
        ids: list[np.ndarray] = []
        lps: list[np.ndarray] = []
        tops: TopAlternatives = []
        if self._state is not None and plan.keep is not None:
            self._state = self.select(self._state, plan.keep) if plan.keep else None
            self._state_ids = [self._state_ids[i] for i in plan.keep]
        if len(plan.decode_ids):
            if self._state is None or len(self._state_ids) != len(plan.decode_ids):
                raise RuntimeError(f"{len(plan.decode_ids)} decode tokens but "
                                   f"{len(self._state_ids)} rows are generating")
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
            self._state_ids = self._state_ids + plan.state_ids[len(self._state_ids):]
        if self._state_ids != plan.state_ids:
            raise RuntimeError(f"decode state rows {self._state_ids} differ from the plan's "
                               f"{plan.state_ids}")
        if ids:
            out.next_ids, out.next_logprobs = np.concatenate(ids), np.concatenate(lps)
            out.next_top = tops
        return out

    def reset(self) -> None:
        self._state = None
        self._state_ids = []
