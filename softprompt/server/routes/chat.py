"""``POST /v1/chat/completions``: OpenAI's chat completions, each soft prompt a model. The route
checks the request (model, unsupported fields, the conversation through the model's chat
template and ``Runtime.check``); the work is ``chat.ChatJob`` on the completions machinery
(generation, streaming as server-sent events)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ..chat import ChatJob, chat_row
from ..chat_protocol import ChatCompletionRequest
from ..completion import run_completion
from ..deps import require_key, server_state
from ..errors import APIError
from ..inline import request_prompt
from ..state import ServerState

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           st: ServerState = Depends(server_state)):
    rt = st.runtime()
    t0 = time.perf_counter()
    prompt = await request_prompt(st, rt, body)  # a name, None, or the body's inline prompt
    bad = body.unsupported()
    if bad:
        raise APIError(400, bad[1], param=bad[0])
    row, max_tokens = chat_row(rt, prompt, body)
    return await run_completion(st, ChatJob(st, rt, prompt, body, t0, max_tokens), request,
                                [("", row)])
