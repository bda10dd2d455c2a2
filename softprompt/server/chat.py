"""Serving ``POST /v1/chat/completions`` (the route is ``routes/chat.py``), like vLLM's
``serving_chat.py``, on the completions machinery (``completion.py``: ``CompletionJob``'s
metrics, timeouts, stream consumption and server-sent events, ``run_completion``).

The conversation becomes token ids through the model's own chat template
(``Runtime.chat_ids``: the template rendered, tokenised without adding special tokens), so the
model sees ``[v_1..v_P, templated ids]`` exactly as ``Runtime.chat`` runs it; the row is then
validated by ``Runtime.check`` with its ``max_completion_tokens`` new positions. A model
without a chat template gets 400 (``code: chat_template_missing``). ``ChatJob`` only changes
the shape of what goes out: ``chat.completion`` objects, or ``chat.completion.chunk`` events
(the first one carrying ``role: assistant``), and chat logprobs (``content: [{token, logprob,
bytes, top_logprobs}]``).
"""

from __future__ import annotations

from typing import Any

from softprompt.runtime.chat import no_template_message
from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError, Row

from .chat_protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                            ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs,
                            ChatMessage, ChatTokenLogprob, TopLogprob)
from .completion import FINISH, CompletionJob, sampling_params
from .errors import APIError
from .inline import is_inline
from .state import ServerState

DEFAULT_MAX_TOKENS = 1024  # new tokens when the request names no limit (at most the positions left)


def chat_row(rt, prompt: Any, body: ChatCompletionRequest) -> tuple[Row, int]:
    """(Row, new tokens) of a chat request: the conversation through the model's chat
    template, validated by the runtime under ``prompt`` (a name, None, or an inline prompt
    object) with that many new positions."""
    if rt.tokenizer.chat_template is None:
        raise APIError(400, no_template_message(rt.tokenizer), param="model",
                       code="chat_template_missing")
    try:
        ids = rt.chat_ids(body.messages, add_generation_prompt=body.add_generation_prompt)
    except RequestError as e:
        raise APIError(400, str(e), param="messages") from None
    asked = body.max_completion_tokens or body.max_tokens
    if asked is None:
        sp = prompt if is_inline(prompt) else rt.prompts.get(prompt) if prompt is not None else None
        left = rt.info.max_positions - (sp.num_virtual_tokens if sp is not None else 0) - len(ids)
        asked = min(max(left, 1), DEFAULT_MAX_TOKENS)
    try:
        row = rt.check({"prompt": prompt, "context": ids}, extra_positions=asked)
    except (RequestError, SoftPromptError) as e:
        raise APIError(400, str(e), param="messages") from None
    return row, asked


class ChatJob(CompletionJob):
    """One /v1/chat/completions request (one conversation, one choice)."""

    endpoint = "chat"
    id_prefix = "chatcmpl-"
    param = "messages"

    def __init__(self, st: ServerState, rt, prompt: Any, body: ChatCompletionRequest,
                 t0: float, max_tokens: int):
        self.max_tokens = max_tokens
        super().__init__(st, rt, prompt, body, t0)  # type: ignore[arg-type]

    def _params(self) -> dict:
        b = self.body
        return sampling_params(b, self.max_tokens, (b.top_logprobs or 0) if b.logprobs else None)

    def _chat_logprobs(self, ids, lps, tops) -> ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        decode = self.rt.tokenizer.decode

        def entry(i: int, lp: float, cls=TopLogprob):
            tok = decode([i])
            return cls(token=tok, logprob=lp, bytes=list(tok.encode("utf-8")))

        tops = tops or [[] for _ in ids]
        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(i, lp).model_dump(),
                             top_logprobs=[entry(j, v) for j, v in top])
            for i, lp, top in zip(ids, lps, tops)])

    # ------------------------------------------------------------------ non-streaming
    async def complete(self, index: int, text: str, row: Row) -> ChatChoice:  # type: ignore[override]
        self.prompt_tokens += len(row.ids)
        g = await self._collect(row)
        return ChatChoice(index=index, message=ChatMessage(content=g.text),
                          logprobs=self._chat_logprobs(g.ids, g.lps, g.tops),
                          finish_reason=FINISH.get(g.finish, "stop"))

    def response(self, choices) -> ChatCompletionResponse:  # type: ignore[override]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.body.model,
                                      choices=choices, usage=self._usage())

    # ---------------------------------------------------------------------- streaming
    def _chunk(self, delta: ChatDelta, lp: ChatLogprobs | None, finish: str | None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model,
                                    choices=[ChatChunkChoice(index=0, delta=delta, logprobs=lp,
                                                             finish_reason=finish)])
        return f"data: {chunk.model_dump_json()}\n\n"

    async def _head(self, text: str, row: Row):
        return "", None

    def _head_events(self, head, first) -> list[str]:
        return [self._chunk(ChatDelta(role="assistant", content=""), None, None)]

    def _chunk_event(self, chunk, offset: int, finish: str | None) -> str:
        lp = self._chat_logprobs(chunk.token_ids, list(chunk.token_logprobs), chunk.top_logprobs)
        return self._chunk(ChatDelta(content=chunk.text), lp, finish)

    def _usage_event(self) -> str:
        usage = ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model,
                                    choices=[], usage=self._usage())
        return f"data: {usage.model_dump_json()}\n\n"
