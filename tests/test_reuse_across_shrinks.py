"""The Engine's memory controller keeps the arenas' reuse caches across shrinks on CUDA (so a
grow after a shrink creates no handles) and releases them on a budget cut, when a lease
falls, and after the policy's ``release_seconds`` with nothing to do; on CPU (by default) every
shrink releases."""

from __future__ import annotations

import threading
from typing import Optional

import pytest
import torch

from torch_elastic_kv.engine.memory import MemoryController
from torch_elastic_kv.engine.policy import ElasticPolicy
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing import FakeCuda, ManualClock
from torch_elastic_kv.testing.standins import PoolDemand

MiB = 1 << 20
IDLE = 1.0


def make(device: str):
    clock = ManualClock(100.0)
    pool = KVPagePool(2, 2, 64, torch.float16, device=device, page_tokens=16, max_bytes=64 * MiB)
    policy = ElasticPolicy(max_bytes=64 * MiB, idle_seconds=IDLE, headroom=0.0, clock=clock)
    demand = PoolDemand(pool)
    ctrl = MemoryController(
        pool,
        policy,
        demand,
        demand,
        step_lock=threading.RLock(),
        pool_lock=threading.RLock(),
        grow_in_background=False,
    )
    return pool, ctrl, demand, clock


def grow(ctrl: MemoryController, demand: PoolDemand, chunks: int) -> None:
    demand.waiting = chunks * ctrl.chunk_pages
    assert ctrl.tick().action == "grow"
    assert ctrl.pool.resident_bytes == chunks * ctrl.chunk_bytes


def idle_shrink(ctrl: MemoryController, demand: PoolDemand, clock: ManualClock) -> None:
    demand.waiting = 0
    for _ in range(4):  # the policy's hysteresis: zero demand for idle_seconds
        ctrl.tick()
        clock.advance(IDLE / 2)
    assert ctrl.pool.resident_bytes == 0 and ctrl.shrink_events == 1


def test_a_grow_after_a_shrink_reuses_every_handle(fake_cuda: FakeCuda) -> None:
    pool, ctrl, demand, clock = make("cuda:0")
    with pool:
        grow(ctrl, demand, 8)
        creates = fake_cuda.create_count()
        assert creates == 8
        idle_shrink(ctrl, demand, clock)
        assert pool.cached_bytes() == 8 * ctrl.chunk_bytes and fake_cuda.live_handles() == 8
        assert fake_cuda.live_mappings() == 0  # unmapped: only the handles are kept
        grow(ctrl, demand, 8)
        assert fake_cuda.create_count() == creates  # no cuMemCreate: all 8 came from the caches
        assert pool.cached_bytes() == 0 and fake_cuda.live_handles() == 8
    assert fake_cuda.live_handles() == 0  # close releases the rest


def test_the_longer_idle_period_releases_the_caches(fake_cuda: FakeCuda) -> None:
    pool, ctrl, demand, clock = make("cuda:0")
    assert ctrl.release_seconds == 4 * IDLE
    with pool:
        grow(ctrl, demand, 4)
        idle_shrink(ctrl, demand, clock)  # the last demand was 2 s ago
        assert pool.cached_bytes() == 4 * ctrl.chunk_bytes
        clock.advance(4 * IDLE - 2.0 - 0.25)
        ctrl.tick()
        assert pool.cached_bytes() == 4 * ctrl.chunk_bytes  # not yet
        clock.advance(0.5)
        ctrl.tick()
        assert pool.cached_bytes() == 0 and fake_cuda.live_handles() == 0
        assert ctrl.stats()["cache_releases"] == 1
        ctrl.tick()  # nothing kept since: no further release
        assert ctrl.stats()["cache_releases"] == 1


def test_a_budget_cut_releases_the_caches_and_a_raise_does_not(fake_cuda: FakeCuda) -> None:
    pool, ctrl, demand, clock = make("cuda:0")
    with pool:
        grow(ctrl, demand, 4)
        idle_shrink(ctrl, demand, clock)
        set_budget(ctrl, 64 * MiB)  # unchanged from max_bytes: not a cut
        assert pool.cached_bytes() == 4 * ctrl.chunk_bytes
        set_budget(ctrl, 32 * MiB)
        assert pool.cached_bytes() == 0 and fake_cuda.live_handles() == 0
        grow(ctrl, demand, 4)
        idle_shrink_again(ctrl, demand, clock)
        set_budget(ctrl, None)  # back up to max_bytes
        assert pool.cached_bytes() == 4 * ctrl.chunk_bytes


def set_budget(ctrl: MemoryController, nbytes: Optional[int]) -> None:
    """What Engine.set_budget does: the budget's requested input, then enforce."""
    ctrl.budget.set_requested(nbytes)
    ctrl.enforce()


def idle_shrink_again(ctrl: MemoryController, demand: PoolDemand, clock: ManualClock) -> None:
    demand.waiting = 0
    while ctrl.pool.resident_bytes:
        ctrl.tick()
        clock.advance(IDLE / 2)


def test_a_lower_lease_releases_the_caches(fake_cuda: FakeCuda) -> None:
    pool, ctrl, demand, clock = make("cuda:0")
    with pool:
        grow(ctrl, demand, 4)
        idle_shrink(ctrl, demand, clock)
        assert ctrl.before_step() == 0
        assert pool.cached_bytes() == 4 * ctrl.chunk_bytes  # no lease yet
        ctrl.budget.set_lease(16 * MiB)
        ctrl.before_step()
        assert pool.cached_bytes() == 0 and fake_cuda.live_handles() == 0


def test_on_cpu_every_shrink_releases() -> None:
    pool, ctrl, demand, clock = make("cpu")
    assert not ctrl.keep_reuse
    with pool:
        grow(ctrl, demand, 4)
        idle_shrink(ctrl, demand, clock)
        assert pool.cached_bytes() == 0  # the host's idle shrink reaches the OS at once


def test_release_seconds_is_checked_and_chooses_what_a_shrink_keeps(fake_cuda: FakeCuda) -> None:
    for bad in (-1, "soon", True):
        with pytest.raises(ValueError, match=f"ElasticPolicy: release_seconds must be None or >= 0, got {bad!r}"):
            ElasticPolicy(max_bytes=8 * MiB, release_seconds=bad)
    for device, release, keeps in (("cuda:0", 0.0, False), ("cpu", 3.0, True)):
        pool = KVPagePool(2, 2, 64, torch.float16, device=device, page_tokens=16, max_bytes=64 * MiB)
        with pool:
            demand = PoolDemand(pool)
            clock = ManualClock(100.0)
            policy = ElasticPolicy(
                max_bytes=64 * MiB, idle_seconds=IDLE, headroom=0.0, clock=clock, release_seconds=release
            )
            ctrl = MemoryController(
                pool,
                policy,
                demand,
                demand,
                step_lock=threading.RLock(),
                pool_lock=threading.RLock(),
                grow_in_background=False,
            )
            assert ctrl.keep_reuse is keeps
            grow(ctrl, demand, 4)
            idle_shrink(ctrl, demand, clock)
            assert pool.cached_bytes() == (4 * ctrl.chunk_bytes if keeps else 0), device
