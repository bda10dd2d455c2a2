"""Results as they come: one generation's chunks as an iterator (``Stream``) or an async
iterator (``AsyncStream``), and ``then``, which chains a future without blocking a thread.

Dropping or closing a stream before its last chunk cancels its row: the engine frees it at the
next step.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from .generation import Generation, StreamChunk

T = TypeVar("T")
U = TypeVar("U")


class _StreamBase:
    """One generation's chunks as they come; dropping it unfinished cancels the row.
    wake: makes the engine look at the cancellation now."""

    def __init__(self, gen: Generation, wake: Callable[[], None]):
        self.seq = gen  # the Generation (``first_token_step`` etc. for benchmarks)
        self._wake = wake
        self._ended = False

    def _got(self, chunk: StreamChunk) -> StreamChunk:
        if chunk.finish_reason is not None:
            self._ended = True
        return chunk

    def _cancel(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        if not self._ended:
            self._ended = True
            self.seq.cancel()
            self._wake()

    def __del__(self) -> None:
        if not self._ended and self.seq.finish_reason is None:
            self.seq.cancel()


class Stream(_StreamBase):
    """Iterator of one generation's StreamChunks (see ``Runtime.stream``)."""

    def __init__(self, gen: Generation, q: queue.SimpleQueue[StreamChunk],
                 wake: Callable[[], None]):
        super().__init__(gen, wake)
        self._q = q

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        if self._ended:
            raise StopIteration
        return self._got(self._q.get())

    def close(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        self._cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamBase):
    """Async iterator of one generation's StreamChunks (see ``Runtime.stream_async``)."""

    def __init__(self, gen: Generation, q: asyncio.Queue[StreamChunk], wake: Callable[[], None]):
        super().__init__(gen, wake)
        self._q = q

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._ended:
            raise StopAsyncIteration
        try:
            chunk = await self._q.get()
        except BaseException:  # the consuming task was cancelled: free the row
            self._cancel()
            raise
        return self._got(chunk)

    async def aclose(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        self._cancel()


def then(inner: Future[T], fn: Callable[[T], U]) -> Future[U]:
    """A Future of ``fn(inner's result)``, cancelled or failed as ``inner`` is; cancelling it
    cancels ``inner`` (the engine then drops the work it has not started)."""
    outer: Future[U] = Future()
    outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)

    def done(f: Future[T]) -> None:
        if f.cancelled():
            outer.cancel()
            outer.set_running_or_notify_cancel()
        elif f.exception() is not None:
            outer.set_exception(f.exception())
        else:
            outer.set_result(fn(f.result()))

    inner.add_done_callback(done)
    return outer
