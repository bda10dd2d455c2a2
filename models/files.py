"""Reading small files the runtime and the exporter do not trust: bounded, one-line errors (torch-free).

``loads_json`` is the one JSON parser for anything read from disk or uploaded (safetensors
headers, adapter and model configs, manifests, cache records, checkpoints, JSONL rows): before
``json.loads`` runs, a non-recursive scan bounds the nesting depth, so a hostile file nested
thousands deep costs one linear pass and a ``json.JSONDecodeError`` (a ``ValueError``) instead
of a ``RecursionError`` from the recursive parser (or from whatever walks the result later).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MAX_JSON_DEPTH = 100  # far deeper than any file we write; far below Python's recursion limit
_NON_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BLOCK = 1 << 20


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests arrays/objects deeper than ``limit``, found without
    parsing it: escapes are dropped, string contents skipped, and the brackets left counted in
    blocks (numpy), so the cost is linear and the memory a few copies of ``raw``."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Inside a string a backslash escapes the next character, so dropping "\\\\" pairs left to
    # right, then '\\"', leaves exactly the quotes that open or close strings.
    raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth, inside = 0, False
    for i in range(0, len(raw), _BLOCK):
        parts = raw[i:i + _BLOCK].split(b'"')
        outside = b"".join(parts[1::2] if inside else parts[::2])
        inside ^= len(parts) % 2 == 0
        b = np.frombuffer(outside.translate(None, _NON_BRACKETS), np.uint8)
        if not len(b):
            continue
        steps = (b == 91).astype(np.int32) + (b == 123) - (b == 93) - (b == 125)
        level = np.cumsum(steps) + depth
        if int(level.max()) > limit:
            return True
        depth = int(level[-1])
    return False


class JSONDepthError(json.JSONDecodeError):
    """JSON nested deeper than the limit (a ``json.JSONDecodeError``, so a ``ValueError``)."""

    def __init__(self, max_depth: int):
        super().__init__(f"nested deeper than {max_depth} levels", "", 0)
        self.args = (self.msg,)

    def __str__(self) -> str:
        return self.msg


def loads_json(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH, **kwargs):
    """``json.loads(data, **kwargs)`` for untrusted text: nesting deeper than ``max_depth``
    raises ``JSONDepthError`` (a ``json.JSONDecodeError``, caught wherever malformed JSON is),
    never a RecursionError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if json_depth_exceeds(raw, max_depth):
        raise JSONDepthError(max_depth)
    try:
        return json.loads(data, **kwargs)
    except RecursionError:  # not reached after the scan; kept so no caller ever sees one
        raise JSONDepthError(max_depth) from None


def read_json_object(path: Path, max_bytes: int, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path``, read only if it is at most ``max_bytes``; anything else
    (too large, not UTF-8, not JSON, nested deeper than ``MAX_JSON_DEPTH``, not an object)
    raises ``error`` naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, above the {max_bytes}-byte limit for {what}")
    try:
        obj = loads_json(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: holds a JSON {type(obj).__name__}, expected an object")
    return obj
