"""vLLM's metric names for the figures ``/metrics`` already exports as ``ekv_*``.

Routers and dashboards scrape vLLM's names (llm-d's endpoint picker reads
``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` and
``vllm:cache_config_info``; vLLM production-stack reads ``vllm:gpu_cache_usage_perc``), so the
server exports them too, labelled as vLLM labels them (``model_name``: the served model name,
``engine``: "0", the one engine). Histograms keep vLLM's bucket boundaries so that quantiles
computed across a fleet of vLLM and this server agree.

Meanings where ours must be defined:

- ``vllm:kv_cache_usage_perc`` (and its older name ``vllm:gpu_cache_usage_perc``): live KV bytes
  (pages held by requests) over the current effective KV budget (``--max-kv-bytes``, lowered by
  ``/admin/kv-budget``, ``/sleep`` or the memory broker's lease), from 0 to 1. vLLM divides used
  blocks by the blocks it pre-allocated, which is its budget; ours is the budget too, not the
  memory mapped now: resident memory follows live memory by design, so live over resident
  would read near 1 under any load and tell a router nothing about the room left.
- ``vllm:num_requests_waiting``: requests in the Engine not running (queued, preempted,
  swapped), as ``ekv_requests_waiting``.
- ``vllm:request_success_total{finished_reason}``: "stop", "length", "abort" (a client that went
  away, or the drain), "error".
- ``vllm:time_per_output_token_seconds`` is observed per token gap, as vLLM's deprecated alias
  of ``vllm:inter_token_latency_seconds``; the per-request mean is
  ``vllm:request_time_per_output_token_seconds`` (and ``ekv_time_per_output_token_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["E2E_BUCKETS", "ITL_BUCKETS", "TTFT_BUCKETS", "VllmMetrics", "kv_usage"]

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip

# the server's finish reasons -> vLLM's FinishReason names
_FINISHED = {"stop": "stop", "length": "length", "abort": "abort", "cancelled": "abort", "error": "error"}
_LABELS = ("model_name", "engine")


def kv_usage(stats: dict[str, Any]) -> float:
    """Live KV bytes over the effective budget (the ceiling, then the reserve, when unlimited)."""
    live = float(stats.get("live_bytes") or 0)
    budget = stats.get("budget_bytes")
    if budget is None:
        budget = stats.get("max_bytes")
    if budget is None:
        budget = stats.get("reserved_bytes") or 0
    if budget <= 0:
        return 0.0 if live == 0 else 1.0
    return live / float(budget)


class _Collector(Collector):
    """The gauges read from the stats at scrape time, in vLLM's names."""

    def __init__(self, owner: VllmMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        o = self._owner
        s = o.stats()
        values = [o.model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=_LABELS)
            g.add_metric(values, value)
            return g

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.get("running", 0))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.get("waiting", 0))
        usage = kv_usage(s)
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage: live KV over the KV budget. 1 means 100 percent.", usage
        )
        yield gauge("vllm:gpu_cache_usage_perc", "Older name of vllm:kv_cache_usage_perc (same value).", usage)
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=_LABELS
        )
        preemptions.add_metric(values, float(s.get("preemptions", 0)))
        yield preemptions
        if s.get("prefix_caching"):  # tokens, as vLLM counts them
            for name, key, doc in (
                ("vllm:prefix_cache_queries", "prefix_query_tokens", "Prefix cache queries, in terms of tokens."),
                ("vllm:prefix_cache_hits", "prefix_hit_tokens", "Prefix cache hits, in terms of tokens."),
            ):
                family = CounterMetricFamily(name, doc, labels=_LABELS)
                family.add_metric(values, float(s.get(key, 0)))
                yield family
        info = o.cache_info(s)
        if info:
            family = InfoMetricFamily("vllm:cache_config", "Information of the LLMEngine CacheConfig")
            family.add_metric([], info)
            yield family


class VllmMetrics:
    """vLLM-named counters and histograms in ``registry``, plus the gauges ``stats`` feeds."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Any = dict  # replaced by ServerMetrics.watch
        self._cache: dict[str, Any] = {}
        v = (model_name, "0")
        r = registry
        prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _LABELS, registry=r)
        self.prompt_tokens = prompt.labels(*v)
        gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", _LABELS, registry=r)
        self.generation_tokens = gen.labels(*v)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            _LABELS + ("finished_reason",),
            registry=r,
        )
        for reason in sorted(set(_FINISHED.values())):
            self._success.labels(*v, reason)  # every reason exported from the start, at 0

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r).labels(*v)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (vLLM's older name of inter_token_latency).",
            ITL_BUCKETS,
        )
        self.request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS
        )
        registry.register(_Collector(self))

    def success(self, reason: str) -> Any:
        """The ``vllm:request_success_total`` child for one of the server's finish reasons."""
        return self._success.labels(self.model_name, "0", _FINISHED.get(reason, reason))

    def token_gap(self, seconds: float) -> None:
        """One gap between two output tokens of a request."""
        self.itl.observe(seconds)
        self.tpot.observe(seconds)

    def describe_cache(
        self, *, block_size: int, cache_dtype: str, swap_bytes: int, gpu_memory_utilization: Optional[float]
    ) -> None:
        """The fixed facts of ``vllm:cache_config_info`` (the block counts follow the stats)."""
        self._cache = {
            "block_size": block_size,
            "cache_dtype": cache_dtype,
            "swap_bytes": swap_bytes,
            "gpu_memory_utilization": "" if gpu_memory_utilization is None else f"{gpu_memory_utilization:g}",
        }

    def cache_info(self, stats: dict[str, Any]) -> dict[str, str]:
        """``vllm:cache_config_info``'s labels: vLLM's keys; ``num_gpu_blocks`` is the pages the
        KV ceiling holds (ours are mapped on demand, never all pre-allocated as vLLM's)."""
        if not self._cache:
            return {}
        page = int(stats.get("page_bytes") or 0)
        ceiling = stats.get("max_bytes") or stats.get("reserved_bytes") or 0
        out = {k: str(v) for k, v in self._cache.items() if k != "swap_bytes"}
        out.update(
            num_gpu_blocks=str(ceiling // page if page else 0),
            num_cpu_blocks=str(self._cache["swap_bytes"] // page if page else 0),
            enable_prefix_caching=str(bool(stats.get("prefix_caching"))),
            page_bytes=str(page),
        )
        return out
