"""``POST /v1/completions``: OpenAI's legacy completions, each soft prompt a model. The route
checks the request (model, unsupported fields, its prompts through ``Runtime.check``); the
work is ``completion.CompletionJob`` (echo, generation, streaming as server-sent events)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ..completion import CompletionJob, prompt_rows, run_completion
from ..deps import require_key, server_state
from ..errors import APIError
from ..inline import request_prompt
from ..protocol import CompletionRequest
from ..state import ServerState

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(require_key)])
async def completions(body: CompletionRequest, request: Request,
                      st: ServerState = Depends(server_state)):
    rt = st.runtime()
    t0 = time.perf_counter()
    prompt = await request_prompt(st, rt, body)  # a name, None, or the body's inline prompt
    bad = body.unsupported()
    if bad:
        raise APIError(400, bad[1], param=bad[0])
    inputs = prompt_rows(rt, prompt, body)
    if body.stream and len(inputs) != 1:
        raise APIError(400, f"stream=true takes one prompt, got {len(inputs)}", param="prompt")
    return await run_completion(st, CompletionJob(st, rt, prompt, body, t0), request, inputs)
