"""A manual clock for policies and engines under test."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """A clock that moves only when told: pass it as ``ElasticPolicy(clock=...)`` to test
    idle intervals without sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"ManualClock.advance: seconds={seconds} must be >= 0")
        self.t += seconds
