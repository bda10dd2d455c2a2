"""The engine: one thread owns the backend and schedules every request, step by step.

Callers (threads, asyncio tasks, HTTP handlers) enqueue work and wait for their own results:
score rows (``submit_scores``) and generations (``submit_generations``, one ``Sequence`` per
row). Each loop iteration is one engine step (iteration-level scheduling, as Orca and vLLM do):

1. rows that finished or were cancelled leave the decode state;
2. every running generation brings one decode token;
3. waiting work is admitted in arrival order while it fits: generations join the decode state
   (at most ``max_batch`` rows generate at once), score rows are taken up to ``max_batch`` per
   step, and the step's tokens (decode tokens + new rows x their longest length) stay within
   ``max_batch_tokens`` (a single row longer than that runs alone). A large score call is split
   over several steps, longest rows first; the work behind it waits its turn.
4. ``Backend.step`` runs it (``runtime/backend.py``) and the results are delivered: scores to
   their futures, each generation's token to its ``Sequence`` (detokenised incrementally, stop
   strings, EOS and length checked there, streamed to its sink).

So a generation that finishes leaves at once and a new one joins at the next step; running
generations decode every step whatever else waits (a flood of scores delays them by at most
one step's score forward), and scores are admitted every step whatever is generating.

Control calls that touch the backend (``call``: preparing a prompt, saving the cache) run on
the engine thread between steps, so the backend is only ever used by one thread. ``close``
stops accepting work, then drains (finishes everything accepted) or cancels it; every accepted
request ends with a result, an error or a cancellation.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backend import StepPlan
from .plan import BatchPlan
from .requests import GenerateParams, Row
from .sampling import Detokenizer, Sampler


class EngineClosed(RuntimeError):
    """Work submitted after ``close()``."""


@dataclass
class StreamChunk:
    """What a generation produced in one step: ``text`` (the new final text), ``token_ids`` and
    their ``token_logprobs`` (and with ``logprobs=n`` the n most likely ``(id, log-prob)`` of
    each position in ``top_logprobs``); ``finish_reason`` (stop | eos | length | cancelled | error) on the
    last chunk, with ``error`` set for ``error``."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str | None = None
    error: str | None = None
    top_logprobs: list = field(default_factory=list)  # per token [(id, log-prob)] (logprobs=n)


class Sequence:
    """One generating row: its request, sampling, produced tokens and where chunks go.

    sink: called on the engine thread with each StreamChunk (must not block).
    """

    def __init__(self, row: Row, params: GenerateParams, tokenizer, eos_ids, sink: Callable,
                 on_done: Callable | None = None):
        self.row = row
        self.params = params
        self.sampler = Sampler(params.temperature, params.top_k, params.top_p, params.seed,
                               top_n=params.logprobs or 0)
        self.detok = Detokenizer(tokenizer, params.stop)
        self.eos_ids = eos_ids if params.stop_at_eos else frozenset()
        self.sink = sink
        self.on_done = on_done
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.next_input: int | None = None  # the token this row decodes next step
        self.arrived_step = 0  # engine steps run when it arrived, and at its first token
        self.first_token_step: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def capacity(self) -> int:
        """Own tokens this row may reach: its request plus every new token."""
        return len(self.row.ids) + self.params.max_new_tokens

    def cancel(self) -> None:
        """Free this row at the next step (its sink gets a ``cancelled`` chunk)."""
        self.cancelled = True

    def _emit(self, chunk: StreamChunk) -> None:
        try:
            self.sink(chunk)
        except Exception:  # noqa: BLE001 - a consumer that went away (closed event loop, ...)
            self.cancelled = True  # harms only its own row: it is freed at the next step

    def _finish(self, reason: str, text: str = "", ids=(), lps=(), error: str | None = None,
                tops=()):
        self.finish_reason, self.error = reason, error
        self._emit(StreamChunk(text, list(ids), list(lps), reason, error, list(tops)))
        if self.on_done is not None:
            self.on_done(self)

    def accept(self, token: int, logprob: float, top=()) -> None:
        """The token chosen for this row in a step (``top``: its position's most likely
        alternatives, when asked for): stream it and end the row when due."""
        if token in self.eos_ids:
            self._finish("eos", self.detok.flush())
            return
        self.token_ids.append(token)
        self.token_logprobs.append(logprob)
        tops = [list(top)] if self.sampler.top_n else []
        self.top_logprobs += tops
        delta = self.detok.add(token)
        if self.detok.stopped:
            self._finish("stop", delta, [token], [logprob], tops=tops)
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self._finish("length", delta + self.detok.flush(), [token], [logprob], tops=tops)
        else:
            self.next_input = token
            self._emit(StreamChunk(delta, [token], [logprob], top_logprobs=tops))


