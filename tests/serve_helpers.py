"""Aids for the server tests: a real server in a subprocess, its metrics, its /proc figures.

``ServerProcess`` starts ``python -m torch_elastic_kv serve --port 0 ...`` (a free loopback
port, chosen by the kernel and read back from the "listening on" line), keeps reading its
stderr on a thread (so the pipe never fills) and stops it by its pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

_LISTENING = re.compile(r"torch_elastic_kv serve: listening on (http://\S+)")


class ServerProcess:
    """A server subprocess; ``url`` once it listens, ``lines`` its stderr so far."""

    def __init__(self, args: list[str], env: Optional[dict[str, str]] = None, start_timeout: float = 180.0) -> None:
        full_env = dict(os.environ)
        # the package under test, not whatever an editable install points at
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
        full_env["PYTHONPATH"] = src + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch_elastic_kv", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout) or self.url is None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited before listening

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; killed if it does not exit in ``timeout``. Returns the status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.lines)


def metrics(url: str) -> dict[str, float]:
    """``/metrics`` parsed by prometheus_client: sample name (with labels, if any) -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name
            if s.labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
            out[key] = s.value
    return out


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


def _status_field(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_shmem(pid: int) -> int:
    """RssShmem of process ``pid``, bytes: the host backend's mapped KV granules count here."""
    return _status_field(pid, "RssShmem")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")" that ends comm: state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
