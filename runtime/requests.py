"""Requests, results, and turning a request into token ids (torch-free).

A request is (soft prompt name, context, optional continuation); context and continuation are
each a string or a list of token ids. The model sees ``[v_1..v_P, context, continuation]``.
``score`` returns the continuation's log-probability; without a continuation it scores every
context token, the first one predicted by the last virtual token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from .chat import ChatTemplate
    from .prompts import Prompt


class RequestError(ValueError):
    """A request that cannot be served; the message names what is wrong and what was expected."""


@dataclass(frozen=True)
class ScoreRequest:
    """prompt: a registered prompt's name, an inline prompt (a prompt of any kind, or a
    ``[P, E]`` array: cached by content like any other), or ``None`` (no prompt, P = 0);
    context / continuation: text or ids; top_logprobs: also return the n (0..20) most likely
    tokens of each scored position."""

    prompt: str | None | object
    context: str | Sequence[int]
    continuation: str | Sequence[int] | None = None
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerateParams:
    """Decoding settings, validated on construction.

    max_new_tokens: tokens to generate at most (>= 1).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature). A temperature
        below ``sampling.GREEDY_BELOW`` (1e-5) is too small to tell from greedy and is greedy.
    top_k / top_p: optional sampling filters (top_k >= 1, 0 < top_p <= 1).
    seed: seeds the row's own generator, so a seeded row samples the same tokens alone, in any
        batch and any arrival order; None (default) draws a fresh seed per row.
    stop: strings that end a row; the text is cut before the first one.
    stop_at_eos: end a row at the model's end-of-sequence token.
    logprobs: also return the n (0..20) most likely tokens and log-probs of each new position.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    logprobs: int | None = None

    def __post_init__(self):
        def integer(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def number(v):
            return (integer(v) or isinstance(v, (float, np.floating))) and np.isfinite(v)

        if not integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not number(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not integer(self.top_k) or self.top_k < 1):
            raise RequestError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not number(self.top_p) or not 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if self.logprobs is not None and (not integer(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}")
        if not isinstance(self.stop_at_eos, (bool, np.bool_)):
            raise RequestError(f"stop_at_eos must be a bool, got {self.stop_at_eos!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(x, str) or not x for x in stop):
            raise RequestError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))


@dataclass
class ScoreResult:
    """logprob: summed log-probability of the scored tokens; token_logprobs: one per token;
    tokens: the scored ids; is_greedy: whether greedy decoding would produce exactly them (every
    scored token is the argmax of its position's distribution, from the same forward);
    top_logprobs: with the request's ``top_logprobs=n``, per scored token the n most likely
    ``(id, log-prob)`` of its position, from the same forward (empty otherwise)."""

    logprob: float = float("nan")
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    is_greedy: bool | None = None  # every scored token is the argmax at its position
    top_logprobs: list = field(default_factory=list)  # per scored token [(id, log-prob)]


@dataclass
class ClassifyResult:
    """label: the most probable label; probs: {label: probability} over the given labels."""

    label: str | None
    probs: dict[str, float]
    logprobs: dict[str, float]
    error: str | None = None


@dataclass
class GenerateResult:
    """text: decoded new text (cut before a stop string); token_ids: the new ids (a stop
    string's tokens included, EOS excluded); token_logprobs: each new id's log-probability
    under the model; finish_reason: stop | eos | length | cancelled | error."""

    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)  # per new id [(id, log-prob)], logprobs=n


