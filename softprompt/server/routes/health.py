"""``GET /health`` (the process answers), ``GET /ready`` (the model is loaded and warmed up;
503 before) and ``GET /metrics`` (Prometheus). No API key on any of them."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..deps import server_state
from ..metrics import CONTENT_TYPE
from ..state import ServerState

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(st: ServerState = Depends(server_state)):
    rt = st.runtime()
    return {"status": "ready", "model": st.base_id, "prompts": sorted(rt.prompts)}


@router.get("/metrics")
async def metrics(st: ServerState = Depends(server_state)):
    return Response(await run_in_threadpool(st.metrics.render), media_type=CONTENT_TYPE)
