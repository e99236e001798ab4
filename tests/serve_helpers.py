"""Aids for the server tests: a real server in a subprocess (``testing.processes``), its
metrics, its /proc figures, and a bounded wait."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from torch_elastic_kv.testing.proc import cpu_seconds as proc_cpu_seconds
from torch_elastic_kv.testing.proc import descendants
from torch_elastic_kv.testing.processes import ServerProcess

__all__ = ["ServerProcess", "cpu_seconds", "metrics", "rss_shmem", "server_pids", "wait_until"]


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


def server_pids(pid: int) -> list[int]:
    """A server's processes: ``pid`` and those it started (its HTTP front, with ``--front process``)."""
    return [pid, *descendants(pid)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` and the processes it started (all their threads), seconds."""
    total = 0.0
    for p in server_pids(pid):
        try:
            total += proc_cpu_seconds(p)
        except OSError:
            continue  # exited meanwhile
    return total
