"""Arena: one reserved virtual address range, backed by physical memory granule by granule.

The Python face of the C++ core (``torch_elastic_kv._C``). An arena reserves address space
for the most it could ever hold and maps physical granules only where the caller asks, so
tensor views over it stay at fixed addresses while the memory behind them comes and goes::

    with Arena(1 << 30, device="cpu") as arena:
        arena.map(0, 4 * arena.granularity)            # back the first 4 granules
        t = arena.view(torch.float16, (1024, 1024))     # zero-copy tensor at offset 0
        t.fill_(1)
        arena.unmap(0, 4 * arena.granularity)           # handles go to the reuse cache
        arena.trim()                                    # ... and back to the OS / driver

``device="cpu"`` uses the host backend (memfd + mmap); ``"cuda"`` / ``"cuda:N"`` uses the CUDA
driver's virtual memory API, loaded at run time from ``libcuda.so.1`` or ``$EKV_LIBCUDA``.

Errors: ``ValueError`` for bad offsets/sizes/states, ``MemoryError`` when the budget or the
host runs out, ``torch.OutOfMemoryError`` when a CUDA device does, ``RuntimeError`` for other
driver failures. A call that raises leaves the arena exactly as it was.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.dlpack

from .._native import _C
from .._util import is_int, parse_device, translate_oom

__all__ = ["Arena", "set_budget", "memory_stats"]


# The core takes sizes and offsets as signed 64-bit numbers; anything larger is refused here
# with a ValueError naming it (pybind11 would raise an opaque TypeError).
_INT64_MAX = (1 << 63) - 1


def _check_int(call: str, name: str, value: Any) -> int:
    if not is_int(value):
        raise TypeError(f"{call}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value > _INT64_MAX:
        raise ValueError(f"{call}: {name}={value} is larger than any size or offset an arena takes (2**63 - 1)")
    return value


# -- tensors over arena memory, through DLPack ---------------------------------------------------
# A view may cover reserved but unmapped granules. torch's __cuda_array_interface__ import asks
# the runtime which device a pointer is on (cudaPointerGetAttributes), which fails on such an
# address with a bare device or an older torch; a DLPack capsule names the device itself and
# torch's import (at::fromDLPack -> from_blob with that device) asks nothing.


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

_KDL_CPU, _KDL_CUDA = 1, 2
_KDL_UINT = 1
# Capsules handed to torch and not yet deleted: key -> (struct, shape array, owner). The owner
# (the Arena object) lives as long as any tensor over its memory.
_LIVE_CAPSULES: dict[int, tuple[Any, Any, Any]] = {}
_LIVE_LOCK = threading.Lock()


@_DELETER
def _dl_deleter(managed: Any) -> None:  # ctypes takes the GIL for it, from whichever thread torch frees on
    with _LIVE_LOCK:
        _LIVE_CAPSULES.pop(managed.contents.manager_ctx or 0, None)


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_next_capsule = itertools.count(1)


def _dlpack_capsule(ptr: int, nbytes: int, device: torch.device, owner: Any) -> Any:
    """A "dltensor" capsule: ``nbytes`` uint8 at ``ptr`` on ``device`` (its index explicit),
    keeping ``owner`` alive until torch calls the deleter."""
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    t = managed.dl_tensor
    t.data = ptr
    if device.type == "cuda":
        t.device = _DLDevice(_KDL_CUDA, device.index if device.index is not None else 0)
    else:
        t.device = _DLDevice(_KDL_CPU, 0)
    t.ndim = 1
    t.dtype = _DLDataType(_KDL_UINT, 8, 1)
    t.shape = shape
    t.strides = None  # compact
    t.byte_offset = 0
    key = next(_next_capsule)
    managed.manager_ctx = key
    managed.deleter = _dl_deleter
    with _LIVE_LOCK:
        _LIVE_CAPSULES[key] = (managed, shape, owner)
    return _PyCapsule_New(ctypes.addressof(managed), b"dltensor", None)


def _tensor_over(ptr: int, nbytes: int, device: torch.device, owner: Any) -> torch.Tensor:
    """uint8 tensor over [ptr, ptr + nbytes) on ``device``, built without any pointer query."""
    return torch.utils.dlpack.from_dlpack(_dlpack_capsule(ptr, nbytes, device, owner))


class Arena:
    """One reserved address range whose granules are mapped on demand.

    Args:
        capacity_bytes: address space to reserve; rounded up to a multiple of the granularity.
            Reserving costs no physical memory.
        device: "cpu" (host backend), "cuda" or "cuda:N" (CUDA driver backend).
        reuse_bytes: physical memory kept in a cache of unmapped handles for the next map,
            instead of being released and re-created (creation is the slow call on GPUs).
            None = the core's default (64 MiB, at most the capacity); 0 = never cache.
    """

    def __init__(self, capacity_bytes: int, device: str | torch.device = "cpu", reuse_bytes: int | None = None) -> None:
        _check_int("Arena", "capacity_bytes", capacity_bytes)
        if capacity_bytes <= 0:
            raise ValueError(f"Arena(capacity_bytes={capacity_bytes}): capacity must be positive")
        if reuse_bytes is not None:
            _check_int("Arena", "reuse_bytes", reuse_bytes)
            if reuse_bytes < 0:
                raise ValueError(f"Arena(reuse_bytes={reuse_bytes}): must be >= 0 or None")
        self._device = parse_device(device)
        kind = self._device.type
        index = 0 if kind == "cpu" else self._device.index
        with translate_oom(self._device):
            self._impl = _C.Arena(capacity_bytes, kind, index, -1 if reuse_bytes is None else reuse_bytes)

    # -- facts -----------------------------------------------------------------------------
    @property
    def granularity(self) -> int:
        """Bytes per granule: offsets and sizes passed to map/unmap are multiples of it."""
        return self._impl.granularity

    @property
    def capacity(self) -> int:
        """Reserved bytes (a multiple of the granularity)."""
        return self._impl.capacity

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def base_address(self) -> int:
        """Virtual address of offset 0 (host or device address, per backend)."""
        return self._impl.base_address

    @property
    def backend(self) -> str:
        """'host', 'cuda', or 'cuda(fake)' when $EKV_LIBCUDA is the test driver."""
        return self._impl.backend_name

    @property
    def closed(self) -> bool:
        return self._impl.closed

    # -- mapping ---------------------------------------------------------------------------
    def map(self, offset: int, nbytes: int) -> None:
        """Back [offset, offset + nbytes) with physical memory; all or nothing.

        Raises ValueError if the range is unaligned, out of range or partly mapped already.
        """
        _check_int("Arena.map", "offset", offset)
        _check_int("Arena.map", "nbytes", nbytes)
        with translate_oom(self._device):
            self._impl.map(offset, nbytes)

    def ensure_mapped(self, offset: int, nbytes: int) -> int:
        """Like ``map``, but granules of the range that are already mapped are left alone.

        Returns the bytes this call mapped. All or nothing, like ``map``.
        """
        _check_int("Arena.ensure_mapped", "offset", offset)
        _check_int("Arena.ensure_mapped", "nbytes", nbytes)
        with translate_oom(self._device):
            return self._impl.ensure_mapped(offset, nbytes)

    def unmap(self, offset: int, nbytes: int, stream: Any = None) -> None:
        """Stop backing [offset, offset + nbytes); every granule of it must be mapped.

        On CUDA the granules are unmapped once the work queued so far on ``stream`` and on
        every stream registered with ``add_stream`` has finished (an event is recorded on each
        now; no device-wide synchronize). ``stream``: an int CUstream, a ``torch.cuda.Stream``,
        a sequence of them, or None for torch's current stream on the arena's device (of the
        calling thread: a grower thread's is not the model's, so register the model's streams).
        The physical handles go to the reuse cache (within ``reuse_bytes``) or back to the driver.
        """
        _check_int("Arena.unmap", "offset", offset)
        _check_int("Arena.unmap", "nbytes", nbytes)
        if isinstance(stream, (list, tuple)):
            handles = [self._stream_handle(s, "unmap") for s in stream]
        else:
            handles = [self._stream_handle(stream, "unmap")]
        with translate_oom(self._device):
            self._impl.unmap(offset, nbytes, handles)

    def add_stream(self, stream: Any) -> None:
        """Register a stream that uses this arena's memory (an int CUstream or a
        ``torch.cuda.Stream``): every later ``unmap``, from any thread, also waits for the work
        queued on it. torch's side streams do not order with the default stream, so without
        this an unmap from another thread could land while a kernel there still reads the
        memory. At most 16 streams; registering one twice is a no-op. No effect on the host."""
        self._impl.add_stream(self._stream_handle(stream, "add_stream", current=False))

    def remove_stream(self, stream: Any) -> None:
        """Forget a stream registered with ``add_stream``; ValueError if it is not registered."""
        self._impl.remove_stream(self._stream_handle(stream, "remove_stream", current=False))

    @property
    def streams(self) -> list[int]:
        """The registered streams (``add_stream``), as int CUstream handles."""
        return list(self._impl.streams)

    def is_mapped(self, offset: int, nbytes: int) -> bool:
        """True if every granule of [offset, offset + nbytes) is mapped."""
        _check_int("Arena.is_mapped", "offset", offset)
        _check_int("Arena.is_mapped", "nbytes", nbytes)
        return self._impl.is_mapped(offset, nbytes)

    def trim(self, wait: bool = False) -> int:
        """Release cached physical handles; returns the bytes given back.

        Also finishes unmaps whose device work is done; with ``wait=True`` waits for the
        rest first (on their events only), so everything unmapped is given back.
        """
        with translate_oom(self._device):
            return self._impl.trim(bool(wait))

    def poll(self) -> int:
        """Finish unmaps whose device work is done, without waiting and without trimming the
        cache; returns the bytes that stopped being pending (always 0 on the host backend)."""
        with translate_oom(self._device):
            return self._impl.poll()

    def set_reuse_bytes(self, nbytes: int) -> None:
        """Change the cached-handle allowance; a cache above it is trimmed now."""
        _check_int("Arena.set_reuse_bytes", "nbytes", nbytes)
        self._impl.set_reuse_bytes(nbytes)

    def stats(self) -> dict[str, int]:
        """Byte and event counts of this arena.

        reserved_bytes (0 once close() gave the range back), mapped_bytes, pending_bytes
        (unmapped, device not done yet), cached_bytes, held_bytes (= mapped + pending +
        cached), reuse_bytes, granularity, counts of granules: maps, unmaps, creates,
        releases, reuses, revives, and leaked_events (CUDA events the driver would not destroy).
        """
        return self._impl.stats()

    # -- tensors ---------------------------------------------------------------------------
    def view(self, dtype: torch.dtype, shape: Sequence[int] | int, offset: int = 0) -> torch.Tensor:
        """A zero-copy tensor over the arena at ``offset`` (it may cover unmapped granules).

        Touching an unmapped part faults: map before touching. The view must not be used
        after ``close()``.
        """
        ptr, nbytes, shape_t = self._view_span("view", dtype, shape, offset)
        if self._device.type == "cpu":
            return self._host_tensor(ptr, nbytes, dtype, shape_t)
        if self._impl.host_accessible:
            raise RuntimeError(
                "Arena.view: this 'cuda' arena runs on the fake test driver, whose memory is host "
                "memory; torch cannot wrap it as a CUDA tensor. Use Arena.host_view in tests."
            )
        if nbytes == 0:
            return torch.empty(shape_t, dtype=dtype, device=self._device)
        return _tensor_over(ptr, nbytes, self._device, self).view(dtype).view(shape_t)

    def host_view(self, dtype: torch.dtype, shape: Sequence[int] | int, offset: int = 0) -> torch.Tensor:
        """A CPU tensor over the arena's memory, for backends whose memory the CPU can touch.

        That is the host backend (same as ``view``) and, for tests only, the fake CUDA driver
        (``torch_elastic_kv.testing``), whose "device" memory is host memory. Raises on a real GPU.
        """
        if not self._impl.host_accessible:
            raise RuntimeError(f"Arena.host_view: memory of backend '{self.backend}' is not host-accessible")
        ptr, nbytes, shape_t = self._view_span("host_view", dtype, shape, offset)
        return self._host_tensor(ptr, nbytes, dtype, shape_t)

    def _view_span(
        self, call: str, dtype: torch.dtype, shape: Sequence[int] | int, offset: int
    ) -> tuple[int, int, tuple[int, ...]]:
        if self.closed:
            raise RuntimeError(f"Arena.{call}: the arena is closed")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"Arena.{call}: dtype must be a torch.dtype, got {dtype!r}")
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        for d in shape_t:
            _check_int(f"Arena.{call}", "shape entry", d)
            if d < 0:
                raise ValueError(f"Arena.{call}: shape {shape_t} has a negative dimension")
        _check_int(f"Arena.{call}", "offset", offset)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape_t) * itemsize
        if offset < 0 or offset % itemsize != 0:
            raise ValueError(
                f"Arena.{call}(offset={offset}): offset must be >= 0 and a multiple of {itemsize} (the size of {dtype})"
            )
        if offset + nbytes > self.capacity:
            raise ValueError(
                f"Arena.{call}(shape={shape_t}, dtype={dtype}, offset={offset}): "
                f"{nbytes} bytes from offset {offset} end past the capacity ({self.capacity} bytes)"
            )
        return self.base_address + offset, nbytes, shape_t

    def _host_tensor(self, ptr: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return _tensor_over(ptr, nbytes, torch.device("cpu"), self).view(dtype).view(shape)

    def _stream_handle(self, stream: Any, call: str = "unmap", current: bool = True) -> int:
        if stream is None and current:
            if self._device.type == "cuda" and not self._impl.host_accessible and torch.cuda.is_available():
                return torch.cuda.current_stream(self._device).cuda_stream
            return 0
        if isinstance(stream, int) and not isinstance(stream, bool):
            if not 0 <= stream < 1 << 64:
                raise ValueError(f"Arena.{call}: stream {stream} is not a CUstream handle")
            return stream
        handle = getattr(stream, "cuda_stream", None)
        if isinstance(handle, int):
            return handle
        what = "None, an int CUstream" if current else "an int CUstream"
        raise TypeError(f"Arena.{call}: stream must be {what} or a torch.cuda.Stream, got {stream!r}")

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the device, unmap and release everything, free the range.

        Every other call is refused from the first close() on. If the driver refuses to give
        something back, RuntimeError names it (it stays counted in held_bytes /
        reserved_bytes) and a later close() retries exactly that; once everything is back,
        close() is a no-op."""
        self._impl.close()

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"Arena(device={self._device}, backend={self.backend}, capacity={self.capacity}, "
            f"mapped={s['mapped_bytes']}, cached={s['cached_bytes']}, closed={self.closed})"
        )


