"""PrefixCache: each soft prompt's per-layer key/value prefix, computed once and shared.

Key: (sha256 of the prompt's float32 bytes, model fingerprint, compute dtype). Value: a
PrefixEntry holding, per layer, K and V ``[Hkv, P, D]`` (numpy arrays for the ONNX backend,
torch tensors for the torch backend), plus the log-probabilities predicted at the last virtual
token (``[V]``, needed to score a request's first token). An entry is stored once, whatever
the number of rows and requests that read it; batches index it, never copy it into storage.

LRU under a byte budget, thread-safe, with counters; ``save``/``load`` persist entries as
safetensors for warm restarts. Caching is exact: a causal decoder's virtual tokens never
attend to later tokens, so their K/V do not depend on the request.

A saved file is trusted only after checks: each entry records the prompt digest it was made
from, its geometry and a sha256 over that record, the model fingerprint, the dtype and its
tensor bytes. ``load`` verifies every entry before it inserts any, so a file that is
truncated, edited, relabelled to another prompt or made for another model loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from softprompt.models.files import loads_json

from . import safetensors_np
from .stats import CacheStats


FORMAT = "softprompt-prefix-cache"
VERSION = "3"
_KV_DTYPES = ("float32", "float16")


class CacheError(RuntimeError):
    """A prefix-cache entry that cannot be stored or loaded; the message says why."""


@dataclass
class PrefixEntry:
    """keys / values: N per-layer arrays ``[Hkv, P, D]``; first_logprobs: ``[V]`` float32, the
    log-probabilities of a request's first token, or None for a prefix that ends in K/V (a
    prefix-tuning prompt or cartridge: nothing was computed at its last position)."""

    keys: list
    values: list
    first_logprobs: object = None

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def nbytes(self) -> int:
        def size(a):
            return a.numel() * a.element_size() if hasattr(a, "element_size") else a.nbytes
        first = () if self.first_logprobs is None else (self.first_logprobs,)
        return sum(size(a) for a in (*self.keys, *self.values, *first))


class PrefixCache:
    """LRU map ``(prompt digest, model fingerprint, dtype) -> PrefixEntry`` under ``max_bytes``.

    Entries still used by a running batch stay alive through that batch's references even
    when evicted here, so a budget smaller than one batch's prompts is correct, only slower
    (the counters show every recomputation).
    """

    def __init__(self, max_bytes: int = 1 << 30, fingerprint: str = "", dtype: str = "float32",
                 geometry: dict | None = None):
        """geometry: the model's ``{num_layers, num_kv_heads, head_dim, vocab_size}``, which
        ``load`` requires of every entry (when None, an entry already in memory sets it)."""
        if max_bytes <= 0:
            raise CacheError(f"prefix_cache_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.geometry = geometry
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    def key(self, digest: str) -> str:
        return f"{digest}:{self.fingerprint}:{self.dtype}"

    def get_or_compute(self, digest: str, compute: Callable[[], PrefixEntry]) -> PrefixEntry:
        """The entry for a prompt digest, computing it (once) on a miss."""
        key = self.key(digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                self._entries.move_to_end(key)
                return entry
            self.misses += 1
            entry = compute()
            if entry.nbytes > self.max_bytes:
                raise CacheError(f"one prompt's prefix needs {entry.nbytes} bytes but "
                                 f"prefix_cache_bytes is {self.max_bytes}; raise the budget")
            self._store(key, entry)
            return entry

    def _store(self, key, entry: PrefixEntry) -> None:
        """Store ``entry`` newest and evict least recently used entries beyond the budget
        (called with the lock held)."""
        self._entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def invalidate(self, digest: str) -> bool:
        """Drop exactly this prompt's entry; True if there was one."""
        with self._lock:
            entry = self._entries.pop(self.key(digest), None)
            if entry is not None:
                self.bytes -= entry.nbytes
            return entry is not None

    def __contains__(self, digest: str) -> bool:
        return self.key(digest) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, self.evictions, self.bytes,
                              len(self._entries), self.max_bytes)

    # ------------------------------------------------------------------------ persistence
    def save(self, path: str | Path, to_numpy: Callable = np.asarray) -> int:
        """Write every entry to one safetensors file; returns the number of entries.

        Per entry the file records the prompt digest it was made from, its geometry (N, Hkv,
        P, D, V, K/V dtype) and a sha256 over that record, the cache's model fingerprint and
        dtype, and every tensor's dtype, shape and bytes; ``load`` checks all of it.
        to_numpy: turns a stored K/V or log-prob tensor into a numpy array.
        """
        if not self.fingerprint:
            raise CacheError("cannot save a prefix cache without a model fingerprint: "
                             "loading it could not check which model it belongs to")
        with self._lock:
            items = [(key.split(":")[0], e) for key, e in self._entries.items()]
        tensors = {}
        meta = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                "dtype": self.dtype, "count": str(len(items))}
        for i, (digest, e) in enumerate(items):
            arrays = _arrays(e, to_numpy)
            k = arrays["0.k"]  # [Hkv, P, D]
            vocab = arrays["first"].shape[0] if "first" in arrays else self._geometry()["vocab_size"]
            info = {"digest": digest, "num_layers": len(e.keys), "num_kv_heads": k.shape[0],
                    "num_tokens": k.shape[1], "head_dim": k.shape[2], "first": "first" in arrays,
                    "vocab_size": vocab, "kv_dtype": str(k.dtype)}
            info["sha256"] = _checksum(info, self.fingerprint, self.dtype, arrays)
            meta[f"entry{i}"] = json.dumps(info, sort_keys=True)
            tensors.update({f"{i}.{name}": a for name, a in arrays.items()})
        safetensors_np.save_file(tensors, path, metadata=meta)
        return len(items)

    def load(self, path: str | Path, from_numpy: Callable = lambda a: a) -> int:
        """Add the entries of a file written by ``save``; returns how many.

        Everything is checked before anything is added, so a bad file adds nothing and raises
        CacheError naming the file and the first problem: another model fingerprint or dtype,
        an entry whose sha256 (over its prompt digest, geometry and tensor bytes) differs,
        shapes or dtypes that differ from the entry's record or from this cache's geometry,
        NaN/Inf, a truncated or malformed file. Loaded entries keep LRU order; a file larger
        than the budget keeps its last entries.
        from_numpy: turns a checked numpy array into what the backend stores.
        """
        try:
            arrays, meta = safetensors_np.load_file(path, copy=False)
        except (OSError, safetensors_np.SafetensorsError) as e:
            raise CacheError(f"cannot load prefix cache {path}: {e}") from None
        try:
            checked = self._check_file(arrays, meta)
        except CacheError as e:
            raise CacheError(f"prefix cache {path}: {e}") from None
        built = [(digest, PrefixEntry([from_numpy(np.array(t[f"{j}.k"])) for j in range(n)],
                                      [from_numpy(np.array(t[f"{j}.v"])) for j in range(n)],
                                      from_numpy(np.array(t["first"])) if "first" in t else None))
                 for digest, n, t in checked]
        with self._lock:
            for digest, entry in built:
                self._insert(digest, entry)
        return len(built)

    def _insert(self, digest: str, entry: PrefixEntry) -> None:
        """Add a loaded entry (not a miss); an entry already present is kept."""
        key = self.key(digest)
        if key in self._entries:
            return
        self._store(key, entry)

    def _geometry(self) -> dict | None:
        """Expected (num_layers, num_kv_heads, head_dim, vocab_size): given, or read off an
        entry already in memory, or None when nothing is known yet."""
        if self.geometry is not None:
            return dict(self.geometry)
        with self._lock:
            e = next((e for e in self._entries.values() if e.first_logprobs is not None), None)
        if e is None:
            return None
        return {"num_layers": len(e.keys), "num_kv_heads": int(e.keys[0].shape[0]),
                "head_dim": int(e.keys[0].shape[2]), "vocab_size": int(e.first_logprobs.shape[0])}

    def _check_file(self, arrays: dict, meta: dict) -> list[tuple[str, int, dict]]:
        """Validate a loaded file completely; returns ``[(digest, N, {name: array})]``."""
        if meta.get("format") != FORMAT:
            raise CacheError(f"not a softprompt prefix cache (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise CacheError(f"format version {meta.get('version')!r} is not {VERSION!r}; "
                             "save the cache again with this softprompt")
        if meta.get("fingerprint") != self.fingerprint or meta.get("dtype") != self.dtype:
            raise CacheError(f"was made for model {str(meta.get('fingerprint'))[:12]} "
                             f"{meta.get('dtype')}, not {self.fingerprint[:12]} {self.dtype}")
        count = meta.get("count", "")
        if not count.isdigit() or int(count) > len(arrays):
            raise CacheError(f"entry count {count!r} is not a number <= its {len(arrays)} tensors")
        want = self._geometry()
        out, names, digests = [], set(), set()
        for i in range(int(count)):
            info = _entry_info(meta.get(f"entry{i}"), i)
            n = info["num_layers"]
            t = {}
            for rel in [f"{j}.{kv}" for j in range(n) for kv in "kv"] + ["first"] * info["first"]:
                if f"{i}.{rel}" not in arrays:
                    raise CacheError(f"entry {i}: tensor {i}.{rel} missing")
                t[rel] = arrays[f"{i}.{rel}"]
                names.add(f"{i}.{rel}")
            kv_shape = (info["num_kv_heads"], info["num_tokens"], info["head_dim"])
            for rel, a in t.items():
                shape, dtype = ((info["vocab_size"],), "float32") if rel == "first" else \
                    (kv_shape, info["kv_dtype"])
                if a.shape != shape or str(a.dtype) != dtype:
                    raise CacheError(f"entry {i}: tensor {i}.{rel} is {a.dtype} {list(a.shape)}, "
                                     f"its record says {dtype} {list(shape)}")
            if _checksum(info, self.fingerprint, self.dtype, t) != info["sha256"]:
                raise CacheError(f"entry {i} (prompt {info['digest'][:12]}): sha256 of its "
                                 "record and tensors differs from the one saved; the file was "
                                 "altered or corrupted")
            geometry = {k: info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
            if want is not None and geometry != want:
                raise CacheError(f"entry {i}: geometry {geometry} differs from this model's {want}")
            want = geometry
            bad = [rel for rel, a in t.items()
                   if (np.isnan(a) if rel == "first" else ~np.isfinite(a)).any()]
            if bad:
                raise CacheError(f"entry {i}: tensor {i}.{bad[0]} holds NaN/Inf values")
            if info["digest"] in digests:
                raise CacheError(f"entry {i}: prompt {info['digest'][:12]} appears twice")
            digests.add(info["digest"])
            nbytes = sum(a.nbytes for a in t.values())
            if nbytes > self.max_bytes:
                raise CacheError(f"entry {i} needs {nbytes} bytes but prefix_cache_bytes is "
                                 f"{self.max_bytes}")
            out.append((info["digest"], n, t))
        extra = sorted(set(arrays) - names)
        if extra:
            raise CacheError(f"{len(extra)} tensors belong to no entry (first: {extra[0]!r})")
        return out


_ENTRY_INTS = ("num_layers", "num_kv_heads", "num_tokens", "head_dim", "vocab_size")
_ENTRY_KEYS = {"digest", "kv_dtype", "sha256", "first", *_ENTRY_INTS}


def _entry_info(text, i: int) -> dict:
    """Parse and type-check entry ``i``'s record (a JSON string in the file's metadata)."""
    try:
        info = loads_json(text)  # bounded nesting: a deep record is malformed, not a RecursionError
    except (TypeError, json.JSONDecodeError):
        raise CacheError(f"entry {i}: record missing or not JSON") from None
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise CacheError(f"entry {i}: record must have exactly the keys {sorted(_ENTRY_KEYS)}")
    for k in _ENTRY_INTS:
        if not isinstance(info[k], int) or isinstance(info[k], bool) or info[k] < 1:
            raise CacheError(f"entry {i}: {k} must be an integer >= 1, got {info[k]!r}")
    if not isinstance(info["first"], bool):
        raise CacheError(f"entry {i}: first must be true or false, got {info['first']!r}")
    for k in ("digest", "kv_dtype", "sha256"):
        if not isinstance(info[k], str) or not info[k]:
            raise CacheError(f"entry {i}: {k} must be a non-empty string, got {info[k]!r}")
    if info["kv_dtype"] not in _KV_DTYPES:
        raise CacheError(f"entry {i}: kv_dtype {info['kv_dtype']!r} is not one of {_KV_DTYPES}")
    return info


def _arrays(e: PrefixEntry, to_numpy: Callable) -> dict[str, np.ndarray]:
    """An entry's tensors as numpy, named ``{layer}.k`` / ``{layer}.v`` ``[Hkv, P, D]`` and
    ``first`` ``[V]`` float32 (absent for a prefix that ends in K/V)."""
    out = {}
    for j, (k, v) in enumerate(zip(e.keys, e.values)):
        out[f"{j}.k"], out[f"{j}.v"] = np.asarray(to_numpy(k)), np.asarray(to_numpy(v))
    if e.first_logprobs is not None:
        out["first"] = np.asarray(to_numpy(e.first_logprobs), dtype=np.float32)
    return out


def _checksum(info: dict, fingerprint: str, dtype: str, arrays: dict) -> str:
    """sha256 over an entry's record (its prompt digest and geometry), the cache's model
    fingerprint and dtype, and each tensor's name, dtype, shape and bytes, in name order."""
    record = {k: v for k, v in info.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps([record, fingerprint, dtype], sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()
