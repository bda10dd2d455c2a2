"""Counters and memory figures, as typed records (torch-free).

Each part reports its own record: the prefix cache ``CacheStats``, CUDA graphs ``GraphStats``,
a backend ``BackendStats`` (its cache, buffers by kind, work done), the engine ``EngineStats``.
``Runtime.stats()`` returns ``RuntimeStats``, which holds them and also reads as the flat
mapping earlier versions returned (``rt.stats()["hits"]``, ``dict(rt.stats())``), with the same
key names. The server's ``/metrics`` reads these records by attribute, so a renamed field is a
type error there, never a metric that silently disappears.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property


@dataclass(frozen=True)
class CacheStats:
    """The prefix cache: lookups that found (``hits``) or computed (``misses``) a prompt's K/V,
    entries evicted (LRU by bytes), ``bytes`` held by ``entries`` prefixes, and the budget."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    max_bytes: int = 0


@dataclass(frozen=True)
class GraphStats:
    """CUDA graphs of the torch backend: graphs held, captures and replays so far, and whether
    a failed capture or replay check turned them off."""

    graphs: int = 0
    graph_captures: int = 0
    graph_replays: int = 0
    graphs_disabled: str | None = None  # why graphs were turned off


@dataclass(frozen=True)
class BackendStats:
    """One backend's figures. cache: None for a backend without a prefix cache (reference).
    stack_bytes: prefixes stacked for a batch; decode_bytes: generating rows' own K/V;
    graph_buffer_bytes: CUDA-graph buffers not counted above; tokens_computed: request tokens
    run through the model; batches: forwards run; graphs: None unless CUDA graphs are used."""

    cache: CacheStats | None = None
    stack_bytes: int = 0
    decode_bytes: int = 0
    graph_buffer_bytes: int = 0
    tokens_computed: int = 0
    batches: int = 0
    graphs: GraphStats | None = None


@dataclass(frozen=True)
class EngineStats:
    """The engine: rows generating (``engine_running``) and waiting, steps run, rows in the
    last step, score rows run and tokens generated so far."""

    engine_running: int = 0
    engine_waiting: int = 0
    engine_steps: int = 0
    engine_batch_rows: int = 0
    rows_scored: int = 0
    tokens_generated: int = 0


@dataclass(frozen=True)
class RuntimeStats(Mapping[str, object]):
    """Everything ``Runtime.stats()`` reports. Read it by attribute (``s.cache.hits``,
    ``s.engine.engine_running``) or as the flat mapping of earlier versions (``s["hits"]``):
    backend, prompts, requests_served, then the backend's, cache's, graphs' and engine's fields
    under their own names (absent parts are absent keys)."""

    backend: str
    prompts: int
    requests_served: int
    backend_stats: BackendStats = field(default_factory=BackendStats)
    engine: EngineStats = field(default_factory=EngineStats)

    @property
    def cache(self) -> CacheStats | None:
        return self.backend_stats.cache

    @property
    def graphs(self) -> GraphStats | None:
        return self.backend_stats.graphs

    def as_dict(self) -> dict[str, object]:
        """The flat ``{name: value}`` view (the keys earlier versions' dict had)."""
        b = self.backend_stats
        out: dict[str, object] = {"backend": self.backend, "prompts": self.prompts,
                                  "requests_served": self.requests_served}
        if b.cache is not None:
            out.update(asdict(b.cache))
        out.update({f.name: getattr(b, f.name) for f in fields(b)
                    if f.name not in ("cache", "graphs")})
        if b.graphs is not None:
            out.update(asdict(b.graphs))
        out.update(asdict(self.engine))
        return out

    @cached_property
    def _flat(self) -> dict[str, object]:  # built once per record (it is frozen)
        return self.as_dict()

    def __getitem__(self, key: str) -> object:
        return self._flat[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)
