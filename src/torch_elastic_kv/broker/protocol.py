"""The broker's wire protocol: one JSON object per line over a Unix stream socket.

Every message carries ``"v"`` (the protocol version) and ``"type"``; the fields each type
takes are listed in ``CLIENT_MESSAGES`` (tenant -> broker) and ``BROKER_MESSAGES`` (broker ->
tenant), and nothing else is accepted: an unknown type or field, a missing field, a value of
the wrong type, a negative byte count, an integer of magnitude ``MAX_INT`` or more, a version
that is not the integer 1, or a line longer than ``MAX_MESSAGE_BYTES`` is a ``ProtocolError``. ``docs/BROKER.md`` describes the conversation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BROKER_MESSAGES",
    "CLIENT_MESSAGES",
    "MAX_INT",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "decode",
    "encode",
    "message",
]

PROTOCOL_VERSION = 1
# a status reply lists every tenant; 64 KiB holds a few hundred, and bounds what one peer
# can make the other buffer
MAX_MESSAGE_BYTES = 64 * 1024
# every integer field fits a signed 64-bit word: byte counts, pids and sequence numbers are
# never larger, and the arithmetic the arbiter does on them stays small
MAX_INT = 2**63

# field -> (type, required). Byte counts and counts are non-negative ints; priority may be
# negative (below the default 0).
_Fields = Mapping[str, tuple[type, bool]]

CLIENT_MESSAGES: dict[str, _Fields] = {
    "register": {
        "name": (str, True),
        "pid": (int, True),
        "priority": (int, True),
        "guarantee_bytes": (int, True),
        "chunk_bytes": (int, True),
        "max_bytes": (int, True),
        # holdings of a tenant re-registering with a new broker (0 for a new tenant)
        "lease_bytes": (int, False),
        "resident_bytes": (int, False),
        # "kv" (absent: a KV cache that follows its demand) or "borrow" (wants max_bytes, all
        # or nothing; see arbiter.py)
        "kind": (str, False),
    },
    "report": {
        "demand_bytes": (int, True),
        "resident_bytes": (int, True),
        "live_bytes": (int, True),
        "running": (int, True),
        "waiting": (int, True),
        # of resident_bytes, cached prefix pages no request holds (reclaimable; absent: 0)
        "cached_bytes": (int, False),
    },
    "released": {"seq": (int, True), "lease_bytes": (int, True), "resident_bytes": (int, True)},
    # the tenant is done: with resident_bytes 0 its lease is free at once, else when it exits
    "leave": {"resident_bytes": (int, True)},
    "heartbeat": {},
    "status": {},
}

BROKER_MESSAGES: dict[str, _Fields] = {
    "registered": {"lease_bytes": (int, True), "budget_bytes": (int, True), "heartbeat_seconds": (float, True)},
    "grant": {"seq": (int, True), "lease_bytes": (int, True)},
    "reclaim": {"seq": (int, True), "lease_bytes": (int, True), "deadline_seconds": (float, True)},
    "status": {
        "device": (str, True),
        "budget_bytes": (int, True),
        "free_bytes": (int, True),
        "tenants": (list, True),
    },
    "error": {"code": (str, True), "message": (str, True)},
}

_SIGNED = {"priority"}


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def message(kind: str, /, **fields: Any) -> dict[str, Any]:
    """A message dict of type ``kind`` with the protocol version (``kind`` is positional: a
    ``register`` has a field of that name)."""
    return {"v": PROTOCOL_VERSION, "type": kind, **fields}


def encode(msg: Mapping[str, Any]) -> bytes:
    """One line of JSON; ProtocolError if it would exceed ``MAX_MESSAGE_BYTES``."""
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _type_ok(value: Any, want: Any) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:  # JSON writes 1.0 as 1.0, but accept ints for seconds
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


def decode(line: bytes, allowed: Mapping[str, _Fields]) -> dict[str, Any]:
    """Parse and check one line against the message types in ``allowed``."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "not a JSON object: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int past sys.get_int_max_str_digits()
        raise ProtocolError("bad_json", f"not a JSON object: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"not a JSON object: {type(msg).__name__}")
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true compare equal to 1
        shown = _short(version) if type(version) is int else repr(version)
        raise ProtocolError("bad_version", f"protocol version {shown}; this broker speaks {PROTOCOL_VERSION}")
    kind = msg.get("type")
    if kind not in allowed:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {sorted(allowed)}")
    fields = allowed[kind]
    extra = sorted(set(msg) - set(fields) - {"v", "type"})
    if extra:
        raise ProtocolError("unknown_field", f"{kind}: unknown field(s) {extra}")
    for name, (want, required) in fields.items():
        if name not in msg:
            if required:
                raise ProtocolError("missing_field", f"{kind}: missing field {name!r}")
            continue
        value = msg[name]
        if not _type_ok(value, want):
            raise ProtocolError("bad_value", f"{kind}: {name} must be {want.__name__}, got {value!r}")
        if want is int and not -MAX_INT < value < MAX_INT:
            raise ProtocolError("bad_value", f"{kind}: {name} must be within +-(2**63 - 1), got {_short(value)}")
        if want is int and name not in _SIGNED and value < 0:
            raise ProtocolError("bad_value", f"{kind}: {name} must be >= 0, got {value}")
    if kind == "register" and not (0 < len(msg["name"]) <= 64 and msg["name"].isprintable()):
        raise ProtocolError("bad_value", f"register: name must be 1-64 printable characters, got {msg['name']!r}")
    return msg


def _short(value: int) -> str:
    """An int for an error line: a huge one by its digit count, not its 4,000 digits."""
    text = str(value)
    return text if len(text) <= 24 else f"an integer of {len(text.lstrip('-'))} digits"
