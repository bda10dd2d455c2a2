"""The admission policy: which waiting work joins each engine step (no threads, no model).

The engine (``engine.py``) owns a ``Scheduler`` and, once per step, asks it for the next
``StepPlan`` (``schedule``), runs it on the backend, and hands the ``StepOutput`` back
(``update``), as vLLM v1 splits its ``Scheduler`` from ``EngineCore``. Policy, per step:

1. rows that finished or were cancelled leave the decode state (``running``);
2. every running generation brings one decode token;
3. waiting work is admitted in arrival order while it fits: generations join the decode state
   (at most ``max_batch`` rows generate at once), score rows are taken up to ``max_batch`` per
   step, and the step's tokens (decode tokens + each new-row forward padded to its longest row)
   stay within ``max_batch_tokens`` (a single row longer than that runs alone). A large score
   call is split over several steps, longest rows first; the work behind it waits its turn.

So a generation that finishes leaves at once and a new one joins at the next step; running
generations decode every step whatever else waits, and scores are admitted every step whatever
is generating. The scheduler is not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .backend import ScoredRow, StepOutput, StepPlan
from .generation import Generation
from .plan import BatchPlan
from .requests import Row
from .stats import EngineStats


@dataclass
class ScoreWork:
    """One score call: its rows (caller's order), the future of their results, the rows still
    to run (longest first), the results so far, an optional progress callback, and whether it
    counts in ``requests_served``."""

    rows: list[Row]
    future: Future[list[ScoredRow]]
    on_progress: Callable[[int], object] | None = None
    count: bool = True
    order: list[int] = field(default_factory=list)
    results: dict[int, ScoredRow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.rows)), key=lambda i: -len(self.rows[i].ids))


@dataclass
class _Admitted:
    """What the step in flight admitted: score rows per call, and joining generations."""

    scores: list[tuple[ScoreWork, list[int]]]
    joined: list[Generation]


def error_line(exc: BaseException) -> str:
    """``"Type: message"``, first line only: the error a failed row reports."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class Scheduler:
    """Admission and bookkeeping of every request (see the module docstring).

    waiting: score calls and generations not (fully) admitted, in arrival order.
    running: the decode state's rows, in its order (the backend checks ``StepPlan.state_ids``).
    """

    def __init__(self, max_batch: int = 64, max_batch_tokens: int = 4096):
        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch and max_batch_tokens must be >= 1, got {max_batch}, "
                             f"{max_batch_tokens}")
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[ScoreWork | Generation] = deque()
        self.running: list[Generation] = []
        self._step: _Admitted | None = None  # admitted by the last schedule(), until update()
        self.steps = 0
        self.last_batch_rows = 0
        self.rows_scored = 0
        self.tokens_generated = 0
        self.requests_served = 0

    # ---------------------------------------------------------------------------- queueing
    def add(self, work: ScoreWork | Generation) -> None:
        if isinstance(work, Generation):
            work.arrived_step = self.steps
        self.waiting.append(work)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing generates."""
        return not (self.waiting or self.running)

    def stats(self) -> EngineStats:
        running = sum(not g.done for g in self.running)
        waiting = sum(len(w.order) if isinstance(w, ScoreWork) else 1 for w in self.waiting)
        return EngineStats(running, waiting, self.steps, self.last_batch_rows, self.rows_scored,
                           self.tokens_generated)

    # ---------------------------------------------------------------------------- planning
    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run."""
        if self._step is not None:
            raise RuntimeError("schedule() called twice without update() or abort()")
        state = self.running
        for g in state:
            if g.cancelled and not g.done:
                self._end(g, "cancelled", g.detok.flush())
        keep = [i for i, g in enumerate(state) if not g.done]
        running = [state[i] for i in keep]
        gens: list[Generation] = []
        scores: list[tuple[ScoreWork, list[int]]] = []
        gen_lens: list[int] = []  # lengths of the new rows of each forward
        score_lens: list[int] = []

        def tokens(gen: list[int] | None = None, score: list[int] | None = None) -> int:
            """The step's tokens, padding included: decode rows, then each new-row forward
            padded to its longest row (with ``gen``/``score`` rows added)."""
            g, sc = gen_lens + (gen or []), score_lens + (score or [])
            return len(running) + len(g) * max(g, default=0) + len(sc) * max(sc, default=0)

        while self.waiting:
            item = self.waiting[0]
            busy = bool(running or gen_lens or score_lens)  # an oversized row runs alone
            if isinstance(item, Generation):
                if item.cancelled:
                    self.waiting.popleft()
                    self._end(item, "cancelled")
                    continue
                L = len(item.row.ids)
                if len(running) + len(gens) >= self.max_batch or (
                        busy and tokens(gen=[L]) > self.max_batch_tokens):
                    break
                gens.append(item)
                self.waiting.popleft()
                gen_lens.append(L)
                continue
            if item.future.cancelled():
                self.waiting.popleft()
                continue
            take: list[int] = []
            for i in item.order:  # longest first
                L = len(item.rows[i].ids)
                if len(score_lens) >= self.max_batch or (
                        (busy or take) and tokens(score=[L]) > self.max_batch_tokens):
                    break
                take.append(i)
                score_lens.append(L)
            if not take:
                break
            item.order = item.order[len(take):]
            scores.append((item, take))
            if item.order:
                break  # the rest of this call runs next step, before anything behind it
            self.waiting.popleft()
        new = running + gens
        if not scores and not new and len(keep) == len(state):
            return None
        plan = StepPlan(keep=keep if len(keep) < len(state) else None,
                        decode_ids=np.array([g.next_input for g in running], np.int64),
                        decode_samplers=[g.sampler for g in running],
                        state_ids=[g.id for g in new])
        score_rows = [w.rows[i] for w, idx in scores for i in idx]
        if score_rows:
            plan.scores = BatchPlan.build(score_rows)
        if gens:
            plan.prefill = BatchPlan.build([g.row for g in gens], score=False)
            plan.capacity = [g.capacity for g in gens]
            plan.prefill_samplers = [g.sampler for g in gens]
        self.running = new
        self._step = _Admitted(scores, gens)
        return plan

    # ---------------------------------------------------------------------------- results
    def update(self, plan: StepPlan, out: StepOutput) -> None:
        """Deliver the step's results: scores to their futures, each generating row's token."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("update() without a scheduled step")
        self.steps += 1
        self.last_batch_rows = plan.rows
        at = 0
        for work, idx in step.scores:
            for i in idx:
                work.results[i] = out.scores[at]
                at += 1
            self.rows_scored += len(idx)
            if work.on_progress is not None:
                work.on_progress(len(idx))
            if len(work.results) == len(work.rows) and not work.future.done():
                self.requests_served += len(work.rows) if work.count else 0
                work.future.set_result([work.results[i] for i in range(len(work.rows))])
        tops = out.next_top or [[] for _ in range(len(out.next_ids))]
        for g, t, lp, top in zip(self.running, out.next_ids.tolist(),
                                 out.next_logprobs.tolist(), tops):
            self.tokens_generated += 1
            if g.first_token_step is None:
                g.first_token_step = self.steps
            g.accept(t, lp, top)
            self.requests_served += g.done and g.count

    def _end(self, g: Generation, reason: str, text: str = "", error: str | None = None) -> None:
        """End ``g`` outside a step's results (cancelled, failed); it counts as served."""
        g.finish(reason, text, error=error)
        self.requests_served += g.count

    def abort(self, exc: BaseException) -> None:
        """The step failed: its score calls fail, every generating row ends with the error
        (the caller resets the backend's decode state)."""
        step, self._step = self._step, None
        for work, _ in step.scores if step is not None else []:
            _fail(work.future, exc)
        rows, self.running = self.running, []
        for g in rows:
            if not g.done:
                self._end(g, "error", error=error_line(exc))

    def cancel_all(self) -> None:
        """Cancel everything waiting (score futures cancelled, generations end ``cancelled``)
        and mark every running row cancelled (freed at the next step)."""
        for item in self.waiting:
            if isinstance(item, Generation):
                self._end(item, "cancelled")
            else:
                item.future.cancel()
        self.waiting.clear()
        for g in self.running:
            g.cancel()

    def fail_all(self, exc: BaseException) -> None:
        """End every request with ``exc`` (the engine itself failed)."""
        for item in self.waiting:
            if isinstance(item, Generation):
                self._end(item, "error", error=error_line(exc))
            else:
                _fail(item.future, exc)
        self.waiting.clear()
        self._step = None
        for g in self.running:
            if not g.done:
                self._end(g, "error", error=error_line(exc))
        self.running = []


def _fail(fut: Future[list[ScoredRow]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
