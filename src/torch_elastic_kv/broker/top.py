"""``python -m torch_elastic_kv top``: the broker's view of its device and tenants.

A tenant with nothing running or waiting keeps its lease until the broker needs it for someone
else (then it is reclaimed first): such a lease is shown as "lent, idle", and the header gives
free memory both without and with the idle part of leases (``idle_bytes``, the lease above what
the tenant wants now), so "free 0" beside idle tenants reads as what it is.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .daemon import default_socket_path
from .protocol import BROKER_MESSAGES, MAX_MESSAGE_BYTES, decode, encode, message

__all__ = ["format_table", "query_status", "top_main"]


def query_status(socket_path: str | Path, timeout: float = 5.0) -> dict[str, Any]:
    """One ``status`` round trip: the broker's budget, free bytes and tenants."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(encode(message("status")))
        buf = b""
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the broker closed the connection")
            buf += data
            if len(buf) > MAX_MESSAGE_BYTES + 1:
                raise ConnectionError("the broker's reply is too long")
    reply = decode(buf.split(b"\n", 1)[0] + b"\n", BROKER_MESSAGES)
    if reply["type"] != "status":
        raise ConnectionError(f"the broker answered {reply['type']!r}: {reply.get('message', '')}")
    return {k: reply[k] for k in ("device", "budget_bytes", "free_bytes", "tenants")}


def free_with_idle(status: dict[str, Any]) -> int:
    """Free bytes plus what connected tenants hold idle (lease above their want)."""
    idle = sum(t.get("idle_bytes", 0) for t in status["tenants"] if t["connected"])
    return status["free_bytes"] + idle


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(status: dict[str, Any]) -> str:
    """The status as a text table (MiB): KV tenants and borrowers alike, ``kind`` telling them
    apart (``want``: what the tenant would hold now; a borrower's whole request; ``cached``:
    of resident, the prefix pages it keeps that no request holds, given up first)."""
    lines = [
        f"device {status['device']}   budget {_mib(status['budget_bytes'])} MiB   "
        f"free {_mib(status['free_bytes'])} MiB   free incl. idle {_mib(free_with_idle(status))} MiB   "
        f"tenants {len(status['tenants'])}",
        "",
    ]
    cols = ("name", "kind", "pid", "prio", "guarantee", "lease", "want", "idle", "resident", "live", "cached")
    cols += ("demand",)
    cols += ("run", "wait", "state")
    rows = [cols]
    for t in status["tenants"]:
        state = "connected" if t["connected"] else "disconnected"
        kind = t.get("kind", "kv")  # a broker from before borrowers lists KV tenants only
        if kind == "kv" and t["connected"] and t["lease_bytes"] > 0 and t["running"] == 0 and t["waiting"] == 0:
            state = "lent, idle"
        if t["reclaiming_to"] is not None:
            state += f", releasing to {_mib(t['reclaiming_to'])}"
        if kind == "borrow":
            state += ", granted" if t["lease_bytes"] >= t["want_bytes"] else ", waiting for its grant"
        rows.append(
            (
                t["name"],
                kind,
                str(t["pid"]),
                str(t["priority"]),
                _mib(t["guarantee_bytes"]),
                _mib(t["lease_bytes"]),
                _mib(t.get("want_bytes")),
                _mib(t.get("idle_bytes")),
                _mib(t["resident_bytes"]),
                _mib(t["live_bytes"]),
                _mib(t.get("cached_bytes", 0)),
                _mib(t["demand_bytes"]),
                str(t["running"]),
                str(t["waiting"]),
                state,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines += [
        "  ".join(c.ljust(w) if i in (0, 1, len(cols) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(lines)


def top_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m torch_elastic_kv top``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m torch_elastic_kv top", description=__doc__)
    p.add_argument("--socket", default=None, help="the broker's socket (default: the device's default path)")
    p.add_argument("--device", default="cpu", help="device whose default socket to use when --socket is absent")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default: until Ctrl-C)")
    args = p.parse_args(argv)
    if not args.interval > 0:
        p.error(f"--interval must be > 0, got {args.interval}")
    path = Path(args.socket) if args.socket else default_socket_path(args.device)
    shown = 0
    try:
        while True:
            try:
                status = query_status(path)
            except (OSError, ValueError) as e:
                print(f"torch_elastic_kv top: no broker at {path}: {e}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(status))
                return 0
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(format_table(status), flush=True)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
