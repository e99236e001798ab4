"""Driver failures on the cleanup paths, on the fake CUDA driver: nothing leaks silently.

A cuEventDestroy that fails is counted (stats()["leaked_events"]) and named in last_error.
"""
from __future__ import annotations

import pytest

import torch_elastic_kv as ekv
from allocator_helpers import MiB, Abi, check, fill, tagged
from torch_elastic_kv import Arena, _C
from torch_elastic_kv import allocator as ekv_alloc

DEV = 0
S1, S2, S3 = 0x1000, 0x2000, 0x3000
ZERO = {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}
FAILED = "failed: CUDA error (999) on cuda:0"  # what the backend says of an injected code 999


@pytest.fixture
def dev(fake_cuda):
    ekv_alloc.last_error(clear=True)
    yield Abi(DEV), fake_cuda
    fake_cuda.reset()  # failures a test armed but did not reach
    fake_cuda.complete_events()
    assert ekv_alloc.snapshot(DEV) == [], "a test leaked allocations"
    ekv_alloc.close(DEV)
    assert fake_cuda.counts() == ZERO


def assert_nothing_live(s: dict) -> None:
    assert (s["allocated_bytes"], s["requested_bytes"], s["live_blocks"]) == (0, 0, 0)
    assert s["cached_bytes"] == s["mapped_bytes"]


# -- cuEventDestroy -----------------------------------------------------------------------------

def test_a_free_time_event_the_driver_will_not_destroy_is_counted_and_reported(dev):
    abi, fake = dev
    p = abi.malloc(4096, S1)
    abi.free(p, 4096, S1)  # records the free-time event (the device is done at once here)
    assert fake.live_events() == 1 and ekv_alloc.stats(DEV)["leaked_events"] == 0
    fake.fail_nth("cuEventDestroy", 1, code=999)
    q = abi.malloc(4096, S2)  # finds the event complete and destroys it: refused
    assert q
    assert ekv_alloc.last_error(clear=True) == (
        "allocator on cuda:0: 1 CUDA event(s) could not be destroyed (1 leaked in all, stats()['leaked_events']): "
        f"cuEventDestroy {FAILED} (the event leaked)")
    s = ekv_alloc.stats(DEV)
    assert s["leaked_events"] == 1 and s["live_blocks"] == 1
    assert fake.live_events() == 1  # the leaked one
    abi.free(q, 4096, S2)
    assert ekv_alloc.trim(DEV) == 2 * MiB
    s = ekv_alloc.stats(DEV)
    assert_nothing_live(s)
    assert s["mapped_bytes"] == 0 and s["leaked_events"] == 1
    assert ekv_alloc.last_error() is None  # reported once, not at every call after
    ekv_alloc.close(DEV)
    assert fake.forget_events() == 1


def test_an_arena_event_lost_inside_an_allocator_trim_reaches_last_error(dev):
    abi, fake = dev
    p = abi.malloc(8 * MiB, S1)
    abi.free(p, 8 * MiB, S1)
    # trim destroys the free-time event first, then the event of the arena's unmap: make the
    # second one fail (the arena reaps it inside its own trim, with nobody to return it to).
    fake.fail_nth("cuEventDestroy", 2, code=999)
    assert ekv_alloc.trim(DEV) == 8 * MiB
    assert ekv_alloc.last_error(clear=True) == (
        "allocator on cuda:0: 1 CUDA event(s) could not be destroyed (1 leaked in all, stats()['leaked_events']): "
        f"cuEventDestroy {FAILED} (the event leaked)")
    s = ekv_alloc.stats(DEV)
    assert s["leaked_events"] == 1 and s["mapped_bytes"] == 0
    assert fake.live_events() == 1 and fake.live_handles() == 0
    ekv_alloc.close(DEV)
    assert fake.forget_events() == 1


def test_an_arena_counts_the_events_its_reaps_leak(fake_cuda):
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 2 * g)
        a.unmap(0, g)
        a.unmap(g, g)
        fake_cuda.fail_nth("cuEventDestroy", 2, code=999)
        assert a.poll() == 2 * g  # the unmaps finish; only the second event is lost
        s = a.stats()
        assert s["leaked_events"] == 1 and s["held_bytes"] == s["pending_bytes"] == 0
        assert fake_cuda.live_events() == 1 and fake_cuda.live_handles() == 0
    assert fake_cuda.forget_events() == 1 and fake_cuda.counts() == ZERO
