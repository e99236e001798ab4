"""A tenant's side of the broker: its lease becomes its Engine's budget.

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
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from ..engine.budget import LeaseTarget
from .protocol import BROKER_MESSAGES, MAX_MESSAGE_BYTES, ProtocolError, decode, encode, message

_log = logging.getLogger(__name__)

__all__ = ["BrokerClient", "BrokerUnavailable"]


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, or refused the registration (the message says why)."""


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
    ``close`` calls it) leaves the broker.
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
        )
        now = time.monotonic()
        if figures != self._last_report or now - self._last_sent >= self._heartbeat:
            demand, resident, live, running, waiting = figures
            sock.sendall(
                encode(
                    message(
                        "report",
                        demand_bytes=demand,
                        resident_bytes=resident,
                        live_bytes=live,
                        running=running,
                        waiting=waiting,
                    )
                )
            )
            self._last_report = figures
            self._last_sent = now
