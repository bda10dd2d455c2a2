"""The native batch calls: ``POST /v1/score`` (``Runtime.score_async``) and ``POST /v1/classify``
(``Runtime.classify_async``). A bad item gets its own ``error`` in the answer; the others are
computed. Both are admitted against the queue limit and awaited under the request timeout
(``ServerState.batch_call``), so a client that leaves or times out drops its uncomputed rows.
Token counts come from the runtime's own validation (``Runtime.check``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError, ScoreRequest

from ..deps import require_key, server_state
from ..protocol import (ClassifyBody, ClassifyItemResult, ClassifyResponse, ScoreBody,
                        ScoreItemResult, ScoreResponse, Usage)
from ..state import ServerState

router = APIRouter()


def _row_or_none(rt, request):
    """The runtime's Row for ``request``, or None when it refuses it (that item's result
    carries the error)."""
    try:
        return rt.check(request)
    except (RequestError, SoftPromptError):
        return None


@router.post("/v1/score", dependencies=[Depends(require_key)])
async def score(body: ScoreBody, request: Request,
                st: ServerState = Depends(server_state)) -> ScoreResponse:
    """``Runtime.score`` over the items (its asyncio form: no worker thread)."""
    rt = st.runtime()
    t0 = time.perf_counter()
    names = {r.prompt for r in body.requests}
    label = "mixed" if len(names) > 1 else (names.pop() or st.base_id)
    if label not in rt.prompts and label not in ("mixed", st.base_id):
        label = "unknown"  # metric labels stay bounded by the registered prompts
    items = [r.model_dump() for r in body.requests]
    rows = [_row_or_none(rt, item) for item in items]
    n_tokens = sum(len(row.ids) for row in rows if row is not None)
    res = await st.batch_call(request, "score", label, t0, n_tokens,
                              lambda: rt.score_async(items, errors="return"))
    return ScoreResponse(data=[
        ScoreItemResult(index=i, error=r.error) if r.error else
        ScoreItemResult(index=i, logprob=r.logprob, token_logprobs=r.token_logprobs,
                        tokens=r.tokens, is_greedy=r.is_greedy)
        for i, r in enumerate(res)], usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens))


@router.post("/v1/classify", dependencies=[Depends(require_key)])
async def classify(body: ClassifyBody, request: Request,
                   st: ServerState = Depends(server_state)) -> ClassifyResponse:
    """``Runtime.classify(prompt, contexts, labels)`` (its asyncio form)."""
    rt = st.runtime()
    t0 = time.perf_counter()
    prompt = None if body.prompt is None else st.prompt_for(body.prompt, "prompt")
    label = prompt or st.base_id
    contexts = [body.contexts] if isinstance(body.contexts, str) else body.contexts
    # context tokens: a (context, label) row's targets start right after its context
    rows = [_row_or_none(rt, ScoreRequest(prompt, c, body.labels[0])) if body.labels else None
            for c in contexts]
    n_tokens = sum(row.target_start for row in rows if row is not None)
    res = await st.batch_call(request, "classify", label, t0, n_tokens,
                              lambda: rt.classify_async(prompt, contexts, body.labels,
                                                        errors="return"))
    return ClassifyResponse(data=[
        ClassifyItemResult(index=i, error=r.error) if r.error else
        ClassifyItemResult(index=i, label=r.label, probs=r.probs, logprobs=r.logprobs)
        for i, r in enumerate(res)])
