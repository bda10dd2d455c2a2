"""The HTTP layer: pydantic request bodies -> one Runtime call -> pydantic responses.

Every request goes through the same Runtime (and so the same engine), so concurrent HTTP
clients batch together. Blocking Runtime calls (score, classify, add/remove prompt) run in
the threadpool; completions consume the engine's token stream on the event loop, so a
timeout or a client that disconnects cancels their rows. Every non-2xx answer is OpenAI's
error object ``{"error": {"message", "type", "param", "code"}}``.

Back-pressure: at most ``max_queue`` accepted requests are in flight (counted here, exactly);
one more gets 429 with ``Retry-After``. Bodies over ``max_body_bytes`` get 413. On SIGTERM
uvicorn stops accepting, waits for every accepted request to finish, then the lifespan
shutdown drains the runtime (``Runtime.close(drain=True)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import secrets
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import anyio
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError

from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ClassifyBody, ClassifyItemResult, ClassifyResponse, CompletionChoice,
                       CompletionRequest, CompletionResponse, Deleted, ErrorInfo,
                       ErrorResponse, Logprobs, ModelCard, ModelList, ScoreBody,
                       ScoreItemResult, ScoreResponse, Usage)

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines share its format

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FINISH = {"stop": "stop", "eos": "stop", "length": "length"}  # engine -> OpenAI
ENDPOINTS = {"/v1/completions": "completions", "/v1/score": "score", "/v1/classify": "classify",
             "/v1/models": "models", "/v1/prompts": "prompts", "/health": "health",
             "/ready": "ready", "/metrics": "metrics"}


class APIError(HTTPException):
    """An error answer, rendered as OpenAI's error object. (An HTTPException, so FastAPI passes
    it through unchanged when it is raised while the body is read: the body limit.)"""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.type, self.param, self.code = type, param, code


def _error(status: int, message: str, type: str = "invalid_request_error",
           param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------ server state
class ServerState:
    """What the routes share: the runtime (once loaded), keys, limits, counters, metrics."""

    def __init__(self, runtime=None, loader: Callable[[], object] | None = None, *,
                 api_keys: Sequence[str] = (), admin_keys: Sequence[str] = (),
                 max_queue: int = 256, request_timeout: float = 600.0,
                 served_model_name: str | None = None, warmup: bool = True):
        if runtime is None and loader is None:
            raise ValueError("give a runtime or a loader")
        if max_queue < 1 or request_timeout <= 0:
            raise ValueError(f"max_queue must be >= 1 and request_timeout > 0, got "
                             f"{max_queue} and {request_timeout}")
        self.rt, self.loader, self.warm = runtime, loader, warmup
        self.api_keys = [k for k in api_keys if k]
        self.admin_keys = [k for k in admin_keys if k]
        self.max_queue, self.timeout = max_queue, request_timeout
        self.served_model_name = served_model_name
        self.ready, self.load_error = False, None
        self.on_load_error: Callable[[], None] | None = None
        self.in_flight = 0
        self.started = int(time.time())
        self.created: dict[str, int] = {}  # prompt name -> when this server added it
        self.metrics = Metrics(lambda: self.rt.stats() if self.rt is not None else None)

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

    @property
    def base_id(self) -> str:
        return self.served_model_name or str(getattr(self.rt, "model_name", None) or "base")

    def runtime(self):
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

    # ---------------------------------------------------------------- back-pressure
    def admit(self) -> None:
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

    async def guarded(self, request: Request, aw):
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
                         n_tokens: int, start):
        """A native batch call (score, classify): admitted against the queue limit, awaited
        under the timeout and the client's presence, its latency and prompt tokens recorded.
        ``start()`` makes the awaitable once admitted (it records its own queue time)."""
        self.admit()
        try:
            res = await self.guarded(request, start())
        finally:
            self.release()
        self.metrics.latency.labels(endpoint, label).observe(time.perf_counter() - t0)
        self.metrics.prompt_tokens.labels(endpoint, label).inc(n_tokens)
        return res

    def in_thread(self, endpoint: str, prompt: str, t0: float, fn, *args, **kwargs):
        """Run blocking ``fn`` in the threadpool, recording the wait for a worker."""
        def run():
            self.metrics.queue.labels(endpoint, prompt).observe(time.perf_counter() - t0)
            return fn(*args, **kwargs)

        return run_in_threadpool(run)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------- middleware
class _Edge:
    """Pure-ASGI outer layer: refuses bodies over the limit (413) and counts responses by
    endpoint and status."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = ENDPOINTS.get(path) or ("prompts" if path.startswith("/v1/prompts/") else "other")
        status = 500

        async def counted_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        too_large = APIError(413, f"request body exceeds {self.limit} bytes (--max-body-bytes)",
                             code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                await _error(413, too_large.detail, code=too_large.code)(scope, receive, counted_send)
                return
            seen = 0

            async def limited_receive():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > self.limit:
                        raise too_large
                return msg

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.responses.labels(endpoint, str(status)).inc()


class _EventStream(StreamingResponse):
    """Server-sent events that always end with ``on_close`` (close the engine stream, which
    cancels its row; release the request's slot), whether the client read everything,
    disconnected, or the response was never started."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._on_close()


# ------------------------------------------------------------------------------- the app
def create_app(runtime=None, *, loader: Callable[[], object] | None = None,
               api_keys: Sequence[str] = (), admin_keys: Sequence[str] = (),
               max_queue: int = 256, request_timeout: float = 600.0,
               max_body_bytes: int = 8 << 20, served_model_name: str | None = None,
               warmup: bool = True) -> FastAPI:
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
    """
    st = ServerState(runtime, loader, api_keys=api_keys, admin_keys=admin_keys,
                     max_queue=max_queue, request_timeout=request_timeout,
                     served_model_name=served_model_name, warmup=warmup)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # every accepted request may hold a worker thread: none waits behind the pool
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, max_queue + 8)
        loading = asyncio.ensure_future(st.start())
        try:
            yield
        finally:
            loading.cancel()
            if st.rt is not None:  # uvicorn has already waited for the accepted requests
                await run_in_threadpool(st.rt.close, drain=True)

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = st
    app.add_middleware(_Edge, max_body_bytes=max_body_bytes, metrics=st.metrics)

    # -------------------------------------------------------------------- errors, one shape
    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        if isinstance(exc, APIError):
            return _error(exc.status_code, exc.detail, exc.type, exc.param, exc.code, exc.headers)
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _error(400, *_validation_message(exc.errors()))

    @app.exception_handler(RequestError)
    @app.exception_handler(SoftPromptError)
    async def _bad_request(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("softprompt: unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    # ---------------------------------------------------------------------------- keys
    def _bearer(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _matches(key: str | None, keys: list[str]) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)

    async def require_key(request: Request) -> None:
        if not (st.api_keys or st.admin_keys):
            return
        key = _bearer(request)
        if not _matches(key, st.api_keys + st.admin_keys):
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'" if key is None
                           else "invalid API key", code="invalid_api_key")

    async def require_admin(request: Request) -> None:
        if not (st.api_keys or st.admin_keys):
            return
        await require_key(request)
        if not _matches(_bearer(request), st.admin_keys):
            raise APIError(403, "adding and removing prompts needs the admin key (--admin-key)",
                           type="permission_error", code="admin_key_required")

    # ----------------------------------------------------------------------------- health
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        st.runtime()
        return {"status": "ready", "model": st.base_id, "prompts": sorted(st.rt.prompts)}

    @app.get("/metrics")
    async def metrics():
        return Response(await run_in_threadpool(st.metrics.render), media_type=CONTENT_TYPE)

    # ----------------------------------------------------------------------------- models
    def _card(name: str | None) -> ModelCard:
        base = st.base_id
        if name is None:
            return ModelCard(id=base, created=st.started, num_virtual_tokens=0, base_model=base,
                             root=base)
        return ModelCard(id=name, created=st.created.get(name, st.started), base_model=base,
                         num_virtual_tokens=st.rt.prompts[name].num_virtual_tokens,
                         root=base, parent=base)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> ModelList:
        st.runtime()
        return ModelList(data=[_card(None)] + [_card(n) for n in sorted(st.rt.prompts)])

    @app.get("/v1/models/{name:path}", dependencies=[Depends(require_key)])
    async def model(name: str) -> ModelCard:
        st.runtime()
        return _card(st.prompt_for(name))

    # ---------------------------------------------------------------- prompts (admin)
    @app.post("/v1/prompts", dependencies=[Depends(require_admin)])
    async def add_prompt(name: str = Form(...), file: list[UploadFile] = File(...)) -> ModelCard:
        """Add or replace prompt ``name`` from an uploaded ``.safetensors`` file, or from a
        PEFT adapter's two files (adapter_config.json + adapter_model.safetensors). Nothing
        uploaded is ever unpickled."""
        rt = st.runtime()
        if not PROMPT_NAME.fullmatch(name) or name == st.base_id:
            raise APIError(400, f"invalid prompt name {name!r}: expected 1-128 characters of "
                           "letters, digits, '.', '_', '-', not the base model's name",
                           param="name")
        names = sorted(Path(f.filename or "").name for f in file)
        peft = ["adapter_config.json", "adapter_model.safetensors"]
        if names != peft and not (len(names) == 1 and names[0].endswith(".safetensors")):
            raise APIError(400, f"unsupported upload {names}: expected one .safetensors file or "
                           "a PEFT adapter's adapter_config.json + adapter_model.safetensors",
                           param="file")
        with tempfile.TemporaryDirectory(prefix="softprompt-upload-") as tmp:
            for f in file:
                (Path(tmp) / Path(f.filename).name).write_bytes(await f.read())
            source = tmp if names == peft else Path(tmp) / names[0]
            sp = await run_in_threadpool(rt.add_prompt, name, source)
        st.created[name] = int(time.time())
        log.info("softprompt: prompt %r added (P=%d)", name, sp.num_virtual_tokens)
        return _card(name)

    @app.delete("/v1/prompts/{name}", dependencies=[Depends(require_admin)])
    async def delete_prompt(name: str) -> Deleted:
        rt = st.runtime()
        try:
            await run_in_threadpool(rt.remove_prompt, name)
        except KeyError:
            raise APIError(404, f"prompt {name!r} not found; known: {sorted(rt.prompts)}",
                           param="name", code="model_not_found") from None
        st.created.pop(name, None)
        return Deleted(id=name)

    # ---------------------------------------------------------------------- score, classify
    @app.post("/v1/score", dependencies=[Depends(require_key)])
    async def score(body: ScoreBody, request: Request) -> ScoreResponse:
        """``Runtime.score`` over the items (its asyncio form: no worker thread); a bad item
        gets its own ``error``."""
        rt = st.runtime()
        t0 = time.perf_counter()
        names = {r.prompt for r in body.requests}
        label = "mixed" if len(names) > 1 else (names.pop() or st.base_id)
        if label not in rt.prompts and label not in ("mixed", st.base_id):
            label = "unknown"  # metric labels stay bounded by the registered prompts
        items = [r.model_dump() for r in body.requests]
        n_tokens = sum(_count(rt, r.context, True) + _count(rt, r.continuation, False)
                       for r in body.requests)
        async def run():
            st.metrics.queue.labels("score", label).observe(time.perf_counter() - t0)
            return await rt.score_async(items, errors="return")

        res = await st.batch_call(request, "score", label, t0, n_tokens, run)
        return ScoreResponse(data=[
            ScoreItemResult(index=i, error=r.error) if r.error else
            ScoreItemResult(index=i, logprob=r.logprob, token_logprobs=r.token_logprobs,
                            tokens=r.tokens, is_greedy=getattr(r, "is_greedy", None))
            for i, r in enumerate(res)], usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens))

    @app.post("/v1/classify", dependencies=[Depends(require_key)])
    async def classify(body: ClassifyBody, request: Request) -> ClassifyResponse:
        """``Runtime.classify(prompt, contexts, labels)`` (its asyncio form); a bad context gets
        its own ``error``."""
        rt = st.runtime()
        t0 = time.perf_counter()
        prompt = None if body.prompt is None else st.prompt_for(body.prompt, "prompt")
        label = prompt or st.base_id
        contexts = [body.contexts] if isinstance(body.contexts, str) else body.contexts
        n_tokens = sum(_count(rt, c, True) for c in contexts)
        async def run():
            st.metrics.queue.labels("classify", label).observe(time.perf_counter() - t0)
            return await rt.classify_async(prompt, contexts, body.labels, errors="return")

        res = await st.batch_call(request, "classify", label, t0, n_tokens, run)
        return ClassifyResponse(data=[
            ClassifyItemResult(index=i, error=r.error) if r.error else
            ClassifyItemResult(index=i, label=r.label, probs=r.probs, logprobs=r.logprobs)
            for i, r in enumerate(res)])

    # ----------------------------------------------------------------------- completions
    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        rt = st.runtime()
        t0 = time.perf_counter()
        prompt = st.prompt_for(body.model)
        bad = body.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0])
        inputs = _inputs(rt, body.prompt)
        if body.stream and len(inputs) != 1:
            raise APIError(400, f"stream=true takes one prompt, got {len(inputs)}", param="prompt")
        job = _Completion(st, rt, prompt, body, t0)
        st.admit()
        if not body.stream:
            try:
                choices = await st.guarded(request, asyncio.gather(
                    *(job.complete(i, text, ids) for i, (text, ids) in enumerate(inputs))))
            finally:
                st.release()
            job.done()
            return job.response(choices)
        try:
            events = await job.start_stream(*inputs[0])
        except BaseException:
            st.release()
            raise

        return _EventStream(events, job.finish)

    return app


