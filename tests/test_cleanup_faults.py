"""Driver failures on the cleanup paths, on the fake CUDA driver: nothing leaks silently.

A cuEventDestroy that fails is counted (stats()["leaked_events"]) and named in last_error; a
close() the driver refuses names what it kept and a later close() gives it back; an ekv_free
whose free-time event cannot be recorded still frees the block (torch never retries a free).
"""

from __future__ import annotations

import pytest

import torch_elastic_kv as ekv
from allocator_helpers import Abi, MiB, check, fill, tagged
from torch_elastic_kv import _C, Arena
from torch_elastic_kv.memory import allocator as ekv_alloc

DEV = 0
S1, S2, S3 = 0x1000, 0x2000, 0x3000
ZERO = {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}
FAILED = "failed: CUDA error (999) on cuda:0"  # what the backend says of an injected code 999


@pytest.fixture
def dev(fake_cuda):
    for s in (S1, S2, S3):
        fake_cuda.create_stream(s)  # a record on a stream the driver does not know fails
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


def test_a_handoff_event_the_driver_will_not_destroy_is_counted_and_reported(dev):
    abi, fake = dev
    p = abi.malloc(8 * MiB, S1)
    abi.free(p, 8 * MiB, S1)  # no event: S1 may reuse it at once
    assert fake.live_events() == 0 and ekv_alloc.stats(DEV)["leaked_events"] == 0
    fake.fail_nth("cuEventDestroy", 1, code=999)
    q = abi.malloc(8 * MiB, S2)  # the handoff records S1's event, finds it complete, destroys it: refused
    assert q == p
    assert ekv_alloc.last_error(clear=True) == (
        "allocator on cuda:0: 1 CUDA event(s) could not be destroyed (1 leaked in all, stats()['leaked_events']): "
        f"cuEventDestroy {FAILED} (the event leaked)"
    )
    s = ekv_alloc.stats(DEV)
    assert s["leaked_events"] == 1 and s["live_blocks"] == 1 and s["free_event_failures"] == 0
    assert fake.live_events() == 1  # the leaked one
    abi.free(q, 8 * MiB, S2)
    assert ekv_alloc.trim(DEV) == 8 * MiB
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
        f"cuEventDestroy {FAILED} (the event leaked)"
    )
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


# -- close() ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "function, left, kept",
    [
        ("cuMemAddressFree", "the 67108864-byte address range at 0x", {"reservations": 1}),
        (
            "cuMemUnmap",
            "1 mapped granules (2097152 bytes), the 67108864-byte address range at 0x",
            {"handles": 1, "mappings": 1, "reservations": 1, "used_bytes": 2 * MiB},
        ),
        (
            "cuMemRelease",
            "1 physical handles (2097152 bytes); close() again retries",
            {"handles": 1, "used_bytes": 2 * MiB},
        ),
    ],
)
def test_a_refused_close_names_what_it_kept_and_the_next_close_gives_it_back(fake_cuda, function, left, kept):
    base = ekv.memory_stats("cuda")  # device-wide: other arenas may be alive
    a = Arena(64 * MiB, device="cuda", reuse_bytes=4 * MiB)
    g = a.granularity
    a.map(0, 3 * g)
    a.unmap(0, g)
    assert a.poll() == g  # one cached handle, two mapped granules
    fake_cuda.fail_nth(function, 1, code=999)
    with pytest.raises(RuntimeError) as e:
        a.close()
    msg = str(e.value)
    assert msg.startswith(f"Arena.close: {function} {FAILED}; not given back: {left}"), msg
    assert msg.endswith("; close() again retries")
    assert fake_cuda.counts() == {**ZERO, **kept}
    held = kept.get("used_bytes", 0)
    s = a.stats()
    assert (s["mapped_bytes"], s["pending_bytes"], s["cached_bytes"], s["held_bytes"]) == (0, 0, held, held)
    assert s["reserved_bytes"] == 64 * MiB * kept.get("reservations", 0)
    d = ekv.memory_stats("cuda")
    assert (
        d["held_bytes"] - base["held_bytes"],
        d["cached_bytes"] - base["cached_bytes"],
        d["mapped_bytes"] - base["mapped_bytes"],
        d["arenas"] - base["arenas"],
    ) == (held, held, 0, 0)
    assert a.closed
    with pytest.raises(RuntimeError, match="the arena is closed"):
        a.map(0, g)
    a.close()  # the retry gives back what was kept
    assert fake_cuda.counts() == ZERO
    s = a.stats()
    assert (s["held_bytes"], s["cached_bytes"], s["reserved_bytes"]) == (0, 0, 0)
    assert ekv.memory_stats("cuda")["held_bytes"] == base["held_bytes"]
    calls = fake_cuda.calls(function)
    a.close()  # nothing left: no driver call at all
    assert fake_cuda.calls(function) == calls


