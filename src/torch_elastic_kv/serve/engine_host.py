"""``serve --front process``: the HTTP front in a child process, the Engine in this one.

Why: HTTP parsing, JSON, server-sent events and tokenization are Python on an event loop. In the
engine's process they take the GIL from the thread that steps the model, and every streamed
token pays for it in the next step (``benchmarks/RESULTS.md``, issue 25). In a child process
they run on the other core and the engine thread keeps the GIL to itself.

What stays here: the model, the Engine and its thread, the KV pool (so this pid's memory is the
KV memory), the memory broker's lease, the metrics. What goes to the child
(``front_process``): uvicorn and the app on the listening socket, the tokenizer, and each
request's wait for its events; none of its modules imports torch (transformers may, for the
tokenizer: 5.17 does). Between them: one Unix socket pair (``link_wire``); this process
answers the child's calls on a thread of its own (``EngineHost``) and sends each engine step's
events in one frame. Sending never blocks the engine thread: what the socket cannot take at
once waits, in order, for a sender thread, so a front that stops reading (stopped, its loop
stuck) does not stop the steps that finish requests and give KV memory back.

Lifetime:

* The child starts once the Engine is built; its "listening on" line says the server is up.
* SIGTERM or SIGINT to this process is passed to the child, which drains as a one-process server
  would: it refuses new requests, lets those in flight run for ``--drain-seconds`` (the engine
  thread aborts the rest), writes their answers, says goodbye and exits 0. This process then
  stops the engine thread and closes the Engine (its KV memory goes back) and exits 0. A second
  signal reaches the child too, which stops at once.
* The child exits without its goodbye (killed, crashed): the Engine is closed all the same and
  this process exits 1 with one line naming the child's status.
* This process dies: the kernel kills the child (``PR_SET_PDEATHSIG``), closing the socket.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .app import ServerState
from .engine_thread import ChoiceEvent, EngineService, Submission
from .errors import APIError
from .link_wire import encode, read_frame
from .settings import ServeSettings

_log = logging.getLogger(__name__)

__all__ = ["EngineHost", "serve_with_front_process"]

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the directory holding torch_elastic_kv
_LINK_JOIN_SECONDS = 5.0  # after the child exits, how long its last frames may take to be read
MAX_QUEUED_BYTES = 64 << 20  # events a front may leave unread before it is taken for hung


class EngineHost:
    """Serves the front process's frames into ``service`` (on the thread running ``serve``) and
    sends it the events of its submissions (on the engine thread)."""

    def __init__(self, service: EngineService, sock: socket.socket, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.service = service
        self._sock = sock
        self._subs_lock = threading.Lock()
        self._subs: dict[int, Submission] = {}  # the front's id -> submissions not yet done
        self.said_bye = False
        # Frames the socket would not take at once, oldest first, for the sender thread. While
        # any wait there, later frames queue behind them (the stream keeps their order).
        self._out_cv = threading.Condition(threading.Lock())
        self._outbox: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        self._sending = False  # the sender thread holds a frame it is writing
        self._link_down = False  # set by ``_drop_link``: frames are dropped from then on
        self._sender = threading.Thread(target=self._send_queued, name="ekv-front-send", daemon=True)
        self._sender.start()

    def send(self, message: Any) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        """Write ``frame`` to the front without ever blocking the caller (the engine thread:
        a front that stops reading, stopped or stuck, must not stop the steps that finish
        requests and give KV memory back). What the socket does not take now goes, in order,
        through the sender thread. A front that leaves more than ``max_queued_bytes`` unread
        is taken for hung: the link is shut, so it answers what waits with 503 and stops, and
        the server exits 1 (rather than hold the events in memory without end)."""
        with self._out_cv:
            if self._link_down:
                return
            if not self._outbox and not self._sending:
                try:
                    sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:  # the front is gone: ``serve`` reads the end of the stream
                    self._drop_link()
                    return
                if sent == len(frame):
                    return
                frame = frame[sent:]
            if self._queued_bytes + len(frame) > self._max_queued_bytes:
                _log.error(
                    "torch_elastic_kv serve: the HTTP front has left %d bytes of events unread; taking it for hung "
                    "and shutting the link",
                    self._queued_bytes + len(frame),
                )
                self._drop_link()
                return
            self._outbox.append(frame)
            self._queued_bytes += len(frame)
            self._out_cv.notify()

    def _drop_link(self) -> None:
        """The one way the link goes down (``_out_cv`` held): drop what is queued, stop the
        sender and shut the socket, so a write in progress ends with an error and the front
        reads the end of the stream."""
        self._link_down = True
        self._outbox.clear()
        self._queued_bytes = 0
        self._out_cv.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already

    def _send_queued(self) -> None:
        while True:
            with self._out_cv:
                self._sending = False
                while not self._outbox and not self._link_down:
                    self._out_cv.wait()
                if self._link_down:
                    self._outbox.clear()
                    self._queued_bytes = 0
                    self._out_cv.notify_all()
                    return
                frame = self._outbox.popleft()
                self._queued_bytes -= len(frame)
                self._sending = True
            try:
                self._sock.sendall(frame)
            except Exception as exc:  # the front is gone (OSError) or worse: nothing more can go
                if not isinstance(exc, OSError):
                    _log.error("torch_elastic_kv serve: writing to the HTTP front failed", exc_info=exc)
                with self._out_cv:
                    self._drop_link()

    def close(self, timeout: float) -> None:
        """Stop sending: give the queued frames up to ``timeout`` seconds in all to go, then drop
        the rest (the front is gone or no longer reads) and end the sender thread."""
        deadline = time.monotonic() + timeout
        with self._out_cv:
            while (self._outbox or self._sending) and not self._link_down and time.monotonic() < deadline:
                self._out_cv.wait(0.05)
            self._drop_link()  # also wakes a write the front never reads
        self._sender.join(max(0.0, deadline - time.monotonic()) + 0.5)

    def deliver(self, items: list[tuple[Submission, list[ChoiceEvent]]]) -> None:
        """``EventSink``: a round's events to the front, in one frame."""
        with self._subs_lock:
            for sub, events in items:
                sub.finished += sum(1 for e in events if e.finish_reason is not None or e.error is not None)
                if sub.done:
                    self._subs.pop(sub.tag, None)
        self.send(("events", [(sub.tag, events) for sub, events in items]))

    def serve(self) -> None:
        """Answer the front's frames until its goodbye or the end of the stream. Ending any
        other way, it shuts the socket: the front then answers what waits with 503 and stops,
        rather than waiting for replies that would never come."""
        try:
            while True:
                try:
                    message = read_frame(self._sock)
                except Exception as exc:  # a torn or unreadable frame: nothing after it can be trusted
                    _log.error(
                        "torch_elastic_kv serve: the link to the HTTP front broke: %s: %s", type(exc).__name__, exc
                    )
                    return
                if message is None:
                    return
                if message[0] == "bye":
                    self.said_bye = True
                    return
                try:
                    self._handle(message)
                except Exception:
                    _log.exception("a frame from the HTTP front failed: %r", message[0])
        finally:
            if not self.said_bye:
                with self._out_cv:
                    self._drop_link()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "cancel":
            with self._subs_lock:
                sub = self._subs.pop(message[1], None)
            if sub is not None:
                self.service.cancel(sub)
            return
        if kind == "drain":
            self.service.begin_drain(message[1])
            return
        _, cid, payload = message
        if kind == "command":
            fut = self.service.call(*payload)
            fut.add_done_callback(lambda f: self._reply(cid, f.exception(), None if f.exception() else f.result()))
            return
        try:
            value = self._answer(kind, cid, payload)
        except Exception as exc:
            self._reply(cid, exc, None)
        else:
            self._reply(cid, None, value)

    def _answer(self, kind: str, cid: int, payload: Any) -> Any:
        if kind == "submit":
            specs, prompt_tokens = payload
            sub = self.service.submit(specs, self, tag=cid)
            with self._subs_lock:
                if not sub.done:  # its events may all have gone out already
                    self._subs[cid] = sub
            self.service.metrics.prompt_tokens.inc(prompt_tokens)
            return None
        if kind == "stats":
            return self.service.stats()
        if kind == "metrics":
            return self.service.metrics.render()
        if kind == "room":
            return self.service.room(payload)
        if kind == "refusal":
            return self.service.refusal(*payload)
        raise ValueError(f"unknown frame kind {kind!r}")

    def _reply(self, cid: int, exc: Optional[BaseException], value: Any) -> None:
        """Answer call ``cid``, always: a call the front awaits must not wait forever."""
        if exc is None:
            try:
                self.send_frame(encode(("reply", cid, True, value)))
                return
            except Exception as encode_exc:  # a value that cannot be pickled: the call fails instead
                exc = encode_exc
        if not isinstance(exc, APIError):  # what the app's own handler answers for it in one process
            _log.error("a call from the HTTP front failed", exc_info=exc)
            exc = APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        self.send(("reply", cid, False, exc))


