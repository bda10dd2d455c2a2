"""Every metric the server exports, named once (vLLM's names, with a ``softprompt:`` prefix).

Histograms and the token counters are observed by the HTTP handlers (``Metrics``); the
prefix-cache and engine figures are read from ``Runtime.stats()`` at scrape time by a custom
collector, through the typed table ``RUNTIME_METRICS``: each entry reads one field of
``RuntimeStats`` by attribute, so a renamed field fails loudly (mypy, or an AttributeError on
scrape) instead of a metric silently disappearing.

    softprompt:e2e_request_latency_seconds{endpoint,prompt}   histogram, accept -> last byte
    softprompt:time_to_first_token_seconds{endpoint,prompt}   histogram, accept -> first token
    softprompt:request_queue_time_seconds{endpoint,prompt}    histogram, accept -> engine hand-off
    softprompt:prompt_tokens_total{endpoint,prompt}           request (context) tokens
    softprompt:generation_tokens_total{endpoint,prompt}       generated tokens
    softprompt:http_requests_total{endpoint,status}           responses by status code
    softprompt:http_requests_in_flight                        accepted requests not finished
    softprompt:prefix_cache_{hits,misses,evictions}_total     RuntimeStats.cache (absent when
    softprompt:prefix_cache_bytes, softprompt:prefix_cache_entries     the backend has no cache)
    softprompt:num_requests_running, softprompt:num_requests_waiting   RuntimeStats.engine rows
    softprompt:engine_batch_rows (rows in the last step), softprompt:engine_steps_total,
    softprompt:engine_generated_tokens_total, softprompt:engine_scored_rows_total
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from softprompt.runtime.stats import CacheStats, RuntimeStats

P = "softprompt:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


@dataclass(frozen=True)
class RuntimeMetric:
    """One metric read from ``RuntimeStats`` at scrape time. ``read`` returns None when the
    figure does not exist for this runtime (then the metric is not exported)."""

    name: str  # a counter is exposed with Prometheus' ``_total`` suffix added
    kind: Literal["counter", "gauge"]
    help: str
    read: Callable[[RuntimeStats], Optional[float]]


def _cache(read: Callable[[CacheStats], int]) -> Callable[[RuntimeStats], Optional[float]]:
    """A cache figure: None for a backend without a prefix cache (reference)."""
    return lambda s: None if s.cache is None else read(s.cache)


RUNTIME_METRICS: tuple[RuntimeMetric, ...] = (
    RuntimeMetric(P + "prefix_cache_hits", "counter",
                  "Prefix-cache lookups that found the prompt's K/V", _cache(lambda c: c.hits)),
    RuntimeMetric(P + "prefix_cache_misses", "counter",
                  "Prefix-cache lookups that computed the K/V", _cache(lambda c: c.misses)),
    RuntimeMetric(P + "prefix_cache_evictions", "counter",
                  "Prefixes evicted (LRU, byte budget)", _cache(lambda c: c.evictions)),
    RuntimeMetric(P + "prefix_cache_bytes", "gauge",
                  "Bytes held by cached prefixes", _cache(lambda c: c.bytes)),
    RuntimeMetric(P + "prefix_cache_entries", "gauge",
                  "Prefixes held in the cache", _cache(lambda c: c.entries)),
    RuntimeMetric(P + "num_requests_running", "gauge",
                  "Rows the engine is running", lambda s: s.engine.engine_running),
    RuntimeMetric(P + "num_requests_waiting", "gauge",
                  "Rows waiting in the engine's queue", lambda s: s.engine.engine_waiting),
    RuntimeMetric(P + "engine_batch_rows", "gauge",
                  "Rows in the engine's last step", lambda s: s.engine.engine_batch_rows),
    RuntimeMetric(P + "engine_steps", "counter",
                  "Engine steps (shared forwards) run", lambda s: s.engine.engine_steps),
    RuntimeMetric(P + "engine_generated_tokens", "counter",
                  "Tokens the engine generated (cancelled rows included)",
                  lambda s: s.engine.tokens_generated),
    RuntimeMetric(P + "engine_scored_rows", "counter",
                  "Score rows the engine ran", lambda s: s.engine.rows_scored),
)


class _RuntimeCollector:
    """Reads ``Runtime.stats()`` on each scrape (nothing before the model is loaded)."""

    def __init__(self, get_stats: Callable[[], RuntimeStats | None]):
        self.get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.get_stats()
        if stats is None:
            return
        for m in RUNTIME_METRICS:
            value = m.read(stats)
            if value is None:
                continue
            family = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            yield family(m.name, m.help, value=float(value))


class Metrics:
    """The server's metrics in their own registry (several apps may live in one process)."""

    def __init__(self, get_stats: Callable[[], RuntimeStats | None]):
        r = self.registry = CollectorRegistry()
        ep = ["endpoint", "prompt"]
        self.latency = Histogram(P + "e2e_request_latency_seconds", "Request latency, accepted "
                                 "to last byte", ep, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time from acceptance to the "
                              "first generated token", ep, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time from acceptance to the "
                               "engine call (waiting for a server worker)", ep,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Request (context) tokens processed",
                                     ep, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", ep,
                                         registry=r)
        self.responses = Counter(P + "http_requests", "HTTP responses by endpoint and status",
                                 ["endpoint", "status"], registry=r)
        self.in_flight = Gauge(P + "http_requests_in_flight", "Accepted requests not finished",
                               registry=r)
        r.register(_RuntimeCollector(get_stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
