"""Requests, results, and turning a request into token ids (torch-free).

A request is (soft prompt name, context, optional continuation); context and continuation are
each a string or a list of token ids. The model sees ``[v_1..v_P, context, continuation]``.
``score`` returns the continuation's log-probability; without a continuation it scores every
context token, the first one predicted by the last virtual token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class RequestError(ValueError):
    """A request that cannot be served; the message names what is wrong and what was expected."""


@dataclass(frozen=True)
class ScoreRequest:
    """prompt: soft-prompt name (``None`` = no prompt, P = 0); context / continuation: text or ids."""

    prompt: str | None
    context: str | Sequence[int]
    continuation: str | Sequence[int] | None = None


@dataclass(frozen=True)
class GenerateParams:
    """Decoding settings, validated on construction.

    max_new_tokens: tokens to generate at most (>= 1).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k / top_p: optional sampling filters (top_k >= 1, 0 < top_p <= 1).
    seed: seeds each row's own generator, so a row samples the same tokens alone or in a batch.
    stop: strings that end a row; the text is cut before the first one.
    stop_at_eos: end a row at the model's end-of-sequence token.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")


@dataclass
class ScoreResult:
    """logprob: summed log-probability of the scored tokens; token_logprobs: one per token."""

    logprob: float = float("nan")
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class ClassifyResult:
    """label: the most probable label; probs: {label: probability} over the given labels."""

    label: str | None
    probs: dict[str, float]
    logprobs: dict[str, float]
    error: str | None = None


@dataclass
class GenerateResult:
    """text: decoded new text (cut before a stop string); finish_reason: stop | eos | length."""

    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None


@dataclass
class Row:
    """One prepared request as backends see it.

    prompt: the SoftPrompt (or None for P = 0); ids: ``[L]`` request token ids (context then
    continuation); target_start: first index of ``ids`` whose log-probability is wanted.
    """

    prompt: object
    ids: list[int]
    target_start: int

    @property
    def num_virtual(self) -> int:
        """P of the row's prompt (0 without one)."""
        return prompt_len(self.prompt)

    @property
    def own_targets(self) -> range:
        """Indices j of ``ids`` scored from the request's own position j - 1: every target
        but a first token (j = 0), which the last virtual token predicts."""
        return range(max(self.target_start, 1), len(self.ids))


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer``, the one tokenisation path of every backend.

    tok: the ``tokenizers.Tokenizer``, or None for a model without tokenizer files: token-id
        requests still work, text gets a RequestError naming the files that are missing, and
        generated text decodes to ``""`` (the ids are in ``GenerateResult.token_ids``).
    eos_token_ids: every end-of-sequence id of the model (generation stops on any of them).
    bos_token_id / eos_token_id: the tokenizer's own BOS and EOS, as transformers declares
        them (``PreTrainedTokenizer.bos_token_id``); None when it has none.
    source: the model's name, for error messages.
    """

    def __init__(self, tok, eos_token_ids: Sequence[int] = (), *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, source: str | None = None):
        self.tok = tok
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.source = source

    @classmethod
    def for_model(cls, lm) -> "Tokenizer":
        """The tokenizer of a ``LoadedModel`` (tokenizer-less when it has none)."""
        from .models import display_name, eos_token_ids

        t = lm.tokenizer
        return cls(None if t is None else t.backend_tokenizer, eos_token_ids(lm.model),
                   bos_token_id=getattr(t, "bos_token_id", None),
                   eos_token_id=getattr(t, "eos_token_id", None),
                   source=display_name(lm.source))

    @classmethod
    def for_bundle(cls, bundle) -> "Tokenizer":
        """The tokenizer of an exported ``Bundle``: BOS/EOS read from the tokenizer_config.json
        saved beside tokenizer.json (torch-free)."""
        import json

        special = {}
        cfg = bundle.path / "tokenizer_config.json"
        if bundle.tokenizer is not None and cfg.is_file():
            conf = json.loads(cfg.read_text())
            for key in ("bos_token", "eos_token"):
                tok = conf.get(key)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                special[key + "_id"] = bundle.tokenizer.token_to_id(tok) if tok else None
        return cls(bundle.tokenizer, bundle.eos_token_ids, source=str(bundle.path), **special)

    @property
    def prefix_token_id(self) -> int | None:
        """The token placed before text that has no context (an empty lm-eval context, the
        first rolling window): BOS if the tokenizer has one, else its EOS, else the model's
        first end-of-sequence id; as lm-evaluation-harness's ``HFLM.prefix_token_id``."""
        for i in (self.bos_token_id, self.eos_token_id):
            if i is not None:
                return i
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def encode(self, text: str, special: bool) -> list[int]:
        if self.tok is None:
            from .models import TOKENIZER_FILES

            raise RequestError(f"{'model ' + repr(self.source) if self.source else 'the model'} "
                               f"has no tokenizer (none of "
                               f"{', '.join(TOKENIZER_FILES)} in its directory): send token ids "
                               "instead of text, or add its tokenizer files")
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return "" if self.tok is None else self.tok.decode(list(ids), skip_special_tokens=True)


def to_ids(value, tokenizer: Tokenizer, special: bool, what: str, vocab_size: int) -> list[int]:
    """Token ids of ``value`` (text, or a list of ids checked against the vocabulary)."""
    if isinstance(value, str):
        return tokenizer.encode(value, special)
    try:
        ids = [int(i) for i in value]
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a string or a list of token ids, "
                           f"got {type(value).__name__}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(f"{what} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return ids


def as_request(r) -> ScoreRequest:
    if isinstance(r, ScoreRequest):
        return r
    if isinstance(r, dict):
        unknown = set(r) - {"prompt", "context", "continuation"}
        if unknown:
            raise RequestError(f"unknown request fields {sorted(unknown)}; expected prompt, "
                               "context, continuation")
        if "context" not in r:
            raise RequestError("request has no 'context'; expected {prompt, context, continuation}")
        return ScoreRequest(r.get("prompt"), r["context"], r.get("continuation"))
    raise RequestError(f"a request must be a dict or ScoreRequest, got {type(r).__name__}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64 (results are exact to ~1e-12)."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def prompt_len(prompt) -> int:
    """P of a SoftPrompt, 0 for None (no prompt)."""
    return 0 if prompt is None else prompt.num_virtual_tokens
