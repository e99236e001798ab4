"""The broker daemon: one per device, holding its KV budget, speaking the protocol over a Unix
socket to its tenants.

It adds no policy of its own: what tenants say goes to the ``Arbiter``, and what the arbiter
decides goes back as ``grant`` / ``reclaim`` messages. The daemon's own jobs are the
connection rules: only the socket owner's uid may connect (peer credentials), a tenant
registers under its own pid, a bad message gets an ``error`` reply and its connection closed,
a tenant that stops heartbeating is disconnected, and the lease of a tenant whose process has
exited goes back to the free budget (the exit freed its memory).

What a careless or hostile peer can cost it is bounded: a connection that does not register
within ``register_timeout`` is closed, connections past ``max_connections`` are refused at
once (so the descriptor table never fills), a peer that does not read its replies is dropped
once ``max_output_bytes`` wait for it or a write waits ``write_timeout``, and recurring errors
are logged at most once per ``LOG_EVERY_SECONDS`` with a count of the rest.

The socket path is claimed under an exclusive ``flock`` on ``PATH.lock`` held for the
daemon's life, so two brokers started at once cannot both pass the stale-socket check; the
daemon replaces only a socket of its own uid that nobody answers on, and on exit removes only
the socket it bound itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
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

__all__ = ["Broker", "BrokerStartError", "default_max_connections", "default_socket_path", "pid_alive"]

LOG_EVERY_SECONDS = 5.0  # a recurring error (a flood of them) is logged at most this often
# descriptors kept free below RLIMIT_NOFILE for the default connection cap: one accept round
# (the listen backlog) plus the loop's, the log's and the lock's own
_FD_MARGIN = 64
_BACKLOG = 32


class BrokerStartError(RuntimeError):
    """The broker cannot claim its socket path; the message is one line saying why."""


def default_max_connections() -> int:
    """``min(1024, soft RLIMIT_NOFILE - 64)``: room for every connection below the fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(1, min(1024, soft - _FD_MARGIN))


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


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "file of unknown type"


