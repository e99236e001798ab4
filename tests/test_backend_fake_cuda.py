"""The real cuda backend against the fake driver (tests/fake_cuda/): driver object counts,
failure injection, handle reuse, and release deferred on events."""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv import Arena
from torch_elastic_kv.testing import FakeCuda

MiB = 1 << 20


def test_512mib_scenario_returns_every_driver_object(fake_cuda: FakeCuda) -> None:
    size = 512 * MiB
    a = Arena(size, device="cuda")
    assert a.backend == "cuda(fake)" and a.device == torch.device("cuda", 0)
    g = a.granularity
    a.map(0, size)
    a.host_view(torch.uint8, (size,)).fill_(1)
    assert fake_cuda.live_handles() == fake_cuda.live_mappings() == size // g
    assert fake_cuda.used_bytes() == size
    a.unmap(0, size)
    a.trim(wait=True)
    assert fake_cuda.live_handles() == 0 and fake_cuda.live_mappings() == 0
    assert a.stats()["held_bytes"] == 0
    a.map(0, 4 * g)
    a.close()
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


# The map below is one run of 6 granules: one cuMemSetAccess (failures in a later run of a
# multi-run map are in test_map_range.py).
@pytest.mark.parametrize(
    ("function", "k"),
    [(f, k) for f in ("cuMemCreate", "cuMemMap") for k in (1, 3, "last")] + [("cuMemSetAccess", 1)],
)
def test_failure_on_kth_call_changes_nothing(fake_cuda: FakeCuda, function: str, k: int | str) -> None:
    if k == "last":  # the map below creates 4 handles and maps 6 granules
        k = 4 if function == "cuMemCreate" else 6
    with Arena(64 * MiB, device="cuda", reuse_bytes=4 * MiB) as a:
        g = a.granularity
        # Some cached handles and some mapped granules, so a map draws from both.
        a.map(0, 4 * g)
        a.unmap(0, 2 * g)
        assert a.poll() == 2 * g  # the unmap's event is done: 2 handles now cached
        assert a.stats()["cached_bytes"] == 2 * g
        before = (a.stats(), ekv.memory_stats("cuda"), fake_cuda.counts())
        fake_cuda.fail_nth(function, k, code=0 if function == "cuMemCreate" else 999)
        expected = torch.OutOfMemoryError if function == "cuMemCreate" else RuntimeError
        with pytest.raises(expected, match=f"Arena.map\\(offset={8 * g}, nbytes={6 * g}\\).*{function}"):
            a.map(8 * g, 6 * g)  # 2 from the cache, 4 created
        after = (a.stats(), ekv.memory_stats("cuda"), fake_cuda.counts())
        # Handles created during the failed call were released again; nothing else moved.
        for key in ("creates", "releases"):
            after[0][key] -= after[0][key] - before[0][key]
        assert after == before
        assert not a.is_mapped(8 * g, g)
        a.map(8 * g, 6 * g)  # the range is usable afterwards
        assert fake_cuda.live_mappings() == 2 + 6
    assert fake_cuda.live_handles() == 0 and fake_cuda.live_mappings() == 0


def test_driver_out_of_memory_is_torch_oom(fake_cuda: FakeCuda) -> None:
    fake_cuda.set_total_memory(6 * MiB)
    with Arena(64 * MiB, device="cuda") as a:
        g = a.granularity
        with pytest.raises(torch.OutOfMemoryError, match="cuMemCreate.*CUDA_ERROR_OUT_OF_MEMORY.*nothing was mapped"):
            a.map(0, 4 * g)
        assert a.stats()["mapped_bytes"] == 0 and fake_cuda.live_handles() == 0
        a.map(0, 3 * g)


def test_reuse_creates_no_handle(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=8 * MiB) as a:
        g = a.granularity
        a.map(0, 4 * g)
        creates = fake_cuda.create_count()
        assert creates == 4
        a.unmap(0, 4 * g)
        a.map(8 * g, 4 * g)  # different offsets: served by the cache once the unmap is reaped
        a.unmap(8 * g, 4 * g)
        a.map(0, 4 * g)
        assert fake_cuda.create_count() == creates
        assert fake_cuda.release_count() == 0


