"""What the fake CUDA driver models for the tests above it: streams that must exist, events that
complete per stream, memory held by others, slow calls. Each control of FakeCuda is exercised
through the real cuda backend (an Arena on device "cuda"), as the code under test meets it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from torch_elastic_kv import Arena
from torch_elastic_kv.testing import FakeCuda

MiB = 1 << 20


def test_a_record_on_a_stream_the_driver_does_not_know_fails_and_changes_nothing(fake_cuda: FakeCuda) -> None:
    with Arena(16 * MiB, device="cuda") as a:
        g = a.granularity
        a.map(0, 2 * g)
        with pytest.raises(RuntimeError, match="cuEventRecord failed: CUDA_ERROR_INVALID_HANDLE"):
            a.unmap(0, 2 * g, stream=0x777000)
        assert a.stats()["mapped_bytes"] == 2 * g and fake_cuda.live_events() == 0
        s = fake_cuda.create_stream(0x777000)
        assert s == 0x777000
        a.unmap(0, 2 * g, stream=s)
        assert a.stats()["mapped_bytes"] == 0
        fake_cuda.destroy_stream(s)
        with pytest.raises(ValueError, match="not a stream made by create_stream"):
            fake_cuda.destroy_stream(s)
        with pytest.raises(ValueError, match="exists already"):
            fake_cuda.create_stream(fake_cuda.create_stream(0x888000))


def test_events_complete_per_stream_and_in_order(fake_cuda: FakeCuda) -> None:
    busy, idle = fake_cuda.create_stream(), fake_cuda.create_stream()
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 4 * g)
        fake_cuda.hold_stream(busy)
        a.unmap(0, g, stream=busy)
        a.unmap(g, g, stream=idle)
        a.unmap(2 * g, g, stream=busy)
        assert fake_cuda.pending_events(busy) == 2 and fake_cuda.pending_events(idle) == 0
        assert a.poll() == g  # only the idle stream's unmap could finish
        assert a.stats()["pending_bytes"] == 2 * g
        fake_cuda.complete_stream(busy)  # its queued work ran; the hold stays for later records
        assert fake_cuda.pending_events(busy) == 0 and a.poll() == 2 * g
        a.unmap(3 * g, g, stream=busy)
        assert a.poll() == 0
        fake_cuda.hold_stream(busy, False)  # letting go finishes what was queued
        assert a.poll() == g and fake_cuda.live_events() == 0


def test_waiting_for_an_event_finishes_the_earlier_work_on_its_stream_only(fake_cuda: FakeCuda) -> None:
    s1, s2 = fake_cuda.create_stream(), fake_cuda.create_stream()
    fake_cuda.hold_stream(s1)
    fake_cuda.hold_stream(s2)
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 3 * g)
        a.unmap(0, g, stream=s1)
        a.unmap(g, g, stream=s2)
        a.unmap(2 * g, g, stream=s1)
        a.trim(wait=True)  # waits on each event: s1's later one covers its earlier one
        assert a.stats()["pending_bytes"] == 0
        assert fake_cuda.pending_events(s1) == 0 and fake_cuda.pending_events(s2) == 0


def test_memory_held_by_others_is_not_free_and_cannot_be_created(fake_cuda: FakeCuda) -> None:
    free0, total = fake_cuda.mem_get_info()
    assert total == 8 << 30 and free0 == total - fake_cuda.used_bytes()
    fake_cuda.set_other_used(total - 6 * MiB)
    assert fake_cuda.mem_get_info() == (6 * MiB - fake_cuda.used_bytes(), total)
    with Arena(64 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, g)
        with pytest.raises(torch.OutOfMemoryError, match="cuMemCreate"):
            a.map(g, 4 * g)
        assert a.stats()["mapped_bytes"] == g  # all or nothing
        assert fake_cuda.mem_get_info()[0] == 6 * MiB - g
        fake_cuda.set_other_used(0)  # the other process let go
        a.map(g, 4 * g)
    fake_cuda.reset()
    assert fake_cuda.mem_get_info()[0] == total - fake_cuda.used_bytes()


def test_a_latency_slows_its_function_outside_the_driver_lock(fake_cuda: FakeCuda) -> None:
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        fake_cuda.set_latency("cuMemCreate", 0.5)
        t0 = time.perf_counter()
        log: list[str] = []

        def query() -> None:  # another thread's driver call is not held up by the sleep
            time.sleep(0.05)  # the map is asleep in cuMemCreate by then (0.45 s of margin)
            fake_cuda.live_handles()  # takes the driver's lock (not the arena's, held by the map)
            # a cuMemCreate is counted under the driver's lock after its sleep: none yet
            log.append(f"query done, {fake_cuda.calls('cuMemCreate')} creates counted")

        th = threading.Thread(target=query)
        th.start()
        a.map(0, g)
        log.append("map")
        elapsed = time.perf_counter() - t0
        th.join()
        assert elapsed >= 0.5
        assert log == ["query done, 0 creates counted", "map"]
        fake_cuda.set_latency("cuMemCreate", 0)
        with pytest.raises(ValueError, match="seconds=-1"):
            fake_cuda.set_latency("cuMemCreate", -1)
