"""A tenant's side of the broker: its lease becomes its Engine's budget, or, for any other
workload, a fixed amount of memory borrowed for a while (``BrokerClient.borrow``).

``BrokerClient`` talks to a budget, not to an Engine: it sets the lease on the Engine's
``KVBudget`` (``engine/budget.py``; anything with ``set_lease``), which wakes the Engine's
memory controller at once, so a smaller lease preempts and shrinks exactly as a budget cut
does, at the next step. A thread reports demand and residency (read from a stats callable)
to the broker, applies grants and reclaims, and confirms a reclaim only once resident bytes
are down to the new lease. If the broker goes away the lease stays as it was (the tenant keeps serving, but
cannot grow) and the thread reconnects with backoff, re-registering what it holds.

Every exchange with the broker is bounded in time: a send that cannot finish within
``io_timeout`` (a hung broker that no longer reads fills the socket buffer) counts as a lost
broker (the lease is kept, the thread reconnects), and ``close`` gives up on a hung broker after
that long too, so a tenant's shutdown never waits on the broker.

A borrower (``borrow``) uses the same thread and connection rules: it registers as kind
``"borrow"`` wanting exactly ``nbytes``, reports that as its demand, and once granted reports
the lease as resident (its memory is in use) until it leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..engine.budget import LeaseTarget
from .protocol import BROKER_MESSAGES, MAX_MESSAGE_BYTES, ProtocolError, decode, encode, message

_log = logging.getLogger(__name__)

__all__ = ["BorrowedLease", "BrokerClient", "BrokerUnavailable"]

# how often a borrower waiting for its grant looks at the lease the client's thread applies
_GRANT_POLL_SECONDS = 0.005


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, or refused the registration (the message says why)."""


@dataclass(frozen=True)
class BorrowedLease:
    """What ``BrokerClient.borrow`` yields once the broker granted it: ``nbytes`` (the lease),
    ``waited_seconds`` (from the call to the grant), ``socket_path`` (the broker's)."""

    nbytes: int
    waited_seconds: float
    socket_path: Path


