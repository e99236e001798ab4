"""The allocator's cuda path (device 0) through its C ABI, on the fake CUDA driver.

The fake driver's "device" memory is host memory, so contents are checked directly; its
counters (live handles, mappings, reservations, events, calls per function) show what reached
the driver. Each test ends with everything freed and the device's allocator closed, so the
driver is back to zero objects for the next test.
"""

from __future__ import annotations

import gc
import threading

import pytest

from allocator_helpers import (
    Abi,
    MiB,
    assert_disjoint_and_aligned,
    check,
    fill,
    four_thread_stress,
    mixed_sizes,
    stable_counts,
    tagged,
)
from torch_elastic_kv.memory import allocator as ekv_alloc

DEV = 0
S1, S2, S3 = 0x1000, 0x2000, 0x3000  # stream handles, made known to the fake driver by `dev`
THREAD_STREAMS = [0x10000 * (t + 1) for t in range(4)]
ZERO = {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


@pytest.fixture
def dev(fake_cuda):
    ekv_alloc.last_error(clear=True)
    for s in (S1, S2, S3, *THREAD_STREAMS):
        fake_cuda.create_stream(s)  # a record on a stream the driver does not know fails
    yield Abi(DEV), fake_cuda
    fake_cuda.set_events_complete(True)
    fake_cuda.complete_events()
    assert ekv_alloc.snapshot(DEV) == [], "a test leaked allocations"
    ekv_alloc.close(DEV)
    assert fake_cuda.counts() == ZERO


def test_mixed_sizes_then_trim_gives_every_handle_back(dev):
    abi, fake = dev
    sizes = mixed_sizes(50, seed=3)
    blocks = [(abi.malloc(n), n) for n in sizes]
    assert all(p for p, _ in blocks), ekv_alloc.last_error()
    assert_disjoint_and_aligned(blocks)
    for i, (p, n) in enumerate(blocks):
        fill(p, n, seed=i)
    for i, (p, n) in enumerate(blocks):
        assert check(p, n, seed=i)
    s = ekv_alloc.stats(DEV)
    assert fake.live_handles() * s["granularity"] == s["mapped_bytes"] >= sum(sizes)
    for p, n in blocks:
        abi.free(p, n)
    assert fake.live_handles() > 0  # freed blocks stay mapped, for reuse
    assert ekv_alloc.trim(DEV) >= sum(sizes)
    s = ekv_alloc.stats(DEV)
    assert s["mapped_bytes"] == 0 and s["segments"] == 0
    assert fake.live_handles() == 0 and fake.live_mappings() == 0 and fake.live_events() == 0
    assert fake.counts()["reservations"] == 1  # the address range stays reserved until close


def test_stream_ordered_reuse_records_no_event_on_free_and_one_per_stream_at_handoff(dev):
    abi, fake = dev
    fake.set_events_complete(False)  # queued device work: events stay not-ready
    sync0, rec0 = fake.calls("cuEventSynchronize"), fake.calls("cuEventRecord")
    small, big = abi.malloc(4096, S1), abi.malloc(6 * MiB, S1)
    abi.free(small, 4096, S1)
    abi.free(big, 6 * MiB, S1)
    assert fake.calls("cuEventRecord") == rec0 and fake.live_events() == 0  # nothing on the free path
    assert ekv_alloc.stats(DEV)["pending_free_bytes"] >= 6 * MiB + 4096
    # Another stream must not get memory the device may still be using: its miss hands S1's
    # blocks off, with one event for both ...
    other_small, other_big = abi.malloc(4096, S2), abi.malloc(6 * MiB, S2)
    assert other_small != small and other_big != big
    assert fake.calls("cuEventRecord") == rec0 + 1
    # ... the freeing stream gets them back at once, event or not.
    again_small, again_big = abi.malloc(4096, S1), abi.malloc(6 * MiB, S1)
    assert again_small == small and again_big == big
    for p, n, s in [
        (other_small, 4096, S2),
        (other_big, 6 * MiB, S2),
        (again_small, 4096, S1),
        (again_big, 6 * MiB, S1),
    ]:
        abi.free(p, n, s)
    assert fake.calls("cuEventSynchronize") == sync0  # nothing waited on the free path
    # Once the device is done, any stream may reuse the blocks: no new mapping.
    fake.set_events_complete(True)
    maps = ekv_alloc.stats(DEV)["maps"]
    x = abi.malloc(6 * MiB, S3)
    assert x in (big, other_big) and ekv_alloc.stats(DEV)["maps"] == maps
    assert ekv_alloc.stats(DEV)["events_recorded"] == 3  # S1's, then S1's and S2's
    abi.free(x, 6 * MiB, S3)


def test_limit_fails_mallocs_without_touching_the_driver_or_live_blocks(dev):
    abi, fake = dev
    live = [(abi.malloc(n), n) for n in (4 * MiB, 20_000)]
    for i, (p, n) in enumerate(live):
        fill(p, n, seed=40 + i)
    ekv_alloc.set_limit(2 * MiB, DEV)
    s0, handles, creates = ekv_alloc.stats(DEV), fake.live_handles(), fake.create_count()
    assert abi.malloc(8 * MiB) == 0
    assert "limit of 2097152 bytes" in ekv_alloc.last_error(clear=True)
    assert fake.live_handles() == handles and fake.create_count() == creates
    assert stable_counts(ekv_alloc.stats(DEV)) == stable_counts(s0)
    for i, (p, n) in enumerate(live):
        assert check(p, n, seed=40 + i)
    ekv_alloc.set_limit(None, DEV)
    p = abi.malloc(8 * MiB)
    assert p and fake.live_handles() == handles + 4
    abi.free(p, 8 * MiB)
    for p, n in live:
        abi.free(p, n)
    ekv_alloc.trim(DEV)


def test_pause_with_backup_drops_handles_and_restores_bytes(dev):
    abi, fake = dev
    with tagged("fake-kv"):
        mine = [(abi.malloc(n, S1), n) for n in (5000, 700_000, 7 * MiB + 1)]
    with tagged("fake-weights"):
        other = [(abi.malloc(n, S2), n) for n in (3 * MiB, 128)]
    for i, (p, n) in enumerate(mine + other):
        fill(p, n, seed=60 + i)
    snap = {b["address"]: b for b in ekv_alloc.snapshot(DEV)}
    assert [(snap[p]["tag"], snap[p]["stream"], snap[p]["size"]) for p, _ in mine + other] == [
        ("fake-kv", S1, n) for _, n in mine
    ] + [("fake-weights", S2, n) for _, n in other]
    handles = fake.live_handles()
    ekv_alloc.pause("fake-kv", backup=True, device=DEV)
    paused = ekv_alloc.stats(DEV)["tags"]["fake-kv"]["paused_bytes"]
    assert paused >= sum(n for _, n in mine)
    assert fake.live_handles() == handles - paused // (2 * MiB)
    for i, (p, n) in enumerate(other):
        assert check(p, n, seed=60 + len(mine) + i)
    ekv_alloc.resume("fake-kv")  # device=None: wherever the tag is paused
    assert fake.live_handles() == handles
    for i, (p, n) in enumerate(mine + other):
        assert check(p, n, seed=60 + i)
    for p, n in mine:
        abi.free(p, n, S1)
    for p, n in other:
        abi.free(p, n, S2)
    ekv_alloc.trim(DEV)


def test_driver_failure_in_malloc_returns_null_and_changes_nothing(dev):
    abi, fake = dev
    s0 = ekv_alloc.stats(DEV)
    fake.fail_nth("cuMemCreate", 1)
    assert abi.malloc(8 * MiB) == 0
    err = ekv_alloc.last_error(clear=True)
    assert "cuMemCreate" in err and "CUDA_ERROR_OUT_OF_MEMORY" in err and "size=8388608" in err
    assert stable_counts(ekv_alloc.stats(DEV)) == stable_counts(s0)
    assert fake.live_handles() == 0 and fake.live_mappings() == 0
    p = abi.malloc(8 * MiB)  # the device works again (a failed free: tests/test_cleanup_faults.py)
    assert p
    fill(p, 8 * MiB, seed=9)
    abi.free(p, 8 * MiB, S1)
    assert ekv_alloc.last_error() is None and ekv_alloc.snapshot(DEV) == []
    ekv_alloc.trim(DEV)


def test_close_refused_while_allocated(dev):
    abi, fake = dev
    p = abi.malloc(1 << 12)
    with pytest.raises(ValueError, match="1 allocations are live"):
        ekv_alloc.close(DEV)
    assert fake.live_handles() == 1
    abi.free(p, 1 << 12)


def test_one_handoff_event_covers_every_block_of_its_stream_and_one_query_promotes_them(dev):
    abi, fake = dev
    pairs = [(abi.malloc(3000, S1), abi.malloc(3000, S1)) for _ in range(64)]
    for p, _ in pairs:  # every other block: freed blocks have live neighbours, so none merge
        abi.free(p, 3000, S1)
    assert fake.live_events() == 0 and ekv_alloc.stats(DEV)["pending_free_bytes"] == 64 * 3072
    fake.set_events_complete(False)
    big = abi.malloc(6 * MiB, S2)  # a miss on S2: S1's 64 blocks are handed off with one event
    assert fake.live_events() == 1 and ekv_alloc.stats(DEV)["events_recorded"] == 1
    q0 = fake.calls("cuEventQuery")
    for _ in range(8):
        p = abi.malloc(100, S2)
        abi.free(p, 100, S2)
    assert fake.calls("cuEventQuery") - q0 <= 8  # at most one query per malloc
    assert ekv_alloc.stats(DEV)["pending_free_bytes"] >= 64 * 3072
    fake.complete_events()
    p = abi.malloc(100, S2)  # one query finds the event done: all 64 blocks become ready
    assert ekv_alloc.stats(DEV)["pending_free_bytes"] <= 100 * 512  # at most S2's own small frees
    assert fake.live_events() == 0
    abi.free(p, 100, S2)
    abi.free(big, 6 * MiB, S2)
    for _, q in pairs:
        abi.free(q, 3000, S1)
    ekv_alloc.trim(DEV)
    assert fake.live_events() == 0 and fake.live_handles() == 0


def test_adjacent_frees_on_one_stream_merge_and_are_reused_at_once(dev):
    abi, fake = dev
    fake.set_events_complete(False)
    blocks = [abi.malloc(3000, S1) for _ in range(16)]
    for p in blocks:
        abi.free(p, 3000, S1)
    assert fake.live_events() == 0  # one merged free block, no event yet
    assert abi.malloc(16 * 3072, S1) == blocks[0]  # the same stream reuses the merged range at once
    abi.free(blocks[0], 16 * 3072, S1)
    ekv_alloc.trim(DEV)
    assert fake.live_events() == 0 and ekv_alloc.stats(DEV)["events_recorded"] == 1


def test_malloc_free_from_a_thread_without_a_context_restore_its_context(dev):
    # torch calls ekv_malloc/ekv_free from whatever thread allocates: with no current context,
    # or another one. The driver calls run in the primary context; the thread's comes back.
    abi, fake = dev
    seen = {}

    def work(foreign):
        fake.set_current_context(foreign)
        p = abi.malloc(5 * MiB, S1)
        fill(p, 5 * MiB, seed=4)
        ok = check(p, 5 * MiB, seed=4)
        abi.free(p, 5 * MiB, S1)
        seen[foreign] = (bool(p), ok, fake.current_context())

    for foreign in (0, 0xBEEF000):
        t = threading.Thread(target=work, args=(foreign,))
        t.start()
        t.join()
    assert seen == {0: (True, True, 0), 0xBEEF000: (True, True, 0xBEEF000)}, ekv_alloc.last_error()
    ekv_alloc.trim(DEV)


def test_close_gives_the_primary_context_references_back(dev):
    abi, fake = dev
    ekv_alloc.close(DEV)
    gc.collect()
    base = fake.primary_ctx_refcount(0)
    p = abi.malloc(4096)
    assert p and fake.primary_ctx_refcount(0) > base
    abi.free(p, 4096)
    ekv_alloc.close(DEV)
    assert fake.primary_ctx_refcount(0) == base


def test_four_threads_on_four_streams_end_consistent_with_nothing_leaked(dev):
    # The cuda path's own state (free-time events, per-stream free lists, pending list) under
    # concurrent malloc/free, with device work finishing at arbitrary points.
    abi, fake = dev
    before = ekv_alloc.stats(DEV)
    fake.set_events_complete(False)
    ops = 1500
    errors = four_thread_stress(
        abi,
        ops,
        max_held=30,
        tag_prefix="fstress-",
        stream_of=lambda t: 0x10000 * (t + 1),
        tick=lambda i: fake.complete_events() if i % 150 == 0 else None,
    )
    assert not errors, errors[:5]
    s = ekv_alloc.stats(DEV)
    assert s["live_blocks"] == 0 and s["allocated_bytes"] == 0 and s["requested_bytes"] == 0
    assert s["mallocs"] - before["mallocs"] == s["frees"] - before["frees"] > 4 * ops // 3
    assert s["failed_mallocs"] == before["failed_mallocs"] and s["failed_frees"] == before["failed_frees"]
    assert s["cached_bytes"] == s["mapped_bytes"] == fake.live_handles() * s["granularity"]
    fake.set_events_complete(True)
    fake.complete_events()
    assert ekv_alloc.trim(DEV) > 0
    assert ekv_alloc.stats(DEV)["mapped_bytes"] == 0
    assert fake.live_handles() == 0 and fake.live_mappings() == 0 and fake.live_events() == 0


def test_out_of_memory_waits_for_freed_blocks_events_before_returning_null(dev):
    # Under install() torch does not check a NULL (it becomes an illegal address), so a block
    # another stream freed is waited for (its event, not the device) rather than failing.
    abi, fake = dev
    ekv_alloc.set_limit(16 * MiB, DEV)
    try:
        p = abi.malloc(16 * MiB, S1)
        assert p
        abi.free(p, 16 * MiB, S1)
        fake.hold_stream(S1)  # S1's kernels still run: its event stays not-ready until waited on
        syncs = fake.calls("cuCtxSynchronize")
        q = abi.malloc(16 * MiB, S2)
        assert q, ekv_alloc.last_error()
        assert fake.calls("cuEventSynchronize") >= 1 and fake.calls("cuCtxSynchronize") == syncs
        assert ekv_alloc.stats(DEV)["failed_mallocs"] == 0
        abi.free(q, 16 * MiB, S2)
    finally:
        ekv_alloc.set_limit(None, DEV)
