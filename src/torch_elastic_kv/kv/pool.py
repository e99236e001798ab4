"""KVPagePool: fixed-size KV pages in elastic memory (torch views over arenas).

A page holds ``page_tokens`` tokens of K and V for every layer. Address space for the most
the pool may ever hold is reserved up front; physical memory backs only the chunks (runs of
granules, see ``_page_placement``) that hold pages, and is given back when they empty.

Layouts (measured in benchmarks/RESULTS.md, "KV page pool and cache"):

* ``"page-major"`` (default): one arena; a page is ``[layers, 2, page_tokens, kv_heads,
  head_dim]``. One growth step is one chunk (usually one granule), whatever the depth of the
  model, and a page move is one contiguous copy. Per-layer views are strided by the whole page.
* ``"layer-major"``: one arena per layer and K/V (``2 * layers`` arenas), each page
  ``[page_tokens, kv_heads, head_dim]`` contiguous. Per-layer reads are contiguous, but every
  growth step maps one chunk in each of the ``2 * layers`` arenas.

Growing outside the lock: ``reserve_pages`` (the grower's call) picks its chunks under the
pool's lock, maps them with the lock released, and marks them mapped under it again, so
``alloc``/``free``/``stats``/``shrink``/``compact`` on other threads do not wait for the driver.
One such grow runs at a time; its chunks are neither usable nor unmappable until it commits
(they are not "mapped" to the placement yet), and a failed map gives them back unmapped.
Calls that must map themselves (an ``alloc`` beyond the mapped slots, ``set_max_bytes``,
``close``) first wait for a grow in flight to finish.

When memory goes back: ``shrink``/``compact`` unmap empty chunks; what happens to the
physical memory after that (the arenas' reuse caches of up to ``reuse_bytes``, ``poll``,
``trim``, streams to wait for) is ``arena_set.ArenaSet``'s, which owns the arenas; the pool is
pages, their placement and the views over them.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from torch_elastic_kv.kv.arena_set import ArenaSet
from torch_elastic_kv.kv.placement import ChunkGeometry, PagePlacement, plan_geometry
from torch_elastic_kv.memory import arena as _arena

from .._util import ceil_div, out_of_memory

LAYOUTS = ("page-major", "layer-major")
MoveListener = Callable[[dict[int, int]], None]
# guard(chunks, map, unmap): see KVPagePool.set_map_guard
MapGuard = Callable[[list[int], Callable[[], None], Callable[[], None]], None]


def default_max_bytes(device: torch.device) -> int:
    """A sensible share of the device's memory: 90 % of what is free on CUDA, 25 % of RAM on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.25)


@dataclass
class _Plane:
    """One arena and the page-strided view over it."""

    arena: _arena.Arena
    pages: torch.Tensor  # [max_pages, *page_shape], stride page_stride per page
    raw: torch.Tensor  # [max_pages, page_stride // element_size]: whole page slots, padding included


