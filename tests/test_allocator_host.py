"""The allocator through its C ABI (ekv_malloc/ekv_free via ctypes) on the host backend (device -1).

Every test frees what it allocates and closes the host allocator after it, so RssShmem, the
stats and the cpu budget's arena count of one test do not leak into the next.
"""

from __future__ import annotations

import pytest

from allocator_helpers import (
    Abi,
    MiB,
    assert_disjoint_and_aligned,
    check,
    fill,
    four_thread_stress,
    mixed_sizes,
    rss_shmem,
    stable_counts,
    tagged,
    view,
)
from torch_elastic_kv.memory import allocator as ekv_alloc

HOST = -1


@pytest.fixture(autouse=True)
def _closed_after():
    yield
    ekv_alloc.close(HOST)  # raises if a test leaked allocations


@pytest.fixture
def abi():
    ekv_alloc.last_error(clear=True)
    yield Abi(HOST)
    assert ekv_alloc.snapshot(HOST) == [], "a test leaked allocations"


def test_mixed_sizes_aligned_disjoint_writable_and_kept(abi):
    before = ekv_alloc.stats(HOST)
    sizes = mixed_sizes(150, seed=1)
    blocks = []
    for i, n in enumerate(sizes):
        p = abi.malloc(n)
        assert p, ekv_alloc.last_error()
        fill(p, n, seed=i)
        blocks.append((p, n))
    assert_disjoint_and_aligned(blocks)
    s = ekv_alloc.stats(HOST)
    assert s["live_blocks"] == before["live_blocks"] + len(sizes)
    assert s["requested_bytes"] - before["requested_bytes"] == sum(sizes)
    assert s["allocated_bytes"] >= s["requested_bytes"]
    assert s["mapped_bytes"] >= s["allocated_bytes"] and s["mapped_bytes"] % s["granularity"] == 0
    # Contents survive other blocks' writes, frees and reuse until their own free.
    for i, (p, n) in enumerate(blocks):
        assert check(p, n, seed=i), f"block {i} ({n} bytes at {p:#x}) lost its contents"
    for _i, (p, n) in list(enumerate(blocks))[::2]:
        abi.free(p, n)
    again = [(abi.malloc(n), n) for n in sizes[::2]]
    for j, (p, n) in enumerate(again):
        fill(p, n, seed=10_000 + j)
    for i, (p, n) in list(enumerate(blocks))[1::2]:
        assert check(p, n, seed=i)
    assert_disjoint_and_aligned(blocks[1::2] + again)
    for p, n in blocks[1::2] + again:
        abi.free(p, n)
    after = ekv_alloc.stats(HOST)
    assert after["live_blocks"] == before["live_blocks"]
    assert after["allocated_bytes"] == before["allocated_bytes"]
    assert after["mallocs"] - before["mallocs"] == after["frees"] - before["frees"] == len(sizes) + len(again)
    assert ekv_alloc.last_error() is None


def test_large_blocks_are_reused_in_place(abi):
    p = abi.malloc(8 * MiB)
    abi.free(p, 8 * MiB)
    maps = ekv_alloc.stats(HOST)["maps"]
    q = abi.malloc(6 * MiB)  # served from the cached 8 MiB range, split at a granule boundary
    r = abi.malloc(2 * MiB)  # ... and the 2 MiB left over
    assert q == p and r == p + 6 * MiB
    assert ekv_alloc.stats(HOST)["maps"] == maps  # no new mapping
    abi.free(q, 6 * MiB)
    abi.free(r, 2 * MiB)


def test_trim_after_freeing_everything_returns_mapped_and_rss(abi):
    rss0 = rss_shmem()
    sizes = mixed_sizes(60, seed=2)
    blocks = [(abi.malloc(n), n) for n in sizes]
    for i, (p, n) in enumerate(blocks):
        view(p, n)[:] = i % 251 + 1  # touch every page
    assert rss_shmem() - rss0 >= sum(sizes) - 1024
    for p, n in blocks:
        abi.free(p, n)
    s = ekv_alloc.stats(HOST)
    assert s["allocated_bytes"] == 0 and s["cached_bytes"] == s["mapped_bytes"] > 0
    released = ekv_alloc.trim(HOST)
    s = ekv_alloc.stats(HOST)
    assert s["mapped_bytes"] == 0 and s["cached_bytes"] == 0 and s["segments"] == 0
    assert released >= sum(sizes)
    assert rss_shmem() <= rss0, f"RssShmem {rss_shmem()} did not return to {rss0}"
    assert ekv_alloc.trim(HOST) == 0  # nothing left to give