@dataclass
class Row:
    """One prepared request as backends see it.

    prompt: the prompt (any kind; None for P = 0); ids: ``[L]`` request token ids (context then
    continuation); target_start: first index of ``ids`` whose log-probability is wanted;
    top_n: how many most likely alternatives to return per target (0: none); inline: the
    prompt came with the request (not from the registry: nothing holds or releases it).
    """

    prompt: Prompt | None
    ids: list[int]
    target_start: int
    top_n: int = 0
    inline: bool = False

    @property
    def num_virtual(self) -> int:
        """P of the row's prompt (0 without one)."""
        return prompt_len(self.prompt)

    @property
    def own_targets(self) -> range:
        """Indices j of ``ids`` scored from the request's own position j - 1: every target
        but a first token (j = 0), which the prefix's last computed position predicts."""
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
    chat_template: the model's chat template (``chat.ChatTemplate``), or None when it has none
        (chat requests then get a RequestError saying so).
    """

    def __init__(self, tok, eos_token_ids: Sequence[int] = (), *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, source: str | None = None,
                 chat_template: ChatTemplate | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.source = source

    @classmethod
    def for_model(cls, lm) -> "Tokenizer":
        """The tokenizer of a ``LoadedModel`` (tokenizer-less when it has none)."""
        from softprompt.models import display_name, eos_token_ids

        from .chat import ChatTemplate

        t = lm.tokenizer
        return cls(None if t is None else t.backend_tokenizer, eos_token_ids(lm.model),
                   bos_token_id=getattr(t, "bos_token_id", None),
                   eos_token_id=getattr(t, "eos_token_id", None),
                   source=display_name(lm.source),
                   chat_template=None if t is None else ChatTemplate.from_tokenizer(t))

    @classmethod
    def for_bundle(cls, bundle) -> "Tokenizer":
        """The tokenizer of an exported ``Bundle``: BOS/EOS read from the tokenizer_config.json
        saved beside tokenizer.json, the chat template from chat_template.jinja (or that
        config) (torch-free)."""
        from softprompt.export.errors import BundleError
        from softprompt.models import read_json_object

        from .chat import ChatTemplate

        special = {}
        cfg = bundle.path / "tokenizer_config.json"
        if bundle.tokenizer is not None and cfg.is_file():  # bounded size and nesting
            conf = read_json_object(cfg, 16 << 20, BundleError, "a tokenizer config")
            for key in ("bos_token", "eos_token"):
                tok = conf.get(key)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                special[key + "_id"] = bundle.tokenizer.token_to_id(tok) if tok else None
        chat = None if bundle.tokenizer is None else ChatTemplate.from_dir(bundle.path)
        return cls(bundle.tokenizer, bundle.eos_token_ids, source=str(bundle.path),
                   chat_template=chat, **special)

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
            from softprompt.models import TOKENIZER_FILES

            raise RequestError(f"{'model ' + repr(self.source) if self.source else 'the model'} "
                               f"has no tokenizer (none of "
                               f"{', '.join(TOKENIZER_FILES)} in its directory): send token ids "
                               "instead of text, or add its tokenizer files")
        try:
            return self.tok.encode(text, add_special_tokens=special).ids
        except (TypeError, UnicodeError) as e:  # e.g. a lone surrogate: tokenizers raises TypeError
            raise RequestError(f"text cannot be tokenised ({type(e).__name__}: {e}); expected a "
                               "string of Unicode characters") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return "" if self.tok is None else self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # How much a normalizer can shrink a text (None: it may drop characters, so no bound):
    # NFC/NFKC compose at most 4 code points into one (U+1F82's decomposition is 4 long).
    _SHRINK = {"NFD": 1, "NFKD": 1, "NFC": 4, "NFKC": 4, "Lowercase": 1, "Prepend": 1,
               "Append": 1, "ByteLevel": 1}
    # Pre-tokenizers that split or map a text but never drop a character of it.
    _KEEPING = ("ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts")

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """At most how many characters of input text one token stands for (K), or None when the
        tokenizer gives no such bound (no tokenizer; a normalizer or pre-tokenizer that drops
        characters; an unknown-token, WordPiece or word-level model, where one token may stand
        for a word of any length; truncation; an added token that absorbs spaces). K is the
        longest vocabulary entry (byte-level entries are one character per byte, so at least
        as long as the text they match) times what normalization can shrink a text by."""
        import json

        tok = self.tok
        try:
            if tok is None or tok.truncation is not None:
                return None
            shrink = 1
            todo = [json.loads(tok.normalizer.__getstate__())] if tok.normalizer else []
            while todo:
                n = todo.pop()
                kind = n.get("type")
                if kind == "Sequence":
                    todo += n["normalizers"]
                elif kind == "Replace" and "String" in n["pattern"] and n["content"]:
                    shrink *= -(-len(n["pattern"]["String"]) // len(n["content"]))
                elif kind in self._SHRINK:
                    shrink *= self._SHRINK[kind]
                else:
                    return None
            todo = [json.loads(tok.pre_tokenizer.__getstate__())] if tok.pre_tokenizer else []
            while todo:
                pre = todo.pop()
                if pre.get("type") == "Sequence":
                    todo += pre["pretokenizers"]
                elif pre.get("type") not in self._KEEPING or pre.get("behavior") == "Removed":
                    return None
            model = tok.model
            if type(model).__name__ != "BPE" or (
                    model.unk_token is not None and model.fuse_unk and not model.byte_fallback):
                return None
            if any(a.lstrip or a.rstrip for a in tok.get_added_tokens_decoder().values()):
                return None
            return max(map(len, tok.get_vocab(with_added_tokens=True))) * shrink
        except Exception:  # noqa: BLE001 - a tokenizer we cannot inspect gets no bound
            return None

    def check_length(self, text: str, max_tokens: int, what: str = "text") -> None:
        """RequestError, before any tokenising, when ``text`` is longer than ``max_tokens``
        tokens can stand for (``max_chars_per_token``): it must tokenise to more than
        ``max_tokens`` tokens, and tokenising it would cost memory and time for nothing."""
        k = self.max_chars_per_token
        if k is not None and len(text) > k * max_tokens:
            raise RequestError(f"input too long: {what} is {len(text)} characters, more than the "
                               f"{k * max_tokens} that {max_tokens} positions can hold (at most "
                               f"{k} characters a token for this tokenizer)")


def to_ids(value, tokenizer: Tokenizer, special: bool, what: str, vocab_size: int,
           max_tokens: int | None = None) -> list[int]:
    """Token ids of ``value``: text (valid Unicode) or a list of ints, checked against the
    vocabulary in both cases. Nothing is coerced: floats, booleans, digit strings and bytes are
    refused, not converted. max_tokens: text too long to fit in that many tokens is refused
    before it is tokenised (``Tokenizer.check_length``)."""
    if isinstance(value, str):
        if max_tokens is not None:
            tokenizer.check_length(value, max_tokens, what)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{what} is not valid Unicode text ({e.reason} at index "
                               f"{e.start}); expected a string of Unicode characters") from None
        ids = tokenizer.encode(value, special)
    elif isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        bad = [i for i in value if isinstance(i, (bool, np.bool_))
               or not isinstance(i, (int, np.integer))]
        if bad:
            raise RequestError(f"{what} token ids must be integers, got {type(bad[0]).__name__} "
                               f"{bad[0]!r}")
        ids = [int(i) for i in value]
    else:
        raise RequestError(f"{what} must be a string or a list of token ids, "
                           f"got {type(value).__name__}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(f"{what} has token ids outside the model's vocabulary [0, {vocab_size}): "
                           f"{bad[:5]}")
    return ids


def as_request(r) -> ScoreRequest:
    """A ScoreRequest from a dict or ScoreRequest, its prompt name checked (str or None)."""
    if isinstance(r, dict):
        unknown = set(r) - {"prompt", "context", "continuation", "top_logprobs"}
        if unknown:
            raise RequestError(f"unknown request fields {sorted(map(str, unknown))}; expected "
                               "prompt, context, continuation, top_logprobs")
        if "context" not in r:
            raise RequestError("request has no 'context'; expected {prompt, context, continuation}")
        r = ScoreRequest(r.get("prompt"), r["context"], r.get("continuation"),
                         0 if r.get("top_logprobs") is None else r["top_logprobs"])
    elif not isinstance(r, ScoreRequest):
        raise RequestError(f"a request must be a dict or ScoreRequest, got {type(r).__name__}")
    n = r.top_logprobs
    if (not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_))
            or not 0 <= n <= 20):
        raise RequestError(f"top_logprobs must be an integer in [0, 20], got {n!r}")
    return r


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64 (results are exact to ~1e-12)."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def prompt_len(prompt) -> int:
    """P of a prompt, 0 for None (no prompt)."""
    return 0 if prompt is None else prompt.num_virtual_tokens


@dataclass(frozen=True)
class ModelInfo:
    """What requests and prompts are checked against, and what a server lists: the model's
    display ``name``, the ``backend`` serving it, E, V, its positions, fingerprint and compute
    dtype, and its K/V geometry (N layers, Hkv heads, head size D) for K/V prompts."""

    name: str | None
    backend: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    fingerprint: str
    dtype: str
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0


def make_row(request, prompts: Mapping[str, object], tokenizer: Tokenizer, model: ModelInfo,
             extra_positions: int = 0, inline=None) -> Row:
    """The one validation of a request: a checked ``Row`` or a RequestError naming what is
    wrong and what was expected.

    request: a dict ``{prompt, context, continuation}`` or a ScoreRequest; prompts: the
    registry's prompts by name (the row binds the version found there); extra_positions: new
    tokens the row will generate (counted against the model's positions); inline: turns a
    request's inline prompt (not a name) into a checked prompt (``Runtime.check`` passes its
    own; without it an inline prompt is refused).
    """
    r = as_request(request)
    prompt = None
    is_inline = r.prompt is not None and not isinstance(r.prompt, str)
    if is_inline:
        if inline is None:
            raise RequestError(f"prompt must be a prompt name (a string) or None, got "
                               f"{type(r.prompt).__name__}")
        prompt = inline(r.prompt)
    elif r.prompt is not None:
        prompt = prompts.get(r.prompt)
        if prompt is None:
            raise RequestError(f"unknown prompt {r.prompt!r}; known: {sorted(prompts)}")
    V = model.vocab_size
    ctx = to_ids(r.context, tokenizer, True, "context", V, model.max_positions)
    if not ctx:
        raise RequestError("empty context: expected at least one token")
    cont = None
    if r.continuation is not None:
        cont = to_ids(r.continuation, tokenizer, False, "continuation", V, model.max_positions)
        if not cont:
            raise RequestError("empty continuation: expected at least one token (or None "
                               "to score the context)")
    P = prompt_len(prompt)
    first = P > 0 and prompt.scores_first  # the prefix predicts the first token
    if cont is None and not first and len(ctx) < 2 and not extra_positions:
        raise RequestError("without a prompt or continuation there is nothing to score: "
                           "expected a context of at least 2 tokens" if P == 0 else
                           f"prompt {prompt.name!r} ends in K/V, which predicts no first token, "
                           "and there is no continuation: expected a context of at least 2 tokens")
    ids = ctx + (cont or [])
    total = P + len(ids) + extra_positions
    if total > model.max_positions:
        raise RequestError(f"input too long: {P} virtual + {len(ids)} request tokens"
                           + (f" + {extra_positions} new" if extra_positions else "")
                           + f" = {total} positions, the model has {model.max_positions}")
    start = len(ctx) if cont is not None else (0 if first else 1)
    return Row(prompt, ids, start, int(r.top_logprobs), inline=is_inline)


def classify_requests(prompt: str | None, contexts, labels) -> tuple[list, list[str], list[ScoreRequest]]:
    """(contexts, labels, one ScoreRequest per context x label) of a classify call."""
    labels = list(labels) if not isinstance(labels, str) else [labels]
    if (len(labels) < 2 or len(set(labels)) != len(labels)
            or any(not isinstance(x, str) or not x for x in labels)):
        raise RequestError(f"labels must be at least 2 distinct non-empty strings, got {labels!r}")
    contexts = [contexts] if isinstance(contexts, str) else list(contexts)
    return contexts, labels, [ScoreRequest(prompt, c, lab) for c in contexts for lab in labels]


def classify_results(contexts: list, labels: list[str],
                     scores: list[ScoreResult]) -> list[ClassifyResult]:
    """One ClassifyResult per context from its labels' scores (softmax over their summed
    log-probabilities); a context whose label failed carries that error."""
    out = []
    for c in range(len(contexts)):
        group = scores[c * len(labels):(c + 1) * len(labels)]
        err = next((s.error for s in group if s.error), None)
        if err:
            out.append(ClassifyResult(None, {}, {}, error=err))
            continue
        lp = np.array([s.logprob for s in group])
        probs = np.exp(log_softmax(lp))
        out.append(ClassifyResult(labels[int(np.argmax(lp))], dict(zip(labels, probs.tolist())),
                                  dict(zip(labels, lp.tolist()))))
    return out
