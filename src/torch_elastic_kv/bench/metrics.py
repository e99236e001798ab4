"""Figures computed from one system's run: speed, latency, memory over time, output checksum.

:data:`DEFINITIONS` says what each figure means; it is copied into ``results.json``.
"""

from __future__ import annotations

import hashlib
import json

from .replay import COUNTERS, SystemRun, latencies
from .stats import percentile, time_weighted_mean

DEFINITIONS = {
    "requests": "the window's requests, over which every per-request figure is computed; with a pre-roll "
    "(--preroll) its requests run first and are left out (replayed_requests counts both)",
    "tokens_per_s": "the window's output tokens / seconds from the window's start (the replay's start without a "
    "pre-roll) to the last request's last token",
    "busy_tokens_per_s": "the window's output tokens / seconds during which at least one of its requests was "
    "waiting or running",
    "ttft": "time to first token: first output token time - the request's scheduled arrival time",
    "tpot": "time per output token after the first: (last token - first token) / (output tokens - 1), per request",
    "mean_resident_bytes": "time-weighted mean of resident KV bytes from the window's start (after the pre-roll) "
    "to the end of the idle tail",
    "peak_resident_bytes": "largest resident KV bytes sampled from the window's start on",
    "idle_resident_bytes": "resident KV bytes at the end of the idle tail (tail_seconds after the last request)",
    "memory_byte_seconds_saved_vs_static": "integral from the window's start to the end of the idle tail of "
    "(static pool bytes - resident bytes)",
    "preemptions": "preemptions from the window's first request on (the engine's count; also grows, shrinks, "
    "compactions)",
    "output_checksum": "sha256 of the JSON list of every request's output token ids, in trace order, the "
    "pre-roll's included",
    "prefix_hit_rate": "prefix cache hit tokens / prompt tokens looked up, from the window's first request on "
    "(Engine.stats() read just before it and at the end: a pre-roll request still queued then counts in the "
    "window, see preroll_without_first_token_at_window; None: no prefix cache)",
    "peak_cached_bytes": "largest sampled bytes of cached prefix pages no request holds, from the window's start on",
    "back_to_floor_s": "seconds from the last request's last token until resident KV bytes are at the pool's "
    "min_bytes for good (None: never within the idle tail, or no floor known)",
}


def window_samples(samples: list[tuple], start_s: float) -> list[tuple]:
    """The samples of a step function from ``start_s`` on: the last one at or before it moved to
    ``start_s`` (its value holds until the next sample), then every later one."""
    if start_s <= 0 or not samples:
        return samples
    before = [s for s in samples if s[0] <= start_s]
    head = [(start_s, *before[-1][1:])] if before else []
    return head + [s for s in samples if s[0] > start_s]


def since_window(run: SystemRun, key: str, end_value: int | None) -> int | None:
    """An engine counter's value at the end less its value when the window began (unchanged
    without a pre-roll, or where either is unknown)."""
    start = (run.at_window or {}).get(key)
    if end_value is None or start is None:
        return end_value
    return end_value - start


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
    """The ``systems.<name>`` entry of results.json for one run: per-request figures over the
    window's requests, memory from the window's start, the checksum over every request."""
    unfinished = [i for i, r in enumerate(run.records) if r.finish_s is None]
    if unfinished:
        raise RuntimeError(
            f"{run.name}: {len(unfinished)} of {len(run.records)} requests did not finish "
            f"(first: request {unfinished[0]})"
        )
    records = run.records[run.measured_from :]
    total_out = sum(len(r.tokens) for r in records)
    lat = latencies(records)
    ttft, tpot, e2e = lat["ttft"], lat["tpot"], lat["e2e"]
    busy = _union_length([(r.arrival_s, r.finish_s) for r in records])
    load_span = run.load_end_s - run.window_start_s
    samples = window_samples(run.samples, run.window_start_s)
    mean_resident = time_weighted(samples, 1, run.end_s)
    span = max(run.end_s - (samples[0][0] if samples else 0.0), 0.0)
    resident = [s[1] for s in samples] or [0]
    live = [s[2] for s in samples] or [0]
    at_window = run.at_window or {}
    return {
        "requests": len(records),
        "output_tokens": total_out,
        "preroll_requests": run.measured_from,
        "replayed_requests": len(run.records),
        "window_start_s": run.window_start_s,
        "preroll_without_first_token_at_window": at_window.get("preroll_without_first_token"),
        "duration_s": run.end_s,
        "load_duration_s": run.load_end_s,
        "tokens_per_s": total_out / load_span if load_span > 0 else 0.0,
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
        "mean_live_bytes": time_weighted(samples, 2, run.end_s),
        "peak_live_bytes": int(max(live)),
        "memory_byte_seconds_saved_vs_static": (static_bytes - mean_resident) * span,
        "memory_saved_vs_static_fraction": 1.0 - mean_resident / static_bytes if static_bytes else 0.0,
        **{k: since_window(run, k, run.counters.get(k)) for k in COUNTERS},
        "memory_samples": len(run.samples),
        "pool": run.info,
        "output_checksum": output_checksum([r.tokens for r in run.records]),
        **_prefix_figures(run),
    }


def _prefix_figures(run: SystemRun) -> dict:
    prefix = run.prefix or {}
    query = since_window(run, "prefix_query_tokens", prefix.get("prefix_query_tokens"))
    hit = since_window(run, "prefix_hit_tokens", prefix.get("prefix_hit_tokens"))
    cached = [b for _, b in window_samples(run.cached_samples, run.window_start_s)]
    return {
        "prefix_query_tokens": query,
        "prefix_hit_tokens": hit,
        "prefix_hit_rate": hit / query if query else None,
        "prefix_evictions": {
            k[len("prefix_evictions_") :]: since_window(run, k, v)
            for k, v in prefix.items()
            if k.startswith("prefix_evictions_")
        },
        "peak_cached_bytes": max(cached) if cached else None,
        "back_to_floor_s": back_to_floor(run.samples, run.load_end_s, run.info.get("min_bytes")),
    }