def test_release_waits_for_the_event_not_the_device(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 4 * g)
        fake_cuda.set_events_complete(False)  # the device is still using the memory
        a.unmap(0, 4 * g, stream=fake_cuda.create_stream())
        s = a.stats()
        assert s["mapped_bytes"] == 0 and s["pending_bytes"] == 4 * g
        assert fake_cuda.live_mappings() == 4 and fake_cuda.live_events() == 1
        assert a.trim() == 0  # not done yet: nothing may be given back
        assert fake_cuda.live_mappings() == 4
        # Mapping a pending granule again revives it: no driver call at all.
        maps_before = fake_cuda.calls("cuMemMap")
        a.map(0, g)
        assert fake_cuda.calls("cuMemMap") == maps_before and a.stats()["revives"] == 1
        fake_cuda.complete_events()
        assert a.trim() == 3 * g
        assert fake_cuda.live_mappings() == 1 and fake_cuda.live_handles() == 1
        assert fake_cuda.live_events() == 0
        assert fake_cuda.calls("cuEventSynchronize") == 0  # polled, never waited on


def test_close_waits_for_pending_events(fake_cuda: FakeCuda) -> None:
    a = Arena(64 * MiB, device="cuda")
    g = a.granularity
    a.map(0, 8 * g)
    fake_cuda.set_events_complete(False)
    a.unmap(0, 4 * g)
    a.close()
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}
    # Still-mapped granules may be in use on any stream: close waited for the whole device
    # (an event on the default stream would not cover torch's side streams).
    assert fake_cuda.calls("cuCtxSynchronize") == 1


