"""PrefixCache on its own: LRU under a byte budget, exact invalidation, compute-once under
threads, persistence that refuses another model's cache."""

import threading
import time

import numpy as np
import pytest

from softprompt.runtime.cache import CacheError, PrefixCache, PrefixEntry


def entry(p, fill=0.0):
    """Two layers of K/V [Hkv=2, P, D=4] float32 + first log-probs [V=8]: 2*2*2*P*4*4 + 32 bytes."""
    kv = [np.full((2, p, 4), fill, np.float32) for _ in range(2)]
    return PrefixEntry(kv, [a.copy() for a in kv], np.zeros(8, np.float32))


def test_lru_eviction_under_budget_and_counters():
    one = entry(3).nbytes
    cache = PrefixCache(max_bytes=2 * one, fingerprint="fp")
    cache.get_or_compute("a", lambda: entry(3))
    cache.get_or_compute("b", lambda: entry(3))
    cache.get_or_compute("a", lambda: pytest.fail("a is cached"))  # a is now most recent
    cache.get_or_compute("c", lambda: entry(3))  # evicts b, the least recently used
    assert "a" in cache and "c" in cache and "b" not in cache
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes, s.entries) == (1, 3, 1, 2 * one, 2)


def test_invalidate_drops_exactly_one_entry():
    cache = PrefixCache(fingerprint="fp")
    for d in "abc":
        cache.get_or_compute(d, lambda: entry(2))
    assert cache.invalidate("b") and not cache.invalidate("b")
    assert sorted(d for d in "abc" if d in cache) == ["a", "c"]
    assert cache.stats().bytes == 2 * entry(2).nbytes


def test_entry_larger_than_budget_is_refused():
    cache = PrefixCache(max_bytes=100, fingerprint="fp")
    with pytest.raises(CacheError, match=r"needs \d+ bytes but prefix_cache_bytes is 100"):
        cache.get_or_compute("a", lambda: entry(50))


def test_concurrent_misses_compute_once():
    cache = PrefixCache(fingerprint="fp")
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return entry(4)

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or_compute("x", compute)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 16 and all(g is got[0] for g in got)
    assert cache.stats().hits == 15


def test_save_load_round_trip_and_refuse_other_model(tmp_path):
    cache = PrefixCache(fingerprint="fp", dtype="float32")
    cache.get_or_compute("a", lambda: entry(3, fill=1.5))
    cache.get_or_compute("b", lambda: entry(5, fill=-2.0))
    assert cache.save(tmp_path / "c.safetensors") == 2
    warm = PrefixCache(fingerprint="fp", dtype="float32")
    assert warm.load(tmp_path / "c.safetensors") == 2
    got = warm.get_or_compute("b", lambda: pytest.fail("b was loaded"))
    np.testing.assert_array_equal(got.keys[1], entry(5, fill=-2.0).keys[1])
    assert warm.stats().misses == 0
    with pytest.raises(CacheError, match="was made for model fp float32, not other float32"):
        PrefixCache(fingerprint="other").load(tmp_path / "c.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08")
    with pytest.raises(CacheError, match="cannot load prefix cache"):
        warm.load(tmp_path / "bad.safetensors")
