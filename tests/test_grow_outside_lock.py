"""A grow maps outside the pool's lock (and the Engine's pool lock): other threads' pool calls
complete while the driver is still creating, and nobody sees, uses or unmaps a chunk that is
being mapped. The fake driver's latency keeps the grow asleep in cuMemCreate; the tests
assert the order of events, not durations."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from torch_elastic_kv.engine.memory import MemoryController
from torch_elastic_kv.engine.policy import ElasticPolicy
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing import FakeCuda
from torch_elastic_kv.testing.standins import PoolDemand

MiB = 1 << 20
SLOW = 0.5  # seconds per cuMemCreate while a grow is in flight


def make_pool(layout: str = "page-major") -> KVPagePool:
    # 2 layers x 2 heads x 64 dims fp16, 16-token pages: 128 pages per 2 MiB chunk (page-major)
    return KVPagePool(2, 2, 64, torch.float16, device="cuda:0", page_tokens=16, max_bytes=32 * MiB, layout=layout)


def start_grow(pool: KVPagePool, n: int, log: list[str]) -> threading.Thread:
    """reserve_pages(n) on another thread; returns once its chunks are being mapped."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pool.reserve_pages(n)
            log.append("grow returned")
        except BaseException as e:  # reported by the test through `errors`
            errors.append(e)
            log.append(f"grow raised {type(e).__name__}")

    th = threading.Thread(target=run)
    th.errors = errors  # type: ignore[attr-defined]
    th.start()
    deadline = time.monotonic() + 30
    while pool.stats()["growing_chunks"] == 0:
        assert th.is_alive() and time.monotonic() < deadline, "the grow never started mapping"
        time.sleep(0.001)
    return th


@pytest.mark.parametrize("layout", ["page-major", "layer-major"])
def test_pool_calls_complete_while_a_grow_sleeps_in_the_driver(fake_cuda: FakeCuda, layout: str) -> None:
    with make_pool(layout) as pool:
        per = pool.stats()["pages_per_chunk"]
        pool.reserve_pages(per)  # one chunk mapped already
        held = pool.alloc(3)
        fake_cuda.set_latency("cuMemCreate", SLOW)
        log: list[str] = []
        th = start_grow(pool, (per - 3) + 2 * per, log)  # 2 more chunks beyond the free slots
        pages = pool.alloc(per - 3)  # fills the mapped chunk: no mapping needed
        pool.free(pages + held[:1])
        s = pool.stats()
        assert pool.can_alloc(1) and pool.is_live(held[1])
        assert s["growing_chunks"] == 2 and s["resident_pages"] == per  # not usable before commit
        assert pool.shrink(0) == 0 and pool.compact() == 0  # live pages hold the only mapped chunk
        log.append("other calls done")
        th.join()
        fake_cuda.set_latency("cuMemCreate", 0)
        assert log == ["other calls done", "grow returned"]
        s = pool.stats()
        assert s["resident_pages"] == 3 * per and s["growing_chunks"] == 0 and s["grows"] == 2


def test_shrink_does_not_unmap_a_chunk_being_mapped(fake_cuda: FakeCuda) -> None:
    with make_pool() as pool:
        per = pool.stats()["pages_per_chunk"]
        pool.reserve_pages(2 * per)  # two empty chunks mapped
        fake_cuda.set_latency("cuMemCreate", SLOW)
        log: list[str] = []
        th = start_grow(pool, 3 * per, log)  # one more chunk
        assert pool.shrink(0) == 2 * pool.chunk_bytes  # the empty mapped ones go, not the new one
        log.append("shrunk")
        th.join()
        fake_cuda.set_latency("cuMemCreate", 0)
        assert log == ["shrunk", "grow returned"]
        assert pool.resident_bytes == pool.chunk_bytes
        assert len(pool.alloc(per)) == per and pool.resident_bytes == pool.chunk_bytes  # its chunk is usable
        # the shrunk chunks' deferred unmaps finish here, or already did inside the grow's map
        # (which finishes pending unmaps it can): either way they leave the driver's mappings
        pool.poll()
        assert fake_cuda.live_mappings() == 1


