"""Reading small files the runtime and the exporter do not trust: bounded, one-line errors (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path, max_bytes: int, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path``, read only if it is at most ``max_bytes``; anything else
    (too large, not UTF-8, not JSON, not an object) raises ``error`` naming the file."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, above the {max_bytes}-byte limit for {what}")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: holds a JSON {type(obj).__name__}, expected an object")
    return obj
