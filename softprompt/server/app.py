"""The app: ``create_app`` builds the FastAPI application over one Runtime, and ``serve`` runs
it under uvicorn.

``create_app`` puts a ``ServerState`` (state.py: the runtime, keys, limits, metrics) on
``app.state.server``, wraps the app in the body-limit/response-counting edge (middleware.py),
installs the one error shape (errors.py) and includes the routers (routes/). Every request goes
through the same Runtime (and so the same engine), so concurrent HTTP clients batch together.

Lifetime: the lifespan starts loading the model in a thread (/health answers meanwhile; /ready
turns 200 once it is loaded and warmed up). On SIGTERM uvicorn stops accepting, waits for every
accepted request to finish, then the lifespan shutdown drains the runtime
(``Runtime.close(drain=True)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
from fastapi import FastAPI

from softprompt.runtime.adapters import MAX_INLINE_BYTES
from softprompt.runtime.prompts import SoftPromptError

from . import errors
from .errors import APIError
from .middleware import Edge
from .routes import ROUTERS
from .state import ServerState


def create_app(runtime=None, *, loader: Callable[[], Any] | None = None,
               api_keys: Sequence[str] = (), admin_keys: Sequence[str] = (),
               max_queue: int = 256, request_timeout: float = 600.0,
               max_body_bytes: int = 8 << 20, served_model_name: str | None = None,
               warmup: bool = True, watch_dir: str | Path | None = None,
               watch_interval: float = 2.0, max_inline_bytes: int = MAX_INLINE_BYTES) -> FastAPI:
    """The FastAPI app over one Runtime.

    runtime: a loaded Runtime, or loader: a callable that returns one (run in a thread after
        the server starts, so /health answers while a large model loads; /ready turns 200
        once it is loaded and warmed up).
    api_keys: bearer keys accepted on /v1/* (none: no key needed). admin_keys: keys that may
        also add and remove prompts (when any key is set, only these may).
    max_queue: accepted requests in flight at most; one more gets 429 with Retry-After.
    request_timeout: seconds per request; a completion past it is cancelled (504).
    max_body_bytes: larger request bodies get 413.
    served_model_name: the base model's id in /v1/models (default: the runtime's model name).
    warmup: run ``Runtime.warmup()`` before /ready turns 200.
    watch_dir: serve the prompts in this directory as it changes, polled every
        ``watch_interval`` seconds once ready (``watch.py``).
    max_inline_bytes: the most decoded bytes one inline prompt (``soft_prompt`` or
        ``prompt_embeds``, ``inline.py``) may have; larger gets 413. The body limit applies
        first: base64 makes a prompt of N bytes about 4N/3 bytes of body.
    """
    st = ServerState(runtime, loader, api_keys=api_keys, admin_keys=admin_keys,
                     max_queue=max_queue, request_timeout=request_timeout,
                     served_model_name=served_model_name, warmup=warmup,
                     max_inline_bytes=max_inline_bytes)

    watcher = None
    if watch_dir is not None:
        from .watch import PromptWatcher

        watcher = PromptWatcher(st, watch_dir, watch_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # every accepted request may hold a worker thread: none waits behind the pool
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, max_queue + 8)
        loading = asyncio.ensure_future(st.start())
        watching = asyncio.ensure_future(watcher.run()) if watcher is not None else None
        try:
            yield
        finally:
            loading.cancel()
            if watching is not None:
                watching.cancel()
            await st.close()

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = st
    app.state.watcher = watcher
    app.add_middleware(Edge, max_body_bytes=max_body_bytes, metrics=st.metrics)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def prompt_dir_sources(directory) -> list[tuple[str, Path]]:
    """(name, source) for each soft prompt in ``directory``: every PEFT adapter subdirectory
    and every .safetensors / .npy file, named after it."""
    d = Path(directory)
    if not d.is_dir():
        raise SoftPromptError(f"--prompt-dir {d} is not a directory")
    out = []
    for p in sorted(d.iterdir()):
        if p.is_dir() and (p / "adapter_config.json").is_file():
            out.append((p.name, p))
        elif p.is_file() and p.suffix.lower() in (".safetensors", ".npy"):
            out.append((p.stem, p))
    return out


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          access_log: bool = False, graceful_timeout: float | None = None) -> int:
    """Run ``app`` under uvicorn until SIGINT/SIGTERM. SIGTERM is a graceful stop: no new
    connections, every accepted request finishes, the runtime drains, exit status 0.
    Returns 1 when the model failed to load."""
    import uvicorn

    st: ServerState = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_graceful_shutdown=graceful_timeout,
                            lifespan="on")
    server = uvicorn.Server(config)
    st.on_load_error = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal that stopped it once it has shut down; for SIGTERM that
    # would end the process "killed by signal" after a clean drain: make it exit 0 instead.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if st.load_error else 0


__all__ = ["create_app", "serve", "prompt_dir_sources", "APIError", "ServerState"]
