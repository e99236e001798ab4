"""A broker daemon in a subprocess and a raw protocol client, for the broker tests."""

from __future__ import annotations

import json
import os
import resource
import socket
from pathlib import Path
from typing import Any, Optional

from torch_elastic_kv.broker.protocol import encode, message
from torch_elastic_kv.testing import processes

MiB = 1 << 20


class BrokerProcess(processes.BrokerProcess):
    """The broker subprocess, with its status read over the protocol, and its descriptors and
    memory read from /proc. ``limits``: ``{resource.RLIMIT_*: (soft, hard)}`` set in the child
    before it runs the broker."""

    def __init__(
        self,
        socket_path: Path,
        budget: str | int,
        *extra: str,
        limits: Optional[dict[int, tuple[int, int]]] = None,
        start_timeout: float = 30.0,
    ) -> None:
        def apply_limits() -> None:
            for res, value in (limits or {}).items():
                resource.setrlimit(res, value)

        super().__init__(
            socket_path, budget, *extra, start_timeout=start_timeout, preexec_fn=apply_limits if limits else None
        )

    def fd_count(self) -> int:
        """Open file descriptors of the broker process."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memory(self, field: str = "VmRSS") -> int:
        """A byte figure of /proc/PID/status: VmRSS (resident now) or VmHWM (peak resident)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def status(self) -> dict[str, Any]:
        with RawClient(self.socket_path) as c:
            c.send(message("status"))
            return c.recv()

    def tenant(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.status()["tenants"] if t["name"] == name), None)


class RawClient:
    """A blocking line-JSON client (what a tenant library does, by hand)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def closed_by_peer(self) -> bool:
        """True once the broker has closed this connection (EOF after any pending lines)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True

    def register(self, name: str, *, priority: int = 0, guarantee: int = 0, pid: int | None = None, **kw: int):
        self.send(
            message(
                "register",
                name=name,
                pid=os.getpid() if pid is None else pid,
                priority=priority,
                guarantee_bytes=guarantee,
                chunk_bytes=kw.pop("chunk_bytes", 2 * MiB),
                max_bytes=kw.pop("max_bytes", 1 << 30),
                **kw,
            )
        )
        return self.recv()