class BrokerClient:
    """Register with the broker at ``socket_path`` as tenant ``name``.

    Args:
        socket_path: the broker's Unix socket.
        name: this tenant's name, unique among the broker's tenants.
        priority: higher wins under contention (may be negative).
        guarantee_bytes: KV bytes this tenant is always allowed to keep; the broker refuses a
            registration whose guarantee does not fit its budget. At least the budget's floor
            (the Engine's ``ElasticPolicy(min_bytes=)``).
        report_seconds: how often demand and residency are reported.
        connect_timeout: seconds to connect and register.
        io_timeout: seconds any later send to the broker may take (and ``close`` may wait for
            the thread and for its ``leave``) before the broker counts as lost.

    Hand it to the Engine (``Engine(model, policy=..., broker=client)``), which calls
    ``attach(engine.budget, engine.stats, chunk_bytes=...)``; ``close()`` (the Engine's
    ``close`` calls it) leaves the broker. Or, for a workload that is not a KV cache,
    ``with client.borrow(nbytes, timeout=...)`` holds a lease of ``nbytes`` for the block.
    """

    def __init__(
        self,
        socket_path: str | Path,
        name: str,
        priority: int = 0,
        guarantee_bytes: int = 0,
        *,
        report_seconds: float = 0.05,
        connect_timeout: float = 5.0,
        max_backoff_seconds: float = 2.0,
        io_timeout: float = 5.0,
    ) -> None:
        if not isinstance(name, str) or not (0 < len(name) <= 64) or not name.isprintable():
            raise ValueError(f"BrokerClient: name must be 1-64 printable characters, got {name!r}")
        for what, v in (("priority", priority), ("guarantee_bytes", guarantee_bytes)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"BrokerClient: {what} must be an int, got {v!r}")
        if guarantee_bytes < 0:
            raise ValueError(f"BrokerClient: guarantee_bytes must be >= 0, got {guarantee_bytes}")
        for what, t in (
            ("report_seconds", report_seconds),
            ("connect_timeout", connect_timeout),
            ("io_timeout", io_timeout),
        ):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
                raise ValueError(f"BrokerClient: {what} must be a number > 0, got {t!r}")
        self.socket_path = Path(socket_path)
        self.name = name
        self.priority = priority
        self.guarantee_bytes = guarantee_bytes
        self.report_seconds = float(report_seconds)
        self.connect_timeout = float(connect_timeout)
        self.max_backoff_seconds = float(max_backoff_seconds)
        self.io_timeout = float(io_timeout)
        self._last_message: Optional[float] = None  # time.monotonic() of the broker's last message
        self._lock = threading.Lock()
        self._lease = 0
        self._reclaim: Optional[tuple[int, int]] = None  # (seq, lease asked for)
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._heartbeat = 1.0
        self._stats: Callable[[], dict[str, Any]] = dict
        self._budget: Optional[LeaseTarget] = None
        self._chunk = 1
        self._max_bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._closed = False  # close() is done: a connection the thread makes after it is dropped
        self._borrowing: Optional[int] = None  # bytes asked for while borrow() holds this client
        self._granted_at = 0.0  # time.monotonic() of a borrower's grant; 0 while it has none
        self._last_report: Optional[tuple[int, ...]] = None
        self._last_sent = 0.0
        self.reconnects = 0
        self.grants = 0
        self.reclaims = 0
        self.last_error: Optional[str] = None

    # -- what the Engine sees -------------------------------------------------------------------
    @property
    def lease_bytes(self) -> int:
        """The lease: the most KV memory this tenant may hold now."""
        with self._lock:
            return self._lease

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def attach(self, budget: LeaseTarget, stats: Callable[[], dict[str, Any]], *, chunk_bytes: int) -> None:
        """Register and start following the lease: grants and reclaims go to
        ``budget.set_lease``; ``stats()`` supplies ``demand_bytes``, ``resident_bytes``,
        ``live_bytes``, ``running`` and ``waiting`` for the reports (the Engine calls this)."""
        if self._thread is not None:
            raise RuntimeError(f"BrokerClient {self.name!r}: already attached")
        if budget.floor_bytes > self.guarantee_bytes:
            raise ValueError(
                f"BrokerClient {self.name!r}: the budget's floor ({budget.floor_bytes} bytes, the policy's "
                f"min_bytes) is memory the Engine never gives back, so guarantee_bytes ({self.guarantee_bytes}) "
                f"must be at least that"
            )
        if self.guarantee_bytes > budget.ceiling_bytes:
            raise ValueError(
                f"BrokerClient {self.name!r}: guarantee_bytes ({self.guarantee_bytes}) exceeds what the Engine "
                f"can hold ({budget.ceiling_bytes})"
            )
        self._chunk = int(chunk_bytes)
        self._max_bytes = int(budget.ceiling_bytes)
        self._stats = stats
        self._connect_and_register(holdings=False)
        self._budget = budget
        budget.set_lease(self.lease_bytes)
        self._thread = threading.Thread(target=self._run, name=f"ekv-broker-{self.name}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def borrow(self, nbytes: int, timeout: float = 60.0, limit_allocator: Any = None) -> Iterator[BorrowedLease]:
        """Hold a lease of exactly ``nbytes`` for the ``with`` block: any workload's memory.

        Registers as a borrower (kind ``"borrow"``), waits until the broker grants all of
        ``nbytes`` (it reclaims idle leases first, then KV memory above targets, lowest priority
        first, never below a guarantee), keeps the lease alive while the block runs, and leaves
        on exit, which frees the lease at once. Yields a ``BorrowedLease``.

        ``timeout``: seconds to wait for the grant; past it the client leaves and raises
        ``TimeoutError`` naming ``nbytes``, the wait and the broker's budget, free and leased
        bytes. ``limit_allocator``: a device (``"cuda:0"``, an int, a torch.device) whose
        ``torch_elastic_kv.memory.allocator`` limit is set to ``nbytes`` while the lease is held
        and restored after. ``BrokerUnavailable`` if the broker cannot be reached or refuses;
        ``RuntimeError`` if this client is attached to an Engine, already borrowing, or closed;
        ``ValueError`` for a bad argument or a ``guarantee_bytes`` (a borrower has none). The
        client may borrow again after the block."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes < 2**63:
            raise ValueError(f"borrow: nbytes must be an int > 0 (and below 2**63), got {nbytes!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"borrow: timeout must be a number of seconds > 0, got {timeout!r}")
        if self._borrowing is not None:
            raise RuntimeError(f"BrokerClient {self.name!r}: already borrowing {self._borrowing} bytes")
        if self._thread is not None:
            raise RuntimeError(
                f"BrokerClient {self.name!r}: attached to an Engine as a KV tenant; a borrower needs a "
                "BrokerClient of its own (another name)"
            )
        if self._closed:
            raise RuntimeError(f"BrokerClient {self.name!r}: closed")
        if self.guarantee_bytes:
            raise ValueError(
                f"borrow: a borrower has no guarantee (its grant is all or nothing); "
                f"this client has guarantee_bytes={self.guarantee_bytes}"
            )
        allocator: Any = None
        previous_limit: Optional[int] = None
        if limit_allocator is not None:
            from ..memory import allocator  # torch: only for a caller who asked for the cap

            previous_limit = allocator.stats(limit_allocator)["limit_bytes"]  # also checks the device
        start = time.monotonic()
        self._begin_borrow(nbytes)
        try:
            self._wait_for_grant(nbytes, timeout, start)
            if allocator is not None:
                allocator.set_limit(nbytes, limit_allocator)
            try:
                yield BorrowedLease(nbytes, self._granted_at - start, self.socket_path)
            finally:
                if allocator is not None:
                    allocator.set_limit(previous_limit, limit_allocator)
        finally:
            self._end_borrow()

    def _begin_borrow(self, nbytes: int) -> None:
        """Register as a borrower of ``nbytes`` and start the thread (reports, heartbeats)."""
        self._borrowing = nbytes
        self._chunk = self._max_bytes = nbytes
        self._stats = self._borrower_stats
        try:
            self._connect_and_register(holdings=False)
        except BaseException:
            self._borrowing = None
            raise
        self._thread = threading.Thread(target=self._run, name=f"ekv-borrow-{self.name}", daemon=True)
        self._thread.start()

    def _borrower_stats(self) -> dict[str, Any]:
        """A borrower's figures: it wants ``nbytes``; once granted, all of it is in use."""
        nbytes = self._borrowing or 0
        held = nbytes if self._granted_at and self.lease_bytes >= nbytes else 0
        return {
            "demand_bytes": nbytes,
            "resident_bytes": held,
            "live_bytes": held,
            "running": int(bool(held)),
            "waiting": int(not held),
        }

    def _wait_for_grant(self, nbytes: int, timeout: float, start: float) -> None:
        deadline = start + timeout
        while self.lease_bytes < nbytes:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"borrow: the broker at {self.socket_path} did not grant {nbytes} bytes within {timeout:g} s "
                    f"({self._broker_figures()})"
                )
            time.sleep(_GRANT_POLL_SECONDS)
        self._granted_at = time.monotonic()
        _log.info("broker: %r borrowed %d bytes after %.3f s", self.name, nbytes, self._granted_at - start)

    def _broker_figures(self) -> str:
        from .top import query_status

        try:
            st = query_status(self.socket_path, timeout=self.io_timeout)
        except (OSError, ValueError) as e:
            return f"the broker's figures are unavailable: {e}"
        leased = sum(t["lease_bytes"] for t in st["tenants"])
        return f"budget {st['budget_bytes']}, free {st['free_bytes']}, leased {leased} bytes"

    def _end_borrow(self) -> None:
        """Leave the broker (resident 0: the lease is free at once) and make the client reusable."""
        self._granted_at = 0.0  # nothing held any more: the goodbye says resident 0
        self.close()
        self._borrowing = None
        thread = self._thread
        if thread is not None and thread.is_alive():
            return  # stuck on a hung broker: this client stays closed
        self._thread = None
        self._stop = threading.Event()
        self._closed = False
        with self._lock:
            self._lease = 0
            self._reclaim = None

    def close(self) -> None:
        """Leave the broker (the Engine has given its memory back) and stop the thread; within
        about ``io_timeout`` per step whatever the broker does (the ``leave`` is best-effort)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=self.io_timeout)
        try:
            self._leave(thread)
        finally:
            self._closed = True

    def _leave(self, thread: Optional[threading.Thread]) -> None:
        sock = self._sock
        if sock is None:
            return
        if thread is not None and thread.is_alive():
            # the thread is stuck in an exchange with a hung broker: wake it, skip the leave
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            _log.warning(
                "broker: %r left without a goodbye: the broker did not answer in %gs", self.name, self.io_timeout
            )
            self._close_socket()
            return
        try:
            resident = int(self._stats().get("resident_bytes", 0) or 0)
            sock.sendall(encode(message("leave", resident_bytes=resident)))  # bounded by io_timeout
        except OSError as e:
            _log.warning("broker: %r could not say goodbye (%s); the broker sees the process end", self.name, e)
        self._close_socket()

    def stats(self) -> dict[str, Any]:
        """lease_bytes, reclaiming_to, connected, seconds_since_message (since the broker's
        last message: registered, grant, reclaim; None before any), reconnects, grants,
        reclaims, last_error."""
        last = self._last_message
        with self._lock:
            return {
                "lease_bytes": self._lease,
                "reclaiming_to": None if self._reclaim is None else self._reclaim[1],
                "connected": self._sock is not None,
                "seconds_since_message": None if last is None else time.monotonic() - last,
                "reconnects": self.reconnects,
                "grants": self.grants,
                "reclaims": self.reclaims,
                "last_error": self.last_error,
            }

    # -- the connection -------------------------------------------------------------------------
    def _connect_and_register(self, holdings: bool) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as e:
            sock.close()
            raise BrokerUnavailable(f"broker at {self.socket_path}: cannot connect: {e}") from None
        figures = self._stats() if holdings else {}
        register = message(
            "register",
            name=self.name,
            pid=os.getpid(),
            priority=self.priority,
            guarantee_bytes=self.guarantee_bytes,
            chunk_bytes=self._chunk,
            max_bytes=self._max_bytes,
            lease_bytes=self.lease_bytes if holdings else 0,
            resident_bytes=int(figures.get("resident_bytes", 0) or 0),
            **({"kind": "borrow"} if self._borrowing is not None else {}),  # KV tenants send v1 as before
        )
        self._buf = b""
        try:
            sock.sendall(encode(register))
            reply = self._read_one(sock)
        except (OSError, ProtocolError) as e:
            sock.close()
            raise BrokerUnavailable(f"broker at {self.socket_path}: registration failed: {e}") from None
        if reply["type"] == "error":
            sock.close()
            raise BrokerUnavailable(f"broker at {self.socket_path} refused {self.name!r}: {reply['message']}")
        if reply["type"] != "registered":
            sock.close()
            raise BrokerUnavailable(f"broker at {self.socket_path}: expected 'registered', got {reply['type']!r}")
        with self._lock:
            self._lease = reply["lease_bytes"]
            self._reclaim = None
        if self._budget is not None:
            self._budget.set_lease(self._lease)
        self._heartbeat = float(reply["heartbeat_seconds"])
        self._last_message = time.monotonic()
        # every later send is bounded: a broker that stops reading must not block the thread
        sock.settimeout(self.io_timeout)
        self._sock = sock
        self._last_report = None
        _log.info("broker: %r registered at %s, lease %d bytes", self.name, self.socket_path, self._lease)

    def _recv_into_buffer(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self._buf += data
        if len(self._buf) > MAX_MESSAGE_BYTES and b"\n" not in self._buf:
            raise ProtocolError("too_large", "broker message too long")

    def _next_message(self) -> dict[str, Any]:
        line, self._buf = self._buf.split(b"\n", 1)
        msg = decode(line + b"\n", BROKER_MESSAGES)
        self._last_message = time.monotonic()
        return msg

    def _read_one(self, sock: socket.socket) -> dict[str, Any]:
        while b"\n" not in self._buf:
            self._recv_into_buffer(sock)
        return self._next_message()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._follow()
        finally:
            if self._closed:  # close() gave up waiting for this thread: nobody else will close it
                self._close_socket()

    def _follow(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            if self._sock is None:
                if self._stop.wait(backoff):
                    return
                try:
                    self._connect_and_register(holdings=True)
                    self.reconnects += 1
                    backoff = 0.05
                except BrokerUnavailable as e:
                    self.last_error = str(e)
                    backoff = min(self.max_backoff_seconds, backoff * 2)
                    continue
            try:
                self._receive(timeout=self.report_seconds)
                self._report()
            except (OSError, ConnectionError, ProtocolError, json.JSONDecodeError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                _log.warning("broker: %r lost its broker (%s); keeping a lease of %d bytes", self.name, e, self._lease)
                self._close_socket()

    def _receive(self, timeout: float) -> None:
        sock = self._sock
        assert sock is not None
        # lines already read (a grant that came in one recv with the registration's answer)
        # are applied first: the socket has nothing more to say about them
        if b"\n" not in self._buf:
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable:
                return
            self._recv_into_buffer(sock)
        while b"\n" in self._buf:
            self._apply(self._next_message())

    def _apply(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        with self._lock:
            if kind == "grant":
                self._lease = max(self._lease, msg["lease_bytes"])
                self.grants += 1
            elif kind == "reclaim":
                # the lease drops now; the budget wakes the Engine, which preempts and shrinks
                # at its next step (or at once from its memory thread when nothing steps)
                self._lease = min(self._lease, msg["lease_bytes"])
                self._reclaim = (msg["seq"], msg["lease_bytes"])
                self.reclaims += 1
            elif kind == "error":
                raise ConnectionError(f"broker error {msg['code']}: {msg['message']}")
            lease = self._lease
        if kind in ("grant", "reclaim"):
            _log.debug("broker: %r %s -> lease %d", self.name, kind, msg["lease_bytes"])
            if self._budget is not None:
                self._budget.set_lease(lease)

    def _report(self) -> None:
        sock = self._sock
        assert sock is not None
        s = self._stats()
        resident = int(s.get("resident_bytes", 0) or 0)
        with self._lock:
            reclaim = self._reclaim
        if reclaim is not None and resident <= reclaim[1]:
            sock.sendall(encode(message("released", seq=reclaim[0], lease_bytes=reclaim[1], resident_bytes=resident)))
            with self._lock:
                self._reclaim = None
        figures = (
            int(s.get("demand_bytes", 0) or 0),
            resident,
            int(s.get("live_bytes", 0) or 0),
            int(s.get("running", 0) or 0),
            int(s.get("waiting", 0) or 0),
            int(s.get("cached_bytes", 0) or 0),
        )
        now = time.monotonic()
        if figures != self._last_report or now - self._last_sent >= self._heartbeat:
            demand, resident, live, running, waiting, cached = figures
            sock.sendall(
                encode(
                    message(
                        "report",
                        demand_bytes=demand,
                        resident_bytes=resident,
                        live_bytes=live,
                        running=running,
                        waiting=waiting,
                        cached_bytes=cached,
                    )
                )
            )
            self._last_report = figures
            self._last_sent = now
