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
        lib.ekvfake_primary_ctx_refcount.argtypes = [ctypes.c_int]
        lib.ekvfake_primary_ctx_refcount.restype = ctypes.c_int
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuCtxGetCurrent.restype = ctypes.c_int
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuCtxSetCurrent.restype = ctypes.c_int
        self._lib = lib

    def reset(self) -> None:
        """Forget injected failures and counters; events complete at record; 1 device, 8 GiB."""
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
