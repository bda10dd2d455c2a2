"""Read and write .safetensors with numpy alone, checking the file before reading its data.

The torch-free ONNX server (onnxruntime + numpy + tokenizers) must still read PEFT adapters
and persisted prefix caches, and the format is simple: an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the
raw little-endian bytes. bfloat16 is widened to float32 on read (numpy has no bfloat16).

Reading is bounded: the header length is checked against a limit and the file size, the
header alone is read and validated (JSON nested at most ``MAX_JSON_DEPTH`` deep, parsed
without recursion into deep input; known dtypes, sizes that match shapes, byte ranges that
tile the data section exactly: no gap, overlap, out-of-range offset or trailing byte), and
only then is the data section memory-mapped. So a corrupt or hostile file costs at most its
header in memory, and a valid one at most the tensors asked for (one copy, or none with
``copy=False``).
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softprompt.models.files import loads_json

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _DTYPES.items()}, "BF16": 2}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


class SafetensorsError(ValueError):
    """A corrupt, truncated or unsupported safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape, and byte range ``[start, end)`` of the data section."""

    dtype: str
    shape: tuple
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors by name, string metadata, where the data section starts."""

    tensors: dict
    metadata: dict
    data_start: int
    file_size: int


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise SafetensorsError(f"header repeats the key {k!r}")
        d[k] = v
    return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info) -> TensorInfo:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"tensor {name!r}: header entry must have exactly dtype, shape "
                               f"and data_offsets, got {info!r:.120}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise SafetensorsError(f"tensor {name!r} has unsupported dtype {dtype!r}; expected one "
                               f"of {sorted(_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} are not [start, end] "
                               "with 0 <= start <= end")
    start, end = offsets
    need = math.prod(shape) * _ITEMSIZE[dtype]
    if end - start != need:
        raise SafetensorsError(f"tensor {name!r}: {dtype} {shape} needs {need} bytes but its "
                               f"data_offsets span {end - start}")
    return TensorInfo(dtype, tuple(shape), start, end)


def read_header(f) -> Header:
    """Read and validate the header of an open binary file (or ``io.BytesIO``); reads no
    tensor data."""
    size = os.fstat(f.fileno()).st_size if not isinstance(f, io.BytesIO) else len(f.getbuffer())
    if size < 8:
        raise SafetensorsError(f"file is {size} bytes, shorter than the 8-byte header length")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if n > size - 8:
        raise SafetensorsError(f"header claims {n} bytes but the file has {size - 8} after it")
    raw = f.read(n)
    try:
        header = loads_json(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # nested too deep included
        raise SafetensorsError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    tensors = {name: _entry(name, info) for name, info in header.items()}
    data = size - 8 - n
    pos = 0  # the byte ranges, sorted, must tile [0, data) exactly
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a gap after byte {pos}"
            raise SafetensorsError(f"tensor {name!r}: data_offsets {[t.start, t.end]} {what}")
        pos = t.end
    if pos > data:
        raise SafetensorsError(f"tensors need {pos} data bytes but the file has {data} "
                               "(truncated file?)")
    if pos < data:
        raise SafetensorsError(f"{data - pos} trailing bytes after the last tensor")
    return Header(tensors, meta, 8 + n, size)


def load_file(path: str | Path, names=None, copy: bool = True
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return ``({name: array}, metadata)``; raises SafetensorsError on a bad file.

    names: load only these tensors (default all). copy: ``True`` copies each tensor out of
    the memory map (safe if the file later changes); ``False`` returns read-only views into
    it (bfloat16 is always copied, to float32), valid while the file is not truncated.
    """
    with open(path, "rb") as f:
        h = read_header(f)
        names = list(h.tensors) if names is None else list(names)
        missing = [n for n in names if n not in h.tensors]
        if missing:
            raise SafetensorsError(f"no tensor named {missing[0]!r} (found {sorted(h.tensors)[:5]})")
        data = h.file_size - h.data_start
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if data else None
        if mm is not None and len(mm) != h.file_size:
            raise SafetensorsError(f"file changed size while being read ({h.file_size} -> {len(mm)})")
    out = {}
    for name in names:
        t = h.tensors[name]
        if t.end == t.start:
            dt = np.float32 if t.dtype == "BF16" else _DTYPES[t.dtype]
            out[name] = np.zeros(t.shape, dt)
            continue
        raw = np.frombuffer(mm, dtype="<u2" if t.dtype == "BF16" else np.dtype(_DTYPES[t.dtype]).newbyteorder("<"),
                            count=(t.end - t.start) // _ITEMSIZE[t.dtype],
                            offset=h.data_start + t.start)
        if t.dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.copy() if copy else raw
        out[name] = arr.reshape(t.shape)
    return out, dict(h.metadata)


def load_bytes(data: bytes, max_bytes: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``load_file`` for safetensors bytes held in memory (an inline prompt in a request),
    at most ``max_bytes`` long; every tensor is copied out, bfloat16 to float32."""
    if len(data) > max_bytes:
        raise SafetensorsError(f"{len(data)} bytes, above the limit of {max_bytes}")
    h = read_header(io.BytesIO(data))
    out = {}
    for name, t in h.tensors.items():
        raw = np.frombuffer(data, dtype="<u2" if t.dtype == "BF16" else np.dtype(_DTYPES[t.dtype]).newbyteorder("<"),
                            count=(t.end - t.start) // _ITEMSIZE[t.dtype], offset=h.data_start + t.start)
        arr = (raw.astype(np.uint32) << 16).view(np.float32) if t.dtype == "BF16" else raw.copy()
        out[name] = arr.reshape(t.shape)
    return out, dict(h.metadata)


def save_file(tensors: dict[str, np.ndarray], path: str | Path,
              metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (numpy arrays) as a safetensors file readable by ``safetensors``.

    The file is written next to ``path`` and renamed over it, so a reader never sees half.
    """
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray makes 0-d 1-d
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be saved")
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # align the data section to 8 bytes, as safetensors does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)
    tmp.replace(path)