@dataclass
class _ScoreWork:
    rows: list  # Row per request, in the caller's order
    future: Future
    order: list = field(default_factory=list)  # indices still to run, longest first
    results: dict = field(default_factory=dict)
    on_progress: Callable | None = None

    def __post_init__(self):
        self.order = sorted(range(len(self.rows)), key=lambda i: -len(self.rows[i].ids))


class Engine:
    """Owns ``backend``; see the module docstring. Thread-safe."""

    def __init__(self, backend, tokenizer, max_batch: int = 64, max_batch_tokens: int = 4096):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._cv = threading.Condition()
        self._waiting: deque = deque()  # _ScoreWork | Sequence, arrival order
        self._calls: deque = deque()  # (fn, Future) to run between steps
        self._state_rows: list[Sequence] = []  # the backend's decode state, in its order
        self._closing = False
        self._drain = True
        self.steps = 0
        self.last_batch_rows = 0
        self.rows_scored = 0
        self.tokens_generated = 0
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- submitting
    def _enqueue(self, item, calls: bool = False) -> None:
        with self._cv:
            if self._closing:
                raise EngineClosed("the runtime is closed: it accepts no new requests")
            (self._calls if calls else self._waiting).append(item)
            self._cv.notify()

    def submit_scores(self, rows: list[Row], on_progress: Callable | None = None) -> Future:
        """Future of ``[(log-probs [n], is_greedy)]``, one per row, in order."""
        fut: Future = Future()
        if not rows:
            fut.set_result([])
            return fut
        self._enqueue(_ScoreWork(list(rows), fut, on_progress=on_progress))
        return fut

    def submit_generations(self, seqs: list[Sequence]) -> None:
        """Queue generating rows together: one call's rows arrive in the same step."""
        with self._cv:
            if self._closing:
                raise EngineClosed("the runtime is closed: it accepts no new requests")
            for seq in seqs:
                seq.arrived_step = self.steps
            self._waiting.extend(seqs)
            self._cv.notify()

    def call(self, fn: Callable):
        """Run ``fn()`` on the engine thread between steps; returns its result (or raises)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        self._enqueue((fn, fut), calls=True)
        return fut.result()

    def wake(self) -> None:
        """Make the loop look at cancellations now."""
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            running = sum(not s.done for s in self._state_rows)
            waiting = sum(len(w.order) if isinstance(w, _ScoreWork) else 1 for w in self._waiting)
        return {"engine_running": running, "engine_waiting": waiting, "engine_steps": self.steps,
                "engine_batch_rows": self.last_batch_rows, "rows_scored": self.rows_scored,
                "tokens_generated": self.tokens_generated}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; finish (``drain``) or cancel what was accepted; join the loop."""
        with self._cv:
            self._closing = True
            self._drain = self._drain and drain
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._calls or self._waiting or self._state_rows or self._closing):
                        self._cv.wait()
                    if self._closing and not self._drain:
                        self._cancel_all()
                    if self._closing and not (self._waiting or self._state_rows or self._calls):
                        return
                    plan, admitted = self._plan()
                while True:  # control calls, taken one at a time (never lost if one raises)
                    with self._cv:
                        if not self._calls:
                            break
                        fn, fut = self._calls.popleft()
                    _run_call(fn, fut)
                if plan is not None:
                    self._run(plan, admitted)
        except BaseException as exc:  # a bug in the loop itself: fail everything, never hang
            with self._cv:
                self._closing = True
                self._fail_all(exc)
            raise

    def _plan(self):
        """The next StepPlan (None when nothing to run) and the work it admits."""
        state = self._state_rows
        for s in state:
            if s.cancelled and not s.done:
                s._finish("cancelled", s.detok.flush())
        keep = [i for i, s in enumerate(state) if not s.done]
        running = [state[i] for i in keep]
        gens, scores = [], []  # admitted Sequences; (score work, [row indices])
        gen_lens, score_lens = [], []  # lengths of the new rows of each forward

        def tokens(gen=(), score=()) -> int:
            """The step's tokens, padding included: decode rows, then each new-row forward
            padded to its longest row (with ``gen``/``score`` rows added)."""
            g, sc = gen_lens + list(gen), score_lens + list(score)
            return len(running) + len(g) * max(g, default=0) + len(sc) * max(sc, default=0)

        while self._waiting:
            item = self._waiting[0]
            busy = bool(running or gen_lens or score_lens)  # an oversized row runs alone
            if isinstance(item, Sequence):
                if item.cancelled:
                    self._waiting.popleft()
                    item._finish("cancelled")
                    continue
                L = len(item.row.ids)
                if len(running) + len(gens) >= self.max_batch or (
                        busy and tokens(gen=[L]) > self.max_batch_tokens):
                    break
                gens.append(self._waiting.popleft())
                gen_lens.append(L)
                continue
            if item.future.cancelled():
                self._waiting.popleft()
                continue
            take = []
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
            self._waiting.popleft()
        new = running + gens
        if not scores and not new and len(keep) == len(state):
            return None, None
        plan = StepPlan(keep=keep if len(keep) < len(state) else None,
                        decode_ids=np.array([s.next_input for s in running], np.int64),
                        decode_samplers=[s.sampler for s in running])
        score_rows_list = [w.rows[i] for w, idx in scores for i in idx]
        if score_rows_list:
            plan.scores = BatchPlan.build(score_rows_list)
        if gens:
            plan.prefill = BatchPlan.build([s.row for s in gens], score=False)
            plan.capacity = [s.capacity for s in gens]
            plan.prefill_samplers = [s.sampler for s in gens]
        self._state_rows = new
        return plan, (scores, gens)

    def _run(self, plan: StepPlan, admitted) -> None:
        scores, gens = admitted
        try:
            out = self.backend.step(plan)
        except Exception as exc:  # noqa: BLE001 - this step's requests fail, the engine goes on
            err = f"{type(exc).__name__}: {exc}".splitlines()[0]
            for work, _ in scores:
                _fail(work.future, exc)
            with self._cv:
                rows, self._state_rows = self._state_rows, []
            self.backend.reset()
            for s in rows:
                if not s.done:
                    s._finish("error", error=err)
            return
        self.steps += 1
        self.last_batch_rows = len(plan.decode_ids) + (plan.scores.B if plan.scores else 0) + len(gens)
        at = 0
        for work, idx in scores:
            for i in idx:
                work.results[i] = out.scores[at]
                at += 1
            self.rows_scored += len(idx)
            if work.on_progress is not None:
                work.on_progress(len(idx))
            if len(work.results) == len(work.rows) and not work.future.done():
                work.future.set_result([work.results[i] for i in range(len(work.rows))])
        tops = out.next_top or [()] * len(out.next_ids)
        for s, t, lp, top in zip(self._state_rows, out.next_ids.tolist(),
                                 out.next_logprobs.tolist(), tops):
            self.tokens_generated += 1
            if s.first_token_step is None:
                s.first_token_step = self.steps
            s.accept(t, lp, top)

    def _cancel_all(self) -> None:
        for item in self._waiting:
            if isinstance(item, Sequence):
                item._finish("cancelled")
            else:
                item.future.cancel()
        self._waiting.clear()
        for s in self._state_rows:
            s.cancel()

    def _fail_all(self, exc: BaseException) -> None:
        err = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for item in self._waiting:
            if isinstance(item, Sequence):
                item._finish("error", error=err)
            else:
                _fail(item.future, exc)
        self._waiting.clear()
        for s in self._state_rows:
            if not s.done:
                s._finish("error", error=err)
        self._state_rows = []
        for _, fut in self._calls:
            _fail(fut, exc)
        self._calls.clear()


def _fail(fut: Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _run_call(fn, fut: Future) -> None:
    try:
        fut.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - the caller gets it
        fut.set_exception(exc)
