"""PrefixCache: each soft prompt's per-layer key/value prefix, computed once and shared.

Key: (sha256 of the prompt's float32 bytes, model fingerprint, compute dtype). Value: a
PrefixEntry holding, per layer, K and V ``[Hkv, P, D]`` (numpy arrays for the ONNX backend,
torch tensors for the torch backend), plus the log-probabilities predicted at the last virtual
token (``[V]``, needed to score a request's first token). An entry is stored once, whatever
the number of rows and requests that read it; batches index it, never copy it into storage.

LRU under a byte budget, thread-safe, with counters; ``save``/``load`` persist entries as
safetensors for warm restarts. Caching is exact: a causal decoder's virtual tokens never
attend to later tokens, so their K/V do not depend on the request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import safetensors_np


class CacheError(RuntimeError):
    """A prefix-cache entry that cannot be stored or loaded; the message says why."""


@dataclass
class PrefixEntry:
    """keys / values: N per-layer arrays ``[Hkv, P, D]``; first_logprobs: ``[V]`` float32."""

    keys: list
    values: list
    first_logprobs: object

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def nbytes(self) -> int:
        def size(a):
            return a.numel() * a.element_size() if hasattr(a, "element_size") else a.nbytes
        return sum(size(a) for a in (*self.keys, *self.values, self.first_logprobs))


class PrefixCache:
    """LRU map ``(prompt digest, model fingerprint, dtype) -> PrefixEntry`` under ``max_bytes``.

    Entries still used by a running batch stay alive through that batch's references even
    when evicted here, so a budget smaller than one batch's prompts is correct, only slower
    (the counters show every recomputation).
    """

    def __init__(self, max_bytes: int = 1 << 30, fingerprint: str = "", dtype: str = "float32"):
        if max_bytes <= 0:
            raise CacheError(f"prefix_cache_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.fingerprint = fingerprint
        self.dtype = dtype
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
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            return entry

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

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "bytes": self.bytes, "entries": len(self._entries),
                    "max_bytes": self.max_bytes}

    # ------------------------------------------------------------------------ persistence
    def save(self, path: str | Path, to_numpy: Callable = np.asarray) -> int:
        """Write every entry to one safetensors file; returns the number of entries."""
        tensors, meta = {}, {"fingerprint": self.fingerprint, "dtype": self.dtype}
        with self._lock:
            items = list(self._entries.items())
        for i, (key, e) in enumerate(items):
            meta[f"entry{i}"] = key.split(":")[0]
            for layer, (k, v) in enumerate(zip(e.keys, e.values)):
                tensors[f"{i}.{layer}.k"] = to_numpy(k)
                tensors[f"{i}.{layer}.v"] = to_numpy(v)
            tensors[f"{i}.first"] = to_numpy(e.first_logprobs)
        meta["count"] = str(len(items))
        safetensors_np.save_file(tensors, path, metadata=meta)
        return len(items)

    def load(self, path: str | Path, from_numpy: Callable = lambda a: a) -> int:
        """Add the entries of a file written by ``save``; refuses another model's cache."""
        try:
            tensors, meta = safetensors_np.load_file(path)
        except (OSError, safetensors_np.SafetensorsError) as e:
            raise CacheError(f"cannot load prefix cache {path}: {e}") from None
        if meta.get("fingerprint") != self.fingerprint or meta.get("dtype") != self.dtype:
            raise CacheError(f"prefix cache {path} was made for model {meta.get('fingerprint', '?')[:12]} "
                             f"{meta.get('dtype')}, not {self.fingerprint[:12]} {self.dtype}")
        count = int(meta.get("count", 0))
        for i in range(count):
            layers = sum(1 for name in tensors if name.startswith(f"{i}.") and name.endswith(".k"))
            entry = PrefixEntry([from_numpy(tensors[f"{i}.{j}.k"]) for j in range(layers)],
                                [from_numpy(tensors[f"{i}.{j}.v"]) for j in range(layers)],
                                from_numpy(tensors[f"{i}.first"]))
            digest = meta[f"entry{i}"]
            self.get_or_compute(digest, lambda e=entry: e)
            self.misses -= 1  # loading is not a miss
        return count
