"""A torch CUDA allocator over elastic arenas, swapped in with torch's pluggable-allocator API.

The shared library ``library_path()`` exports the two C functions torch's
``CUDAPluggableAllocator`` loads (``ekv_malloc`` / ``ekv_free``). Behind them, one allocator per
device packs small requests into granules, gives large ones their own mapped ranges, keeps
freed blocks for reuse in stream order (an event recorded at free time, never a device-wide
synchronize), and gives granules back to the driver when asked::

    from torch_elastic_kv.memory import allocator as ekv_alloc

    ekv_alloc.install()                          # before CUDA initialises: every allocation
    # ... or route only some allocations, tagged:
    with ekv_alloc.mem_pool("weights"):
        model = build_model().cuda()
    ekv_alloc.pause("weights", backup=True)      # physical memory back to the driver
    ekv_alloc.resume("weights")                  # same addresses, same bytes
    ekv_alloc.set_limit(8 << 30)                 # past it torch raises torch.OutOfMemoryError
    ekv_alloc.trim(); ekv_alloc.stats(); ekv_alloc.snapshot()

Devices: ``None`` (the current CUDA device when CUDA is available, else the host), an int
(``-1`` = host backend, ``N`` = cuda:N), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device.
The host backend (device -1) serves the same C ABI on CPU-only machines.

The allocator is process-wide by nature (torch's allocator is, and the C ABI carries no
handle), so this module keeps the torch-side objects — the pluggable allocator and one
``MemPool`` per (device, tag) — in one ``_TorchBridge`` instance.

Errors: the C ABI cannot raise; a failed ``ekv_malloc`` returns NULL (torch then raises
``torch.OutOfMemoryError`` for allocations routed through a ``MemPool``) and a failed
``ekv_free`` changes nothing; ``last_error()`` returns the message.

Limits: CUDA graph capture is not supported (a handoff of freed blocks records an event).
Inside a ``MemPool`` torch's caching allocator keeps freed tensors' segments cached in the
pool until the pool is destroyed; ``trim()`` drops the pools no ``mem_pool()`` block is using
so that their cache comes back (see ``trim``; ``pause(tag)`` unmaps the pool's segments whole,
cached parts included). The Python functions raise
``ValueError`` for bad input, ``MemoryError`` (``torch.OutOfMemoryError`` on CUDA) when memory
runs out, ``RuntimeError`` for driver failures; each leaves the allocator as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .._native import _C
from .._util import is_int, parse_device, translate_oom

__all__ = [
    "library_path",
    "c_abi",
    "install",
    "installed",
    "mem_pool",
    "trim",
    "set_limit",
    "stats",
    "snapshot",
    "pause",
    "resume",
    "last_error",
    "close",
]

HOST = -1  # device index of the host backend


def library_path() -> str:
    """Path of the shared library that exports ``ekv_malloc`` / ``ekv_free`` (what
    ``torch.cuda.memory.CUDAPluggableAllocator`` loads). It is the ``_C`` module itself, so the
    allocator torch calls is the one ``stats()``/``trim()``/``pause()`` see."""
    return os.path.abspath(_C.__file__)


def c_abi() -> ctypes.CDLL:
    """The C ABI through ctypes, with argument types set (same library instance as ``_C``):
    ``ekv_malloc(size, device, stream) -> int`` (0 = NULL) and
    ``ekv_free(ptr, size, device, stream)``. For tests and benchmarks on the host (device -1)."""
    lib = ctypes.CDLL(library_path())
    lib.ekv_malloc.restype = ctypes.c_void_p
    lib.ekv_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.ekv_free.restype = None
    lib.ekv_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return lib


# -- devices ------------------------------------------------------------------------------------


def _device_index(device: Any) -> int:
    """None/int/str/torch.device -> -1 (host) or a cuda index. Never initialises CUDA."""
    if device is None:
        if torch.cuda.is_available():
            return torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return HOST
    if isinstance(device, bool):
        raise TypeError(f"device must be None, an int, a str or a torch.device, got {device!r}")
    if isinstance(device, int):
        if device < HOST or device >= 1 << 31:
            raise ValueError(f"device {device} is not -1 (host) or a cuda index")
        return device
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, an int, a str or a torch.device, got {type(device).__name__}")
    dev = parse_device(device)
    return HOST if dev.type == "cpu" else dev.index


def _devices(device: Any) -> list[int]:
    """None -> every device the allocator has state on; else that one device."""
    return sorted(_C.allocator_devices()) if device is None else [_device_index(device)]


def _errors(index: int) -> contextlib.AbstractContextManager[None]:
    """MemoryError from the core -> torch.OutOfMemoryError for a CUDA device (index >= 0)."""
    return translate_oom(torch.device("cuda", index) if index >= 0 else torch.device("cpu"))


def _check_tag(call: str, tag: Any) -> str:
    if not isinstance(tag, str):
        raise TypeError(f"{call}: tag must be a str, got {type(tag).__name__} {tag!r}")
    return tag


# -- torch side ---------------------------------------------------------------------------------


class _TorchBridge:
    """The torch objects that stand for the allocator: one CUDAPluggableAllocator, whether it
    was installed globally, and a MemPool per (device, tag)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pluggable: Any = None
        self.installed = False
        self.pools: dict[tuple[int, str], Any] = {}
        self.active: dict[tuple[int, str], int] = {}  # mem_pool() blocks open per pool, all threads

    def allocator(self) -> Any:
        with self.lock:
            if self.pluggable is None:
                self.pluggable = torch.cuda.memory.CUDAPluggableAllocator(library_path(), "ekv_malloc", "ekv_free")
            return self.pluggable

    def enter(self, index: int, tag: str) -> Any:
        """The (index, tag) pool, made if needed, counted as in use until ``leave``."""
        alloc = self.allocator()
        with self.lock:
            pool = self.pools.get((index, tag))
            if pool is None:
                pool = torch.cuda.MemPool(alloc.allocator())
                self.pools[(index, tag)] = pool
            self.active[(index, tag)] = self.active.get((index, tag), 0) + 1
            return pool

    def leave(self, index: int, tag: str) -> None:
        with self.lock:
            n = self.active.get((index, tag), 0) - 1
            if n > 0:
                self.active[(index, tag)] = n
            else:
                self.active.pop((index, tag), None)

    def drop_idle_pools(self) -> int:
        """Forget the pools no mem_pool() block is using. torch gives a MemPool's cached blocks
        back only when the pool is destroyed (its destructor empties its cache; blocks freed
        after that go at the next empty_cache), so a pool kept here forever would keep what
        its freed tensors left cached forever. The next mem_pool() makes a new one."""
        with self.lock:
            idle = [k for k in self.pools if self.active.get(k, 0) == 0]
            dropped = [self.pools.pop(k) for k in idle]
        n = len(dropped)
        del dropped  # destroyed here unless a caller still holds the object mem_pool() yielded
        return n