def _front_init(settings: ServeSettings, state: ServerState) -> Optional[bytes]:
    """The first frame the front reads: the settings and the routes' state (its tokenizer
    included); None when that cannot be pickled (a tokenizer of the model's own code)."""
    try:
        return encode(
            {
                "settings": settings,
                "state": dataclasses.replace(state, service=None),
                "vocab_size": state.service.vocab_size,
            }
        )
    except Exception as exc:
        _log.warning(
            "torch_elastic_kv serve: the tokenizer cannot go to a front process (%s: %s); serving HTTP from "
            "this process (--front thread)",
            type(exc).__name__,
            exc,
        )
        return None


def serve_with_front_process(settings: ServeSettings, state: ServerState, sock: socket.socket) -> Optional[int]:
    """Serve ``state`` (its service an ``EngineService``) with the HTTP front in a child process
    on ``sock`` (bound, not listening) until the child exits; returns the exit status, or None
    when the front cannot run in a child (the caller serves from this process)."""
    service = state.service
    assert isinstance(service, EngineService)
    init = _front_init(settings, state)
    if init is None:
        return None
    sock.listen(2048)
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-m", "torch_elastic_kv.serve.front_process"]
    command += [str(theirs.fileno()), str(sock.fileno()), str(os.getpid())]
    # the child imports this very package, wherever it was imported from here
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT, *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.Popen(command, pass_fds=(theirs.fileno(), sock.fileno()), stdin=subprocess.DEVNULL, env=env)
    except OSError as exc:  # out of processes or memory: this process can still serve
        _log.warning("torch_elastic_kv serve: cannot start the HTTP front process (%s); --front thread", exc)
        ours.close()
        theirs.close()
        return None
    theirs.close()
    sock.close()  # the child's now: when its shutdown closes it, new connections are refused
    _log.info("torch_elastic_kv serve: HTTP front in process %d (--front process)", proc.pid)
    forwarded: list[int] = []

    def forward(sig: int, frame: Any) -> None:
        forwarded.append(sig)
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    host = EngineHost(service, ours)
    link = threading.Thread(target=host.serve, name="ekv-front-link", daemon=True)
    try:
        host.send_frame(init)
        service.start()
        link.start()
        status = proc.wait()
        link.join(_LINK_JOIN_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        host.close(_LINK_JOIN_SECONDS)
        ours.close()
        service.stop()
    if status == 0 and (host.said_bye or forwarded):
        return 0  # a second signal stops the front at once, before its goodbye
    if forwarded and status in (-signal.SIGTERM, -signal.SIGINT):
        return 0  # stopped before its own handlers were in: it had served nothing yet
    _log.error("torch_elastic_kv serve: the HTTP front (process %d) exited with status %d", proc.pid, status)
    return 1
