"""Serving ``POST /v1/completions`` (the route is ``routes/completions.py``), like vLLM's
``serving_completion.py``: the request's prompts validated by the runtime (``Runtime.check``),
echo scoring, the engine's token stream turned into OpenAI choices or server-sent events,
usage and metrics.

Non-streaming: every prompt's stream is consumed on the event loop under the request timeout
and the client's presence (``ServerState.guarded``), so either cancels its rows. Streaming: the
echo and the first engine chunk come before the response starts (a bad request still gets its
4xx status); after that an error or a timeout is an error event, then ``[DONE]``. The request's
queue slot is freed once, whichever way it ends (``CompletionJob.finish``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import GenerateParams, RequestError, Row

from .errors import APIError, error_event
from .inline import NEEDS_A_TOKEN, is_inline, label_of
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, ErrorInfo, Logprobs, Usage
from .state import ServerState

FINISH = {"stop": "stop", "eos": "stop", "length": "length"}  # engine -> OpenAI
PARAMS = {"max_new_tokens": "max_tokens", "stop_at_eos": "ignore_eos"}  # runtime -> OpenAI names


def prompt_rows(rt, prompt: Any, body: CompletionRequest) -> list[tuple[str, Row]]:
    """(text, Row) per prompt of the request (a text, texts, ids, or id lists), each validated
    by the runtime as it will run: under ``prompt`` (a name, None, or an inline prompt object),
    with ``max_tokens`` new positions (so every path, ``max_tokens: 0`` and echo included, is
    checked against the model's positions)."""
    inline = is_inline(prompt)
    if body.prompt is None:
        raise APIError(400, "missing required field 'prompt'" + (f" ({NEEDS_A_TOKEN})" if inline
                                                                  else ""), param="prompt")
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty: expected a string, a list of strings, or token ids"
                       + (f" ({NEEDS_A_TOKEN})" if inline else ""), param="prompt")
    out = []
    for p in prompts:
        try:
            row = rt.check({"prompt": prompt, "context": p}, extra_positions=body.max_tokens)
        except (RequestError, SoftPromptError) as e:
            msg = str(e)
            if inline and msg.startswith("empty context"):
                msg = f"empty prompt: expected at least one token ({NEEDS_A_TOKEN})"
            raise APIError(400, msg, param="prompt") from None
        out.append((p if isinstance(p, str) else rt.tokenizer.decode(row.ids), row))
    return out


def sampling_params(body, max_tokens: int, logprobs: int | None) -> dict:
    """The runtime's generation arguments of a completions or chat body (its ``stop``,
    ``seed``, ``temperature``, ``top_k``, ``top_p``, ``ignore_eos``): without a seed, a sampled
    request draws a fresh one."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = body.seed if body.seed is not None else (
        secrets.randbits(31) if body.temperature > 0 else 0)
    return dict(max_new_tokens=max_tokens, temperature=body.temperature,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                top_p=body.top_p if body.top_p < 1 else None, seed=seed, stop=stop,
                stop_at_eos=not body.ignore_eos, logprobs=logprobs)


@dataclass
class Generated:
    """Everything one row generated (``CompletionJob._collect``)."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list = field(default_factory=list)
    finish: str = "length"


