"""``ServerState``: what every route shares, kept on ``app.state.server``.

It owns the runtime's life on the server (loading it off the event loop, readiness, the drain
at shutdown), the API keys, the back-pressure limit (at most ``max_queue`` accepted requests in
flight, counted here exactly; one more gets 429 with ``Retry-After``), the request timeout and
the client's presence (``guarded``), the inline-prompt limit, and the metrics. Routes read it through
``deps.server_state``; nothing here knows a route's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from softprompt.runtime.adapters import MAX_INLINE_BYTES

from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines share its format


class ServerState:
    """The runtime (once loaded), keys, limits, counters and metrics of one app.

    runtime: a loaded Runtime, or loader: a callable that returns one (``start`` runs it in a
    thread). The other arguments are ``create_app``'s.
    """

    def __init__(self, runtime=None, loader: Callable[[], Any] | None = None, *,
                 api_keys: Sequence[str] = (), admin_keys: Sequence[str] = (),
                 max_queue: int = 256, request_timeout: float = 600.0,
                 served_model_name: str | None = None, warmup: bool = True,
                 max_inline_bytes: int = MAX_INLINE_BYTES):
        if runtime is None and loader is None:
            raise ValueError("give a runtime or a loader")
        if max_queue < 1 or request_timeout <= 0:
            raise ValueError(f"max_queue must be >= 1 and request_timeout > 0, got "
                             f"{max_queue} and {request_timeout}")
        if not isinstance(max_inline_bytes, int) or isinstance(max_inline_bytes, bool) \
                or max_inline_bytes < 1:
            raise ValueError(f"max_inline_bytes must be an integer >= 1, got {max_inline_bytes!r}")
        self.rt, self.loader, self.warm = runtime, loader, warmup
        self.api_keys = [k for k in api_keys if k]
        self.admin_keys = [k for k in admin_keys if k]
        self.max_queue, self.timeout = max_queue, request_timeout
        self.served_model_name = served_model_name
        self.max_inline_bytes = max_inline_bytes  # an inline prompt's decoded bytes (inline.py)
        self.ready = False
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] | None = None
        self.in_flight = 0
        self.started = int(time.time())
        self.created: dict[str, int] = {}  # prompt name -> when this server added it
        self.metrics = Metrics(lambda: self.rt.stats() if self.rt is not None else None)

    # ------------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Load the model (when given a loader) and warm it up, off the event loop."""
        try:
            if self.rt is None:
                self.rt = await run_in_threadpool(self.loader)
            if self.warm:
                await run_in_threadpool(self.rt.warmup)
            self.ready = True
            log.info("softprompt: ready: %s, prompts %s", self.base_id, sorted(self.rt.prompts))
        except Exception as e:  # noqa: BLE001 - reported, and the server exits non-zero
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("softprompt: loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error()

    async def close(self) -> None:
        """Drain the runtime (uvicorn has already waited for the accepted requests)."""
        if self.rt is not None:
            await run_in_threadpool(self.rt.close, drain=True)

    @property
    def base_id(self) -> str:
        """The base model's id in /v1/models: --served-model-name, else the model's name."""
        return self.served_model_name or str(self.rt.info.name or "base")

    def runtime(self):
        """The runtime once loaded and warmed up; 503 with Retry-After before."""
        if not self.ready:
            msg = self.load_error or "the model is still loading; poll GET /ready"
            raise APIError(503, msg, type="service_unavailable", code="not_ready",
                           headers={"Retry-After": "5"})
        return self.rt

    def prompt_for(self, model: str, param: str = "model") -> str | None:
        """The soft prompt a request names (None: the base model); 404 for anything else."""
        if model == self.base_id:
            return None
        if model in self.rt.prompts:
            return model
        raise APIError(404, f"model {model!r} not found; expected one of the soft prompts "
                       f"{sorted(self.rt.prompts)} or the base model {self.base_id!r}",
                       param=param, code="model_not_found")

    # -------------------------------------------------------------------- back-pressure
    def admit(self) -> None:
        """Take a slot for an accepted request, or 429 when all ``max_queue`` are taken."""
        if self.in_flight >= self.max_queue:
            raise APIError(429, f"server busy: {self.in_flight} requests in flight, the limit "
                           f"is {self.max_queue} (--max-queue); retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    async def guarded(self, request: Request, aw: Awaitable):
        """Await ``aw`` under the request timeout; cancel it when the client disconnects.
        Cancelling a completion cancels its engine rows; cancelling a score or classify call
        drops its rows the engine has not computed yet."""
        task = asyncio.ensure_future(aw)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if gone in done:  # nobody will read this answer
            raise APIError(499, "client disconnected", code="client_disconnected")
        raise APIError(504, f"request timed out after {self.timeout:g} s (--request-timeout)",
                       type="timeout", code="timeout")

    async def batch_call(self, request: Request, endpoint: str, label: str, t0: float,
                         n_tokens: int, start: Callable[[], Awaitable]):
        """A native batch call (score, classify): admitted against the queue limit, awaited
        under the timeout and the client's presence, its queue time, latency and prompt tokens
        recorded. ``start()`` makes the awaitable once admitted."""
        self.admit()
        try:
            self.metrics.queue.labels(endpoint, label).observe(time.perf_counter() - t0)
            res = await self.guarded(request, start())
        finally:
            self.release()
        self.metrics.latency.labels(endpoint, label).observe(time.perf_counter() - t0)
        self.metrics.prompt_tokens.labels(endpoint, label).inc(n_tokens)
        return res


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
