"""Request and response bodies (pydantic): OpenAI's legacy completions dialect plus the
native score / classify calls. Unknown fields are refused (400 naming the field), as OpenAI
does, so a misspelt parameter never passes silently. Request bodies are strict (``_Body``):
nothing is converted, so ``2.0`` or ``"2"`` for an integer, ``true`` for a token id or ``"0"``
for a number is a 400, as the runtime refuses them in Python (an integer is accepted for a
number), and NaN/Infinity are refused."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

Text = Union[str, list[int]]  # text, or token ids


class _Body(BaseModel):
    """A request body: unknown fields refused, strict types (no conversion), finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    """``POST /v1/completions``. ``model`` is a soft prompt's name, or the base model's name for
    no prompt or an inline one (``soft_prompt``: base64 safetensors; vLLM's ``prompt_embeds``:
    base64 ``torch.save``; see inline.py: its virtual tokens go before ``prompt``'s tokens,
    which stays required). ``top_k`` and ``ignore_eos`` are vLLM's extensions; ``n``,
    ``best_of``, penalties, ``logit_bias`` and ``suffix`` are accepted only at their neutral
    values."""

    model: str
    prompt: Optional[Union[str, list[str], list[int], list[list[int]]]] = None
    soft_prompt: Optional[str] = None
    prompt_embeds: Optional[str] = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None

    def prompts(self) -> list[Text]:
        """The prompts as a list: one text or id list, or several (empty when none is given)."""
        p = self.prompt
        if p is None:
            return []
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)  # type: ignore[arg-type]

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, message) for the first field set to a value this server cannot honour."""
        neutral = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        for name, value in neutral.items():
            got = getattr(self, name)
            if got is not None and got != value:
                return name, f"{name}={got} is not supported; expected {value}"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; expected none"
        if self.suffix:
            return "suffix", "suffix is not supported; expected none"
        return None


class Logprobs(BaseModel):
    """OpenAI's legacy logprobs object. ``top_logprobs``: per token the ``logprobs`` most likely
    tokens and their log-probs, echoed prompt tokens included (from the scoring forward); null
    for a first prompt token nothing predicts (no soft prompt), as OpenAI and vLLM give it."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    """A soft prompt (or the base model, ``num_virtual_tokens`` 0, kind ``base``) as an OpenAI
    model. kind: the prompt's (``prompt_tuning``, ``prefix_tuning``, ``composed``, ...);
    parts: a composed prompt's parts (``ComposedPrompt.describe()``), else absent."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softprompt"
    kind: str
    num_virtual_tokens: int
    base_model: str
    root: str
    parent: Optional[str] = None
    parts: Optional[list[dict[str, Any]]] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoreItem(_Body):
    """One ``Runtime.score`` request: ``prompt`` None scores under the base model alone, or
    under the item's inline prompt (``soft_prompt`` / ``prompt_embeds``, inline.py)."""

    prompt: Optional[str] = None
    context: Text
    continuation: Optional[Text] = None
    soft_prompt: Optional[str] = None
    prompt_embeds: Optional[str] = None


class ScoreBody(_Body):
    """``POST /v1/score``: each of ``requests`` is validated on its own as a ``ScoreItem`` (by
    the route), so an item of the wrong shape gets its own error and its neighbours are scored."""

    requests: list[Any] = Field(min_length=1)


class ScoreItemResult(BaseModel):
    index: int
    logprob: Optional[float] = None
    token_logprobs: Optional[list[float]] = None
    tokens: Optional[list[int]] = None
    is_greedy: Optional[bool] = None
    error: Optional[str] = None


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScoreItemResult]
    usage: Usage


class ClassifyBody(_Body):
    """``Runtime.classify(prompt, contexts, labels)``: each of ``contexts`` is validated on its
    own as ``Text`` (by the route, ``CONTEXT``), so a bad one gets its own error. An inline
    prompt (``soft_prompt`` / ``prompt_embeds``, inline.py) goes without ``prompt``."""

    prompt: Optional[str] = None
    contexts: Union[str, list[Any]]
    labels: list[str]
    soft_prompt: Optional[str] = None
    prompt_embeds: Optional[str] = None


CONTEXT: TypeAdapter = TypeAdapter(Text, config=ConfigDict(strict=True))  # one classify context


class ClassifyItemResult(BaseModel):
    index: int
    label: Optional[str] = None
    probs: Optional[dict[str, float]] = None
    logprobs: Optional[dict[str, float]] = None
    error: Optional[str] = None


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyItemResult]


class PromptSegment(_Body):
    """One part of a composed prompt: exactly one of ``text`` (tokenised alone, no special
    tokens), ``prompt`` (a registered prompt's name) or ``soft_prompt`` (base64 safetensors, as
    an inline prompt)."""

    text: Optional[str] = None
    prompt: Optional[str] = None
    soft_prompt: Optional[str] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("text", "prompt", "soft_prompt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError("segment", "a segment is exactly one of {\"text\": ...}, "
                                      "{\"prompt\": NAME} or {\"soft_prompt\": BASE64}")
        return self


class ComposedPromptBody(_Body):
    """``POST /v1/prompts`` as JSON: register ``name`` as the ``segments`` composed into one
    prefix, in order (``Runtime.add_prompt(name, [parts])``)."""

    name: str
    segments: list[PromptSegment] = Field(min_length=1)


class Deleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every non-2xx answer of the server has this shape."""

    error: ErrorInfo
