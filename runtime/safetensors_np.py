"""Read and write .safetensors with numpy alone.

The torch-free ONNX server (onnxruntime + numpy + tokenizers) must still read PEFT adapters
and persisted prefix caches, and the format is simple: an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the
raw little-endian bytes. bfloat16 is widened to float32 on read (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A corrupt, truncated or unsupported safetensors file."""


def load_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return ``({name: array}, metadata)``; raises SafetensorsError on a bad file."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise SafetensorsError(f"file is {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SafetensorsError(f"header claims {n} bytes but the file has {len(data) - 8} after it")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"header is not valid JSON ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"tensor {name!r} has a malformed header entry") from None
        if end > len(body) or start > end:
            raise SafetensorsError(f"tensor {name!r} needs bytes {start}..{end} but the data "
                                   f"section has {len(body)} (truncated file?)")
        raw = np.frombuffer(body[start:end], dtype=np.uint16 if dtype == "BF16" else
                            _DTYPES.get(dtype, np.uint8))
        if dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = raw
        else:
            raise SafetensorsError(f"tensor {name!r} has unsupported dtype {dtype}")
        if arr.size != int(np.prod(shape)):
            raise SafetensorsError(f"tensor {name!r}: {arr.size} values for shape {shape}")
        out[name] = arr.reshape(shape).copy()
    return out, meta


def save_file(tensors: dict[str, np.ndarray], path: str | Path,
              metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (numpy arrays) as a safetensors file readable by ``safetensors``."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
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