def test_alloc_beyond_the_mapped_slots_waits_for_the_grow_and_uses_it(fake_cuda: FakeCuda) -> None:
    with make_pool() as pool:
        per = pool.stats()["pages_per_chunk"]
        fake_cuda.set_latency("cuMemCreate", SLOW)
        log: list[str] = []
        th = start_grow(pool, per, log)
        pages = pool.alloc(per)  # the grow's chunk serves it: no second chunk mapped
        log.append("alloc returned")
        th.join()
        fake_cuda.set_latency("cuMemCreate", 0)
        assert log == ["grow returned", "alloc returned"]
        assert len(pages) == per and pool.resident_bytes == pool.chunk_bytes
        assert fake_cuda.create_count() == 1


def test_a_failed_grow_rolls_back_its_reservation(fake_cuda: FakeCuda) -> None:
    with make_pool() as pool:
        per = pool.stats()["pages_per_chunk"]
        pool.reserve_pages(per)
        before = (pool.stats(), fake_cuda.counts())
        fake_cuda.set_latency("cuMemCreate", SLOW)
        fake_cuda.fail_nth("cuMemSetAccess", 2, 999)  # the second new chunk's access
        log: list[str] = []
        th = start_grow(pool, 3 * per, log)
        assert pool.stats()["growing_chunks"] == 2
        th.join()
        fake_cuda.set_latency("cuMemCreate", 0)
        assert log == ["grow raised RuntimeError"] and "cuMemSetAccess" in str(th.errors[0])
        # The chunk mapped before the failure was unmapped again (on a device, once its event is
        # done: release_cached waits for it and gives its handle back).
        assert pool.release_cached() == pool.chunk_bytes
        after = (pool.stats(), fake_cuda.counts())
        assert after == before  # nothing mapped, nothing reserved, nothing counted
        pool.reserve_pages(3 * per)  # the chunks are free to map again
        assert pool.resident_bytes == 3 * pool.chunk_bytes


def test_close_waits_for_a_grow_in_flight(fake_cuda: FakeCuda) -> None:
    pool = make_pool()
    fake_cuda.set_latency("cuMemCreate", SLOW)
    log: list[str] = []
    th = start_grow(pool, 1, log)
    pool.close()
    log.append("closed")
    th.join()
    fake_cuda.set_latency("cuMemCreate", 0)
    assert log == ["grow returned", "closed"]
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


def test_the_background_grow_does_not_hold_the_engines_pool_lock(fake_cuda: FakeCuda) -> None:
    with make_pool() as pool:
        per = pool.stats()["pages_per_chunk"]
        pool.reserve_pages(per)
        pool_lock = threading.RLock()
        demand = PoolDemand(pool)
        ctrl = MemoryController(
            pool,
            ElasticPolicy(max_bytes=32 * MiB, headroom=0.0),
            demand,
            demand,
            step_lock=threading.RLock(),
            pool_lock=pool_lock,
            grow_in_background=True,
        )
        fake_cuda.set_latency("cuMemCreate", SLOW)
        log: list[str] = []

        def grower() -> None:
            ctrl.grow_to(3 * per)
            log.append("grow returned")

        th = threading.Thread(target=grower)
        th.start()
        deadline = time.monotonic() + 30
        while pool.stats()["growing_chunks"] == 0:
            assert time.monotonic() < deadline, "the grow never started mapping"
            time.sleep(0.001)
        with pool_lock:  # what schedule() / postprocess() take
            pages = pool.alloc(4)
            pool.free(pages)
        log.append("step's pool work done")
        th.join()
        fake_cuda.set_latency("cuMemCreate", 0)
        assert log == ["step's pool work done", "grow returned"]
        assert pool.resident_bytes == 3 * pool.chunk_bytes and ctrl.grow_events == 1