def test_limit_below_use_fails_new_mallocs_and_keeps_live_blocks(abi):
    live = [(abi.malloc(n), n) for n in (4 * MiB, 3 * MiB, 1000, 70_000)]
    for i, (p, n) in enumerate(live):
        fill(p, n, seed=100 + i)
    ekv_alloc.set_limit(1 * MiB, HOST)
    s0 = ekv_alloc.stats(HOST)
    assert s0["limit_bytes"] == 1 * MiB and s0["mapped_bytes"] > 1 * MiB  # live blocks stay mapped
    assert abi.malloc(5 * MiB) == 0
    err = ekv_alloc.last_error()
    assert "ekv_malloc(size=5242880" in err and "limit of 1048576 bytes" in err and "NULL" in err
    s1 = ekv_alloc.stats(HOST)
    assert stable_counts(s1) == stable_counts(s0) and s1["failed_mallocs"] == s0["failed_mallocs"] + 1
    for i, (p, n) in enumerate(live):
        assert check(p, n, seed=100 + i)
    ekv_alloc.set_limit(64 * MiB, HOST)
    p = abi.malloc(5 * MiB)
    assert p, ekv_alloc.last_error()
    fill(p, 5 * MiB, seed=7)
    abi.free(p, 5 * MiB)
    for p, n in live:
        abi.free(p, n)


def test_pause_with_backup_restores_bytes_at_same_addresses(abi):
    with tagged("host-weights"):
        mine = [(abi.malloc(n), n) for n in (100, 300_000, 5 * MiB + 3, 9 * MiB, 2 * MiB)]
    with tagged("host-other"):
        other = [(abi.malloc(n), n) for n in (4000, 6 * MiB)]
    for i, (p, n) in enumerate(mine + other):
        fill(p, n, seed=200 + i)
    rss_before = rss_shmem()
    released = ekv_alloc.pause("host-weights", backup=True, device=HOST)
    tag_bytes = sum(n for _, n in mine)
    assert released >= tag_bytes
    assert rss_before - rss_shmem() >= tag_bytes - 4096
    s = ekv_alloc.stats(HOST)
    t = s["tags"]["host-weights"]
    assert t["paused"] and t["mapped_bytes"] == 0 and t["paused_bytes"] >= tag_bytes
    assert t["backup_bytes"] == tag_bytes and s["backup_bytes"] == tag_bytes
    assert not s["tags"]["host-other"]["paused"]
    for i, (p, n) in enumerate(other):  # other tags are untouched and usable
        assert check(p, n, seed=200 + len(mine) + i)
        fill(p, n, seed=300 + i)
    assert all(b["paused"] for b in ekv_alloc.snapshot(HOST) if b["tag"] == "host-weights")
    ekv_alloc.resume("host-weights", device=HOST)
    for i, (p, n) in enumerate(mine):
        assert check(p, n, seed=200 + i), f"block {i} of the paused tag lost its bytes"
    for i, (p, n) in enumerate(other):
        assert check(p, n, seed=300 + i)
    s = ekv_alloc.stats(HOST)
    assert not s["tags"]["host-weights"]["paused"] and s["paused_bytes"] == 0 and s["backup_bytes"] == 0
    for p, n in mine + other:
        abi.free(p, n)


def test_pause_without_backup_keeps_addresses_and_frees_while_paused(abi):
    with tagged("host-scratch"):
        blocks = [(abi.malloc(n), n) for n in (3 * MiB, 50_000, 50_000)]
    ekv_alloc.pause("host-scratch", device=HOST)
    with pytest.raises(ValueError, match="already paused"):
        ekv_alloc.pause("host-scratch", device=HOST)
    abi.free(*blocks[1])  # freeing a paused allocation is allowed
    assert ekv_alloc.last_error() is None
    ekv_alloc.set_limit(0, HOST)
    with pytest.raises(MemoryError, match="stays paused"):  # resuming would pass the limit
        ekv_alloc.resume("host-scratch", device=HOST)
    assert ekv_alloc.stats(HOST)["tags"]["host-scratch"]["paused"]
    ekv_alloc.set_limit(None, HOST)
    ekv_alloc.resume("host-scratch", device=HOST)
    with pytest.raises(ValueError, match="not paused"):
        ekv_alloc.resume("host-scratch", device=HOST)
    for p, n in (blocks[0], blocks[2]):
        view(p, n)[:] = 5  # mapped again, writable
    snap = {b["address"]: b for b in ekv_alloc.snapshot(HOST)}
    assert blocks[0][0] in snap and blocks[2][0] in snap and blocks[1][0] not in snap
    assert snap[blocks[0][0]]["tag"] == "host-scratch" and snap[blocks[0][0]]["size"] == 3 * MiB
    for p, n in (blocks[0], blocks[2]):
        abi.free(p, n)


