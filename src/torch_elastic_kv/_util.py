"""Small helpers every layer uses, written once: integer checks, ceiling division, device
parsing that does not initialise CUDA, and the out-of-memory exception a device's users expect.
(Byte sizes such as ``64MiB`` are parsed in ``_units``, which the CLIs import before torch.)
torch is imported by the device helpers only, so the pure modules (the budget, the policy, the
scheduler's bookkeeping) import without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ceil_div", "is_int", "out_of_memory", "parse_device", "translate_oom"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``b > 0``), without floats."""
    return -(-a // b)


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device -> a torch.device with an explicit index for cuda."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid device: {e}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    if dev.index is None:
        # torch's current device; 0 until CUDA is initialised (asking would initialise it, which
        # must not happen before allocator.install()).
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        dev = torch.device("cuda", index)
    return dev


def out_of_memory(device: torch.device, message: str) -> BaseException:
    """The OOM exception torch users expect on ``device``: torch.OutOfMemoryError on CUDA, as
    torch's own allocator raises, MemoryError elsewhere."""
    import torch

    return torch.OutOfMemoryError(message) if device.type == "cuda" else MemoryError(message)


@contextlib.contextmanager
def translate_oom(device: torch.device) -> Iterator[None]:
    """Re-raise a MemoryError from inside as ``out_of_memory(device, ...)``."""
    import torch

    try:
        yield
    except MemoryError as e:
        if device.type == "cuda" and not isinstance(e, torch.OutOfMemoryError):
            raise torch.OutOfMemoryError(str(e)) from None
        raise


def die_with_parent() -> None:
    """In a child process: the kernel sends it SIGKILL when its parent exits, however the parent
    exits (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
