"""The frames between the engine process and its HTTP front process (``--front process``).

One Unix socket pair, created by the engine process; each message is a pickled tuple behind its
length (4 bytes, big-endian). Both ends are this package in processes one parent started, so
pickle is safe here; nothing else can reach the socket.

The front sends (``cid``: its call id; the reply carries it back):

* ``("submit", cid, (specs, prompt_tokens))``: queue a request's choices; ``cid`` also names
  the submission in later events and cancels;
* ``("cancel", cid)``: the client went away;
* ``("command", cid, (name, arg))``: ``EngineService.call`` (budget, sleep, wake, reset);
* ``("stats", cid, None)``, ``("metrics", cid, None)``;
* ``("room", cid, prompt_tokens)``, ``("refusal", cid, (prompt_tokens, max_tokens, label))``;
* ``("drain", seconds)``: shutdown began, new requests are refused;
* ``("bye",)``: every response is written; the front exits next.

The engine process sends ``("reply", cid, ok, value)`` (``value`` the exception when not
``ok``) and ``("events", [(cid, [ChoiceEvent, ...]), ...])``, one frame per engine step.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any, Optional

__all__ = ["HEADER_BYTES", "MAX_FRAME_BYTES", "encode", "frame_length", "read_frame"]

HEADER_BYTES = 4
MAX_FRAME_BYTES = 1 << 30  # a prompt of millions of token ids still fits; a torn stream does not


def encode(message: Any) -> bytes:
    """One frame: the length, then the pickled message."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def frame_length(header: bytes) -> int:
    """The body length a header announces; ValueError for a length no frame has."""
    n = int.from_bytes(header, "big")
    if n > MAX_FRAME_BYTES:
        raise ValueError(f"a link frame of {n} bytes (the stream is torn)")
    return n


def _read_exactly(sock: socket.socket, n: int) -> Optional[bytes]:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Optional[Any]:
    """The next message from a blocking socket; None at end of stream."""
    header = _read_exactly(sock, HEADER_BYTES)
    if header is None:
        return None
    body = _read_exactly(sock, frame_length(header))
    if body is None:
        return None
    return pickle.loads(body)
