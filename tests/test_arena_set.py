"""kv.arena_set.ArenaSet alone: the pool's arenas mapped chunk by chunk together, and what
happens to physical memory after an unmap (reuse caches, poll, release), counted by the OS."""

from __future__ import annotations

import pytest
import torch

from torch_elastic_kv.kv.arena_set import ArenaSet
from torch_elastic_kv.kv.placement import plan_geometry
from torch_elastic_kv.memory.arena import Arena
from torch_elastic_kv.testing.proc import rss_shmem

MiB = 1 << 20


def _geometry(granularity: int):
    return plan_geometry(2 * MiB, granularity)  # one 2 MiB page per 2 MiB chunk on the host


def test_reserve_rounds_to_chunks_and_counts_every_byte():
    s = ArenaSet.reserve(3, 5 * MiB, torch.device("cpu"), 4 * MiB, _geometry)
    try:
        assert len(s) == 3 and s.geometry.chunk_bytes == 2 * MiB
        assert [a.capacity for a in s.arenas] == [6 * MiB] * 3  # 5 MiB up to 3 whole chunks
        assert s.num_chunks == 3 and s.reserved_bytes == 18 * MiB
        rss0 = rss_shmem()
        s.map_chunks([0, 2])
        for a in s.arenas:  # touch the mapped chunks: the OS counts what is written
            a.view(torch.uint8, (2 * MiB,)).fill_(1)
            a.view(torch.uint8, (2 * MiB,), offset=4 * MiB).fill_(1)
        assert rss_shmem() - rss0 == 12 * MiB
        assert s.physical_bytes() == 12 * MiB and s.cached_bytes() == 0
        s.unmap_chunks([2])
        s.poll()
        # Out of the address space (the OS no longer counts it in this process's RSS), but each
        # arena keeps its unmapped chunk's memory for reuse (reuse_bytes 4 MiB) until released.
        assert rss_shmem() - rss0 == 6 * MiB
        assert s.cached_bytes() == 6 * MiB and s.physical_bytes() == 12 * MiB
        assert s.release_cached() == 6 * MiB
        assert s.cached_bytes() == 0 and s.physical_bytes() == 6 * MiB
        assert [a.stats()["releases"] for a in s.arenas] == [1, 1, 1]
    finally:
        s.close()
    assert all(a.closed for a in s.arenas)


def test_map_is_all_or_nothing_across_arenas():
    """A chunk the second arena cannot map: what the call mapped in the first goes back."""
    geometry = _geometry(Arena(2 * MiB).granularity)
    s = ArenaSet([Arena(6 * MiB), Arena(2 * MiB)], geometry)
    try:
        assert s.num_chunks == 1
        with pytest.raises(ValueError, match=r"range ends past the arena's capacity \(2097152 bytes\)"):
            s.map_chunks([0, 1])
        assert [a.stats()["mapped_bytes"] for a in s.arenas] == [0, 0]
        s.map_chunks([0])
        assert [a.stats()["mapped_bytes"] for a in s.arenas] == [2 * MiB, 2 * MiB]
    finally:
        s.close()


def test_empty_set_refused():
    with pytest.raises(ValueError, match="ArenaSet: needs at least one arena"):
        ArenaSet([], _geometry(2 * MiB))
