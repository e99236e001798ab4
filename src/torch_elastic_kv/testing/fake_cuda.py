"""Test aids: the fake CUDA driver built from tests/fake_cuda/.

The fake driver exports the CUDA driver functions the cuda backend uses, implemented over
host memory, so ``Arena(..., device="cuda")`` runs the real backend code on a machine with no
GPU. Point the backend at it with ``EKV_LIBCUDA`` (``use_fake_cuda()`` does) and inspect or
steer it with ``FakeCuda``::

    with use_fake_cuda() as fake:
        with Arena(64 << 20, device="cuda") as a:
            fake.fail_nth("cuMemCreate", 2)       # the 2nd cuMemCreate from now fails
            ...
        assert fake.live_handles() == 0

Function names for ``fail_nth``/``calls`` are the API names: cuMemCreate, cuMemMap,
cuMemSetAccess, cuMemUnmap, cuMemRelease, cuMemAddressFree, cuEventCreate, cuEventRecord,
cuEventDestroy, cuStreamSynchronize, cuCtxSynchronize, cuMemGetInfo, ...

Streams are real to it: events complete per stream (``hold_stream``/``complete_stream``), and
a record on a stream it does not know fails (``create_stream`` makes one). ``set_other_used``
models memory other processes hold; ``set_latency`` makes a driver call slow.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fake_cuda_path", "FakeCuda", "use_fake_cuda"]

_LIB_NAME = "libekv_fake_cuda.so"


def fake_cuda_path() -> str:
    """Absolute path of the fake driver library (built with the package)."""
    path = Path(__file__).resolve().parent.parent / "_testing" / _LIB_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"fake CUDA driver not built: {path} is missing (reinstall the package: "
            "pip install -e . or python setup.py build_ext --inplace)"
        )
    return str(path)


class FakeCuda:
    """ctypes handle on the fake driver's ekvfake_* control functions.

    Loading the same path the backend loads yields the same library instance (dlopen
    returns the loaded one), so counts here are the backend's.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or fake_cuda_path()
        lib = ctypes.CDLL(self.path)
        ll = ctypes.c_longlong
        for name in (
            "live_handles",
            "live_mappings",
            "live_reservations",
            "live_events",
            "create_count",
            "release_count",
            "used_bytes",
            "forget_events",
        ):
            getattr(lib, f"ekvfake_{name}").restype = ll
        lib.ekvfake_calls.argtypes = [ctypes.c_char_p]
        lib.ekvfake_calls.restype = ll
        lib.ekvfake_fail_nth.argtypes = [ctypes.c_char_p, ll, ctypes.c_int]
        lib.ekvfake_fail_nth.restype = ctypes.c_int
        lib.ekvfake_set_total_memory.argtypes = [ll]
        lib.ekvfake_set_device_count.argtypes = [ctypes.c_int]
        lib.ekvfake_set_events_complete.argtypes = [ctypes.c_int]
        ull = ctypes.c_ulonglong
        lib.ekvfake_stream_create.argtypes = [ull]
        lib.ekvfake_stream_create.restype = ull
        for name in ("stream_destroy", "stream_complete"):
            getattr(lib, f"ekvfake_{name}").argtypes = [ull]
            getattr(lib, f"ekvfake_{name}").restype = ctypes.c_int
        lib.ekvfake_stream_hold.argtypes = [ull, ctypes.c_int]
        lib.ekvfake_stream_hold.restype = ctypes.c_int
        lib.ekvfake_stream_pending_events.argtypes = [ull]
        lib.ekvfake_stream_pending_events.restype = ll
        lib.ekvfake_set_other_used.argtypes = [ll]
        lib.ekvfake_set_latency.argtypes = [ctypes.c_char_p, ll]
        lib.ekvfake_set_latency.restype = ctypes.c_int
        lib.ekvfake_primary_ctx_refcount.argtypes = [ctypes.c_int]
        lib.ekvfake_primary_ctx_refcount.restype = ctypes.c_int
        lib.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        lib.cuMemGetInfo_v2.restype = ctypes.c_int
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.cuDevicePrimaryCtxRetain.restype = ctypes.c_int
        lib.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
        lib.cuDevicePrimaryCtxRelease_v2.restype = ctypes.c_int
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuCtxGetCurrent.restype = ctypes.c_int
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuCtxSetCurrent.restype = ctypes.c_int
        self._lib = lib

    def reset(self) -> None:
        """Forget injected failures, counters, latencies, others' memory and the streams made
        here; events complete at record; 1 device, 8 GiB."""
        self._lib.ekvfake_reset()

    def fail_nth(self, function: str, nth: int, code: int = 0) -> None:
        """Make the nth call (1-based, from now) of ``function`` return ``code``
        (0 = CUDA_ERROR_OUT_OF_MEMORY)."""
        if nth < 1:
            raise ValueError(f"fail_nth: nth={nth} must be >= 1")
        self._lib.ekvfake_fail_nth(function.encode(), nth, code)

    def calls(self, function: str) -> int:
        """Calls of ``function`` since the last reset."""
        return self._lib.ekvfake_calls(function.encode())

    def live_handles(self) -> int:
        return self._lib.ekvfake_live_handles()

    def live_mappings(self) -> int:
        return self._lib.ekvfake_live_mappings()

    def live_reservations(self) -> int:
        return self._lib.ekvfake_live_reservations()

    def live_events(self) -> int:
        return self._lib.ekvfake_live_events()

    def create_count(self) -> int:
        """cuMemCreate calls that succeeded since the last reset."""
        return self._lib.ekvfake_create_count()

    def release_count(self) -> int:
        return self._lib.ekvfake_release_count()

    def used_bytes(self) -> int:
        """Simulated device memory held by live handles."""
        return self._lib.ekvfake_used_bytes()

    def set_total_memory(self, nbytes: int) -> None:
        """Simulated device memory size; cuMemCreate past it fails with out-of-memory."""
        self._lib.ekvfake_set_total_memory(nbytes)

    def set_device_count(self, count: int) -> None:
        self._lib.ekvfake_set_device_count(count)

    def set_events_complete(self, complete: bool) -> None:
        """False: events recorded from now stay not-ready (queued device work) until
        cuEventSynchronize or complete_events()."""
        self._lib.ekvfake_set_events_complete(int(complete))

    # -- streams: events complete per stream ----------------------------------------------
    def create_stream(self, handle: int = 0) -> int:
        """Make a stream the driver knows (``handle``, or a fresh one when 0) and return its
        handle. cuEventRecord / cuStreamSynchronize on any other value than these and the
        defaults (0, 1 = CU_STREAM_LEGACY, 2 = CU_STREAM_PER_THREAD) fail with
        CUDA_ERROR_INVALID_HANDLE, as a real driver's do on a stream that does not exist."""
        if handle < 0 or handle in (1, 2):
            raise ValueError(f"create_stream: handle={handle} is negative or a default stream")
        out = self._lib.ekvfake_stream_create(handle)
        if out == 0:
            raise ValueError(f"create_stream: stream {handle:#x} exists already")
        return out

    def destroy_stream(self, handle: int) -> None:
        """Forget a stream made by create_stream (its events complete first)."""
        if self._lib.ekvfake_stream_destroy(handle) != 0:
            raise ValueError(f"destroy_stream: {handle:#x} is not a stream made by create_stream")

    def hold_stream(self, handle: int, held: bool = True) -> None:
        """held=True: events recorded on the stream from now stay not-ready (its queued work
        has not run) until complete_stream, a synchronize of it, or hold_stream(handle, False),
        which also completes them. Other streams are not affected."""
        if self._lib.ekvfake_stream_hold(handle, int(held)) != 0:
            raise ValueError(f"hold_stream: {handle:#x} is not a stream")

    def complete_stream(self, handle: int) -> None:
        """The work queued on the stream so far finishes: its events complete (a hold stays)."""
        if self._lib.ekvfake_stream_complete(handle) != 0:
            raise ValueError(f"complete_stream: {handle:#x} is not a stream")

    def pending_events(self, handle: int) -> int:
        """Events recorded on the stream that have not completed."""
        n = self._lib.ekvfake_stream_pending_events(handle)
        if n < 0:
            raise ValueError(f"pending_events: {handle:#x} is not a stream")
        return n

    # -- memory of others, latencies --------------------------------------------------------
    def set_other_used(self, nbytes: int) -> None:
        """Device memory held by others (other processes): cuMemGetInfo's free leaves it out
        and cuMemCreate cannot have it. 0 after reset."""
        if nbytes < 0:
            raise ValueError(f"set_other_used: nbytes={nbytes} must be >= 0")
        self._lib.ekvfake_set_other_used(nbytes)

    def set_latency(self, function: str, seconds: float) -> None:
        """Each later call of ``function`` (e.g. "cuMemCreate") takes ``seconds`` longer, slept
        outside the driver's lock so calls on other threads overlap with it (0 = none)."""
        if seconds < 0:
            raise ValueError(f"set_latency: seconds={seconds} must be >= 0")
        self._lib.ekvfake_set_latency(function.encode(), round(seconds * 1e9))

    def mem_get_info(self, device: int = 0) -> tuple[int, int]:
        """(free, total) bytes as cuMemGetInfo answers them in the device's primary context,
        the way torch.cuda.mem_get_info would on a GPU (others' memory included)."""
        ctx = ctypes.c_void_p()
        if self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) != 0:
            raise RuntimeError(f"mem_get_info: the fake driver has no device {device} (or no cuInit yet)")
        prev = self.current_context()
        try:
            self._lib.cuCtxSetCurrent(ctx)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            rc = self._lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
            if rc != 0:
                raise RuntimeError(f"mem_get_info: cuMemGetInfo failed with {rc}")
            return free.value, total.value
        finally:
            self._lib.cuCtxSetCurrent(prev or None)
            self._lib.cuDevicePrimaryCtxRelease_v2(device)

    def complete_events(self) -> None:
        """Finish all simulated device work."""
        self._lib.ekvfake_complete_events()

    def forget_events(self) -> int:
        """Destroy every live event; returns how many there were. For tests that made
        cuEventDestroy fail on purpose, once nothing uses events any more."""
        return self._lib.ekvfake_forget_events()

    def primary_ctx_refcount(self, device: int = 0) -> int:
        """References held on the device's primary context (retains minus releases)."""
        return self._lib.ekvfake_primary_ctx_refcount(device)

    def current_context(self) -> int:
        """The calling thread's current context as the fake driver sees it (0 = none)."""
        ctx = ctypes.c_void_p()
        self._lib.cuCtxGetCurrent(ctypes.byref(ctx))
        return ctx.value or 0

    def set_current_context(self, ctx: int) -> None:
        """Make ``ctx`` (any value; 0 = none) the calling thread's current context, as another
        library sharing the driver would; the backend must restore it after each call."""
        self._lib.cuCtxSetCurrent(ctx or None)

    def counts(self) -> dict[str, int]:
        """Live object counts, for before/after comparisons."""
        return {
            "handles": self.live_handles(),
            "mappings": self.live_mappings(),
            "reservations": self.live_reservations(),
            "events": self.live_events(),
            "used_bytes": self.used_bytes(),
        }


@contextlib.contextmanager
def use_fake_cuda() -> Iterator[FakeCuda]:
    """Point the cuda backend at the fake driver ($EKV_LIBCUDA) for the block; yields a reset FakeCuda."""
    path = fake_cuda_path()
    old = os.environ.get("EKV_LIBCUDA")
    os.environ["EKV_LIBCUDA"] = path
    fake = FakeCuda(path)
    fake.reset()
    try:
        yield fake
    finally:
        fake.reset()
        if old is None:
            os.environ.pop("EKV_LIBCUDA", None)
        else:
            os.environ["EKV_LIBCUDA"] = old
