"""Hot swap: upload a trained adapter to a running ``softprompt serve`` (``POST /v1/prompts``).

The request is the route's multipart form (``softprompt/server/routes/models.py``): ``name`` and
the adapter's two files (``adapter_config.json`` + ``adapter_model.safetensors``) as ``file``
parts, with the admin key as a bearer token when the server has keys. The server validates the
adapter like ``add_prompt`` and swaps it in atomically; requests already accepted finish on the
old version. Standard library only (no HTTP client dependency).
"""

from __future__ import annotations

import json
import uuid
import urllib.error
import urllib.request
from pathlib import Path

from .data import TrainError

FILES = ("adapter_config.json", "adapter_model.safetensors")


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a ``multipart/form-data`` form: text ``fields`` and ``files`` as
    (field name, file name, bytes)."""
    boundary = f"softprompt-{uuid.uuid4().hex}"
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                     f"{v}\r\n".encode())
    for k, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def upload(adapter_dir: str | Path, url: str, name: str, admin_key: str | None = None,
           timeout: float = 120.0) -> dict:
    """Upload the adapter in ``adapter_dir`` as prompt ``name`` to the server at ``url``
    (``http://host:port``); returns the server's model card, or raises a one-line TrainError
    with the server's own message."""
    d = Path(adapter_dir)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise TrainError(f"{d} is not a PEFT adapter directory: {', '.join(missing)} missing")
    body, ctype = multipart({"name": name}, [("file", f, (d / f).read_bytes()) for f in FILES])
    headers = {"Content-Type": ctype}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/prompts", data=body, headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise TrainError(f"uploading to {url} failed: HTTP {e.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TrainError(f"uploading to {url} failed: {getattr(e, 'reason', e)}") from None
