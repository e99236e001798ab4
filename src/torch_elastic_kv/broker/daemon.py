"""The broker daemon: one per device, holding its KV budget, speaking the protocol over a Unix
socket to its tenants.

It adds no policy of its own: what tenants say goes to the ``Arbiter``, and what the arbiter
decides goes back as ``grant`` / ``reclaim`` messages. The daemon's own jobs are the
connection rules: only the socket owner's uid may connect (peer credentials), a tenant
registers under its own pid, a bad message gets an ``error`` reply and its connection closed,
a tenant that stops heartbeating is disconnected, and the lease of a tenant whose process has
exited goes back to the free budget (the exit freed its memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from .arbiter import Action, Arbiter, ArbiterError
from .protocol import CLIENT_MESSAGES, MAX_MESSAGE_BYTES, ProtocolError, decode, encode, message

_log = logging.getLogger(__name__)

__all__ = ["Broker", "default_socket_path", "pid_alive"]


def default_socket_path(device: str) -> Path:
    """``$XDG_RUNTIME_DIR/torch_elastic_kv/broker-<device>.sock``, else under
    ``/tmp/torch_elastic_kv-<uid>/``: a directory only this user can enter."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "torch_elastic_kv" if base else Path(f"/tmp/torch_elastic_kv-{os.getuid()}")
    return root / f"broker-{device.replace(':', '')}.sock"