# -------------------------------------------------------------------------- completions
class _Completion:
    """One /v1/completions request: echo scoring, the engine's token stream, metrics."""

    def __init__(self, st: ServerState, rt, prompt: str | None, body: CompletionRequest, t0: float):
        self.st, self.rt, self.prompt, self.body, self.t0 = st, rt, prompt, body, t0
        self.label = prompt or st.base_id
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.first_token = None
        self.prompt_tokens = self.completion_tokens = 0
        self.it = None
        self._finished = False
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = body.seed if body.seed is not None else (
            secrets.randbits(31) if body.temperature > 0 else 0)
        self.params = dict(max_new_tokens=body.max_tokens, temperature=body.temperature,
                           top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                           top_p=body.top_p if body.top_p < 1 else None, seed=seed, stop=stop,
                           stop_at_eos=not body.ignore_eos, logprobs=body.logprobs)

    def _metrics(self, n: int) -> None:
        if n and self.first_token is None:
            self.first_token = time.perf_counter()
            self.st.metrics.ttft.labels("completions", self.label).observe(self.first_token - self.t0)
        self.completion_tokens += n
        self.st.metrics.generation_tokens.labels("completions", self.label).inc(n)

    def done(self) -> None:
        m = self.st.metrics
        m.latency.labels("completions", self.label).observe(time.perf_counter() - self.t0)
        m.prompt_tokens.labels("completions", self.label).inc(self.prompt_tokens)

    def _logprobs(self, ids: list[int], lps: list, offset: int, tops=None) -> Logprobs:
        """OpenAI's logprobs object; tops: per token [(id, log-prob)] (None: echoed tokens)."""
        decode = self.rt.tokenizer.decode
        tokens = [decode([i]) for i in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [None] * len(ids) if tops is None else [{decode([i]): v for i, v in t} for t in tops]
        return Logprobs(tokens=tokens, token_logprobs=lps, text_offset=offsets, top_logprobs=top)

    async def _echo(self, text: str, ids: list[int]) -> tuple[str, Logprobs | None]:
        """The prompt's own text and (with logprobs) its per-token log-probs, as OpenAI's echo
        returns them: null for a first token nothing predicts (no soft prompt)."""
        if self.body.logprobs is None:
            return text, None
        P = self.rt.prompts[self.prompt].num_virtual_tokens if self.prompt else 0
        lps: list = [None] * len(ids)
        if P or len(ids) > 1:
            res = (await self.st.in_thread("completions", self.label, self.t0, self.rt.score,
                                           [{"prompt": self.prompt, "context": ids}],
                                           errors="return"))[0]
            if res.error:
                raise APIError(400, res.error, param="prompt")
            lps = ([] if P else [None]) + list(res.token_logprobs)
        return text, self._logprobs(ids, lps, 0)

    def _stream(self, ids: list[int]):
        self.st.metrics.queue.labels("completions", self.label).observe(time.perf_counter() - self.t0)
        return self.rt.stream_async(self.prompt, ids, **self.params)

    async def complete(self, index: int, text: str, ids: list[int]) -> CompletionChoice:
        self.prompt_tokens += len(ids)
        out, lp = ("", None)
        if self.body.echo:
            out, lp = await self._echo(text, ids)
        finish, gen_ids, gen_lps, gen_tops, gen_start = "length", [], [], [], len(out)
        if self.body.max_tokens > 0:
            it = self._stream(ids)
            try:
                async for chunk in it:
                    _check(chunk)
                    self._metrics(len(chunk.token_ids))
                    out += chunk.text
                    gen_ids += chunk.token_ids
                    gen_lps += chunk.token_logprobs
                    gen_tops += chunk.top_logprobs
                    finish = chunk.finish_reason or finish
            except (RequestError, SoftPromptError) as e:
                raise APIError(400, str(e), param="prompt") from None
            finally:
                await _aclose(it)
        if self.body.logprobs is not None:
            gen = self._logprobs(gen_ids, gen_lps, gen_start, gen_tops)
            lp = gen if lp is None else Logprobs(
                tokens=lp.tokens + gen.tokens, token_logprobs=lp.token_logprobs + gen.token_logprobs,
                text_offset=lp.text_offset + gen.text_offset,
                top_logprobs=lp.top_logprobs + gen.top_logprobs)
        return CompletionChoice(index=index, text=out, logprobs=lp,
                                finish_reason=FINISH.get(finish, "stop"))

    def response(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                  choices=choices, usage=self._usage())

    def _usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def _event(self, text: str, lp: Logprobs | None, finish: str | None) -> str:
        chunk = CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                   choices=[CompletionChoice(index=0, text=text, logprobs=lp,
                                                             finish_reason=finish)])
        return f"data: {chunk.model_dump_json()}\n\n"

    async def start_stream(self, text: str, ids: list[int]):
        """Echo, then the first engine chunk (so a bad request still gets its 4xx status);
        returns the event generator."""
        self.prompt_tokens += len(ids)
        head = await self._echo(text, ids) if self.body.echo else ("", None)
        first = None
        if self.body.max_tokens > 0:
            self.it = self._stream(ids)
            try:
                first = await asyncio.wait_for(anext(self.it), self.st.timeout)
            except (RequestError, SoftPromptError) as e:
                await self.aclose()
                raise APIError(400, str(e), param="prompt") from None
            except (asyncio.TimeoutError, StopAsyncIteration):
                await self.aclose()
                raise APIError(504, f"no token within {self.st.timeout:g} s (--request-timeout)",
                               type="timeout", code="timeout") from None
            except BaseException:
                await self.aclose()
                raise
        return self._events(head, first)

    async def _events(self, head, first):
        deadline = self.t0 + self.st.timeout
        offset = len(head[0])
        if self.body.echo:
            yield self._event(head[0], head[1], None if first else "length")
        chunk = first
        while chunk is not None:
            if chunk.finish_reason in ("error", "cancelled"):
                yield f"data: {_engine_error(chunk).model_dump_json()}\n\n"
                break
            self._metrics(len(chunk.token_ids))
            lp = None
            if self.body.logprobs is not None:
                lp = self._logprobs(chunk.token_ids, list(chunk.token_logprobs), offset,
                                    chunk.top_logprobs)
            offset += len(chunk.text)
            finish = FINISH.get(chunk.finish_reason, "stop") if chunk.finish_reason else None
            yield self._event(chunk.text, lp, finish)
            if finish:
                break
            try:
                chunk = await asyncio.wait_for(anext(self.it), max(deadline - time.perf_counter(), 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                err = ErrorResponse(error=ErrorInfo(
                    message=f"request timed out after {self.st.timeout:g} s (--request-timeout)",
                    type="timeout", code="timeout"))
                yield f"data: {err.model_dump_json()}\n\n"
                break
        if self.body.stream_options and self.body.stream_options.include_usage:
            usage = CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                       choices=[], usage=self._usage())
            yield f"data: {usage.model_dump_json()}\n\n"
        await self.finish()  # the slot is free before the client can see [DONE] and send again
        yield "data: [DONE]\n\n"

    async def aclose(self) -> None:
        if self.it is not None:
            await _aclose(self.it)

    async def finish(self) -> None:
        """End a streamed request once: close its engine stream (a running row is cancelled),
        free its queue slot, record its metrics."""
        if self._finished:
            return
        self._finished = True
        await self.aclose()
        self.st.release()
        self.done()


def _engine_error(chunk) -> ErrorResponse:
    """The error object for a generation the engine ended with an error or cancelled (the
    runtime is closing without draining)."""
    if chunk.finish_reason == "cancelled":
        return ErrorResponse(error=ErrorInfo(message="generation cancelled: the server is "
                                             "shutting down", type="service_unavailable",
                                             code="cancelled"))
    return ErrorResponse(error=ErrorInfo(message=f"generation failed: {chunk.error}",
                                         type="server_error", code="engine_error"))


def _check(chunk) -> None:
    if chunk.finish_reason in ("error", "cancelled"):
        e = _engine_error(chunk).error
        raise APIError(503 if chunk.finish_reason == "cancelled" else 500, e.message, e.type,
                       code=e.code)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def _inputs(rt, prompt) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt of a completion request (text, texts, ids, or id lists)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty: expected a string, a list of strings, or token ids",
                       param="prompt")
    V = getattr(rt.backend, "vocab_size", None)
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, rt.tokenizer.encode(p, True)))
            continue
        bad = [i for i in p if i < 0 or (V is not None and i >= V)]
        if bad:
            raise APIError(400, f"prompt has token ids outside [0, {V}): {bad[:5]}", param="prompt")
        out.append((rt.tokenizer.decode(p), list(p)))
    return out


def _count(rt, value, special: bool) -> int:
    """Tokens in a text or id list (0 for None)."""
    if value is None:
        return 0
    return len(rt.tokenizer.encode(value, special)) if isinstance(value, str) else len(value)


def _validation_message(errors: list[dict]) -> tuple[str, str, str | None]:
    """(message, type, param) for the first pydantic error, naming the field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail})", "invalid_request_error", None
    if kind == "extra_forbidden":
        return f"unknown field {field!r}", "invalid_request_error", loc[-1] if loc else None
    if kind == "missing":
        return f"missing required field {field!r}", "invalid_request_error", loc[0] if loc else None
    if field is None:
        return ("request body must be a JSON object sent with 'Content-Type: application/json'",
                "invalid_request_error", None)
    got = repr(e.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{field}: {e.get('msg')} (got {got})", "invalid_request_error", loc[0] if loc else None


# ------------------------------------------------------------------------------- running
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
