"""Soft prompts as OpenAI models: ``GET /v1/models[/{name}]`` lists the base model and every
registered prompt; ``POST /v1/prompts`` (upload, admin key) adds or replaces one and
``DELETE /v1/prompts/{name}`` removes it. Nothing uploaded is ever unpickled."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import require_admin, require_key, server_state
from ..errors import APIError
from ..protocol import Deleted, ModelCard, ModelList
from ..state import ServerState

log = logging.getLogger("uvicorn.error")

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]

router = APIRouter()


def _card(st: ServerState, name: str | None) -> ModelCard:
    """The base model's card (name None) or a registered prompt's."""
    base = st.base_id
    if name is None:
        return ModelCard(id=base, created=st.started, num_virtual_tokens=0, base_model=base,
                         root=base)
    return ModelCard(id=name, created=st.created.get(name, st.started), base_model=base,
                     num_virtual_tokens=st.rt.prompts[name].num_virtual_tokens,
                     root=base, parent=base)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(st: ServerState = Depends(server_state)) -> ModelList:
    rt = st.runtime()
    return ModelList(data=[_card(st, None)] + [_card(st, n) for n in sorted(rt.prompts)])


@router.get("/v1/models/{name:path}", dependencies=[Depends(require_key)])
async def model(name: str, st: ServerState = Depends(server_state)) -> ModelCard:
    st.runtime()
    return _card(st, st.prompt_for(name))


@router.post("/v1/prompts", dependencies=[Depends(require_admin)])
async def add_prompt(name: str = Form(...), file: list[UploadFile] = File(...),
                     st: ServerState = Depends(server_state)) -> ModelCard:
    """Add or replace prompt ``name`` from an uploaded ``.safetensors`` file, or from a PEFT
    adapter's two files (adapter_config.json + adapter_model.safetensors)."""
    rt = st.runtime()
    if not PROMPT_NAME.fullmatch(name) or name == st.base_id:
        raise APIError(400, f"invalid prompt name {name!r}: expected 1-128 characters of "
                       "letters, digits, '.', '_', '-', not the base model's name",
                       param="name")
    names = sorted(Path(f.filename or "").name for f in file)
    if names != PEFT_FILES and not (len(names) == 1 and names[0].endswith(".safetensors")):
        raise APIError(400, f"unsupported upload {names}: expected one .safetensors file or "
                       "a PEFT adapter's adapter_config.json + adapter_model.safetensors",
                       param="file")
    with tempfile.TemporaryDirectory(prefix="softprompt-upload-") as tmp:
        for f in file:
            (Path(tmp) / Path(f.filename or "").name).write_bytes(await f.read())
        source = tmp if names == PEFT_FILES else Path(tmp) / names[0]
        sp = await run_in_threadpool(rt.add_prompt, name, source)
    st.created[name] = int(time.time())
    log.info("softprompt: prompt %r added (P=%d)", name, sp.num_virtual_tokens)
    return _card(st, name)


@router.delete("/v1/prompts/{name}", dependencies=[Depends(require_admin)])
async def delete_prompt(name: str, st: ServerState = Depends(server_state)) -> Deleted:
    rt = st.runtime()
    try:
        await run_in_threadpool(rt.remove_prompt, name)
    except KeyError:
        raise APIError(404, f"prompt {name!r} not found; known: {sorted(rt.prompts)}",
                       param="name", code="model_not_found") from None
    st.created.pop(name, None)
    return Deleted(id=name)
