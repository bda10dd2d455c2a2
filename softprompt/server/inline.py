"""Inline prompts: a soft prompt sent with the request instead of registered beforehand.

Two request fields carry one, beside ``model`` = the base model's id (``/v1/completions``,
``/v1/chat/completions``; ``prompt`` unset on ``/v1/score`` items and ``/v1/classify``):

- ``soft_prompt``: base64 of safetensors bytes, one ``[P, E]`` tensor (or a PEFT adapter's
  ``prompt_embeddings``, prefix-tuning K/V width included), read torch-free by
  ``softprompt.runtime.adapters.prompt_from_bytes``;
- ``prompt_embeds``: vLLM's field, base64 of ``torch.save(tensor [P, E])``, loaded with
  ``torch.load(weights_only=True)`` where torch is importable (a torch-free server refuses it
  and names ``soft_prompt``).

Either becomes a prompt object, checked against the model (``check_prompt``) and passed to the
runtime as the request's prompt: its virtual tokens go before the request's prompt tokens, and
its prefix is cached by content digest, so the same prompt sent again is a cache hit. Unlike
vLLM, whose ``prompt_embeds`` replace the prompt, the request still needs at least one prompt
token. A payload whose decoded bytes exceed ``max_inline_bytes`` is a 413 (checked before
decoding); anything else wrong with it a 400 with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile
from typing import Any

from starlette.concurrency import run_in_threadpool

from softprompt.runtime.adapters import prompt_from_bytes
from softprompt.runtime.prompt_kinds import check_prompt
from softprompt.runtime.prompts import Prompt, SoftPrompt, SoftPromptError

from .errors import APIError

INLINE_LABEL = "(inline)"  # the metrics' prompt label of a request with an inline prompt
FIELDS = ("soft_prompt", "prompt_embeds")
NEEDS_A_TOKEN = ("an inline prompt's virtual tokens go before the request's prompt tokens: unlike "
                 "vLLM's prompt_embeds, which replace the prompt, the request still needs at "
                 "least one prompt token")


def is_inline(prompt: Any) -> bool:
    """Whether a request's prompt is an inline prompt object (not a name, not None)."""
    return prompt is not None and not isinstance(prompt, str)


def label_of(prompt: Any, base_id: str) -> str:
    """The metrics' prompt label: a registered name, the base model's id, or ``(inline)``."""
    return INLINE_LABEL if is_inline(prompt) else (prompt or base_id)


def _decoded_size(text: str) -> int:
    """The bytes base64 ``text`` (whitespace removed) decodes to, without decoding it."""
    return len(text) // 4 * 3 - text[-2:].count("=") if len(text) % 4 == 0 else (len(text) * 3) // 4


def _b64(text: str, field: str, limit: int) -> bytes:
    text = "".join(text.split())  # line-wrapped base64 (``base64 FILE``) is accepted
    size = _decoded_size(text)
    if size > limit:
        raise APIError(413, f"{field}: the inline prompt is {size} bytes, above the limit of "
                       f"{limit} bytes (max_inline_bytes)", param=field,
                       code="inline_prompt_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{field}: not valid base64 ({e}); expected the standard base64 "
                       "alphabet with padding", param=field) from None


def _torch():
    """torch, or None on a torch-free server (an ONNX bundle served without torch installed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_tensor(raw: bytes, field: str):
    """The tensor of a ``torch.save`` payload, loaded with ``weights_only=True`` on CPU."""
    torch = _torch()
    if torch is None:
        raise APIError(400, f"{field} (a torch.save payload) needs torch, which this server "
                       "does not have; send soft_prompt (base64 safetensors bytes of the [P, E] "
                       "tensor) instead", param=field, code="torch_unavailable")
    # torch.save writes an uncompressed zip; refusing anything else (the legacy format allocates
    # what its header declares, a compressed zip may inflate far past the limit) bounds memory
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise APIError(400, f"{field}: not a torch.save payload ({e}); expected base64 of "
                       "torch.save(tensor [P, E]) in its default zip format", param=field) from None
    if not infos or any(i.compress_type != zipfile.ZIP_STORED for i in infos) \
            or sum(i.file_size for i in infos) > len(raw):
        raise APIError(400, f"{field}: not a torch.save payload (compressed or inconsistent zip "
                       "entries); expected base64 of torch.save(tensor [P, E])", param=field)
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad payload
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise APIError(400, f"{field}: cannot load it with torch.load(weights_only=True) "
                       f"({type(e).__name__}: {why})", param=field) from None
    if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided or obj.dim() != 2 \
            or not obj.is_floating_point():
        got = (f"a {obj.dim()}-D {obj.dtype} tensor" if isinstance(obj, torch.Tensor)
               else type(obj).__name__)
        raise APIError(400, f"{field}: expected a 2-D floating-point tensor [P, E], got {got}",
                       param=field)
    return obj


def decode(data: str, field: str, rt, limit: int) -> Prompt:
    """The checked prompt of one inline payload (``field``: ``soft_prompt`` or
    ``prompt_embeds``). Blocking (base64, parsing, hashing): call it in a worker thread."""
    raw = _b64(data, field, limit)
    try:
        if field == "soft_prompt":
            prompt = prompt_from_bytes(raw, rt.info, name="inline", max_bytes=limit)
        else:
            prompt = SoftPrompt(_torch_tensor(raw, field), name="inline", init="inline")
        return check_prompt(prompt, rt.info, rt.max_virtual_tokens)
    except SoftPromptError as e:
        raise APIError(400, f"{field}: {e}", param=field) from None


def payload(obj: Any) -> tuple[str, str] | None:
    """(field, base64 text) of the inline prompt ``obj`` (a request body or item) carries, None
    when it has none; 400 when it has both fields."""
    given = [(f, getattr(obj, f, None)) for f in FIELDS]
    given = [(f, v) for f, v in given if v is not None]
    if len(given) > 1:
        raise APIError(400, "send one of soft_prompt (safetensors) or prompt_embeds (torch.save), "
                       "not both", param="prompt_embeds")
    return given[0] if given else None


def check_model(st, rt, model: str, field: str, param: str = "model") -> None:
    """An inline prompt goes with ``model`` = the base model's id: 400 for a registered soft
    prompt (one or the other), 404 for an unknown model."""
    if model == st.base_id:
        return
    if model in rt.prompts:
        raise APIError(400, f"{param} {model!r} is a registered soft prompt and {field} sends one "
                       f"inline: send one or the other ({field} with {param}={st.base_id!r}, the "
                       "base model)", param=param)
    st.prompt_for(model, param)  # 404 naming what is served


async def decoded(st, rt, obj: Any) -> Prompt | None:
    """The inline prompt of ``obj`` (a body or a score item), decoded in a worker thread under
    the server's ``max_inline_bytes``; None when it carries none."""
    got = payload(obj)
    if got is None:
        return None
    return await run_in_threadpool(decode, got[1], got[0], rt, st.max_inline_bytes)


async def request_prompt(st, rt, body) -> Any:
    """The prompt of a completions or chat body: a registered name, None (the base model), or
    the inline prompt it carries (then ``model`` must be the base model's id)."""
    got = payload(body)
    if got is None:
        return st.prompt_for(body.model)
    check_model(st, rt, body.model, got[0])
    return await decoded(st, rt, body)