def test_allocator_close_names_what_the_driver_kept_and_the_next_close_retries(dev):
    abi, fake = dev
    p = abi.malloc(4096)
    abi.free(p, 4096)
    fake.fail_nth("cuMemAddressFree", 1, code=999)
    with pytest.raises(RuntimeError) as e:
        ekv_alloc.close(DEV)
    assert str(e.value).startswith(
        "close(device=cuda:0): the allocator is dropped (the next malloc starts afresh), but its memory was not "
        f"all given back: Arena.close: cuMemAddressFree {FAILED}; not given back: the "
    ), str(e.value)
    assert str(e.value).endswith(" (close(device) again retries)")
    assert fake.counts() == {**ZERO, "reservations": 1}
    assert DEV not in _C.allocator_devices() and _C.allocator_unclosed_devices() == [DEV]
    q = abi.malloc(4096)  # meanwhile the device works on a fresh allocator
    assert q and fake.live_reservations() == 2
    abi.free(q, 4096)
    ekv_alloc.close()  # every device, the arena kept aside too
    assert fake.counts() == ZERO and _C.allocator_unclosed_devices() == []


# -- ekv_free without a free-time event -----------------------------------------------------------


@pytest.mark.parametrize("function", ["cuEventCreate", "cuEventRecord"])
def test_a_handoff_without_its_event_waits_for_the_stream_and_frees_the_blocks(dev, function):
    abi, fake = dev
    fake.set_events_complete(False)  # device work queued on every stream
    p = abi.malloc(8 * MiB, S1)
    other = abi.malloc(6 * MiB, S2)
    abi.free(p, 8 * MiB, S1)
    abi.free(other, 6 * MiB, S2)
    before = ekv_alloc.stats(DEV)
    fake.fail_nth(function, 1, code=999)
    q = abi.malloc(8 * MiB, S3)  # S1's event cannot be had: S1 is waited for; S2's is recorded
    assert q == p and ekv_alloc.stats(DEV)["maps"] == before["maps"]  # reused, no new mapping
    assert ekv_alloc.last_error(clear=True) == (
        f"allocator on cuda:0: recording the event for blocks freed on stream {S1:#x} failed: "
        f"{function} {FAILED}; synchronized the stream instead: the blocks are reusable by any stream"
    )
    s = ekv_alloc.stats(DEV)
    assert s["free_event_failures"] == 1 and s["leaked_events"] == 0
    assert s["pending_free_bytes"] == 6 * MiB  # S2's block still waits: only S1 was waited for
    assert fake.calls("cuStreamSynchronize") == 1 and fake.calls("cuCtxSynchronize") == 0
    assert fake.live_events() == 1  # S2's; none left over from the failed record
    abi.free(q, 8 * MiB, S3)
    ekv_alloc.trim(DEV)
    assert ekv_alloc.stats(DEV)["mapped_bytes"] == 0


def test_a_handoff_whose_stream_cannot_be_waited_for_synchronizes_the_device(dev):
    abi, fake = dev
    p = abi.malloc(3 * MiB, S1)
    abi.free(p, 3 * MiB, S1)
    fake.fail_nth("cuEventRecord", 1, code=999)
    fake.fail_nth("cuStreamSynchronize", 1, code=999)
    x = abi.malloc(3 * MiB, S2)
    assert x == p
    assert ekv_alloc.last_error(clear=True) == (
        f"allocator on cuda:0: recording the event for blocks freed on stream {S1:#x} failed: "
        f"cuEventRecord {FAILED}; cuStreamSynchronize {FAILED}; synchronized the device instead: "
        "the blocks are reusable by any stream"
    )
    s = ekv_alloc.stats(DEV)
    assert s["pending_free_bytes"] == 0 and s["free_event_failures"] == 1
    assert fake.calls("cuCtxSynchronize") == 1
    abi.free(x, 3 * MiB, S2)
    ekv_alloc.trim(DEV)