def test_bad_frees_and_sizes_are_defined_and_change_nothing(abi):
    p = abi.malloc(1000)
    q = abi.malloc(4 * MiB)
    fill(p, 1000, seed=1)
    s0 = ekv_alloc.stats(HOST)
    foreign = bytearray(64)
    import ctypes

    foreign_ptr = ctypes.addressof((ctypes.c_char * 64).from_buffer(foreign))
    cases = [
        (lambda: abi.free(foreign_ptr, 64), "not allocated by this allocator"),
        (lambda: abi.free(p + 512, 488), "no live allocation starts at this address"),
        (lambda: abi.free(p, 999), "was allocated with size 1000"),
    ]
    for call, message in cases:
        ekv_alloc.last_error(clear=True)
        call()
        assert message in ekv_alloc.last_error()
    for size, message in [
        (0, "size 0"),
        (1 << 60, "bytes of address space"),
        ((1 << 64) - 1, "bytes of address space"),
    ]:
        assert abi.malloc(size) == 0
        assert message in ekv_alloc.last_error(clear=True)
    assert abi.lib.ekv_malloc(100, -7, None) is None
    assert "device -7" in ekv_alloc.last_error(clear=True)
    s1 = ekv_alloc.stats(HOST)
    assert stable_counts(s1) == stable_counts(s0)
    assert s1["failed_frees"] == s0["failed_frees"] + 3 and s1["failed_mallocs"] == s0["failed_mallocs"] + 3
    assert check(p, 1000, seed=1)
    abi.free(p, 1000)
    abi.free(p, 1000)  # double free
    assert "double free" in ekv_alloc.last_error(clear=True)
    abi.free(0, 0)  # free(NULL) is a no-op, like free(3)
    assert ekv_alloc.last_error() is None
    abi.free(q, 4 * MiB)
    assert ekv_alloc.stats(HOST)["failed_frees"] == s0["failed_frees"] + 4


def test_python_entry_points_reject_bad_input():
    with pytest.raises(ValueError, match="set_limit"):
        ekv_alloc.set_limit(-1, HOST)
    with pytest.raises(TypeError):
        ekv_alloc.set_limit(1.5, HOST)
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        ekv_alloc.set_limit(1 << 64, HOST)
    with pytest.raises(ValueError, match="not -1"):
        ekv_alloc.stats(1 << 40)
    with pytest.raises(ValueError, match="no allocation was ever made"):
        ekv_alloc.pause("no-such-tag-anywhere", device=HOST)
    with pytest.raises(ValueError, match="not supported"):
        ekv_alloc.stats("meta")
    with pytest.raises(ValueError, match="not -1"):
        ekv_alloc.stats(-3)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ekv_alloc.install()


def test_close_is_refused_while_in_use_then_releases_the_reservation(abi):
    p = abi.malloc(10)
    with pytest.raises(ValueError, match="1 allocations are live"):
        ekv_alloc.close(HOST)
    abi.free(p, 10)
    ekv_alloc.close(HOST)
    assert HOST not in ekv_alloc._C.allocator_devices()
    p = abi.malloc(10)  # a fresh allocator
    assert p and ekv_alloc.stats(HOST)["mallocs"] == 1
    abi.free(p, 10)


def test_four_threads_stress_ends_consistent_with_nothing_leaked(abi):
    before = ekv_alloc.stats(HOST)
    ops_per_thread = 2500
    errors = four_thread_stress(abi, ops_per_thread, max_held=40, tag_prefix="stress-")
    assert not errors, errors[:5]
    s = ekv_alloc.stats(HOST)
    assert s["live_blocks"] == before["live_blocks"] and s["allocated_bytes"] == before["allocated_bytes"]
    assert s["requested_bytes"] == before["requested_bytes"]
    assert s["mallocs"] - before["mallocs"] == s["frees"] - before["frees"] > 4 * ops_per_thread // 3
    assert s["failed_mallocs"] == before["failed_mallocs"] and s["failed_frees"] == before["failed_frees"]
    assert s["peak_allocated_bytes"] <= s["peak_mapped_bytes"]
    assert s["cached_bytes"] == s["mapped_bytes"]
    ekv_alloc.trim(HOST)
    assert ekv_alloc.stats(HOST)["mapped_bytes"] == 0


def test_the_device_budget_caps_the_allocator_too(abi):
    import torch_elastic_kv as ekv

    p = abi.malloc(4 * MiB)
    held = ekv.memory_stats("cpu")["held_bytes"]
    ekv.set_budget(held + 2 * MiB, "cpu")  # every arena on the device draws from it, ours included
    try:
        assert abi.malloc(16 * MiB) == 0
        err = ekv_alloc.last_error(clear=True)
        assert "budget" in err and "ekv_malloc(size=16777216" in err
        q = abi.malloc(2 * MiB)  # what fits in the budget still works
        assert q
        abi.free(q, 2 * MiB)
    finally:
        ekv.set_budget(None, "cpu")
    q = abi.malloc(16 * MiB)
    assert q
    abi.free(q, 16 * MiB)
    abi.free(p, 4 * MiB)
