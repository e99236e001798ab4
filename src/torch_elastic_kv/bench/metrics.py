"""Figures computed from one system's run: speed, latency, memory over time, output checksum.

:data:`DEFINITIONS` says what each figure means; it is copied into ``results.json``.
"""

from __future__ import annotations

import hashlib
import json

from .replay import SystemRun, latencies
from .stats import percentile, time_weighted_mean

DEFINITIONS = {
    "tokens_per_s": "output tokens / seconds from the replay's start to the last request's last token",
    "busy_tokens_per_s": "output tokens / seconds during which at least one request was waiting or running",
    "ttft": "time to first token: first output token time - the request's scheduled arrival time",
    "tpot": "time per output token after the first: (last token - first token) / (output tokens - 1), per request",
    "mean_resident_bytes": "time-weighted mean of resident KV bytes over the run including the idle tail",
    "peak_resident_bytes": "largest sampled resident KV bytes",
    "idle_resident_bytes": "resident KV bytes at the end of the idle tail (tail_seconds after the last request)",
    "memory_byte_seconds_saved_vs_static": "integral over the run of (static pool bytes - resident bytes)",
    "output_checksum": "sha256 of the JSON list of every request's output token ids, in trace order",
    "prefix_hit_rate": "prefix cache hit tokens / prompt tokens looked up (Engine.stats(); None: no prefix cache)",
    "peak_cached_bytes": "largest sampled bytes of cached prefix pages no request holds",
    "back_to_floor_s": "seconds from the last request's last token until resident KV bytes are at the pool's "
    "min_bytes for good (None: never within the idle tail, or no floor known)",
}


def back_to_floor(samples: list[tuple[float, int, int]], load_end_s: float, floor_bytes: int | None) -> float | None:
    """Seconds after ``load_end_s`` from which every sample's resident bytes is at most ``floor_bytes``
    (None when the last sample is above it or no floor is known)."""
    if floor_bytes is None or not samples or samples[-1][1] > floor_bytes:
        return None
    at = samples[-1][0]
    for t, resident, _live in reversed(samples):
        if resident > floor_bytes:
            break
        at = t
    return max(0.0, at - load_end_s)


def output_checksum(token_lists: list[list[int]]) -> str:
    """sha256 over the outputs in request order; equal checksums mean identical tokens."""
    return hashlib.sha256(json.dumps(token_lists, separators=(",", ":")).encode()).hexdigest()


def _percentile(values: list[float], q: float) -> float:
    return percentile(values, q, empty=0.0)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def time_weighted(samples: list[tuple[float, int, int]], column: int, end_s: float) -> float:
    """Mean of a sampled step function (each sample holds until the next) over [first sample, end_s]."""
    return time_weighted_mean([(s[0], s[column]) for s in samples], end_s)


def summarize(run: SystemRun, static_bytes: int) -> dict:
    """The ``systems.<name>`` entry of results.json for one run."""
    unfinished = [i for i, r in enumerate(run.records) if r.finish_s is None]
    if unfinished:
        raise RuntimeError(
            f"{run.name}: {len(unfinished)} of {len(run.records)} requests did not finish "
            f"(first: request {unfinished[0]})"
        )
    outputs = [r.tokens for r in run.records]
    total_out = sum(len(t) for t in outputs)
    lat = latencies(run.records)
    ttft, tpot, e2e = lat["ttft"], lat["tpot"], lat["e2e"]
    busy = _union_length([(r.arrival_s, r.finish_s) for r in run.records])
    mean_resident = time_weighted(run.samples, 1, run.end_s)
    span = max(run.end_s - (run.samples[0][0] if run.samples else 0.0), 0.0)
    resident = [s[1] for s in run.samples] or [0]
    live = [s[2] for s in run.samples] or [0]
    return {
        "requests": len(run.records),
        "output_tokens": total_out,
        "duration_s": run.end_s,
        "load_duration_s": run.load_end_s,
        "tokens_per_s": total_out / run.load_end_s if run.load_end_s > 0 else 0.0,
        "busy_tokens_per_s": total_out / busy if busy > 0 else 0.0,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_p50_s": _percentile(tpot, 50),
        "tpot_p99_s": _percentile(tpot, 99),
        "e2e_p50_s": _percentile(e2e, 50),
        "e2e_p99_s": _percentile(e2e, 99),
        "mean_resident_bytes": mean_resident,
        "peak_resident_bytes": int(max(resident)),
        "idle_resident_bytes": int(resident[-1]),
        "mean_live_bytes": time_weighted(run.samples, 2, run.end_s),
        "peak_live_bytes": int(max(live)),
        "memory_byte_seconds_saved_vs_static": (static_bytes - mean_resident) * span,
        "memory_saved_vs_static_fraction": 1.0 - mean_resident / static_bytes if static_bytes else 0.0,
        "preemptions": run.counters.get("preemptions"),
        "grows": run.counters.get("grows"),
        "shrinks": run.counters.get("shrinks"),
        "compactions": run.counters.get("compactions"),
        "memory_samples": len(run.samples),
        "pool": run.info,
        "output_checksum": output_checksum(outputs),
        **_prefix_figures(run),
    }


def _prefix_figures(run: SystemRun) -> dict:
    prefix = run.prefix or {}
    query, hit = prefix.get("prefix_query_tokens"), prefix.get("prefix_hit_tokens")
    cached = [b for _, b in run.cached_samples]
    return {
        "prefix_query_tokens": query,
        "prefix_hit_tokens": hit,
        "prefix_hit_rate": hit / query if query else None,
        "prefix_evictions": {
            k[len("prefix_evictions_") :]: v for k, v in prefix.items() if k.startswith("prefix_evictions_")
        },
        "peak_cached_bytes": max(cached) if cached else None,
        "back_to_floor_s": back_to_floor(run.samples, run.load_end_s, run.info.get("min_bytes")),
    }
