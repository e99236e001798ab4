"""uvicorn and the app on a listening socket, until a signal and its drain.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections; the engine service refuses
new requests and lets those in flight run for ``--drain-seconds``, then ends the rest with
``finish_reason`` "abort"; once their responses are written the app's lifespan closes the
engine's side (the Engine itself, or the link to the engine process, which then closes it), and
the process exits 0 (a second SIGINT exits at once, without the drain).

Slow and idle clients: uvicorn has no deadline for a request head, so its HTTP protocol (httptools
or h11, ``--http``) runs under a ``_ConnectionGuard`` (``--header-timeout``,
``--max-connections``), and the log lines a connection flood repeats are rate-limited
(``_RateLimitFilter``).

The event loop and the HTTP parser are uvloop and httptools when they are installed (``--loop``,
``--http``; the ``serve`` extra brings both on Linux and macOS), as uvicorn's own "auto" would
pick: their C implementations hold the GIL for less of each streamed token than asyncio's
selector loop and h11, which matters most with ``--front thread``, where the loop shares the
process with the engine thread.

This module imports no torch: the front process of ``--front process`` runs it alone.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import time
from typing import Any, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServerState, create_app
from .settings import ServeSettings, http_stack

_log = logging.getLogger("torch_elastic_kv.serve.server")  # the name scripts and log filters know

__all__ = ["REPORT_SECONDS", "serve_http"]


SAME_SIGNAL_SECONDS = 1.0  # signals this close together count as one (``_Server.handle_exit``)
REPORT_SECONDS = 5.0  # at most one log line per this many seconds about refused or dropped connections


class _ConnectionGuard:
    """What uvicorn lacks against slow and idle clients: a deadline for each request head and a
    cap on open connections below the open-file limit.

    A connection must send a complete request head within ``header_timeout`` seconds of
    connecting or of its previous response (bytes trickling in do not extend it), else it is
    closed. Past ``max_connections``, a new connection closes the oldest one still waiting for
    a head (a slow or idle client; a request in progress is never touched), or, when every
    connection has a request in progress, is answered 503 and closed. Open connections thus
    stay below the fd limit (a burst accepted in one go may still meet it once; asyncio then
    pauses accept() for a second), and a client that sends its request at once (``/health``)
    is served whatever a flood of silent connections does. Such closures are logged as one
    summary line per ``REPORT_SECONDS``.
    """

    def __init__(self, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.waiting: collections.OrderedDict[Any, asyncio.TimerHandle] = collections.OrderedDict()
        self._counts: collections.Counter[str] = collections.Counter()
        self._report: Optional[asyncio.TimerHandle] = None

    def protocol_class(self, http: str = "h11") -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol class for ``http`` ("h11" or "httptools") bound to this guard
        (``uvicorn.Config(http=...)``). Each parser says when a head is complete and when the
        connection is idle again (keep-alive: the next head gets the same deadline)."""
        guard = self

        class Guarded:  # the hooks both parsers share; listed first, so super() is the parser
            def connection_made(self, transport: asyncio.Transport) -> None:
                super().connection_made(transport)  # type: ignore[misc]
                if guard.admit(self):
                    guard.wait_for_head(self)

            def connection_lost(self, exc: Optional[Exception]) -> None:
                guard.head_received(self)
                super().connection_lost(exc)  # type: ignore[misc]

        if http == "h11":

            class GuardedH11Protocol(Guarded, H11Protocol):
                def data_received(self, data: bytes) -> None:
                    super().data_received(data)
                    if self.conn.their_state is not h11.IDLE:
                        guard.head_received(self)

                def on_response_complete(self) -> None:
                    super().on_response_complete()
                    if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                        guard.wait_for_head(self)

            return GuardedH11Protocol
        if http != "httptools":
            raise ValueError(f"http must be 'h11' or 'httptools', got {http!r}")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class GuardedHttpToolsProtocol(Guarded, HttpToolsProtocol):
            def on_headers_complete(self) -> None:
                guard.head_received(self)
                super().on_headers_complete()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                # a pipelined request whose head is in already started its own cycle
                idle = self.cycle is None or self.cycle.response_complete
                if not self.transport.is_closing() and idle:
                    guard.wait_for_head(self)

        return GuardedHttpToolsProtocol

    def admit(self, conn: Any) -> bool:
        """Make room for ``conn`` (just connected); False if it was refused and closed."""
        if len(conn.connections) <= self.max_connections:
            return True
        if self.waiting:  # conn is not in it yet
            oldest = next(iter(self.waiting))
            self.head_received(oldest)
            oldest.transport.close()
            self._count(
                f"closed while waiting for a request head, to stay under --max-connections {self.max_connections}"
            )
            return True
        body = json.dumps(
            {
                "error": {
                    "message": f"too many connections (--max-connections {self.max_connections}); retry later",
                    "type": "server_error",
                    "param": None,
                    "code": "overloaded",
                }
            }
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        conn.transport.write(head.encode() + body)
        conn.transport.close()
        self._count("refused with 503: every connection had a request in progress")
        return False

    def wait_for_head(self, conn: Any) -> None:
        self.head_received(conn)
        self.waiting[conn] = conn.loop.call_later(self.header_timeout, self._expire, conn)

    def head_received(self, conn: Any) -> None:
        timer = self.waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, conn: Any) -> None:
        if self.waiting.pop(conn, None) is not None and not conn.transport.is_closing():
            conn.transport.close()
            self._count(f"closed without a complete request head within --header-timeout {self.header_timeout:g}s")

    def _count(self, what: str) -> None:
        self._counts[what] += 1
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(REPORT_SECONDS, self._log_counts)

    def _log_counts(self) -> None:
        self._report = None
        for what, n in self._counts.items():
            _log.warning("torch_elastic_kv serve: %d connection(s) %s in the last %gs", n, what, REPORT_SECONDS)
        self._counts.clear()


