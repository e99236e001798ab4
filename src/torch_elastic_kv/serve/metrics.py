"""``GET /metrics``: the Engine's memory and the server's traffic in Prometheus text format.

Gauges and the Engine's own counters are read from ``Engine.stats()`` at scrape time (a
collector, so the figures are never stale and nothing polls between scrapes); token counts and
latency histograms are recorded by the engine thread as tokens come. Each server has its own
registry, so two servers in one process (tests) do not share series.

Names (all prefixed ``ekv_``): ``kv_resident_bytes``, ``kv_live_bytes``, ``kv_reserved_bytes``,
``kv_budget_bytes``, ``kv_min_bytes``, ``kv_max_bytes``, ``requests_running``,
``requests_waiting``, ``requests_swapped``, ``requests_queued`` (no first token yet),
``requests_blocked_by_budget``, ``requests_waiting_for_lease``, ``requests_waiting_for_memory``
(requests that cannot start now: the budget, the broker's lease, or memory that cannot be
mapped is short of what they need), ``server_sleeping``, and with ``--broker``
``kv_lease_bytes``, ``broker_connected``, ``broker_seconds_since_message`` (gauges);
``preemptions_total``, ``kv_grows_total``, ``kv_shrinks_total``, ``kv_allocation_failures_total``,
``kv_bytes_given_back_total``, ``engine_steps_total``, ``prompt_tokens_total``,
``generation_tokens_total``, ``requests_total{finish_reason}`` (counters);
``time_to_first_token_seconds``, ``time_per_output_token_seconds`` (histograms). With the
prefix cache: ``kv_cached_bytes``, ``kv_cached_host_bytes`` (gauges), ``prefix_query_tokens_total``,
``prefix_hit_tokens_total``, ``prefix_hit_tokens_host_total``, ``prefix_evictions_total{reason}``
(pages given up, by why: pressure, expiry, cap, budget, reclaim, idle, reset) (counters).

The same figures also go out under vLLM's names (``vllm_metrics``): one call here records both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .vllm_metrics import VllmMetrics

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# (metric, Engine.stats() key, help)
_GAUGES = (
    ("ekv_kv_resident_bytes", "resident_bytes", "KV memory mapped (physical), bytes"),
    ("ekv_kv_live_bytes", "live_bytes", "KV memory held by requests' pages, bytes"),
    ("ekv_kv_reserved_bytes", "reserved_bytes", "KV address space reserved, bytes"),
    ("ekv_kv_budget_bytes", "budget_bytes", "effective KV budget, bytes"),
    ("ekv_kv_min_bytes", "min_bytes", "KV floor the pool never shrinks under, bytes"),
    ("ekv_kv_max_bytes", "max_bytes", "KV ceiling (--max-kv-bytes), bytes"),
    ("ekv_kv_lease_bytes", "broker_lease_bytes", "the memory broker's lease (--broker): most KV this server may hold"),
    ("ekv_kv_cached_bytes", "cached_bytes", "cached prefix pages no request holds (reclaimable), bytes"),
    ("ekv_kv_cached_host_bytes", "cached_host_bytes", "cached prefix pages demoted to host swap space, bytes"),
    ("ekv_requests_running", "running", "requests holding KV pages"),
    ("ekv_requests_waiting", "waiting", "requests waiting in the Engine (preempted ones included)"),
    ("ekv_requests_swapped", "swapped", "requests whose KV is in host swap space"),
    (
        "ekv_requests_blocked_by_budget",
        "blocked_by_budget",
        "requests that need more KV than the budget allows; they end with 503 after --budget-wait-seconds",
    ),
    (
        "ekv_requests_waiting_for_lease",
        "waiting_for_lease",
        "requests that need more KV than the broker's lease; they end with 503 after --broker-wait-seconds",
    ),
    (
        "ekv_requests_waiting_for_memory",
        "waiting_for_memory",
        "requests whose KV pages could not be mapped at the last step (host or device short of memory)",
    ),
    ("ekv_broker_connected", "broker_connected", "1 while the memory broker's connection is up (--broker)"),
    (
        "ekv_broker_seconds_since_message",
        "broker_seconds_since_message",
        "seconds since the memory broker last sent this server a message (--broker)",
    ),
)
_COUNTERS = (
    ("ekv_preemptions", "preemptions", "requests preempted (swap or recompute)"),
    ("ekv_kv_grows", "grows", "times the KV pool mapped more memory"),
    ("ekv_kv_shrinks", "shrinks", "times the KV pool gave memory back"),
    ("ekv_kv_bytes_given_back", "bytes_given_back", "KV bytes given back by the policy's shrinks"),
    ("ekv_engine_steps", "steps", "Engine steps that ran a forward"),
    ("ekv_prefix_query_tokens", "prefix_query_tokens", "prompt tokens looked up in the prefix cache"),
    ("ekv_prefix_hit_tokens", "prefix_hit_tokens", "prompt tokens found in the prefix cache (not prefilled)"),
    ("ekv_prefix_hit_tokens_host", "prefix_hit_tokens_host", "of those, brought back from the host tier"),
    (
        "ekv_kv_allocation_failures",
        "allocation_failures",
        "Engine steps in which KV pages within the budget could not be mapped (the requests waited)",
    ),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, key, doc in _GAUGES:
            value = s.get(key)
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        yield GaugeMetricFamily(
            "ekv_requests_queued", "choices accepted with no token yet", value=float(s.get("queued", 0))
        )
        yield GaugeMetricFamily(
            "ekv_server_sleeping", "1 while /admin/sleep holds the KV budget at 0", value=float(bool(s.get("sleeping")))
        )
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))
        evictions = CounterMetricFamily(
            "ekv_prefix_evictions", "cached prefix pages given up, by reason", labels=["reason"]
        )
        for key, value in s.items():
            if key.startswith("prefix_evictions_"):
                evictions.add_metric([key.removeprefix("prefix_evictions_")], float(value))
        yield evictions


class _Both:
    """Two series that record the same observation: an ``ekv_*`` one and its vLLM name."""

    def __init__(self, ours: Any, vllm: Any) -> None:
        self._ours, self._vllm = ours, vllm

    def inc(self, amount: float = 1) -> None:
        self._ours.inc(amount)
        self._vllm.inc(amount)

    def observe(self, value: float) -> None:
        self._ours.observe(value)
        self._vllm.observe(value)


class _Finished:
    """``requests.labels(reason).inc()`` counts in ``ekv_requests_total`` and vLLM's success counter."""

    def __init__(self, ours: Counter, vllm: VllmMetrics) -> None:
        self._ours, self._vllm = ours, vllm

    def labels(self, reason: str) -> _Both:
        return _Both(self._ours.labels(reason), self._vllm.success(reason))