def test_close_of_unmapped_arena_does_not_synchronize(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda") as a:
        a.map(0, a.granularity)
        a.unmap(0, a.granularity)
    assert fake_cuda.calls("cuCtxSynchronize") == 0 and fake_cuda.counts()["handles"] == 0


@pytest.mark.parametrize("function", ["cuEventCreate", "cuEventRecord"])
def test_unmap_event_failure_changes_nothing(fake_cuda: FakeCuda, function: str) -> None:
    with Arena(64 * MiB, device="cuda") as a:
        g = a.granularity
        a.map(0, 2 * g)
        before = (a.stats(), fake_cuda.counts())
        fake_cuda.fail_nth(function, 1, code=999)
        with pytest.raises(RuntimeError, match=f"Arena.unmap.*{function}"):
            a.unmap(0, 2 * g)
        assert (a.stats(), fake_cuda.counts()) == before
        assert a.is_mapped(0, 2 * g)


def test_view_on_fake_driver_points_to_host_view(fake_cuda: FakeCuda) -> None:
    with Arena(8 * MiB, device="cuda") as a:
        with pytest.raises(RuntimeError, match="host_view"):
            a.view(torch.float16, (4,))


def test_missing_device_and_missing_library(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="cuda:3 does not exist.*1 device"):
        Arena(8 * MiB, device="cuda:3")
    monkeypatch.setenv("EKV_LIBCUDA", "/nonexistent/libcuda.so.1")
    with pytest.raises(RuntimeError, match="cannot load the CUDA driver library '/nonexistent/libcuda.so.1'"):
        Arena(8 * MiB, device="cuda")
    monkeypatch.setenv("EKV_LIBCUDA", "libm.so.6")  # loads, but is no driver
    with pytest.raises(RuntimeError, match="'libm.so.6' has no symbol cuInit"):
        Arena(8 * MiB, device="cuda")
    assert ekv.memory_stats("cuda")["arenas"] == 0


def test_fake_driver_rejects_what_the_real_one_does(fake_cuda: FakeCuda) -> None:
    # Guards the fake itself: a sloppy fake would let backend bugs through.
    assert os.environ["EKV_LIBCUDA"] == fake_cuda.path
    with Arena(8 * MiB, device="cuda") as a:
        g = a.granularity
        a.map(0, g)
        with pytest.raises(ValueError, match="already mapped"):
            a.map(0, g)
    assert fake_cuda.calls("cuMemAddressFree") == 1


def test_driver_calls_run_in_the_primary_context_and_restore_the_callers(fake_cuda: FakeCuda) -> None:
    # torch may reach the backend from threads with no current context, or with another one:
    # every driver call must run in the device's primary context and leave the caller's alone.
    lib = ctypes.CDLL(fake_cuda.path)
    free_b, total_b = ctypes.c_size_t(), ctypes.c_size_t()
    assert fake_cuda.current_context() == 0
    assert lib.cuMemGetInfo_v2(ctypes.byref(free_b), ctypes.byref(total_b)) == 201  # the fake insists too
    seen: dict[int, tuple[int, int]] = {}

    def work(foreign: int) -> None:
        fake_cuda.set_current_context(foreign)
        with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
            g = a.granularity
            a.map(0, 2 * g)
            after_map = fake_cuda.current_context()
            a.host_view(torch.uint8, (2 * g,)).fill_(7)
            a.unmap(0, 2 * g)
            a.trim(wait=True)
        seen[foreign] = (after_map, fake_cuda.current_context())

    for foreign in (0, 0xDEAD000):
        t = threading.Thread(target=work, args=(foreign,))
        t.start()
        t.join()
    assert seen == {0: (0, 0), 0xDEAD000: (0xDEAD000, 0xDEAD000)}
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


def test_primary_context_references_are_given_back(fake_cuda: FakeCuda) -> None:
    gc.collect()
    base = fake_cuda.primary_ctx_refcount(0)
    a = Arena(16 * MiB, device="cuda")
    assert fake_cuda.primary_ctx_refcount(0) == base + 1
    a.close()
    del a
    gc.collect()
    assert fake_cuda.primary_ctx_refcount(0) == base
    # Failed creations give back what they retained.
    fake_cuda.fail_nth("cuMemAddressReserve", 1)
    with pytest.raises(torch.OutOfMemoryError, match="cuMemAddressReserve"):
        Arena(16 * MiB, device="cuda")
    fake_cuda.fail_nth("cuMemGetAllocationGranularity", 1, code=999)
    with pytest.raises(RuntimeError, match="cuMemGetAllocationGranularity"):
        Arena(16 * MiB, device="cuda")
    assert fake_cuda.primary_ctx_refcount(0) == base
    assert fake_cuda.counts()["reservations"] == 0


def test_second_device_uses_its_own_location_and_access(fake_cuda: FakeCuda) -> None:
    # The fake refuses a cuMemCreate/cuMemSetAccess whose location is not the arena's device.
    fake_cuda.set_device_count(2)
    with Arena(16 * MiB, device="cuda:1") as a:
        g = a.granularity
        a.map(0, 2 * g)
        v = a.host_view(torch.int32, (2 * g // 4,))
        v.fill_(5)
        assert int(v.sum()) == 5 * v.numel()
        assert ekv.memory_stats("cuda:1")["mapped_bytes"] == 2 * g
        assert ekv.memory_stats("cuda:0")["mapped_bytes"] == 0
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


def test_refused_unmap_does_not_work_down_the_event_backlog(fake_cuda: FakeCuda) -> None:
    n = 64  # kMaxPendingBatches: an unmap with this many batches queued finishes the done ones
    with Arena((n + 2) * 2 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, n * g)
        fake_cuda.set_events_complete(False)
        for i in range(n):
            a.unmap(i * g, g)
        fake_cuda.complete_events()  # all done, none reaped yet
        before = (a.stats(), fake_cuda.counts())
        assert before[0]["pending_bytes"] == n * g
        with pytest.raises(ValueError, match="is not mapped"):
            a.unmap(0, g)
        assert (a.stats(), fake_cuda.counts()) == before
        a.map(n * g, g)
        a.unmap(n * g, g)  # an accepted unmap works the backlog down
        s = a.stats()
        assert s["pending_bytes"] == g and s["held_bytes"] == g
        assert fake_cuda.live_handles() == 1 and fake_cuda.live_events() == 1


def test_a_driver_whose_cuinit_fails_is_not_kept(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    alias = tmp_path / "libcuda_alias.so.1"  # a new path: loaded and cuInit'ed afresh
    alias.symlink_to(fake_cuda.path)
    monkeypatch.setenv("EKV_LIBCUDA", str(alias))
    fake_cuda.fail_nth("cuInit", 1, code=999)
    with pytest.raises(RuntimeError, match="cuInit failed.*libcuda_alias"):
        Arena(8 * MiB, device="cuda")
    with Arena(8 * MiB, device="cuda") as a:  # not remembered as failed; cuInit runs again
        a.map(0, a.granularity)
        assert fake_cuda.live_mappings() == 1
    assert fake_cuda.calls("cuInit") == 2 and fake_cuda.counts()["reservations"] == 0
