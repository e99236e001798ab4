"""The page pool's arenas as one: chunk ``c`` of the pool is chunk ``c`` in every arena.

Levels: the pool (``pool.py``) decides which chunks hold pages; this module maps and unmaps a
chunk in every arena at once, and owns what happens to physical memory once a chunk is
unmapped: each arena keeps up to ``reuse_bytes`` of unmapped handles for the next grow (a CUDA
``cuMemCreate`` is the expensive call), ``poll`` finishes the unmaps whose device work is done,
``release_cached`` (the pool's ``trim``) gives the kept handles back, and streams registered
here make every later unmap wait for work queued on them.

Not thread-safe by itself: the pool calls it under its lock, except for the all-or-nothing map
of chunks nobody else can reach yet (a grow outside the lock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from torch_elastic_kv.kv.placement import ChunkGeometry
from torch_elastic_kv.memory import arena as _arena

from .._util import ceil_div


class ArenaSet:
    """Equal arenas mapped and unmapped chunk by chunk together.

    Args:
        arenas: the arenas, each at least ``num_chunks * geometry.chunk_bytes`` long; the set
            owns them (``close`` closes them).
        geometry: how pages tile each arena (its ``chunk_bytes`` is one arena's share of a chunk).
    """

    def __init__(self, arenas: Sequence[_arena.Arena], geometry: ChunkGeometry):
        if not arenas:
            raise ValueError("ArenaSet: needs at least one arena")
        self.arenas = list(arenas)
        self.geometry = geometry

    @classmethod
    def reserve(
        cls,
        count: int,
        nbytes: int,
        device: torch.device,
        reuse_bytes: int | None,
        geometry_for: Callable[[int], ChunkGeometry],
    ) -> ArenaSet:
        """Reserve ``count`` arenas of at least ``nbytes`` each, rounded up to whole chunks.

        The chunk size depends on the backend's granularity, known only once an arena exists:
        ``geometry_for(granularity)`` gives it, and the first arena is made again if rounding
        changed its size. On any error the arenas made so far are closed.
        """
        arenas: list[_arena.Arena] = []
        try:
            arenas.append(_arena.Arena(nbytes, device, reuse_bytes))
            geometry = geometry_for(arenas[0].granularity)
            # Whole chunks only, so the reserved size is exactly what a pool's budget may reach.
            per_arena = max(ceil_div(nbytes, geometry.chunk_bytes), 1) * geometry.chunk_bytes
            if arenas[0].capacity != per_arena:
                arenas[0].close()
                arenas[0] = _arena.Arena(per_arena, device, reuse_bytes)
            while len(arenas) < count:
                arenas.append(_arena.Arena(per_arena, device, reuse_bytes))
        except BaseException:
            for a in arenas:
                a.close()
            raise
        return cls(arenas, geometry)

    def __len__(self) -> int:
        return len(self.arenas)

    @property
    def num_chunks(self) -> int:
        """Chunks every arena can hold."""
        return min(a.capacity for a in self.arenas) // self.geometry.chunk_bytes

    @property
    def reserved_bytes(self) -> int:
        """Address space reserved by all the arenas."""
        return sum(a.capacity for a in self.arenas)

    # -- mapping ---------------------------------------------------------------------------
    def map_chunks(self, chunks: Iterable[int]) -> None:
        """Map ``chunks`` in every arena, all or nothing: on any error what this call mapped is
        unmapped again and the error propagates."""
        size = self.geometry.chunk_bytes
        done: list[tuple[_arena.Arena, int]] = []
        try:
            for c in chunks:
                for a in self.arenas:
                    a.map(c * size, size)
                    done.append((a, c))
        except BaseException:
            for a, c in reversed(done):
                a.unmap(c * size, size)
            raise

    def unmap_chunks(self, chunks: Iterable[int]) -> None:
        """Unmap ``chunks`` in every arena (the device's queued use finishes first; see ``poll``)."""
        size = self.geometry.chunk_bytes
        for c in chunks:
            for a in self.arenas:
                a.unmap(c * size, size)

    def add_stream(self, stream: object) -> None:
        """Make every later unmap in every arena wait for the work queued on ``stream`` too."""
        for a in self.arenas:
            a.add_stream(stream)

    # -- after an unmap: reuse caches, pending unmaps ---------------------------------------
    def poll(self) -> int:
        """Finish the unmaps whose device work is done, without waiting for the rest: their
        handles go to the reuse caches (up to ``reuse_bytes``) or back to the driver. Returns
        the bytes that left the pending state."""
        return sum(a.poll() for a in self.arenas)

    def release_cached(self) -> int:
        """Release the reuse caches, waiting for the device to finish with what was unmapped;
        mapped chunks stay. Returns the physical bytes given back."""
        before = self.physical_bytes()
        for a in self.arenas:
            a.trim(wait=True)
        return before - self.physical_bytes()

    def cached_bytes(self) -> int:
        """Physical bytes held that are not mapped: handles kept for reuse plus unmaps still
        waiting for the device."""
        return sum(s["cached_bytes"] + s["pending_bytes"] for s in (a.stats() for a in self.arenas))

    def physical_bytes(self) -> int:
        """Physical bytes the arenas hold: mapped, cached and pending."""
        total = 0
        for a in self.arenas:
            s = a.stats()
            total += s.get("held_bytes", s["mapped_bytes"] + s.get("cached_bytes", 0))
        return total

    def close(self) -> None:
        """Close every arena (mapped memory and caches go back; views must not be used after)."""
        for a in self.arenas:
            a.close()
