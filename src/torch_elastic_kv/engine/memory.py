"""When KV memory is taken and given back: the Engine's memory controller.

How much may be held is the ``KVBudget``'s answer (``budget.py``: ceiling, requested budget,
lease, sleep); this controller makes resident memory follow it on one path, ``enforce``:
preempt what no longer fits, shrink/compact, cap the pool. Every step begins with
``before_step`` (``enforce`` when the budget changed since it last ran, or when live pages
exceed it) and ends with ``after_step`` (one ``ElasticPolicy`` decision: grow ahead of demand,
or, after the policy's idle hysteresis, shrink). A budget change also wakes the background
thread at once, so an idle Engine follows a lease or a cut without waiting for a step. A shrink gives back empty chunks, compacts live pages into fewer chunks and gives
back again. A grow maps chunks ahead of need — on CUDA from the background thread, so the
step never waits on the driver; on CPU at the end of the step before the one that needs the
pages. The background grower holds no lock while the driver maps (the pool reserves its
chunks, maps them unlocked and commits them), so ``schedule()``/``postprocess()`` proceed
meanwhile. While nobody steps, the background thread keeps ticking, which is how an idle
engine gives memory back.

When is memory given back to the driver/OS? Two knobs, both on the policy:

* ``idle_seconds``: resident memory follows demand down after it has stayed below for that
  long (the policy's hysteresis); a shrink unmaps chunks. Cached prefix pages are not demand:
  an idle shrink takes those never reused, unless the traffic reuses enough of its pages, in
  which case they are kept on top of what the policy sizes until they expire
  (``eviction.py`` says which pages go, and when). Without that reuse they never make the
  pool grow either: an allocation takes them before it maps a chunk.
* ``release_seconds``: how long unmapped physical memory is kept for the next grow (the
  arenas' reuse caches, at most the pool's ``reuse_bytes``) before ``pool.trim()`` gives it
  to the driver. Default: 0 on CPU (the idle shrink is when CPU users expect RSS to fall, and
  the host's commit is cheap) and 4 x ``idle_seconds`` on CUDA (``cuMemCreate`` is the
  expensive call). Whatever it says, a budget cut (any input of the budget lowering it:
  ``set_budget``, a lease, sleep) and close release at once.

``set_budget`` changes the ceiling at once (preempting what no longer fits); a budget cut
or a failed grow never drops a request: preempted requests are swapped or recomputed later.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import torch

from .._util import ceil_div
from .budget import KVBudget
from .policy import Decision, ElasticPolicy
from .prefix_cache import PrefixCache
from .scheduler import Scheduler

_log = logging.getLogger(__name__)

__all__ = ["MemoryController"]


class MemoryController:
    """The policy tick, grow / shrink / compact, budget enforcement and the background thread.

    ``pool`` is the Engine's page pool, ``backend`` the scheduler's view of pages held,
    ``budget`` the one owner of how much may be held (built from the policy's
    ``max_bytes``/``min_bytes`` within the pool's reservation when omitted);
    ``step_lock`` serialises steps and budget changes, ``pool_lock`` guards the pool's
    bookkeeping between the step and the background thread. When unmapped memory goes back:
    the policy's ``release_seconds`` (see the module docstring).
    """

    def __init__(
        self,
        pool: Any,
        policy: ElasticPolicy,
        scheduler: Scheduler,
        backend: Any,
        budget: Optional[KVBudget] = None,
        *,
        step_lock: threading.RLock,
        pool_lock: threading.RLock,
        grow_in_background: bool,
        prefix: Optional[PrefixCache] = None,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.scheduler = scheduler
        self.backend = backend
        self._step_lock = step_lock
        self._pool_lock = pool_lock
        pstats = pool.stats()
        self.chunk_pages = int(pstats["pages_per_chunk"])
        self.chunk_bytes = int(pool.chunk_bytes)
        self.reserved_bytes = int(pstats["reserved_bytes"])
        if budget is None:
            ceiling = self.reserved_bytes if policy.max_bytes is None else min(policy.max_bytes, self.reserved_bytes)
            budget = KVBudget(ceiling, min(policy.min_bytes, ceiling))
        self.budget = budget
        self.prefix = prefix
        policy.bind(pool.page_bytes, pool.page_tokens, self.chunk_pages, self.chunk_bytes, int(pstats["max_bytes"]))
        self.async_grow = grow_in_background
        release = policy.release_seconds
        if release is None:
            # (stand-in pools without a device are CPU pools)
            device = getattr(pool, "device", None)
            on_cuda = device is not None and torch.device(device).type == "cuda"
            release = 4 * policy.idle_seconds if on_cuda else 0.0
        self.release_seconds = release
        self.keep_reuse = release > 0  # shrinks keep the reuse caches until release_seconds pass
        self.cache_releases = 0
        self._busy_at = policy.clock()  # last tick with demand (or a grow)
        self._cache_kept = False  # a shrink kept handles that the idle release has not released
        self.grow_events = 0
        self.shrink_events = 0
        self.compact_events = 0
        self.bytes_given_back = 0
        self.policy_seconds = 0.0  # wall time of the steps' memory work (what elasticity costs)
        self.last_error: Optional[str] = None  # the background thread's last failure
        self.background_errors = 0
        self._thread: Optional[threading.Thread] = None
        self._cv = threading.Condition()
        self._stopping = False
        self._grow_target = 0
        self._pending_pages = 0  # prompt pages of requests added since the last tick
        self._budget_changed = False  # the background thread's wake-up reason
        self._enforced_version = -1  # the budget version the last enforce() applied
        self._enforced_bytes = budget.effective_bytes()
        self.ceiling_pages = min(pool.max_pages, policy.bytes_to_pages(budget.ceiling_bytes))
        budget.add_listener(self._on_budget_change)
        self.apply_pool_budget()
        if policy.is_static:  # the static pool is mapped at start
            self.grow_to(policy.target_pages(0, pool.max_pages))

    # -- figures -------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return self.pool.resident_bytes

    def resident_pages(self) -> int:
        return self.resident_bytes() // self.chunk_bytes * self.chunk_pages

    def budget_pages(self) -> int:
        """Pages the effective budget allows: whole chunks, never more than the pool has."""
        return min(self.pool.max_pages, self.policy.bytes_to_pages(self.budget.effective_bytes()))

    def demand(self) -> int:
        """Pages the requests need now and soon: held, expected growth, and waiting prompts."""
        pol = self.policy
        held, growth, waiting = self.scheduler.demand_pages(
            lambda s: pol.growth_pages(s.num_computed, s.num_generated, s.max_new_tokens)
        )
        return held + growth + waiting

    # -- the step's memory work ----------------------------------------------------------------
    def before_step(self) -> int:
        """Budget enforcement before scheduling; returns the requests preempted."""
        t = time.perf_counter()
        try:
            if self.budget.version != self._enforced_version or self._allocated() > self.budget_pages():
                return self.enforce()
            return 0
        finally:
            self.policy_seconds += time.perf_counter() - t

    def after_step(self) -> Decision:
        """The policy tick after the forward."""
        t = time.perf_counter()
        try:
            return self.tick()
        finally:
            self.policy_seconds += time.perf_counter() - t

    def apply_pool_budget(self) -> None:
        """Cap the pool at the effective budget, within what the pool accepts (never below
        what is live or the floor)."""
        live_chunks = ceil_div(self._allocated(), self.chunk_pages)
        floor = max(live_chunks * self.chunk_bytes, self.policy.min_bytes, 1)
        self.pool.set_max_bytes(min(max(self.budget.effective_bytes(), floor), self.reserved_bytes))

    def enforce(self) -> int:
        """Make resident memory follow the budget now: preempt until live pages fit it, give
        back what is above it (empty chunks, then compaction; the reuse caches too when the
        budget went down), and cap the pool. Returns the requests preempted. The one path
        every budget change takes (``set_budget``, a lease, sleep and wake)."""
        version = self.budget.version
        effective = self.budget.effective_bytes()
        cut = effective < self._enforced_bytes
        budget = self.budget_pages()
        reason = self._cut_reason()
        with self._pool_lock:
            # cached prefix pages go first (whole chunks of them first), then live requests;
            # a preempted request's indexed pages become cached, so evict once more after it
            self._evict_cached_to(budget, reason)
            n = len(self.scheduler.preempt_until(budget)) if self.backend.live_pages() > budget else 0
            self._evict_cached_to(budget, reason)
            self.shrink_to(min(budget, self.resident_pages()), release=cut)
            self.apply_pool_budget()
        self._enforced_version = version
        self._enforced_bytes = effective
        return n

    def _allocated(self) -> int:
        """Pages taken from the pool: held by requests, plus cached prefix pages."""
        return self.backend.live_pages() + (self.prefix.cached_pages if self.prefix is not None else 0)

    def _evict_cached_to(self, budget_pages: int, reason: str) -> None:
        if self.prefix is not None and self._allocated() > budget_pages:
            self.prefix.evict_to(budget_pages, reason)

    def _cut_reason(self) -> str:
        """Which input holds the budget down: a lease ("reclaim") or the Engine's own ("budget")."""
        snap = self.budget.snapshot()
        lease = snap["lease_bytes"]
        own = (
            0
            if snap["asleep"]
            else (snap["requested_bytes"] if snap["requested_bytes"] is not None else snap["ceiling_bytes"])
        )
        return "reclaim" if lease is not None and max(lease, snap["floor_bytes"]) < own else "budget"

    def _on_budget_change(self) -> None:
        """A budget input changed (any thread): wake the background thread to enforce it now
        if nobody is stepping; a step enforces it first thing anyway."""
        with self._cv:
            self._budget_changed = True
            self._cv.notify()

    def tick(self) -> Decision:
        """One policy decision; grows go to the background thread (when it grows), shrinks
        happen here."""
        with self._pool_lock:
            if self.prefix is not None:
                self.prefix.expire()
            demand = self.demand()
            # cached pages the cache keeps through idle shrinks (the traffic reuses its pages)
            # are not demand, but not idle memory either: the policy puts them on top
            kept = self.prefix.cached_pages if self.prefix is not None and self.prefix.keeps_unused_when_idle() else 0
            d = self.policy.decide(demand, self.resident_pages(), self.budget_pages(), self.chunk_pages, kept)
            if d.action == "shrink":
                if self.prefix is not None and not kept:
                    # cached pages whose tokens never came back go first
                    self.prefix.evict_unused_to(d.target_pages)
                self.shrink_to(d.target_pages)
            now = self.policy.clock()
            if demand or d.action == "grow":
                self._busy_at = now
            elif self._cache_kept and now - self._busy_at >= self.release_seconds:
                self.release_cache()
        if d.action == "grow":
            if self.async_grow and self._thread is not None:
                with self._cv:
                    self._grow_target = max(self._grow_target, d.target_pages)
                    self._cv.notify()
            else:
                with self._pool_lock:
                    self.grow_to(d.target_pages)
        return d

    def maintain(self) -> Decision:
        """Enforce the budget if it changed and tick, without a step (what the background
        thread does)."""
        self.before_step()
        return self.tick()

    def grow_to(self, target_pages: int) -> None:
        """Map chunks until ``target_pages`` pages are resident (within the budget).

        The figures are read under ``pool_lock``; the mapping is not (the pool maps outside
        its own lock too), so a background grow does not hold up the step."""
        with self._pool_lock:
            resident = self.resident_pages()
            live = self._allocated()
            target = min(target_pages, self.budget_pages())
            if target <= resident:
                return
        try:
            # reserve_pages(n): n free pages resident beyond the live ones
            self.pool.reserve_pages(max(0, target - live))
        except (MemoryError, torch.OutOfMemoryError):
            return  # the device is short: allocation in the step will say so if it matters
        if self.resident_pages() > resident:
            self.grow_events += 1

    def release_cache(self) -> int:
        """Give the arenas' reuse caches back to the driver (CUDA pools; a CPU pool's shrinks
        release them already); returns the bytes released."""
        if not self.keep_reuse:
            return 0
        with self._pool_lock:
            released = self.pool.release_cached()
            self._cache_kept = False
            if released:
                self.cache_releases += 1
            return released

    def shrink_to(self, keep_pages: int, release: bool = False) -> None:
        """Give back empty chunks, compact, give back again; keep ``keep_pages`` resident.

        The unmapped handles stay in the arenas' reuse caches on CUDA unless ``release`` (see
        the module docstring); on CPU they are always released."""
        before = self.resident_bytes()
        live = self._allocated()  # cached prefix pages are kept: evicting them is the budget's call
        keep = max(keep_pages, live)
        if self.resident_pages() - keep < self.chunk_pages:
            if release:
                self.release_cache()
            return  # not a whole chunk to give back
        self.pool.shrink(keep)
        if self.resident_pages() - keep >= self.chunk_pages:
            # live pages are spread over more chunks than they need: pack them
            compactions = self.pool.stats()["compactions"]
            self.pool.compact()
            if self.pool.stats()["compactions"] > compactions:
                self.compact_events += 1
        if not self.keep_reuse:
            self.pool.trim()
        elif release:
            self.release_cache()
        else:
            self.pool.poll()  # finished unmaps go to the reuse caches (within reuse_bytes)
            self._cache_kept = True
        # compact() and trim() give back every empty chunk; keep what the policy asked for
        if self.resident_pages() < keep:
            try:
                self.pool.reserve_pages(keep - live)
            except (MemoryError, torch.OutOfMemoryError):
                pass
        after = self.resident_bytes()
        if after < before:
            self.shrink_events += 1
            self.bytes_given_back += before - after

    # -- the background thread -----------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (idle ticks; grows too when ``grow_in_background``)."""
        self._thread = threading.Thread(target=self._loop, name="ekv-memory", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.budget.remove_listener(self._on_budget_change)
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def prompt_arrived(self, pages: int) -> None:
        """A request arrived: map its prompt's pages ahead of the step that admits it."""
        if not (self.async_grow and self._thread is not None):
            return
        with self._cv:
            self._pending_pages += pages
            self._cv.notify()

    def _loop(self) -> None:
        # not a knob: how often an idle Engine re-checks the policy's idle timer (a budget
        # change does not wait for it: it wakes the thread)
        idle_poll = max(0.05, min(1.0, self.policy.idle_seconds / 4))
        while True:
            with self._cv:
                if not (self._stopping or self._grow_target or self._pending_pages or self._budget_changed):
                    self._cv.wait(timeout=idle_poll)
                if self._stopping:
                    return
                target, self._grow_target = self._grow_target, 0
                pending, self._pending_pages = self._pending_pages, 0
                self._budget_changed = False
            try:
                if pending and not target:
                    with self._pool_lock:
                        demand = self.demand() + pending
                    target = self.policy.target_pages(demand, self.budget_pages())
                if target:
                    self.grow_to(target)
                elif self._step_lock.acquire(blocking=False):
                    # nobody is stepping: keep the policy ticking so idle memory goes back, and
                    # a budget change (a reclaim, a cut) takes effect now, not at the next step
                    try:
                        if not self.scheduler.running or self.budget.version != self._enforced_version:
                            self.maintain()
                    finally:
                        self._step_lock.release()
            except Exception as exc:  # the thread must not die; it records what went wrong
                self.background_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.warning("background memory thread: %s", self.last_error)

    def stats(self) -> dict[str, Any]:
        return {
            "grow_events": self.grow_events,
            "shrink_events": self.shrink_events,
            "compact_events": self.compact_events,
            "bytes_given_back": self.bytes_given_back,
            "policy_seconds": self.policy_seconds,
            "background_errors": self.background_errors,
            "cache_releases": self.cache_releases,
            "background_last_error": self.last_error,
        }


def _lowered(before: Optional[int], after: Optional[int]) -> bool:
    """Whether a budget went down (None is unlimited)."""
    return after is not None and (before is None or after < before)