_BRIDGE = _TorchBridge()


def _require_cuda(call: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{call}: CUDA is not available, so there is no torch CUDA allocator to replace; "
            "on the host the allocator is reached through its C ABI (c_abi(), device -1)"
        )


def installed() -> bool:
    """True once ``install()`` made this torch's CUDA allocator."""
    return _BRIDGE.installed


def install() -> None:
    """Make this allocator torch's CUDA allocator for the whole process.

    torch allows the swap only before its CUDA allocator is initialised (the first CUDA tensor,
    ``torch.cuda.current_device()``, ...); called after that, raises RuntimeError saying so.
    Idempotent. Note: torch's ``memory_stats()``/``memory_snapshot()`` do not work with a
    pluggable allocator; use this module's ``stats()``/``snapshot()``.

    Two hazards of torch's direct pluggable path (torch 2.13), which ``mem_pool()`` avoids:

    * **Out of memory is not an error.** torch does not check the pointer ``ekv_malloc``
      returns, so a NULL (device full, ``set_limit`` or the device budget reached) becomes a
      tensor at address 0 and, at its first use, an illegal-address fault that kills the CUDA
      context, not ``torch.OutOfMemoryError``. Before returning NULL the allocator waits for
      the events of freed blocks and gives back every cached granule, and retries; nothing
      safe can be returned past that. Under ``mem_pool()`` torch's caching allocator checks
      the NULL and raises ``torch.OutOfMemoryError``: use it whenever a limit may be reached.
    * **``Tensor.record_stream`` does nothing.** A block is reusable by the stream it was
      freed on at once; a tensor also used on another stream must not be freed before that
      stream's work on it is done (``torch.cuda.current_stream().wait_stream(side)`` or
      ``side.synchronize()`` before the last reference goes). Under ``mem_pool()`` torch's
      caching allocator honours ``record_stream`` itself.
    """
    _require_cuda("install()")
    if _BRIDGE.installed:
        return
    message = (
        "install(): CUDA is already initialised in this process, and torch only allows swapping its "
        "allocator before that. Call install() first thing (before any CUDA tensor or "
        "torch.cuda call), or use mem_pool() to route some allocations to this allocator."
    )
    if torch.cuda.is_initialized():
        raise RuntimeError(message)
    try:
        torch.cuda.memory.change_current_allocator(_BRIDGE.allocator())
    except RuntimeError as e:
        raise RuntimeError(f"{message} (torch: {e})") from None
    _BRIDGE.installed = True


