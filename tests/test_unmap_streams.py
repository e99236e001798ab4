"""An unmap is ordered after every stream that may use the memory (issue 14, item 1).

torch's side streams are non-blocking: an event on the unmapping thread's stream (a grower
thread's is the default stream) says nothing about a kernel queued on the model's stream. On
the fake driver a held stream is that kernel: its events stay not-ready until it completes."""

from __future__ import annotations

import pytest
import torch

from torch_elastic_kv import Arena
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing import FakeCuda

MiB = 1 << 20


def test_an_unmap_waits_for_a_registered_side_stream_not_only_the_callers(fake_cuda: FakeCuda) -> None:
    model = fake_cuda.create_stream()
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 2 * g)
        a.add_stream(model)
        a.add_stream(model)  # no-op
        assert a.streams == [model]
        fake_cuda.hold_stream(model)  # a kernel there still reads the granules
        a.unmap(0, 2 * g)  # from a thread whose current stream is the default one
        assert fake_cuda.live_events() == 2  # one on the caller's stream, one on the model's
        assert a.poll() == 0 and a.trim() == 0
        assert fake_cuda.live_mappings() == 2  # still mapped in the driver
        fake_cuda.complete_stream(model)
        assert a.poll() == 2 * g and fake_cuda.live_mappings() == 0 and fake_cuda.live_events() == 0
        a.remove_stream(model)
        assert a.streams == []
        with pytest.raises(ValueError, match="not registered"):
            a.remove_stream(model)


def test_without_registration_the_unmap_does_not_wait_for_the_side_stream(fake_cuda: FakeCuda) -> None:
    # The hazard the registration removes: the caller's event completes, the unmap lands.
    model = fake_cuda.create_stream()
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, g)
        fake_cuda.hold_stream(model)
        a.unmap(0, g)
        assert a.poll() == g and fake_cuda.pending_events(model) == 0


def test_unmap_on_several_streams_and_a_failed_record_changes_nothing(fake_cuda: FakeCuda) -> None:
    s1, s2 = fake_cuda.create_stream(), fake_cuda.create_stream()
    with Arena(16 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(0, 2 * g)
        fake_cuda.hold_stream(s2)
        fake_cuda.fail_nth("cuEventRecord", 2, 999)
        with pytest.raises(RuntimeError, match="cuEventRecord"):
            a.unmap(0, g, stream=[s1, s2])
        assert a.stats()["mapped_bytes"] == 2 * g and fake_cuda.live_events() == 0
        a.unmap(0, g, stream=[s1, s2, s1])  # duplicates fence once
        assert fake_cuda.live_events() == 2 and a.poll() == 0
        fake_cuda.complete_stream(s2)
        assert a.poll() == g
        with pytest.raises(TypeError, match="Arena.add_stream: stream must be an int CUstream"):
            a.add_stream(None)
        with pytest.raises(ValueError, match="is not a CUstream handle"):
            a.add_stream(-1)


def test_registered_streams_are_capped(fake_cuda: FakeCuda) -> None:
    with Arena(16 * MiB, device="cuda") as a:
        for _ in range(16):
            a.add_stream(fake_cuda.create_stream())
        with pytest.raises(ValueError, match="16 streams are registered already"):
            a.add_stream(fake_cuda.create_stream())
        assert len(a.streams) == 16


def test_a_pool_registers_a_stream_with_every_arena() -> None:
    # Pools cannot run on the fake driver (torch would need CUDA to wrap its memory), so this is
    # the host pool: registration reaches every plane (each arena waits for it when on CUDA).
    pool = KVPagePool(2, 2, 64, dtype=torch.float16, page_tokens=16, max_bytes=64 * MiB, layout="layer-major")
    try:
        pool.add_stream(0x4000)
        assert [p.arena.streams for p in pool._planes] == [[0x4000]] * 4
        pages = pool.alloc(4)
        pool.free(pages)
        assert pool.shrink() > 0  # host unmaps are synchronous: the streams cost nothing there
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.add_stream(0x4000)
