"""Page placement: which page slots are live, which chunks are mapped, where new pages go.

Plain Python bookkeeping, no torch and no memory: the pool (``pool.py``) asks this module
*which* chunks to map or unmap and *which* pages to move, then does the memory work itself.

Vocabulary (see docs/INTERFACES.md): a **chunk** is the unit the pool maps and unmaps: a run
of ``granules_per_chunk`` arena granules that holds exactly ``pages_per_chunk`` pages. When a
page is smaller than a granule a chunk holds many pages; when a page spans several granules a
chunk holds one or a few pages. Pages never straddle a chunk boundary, so a chunk with no
live page can always be given back whole.

Placement rule: a new page goes to the mapped chunk that is already fullest (ties: lowest
chunk index), so frees tend to empty whole chunks; only when no mapped chunk has a free
slot is a new chunk mapped.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .._util import ceil_div


@dataclass(frozen=True)
class ChunkGeometry:
    """How pages tile an arena: ``page_stride`` bytes apart, ``pages_per_chunk`` per chunk."""

    page_bytes: int  # bytes of payload in one page (per plane)
    page_stride: int  # bytes between consecutive pages (>= page_bytes, padding at the end)
    pages_per_chunk: int
    chunk_bytes: int  # pages_per_chunk * page_stride, a multiple of the granularity
    granularity: int

    @property
    def granules_per_chunk(self) -> int:
        return self.chunk_bytes // self.granularity


def plan_geometry(
    page_bytes: int, granularity: int, max_padding: float = 1 / 32, element_bytes: int = 1
) -> ChunkGeometry:
    """Choose the page stride and chunk size for pages of ``page_bytes`` on ``granularity``.

    The chunk is ``lcm(page_stride, granularity)``: the smallest run of whole granules that
    whole pages tile exactly, which keeps every page at a uniform stride (one flat tensor
    view covers them all). Rounding the stride up to a larger power of two shrinks that lcm
    at the cost of padding; we take the smallest chunk whose padding stays under
    ``max_padding`` of the page (about 3 %), falling back to the least padding.
    """
    if page_bytes <= 0 or granularity <= 0:
        raise ValueError(f"plan_geometry: page_bytes={page_bytes} and granularity={granularity} must be > 0")
    candidates = []
    align = 1
    while align <= granularity:
        if align % element_bytes == 0:
            stride = ceil_div(page_bytes, align) * align
            chunk = math.lcm(stride, granularity)
            padding = (stride - page_bytes) / page_bytes
            candidates.append((padding <= max_padding, -chunk, -padding, stride, chunk))
        align *= 2
    if not candidates:
        raise ValueError(f"plan_geometry: element size {element_bytes} exceeds granularity {granularity}")
    # Prefer: within the padding limit, then the smallest chunk, then the least padding.
    ok, _, _, stride, chunk = max(candidates)
    if not ok:
        stride, chunk = min(((c[3], c[4]) for c in candidates), key=lambda sc: (sc[0], sc[1]))
    return ChunkGeometry(page_bytes, stride, chunk // stride, chunk, granularity)


class PagePlacement:
    """Live pages and mapped chunks of one pool, with fullest-chunk-first placement.

    Page ``p`` lives in chunk ``p // pages_per_chunk``. Every method either succeeds or
    raises before changing anything.
    """

    def __init__(self, num_chunks: int, pages_per_chunk: int):
        if num_chunks <= 0 or pages_per_chunk <= 0:
            raise ValueError(f"PagePlacement: num_chunks={num_chunks}, pages_per_chunk={pages_per_chunk} must be > 0")
        self.num_chunks = num_chunks
        self.pages_per_chunk = pages_per_chunk
        self._live = bytearray(num_chunks * pages_per_chunk)  # 1 where a page is allocated
        self._count = [0] * num_chunks  # live pages per chunk
        self._mapped = bytearray(num_chunks)
        self._free_slots: dict[int, list[int]] = {}  # mapped chunk -> heap of free page ids
        # live count -> mapped chunks with at least one free slot (placement candidates)
        self._by_count: list[set[int]] = [set() for _ in range(pages_per_chunk)]
        self.live_pages = 0
        self.mapped_chunks = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def max_pages(self) -> int:
        return self.num_chunks * self.pages_per_chunk

    def is_live(self, page: int) -> bool:
        return 0 <= page < self.max_pages and bool(self._live[page])

    def is_mapped(self, chunk: int) -> bool:
        return bool(self._mapped[chunk])

    def live_in_chunk(self, chunk: int) -> int:
        return self._count[chunk]

    def mapped_free_slots(self) -> int:
        """Free page slots in chunks that are already mapped."""
        return self.mapped_chunks * self.pages_per_chunk - self.live_pages

    def mapped_chunk_ids(self) -> list[int]:
        return [c for c in range(self.num_chunks) if self._mapped[c]]

    def empty_mapped_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if self._mapped[c] and self._count[c] == 0]

    def chunks_to_map_for(self, n: int) -> list[int]:
        """Unmapped chunks (lowest first) that must be mapped so ``n`` more pages fit."""
        missing = n - self.mapped_free_slots()
        if missing <= 0:
            return []
        need = ceil_div(missing, self.pages_per_chunk)
        out = []
        for c in range(self.num_chunks):
            if not self._mapped[c]:
                out.append(c)
                if len(out) == need:
                    return out
        return out  # fewer than needed: the caller reports the shortfall

    # -- chunk state -----------------------------------------------------------------------
    def mark_mapped(self, chunk: int) -> None:
        if self._mapped[chunk]:
            raise ValueError(f"PagePlacement: chunk {chunk} is already mapped")
        self._mapped[chunk] = 1
        self.mapped_chunks += 1
        base = chunk * self.pages_per_chunk
        self._free_slots[chunk] = list(range(base, base + self.pages_per_chunk))  # sorted = a heap
        self._by_count[0].add(chunk)

    def mark_unmapped(self, chunk: int) -> None:
        if not self._mapped[chunk] or self._count[chunk]:
            raise ValueError(
                f"PagePlacement: chunk {chunk} is not mapped or still holds {self._count[chunk]} live pages"
            )
        self._mapped[chunk] = 0
        self.mapped_chunks -= 1
        del self._free_slots[chunk]
        self._by_count[0].discard(chunk)

    # -- pages -----------------------------------------------------------------------------
    def take(self, n: int) -> list[int]:
        """Allocate ``n`` pages from mapped chunks, fullest chunk first. Needs enough free slots."""
        if n > self.mapped_free_slots():
            raise ValueError(f"PagePlacement.take: {n} pages requested, {self.mapped_free_slots()} free slots mapped")
        out: list[int] = []
        while len(out) < n:
            chunk = self._fullest_open_chunk()
            out.append(self._take_from(chunk))
        return out

    def take_in(self, chunk: int) -> int:
        """Allocate the lowest free slot of a specific mapped chunk (used by compaction)."""
        if not self._mapped[chunk] or self._count[chunk] >= self.pages_per_chunk:
            raise ValueError(f"PagePlacement.take_in: chunk {chunk} is unmapped or full")
        return self._take_from(chunk)

    def give(self, pages: list[int]) -> None:
        """Free ``pages``; raises ValueError (changing nothing) on a double or unknown free."""
        seen = set()
        for p in pages:
            if not (0 <= p < self.max_pages) or not self._live[p] or p in seen:
                reason = "out of range" if not (0 <= p < self.max_pages) else "not allocated (double free?)"
                raise ValueError(f"free: page {p} is {reason}; nothing was freed")
            seen.add(p)
        for p in pages:
            chunk = p // self.pages_per_chunk
            c = self._count[chunk]
            if c < self.pages_per_chunk:
                self._by_count[c].discard(chunk)
            self._live[p] = 0
            self._count[chunk] = c - 1
            self._by_count[c - 1].add(chunk)
            heapq.heappush(self._free_slots[chunk], p)
            self.live_pages -= 1

    def live_pages_in(self, chunk: int) -> list[int]:
        base = chunk * self.pages_per_chunk
        return [p for p in range(base, base + self.pages_per_chunk) if self._live[p]]

    # -- internals -------------------------------------------------------------------------
    def _fullest_open_chunk(self) -> int:
        for count in range(self.pages_per_chunk - 1, -1, -1):
            bucket = self._by_count[count]
            if bucket:
                return min(bucket)
        raise AssertionError("no open chunk although free slots were counted")

    def _take_from(self, chunk: int) -> int:
        page = heapq.heappop(self._free_slots[chunk])
        c = self._count[chunk]
        self._by_count[c].discard(chunk)
        self._live[page] = 1
        self._count[chunk] = c + 1
        if c + 1 < self.pages_per_chunk:
            self._by_count[c + 1].add(chunk)
        self.live_pages += 1
        return page