def test_a_handoff_that_cannot_wait_at_all_keeps_the_block_for_its_stream_until_trim(dev):
    abi, fake = dev
    fake.set_events_complete(False)
    p = abi.malloc(8 * MiB, S1)
    abi.free(p, 8 * MiB, S1)
    again = abi.malloc(8 * MiB, S1)  # stream order: S1 may reuse it at once
    assert again == p
    abi.free(again, 8 * MiB, S1)
    for fn in ("cuEventRecord", "cuStreamSynchronize", "cuCtxSynchronize"):
        fake.fail_nth(fn, 1, code=999)
    q = abi.malloc(8 * MiB, S2)  # the handoff cannot tell when S1 is done: S2 gets new memory
    assert q and q != p
    assert ekv_alloc.last_error(clear=True) == (
        f"allocator on cuda:0: recording the event for blocks freed on stream {S1:#x} failed: "
        f"cuEventRecord {FAILED}; cuStreamSynchronize {FAILED}; cuCtxSynchronize {FAILED}; the blocks stay "
        "reusable by their stream only until trim() synchronizes the device"
    )
    abi.free(q, 8 * MiB, S2)
    # No other stream gets it, however often the pending list is looked at, even with every
    # event complete: there is no event to ask.
    fake.set_events_complete(True)
    fake.complete_events()
    qs = set()
    for _ in range(8):
        q = abi.malloc(8 * MiB, S2)
        abi.free(q, 8 * MiB, S2)
        qs.add(q)
    assert p not in qs and len(qs) == 1  # S2's own frees are reused
    s = ekv_alloc.stats(DEV)
    assert s["pending_free_bytes"] == 16 * MiB and s["free_event_failures"] == 1
    syncs = fake.calls("cuCtxSynchronize")
    assert ekv_alloc.trim(DEV) == 16 * MiB  # synchronizes the device, then gives both back
    assert fake.calls("cuCtxSynchronize") == syncs + 1
    s = ekv_alloc.stats(DEV)
    assert s["mapped_bytes"] == s["pending_free_bytes"] == 0 and fake.live_handles() == 0


def test_pause_waits_for_a_block_freed_without_an_event(dev):
    abi, fake = dev
    with tagged("cleanup-kv"):
        p = abi.malloc(4 * MiB, S1)
        keep = abi.malloc(2 * MiB, S1)
    fill(keep, 2 * MiB, seed=8)
    abi.free(p, 4 * MiB, S1)
    assert ekv_alloc.stats(DEV)["pending_free_bytes"] == 4 * MiB
    fake.hold_stream(S1)  # the kernels there have not run: pause must wait for S1
    waits = fake.calls("cuEventSynchronize")
    assert ekv_alloc.pause("cleanup-kv", backup=True, device=DEV) == 6 * MiB
    # One wait on S1 covers the live block and the freed one (then the unmaps' own events).
    assert fake.calls("cuEventSynchronize") > waits and fake.pending_events(S1) == 0
    assert ekv_alloc.stats(DEV)["pending_free_bytes"] == 0
    ekv_alloc.resume("cleanup-kv", device=DEV)
    assert check(keep, 2 * MiB, seed=8)
    abi.free(keep, 2 * MiB, S1)
    ekv_alloc.trim(DEV)


def test_an_event_lost_while_recording_one_is_counted_too(dev):
    abi, fake = dev
    p = abi.malloc(8 * MiB, S1)
    abi.free(p, 8 * MiB, S1)
    fake.fail_nth("cuEventRecord", 1, code=999)
    fake.fail_nth("cuEventDestroy", 1, code=999)  # the created, unrecorded event
    x = abi.malloc(8 * MiB, S2)
    assert x == p
    # The handoff's own outcome is the last word; the leak is in the counters.
    assert ekv_alloc.last_error(clear=True).endswith(
        "synchronized the stream instead: the blocks are reusable by any stream"
    )
    s = ekv_alloc.stats(DEV)
    assert s["leaked_events"] == 1 and s["free_event_failures"] == 1 and s["live_blocks"] == 1
    assert fake.live_events() == 1
    abi.free(x, 8 * MiB, S2)
    ekv_alloc.trim(DEV)
    ekv_alloc.close(DEV)
    assert fake.forget_events() == 1
