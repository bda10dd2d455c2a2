"""The native batch calls: ``POST /v1/score`` (``Runtime.score_async``) and ``POST /v1/classify``
(``Runtime.classify_async``). A bad item gets its own ``error`` in the answer; the others are
computed. Both are admitted against the queue limit and awaited under the request timeout
(``ServerState.batch_call``), so a client that leaves or times out drops its uncomputed rows.
Every item is validated by the runtime's own function (``Runtime.check``, which the runtime's
call runs again), so an item it refuses gets its own error and never touches its neighbours;
token counts come from the rows it returns (they cannot fail on a checked item). An item (or a
classify call) may carry an inline prompt instead of a name (``soft_prompt`` / ``prompt_embeds``,
``inline.py``); a bad payload is that item's error, one over the inline limit a 413."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError, ScoreRequest, classify_requests

from .. import inline
from ..deps import require_key, server_state
from ..errors import APIError, validation_message
from ..protocol import (CONTEXT, ClassifyBody, ClassifyItemResult, ClassifyResponse, ScoreBody,
                        ScoreItem, ScoreItemResult, ScoreResponse, Usage)
from ..state import ServerState

router = APIRouter()


def _row_or_none(rt, request):
    """The runtime's Row for ``request``, or None when it refuses it (that item's result
    carries the error)."""
    try:
        return rt.check(request)
    except (RequestError, SoftPromptError):
        return None


def _shape_error(e: ValidationError, field: str | None = None) -> str:
    """The one-line message of an item's pydantic error (``field`` names a bare value)."""
    errors = [dict(x, loc=((field,) if field else ()) + tuple(x.get("loc", ()))) for x in e.errors()]
    return validation_message(errors)[0]


def _score_item(raw: Any) -> tuple[ScoreItem | None, str | None]:
    """(the item, None) or (None, why it is not one)."""
    if not isinstance(raw, dict):
        return None, (f"a request must be an object {{prompt, context, continuation}}, got "
                      f"{type(raw).__name__}")
    try:
        return ScoreItem.model_validate(raw), None
    except ValidationError as e:
        return None, _shape_error(e)


def _inline_items(st: ServerState, rt, parsed: list) -> list[tuple[dict | None, str | None]]:
    """(the item as a runtime request, None) or (None, why not) per parsed item, each inline
    prompt decoded (blocking: run in a worker thread). A bad payload is its item's error; one
    over the inline limit is a 413 for the call."""
    out: list[tuple[dict | None, str | None]] = []
    for item, shape in parsed:
        if item is None:
            out.append((None, shape))
            continue
        req = item.model_dump(exclude=set(inline.FIELDS))
        try:
            got = inline.payload(item)
            if got is not None:
                if item.prompt is not None:
                    raise APIError(400, f"prompt {item.prompt!r} and {got[0]}: send one or the "
                                   f"other (a registered prompt's name, or an inline prompt)")
                req["prompt"] = inline.decode(got[1], got[0], rt, st.max_inline_bytes)
        except APIError as e:
            if e.status_code == 413:
                raise
            out.append((None, e.detail))
            continue
        out.append((req, None))
    return out


def _context(raw: Any) -> tuple[Any, str | None]:
    """(a classify context, None) or (None, why it is not one)."""
    try:
        return CONTEXT.validate_python(raw), None
    except ValidationError as e:
        return None, _shape_error(e, "context")


def _label(rt, st: ServerState, prompts: set) -> str:
    """The metric label of a call: its one prompt (or the base model), ``mixed`` or ``unknown``
    (values stay bounded by the registered prompts)."""
    if len(prompts) > 1:
        return "mixed"
    label = next(iter(prompts), None) or st.base_id
    return label if label in rt.prompts or label in (st.base_id, inline.INLINE_LABEL) else "unknown"


@router.post("/v1/score", dependencies=[Depends(require_key)])
async def score(body: ScoreBody, request: Request,
                st: ServerState = Depends(server_state)) -> ScoreResponse:
    """``Runtime.score`` over the items (its asyncio form: no worker thread)."""
    rt = st.runtime()
    t0 = time.perf_counter()
    parsed = [_score_item(raw) for raw in body.requests]
    if any(item is not None and any(getattr(item, f) is not None for f in inline.FIELDS)
           for item, _ in parsed):
        parsed = await run_in_threadpool(_inline_items, st, rt, parsed)
    else:
        parsed = [(None if item is None else item.model_dump(exclude=set(inline.FIELDS)), shape)
                  for item, shape in parsed]
    items = [item for item, _ in parsed if item is not None]
    rows = [_row_or_none(rt, item) for item in items]
    n_tokens = sum(len(row.ids) for row in rows if row is not None)
    label = _label(rt, st, {inline.label_of(item["prompt"], "") or None for item in items})
    res = iter(await st.batch_call(request, "score", label, t0, n_tokens,
                                   lambda: rt.score_async(items, errors="return")))
    data = []
    for i, (item, shape) in enumerate(parsed):
        r = next(res) if item is not None else None
        error = shape if r is None else r.error
        data.append(ScoreItemResult(index=i, error=error) if error or r is None else
                    ScoreItemResult(index=i, logprob=r.logprob, token_logprobs=r.token_logprobs,
                                    tokens=r.tokens, is_greedy=r.is_greedy))
    return ScoreResponse(data=data, usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens))


@router.post("/v1/classify", dependencies=[Depends(require_key)])
async def classify(body: ClassifyBody, request: Request,
                   st: ServerState = Depends(server_state)) -> ClassifyResponse:
    """``Runtime.classify(prompt, contexts, labels)`` (its asyncio form)."""
    rt = st.runtime()
    t0 = time.perf_counter()
    got = inline.payload(body)
    if got is None:
        prompt = None if body.prompt is None else st.prompt_for(body.prompt, "prompt")
    else:  # an inline prompt goes without prompt (or with the base model's id)
        if body.prompt is not None:
            inline.check_model(st, rt, body.prompt, got[0], "prompt")
        prompt = await inline.decoded(st, rt, body)
    label = inline.label_of(prompt, st.base_id)
    parsed = [_context(c) for c in ([body.contexts] if isinstance(body.contexts, str)
                                    else body.contexts)]
    contexts = [c for c, shape in parsed if shape is None]
    try:  # the call's labels, checked before it is admitted (the contexts are per item)
        classify_requests(prompt, contexts, body.labels)
    except RequestError as e:
        raise APIError(400, str(e), param="labels") from None
    # context tokens: a (context, label) row's targets start right after its context
    rows = [_row_or_none(rt, ScoreRequest(prompt, c, body.labels[0])) for c in contexts]
    n_tokens = sum(row.target_start for row in rows if row is not None)
    res = iter(await st.batch_call(request, "classify", label, t0, n_tokens,
                                   lambda: rt.classify_async(prompt, contexts, body.labels,
                                                             errors="return")))
    data = []
    for i, (_, shape) in enumerate(parsed):
        r = next(res) if shape is None else None
        error = shape if r is None else r.error
        data.append(ClassifyItemResult(index=i, error=error) if error or r is None else
                    ClassifyItemResult(index=i, label=r.label, probs=r.probs, logprobs=r.logprobs))
    return ClassifyResponse(data=data)
