"""Content keys: what a model directory holds, whatever path reached it (torch-free).

An exported bundle is keyed by what it is exported from, not by where that lives, so the same
weights reached by another path (a hub id whose snapshot links to blobs, a copied directory,
the same GGUF converted again, the weights resharded) reuse one bundle. ``content_key(path)``
is a sha256 over

- ``config.json`` and ``generation_config.json``, parsed, minus the keys that vary between
  saves of the same model (``_name_or_path``, ``transformers_version``, ``dtype``, ...);
- every tensor of every ``*.safetensors`` file, in name order across shards: its name, dtype,
  shape and the sha256 of its bytes (the header's layout and metadata do not count);
- the tokenizer files a bundle copies, byte for byte.

Hashing reads every weight once (about a second per GB): each file's tensor digests are
remembered under ``$SOFTPROMPT_HOME/fingerprints/`` by its resolved path, size and
modification time, so only a new or rewritten file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .files import loads_json, read_json_object
from .loading import _VOLATILE_CONFIG_KEYS, TOKENIZER_FILES, ModelError, softprompt_home

CONTENT_VERSION = "softprompt-content-1"
MAX_HEADER_BYTES = 100_000_000  # as safetensors itself
MAX_CONFIG_BYTES = 16 << 20
# Tokenizer files beyond TOKENIZER_FILES that shape the tokenizer a bundle saves.
TOKENIZER_EXTRA = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json")
_VOLATILE_GENERATION_KEYS = ("transformers_version", "_from_model_config")
_MEMO_VERSION = 1


def _json_part(path: Path, volatile) -> bytes:
    if not path.is_file():
        return b"null"
    obj = read_json_object(path, MAX_CONFIG_BYTES, ModelError, "a model config")
    for key in volatile:
        obj.pop(key, None)
    return json.dumps(obj, sort_keys=True, default=str).encode()


def _stamp(f: Path) -> tuple[Path, str]:
    """(resolved path, memo key) of a weights file: its path, size and mtime."""
    real = f.resolve()
    st = real.stat()
    key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return real, key


def _hash_tensors(f: Path) -> list[list]:
    """[[name, dtype, shape, sha256 of its bytes], ...] of a safetensors file, by name."""
    def bad(why: str) -> ModelError:
        return ModelError(f"{f}: not a valid safetensors file ({why})")

    with open(f, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} exceeds the limit or the file")
        try:
            header = loads_json(fh.read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        start, data = 8 + n, size - 8 - n
        out = []
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) \
                and isinstance(info.get("shape"), list) \
                and all(isinstance(s, int) and not isinstance(s, bool) for s in info["shape"]) \
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
                and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
            if not ok or not 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data:
                raise bad(f"tensor {name!r}: malformed header entry")
            a, b = info["data_offsets"]
            h = hashlib.sha256()
            fh.seek(start + a)
            left = b - a
            while left:
                block = fh.read(min(left, 1 << 22))
                if not block:
                    raise bad(f"tensor {name!r}: file truncated")
                h.update(block)
                left -= len(block)
            out.append([name, info["dtype"], info["shape"], h.hexdigest()])
    return out


def tensor_digests(f: Path) -> list[list]:
    """``_hash_tensors(f)``, remembered by the file's resolved path, size and mtime."""
    real, key = _stamp(f)
    memo = softprompt_home() / "fingerprints" / f"tensors-{key}.json"
    if memo.is_file():
        try:
            m = read_json_object(memo, 1 << 28, ValueError, "a tensor digest memo")
            rows = m["tensors"]
            if m.get("version") == _MEMO_VERSION and isinstance(rows, list) and all(
                    isinstance(r, list) and len(r) == 4 for r in rows):
                return rows
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: hash again
    rows = _hash_tensors(real)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _MEMO_VERSION, "path": str(real), "tensors": rows}))
        tmp.replace(memo)
    except OSError:  # a read-only home only costs the hash again next time
        pass
    return rows


def content_key(path: str | Path) -> str:
    """The hex sha256 of what model directory ``path`` holds (module docstring)."""
    path = Path(path)
    h = hashlib.sha256(CONTENT_VERSION.encode())
    h.update(b"|config|" + _json_part(path / "config.json", _VOLATILE_CONFIG_KEYS))
    h.update(b"|generation|" + _json_part(path / "generation_config.json",
                                          _VOLATILE_GENERATION_KEYS))
    tensors: dict[str, list] = {}
    for f in sorted(path.glob("*.safetensors")):
        for row in tensor_digests(f):
            if row[0] in tensors:
                raise ModelError(f"{path}: tensor {row[0]!r} is stored in two weight files")
            tensors[row[0]] = row
    for name in sorted(tensors):
        h.update(b"|tensor|" + json.dumps(tensors[name]).encode())
    for name in sorted({*TOKENIZER_FILES, *TOKENIZER_EXTRA}):
        f = path / name
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            h.update(f"|file|{name}|{digest}".encode())
    return h.hexdigest()