def _private_dir(path: Path) -> None:
    """Create ``path`` 0700, or check that an existing one is ours and closed to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(
            f"broker: socket directory {path} must belong to uid {os.getuid()} with mode 0700 "
            f"(it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
        )


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has exited: its memory is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter, pid: int) -> None:
        self.writer = writer
        self.pid = pid
        self.tenant: Optional[str] = None
        self.last_seen = time.monotonic()

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(msg))


class Broker:
    """The daemon. ``run()`` serves until ``stop()`` (or a signal, from the CLI)."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        device: str = "cpu",
        socket_path: Optional[str | Path] = None,
        heartbeat_seconds: float = 1.0,
        heartbeat_timeout: float = 5.0,
        reclaim_seconds: float = 5.0,
        check_seconds: float = 0.1,
    ) -> None:
        self.device = device
        self.arbiter = Arbiter(budget_bytes, reclaim_seconds=reclaim_seconds)
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path(device)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.check_seconds = float(check_seconds)
        self._conns: dict[str, _Connection] = {}
        self._server: Optional[asyncio.base_events.Server] = None
        self._stopped: Optional[asyncio.Event] = None
        self._warned_overdue: set[tuple[str, int]] = set()

    # -- life cycle -----------------------------------------------------------------------------
    async def run(self, ready: Optional[Callable[[], None]] = None) -> None:
        """Listen on the socket and serve until ``stop()``."""
        self._stopped = asyncio.Event()
        _private_dir(self.socket_path.parent)
        self._remove_stale_socket()
        old = os.umask(0o177)  # the socket is created 0600, never briefly wider
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.socket_path), limit=MAX_MESSAGE_BYTES
            )
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        _log.info(
            "torch_elastic_kv broker: device %s, budget %d bytes, listening on %s",
            self.device,
            self.arbiter.budget,
            self.socket_path,
        )
        if ready is not None:
            ready()
        checker = asyncio.create_task(self._check_loop())
        try:
            await self._stopped.wait()
        finally:
            checker.cancel()
            self._server.close()
            for conn in list(self._conns.values()):
                conn.writer.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _remove_stale_socket(self) -> None:
        if not self.socket_path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.socket_path.unlink()  # left by a broker that died
            return
        finally:
            probe.close()
        raise RuntimeError(f"broker: another broker already listens on {self.socket_path}")

    # -- one connection -------------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _ = peer_credentials(sock)
        conn = _Connection(writer, pid)
        try:
            if uid != os.getuid():
                _log.warning("broker: refused a connection from uid %d (pid %d)", uid, pid)
                self._fail(conn, "permission_denied", f"uid {uid} may not use this broker (owner uid {os.getuid()})")
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self._fail(conn, "too_large", f"message longer than {MAX_MESSAGE_BYTES} bytes")
                    return
                if not line:
                    return
                if not line.endswith(b"\n"):
                    return  # the peer closed mid-message
                conn.last_seen = time.monotonic()
                try:
                    self._handle(conn, decode(line, CLIENT_MESSAGES))
                except (ProtocolError, ArbiterError) as e:
                    self._fail(conn, e.code, str(e))
                    return
        except ConnectionError:
            return
        finally:
            if conn.tenant is not None and self._conns.get(conn.tenant) is conn:
                del self._conns[conn.tenant]
                self.arbiter.disconnected(conn.tenant)
                _log.info("broker: tenant %r (pid %d) disconnected", conn.tenant, conn.pid)
                self._send_plan()
            writer.close()

    def _fail(self, conn: _Connection, code: str, text: str) -> None:
        _log.info("broker: closing connection of pid %d: %s: %s", conn.pid, code, text)
        conn.send(message("error", code=code, message=text))

    def _handle(self, conn: _Connection, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "status":
            conn.send(message("status", device=self.device, **self.arbiter.status()))
            return
        if kind == "heartbeat":
            return
        if kind == "register":
            if conn.tenant is not None:
                raise ProtocolError("out_of_order", f"register: this connection is tenant {conn.tenant!r} already")
            if msg["pid"] != conn.pid:
                raise ProtocolError(
                    "bad_value", f"register: pid {msg['pid']} is not the connecting process ({conn.pid})"
                )
            t = self.arbiter.register(
                msg["name"],
                msg["pid"],
                msg["priority"],
                msg["guarantee_bytes"],
                msg["chunk_bytes"],
                msg["max_bytes"],
                lease=msg.get("lease_bytes", 0),
                resident=msg.get("resident_bytes", 0),
            )
            conn.tenant = t.name
            self._conns[t.name] = conn
            conn.send(
                message(
                    "registered",
                    lease_bytes=t.lease,
                    budget_bytes=self.arbiter.budget,
                    heartbeat_seconds=self.heartbeat_seconds,
                )
            )
            _log.info(
                "broker: tenant %r registered (pid %d, priority %d, guarantee %d, lease %d)",
                t.name,
                t.pid,
                t.priority,
                t.guarantee,
                t.lease,
            )
            self._send_plan()
            return
        if conn.tenant is None:
            raise ProtocolError("out_of_order", f"{kind}: register first")
        if kind == "report":
            self.arbiter.report(
                conn.tenant,
                demand=msg["demand_bytes"],
                resident=msg["resident_bytes"],
                live=msg["live_bytes"],
                running=msg["running"],
                waiting=msg["waiting"],
            )
        elif kind == "released":
            self.arbiter.released(conn.tenant, msg["seq"], msg["lease_bytes"], msg["resident_bytes"])
        elif kind == "leave":
            name, conn.tenant = conn.tenant, None
            del self._conns[name]
            if msg["resident_bytes"] == 0:
                t = self.arbiter.remove(name)
                _log.info("broker: tenant %r left; its %d-byte lease is free", name, t.lease if t else 0)
            else:  # still holds memory: the lease goes back when the process exits
                self.arbiter.disconnected(name)
        self._send_plan()

    def _send_plan(self) -> None:
        for action in self.arbiter.plan():
            self._send_action(action)

    def _send_action(self, a: Action) -> None:
        conn = self._conns.get(a.tenant)
        if conn is None:
            return  # planned only for connected tenants; gone since: the next plan redoes it
        if a.kind == "grant":
            conn.send(message("grant", seq=a.seq, lease_bytes=a.lease_bytes))
        else:
            left = max(0.0, a.deadline - time.monotonic())
            conn.send(message("reclaim", seq=a.seq, lease_bytes=a.lease_bytes, deadline_seconds=round(left, 3)))
            _log.info("broker: reclaim from %r down to %d bytes (seq %d)", a.tenant, a.lease_bytes, a.seq)

    # -- housekeeping ---------------------------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            self.check()

    def check(self) -> None:
        """Return the leases of exited processes, drop silent connections, note late reclaims."""
        changed = False
        for t in list(self.arbiter.tenants.values()):
            if not t.connected and not pid_alive(t.pid):
                self.arbiter.remove(t.name)
                _log.info("broker: tenant %r (pid %d) has exited; its %d-byte lease is free", t.name, t.pid, t.lease)
                changed = True
        now = time.monotonic()
        for name, conn in list(self._conns.items()):
            if now - conn.last_seen > self.heartbeat_timeout:
                _log.warning("broker: tenant %r sent nothing for %.1f s; disconnecting it", name, now - conn.last_seen)
                conn.writer.close()
        for t in self.arbiter.overdue():
            key = (t.name, t.reclaim_seq)
            if key not in self._warned_overdue:
                self._warned_overdue.add(key)
                _log.warning(
                    "broker: tenant %r has not released down to %d bytes by its deadline; it gets nothing more "
                    "until it does",
                    t.name,
                    t.reclaim_to,
                )
        if changed:
            self._send_plan()