def _device_key(device: str | torch.device) -> tuple[str, int]:
    dev = parse_device(device)
    return dev.type, 0 if dev.type == "cpu" else dev.index


def set_budget(nbytes: int | None, device: str | torch.device = "cpu") -> None:
    """Limit the physical bytes all arenas on ``device`` may hold (None = unlimited).

    Takes effect at once, for arenas that exist and arenas to come. Held bytes include the
    reuse caches, which are trimmed if the new budget is below them; a budget below the bytes
    in use (mapped, or unmapped and not yet released by the device) raises ValueError and
    changes nothing. A map that would pass the budget raises MemoryError
    (torch.OutOfMemoryError on CUDA).
    """
    if nbytes is not None:
        _check_int("set_budget", "nbytes", nbytes)
        if nbytes < 0:
            raise ValueError(f"set_budget(nbytes={nbytes}): must be >= 0 or None")
    kind, index = _device_key(device)
    _C.set_budget(nbytes, kind, index)


def memory_stats(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Bytes held by all arenas of ``device``, from the device's budget.

    budget_bytes (None = unlimited), held_bytes, mapped_bytes, pending_bytes, cached_bytes,
    reserved_bytes and arenas (how many are open).
    """
    kind, index = _device_key(device)
    return _C.memory_stats(kind, index)


def host_memory() -> dict[str, Any]:
    """What host (``device="cpu"``) arenas may still commit, as the host backend sees it.

    mem_total and mem_available (from /proc/meminfo), cgroup_limit (None when no memory
    cgroup on the process's path sets one), cgroup_usage and cgroup_path (that cgroup's),
    available (MemAvailable capped by the cgroup's room) and margin (bytes always left
    free). A host map that would leave less than ``margin`` of ``available`` raises
    MemoryError naming these numbers, before any memory is committed: the kernel would
    answer such a commit with its OOM killer, not an error.
    """
    return _C.host_memory()
