"""The statistics every benchmark in this project reports, defined once.

Percentiles interpolate linearly between the two nearest order statistics (numpy's default,
``method="linear"``): p50 of an even count is the mean of the middle two, and p99 of fewer
than 100 values lies between the two largest. The main command, ``benchmarks/bench_engine.py``
and ``benchmarks/gpu_check.py`` all use these, so their p99s mean the same thing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

__all__ = ["percentile", "summary", "time_weighted_mean"]


def percentile(values: Sequence[float], q: float, empty: float = float("nan")) -> float:
    """The ``q``-th percentile (0..100) of ``values``; ``empty`` when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in [0, 100], got {q!r}")
    if len(values) == 0:
        return empty
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float]) -> dict[str, float]:
    """median / p90 / p99 / mean / min / max / n of ``values`` (an empty list: n = 0 only)."""
    if len(values) == 0:
        return {"n": 0}
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def time_weighted_mean(samples: Sequence[tuple[float, float]], end: float) -> float:
    """Mean of a step function sampled as ``(time, value)`` (each value holds until the next
    sample) over [first sample, ``end``]; 0 without samples, the plain mean over no time."""
    if not samples:
        return 0.0
    times = np.array([t for t, _ in samples] + [max(end, samples[-1][0])], dtype=np.float64)
    values = np.array([v for _, v in samples], dtype=np.float64)
    span = times[-1] - times[0]
    return float(values.mean()) if span <= 0 else float((values * np.diff(times)).sum() / span)