class _Throttle:
    """Log a recurring event at most once per ``every`` seconds, counting the lines left out."""

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        self.every = every
        self._next = 0.0
        self._left_out = 0
        self._last: tuple[int, str, tuple[Any, ...]] = (logging.INFO, "", ())

    def log(self, level: int, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            self._last = (level, fmt, args)
            return
        if self._left_out:
            fmt += f" (and {self._left_out} more like it in the last {self.every:g} s)"
        _log.log(level, fmt, *args)
        self._left_out = 0
        self._next = now + self.every

    def flush(self) -> None:
        """Once the quiet period is over, log the last line left out with the count, so a
        burst that stopped is still reported."""
        if self._left_out and time.monotonic() >= self._next:
            level, fmt, args = self._last
            self._left_out -= 1  # the line logged now is one of them
            self.log(level, fmt, *args)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has exited: its memory is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection now: what a peer left unread is discarded rather than held (with
    its descriptor) until it reads."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter, pid: int, register_by: float) -> None:
        self.writer = writer
        self.pid = pid
        self.tenant: Optional[str] = None
        self.last_seen = time.monotonic()
        # while not a tenant: the time by which it must register (or be closed)
        self.register_by = register_by
        self.failed = False  # an error reply was sent: the connection closes after it


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
        register_timeout: float = 5.0,
        max_connections: Optional[int] = None,
        max_output_bytes: int = 1 << 20,
        write_timeout: float = 5.0,
    ) -> None:
        """``register_timeout``: seconds a connection may stay open without registering;
        ``max_connections``: open connections beyond which new ones are refused (default
        ``default_max_connections()``); ``max_output_bytes``: replies buffered for one peer
        before it is dropped (at least ``MAX_MESSAGE_BYTES``); ``write_timeout``: seconds a
        peer may leave its replies unread before it is dropped."""
        for name, value in (
            ("heartbeat_timeout", heartbeat_timeout),
            ("register_timeout", register_timeout),
            ("write_timeout", write_timeout),
        ):
            if not value > 0:
                raise ValueError(f"Broker: {name} must be > 0, got {value!r}")
        if max_connections is not None and not (isinstance(max_connections, int) and max_connections >= 1):
            raise ValueError(f"Broker: max_connections must be an int >= 1, got {max_connections!r}")
        if not (isinstance(max_output_bytes, int) and max_output_bytes >= MAX_MESSAGE_BYTES):
            raise ValueError(
                f"Broker: max_output_bytes must be an int >= {MAX_MESSAGE_BYTES}, got {max_output_bytes!r}"
            )
        self.device = device
        self.arbiter = Arbiter(budget_bytes, reclaim_seconds=reclaim_seconds)
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path(device)
        self.lock_path = Path(f"{self.socket_path}.lock")
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.check_seconds = float(check_seconds)
        self.register_timeout = float(register_timeout)
        self.max_connections = default_max_connections() if max_connections is None else max_connections
        self.max_output_bytes = max_output_bytes
        self.write_timeout = float(write_timeout)
        self._conns: dict[str, _Connection] = {}
        self._open: set[_Connection] = set()
        self._server: Optional[asyncio.base_events.Server] = None
        self._stopped: Optional[asyncio.Event] = None
        self._warned_overdue: set[tuple[str, int]] = set()
        self._lock_fd: Optional[int] = None
        self._bound: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of the socket this broker bound
        self._log_accept = _Throttle()
        self._log_refused = _Throttle()
        self._log_unregistered = _Throttle()
        self._log_slow_reader = _Throttle()
        self._log_failed = _Throttle()
        self._throttles = (
            self._log_accept,
            self._log_refused,
            self._log_unregistered,
            self._log_slow_reader,
            self._log_failed,
        )

    # -- life cycle -----------------------------------------------------------------------------
    async def run(self, ready: Optional[Callable[[], None]] = None) -> None:
        """Claim the socket path, listen, and serve until ``stop()``. ``BrokerStartError`` (one
        line) if the path is held by another broker or has something else at it."""
        self._stopped = asyncio.Event()
        _private_dir(self.socket_path.parent)
        self._take_lock()
        try:
            await self._serve(ready)
        finally:
            self._release()

    async def _serve(self, ready: Optional[Callable[[], None]]) -> None:
        assert self._stopped is not None
        self._remove_stale_socket()
        listener = self._bind()
        loop = asyncio.get_running_loop()
        old_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=listener, limit=MAX_MESSAGE_BYTES, backlog=_BACKLOG
            )
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
                for conn in list(self._open):
                    _close(conn.writer)
                await self._server.wait_closed()
        finally:
            loop.set_exception_handler(old_handler)
            listener.close()

    def stop(self) -> None:
        """Ask ``run()`` to close every connection and return."""
        if self._stopped is not None:
            self._stopped.set()

    def _take_lock(self) -> None:
        """Hold an exclusive flock on ``PATH.lock`` (created 0600) until ``_release``."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as e:
            raise BrokerStartError(f"broker: cannot open the lock file {self.lock_path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                what = _file_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"file owned by uid {st.st_uid}"
                raise BrokerStartError(f"broker: the lock file {self.lock_path} is a {what}; refusing to start")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BrokerStartError(
                    f"broker: another broker holds {self.lock_path} (pid {self._lock_holder(fd)})"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    @staticmethod
    def _lock_holder(fd: int) -> str:
        # the winner writes its pid right after taking the lock: a loser of a simultaneous
        # start may look in between
        for _ in range(25):
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.02)
        return "unknown"

    def _remove_stale_socket(self) -> None:
        """Unlink what is at the socket path only if it is a socket of this uid that nobody
        answers on (left by a broker that died); refuse anything else."""
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise BrokerStartError(f"broker: {path} is a {_file_kind(st.st_mode)}, not a socket; refusing to start")
        if st.st_uid != os.getuid():
            raise BrokerStartError(f"broker: {path} is a socket owned by uid {st.st_uid}; refusing to start")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left by a broker that died
            _log.info("broker: removed the stale socket %s", path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            raise BrokerStartError(f"broker: {path} is a live socket: connecting to it failed ({e})") from None
        finally:
            probe.close()
        raise BrokerStartError(f"broker: {path} is a live socket: a broker answers there")

    def _bind(self) -> socket.socket:
        """Bind the socket 0600 (never briefly wider) and remember which inode it is."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.socket_path))  # EADDRINUSE rather than replace whatever appeared
        except OSError as e:
            sock.close()
            raise BrokerStartError(f"broker: cannot bind {self.socket_path}: {e.strerror}") from None
        finally:
            os.umask(old)
        st = os.lstat(self.socket_path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(self.socket_path, 0o600)
        return sock

    def _release(self) -> None:
        """Remove the socket this broker bound (not one somebody put there since), then the lock."""
        if self._bound is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._bound:
                    self.socket_path.unlink()
            self._bound = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock file stays: unlinking it would let a third broker lock a new one
            self._lock_fd = None

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # asyncio pauses accepting for a second and reports each failed round
            self._log_accept.log(logging.ERROR, "broker: cannot accept a connection: %s", exc)
            return
        loop.default_exception_handler(context)

    # -- one connection -------------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            self._log_refused.log(
                logging.WARNING, "broker: %d connections open (--max-connections); refusing a new one", len(self._open)
            )
            writer.write(
                encode(message("error", code="too_many_connections", message="the broker is at --max-connections"))
            )
            _close(writer)
            return
        sock = writer.get_extra_info("socket")
        pid, uid, _ = peer_credentials(sock)
        conn = _Connection(writer, pid, time.monotonic() + self.register_timeout)
        self._open.add(conn)
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
                if not await self._drained(conn):
                    return
        except ConnectionError:
            return
        finally:
            if conn.tenant is not None and self._conns.get(conn.tenant) is conn:
                del self._conns[conn.tenant]
                self.arbiter.disconnected(conn.tenant)
                _log.info("broker: tenant %r (pid %d) disconnected", conn.tenant, conn.pid)
                self._send_plan()
            try:
                if conn.failed:
                    await self._linger(reader, writer)
            finally:
                self._open.discard(conn)
                writer.close()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error reply: send EOF, then read and drop what the peer still sends (for
        at most ``write_timeout``), so that a write it had under way when the broker refused it
        does not fail with EPIPE before it has read why."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard(reader), self.write_timeout)
        except (asyncio.TimeoutError, OSError, ValueError):
            pass

    async def _drained(self, conn: _Connection) -> bool:
        """Wait (no longer than ``write_timeout``) until the peer has read enough of its replies
        that asyncio takes more; False (connection dropped) if it does not. While this waits
        the connection's messages are not read, so a peer that never reads buffers nothing
        more here."""
        transport = conn.writer.transport
        if not transport.get_write_buffer_size():
            return True
        try:
            await asyncio.wait_for(conn.writer.drain(), self.write_timeout)
        except asyncio.TimeoutError:
            self._drop_slow_reader(conn, f"left its replies unread for {self.write_timeout:g} s")
            return False
        return True

    def _send(self, conn: _Connection, msg: dict[str, Any]) -> None:
        writer = conn.writer
        if writer.is_closing():
            return
        writer.write(encode(msg))
        if writer.transport.get_write_buffer_size() > self.max_output_bytes:
            self._drop_slow_reader(conn, f"has more than {self.max_output_bytes} bytes of replies unread")

    def _drop_slow_reader(self, conn: _Connection, why: str) -> None:
        self._log_slow_reader.log(
            logging.WARNING, "broker: dropping the connection of pid %d (tenant %r): it %s", conn.pid, conn.tenant, why
        )
        conn.writer.transport.abort()  # discards what it buffered; close() would wait to send it

    def _fail(self, conn: _Connection, code: str, text: str) -> None:
        self._log_failed.log(logging.INFO, "broker: closing connection of pid %d: %s: %s", conn.pid, code, text)
        self._send(conn, message("error", code=code, message=text))
        conn.failed = True

    def _handle(self, conn: _Connection, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "status":
            self._send(conn, message("status", device=self.device, **self.arbiter.status()))
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
                kind=msg.get("kind", "kv"),
            )
            conn.tenant = t.name
            self._conns[t.name] = conn
            self._send(
                conn,
                message(
                    "registered",
                    lease_bytes=t.lease,
                    budget_bytes=self.arbiter.budget,
                    heartbeat_seconds=self.heartbeat_seconds,
                ),
            )
            _log.info(
                "broker: %s tenant %r registered (pid %d, priority %d, guarantee %d, lease %d)",
                t.kind,
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
                cached=msg.get("cached_bytes", 0),
            )
        elif kind == "released":
            self.arbiter.released(conn.tenant, msg["seq"], msg["lease_bytes"], msg["resident_bytes"])
        elif kind == "leave":
            name, conn.tenant = conn.tenant, None
            conn.register_by = time.monotonic() + self.register_timeout
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
            self._send(conn, message("grant", seq=a.seq, lease_bytes=a.lease_bytes))
        else:
            left = max(0.0, a.deadline - time.monotonic())
            self._send(conn, message("reclaim", seq=a.seq, lease_bytes=a.lease_bytes, deadline_seconds=round(left, 3)))
            _log.info("broker: reclaim from %r down to %d bytes (seq %d)", a.tenant, a.lease_bytes, a.seq)

    # -- housekeeping ---------------------------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            self.check()

    def check(self) -> None:
        """Return the leases of exited processes, drop silent tenants and connections that did
        not register in time, note late reclaims."""
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
                _close(conn.writer)
        late = [c for c in self._open if c.tenant is None and now > c.register_by and not c.writer.is_closing()]
        for conn in late:
            _close(conn.writer)
        if late:
            self._log_unregistered.log(
                logging.WARNING,
                "broker: closed %d connection(s) that did not register within %g s (--register-timeout)",
                len(late),
                self.register_timeout,
            )
        for throttle in self._throttles:
            throttle.flush()
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
