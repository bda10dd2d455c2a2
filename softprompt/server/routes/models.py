"""Soft prompts as OpenAI models: ``GET /v1/models[/{name}]`` lists the base model and every
registered prompt (its kind; a composed prompt's parts); ``POST /v1/prompts`` (admin key) adds
or replaces one, from uploaded files (multipart) or composed of segments (JSON: text, registered
prompts, inline soft prompts), and ``DELETE /v1/prompts/{name}`` removes it. Nothing uploaded
is ever unpickled."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile

from softprompt.runtime.prompts import SoftPromptError
from softprompt.runtime.requests import RequestError

from .. import inline
from ..deps import require_admin, require_key, server_state
from ..errors import APIError, validation_message
from ..protocol import ComposedPromptBody, Deleted, ModelCard, ModelList
from ..state import ServerState

log = logging.getLogger("uvicorn.error")

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]

router = APIRouter()


def _card(st: ServerState, name: str | None) -> ModelCard:
    """The base model's card (name None) or a registered prompt's: its kind, and a composed
    prompt's parts."""
    base = st.base_id
    if name is None:
        return ModelCard(id=base, created=st.started, kind="base", num_virtual_tokens=0,
                         base_model=base, root=base)
    p = st.rt.prompts[name]
    describe = getattr(p, "describe", None)  # a ComposedPrompt's parts
    return ModelCard(id=name, created=st.created.get(name, st.started), kind=p.kind,
                     base_model=base, num_virtual_tokens=p.num_virtual_tokens, root=base,
                     parent=base, parts=describe() if callable(describe) else None)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(st: ServerState = Depends(server_state)) -> ModelList:
    rt = st.runtime()
    return ModelList(data=[_card(st, None)] + [_card(st, n) for n in sorted(rt.prompts)])


@router.get("/v1/models/{name:path}", dependencies=[Depends(require_key)])
async def model(name: str, st: ServerState = Depends(server_state)) -> ModelCard:
    st.runtime()
    return _card(st, st.prompt_for(name))


def _check_name(st: ServerState, name) -> str:
    if not isinstance(name, str) or not PROMPT_NAME.fullmatch(name) or name == st.base_id:
        raise APIError(400, f"invalid prompt name {name!r}: expected 1-128 characters of "
                       "letters, digits, '.', '_', '-', not the base model's name",
                       param="name")
    return name


async def _upload_source(st: ServerState, form, tmp: Path) -> tuple[str, Path]:
    """(name, source) of a multipart upload: the ``.safetensors`` file, or the directory holding
    a PEFT adapter's two files, written under ``tmp`` once the name and file names are checked."""
    name = form.get("name")
    files = form.getlist("file")
    for field, missing in (("name", name is None), ("file", not files)):
        if missing:
            raise APIError(400, f"missing required field {field!r}: POST /v1/prompts takes "
                           "multipart form data (name, file) or a JSON body {name, segments}",
                           param=field)
    name = _check_name(st, name)
    if not all(isinstance(f, StarletteUploadFile) for f in files):
        raise APIError(400, "file: expected uploaded files, got a text field", param="file")
    names = sorted(Path(f.filename or "").name for f in files)
    if names != PEFT_FILES and not (len(names) == 1 and names[0].endswith(".safetensors")):
        raise APIError(400, f"unsupported upload {names}: expected one .safetensors file or "
                       "a PEFT adapter's adapter_config.json + adapter_model.safetensors",
                       param="file")
    for f in files:
        (tmp / Path(f.filename or "").name).write_bytes(await f.read())
    return name, (tmp if names == PEFT_FILES else tmp / names[0])


def _parts(st: ServerState, rt, body: ComposedPromptBody) -> list:
    """``Runtime.add_prompt``'s list of parts for a composed upload: text, registered prompts,
    and inline soft prompts decoded (blocking: run in a worker thread)."""
    parts: list = []
    for i, seg in enumerate(body.segments):
        if seg.text is not None:
            parts.append(seg.text)
        elif seg.prompt is not None:
            p = rt.prompts.get(seg.prompt)
            if p is None:
                raise APIError(400, f"segments.{i}.prompt: unknown prompt {seg.prompt!r}; known: "
                               f"{sorted(rt.prompts)}", param="segments")
            parts.append(p)
        else:
            try:
                parts.append(inline.decode(seg.soft_prompt, "soft_prompt", rt, st.max_inline_bytes))
            except APIError as e:
                raise APIError(e.status_code, f"segments.{i}.{e.detail}", param="segments",
                               code=e.code) from None
    return parts


@router.post("/v1/prompts", dependencies=[Depends(require_admin)])
async def add_prompt(request: Request, st: ServerState = Depends(server_state)) -> ModelCard | ModelList:
    """Add or replace a prompt. Multipart (``name``, ``file``): an uploaded ``.safetensors``
    file, or a PEFT adapter's two files (adapter_config.json + adapter_model.safetensors; a
    multitask adapter registers NAME/0 .. NAME/T-1 and answers their list). JSON ``{name,
    segments}``: a composed prompt (``PromptSegment``: text, a registered prompt, an inline
    soft prompt), registered as ``Runtime.add_prompt(name, [parts])``."""
    rt = st.runtime()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = ComposedPromptBody.model_validate_json(await request.body())
        except ValidationError as e:
            message, _, param = validation_message(list(e.errors()))
            raise APIError(400, message, param=param) from None
        name = _check_name(st, body.name)
        parts = await run_in_threadpool(_parts, st, rt, body)
        try:
            sp = await run_in_threadpool(rt.add_prompt, name, parts)
        except (SoftPromptError, RequestError) as e:  # a text segment, the composed length
            raise APIError(400, str(e), param="segments") from None
    else:
        form = await request.form()
        try:
            with tempfile.TemporaryDirectory(prefix="softprompt-upload-") as tmp:
                name, source = await _upload_source(st, form, Path(tmp))
                sp = await run_in_threadpool(rt.add_prompt, name, source)
        finally:
            await form.close()
    added = sp if isinstance(sp, list) else [sp]
    now = int(time.time())
    for p in added:
        st.created[p.name] = now
        log.info("softprompt: prompt %r added (%s, P=%d)", p.name, p.kind, p.num_virtual_tokens)
    if isinstance(sp, list):  # a multitask adapter: one prompt per task
        return ModelList(data=[_card(st, p.name) for p in added])
    return _card(st, name)


@router.delete("/v1/prompts/{name:path}", dependencies=[Depends(require_admin)])
async def delete_prompt(name: str, st: ServerState = Depends(server_state)) -> Deleted:
    rt = st.runtime()
    try:
        await run_in_threadpool(rt.remove_prompt, name)
    except KeyError:
        raise APIError(404, f"prompt {name!r} not found; known: {sorted(rt.prompts)}",
                       param="name", code="model_not_found") from None
    st.created.pop(name, None)
    return Deleted(id=name)
