"""MicroBatcher: gather concurrent single score requests into batches for a Runtime.

A worker thread waits for the first request, then keeps gathering until ``max_batch``
requests are queued or ``max_wait_ms`` has passed since that first one, and runs them as one
``score`` call. A request that fails validation fails only its own future; the others in
the gathered batch are scored. ``close(drain=True)`` finishes what is queued, ``drain=False``
cancels it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

from .requests import RequestError

_STOP = object()


class MicroBatcher:
    def __init__(self, runtime, max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got "
                             f"{max_batch} and {max_wait_ms}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self.closed = False
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self._thread.start()

    def submit(self, request) -> Future:
        """Queue one score request; the Future resolves to its ScoreResult."""
        if self._closing.is_set():
            raise RuntimeError("the micro-batcher is closed; create a new one with rt.batcher()")
        fut: Future = Future()
        self._queue.put((request, fut))
        return fut

    async def submit_async(self, request):
        return await asyncio.wrap_future(self.submit(request))

    def stats(self) -> dict:
        return {"batcher_batches": self.batches_run, "batcher_largest_batch": self.largest_batch,
                "batcher_queued": self._queue.qsize()}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; finish (drain) or cancel what is queued, then join."""
        if self.closed:
            return
        self._closing.set()
        if not drain:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[1].cancel()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self.closed = True

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch) -> None:
        live = [(req, fut) for req, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        try:
            results = self.runtime.score([req for req, _ in live], errors="return")
        except Exception as e:  # a backend failure fails this batch's futures, not the worker
            for _, fut in live:
                fut.set_exception(e)
            return
        for (_, fut), res in zip(live, results):
            if res.error is not None:
                fut.set_exception(RequestError(res.error))
            else:
                fut.set_result(res)