@contextlib.contextmanager
def mem_pool(tag: str | None = None, device: Any = None) -> Iterator[Any]:
    """Route the CUDA allocations this thread makes inside the block to this allocator, tagged.

    Uses one ``torch.cuda.MemPool`` per (device, tag) over the pluggable allocator (torch's
    caching allocator then carves tensors out of the segments it gets from here, and raises
    ``torch.OutOfMemoryError`` when this allocator returns NULL). After ``install()`` every
    allocation already comes here, and the block only sets the tag. Yields the MemPool (None
    after install()). ``tag=None`` means untagged ("").
    """
    name = "" if tag is None else _check_tag("mem_pool", tag)
    _require_cuda("mem_pool()")
    index = _device_index(device)
    if index < 0:
        raise ValueError(f"mem_pool(device={device!r}): a MemPool routes CUDA allocations; pick a cuda device")
    prev = _C.allocator_set_thread_tag(name)
    try:
        if _BRIDGE.installed:
            yield None
        else:
            pool = _BRIDGE.enter(index, name)
            try:
                with torch.cuda.use_mem_pool(pool, device=index):
                    yield pool
            finally:
                _BRIDGE.leave(index, name)
    finally:
        _C.allocator_set_thread_tag(prev)


# -- control and accounting ---------------------------------------------------------------------


def trim(device: Any = None) -> int:
    """Give every cached, unused granule back to the driver now (waiting on the freed blocks'
    events only); returns the bytes given back. ``device=None``: every device the allocator uses.

    Under ``mem_pool()`` torch's caching allocator keeps freed tensors' memory cached in the
    MemPool and gives it back only when the pool is destroyed. So trim first drops every
    MemPool that no ``mem_pool()`` block (on any thread) is inside (the next ``mem_pool()``
    makes a fresh one for its tag), then calls ``torch.cuda.empty_cache()``, and only then
    trims this allocator. What it cannot give back: memory of tensors still alive (it comes
    back once they are freed, at the next trim); the cache of a pool a ``mem_pool()`` block is
    using right now, or whose object (what ``mem_pool()`` yields) the caller still holds (it
    goes once the block ends or the object is dropped, at the next trim); and, after
    ``install()``, whatever torch's own caching allocator holds beyond ``empty_cache()``."""
    if _BRIDGE.pools and torch.cuda.is_initialized():
        _BRIDGE.drop_idle_pools()
        torch.cuda.empty_cache()
    total = 0
    for index in _devices(device):
        with _errors(index):
            total += _C.allocator_trim(index)
    return total


