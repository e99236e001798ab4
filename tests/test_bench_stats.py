"""The one percentile definition every benchmark reports (bench/stats.py)."""

from __future__ import annotations

import math

import pytest

from torch_elastic_kv.bench.stats import percentile, summary, time_weighted_mean


def test_percentile_interpolates_between_order_statistics() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5  # mean of the middle two
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(list(range(1, 11)), 99) == pytest.approx(9.91)  # between the two largest
    assert math.isnan(percentile([], 50)) and percentile([], 50, empty=0.0) == 0.0
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        percentile(xs, 101)


def test_summary_and_time_weighted_mean() -> None:
    s = summary([3.0, 1.0, 2.0])
    assert s == {
        "median": 2.0,
        "p90": pytest.approx(2.8),
        "p99": pytest.approx(2.98),
        "mean": 2.0,
        "min": 1.0,
        "max": 3.0,
        "n": 3,
    }
    assert summary([]) == {"n": 0}
    # 10 for 1 s, then 0 for 3 s: mean 2.5 over [0, 4]
    assert time_weighted_mean([(0.0, 10.0), (1.0, 0.0)], end=4.0) == 2.5
    assert time_weighted_mean([], end=1.0) == 0.0
