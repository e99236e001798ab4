"""How much KV memory the Engine may hold: the one owner of that number.

Plain Python, no torch. Five inputs meet here and nowhere else:

* the **ceiling** (the policy's ``max_bytes``, or the pool's reservation) and the **floor**
  (the policy's ``min_bytes``), fixed when the Engine is built;
* the **requested** budget (``Engine.set_budget``, the server's ``/admin/kv-budget``);
* the **lease** (a broker's grant or reclaim, or any other owner of a shared budget);
* **sleep** (everything given back until ``wake``).

``effective_bytes()`` is the one answer: 0 while asleep, else the smallest of the ceiling,
the requested budget and the lease, where a lease never pushes below the floor (the floor is
memory the user promised the cache; a broker tenant's guarantee covers it). Each input is
validated here, once, where it enters; an accepted change bumps ``version`` and wakes whoever
waits (the memory controller's thread, a server's engine thread), so nothing polls to notice
a lease.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional, Protocol, runtime_checkable

from .._util import is_int

__all__ = ["KVBudget", "LeaseTarget"]


@runtime_checkable
class LeaseTarget(Protocol):
    """What a broker tenant steers: a budget with a lease (``KVBudget`` is one)."""

    ceiling_bytes: int
    floor_bytes: int

    def set_lease(self, nbytes: Optional[int]) -> None: ...


def _check_bytes(where: str, name: str, value: object, allow_none: bool) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        kind = "a non-negative int or None" if allow_none else "a non-negative int"
        raise ValueError(f"{where}: {name} must be {kind}, got {value!r}")
    return int(value)


class KVBudget:
    """The KV byte budget of one Engine: ceiling, floor, requested budget, lease and sleep.

    Args:
        ceiling_bytes: the most KV memory the Engine may ever hold.
        floor_bytes: resident memory the pool keeps even when idle (a lease never goes below it).
        min_request_bytes: the smallest budget ``set_requested`` accepts other than 0 (0: any):
            the Engine sets one chunk of its pool, since the budget buys whole chunks only.

    Thread-safe: the step, a broker client's thread and a server's HTTP thread may all call it.
    """

    def __init__(self, ceiling_bytes: int, floor_bytes: int = 0, *, min_request_bytes: int = 0) -> None:
        ceiling = _check_bytes("KVBudget", "ceiling_bytes", ceiling_bytes, allow_none=False)
        floor = _check_bytes("KVBudget", "floor_bytes", floor_bytes, allow_none=False)
        least = _check_bytes("KVBudget", "min_request_bytes", min_request_bytes, allow_none=False)
        assert ceiling is not None and floor is not None and least is not None
        if floor > ceiling:
            raise ValueError(f"KVBudget: floor_bytes ({floor}) is larger than ceiling_bytes ({ceiling})")
        self.ceiling_bytes = ceiling
        self.floor_bytes = floor
        self.min_request_bytes = least
        self._cv = threading.Condition()
        self._requested: Optional[int] = None
        self._lease: Optional[int] = None
        self._asleep = False
        self._version = 0
        self._listeners: list[Callable[[], None]] = []

    # -- the inputs ---------------------------------------------------------------------------
    def set_requested(self, nbytes: Optional[int]) -> None:
        """Set the requested budget; ``None`` restores the ceiling. Raises ``ValueError`` (and
        changes nothing) for a value that is not an int in [``min_request_bytes``, ceiling] or 0."""
        value = _check_bytes("set_budget", "nbytes", nbytes, allow_none=True)
        if value is not None:
            if value > self.ceiling_bytes:
                raise ValueError(f"set_budget: {value} bytes exceeds the ceiling ({self.ceiling_bytes} bytes)")
            if 0 < value < self.min_request_bytes:
                raise ValueError(
                    f"set_budget: {value} bytes is below one KV chunk ({self.min_request_bytes} bytes), the "
                    "smallest budget that holds a page; use 0 to hold nothing"
                )
        self._update(lambda: setattr(self, "_requested", value))

    def set_lease(self, nbytes: Optional[int]) -> None:
        """Set the lease (what a broker grants, or any owner of a shared budget allows);
        ``None`` means no lease applies."""
        value = _check_bytes("set_lease", "nbytes", nbytes, allow_none=True)
        self._update(lambda: setattr(self, "_lease", value))

    def sleep(self) -> None:
        """Give everything back until ``wake``; the requested budget and lease are kept."""
        self._update(lambda: setattr(self, "_asleep", True))

    def wake(self) -> None:
        """Undo ``sleep``."""
        self._update(lambda: setattr(self, "_asleep", False))

    def _update(self, change: Callable[[], None]) -> None:
        with self._cv:
            before = self._state()
            change()
            if self._state() == before:
                return
            self._version += 1
            self._cv.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            fn()

    def _state(self) -> tuple[Optional[int], Optional[int], bool]:
        return (self._requested, self._lease, self._asleep)

    # -- the answer ---------------------------------------------------------------------------
    def effective_bytes(self) -> int:
        """The most KV memory the Engine may hold now."""
        with self._cv:
            return self._effective_locked()

    @property
    def version(self) -> int:
        """Bumped by every change of an input."""
        with self._cv:
            return self._version

    @property
    def asleep(self) -> bool:
        with self._cv:
            return self._asleep

    @property
    def requested_bytes(self) -> Optional[int]:
        """What ``set_budget`` asked (None: the ceiling)."""
        with self._cv:
            return self._requested

    @property
    def lease_bytes(self) -> Optional[int]:
        """The lease (None: no lease applies)."""
        with self._cv:
            return self._lease

    # -- waiting for a change -----------------------------------------------------------------
    def wait_for_change(self, since_version: int, timeout: Optional[float] = None) -> int:
        """Block until ``version`` differs from ``since_version`` or ``timeout`` passes;
        returns the version then."""
        with self._cv:
            self._cv.wait_for(lambda: self._version != since_version, timeout=timeout)
            return self._version

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (outside the budget's lock, on the changing thread) after each change."""
        if not callable(fn):
            raise ValueError(f"KVBudget.add_listener: expected a callable, got {fn!r}")
        with self._cv:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        with self._cv:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def snapshot(self) -> dict[str, Any]:
        """Every input and the answer, as a plain dict."""
        with self._cv:
            return {
                "ceiling_bytes": self.ceiling_bytes,
                "floor_bytes": self.floor_bytes,
                "requested_bytes": self._requested,
                "lease_bytes": self._lease,
                "asleep": self._asleep,
                "effective_bytes": self._effective_locked(),
                "version": self._version,
            }

    def _effective_locked(self) -> int:
        if self._asleep:
            return 0
        b = self.ceiling_bytes if self._requested is None else self._requested
        if self._lease is not None:
            b = min(b, max(self._lease, self.floor_bytes))
        return b