class ServerMetrics:
    """The server's registry. ``stats`` is called at every scrape (``ServerMetrics.render``);
    the counters and histograms are updated by the engine thread. ``model_name`` labels the
    vLLM-named series."""

    def __init__(self, model_name: str = "default") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.vllm = VllmMetrics(r, model_name)
        v = self.vllm
        prompt = Counter("ekv_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.prompt_tokens = _Both(prompt, v.prompt_tokens)
        self.generation_tokens = _Both(
            Counter("ekv_generation_tokens", "tokens generated", registry=r), v.generation_tokens
        )
        requests = Counter("ekv_requests", "finished choices by finish reason", ["finish_reason"], registry=r)
        self.requests = _Finished(requests, v)
        ttft = Histogram(
            "ekv_time_to_first_token_seconds",
            "seconds from a request's arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.ttft = _Both(ttft, v.ttft)
        tpot = Histogram(
            "ekv_time_per_output_token_seconds",
            "seconds per output token after the first, per finished choice",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.tpot = _Both(tpot, v.request_tpot)
        self._collector: _EngineCollector | None = None

    def token_gap(self, seconds: float) -> None:
        """Seconds between two output tokens of one choice (vLLM's inter-token latency)."""
        self.vllm.token_gap(seconds)

    def request_done(self, seconds: float) -> None:
        """A choice ended, ``seconds`` after it arrived (vLLM's e2e request latency)."""
        self.vllm.e2e.observe(seconds)

    def watch(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Export ``stats()`` (the Engine's stats plus the server's state) at each scrape."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _EngineCollector(stats)
        self.registry.register(self._collector)
        self.vllm.stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