def set_limit(nbytes: int | None, device: Any = None) -> None:
    """Cap the bytes this allocator keeps mapped on ``device`` (None = no cap), live at once.

    Below current use, cached granules are given back and later allocations that would pass
    the cap fail (NULL from ``ekv_malloc``; ``torch.OutOfMemoryError`` through a MemPool) while
    live blocks stay untouched; raising it lets them succeed again. Every arena on the device,
    this one included, also draws from the device budget (``torch_elastic_kv.set_budget``).
    """
    if nbytes is not None and (not is_int(nbytes)):
        raise TypeError(f"set_limit: nbytes must be an int or None, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes is not None and not 0 <= nbytes < 1 << 63:
        raise ValueError(f"set_limit(nbytes={nbytes}): must be >= 0 and below 2**63, or None")
    index = _device_index(device)
    with _errors(index):
        _C.allocator_set_limit(nbytes, index)


def stats(device: Any = None) -> dict[str, Any]:
    """Counters of the allocator on one device, as a plain dict.

    Bytes: allocated_bytes (blocks of live allocations), requested_bytes (what callers asked
    for), cached_bytes (mapped, free, kept for reuse), mapped_bytes, reserved_bytes (address
    space), pending_free_bytes (free, device maybe still using), paused_bytes, backup_bytes,
    peak_allocated_bytes, peak_mapped_bytes, limit_bytes (None = no cap). Counts: mallocs,
    frees, failed_mallocs, failed_frees, maps and unmaps (granules), live_blocks, segments,
    free_event_failures (frees whose free-time event could not be recorded: the free
    synchronized instead), leaked_events (CUDA events the driver would not destroy).
    ``tags``: {tag: {allocated_bytes, requested_bytes, mapped_bytes, paused_bytes,
    backup_bytes, blocks, paused}}.
    """
    index = _device_index(device)
    with _errors(index):
        return _C.allocator_stats(index)


def snapshot(device: Any = None) -> list[dict[str, Any]]:
    """Live allocations (every device when ``device`` is None), by device and address: dicts
    with device, address, size, block_size, tag, stream (the malloc's, as an int), paused, small."""
    out: list[dict[str, Any]] = []
    for index in _devices(device):
        out.extend(_C.allocator_snapshot(index))
    return out


def pause(tag: str, backup: bool = False, device: Any = None) -> int:
    """Give back the physical memory of every allocation tagged ``tag``, keeping their addresses.

    Waits (on events, not the whole device) until the device is done with them; with
    ``backup=True`` their bytes are copied to host memory first and written back by
    ``resume``. Tensors of a paused tag must not be touched until ``resume(tag)``. Other tags
    are untouched. Returns the bytes given back. ``device=None``: every device in use.
    """
    _check_tag("pause", tag)
    total = 0
    for index in _devices(device):
        with _errors(index):
            total += _C.allocator_pause(tag, bool(backup), index)
    return total


def resume(tag: str, device: Any = None) -> None:
    """Map a paused tag's memory again at the same addresses (restoring the bytes if it was
    paused with ``backup=True``). ``device=None``: every device where the tag is paused."""
    _check_tag("resume", tag)
    indices = _devices(device)
    if device is None:
        indices = [i for i in indices if _C.allocator_stats(i)["tags"].get(tag, {}).get("paused")]
        if not indices:
            raise ValueError(f"resume(tag={tag!r}): the tag is not paused on any device")
    for index in indices:
        with _errors(index):
            _C.allocator_resume(tag, index)


def last_error(clear: bool = False) -> str | None:
    """Message of the last failed ``ekv_malloc``/``ekv_free`` in this process (None if none),
    naming the call and its numbers; ``clear=True`` forgets it after reading."""
    return _C.allocator_last_error(bool(clear))


def close(device: Any = None) -> None:
    """Drop the allocator's state on ``device`` (every device if None): its arena and address
    reservation go back to the driver. Refused with ValueError while anything is allocated or
    paused there; the next allocation on the device starts afresh. If the driver would not
    take everything back, RuntimeError names what is still held (the allocator is dropped all
    the same); calling close again retries that."""
    if device is None:
        indices = sorted(set(_C.allocator_devices()) | set(_C.allocator_unclosed_devices()))
    else:
        indices = [_device_index(device)]
    for index in indices:
        _C.allocator_close(index)