class _RateLimitFilter(logging.Filter):
    """One line per ``REPORT_SECONDS`` for a log message a flood repeats once per connection
    (asyncio's accept() error when file descriptors run out, uvicorn's invalid request), with
    the count of those left out and without the traceback."""

    def __init__(self, prefix: str, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.prefix = prefix
        self.clock = clock
        self._last: Optional[float] = None
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < REPORT_SECONDS:
            self._suppressed += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        detail = f": {error}" if error is not None else ""
        record.msg = "torch_elastic_kv serve: %s%s (%d more in the last %gs)"
        record.args = (self.prefix, detail, self._suppressed, REPORT_SECONDS)
        record.exc_info, record.exc_text = None, None
        self._last, self._suppressed = now, 0
        return True


# (logger, message prefix) of the lines a connection flood repeats
_FLOOD_MESSAGES = (
    ("asyncio", "socket.accept() out of system resource"),
    ("uvicorn.error", "Invalid HTTP request received."),
)


class _Server(uvicorn.Server):
    """uvicorn with the drain: a signal starts it, and the process exits 0 afterwards (stock
    uvicorn re-raises the signal once shut down, which would end the process by it)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_seconds: float, sock: socket.socket) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._sock = sock
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._first_signal = 0.0

    def handle_exit(self, sig: int, frame: Any) -> None:
        now = time.monotonic()
        # a second signal means no more waiting; one within SAME_SIGNAL_SECONDS of the first is the
        # same stop reaching this process twice (a terminal's Ctrl-C or a service manager's
        # SIGTERM to every process, plus the engine process passing it on)
        if self.should_exit and now - self._first_signal >= SAME_SIGNAL_SECONDS:
            self.force_exit = True
        if not self.should_exit:
            self._first_signal = now
        self.should_exit = True

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.should_exit:
            return
        host, port = self._sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        # the line scripts wait for: logged whatever --log-level says
        _log.log(
            max(logging.INFO, _log.getEffectiveLevel()),
            "torch_elastic_kv serve: listening on http://%s:%d",
            shown,
            port,
        )

    def answer_in_flight(self, message: str, seconds: float) -> None:
        """The Engine is gone for good (a tensor-parallel rank died; called off the loop): every
        request in flight gets its error now and new ones a 503 (``EngineService.fail_all``);
        returns once uvicorn has written every response in progress, or after ``seconds``."""
        self._state.service.fail_all(message)  # type: ignore[attr-defined]  # an EngineService: in-process only
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def written() -> None:
            deadline = loop.time() + seconds
            while self.server_state.tasks and loop.time() < deadline:
                await asyncio.sleep(0.01)

        try:
            asyncio.run_coroutine_threadsafe(written(), loop).result(seconds + 1)
        except Exception as exc:  # the loop stopped meanwhile: nothing more can be written
            _log.debug("waiting for the answers in flight: %s: %s", type(exc).__name__, exc)

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        _log.info("torch_elastic_kv serve: shutting down; in-flight requests have %gs to finish", self._drain_seconds)
        self._state.service.begin_drain(self._drain_seconds)
        await super().shutdown(sockets)


def serve_http(settings: ServeSettings, state: ServerState, sock: socket.socket) -> int:
    """uvicorn and the app over ``state`` on ``sock`` (bound; listening or not) until a signal
    and its drain; returns 0. In the server's one process, or in its front process."""
    http, loop = http_stack(settings.http, settings.loop)
    _log.info("torch_elastic_kv serve: HTTP: %s on %s", http, loop)
    guard = _ConnectionGuard(settings.header_timeout, settings.max_connections)
    filters = [(logging.getLogger(name), _RateLimitFilter(prefix)) for name, prefix in _FLOOD_MESSAGES]
    for logger, flt in filters:
        logger.addFilter(flt)
    config = uvicorn.Config(
        create_app(state),
        log_config=None,
        access_log=False,
        lifespan="on",
        http=guard.protocol_class(http),
        ws="none",
        loop=loop,
        # a backstop only: the drain ends every request by --drain-seconds
        timeout_graceful_shutdown=int(settings.drain_seconds) + 3,
    )
    sock.listen(2048)
    server = _Server(config, state, settings.drain_seconds, sock)
    on_down = getattr(getattr(state.service, "engine", None), "on_down", None)
    if on_down is not None:  # a tensor-parallel group that goes down answers its requests first
        from .tp_front import ANSWER_SECONDS

        on_down(lambda message: server.answer_in_flight(message, ANSWER_SECONDS))
    try:
        server.run(sockets=[sock])
    finally:
        for logger, flt in filters:
            logger.removeFilter(flt)
    return 0
