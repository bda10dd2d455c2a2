"""The engine: one thread owns the backend and runs every request, step by step.

Callers (threads, asyncio tasks, HTTP handlers) enqueue work and wait for their own results:
score rows (``submit_scores``) and generations (``submit_generations``, one ``Generation`` per
row). Each loop iteration is one engine step (iteration-level scheduling, as Orca and vLLM do):
the ``Scheduler`` (``scheduler.py``) plans it, ``Backend.step`` (``backend.py``) runs it, and
the scheduler delivers the results: scores to their futures, each generation's token to its
``Generation`` (``generation.py``: detokenised incrementally, stop strings, EOS and length
checked there, streamed to its sink).

Control calls that touch the backend (``call``: preparing a prompt, saving the cache, reading
its stats) run on the engine thread between steps, so the backend is only ever used by one
thread. ``close`` stops accepting work, then drains (finishes everything accepted) or cancels
it; every accepted request ends with a result, an error or a cancellation.

A backend may define two optional hooks, ``on_caller_thread`` (run on each thread that hands
the engine work, as it does) and ``on_engine_idle`` (run on the engine thread whenever it runs
out of work). The torch backend on CPU uses both to hand back that thread's OpenMP team, so the
engine thread's team is the only one while it computes (``torch_backend.release_openmp_threads``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from .backend import Backend
from .generation import Generation
from .requests import Row
from .backend import ScoredRow
from .scheduler import Scheduler, ScoreWork
from .stats import EngineStats

T = TypeVar("T")


class EngineClosed(RuntimeError):
    """Work submitted after ``close()``."""


class Engine:
    """Owns ``backend`` and its ``Scheduler``; see the module docstring. Thread-safe."""

    def __init__(self, backend: Backend, max_batch: int = 64, max_batch_tokens: int = 4096):
        self.backend = backend
        self.scheduler = Scheduler(max_batch, max_batch_tokens)
        self._cv = threading.Condition()  # guards the scheduler's queues and the flags below
        self._calls: deque[tuple[Callable[[], object], Future[object]]] = deque()
        self._closing = False
        self._drain = True
        self._on_caller = _hook(backend, "on_caller_thread")
        self._on_idle = _hook(backend, "on_engine_idle")
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- submitting
    def _check_open(self) -> None:
        if self._closing:
            raise EngineClosed("the runtime is closed: it accepts no new requests")

    def submit_scores(self, rows: list[Row], on_progress: Callable[[int], object] | None = None,
                      count: bool = True) -> Future[list[ScoredRow]]:
        """Future of ``[(log-probs [n], is_greedy)]``, one per row, in order."""
        fut: Future[list[ScoredRow]] = Future()
        if not rows:
            fut.set_result([])
            return fut
        self._caller()
        with self._cv:
            self._check_open()
            self.scheduler.add(ScoreWork(list(rows), fut, on_progress, count))
            self._cv.notify()
        return fut

    def submit_generations(self, gens: list[Generation]) -> None:
        """Queue generating rows together: one call's rows arrive in the same step."""
        self._caller()
        with self._cv:
            self._check_open()
            for g in gens:
                self.scheduler.add(g)
            self._cv.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the engine thread between steps; returns its result (or raises)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future[T] = Future()
        self._caller()
        with self._cv:
            self._check_open()
            self._calls.append((fn, fut))  # type: ignore[arg-type]
            self._cv.notify()
        return fut.result()

    def _caller(self) -> None:
        """The backend's ``on_caller_thread`` hook, on the thread handing over work (not the
        engine's own)."""
        if self._on_caller is not None and threading.current_thread() is not self._thread:
            self._on_caller()

    def wake(self) -> None:
        """Make the loop look at cancellations now."""
        with self._cv:
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            return self.scheduler.stats()

    @property
    def requests_served(self) -> int:
        """Requests finished so far (score rows, generations; warm-up excluded)."""
        return self.scheduler.requests_served

    @property
    def steps(self) -> int:
        return self.scheduler.steps

    @property
    def rows_scored(self) -> int:
        return self.scheduler.rows_scored

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
        sched = self.scheduler
        try:
            while True:
                if self._on_idle is not None:
                    with self._cv:
                        idle = not (self._calls or not sched.idle or self._closing)
                    if idle:  # once per idle spell, outside the lock
                        self._on_idle()
                with self._cv:
                    while not (self._calls or not sched.idle or self._closing):
                        self._cv.wait()
                    if self._closing and not self._drain:
                        sched.cancel_all()
                    if self._closing and sched.idle and not self._calls:
                        return
                    plan = sched.schedule()
                while True:  # control calls, taken one at a time (never lost if one raises)
                    with self._cv:
                        if not self._calls:
                            break
                        fn, fut = self._calls.popleft()
                    _run_call(fn, fut)
                if plan is None:
                    continue
                try:
                    out = self.backend.step(plan)
                except Exception as exc:  # noqa: BLE001 - this step's requests fail, not the engine
                    with self._cv:
                        sched.abort(exc)
                    self.backend.reset()
                    continue
                sched.update(plan, out)
        except BaseException as exc:  # a bug in the loop itself: fail everything, never hang
            with self._cv:
                self._closing = True
                sched.fail_all(exc)
                for _, fut in self._calls:
                    if not fut.done():
                        fut.set_exception(exc)
                self._calls.clear()
            raise


def _hook(backend: Backend, name: str) -> Callable[[], object] | None:
    """The backend's optional hook ``name`` (see the module docstring), or None."""
    fn = getattr(backend, name, None)
    return fn if callable(fn) else None


def _run_call(fn: Callable[[], object], fut: Future[object]) -> None:
    try:
        fut.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - the caller gets it
        fut.set_exception(exc)