def _locked(method):
    """Run ``method`` under the pool's lock: placement and mapping are one critical section, so
    threads (and caches on different threads) may share a pool."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class KVPagePool:
    """Pages of K/V for ``num_layers`` layers, backed by physical memory only where needed.

    Args:
        num_layers, num_kv_heads, head_dim: shape of the model's KV.
        dtype: element type of K and V.
        device: ``"cpu"`` or a CUDA device.
        page_tokens: tokens per page.
        max_bytes: most resident (physically backed) bytes; default ``default_max_bytes``.
        min_bytes: resident floor; mapped at construction and never given back.
        layout: ``"page-major"`` or ``"layer-major"`` (see module docstring).
        reserve_bytes: address space to reserve (the ceiling for ``set_max_bytes``);
            default ``max_bytes``.
        reuse_bytes: passed to each arena (physical handles kept for fast regrowth).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        page_tokens: int = 16,
        max_bytes: int | None = None,
        min_bytes: int = 0,
        layout: str = "page-major",
        reserve_bytes: int | None = None,
        reuse_bytes: int | None = None,
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("page_tokens", page_tokens),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVPagePool: {name} must be a positive int, got {value!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"KVPagePool: layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype == torch.uint8):
            raise ValueError(f"KVPagePool: dtype must be a torch floating dtype, got {dtype!r}")
        self._lock = threading.RLock()  # see _locked
        # A grow mapping outside the lock (reserve_pages): its chunks, and the condition that
        # calls which must not overlap it wait on.
        self._growing: list[int] = []
        self._grow_done = threading.Condition(self._lock)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if max_bytes is None:
            max_bytes = default_max_bytes(self.device)
        if max_bytes <= 0 or min_bytes < 0 or min_bytes > max_bytes:
            raise ValueError(
                f"KVPagePool: need 0 <= min_bytes <= max_bytes and max_bytes > 0, "
                f"got min_bytes={min_bytes}, max_bytes={max_bytes}"
            )
        reserve_bytes = max_bytes if reserve_bytes is None else reserve_bytes
        if reserve_bytes < max_bytes:
            raise ValueError(f"KVPagePool: reserve_bytes={reserve_bytes} is below max_bytes={max_bytes}")

        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.page_tokens, self.layout = dtype, page_tokens, layout
        self.element_size = torch.empty((), dtype=dtype).element_size()
        if layout == "page-major":
            self._page_shape: tuple[int, ...] = (num_layers, 2, page_tokens, num_kv_heads, head_dim)
            num_planes = 1
        else:
            self._page_shape = (page_tokens, num_kv_heads, head_dim)
            num_planes = 2 * num_layers
        plane_page_bytes = math.prod(self._page_shape) * self.element_size
        self.page_bytes = plane_page_bytes * num_planes
        self._max_bytes, self._min_bytes = int(max_bytes), int(min_bytes)

        # Each plane reserves an equal share, in whole chunks.
        self._arenas = ArenaSet.reserve(
            num_planes,
            ceil_div(reserve_bytes, num_planes),
            self.device,
            reuse_bytes,
            lambda granularity: plan_geometry(plane_page_bytes, granularity, element_bytes=self.element_size),
        )
        self.geometry: ChunkGeometry = self._arenas.geometry
        self._placement = PagePlacement(self._arenas.num_chunks, self.geometry.pages_per_chunk)
        self.max_pages = self._placement.max_pages
        # The fake test driver's "device" memory is host memory: its planes are CPU tensors.
        fake = self._arenas.arenas[0].backend == "cuda(fake)"
        self._data_device = torch.device("cpu") if fake else self.device
        self._planes = [self._make_plane(a, fake) for a in self._arenas.arenas]
        self._listeners: list[MoveListener | weakref.WeakMethod] = []  # see add_move_listener
        self._counters = {"grows": 0, "shrinks": 0, "compactions": 0, "pages_moved": 0}
        self._closed = False
        self._map_guard: Optional[MapGuard] = None  # see set_map_guard
        if self._min_bytes:
            self._map_chunks(
                self._placement.chunks_to_map_for(
                    self._chunks_for_bytes(self._min_bytes) * self.geometry.pages_per_chunk
                )
            )

    # -- views -----------------------------------------------------------------------------
    def _make_plane(self, a: _arena.Arena, host: bool = False) -> _Plane:
        g = self.geometry
        stride = g.page_stride // self.element_size
        flat = (a.host_view if host else a.view)(self.dtype, (self.max_pages * stride,))
        page_strides = []
        acc = 1
        for size in reversed(self._page_shape):
            page_strides.append(acc)
            acc *= size
        pages = flat.as_strided((self.max_pages, *self._page_shape), (stride, *reversed(page_strides)))
        raw = flat.view(self.max_pages, stride)
        return _Plane(a, pages, raw)

    def key_cache(self, layer: int) -> torch.Tensor:
        """K of ``layer`` for every page: ``[max_pages, page_tokens, kv_heads, head_dim]`` (a view)."""
        return self._layer_view(layer, 0)

    def value_cache(self, layer: int) -> torch.Tensor:
        """V of ``layer`` for every page: ``[max_pages, page_tokens, kv_heads, head_dim]`` (a view)."""
        return self._layer_view(layer, 1)

    def _layer_view(self, layer: int, kv: int) -> torch.Tensor:
        self._check_open("key_cache" if kv == 0 else "value_cache")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"KVPagePool: layer {layer} out of range [0, {self.num_layers})")
        if self.layout == "page-major":
            return self._planes[0].pages[:, layer, kv]
        return self._planes[2 * layer + kv].pages

    @_locked
    def add_stream(self, stream: object) -> None:
        """Register a stream the pool's tensors are used on (an int CUstream or a
        ``torch.cuda.Stream``): every later unmap (shrink, compaction, trim), whichever thread
        makes it, waits for the work queued there too. The stream of the thread that unmaps is
        always covered; a model running on a side stream must register it. No effect on CPU."""
        self._check_open("add_stream")
        self._arenas.add_stream(stream)

    def set_map_guard(self, guard: Optional[MapGuard]) -> None:
        """Route every later map of chunks through ``guard(chunks, map, unmap)`` (None: direct).

        The guard calls ``map()`` (all or nothing) and either returns, the chunks then being
        mapped, or raises ``MemoryError`` with nothing of them mapped (it calls ``unmap()`` if
        it mapped them and then decides against them). Tensor parallel uses it so that a map
        that fails on any rank fails on every rank in the same step."""
        if guard is not None and not callable(guard):
            raise ValueError(f"KVPagePool.set_map_guard: guard must be callable or None, got {guard!r}")
        self._map_guard = guard

    # -- sizes -----------------------------------------------------------------------------
    @property
    def chunk_bytes(self) -> int:
        """Physical bytes one growth step maps (one chunk in every arena)."""
        return self.geometry.chunk_bytes * len(self._planes)

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def min_bytes(self) -> int:
        return self._min_bytes

    def _chunks_for_bytes(self, nbytes: int) -> int:
        return ceil_div(nbytes, self.chunk_bytes)

    def _budget_chunks(self) -> int:
        return min(self._max_bytes // self.chunk_bytes, self._placement.num_chunks)

    def _floor_chunks(self) -> int:
        return min(self._chunks_for_bytes(self._min_bytes), self._budget_chunks())

    @property
    @_locked
    def free_pages(self) -> int:
        """Pages that can still be allocated within the budget, mapped or not."""
        p = self._placement
        unmapped = max(self._budget_chunks() - p.mapped_chunks, 0)
        return p.mapped_free_slots() + unmapped * p.pages_per_chunk

    @property
    @_locked
    def mapped_free_pages(self) -> int:
        """Pages that can be allocated without mapping a chunk."""
        return self._placement.mapped_free_slots()

    @property
    @_locked
    def live_pages(self) -> int:
        return self._placement.live_pages

    @_locked
    def can_alloc(self, n: int) -> bool:
        """Whether ``alloc(n)`` fits in the budget (the device may still refuse memory)."""
        self._check_open("can_alloc")
        return 0 <= n <= self.free_pages

    @_locked
    def is_live(self, page: int) -> bool:
        self._check_open("is_live")
        return self._placement.is_live(page)

    # -- allocation ------------------------------------------------------------------------
    @_locked
    def alloc(self, n: int) -> list[int]:
        """Allocate ``n`` pages; raises MemoryError / torch.OutOfMemoryError with nothing changed."""
        self._check_open("alloc")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"KVPagePool.alloc: n must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        if n > self._placement.mapped_free_slots():
            self._wait_for_grow()  # its chunks may be the ones this needs
            self._check_open("alloc")
        self._ensure_mapped_slots(n, "alloc")
        return self._placement.take(n)

    @_locked
    def free(self, ids: Sequence[int]) -> None:
        """Return pages to the pool (memory stays mapped until shrink/compact/trim)."""
        self._check_open("free")
        self._placement.give([int(i) for i in ids])

    def reserve_pages(self, n: int) -> None:
        """Map chunks now so that ``n`` more pages can be allocated without mapping.

        The mapping runs outside the pool's lock (see the module docstring): other threads'
        pool calls proceed meanwhile, and the pages become allocatable when it returns.
        """
        with self._lock:
            self._check_open("reserve_pages")
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"KVPagePool.reserve_pages: n must be an int >= 0, got {n!r}")
            self._wait_for_grow()
            self._check_open("reserve_pages")
            chunks = self._plan_chunks(n, "reserve_pages")
            if not chunks:
                return
            self._growing = chunks
        try:
            self._map_planes(chunks)  # all or nothing: on an error nothing of it stays mapped
            with self._lock:
                self._commit_chunks(chunks)
        finally:
            with self._lock:
                self._growing = []
                self._grow_done.notify_all()

    def _wait_for_grow(self) -> None:
        """Wait (lock released meanwhile) until no grow maps outside the lock. Caller holds it."""
        while self._growing:
            self._grow_done.wait()

    def _ensure_mapped_slots(self, n: int, what: str) -> None:
        self._map_chunks(self._plan_chunks(n, what))

    def _plan_chunks(self, n: int, what: str) -> list[int]:
        """The chunks to map so ``n`` more pages fit; out-of-memory error beyond the budget."""
        p = self._placement
        chunks = p.chunks_to_map_for(n)
        need_chunks = ceil_div(max(n - p.mapped_free_slots(), 0), p.pages_per_chunk)
        if p.mapped_chunks + need_chunks > self._budget_chunks() or len(chunks) < need_chunks:
            free = self.free_pages
            raise out_of_memory(
                self.device,
                (
                    f"KVPagePool.{what}: {n} pages ({n * self.page_bytes} bytes) needed, {free} pages "
                    f"({free * self.page_bytes} bytes) free within max_bytes={self._max_bytes} "
                    f"(resident {self.resident_bytes}, live {p.live_pages * self.page_bytes} bytes)"
                ),
            )
        return chunks

    def _map_chunks(self, chunks: list[int]) -> None:
        """Map ``chunks`` in every plane, all or nothing, and mark them mapped."""
        self._map_planes(chunks)
        self._commit_chunks(chunks)

    def _map_planes(self, chunks: list[int]) -> None:
        """Map ``chunks`` in every plane, all or nothing (the placement is not touched, so this
        may run without the lock on chunks nobody else can reach)."""
        try:
            if self._map_guard is None:
                self._arenas.map_chunks(chunks)
            else:
                self._map_guard(
                    list(chunks),
                    functools.partial(self._arenas.map_chunks, chunks),
                    functools.partial(self._arenas.unmap_chunks, chunks),
                )
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise out_of_memory(
                self.device,
                (
                    f"KVPagePool: mapping {len(chunks)} chunk(s) of {self.chunk_bytes} bytes failed "
                    f"(resident {self.resident_bytes} bytes, max_bytes={self._max_bytes}): {e}"
                ),
            ) from e

    def _commit_chunks(self, chunks: list[int]) -> None:
        for c in chunks:
            self._placement.mark_mapped(c)
        if chunks:
            self._counters["grows"] += 1

    def _unmap_chunks(self, chunks: list[int]) -> int:
        for c in chunks:
            self._placement.mark_unmapped(c)
            self._arenas.unmap_chunks([c])
        if chunks:
            self._counters["shrinks"] += 1
        return len(chunks) * self.chunk_bytes

    # -- giving memory back ----------------------------------------------------------------
    @_locked
    def shrink(self, keep_pages: int = 0) -> int:
        """Unmap empty chunks while more than ``keep_pages`` pages (and min_bytes) stay resident.

        Emptiest-last order: the highest-index empty chunks go first. Returns unmapped bytes.
        """
        self._check_open("shrink")
        if not isinstance(keep_pages, int) or keep_pages < 0:
            raise ValueError(f"KVPagePool.shrink: keep_pages must be an int >= 0, got {keep_pages!r}")
        p = self._placement
        keep_chunks = max(ceil_div(keep_pages, p.pages_per_chunk), self._floor_chunks())
        spare = p.mapped_chunks - keep_chunks
        if spare <= 0:
            return 0
        empty = p.empty_mapped_chunks()
        return self._unmap_chunks(sorted(empty, reverse=True)[:spare])

    @_locked
    def compact(self, on_move: MoveListener | None = None) -> int:
        """Move live pages out of sparse chunks into holes of dense ones, then unmap emptied chunks.

        ``on_move({old: new})`` and every listener from ``add_move_listener`` are called after
        the data is copied and before memory is given back (old and new pages are both live
        while they run). Returns unmapped bytes. If the copy or a callback raises, the move is
        undone (callbacks that already ran get the inverse map) and the error propagates with
        the pool as it was.
        """
        self._check_open("compact")
        p = self._placement
        mapped = p.mapped_chunk_ids()
        keep_n = max(ceil_div(p.live_pages, p.pages_per_chunk), self._floor_chunks())
        order = sorted(mapped, key=lambda c: (-p.live_in_chunk(c), c))
        keep, drain = order[:keep_n], [c for c in order[keep_n:] if p.live_in_chunk(c)]
        if drain:
            sources = [page for c in drain for page in p.live_pages_in(c)]
            dests: list[int] = []
            for c in keep:  # fullest first, so the densest chunks fill up
                while len(dests) < len(sources) and p.live_in_chunk(c) < p.pages_per_chunk:
                    dests.append(p.take_in(c))
            moves = dict(zip(sources, dests))
            # Sources stay live until every owner has switched: a failure can still go back.
            try:
                self._copy_pages(sources, dests)
            except BaseException:
                p.give(dests)
                raise
            self._notify_moves(moves, on_move)
            p.give(sources)
            self._counters["compactions"] += 1
            self._counters["pages_moved"] += len(moves)
        return self.shrink(0)

    def _notify_moves(self, moves: dict[int, int], on_move: MoveListener | None = None) -> None:
        """Tell every owner of ``moves``; if one raises, undo it for those already told."""
        told: list[MoveListener] = []
        try:
            for fn in ([on_move] if on_move is not None else []) + self._live_listeners():
                fn(moves)
                told.append(fn)
        except BaseException:
            inverse = {new: old for old, new in moves.items()}
            for fn in reversed(told):
                try:
                    fn(inverse)
                except Exception:  # the original error is the one to report
                    pass
            self._placement.give(list(moves.values()))
            raise

    def _copy_pages(self, src: list[int], dst: list[int]) -> None:
        s = torch.tensor(src, dtype=torch.long, device=self._data_device)
        d = torch.tensor(dst, dtype=torch.long, device=self._data_device)
        for plane in self._planes:
            plane.raw.index_copy_(0, d, plane.raw.index_select(0, s))

    @_locked
    def add_move_listener(self, fn: MoveListener) -> None:
        """Register ``fn({old: new})``, called on every compaction that moves pages.

        A bound Python method is held weakly: an owner (a cache) that is dropped without
        unregistering neither stays alive through the pool nor keeps being called. Anything
        else (a function, a lambda, ``list.append``) is held as given.
        """
        self._check_open("add_move_listener")
        self._live_listeners()  # drop dead entries, so registering many short-lived owners stays O(live)
        self._listeners.append(weakref.WeakMethod(fn) if isinstance(fn, types.MethodType) else fn)

    @_locked
    def remove_move_listener(self, fn: MoveListener) -> None:
        """Unregister ``fn``; ValueError if it is not registered."""
        for k, entry in enumerate(self._listeners):
            if (entry() if isinstance(entry, weakref.WeakMethod) else entry) == fn:
                del self._listeners[k]
                return
        raise ValueError(f"KVPagePool.remove_move_listener: {fn!r} is not registered")

    def _live_listeners(self) -> list[MoveListener]:
        """Registered listeners whose owners still exist (dead weak entries are dropped)."""
        live: list[MoveListener] = []
        kept: list[MoveListener | weakref.WeakMethod] = []
        for entry in self._listeners:
            fn = entry() if isinstance(entry, weakref.WeakMethod) else entry
            if fn is not None:
                live.append(fn)
                kept.append(entry)
        self._listeners = kept
        return live

    @_locked
    def trim(self) -> int:
        """Unmap every empty chunk above min_bytes and release the arenas' cached handles
        (waiting for the device to finish with what was unmapped), so that the pool holds
        exactly what is mapped.

        Returns the physical bytes the arenas gave back (mapped + cached, before minus after).
        """
        self._check_open("trim")
        before = self._arenas.physical_bytes()
        self.shrink(0)
        self._arenas.release_cached()
        return before - self._arenas.physical_bytes()

    @_locked
    def release_cached(self) -> int:
        """Release the arenas' reuse caches (waiting for the device to finish with what was
        unmapped), leaving every mapped chunk mapped. Returns the bytes given back."""
        self._check_open("release_cached")
        return self._arenas.release_cached()

    @_locked
    def poll(self) -> int:
        """Finish the unmaps whose device work is done, without waiting for the rest: their
        handles go to the arenas' reuse caches (up to ``reuse_bytes``) or back to the driver.
        Returns the bytes that left the pending state."""
        self._check_open("poll")
        return self._arenas.poll()

    @_locked
    def cached_bytes(self) -> int:
        """Physical bytes the arenas hold that are not mapped for pages: handles kept for reuse
        plus unmaps still waiting for the device. ``trim`` brings it to 0."""
        self._check_open("cached_bytes")
        return self._arenas.cached_bytes()

    @_locked
    def set_max_bytes(self, nbytes: int) -> None:
        """Change the pool's budget live. Below the resident size, empty chunks are unmapped and
        live pages compacted; below what live pages need, ValueError and nothing changes."""
        self._check_open("set_max_bytes")
        self._wait_for_grow()  # a grow in flight was planned against the old budget
        self._check_open("set_max_bytes")
        reserved = self._placement.num_chunks * self.chunk_bytes
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"KVPagePool.set_max_bytes: nbytes must be a positive int, got {nbytes!r}")
        if nbytes > reserved:
            raise ValueError(f"KVPagePool.set_max_bytes: {nbytes} bytes exceeds the reserved {reserved} bytes")
        if nbytes < self._min_bytes:
            raise ValueError(f"KVPagePool.set_max_bytes: {nbytes} bytes is below min_bytes={self._min_bytes}")
        p = self._placement
        need = ceil_div(p.live_pages, p.pages_per_chunk) * self.chunk_bytes
        if nbytes < need:
            raise ValueError(
                f"KVPagePool.set_max_bytes: {nbytes} bytes is below the {need} bytes that "
                f"{p.live_pages} live pages need"
            )
        previous, self._max_bytes = self._max_bytes, int(nbytes)
        try:
            if self.resident_bytes > nbytes:
                self.shrink(0)
            if self.resident_bytes > nbytes:
                self.compact()
        except BaseException:
            self._max_bytes = previous  # a failed compaction moved nothing; the budget stays too
            raise

    # -- data ------------------------------------------------------------------------------
    @_locked
    def read_pages(self, ids: Sequence[int], device: str | torch.device | None = None) -> torch.Tensor:
        """Copy of the K/V of live pages ``ids``: ``[n, layers, 2, page_tokens, kv_heads, head_dim]``."""
        idx = self._live_index(ids, "read_pages")
        if self.layout == "page-major":
            out = self._planes[0].pages.index_select(0, idx)
        else:
            out = torch.stack([pl.pages.index_select(0, idx) for pl in self._planes], dim=1)
            out = out.view(len(idx), self.num_layers, 2, *self._page_shape)
        return out if device is None else out.to(device)

    @_locked
    def write_pages(self, ids: Sequence[int], data: torch.Tensor) -> None:
        """Inverse of ``read_pages``: store ``data`` into live pages ``ids``."""
        idx = self._live_index(ids, "write_pages")
        shape = (len(idx), self.num_layers, 2, self.page_tokens, self.num_kv_heads, self.head_dim)
        if tuple(data.shape) != shape:
            raise ValueError(f"KVPagePool.write_pages: data shape {tuple(data.shape)} != expected {shape}")
        data = data.to(device=self._data_device, dtype=self.dtype)
        if self.layout == "page-major":
            self._planes[0].pages.index_copy_(0, idx, data)
        else:
            for layer in range(self.num_layers):
                for kv in range(2):
                    self._planes[2 * layer + kv].pages.index_copy_(0, idx, data[:, layer, kv])

    def _live_index(self, ids: Sequence[int], what: str) -> torch.Tensor:
        self._check_open(what)
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not self._placement.is_live(i)]
        if bad:
            raise ValueError(f"KVPagePool.{what}: pages {bad[:8]} are not allocated")
        return torch.tensor(ids, dtype=torch.long, device=self._data_device)

    # -- accounting ------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return self._placement.mapped_chunks * self.chunk_bytes

    @property
    def num_arenas(self) -> int:
        return len(self._planes)

    @property
    def granularity(self) -> int:
        return self.geometry.granularity

    @_locked
    def stats(self) -> dict:
        """Every byte of the pool, as a plain dict."""
        self._check_open("stats")
        p = self._placement
        return {
            "resident_bytes": self.resident_bytes,
            "live_bytes": p.live_pages * self.page_bytes,
            "reserved_bytes": self._arenas.reserved_bytes,
            "live_pages": p.live_pages,
            "resident_pages": p.mapped_chunks * p.pages_per_chunk,
            "free_pages": self.free_pages,
            "max_pages": self.max_pages,
            "page_bytes": self.page_bytes,
            "granule_bytes": self.geometry.granularity,
            "chunk_bytes": self.chunk_bytes,
            "pages_per_chunk": p.pages_per_chunk,
            "arenas": len(self._planes),
            "max_bytes": self._max_bytes,
            "min_bytes": self._min_bytes,
            "layout": self.layout,
            "growing_chunks": len(self._growing),  # being mapped outside the lock now
            **self._counters,
        }

    # -- lifetime --------------------------------------------------------------------------
    def _check_open(self, call: str) -> None:
        if self._closed:
            raise RuntimeError(f"KVPagePool.{call}: the pool is closed")

    @_locked
    def close(self) -> None:
        """Release every arena (views over them must not be used afterwards)."""
        self._wait_for_grow()  # its planes must stay open until it commits or rolls back
        if not self._closed:
            self._closed = True
            self._arenas.close()
            self._planes = []

    def __enter__(self) -> KVPagePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"live_pages={self.live_pages}, resident_bytes={self.resident_bytes}"
        return (
            f"KVPagePool(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device}, page_tokens={self.page_tokens}, layout={self.layout!r}, "
            f"{state})"
        )
