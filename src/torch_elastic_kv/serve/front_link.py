"""The HTTP front process's side of the link: the engine, as the routes see it (``app.Service``).

Each call is a frame to the engine process (``link_wire``) and an awaited reply; each engine
step's events come back in one frame and go straight onto the submissions' queues, on this
process's event loop. Nothing here steps, holds KV memory or takes the engine's GIL.

When the link breaks (the engine process is gone), every request in flight ends with a 503
error event, later ones get a 503, and this process shuts down: it has nothing left to serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
from collections.abc import Sequence
from typing import Any, Optional

from .engine_thread import DOWN_CODE, ChoiceEvent, ChoiceSpec, Submission
from .errors import APIError
from .link_wire import HEADER_BYTES, encode, frame_length

_log = logging.getLogger(__name__)

__all__ = ["EngineLink"]

_GONE = "the engine process is gone"
_ROOMS_KEPT = 1 << 16  # prompt lengths whose KV room is remembered (a long-context model has more)


class EngineLink:
    """The engine process over ``sock`` (this end of the socket pair). ``vocab_size``: the
    model's, sent once at start."""

    def __init__(self, sock: socket.socket, vocab_size: int) -> None:
        self._sock = sock
        self._vocab_size = vocab_size
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None  # held: the loop keeps only a weak reference to a task
        self._calls: dict[int, asyncio.Future] = {}
        self._subs: dict[int, tuple[Submission, set[int]]] = {}  # cid -> (its submission, choices ended)
        self._next_id = 0
        # Engine.max_new_tokens_for is fixed for the Engine's life (its budget's ceiling, its page
        # size and positions never change): one call per prompt length, not one per request
        self._rooms: dict[int, int] = {}
        self._down: Optional[str] = None
        self._draining = False
        self._closing = False

    # ------------------------------------------------------------------ state ----------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def down(self) -> Optional[str]:
        """Why no request can be served any more (the link broke), or None."""
        return self._down

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ lifetime -------------
    async def open(self) -> None:
        """Start reading the engine's frames (the app's lifespan, on the server's loop)."""
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._task = asyncio.create_task(self._read(), name="ekv-engine-link")

    async def close(self) -> None:
        """Every response is written: tell the engine process, which then closes the Engine."""
        self._closing = True
        if self._writer is None or self._down is not None:
            return
        try:
            self._writer.write(encode(("bye",)))
            await self._writer.drain()
            self._writer.close()
        except (ConnectionError, OSError) as exc:
            _log.debug("the link closed before the goodbye: %s", exc)

    def begin_drain(self, seconds: float) -> None:
        """Shutdown began: the engine refuses new requests and aborts what runs after ``seconds``."""
        self._draining = True
        self._send(("drain", seconds))

    # ------------------------------------------------------------------ calls ----------------
    async def submit_request(self, specs: Sequence[ChoiceSpec], prompt_tokens: int) -> Submission:
        cid = self._new_id()
        sub = Submission(None, len(specs), cid)
        self._subs[cid] = (sub, set())  # before the frame: its first events may come before the reply
        try:
            await self._call("submit", (list(specs), prompt_tokens), cid)
        except APIError:  # refused: nothing was queued
            self._subs.pop(cid, None)
            raise
        except BaseException:
            self._subs.pop(cid, None)
            # cancelled while the engine queued it: it must not run on with nobody reading (the
            # engine handles frames in order, so the cancel comes after the submit)
            self._send(("cancel", cid))
            raise
        return sub

    def cancel(self, sub: Submission) -> None:
        if sub.done or self._subs.pop(sub.tag, None) is None:
            return
        self._send(("cancel", sub.tag))

    async def command(self, name: str, arg: Any = None) -> Any:
        return await self._call("command", (name, arg))

    async def stats_now(self) -> dict[str, Any]:
        return await self._call("stats", None)

    async def metrics_text(self) -> bytes:
        return await self._call("metrics", None)

    async def room_for(self, prompt_tokens: int) -> Optional[int]:
        room = self._rooms.get(prompt_tokens)
        if room is None:
            room = await self._call("room", prompt_tokens)
            if room is not None and len(self._rooms) < _ROOMS_KEPT:
                self._rooms[prompt_tokens] = room
        return room

    async def refusal_for(self, prompt_tokens: int, max_tokens: int, label: str) -> Optional[str]:
        return await self._call("refusal", (prompt_tokens, max_tokens, label))

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _gone_error(self) -> APIError:
        return APIError(503, f"the request could not be served: {self._down}", code=DOWN_CODE)

    async def _call(self, kind: str, payload: Any, cid: Optional[int] = None) -> Any:
        if self._down is not None:
            raise self._gone_error()
        cid = self._new_id() if cid is None else cid
        fut = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        self._send((kind, cid, payload))
        try:
            return await fut
        finally:
            self._calls.pop(cid, None)

    def _send(self, message: tuple) -> None:
        if self._writer is None or self._down is not None:
            return
        self._writer.write(encode(message))

    # ------------------------------------------------------------------ frames in ------------
    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(HEADER_BYTES)
                message = pickle.loads(await self._reader.readexactly(frame_length(header)))
                if message[0] == "events":
                    self._events(message[1])
                elif message[0] == "reply":
                    _, cid, ok, value = message
                    fut = self._calls.get(cid)
                    if fut is not None and not fut.done():
                        if ok:
                            fut.set_result(value)
                        else:
                            fut.set_exception(value)
                else:
                    _log.error("unknown frame from the engine process: %r", message[0])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:
            _log.exception("reading the engine process's frames failed")
        self._lost()

    def _events(self, items: list[tuple[int, list[ChoiceEvent]]]) -> None:
        for cid, events in items:
            entry = self._subs.get(cid)
            if entry is None:
                continue  # cancelled: its client is gone
            sub, ended = entry
            sub.queue.put_nowait(events)
            ended.update(e.index for e in events if e.finish_reason is not None or e.error is not None)
            if len(ended) >= sub.n_choices:
                del self._subs[cid]

    def _lost(self) -> None:
        """The engine process closed the link: answer everything waiting, then shut down."""
        if self._closing:
            return
        self._down = _GONE
        _log.error("torch_elastic_kv serve: %s; answering the requests in flight with 503", _GONE)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(self._gone_error())
        for sub, ended in self._subs.values():
            events = [
                ChoiceEvent(i, "", (), None, _GONE, 503, DOWN_CODE) for i in range(sub.n_choices) if i not in ended
            ]
            sub.queue.put_nowait(events)
        self._subs.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's shutdown: the answers above are written first
