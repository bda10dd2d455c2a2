"""Every metric the server exports, named once (vLLM's names, with a ``softprompt:`` prefix).

Histograms and the token counters are observed by the HTTP handlers; the prefix-cache and
engine figures are read from ``Runtime.stats()`` at scrape time (a custom collector), so they
always agree with what the runtime reports in-process.

    softprompt:e2e_request_latency_seconds{endpoint,prompt}   histogram, accept -> last byte
    softprompt:time_to_first_token_seconds{endpoint,prompt}   histogram, accept -> first token
    softprompt:request_queue_time_seconds{endpoint,prompt}    histogram, accept -> engine hand-off
    softprompt:prompt_tokens_total{endpoint,prompt}           request (context) tokens
    softprompt:generation_tokens_total{endpoint,prompt}       generated tokens
    softprompt:http_requests_total{endpoint,status}           responses by status code
    softprompt:http_requests_in_flight                        accepted requests not finished
    softprompt:prefix_cache_{hits,misses,evictions}_total     from Runtime.stats()
    softprompt:prefix_cache_bytes, softprompt:prefix_cache_entries
    softprompt:num_requests_running, softprompt:num_requests_waiting   engine rows
    softprompt:engine_batch_rows (rows in the last step), softprompt:engine_steps_total,
    softprompt:engine_generated_tokens_total, softprompt:engine_scored_rows_total
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "softprompt:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)

# Runtime.stats() key -> (metric name, kind, help). Missing keys are simply not exported.
_STATS = {
    "hits": (P + "prefix_cache_hits", "counter", "Prefix-cache lookups that found the prompt's K/V"),
    "misses": (P + "prefix_cache_misses", "counter", "Prefix-cache lookups that computed the K/V"),
    "evictions": (P + "prefix_cache_evictions", "counter", "Prefixes evicted (LRU, byte budget)"),
    "bytes": (P + "prefix_cache_bytes", "gauge", "Bytes held by cached prefixes"),
    "entries": (P + "prefix_cache_entries", "gauge", "Prefixes held in the cache"),
    "engine_running": (P + "num_requests_running", "gauge", "Rows the engine is running"),
    "engine_waiting": (P + "num_requests_waiting", "gauge", "Rows waiting in the engine's queue"),
    "engine_batch_rows": (P + "engine_batch_rows", "gauge", "Rows in the engine's last step"),
    "engine_steps": (P + "engine_steps", "counter", "Engine steps (shared forwards) run"),
    "tokens_generated": (P + "engine_generated_tokens", "counter", "Tokens the engine generated "
                         "(cancelled rows included)"),
    "rows_scored": (P + "engine_scored_rows", "counter", "Score rows the engine ran"),
}


class _RuntimeCollector:
    """Reads ``Runtime.stats()`` on each scrape (nothing before the model is loaded)."""

    def __init__(self, get_stats: Callable[[], dict | None]):
        self.get_stats = get_stats

    def collect(self):
        stats = self.get_stats() or {}
        for key, (name, kind, doc) in _STATS.items():
            value = stats.get(key)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=float(value))


class Metrics:
    """The server's metrics in their own registry (several apps may live in one process)."""

    def __init__(self, get_stats: Callable[[], dict | None]):
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
