"""Request and response bodies of ``POST /v1/chat/completions`` (OpenAI's chat dialect) and of
vLLM's ``POST /tokenize`` / ``POST /detokenize``. Request bodies follow ``protocol._Body``
(unknown fields refused, strict types). The messages themselves are checked by the runtime
(``softprompt.runtime.chat.check_messages``), so Python callers and HTTP clients get the same
one-line errors."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, model_serializer

from .protocol import StreamOptions, Usage, _Body


class ChatCompletionRequest(_Body):
    """``POST /v1/chat/completions``. ``model`` is a soft prompt's name, or the base model's
    name for no prompt or an inline one (``soft_prompt`` / ``prompt_embeds``, inline.py: its
    virtual tokens go before the templated conversation). ``max_completion_tokens`` (or the
    older ``max_tokens``) defaults to the positions left, at most ``DEFAULT_MAX_TOKENS``.
    ``top_k``, ``ignore_eos`` and ``add_generation_prompt`` are vLLM's extensions; ``n``, the
    penalties, ``logit_bias``, ``tools``, ``tool_choice`` and ``response_format`` are accepted
    only at their neutral values."""

    model: str
    messages: list[Any]
    soft_prompt: Optional[str] = None
    prompt_embeds: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    add_generation_prompt: bool = True
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, message) for the first field set to a value this server cannot honour."""
        neutral = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        for name, value in neutral.items():
            got = getattr(self, name)
            if got != value:
                return name, f"{name}={got} is not supported; expected {value}"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; expected none"
        if self.tools:
            return "tools", "tools are not supported; expected none"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported; expected 'none'"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            return "max_tokens", (f"max_tokens={self.max_tokens} and max_completion_tokens="
                                  f"{self.max_completion_tokens} disagree; send one of them")
        return None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    """One generated token: its log-prob and its ``top_logprobs`` most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    """What a streamed event adds: ``role`` on the first event only, then ``content``."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _present(self, handler):  # unset parts are left out, as OpenAI sends them
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


# ------------------------------------------------------------------- /tokenize, /detokenize
class TokenizeRequest(_Body):
    """vLLM's ``POST /tokenize``: a ``prompt`` (text; ``add_special_tokens`` default true, as
    /v1/completions tokenises it) or chat ``messages`` (rendered by the model's chat template;
    ``add_special_tokens`` default false, ``add_generation_prompt`` default true, as
    /v1/chat/completions does). ``model``: a soft prompt's name or the base model's (default)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Any]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """``max_model_len``: positions a request may use under ``model`` (the model's positions
    less the soft prompt's virtual tokens)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