class CompletionJob:
    """One /v1/completions request: echo scoring, the engine's token stream, usage, metrics.
    ``ChatJob`` (chat.py) reuses it, changing only what goes out (``_params``, ``complete``,
    ``response``, and the streamed events: ``_head``, ``_head_events``, ``_chunk_event``,
    ``_usage_event``)."""

    endpoint = "completions"  # the metrics' endpoint label
    id_prefix = "cmpl-"
    param = "prompt"  # the field a request error names

    def __init__(self, st: ServerState, rt, prompt: Any, body: CompletionRequest, t0: float):
        self.st, self.rt, self.prompt, self.body, self.t0 = st, rt, prompt, body, t0
        self.label = label_of(prompt, st.base_id)
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.first_token: float | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.it = None
        self._finished = False
        self.params = self._params()
        if self.params["max_new_tokens"] > 0:  # the runtime's own check of the settings, before any work
            try:
                GenerateParams(**self.params)
            except RequestError as e:
                name = str(e).split(" ", 1)[0]
                raise APIError(400, str(e), param=PARAMS.get(name, name)) from None

    def _params(self) -> dict:
        return sampling_params(self.body, self.body.max_tokens, self.body.logprobs)

    # ------------------------------------------------------------------------ metrics
    def _generated(self, n: int) -> None:
        if n and self.first_token is None:
            self.first_token = time.perf_counter()
            self.st.metrics.ttft.labels(self.endpoint, self.label).observe(self.first_token - self.t0)
        self.completion_tokens += n
        self.st.metrics.generation_tokens.labels(self.endpoint, self.label).inc(n)

    def _queued(self) -> None:
        self.st.metrics.queue.labels(self.endpoint, self.label).observe(time.perf_counter() - self.t0)

    def done(self) -> None:
        m = self.st.metrics
        m.latency.labels(self.endpoint, self.label).observe(time.perf_counter() - self.t0)
        m.prompt_tokens.labels(self.endpoint, self.label).inc(self.prompt_tokens)

    # ----------------------------------------------------------------------- pieces
    def _logprobs(self, ids: list[int], lps: list, offset: int, tops: list) -> Logprobs:
        """OpenAI's logprobs object; tops: per token its [(id, log-prob)] alternatives, or None
        (a first prompt token nothing predicts); empty with ``logprobs: 0``."""
        decode = self.rt.tokenizer.decode
        tops = tops or [[] for _ in ids]  # logprobs=0: no alternatives, an empty dict per token
        tokens = [decode([i]) for i in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [None if t is None else {decode([i]): v for i, v in t} for t in tops]
        return Logprobs(tokens=tokens, token_logprobs=lps, text_offset=offsets, top_logprobs=top)

    async def _echo(self, text: str, row: Row) -> tuple[str, Logprobs | None]:
        """The prompt's own text and (with logprobs) its per-token log-probs and ``logprobs``
        most likely alternatives, from one scoring forward, as OpenAI's echo returns them: null
        for a first token nothing predicts (no soft prompt)."""
        n = self.body.logprobs
        if n is None:
            return text, None
        P = row.num_virtual
        lps: list = [None] * len(row.ids)
        tops: list = [None] * len(row.ids)
        if P or len(row.ids) > 1:
            self._queued()
            res = (await self.rt.score_async(
                [{"prompt": self.prompt, "context": row.ids, "top_logprobs": n}],
                errors="return"))[0]
            if res.error:
                raise APIError(400, res.error, param="prompt")
            alts = res.top_logprobs or [[] for _ in res.token_logprobs]  # logprobs=0: none
            lps = ([] if P else [None]) + list(res.token_logprobs)
            tops = ([] if P else [None]) + list(alts)
        return text, self._logprobs(row.ids, lps, 0, tops)

    def _stream(self, row: Row):
        self._queued()
        return self.rt.stream_async(self.prompt, row.ids, **self.params)

    def _usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    # --------------------------------------------------------------- non-streaming
    async def _collect(self, row: Row) -> Generated:
        """Every token the row generates (none with ``max_tokens: 0``), consumed from its
        engine stream."""
        g = Generated()
        if self.params["max_new_tokens"] > 0:
            it = self._stream(row)
            try:
                async for chunk in it:
                    _check(chunk)
                    self._generated(len(chunk.token_ids))
                    g.text += chunk.text
                    g.ids += chunk.token_ids
                    g.lps += chunk.token_logprobs
                    g.tops += chunk.top_logprobs
                    g.finish = chunk.finish_reason or g.finish
            except (RequestError, SoftPromptError) as e:
                raise APIError(400, str(e), param=self.param) from None
            finally:
                await _aclose(it)
        return g

    async def complete(self, index: int, text: str, row: Row) -> CompletionChoice:
        """One prompt's choice: echo, then every generated token."""
        self.prompt_tokens += len(row.ids)
        out, lp = ("", None)
        if self.body.echo:
            out, lp = await self._echo(text, row)
        gen_start = len(out)
        g = await self._collect(row)
        out += g.text
        finish = g.finish
        if self.body.logprobs is not None:
            gen = self._logprobs(g.ids, g.lps, gen_start, g.tops)
            lp = gen if lp is None else Logprobs(
                tokens=lp.tokens + gen.tokens, token_logprobs=lp.token_logprobs + gen.token_logprobs,
                text_offset=lp.text_offset + gen.text_offset,
                top_logprobs=(lp.top_logprobs or []) + (gen.top_logprobs or []))
        return CompletionChoice(index=index, text=out, logprobs=lp,
                                finish_reason=FINISH.get(finish, "stop"))

    def response(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                  choices=choices, usage=self._usage())

    # ------------------------------------------------------------------- streaming
    def _event(self, text: str, lp: Logprobs | None, finish: str | None) -> str:
        chunk = CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                   choices=[CompletionChoice(index=0, text=text, logprobs=lp,
                                                             finish_reason=finish)])
        return f"data: {chunk.model_dump_json()}\n\n"

    async def start_stream(self, text: str, row: Row):
        """Echo, then the first engine chunk (so a bad request still gets its 4xx status);
        returns the event generator."""
        self.prompt_tokens += len(row.ids)
        head = await self._head(text, row)
        first = None
        if self.params["max_new_tokens"] > 0:
            self.it = self._stream(row)
            try:
                first = await asyncio.wait_for(anext(self.it), self.st.timeout)
            except (RequestError, SoftPromptError) as e:
                await self.aclose()
                raise APIError(400, str(e), param=self.param) from None
            except (asyncio.TimeoutError, StopAsyncIteration):
                await self.aclose()
                raise APIError(504, f"no token within {self.st.timeout:g} s (--request-timeout)",
                               type="timeout", code="timeout") from None
            except BaseException:
                await self.aclose()
                raise
        return self._events(head, first)

    async def _head(self, text: str, row: Row) -> tuple[str, Logprobs | None]:
        """What is computed before the first engine chunk: the echo."""
        return await self._echo(text, row) if self.body.echo else ("", None)

    def _head_events(self, head, first) -> list[str]:
        """The events before the first engine chunk's: the echo."""
        return [self._event(head[0], head[1], None if first else "length")] if self.body.echo else []

    def _chunk_event(self, chunk, offset: int, finish: str | None) -> str:
        """The event of one engine chunk (``offset``: its first character in the text)."""
        lp = None
        if self.body.logprobs is not None:
            lp = self._logprobs(chunk.token_ids, list(chunk.token_logprobs), offset,
                                chunk.top_logprobs)
        return self._event(chunk.text, lp, finish)

    def _usage_event(self) -> str:
        usage = CompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                   choices=[], usage=self._usage())
        return f"data: {usage.model_dump_json()}\n\n"

    async def _events(self, head, first):
        deadline = self.t0 + self.st.timeout
        offset = len(head[0])
        for event in self._head_events(head, first):
            yield event
        chunk = first
        while chunk is not None:
            if chunk.finish_reason in ("error", "cancelled"):
                yield error_event(_engine_error(chunk).info())
                break
            self._generated(len(chunk.token_ids))
            finish = FINISH.get(chunk.finish_reason, "stop") if chunk.finish_reason else None
            yield self._chunk_event(chunk, offset, finish)
            offset += len(chunk.text)
            if finish:
                break
            try:
                chunk = await asyncio.wait_for(anext(self.it), max(deadline - time.perf_counter(), 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                yield error_event(ErrorInfo(
                    message=f"request timed out after {self.st.timeout:g} s (--request-timeout)",
                    type="timeout", code="timeout"))
                break
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._usage_event()
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


class EventStream(StreamingResponse):
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
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._on_close()


async def run_completion(st: ServerState, job: CompletionJob, request: Request,
                         inputs: list[tuple[str, Row]]):
    """Admit the request against the queue limit and run it: the whole response, or (stream)
    an ``EventStream`` that releases the slot when it ends."""
    st.admit()
    if not job.body.stream:
        try:
            choices = await st.guarded(request, asyncio.gather(
                *(job.complete(i, text, row) for i, (text, row) in enumerate(inputs))))
        finally:
            st.release()
        job.done()
        return job.response(choices)
    try:
        events = await job.start_stream(*inputs[0])
    except BaseException:
        st.release()
        raise
    return EventStream(events, job.finish)


def _engine_error(chunk) -> APIError:
    """The error for a generation the engine ended with an error or cancelled (the runtime is
    closing without draining)."""
    if chunk.finish_reason == "cancelled":
        return APIError(503, "generation cancelled: the server is shutting down",
                        type="service_unavailable", code="cancelled")
    return APIError(500, f"generation failed: {chunk.error}", type="server_error",
                    code="engine_error")


def _check(chunk) -> None:
    if chunk.finish_reason in ("error", "cancelled"):
        raise _engine_error(chunk)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()
