"""One generating row: its request, sampling, produced tokens, text and finish reason.

A ``Generation`` is created by the runtime for each accepted generate/stream row and handed to
the engine. The engine calls ``accept`` with each token chosen for it; the row detokenises
incrementally (``sampling.Detokenizer``), checks EOS, stop strings and its length, and sends a
``StreamChunk`` to its sink. ``cancel`` may be called from any thread: the scheduler frees the
row at its next step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .requests import GenerateParams, Row, Tokenizer
from .sampling import Detokenizer, Sampler

_ids = itertools.count()  # row ids: the decode state's order is a list of them (backend.py)


@dataclass
class StreamChunk:
    """What a generation produced in one step: ``text`` (the new final text), ``token_ids`` and
    their ``token_logprobs`` (and with ``logprobs=n`` the n most likely ``(id, log-prob)`` of
    each position in ``top_logprobs``); ``finish_reason`` (stop | eos | length | cancelled |
    error) on the last chunk, with ``error`` set for ``error``."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str | None = None
    error: str | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class Generation:
    """One generating row (see the module docstring).

    sink: called on the engine thread with each StreamChunk (must not block).
    on_done: called once on the engine thread when the row ends, whatever the reason.
    count: whether the row counts in ``requests_served`` (warm-up rows do not).
    """

    def __init__(self, row: Row, params: GenerateParams, tokenizer: Tokenizer,
                 sink: Callable[[StreamChunk], object],
                 on_done: Callable[[Generation], object] | None = None, count: bool = True):
        self.id = next(_ids)
        self.row = row
        self.params = params
        self.sampler = Sampler(params.temperature, params.top_k, params.top_p, params.seed,
                               top_n=params.logprobs or 0)
        self.detok = Detokenizer(tokenizer, params.stop)
        self.eos_ids = tokenizer.eos_token_ids if params.stop_at_eos else frozenset()
        self.sink = sink
        self.on_done = on_done
        self.count = count
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.next_input: int | None = None  # the token this row decodes next step
        self.arrived_step = 0  # engine steps run when it arrived, and at its first token
        self.first_token_step: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The final text so far (cut before a stop string)."""
        return self.detok.text

    @property
    def capacity(self) -> int:
        """Own tokens this row may reach: its request plus every new token."""
        return len(self.row.ids) + self.params.max_new_tokens

    def cancel(self) -> None:
        """Free this row at the next step (its sink gets a ``cancelled`` chunk). Any thread."""
        self.cancelled = True

    def _emit(self, chunk: StreamChunk) -> None:
        try:
            self.sink(chunk)
        except Exception:  # noqa: BLE001 - a consumer that went away (closed event loop, ...)
            self.cancelled = True  # harms only its own row: it is freed at the next step

    def finish(self, reason: str, text: str = "", ids: Iterable[int] = (),
               lps: Iterable[float] = (), error: str | None = None,
               tops: Iterable[list[tuple[int, float]]] = ()) -> None:
        """End the row: its last chunk carries ``reason`` (and ``error``)."""
        self.finish_reason, self.error = reason, error
        self._emit(StreamChunk(text, list(ids), list(lps), reason, error, list(tops)))
        if self.on_done is not None:
            self.on_done(self)

    def accept(self, token: int, logprob: float, top: Iterable[tuple[int, float]] = ()) -> None:
        """The token chosen for this row in a step (``top``: its position's most likely
        alternatives, when asked for): stream it and end the row when due."""
        if token in self.eos_ids:
            self.finish("eos", self.detok.flush())
            return
        self.token_ids.append(token)
        self.token_logprobs.append(logprob)
        tops = [list(top)] if self.sampler.top_n else []
        self.top_logprobs += tops
        delta = self.detok.add(token)
        if self.detok.stopped:
            self.finish("stop", delta, [token], [logprob], tops=tops)
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish("length", delta + self.detok.flush(), [token], [logprob], tops=tops)
        else:
            self.next_input = token
            self._emit(StreamChunk(delta, [token], [logprob], top_logprobs=tops))
