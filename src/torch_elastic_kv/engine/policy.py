"""The elastic policy: how current demand becomes a number of resident KV pages.

Plain Python, no torch: the Engine feeds it page counts and reads back decisions, so every
rule here is testable with a fake clock and no model.

Rules (ARCHITECTURE.md, "The elastic policy, in words"):

* demand = pages held by running sequences + pages they are expected to need over the next
  ``horizon_steps`` decode steps + pages of the prefills waiting to start;
* target resident = demand * (1 + headroom), clamped to [min, budget];
* grow at once when resident falls under the target;
* shrink only after the target has stayed at least one chunk below resident for
  ``idle_seconds`` (hysteresis), and then only down to the highest target of the last
  ``idle_seconds``, and only if the load reached that peak within the last half of it (a
  load still draining waits for the floor), so a steady load never sees a grow/shrink cycle
  and a draining one gives memory back in one step;
* with nothing running or waiting for ``idle_seconds``, go back to the floor at once;
* a budget below what is resident is not idleness: shrink to it at once;
* pages kept on purpose beside the demand (prefix pages the cache keeps until they expire)
  sit on top of the target; an idle shrink waits until the room beside them exceeds
  ``headroom`` of them plus a chunk, so the room expiring pages leave under load goes to the
  next allocations instead of being unmapped and mapped again.

The policy holds no budget: the Engine's ``KVBudget`` (``budget.py``) owns that number, and
the memory controller hands it to ``decide`` in pages each tick.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from .._util import ceil_div, is_int

__all__ = ["Decision", "ElasticPolicy"]


@dataclass(frozen=True)
class Decision:
    """What the policy wants done to the pool now.

    ``action`` is ``"grow"`` (map until ``target_pages`` pages are resident), ``"shrink"``
    (give back empty chunks, compact, give back again, keeping ``target_pages``) or
    ``"none"``. ``forced`` is true for a shrink caused by a budget cut rather than idleness.
    """

    action: str
    target_pages: int
    forced: bool = False


def _check_nonneg_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < 0:
        raise ValueError(f"ElasticPolicy: {name} must be a non-negative int, got {value!r}")


class ElasticPolicy:
    """Turns demand and a budget (in KV pages) into a resident-page target with hysteresis.

    Args:
        min_bytes: resident floor; the pool never shrinks below it (the pool rounds it up to
            whole chunks).
        max_bytes: the most KV memory the pool may hold (the budget's ceiling); ``None`` means
            the pool's own limit.
        headroom: fraction of demand kept resident on top of it, so short bursts need no map.
        idle_seconds: how long demand must stay below resident before resident memory
            follows it down (pages unmapped).
        release_seconds: how long unmapped physical memory is kept for the next grow before
            it goes back to the driver/OS (like mimalloc's ``purge_delay``): 0 at once,
            ``None`` (default) 0 on CPU and ``4 * idle_seconds`` on CUDA, where creating a
            handle again is the expensive call. A budget cut releases at once regardless.
        horizon_steps: how many decode steps ahead growth of running requests is counted.
        swap_bytes: host memory preempted requests may park their KV in (0: always recompute).
        clock: seconds, monotonic; injectable for tests.

    ``min_bytes == max_bytes`` makes a static pool: mapped at start and never shrunk.
    """

    def __init__(
        self,
        min_bytes: int = 0,
        max_bytes: Optional[int] = None,
        headroom: float = 0.1,
        idle_seconds: float = 5.0,
        release_seconds: Optional[float] = None,
        horizon_steps: int = 16,
        swap_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_nonneg_int("min_bytes", min_bytes)
        _check_nonneg_int("max_bytes", max_bytes, allow_none=True)
        _check_nonneg_int("horizon_steps", horizon_steps)
        _check_nonneg_int("swap_bytes", swap_bytes)
        if max_bytes is not None and min_bytes > max_bytes:
            raise ValueError(f"ElasticPolicy: min_bytes ({min_bytes}) is larger than max_bytes ({max_bytes})")
        if not isinstance(headroom, (int, float)) or not 0.0 <= headroom <= 10.0:
            raise ValueError(f"ElasticPolicy: headroom must be in [0, 10], got {headroom!r}")
        if not isinstance(idle_seconds, (int, float)) or isinstance(idle_seconds, bool) or idle_seconds < 0:
            raise ValueError(f"ElasticPolicy: idle_seconds must be >= 0, got {idle_seconds!r}")
        if release_seconds is not None and (
            not isinstance(release_seconds, (int, float)) or isinstance(release_seconds, bool) or release_seconds < 0
        ):
            raise ValueError(f"ElasticPolicy: release_seconds must be None or >= 0, got {release_seconds!r}")
        self.min_bytes = int(min_bytes)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.headroom = float(headroom)
        self.idle_seconds = float(idle_seconds)
        self.release_seconds = None if release_seconds is None else float(release_seconds)
        self.horizon_steps = int(horizon_steps)
        self.swap_bytes = int(swap_bytes)
        self.clock = clock

        self._page_bytes: Optional[int] = None
        self._page_tokens: Optional[int] = None
        self._pages_per_chunk = 1
        self._chunk_bytes: Optional[int] = None
        # hysteresis state: when the target first fell below resident, and the targets of
        # the last idle_seconds as a monotone deque of (time, target) for a sliding maximum
        self._below_since: Optional[float] = None
        self._recent: deque[tuple[float, int]] = deque()
        self._zero_since: Optional[float] = None  # demand has been 0 since
        # learned output length (running mean over finished requests)
        self._finished = 0
        self._finished_tokens = 0

    # ---- binding to a pool ------------------------------------------------------------
    def bind(
        self,
        page_bytes: int,
        page_tokens: int,
        pages_per_chunk: int = 1,
        chunk_bytes: Optional[int] = None,
        pool_max_bytes: Optional[int] = None,
    ) -> None:
        """Tell the policy the pool's geometry (the Engine calls this once).

        ``pages_per_chunk`` pages live in one mapping unit of ``chunk_bytes`` physical
        bytes (default: exactly those pages); a budget only buys whole units.
        ``pool_max_bytes``: the pool's own limit, adopted as ``max_bytes`` when the policy
        was given none.
        """
        if not isinstance(page_bytes, int) or page_bytes <= 0:
            raise ValueError(f"ElasticPolicy.bind: page_bytes must be > 0, got {page_bytes!r}")
        if not isinstance(page_tokens, int) or page_tokens <= 0:
            raise ValueError(f"ElasticPolicy.bind: page_tokens must be > 0, got {page_tokens!r}")
        if not isinstance(pages_per_chunk, int) or pages_per_chunk <= 0:
            raise ValueError(f"ElasticPolicy.bind: pages_per_chunk must be > 0, got {pages_per_chunk!r}")
        self._page_bytes = page_bytes
        self._page_tokens = page_tokens
        self._pages_per_chunk = pages_per_chunk
        self._chunk_bytes = chunk_bytes or page_bytes * pages_per_chunk
        if self.max_bytes is None and pool_max_bytes is not None:
            self.max_bytes = int(pool_max_bytes)

    @property
    def page_bytes(self) -> int:
        if self._page_bytes is None:
            raise RuntimeError("ElasticPolicy: bind(page_bytes, page_tokens) was not called")
        return self._page_bytes

    @property
    def page_tokens(self) -> int:
        if self._page_tokens is None:
            raise RuntimeError("ElasticPolicy: bind(page_bytes, page_tokens) was not called")
        return self._page_tokens

    @property
    def is_static(self) -> bool:
        """True when min_bytes == max_bytes: a pool mapped at start and never shrunk."""
        return self.max_bytes is not None and self.min_bytes == self.max_bytes

    # ---- budget in pages ----------------------------------------------------------------
    def bytes_to_pages(self, nbytes: int) -> int:
        """Pages that ``nbytes`` of budget buys: whole chunks only."""
        gb = self._chunk_bytes or self.page_bytes
        return nbytes // gb * self._pages_per_chunk

    def min_pages(self) -> int:
        return ceil_div(self.min_bytes, self.page_bytes)

    # ---- learning the output length ---------------------------------------------------
    def record_finished(self, output_tokens: int) -> None:
        """Learn from a finished request how many tokens requests produce."""
        self._finished += 1
        self._finished_tokens += int(output_tokens)

    def expected_output_tokens(self, max_new_tokens: int) -> float:
        """Expected output length of a request: the learned mean, capped by its limit."""
        if self._finished == 0:
            return float(max_new_tokens)
        return min(float(max_new_tokens), self._finished_tokens / self._finished)

    def growth_tokens(self, generated: int, max_new_tokens: int) -> int:
        """Tokens a running request is expected to add over the next ``horizon_steps`` steps."""
        expected = self.expected_output_tokens(max_new_tokens)
        # a request already past the mean is expected to run at least one more step
        remaining = max(math.ceil(expected) - generated, 1 if generated < max_new_tokens else 0)
        return min(self.horizon_steps, remaining, max_new_tokens - generated)

    def growth_pages(self, stored_tokens: int, generated: int, max_new_tokens: int) -> int:
        """Pages a running request holding ``stored_tokens`` is expected to add soon."""
        pt = self.page_tokens
        grow = self.growth_tokens(generated, max_new_tokens)
        return ceil_div(stored_tokens + grow, pt) - (ceil_div(stored_tokens, pt))

    # ---- the decision -----------------------------------------------------------------
    def target_pages(self, demand_pages: int, budget_pages: int) -> int:
        """Resident pages wanted for this demand: demand * (1 + headroom) within [min, budget]."""
        want = math.ceil(demand_pages * (1.0 + self.headroom) - 1e-9)  # 110*1.1 is 121.00000000000001
        return max(min(want, budget_pages), min(self.min_pages(), budget_pages))

    def decide(
        self, demand_pages: int, resident_pages: int, budget_pages: int, chunk_pages: int = 1, kept_pages: int = 0
    ) -> Decision:
        """One policy tick: compare the target with what is resident and say what to do.

        ``budget_pages``: what the budget allows now, in pages (whole chunks, within the
        pool). ``chunk_pages`` is how many pages one chunk holds: a shrink that cannot give
        back at least one chunk is not worth starting. ``kept_pages``: resident pages kept on
        purpose beside the demand (the prefix cache's, until they expire); the rules size the
        rest, and the decision's target includes them.
        """
        if demand_pages < 0 or resident_pages < 0 or budget_pages < 0:
            raise ValueError(
                f"decide: demand_pages ({demand_pages}), resident_pages ({resident_pages}) and "
                f"budget_pages ({budget_pages}) must be >= 0"
            )
        if kept_pages:
            if not is_int(kept_pages) or not 0 <= kept_pages <= resident_pages:
                raise ValueError(
                    f"decide: kept_pages ({kept_pages!r}) must be in [0, resident_pages ({resident_pages})]"
                )
            d = self.decide(demand_pages, resident_pages - kept_pages, max(0, budget_pages - kept_pages), chunk_pages)
            target = d.target_pages + kept_pages
            room = resident_pages - target
            if d.action == "shrink" and not d.forced and room < self.headroom * kept_pages + max(1, chunk_pages):
                return Decision("none", target)
            return Decision(d.action, target, d.forced)
        now = self.clock()
        budget = budget_pages
        if self.is_static:
            # a static pool holds its whole budget: all of it while the budget is the ceiling,
            # exactly the cut while it is lower
            self._below_since = None
            if resident_pages > budget:
                return Decision("shrink", budget, forced=True)
            return Decision("grow", budget) if resident_pages < budget else Decision("none", budget)
        target = self.target_pages(demand_pages, budget)
        peak_time, peak = self._note_target(now, target)
        g = max(1, chunk_pages)
        if demand_pages == 0:
            if self._zero_since is None:
                self._zero_since = now
        else:
            self._zero_since = None
        if resident_pages > budget:
            # a budget cut is not idleness: give back at once
            self._below_since = None
            return Decision("shrink", min(target, budget), forced=True)
        if target > resident_pages:
            self._below_since = None
            return Decision("grow", target)
        if target + g > resident_pages:
            # demand is close to resident: not idle
            self._below_since = None
            return Decision("none", target)
        if self._below_since is None:
            self._below_since = now
        if self._zero_since is not None and now - self._zero_since >= self.idle_seconds:
            # nothing running or waiting for idle_seconds: back to the floor
            return Decision("shrink", target)
        # shrink to the trailing peak only if the load came back to that peak recently: a
        # load that is still draining has its peak at the window's old edge, and waiting for
        # the floor gives memory back once instead of in a staircase
        if (
            now - self._below_since >= self.idle_seconds
            and peak + g <= resident_pages
            and now - peak_time <= self.idle_seconds / 2
        ):
            return Decision("shrink", peak)
        return Decision("none", target)

    def _note_target(self, now: float, target: int) -> tuple[float, int]:
        """Record this tick's target; return (when, value) of the highest of the last
        idle_seconds (the latest time it was reached)."""
        q = self._recent
        while q and q[-1][1] <= target:
            q.pop()
        q.append((now, target))
        while q[0][0] < now - self.idle_seconds:
            q.popleft()
        return q[0]

    def describe(self) -> dict:
        """The policy's settings and state as a plain dict."""
        return {
            "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes,
            "headroom": self.headroom,
            "idle_seconds": self.idle_seconds,
            "release_seconds": self.release_seconds,
            "horizon_steps": self.horizon_steps,
            "swap_bytes": self.swap_bytes,
            "expected_output_tokens": (self._finished_tokens / self._finished if self._finished else None),
        }
