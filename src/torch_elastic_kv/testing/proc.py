"""Byte counts from the OS: what tests assert memory moves against, and what benchmarks sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = [
    "cpu_seconds",
    "descendants",
    "machine_shmem",
    "parse_proc_status",
    "rss_shmem",
    "tree_memory",
    "vm_rss",
]


def _proc_bytes(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} line in {path}")


def rss_shmem() -> int:
    """Resident shared memory of this process (RssShmem in /proc/self/status), in bytes.

    The host backend's granules are memfd pages, so they count here while mapped and touched,
    and leave when they are given back."""
    return _proc_bytes("/proc/self/status", "RssShmem")


def machine_shmem() -> int:
    """Shared memory of the whole machine (Shmem in /proc/meminfo), in bytes."""
    return _proc_bytes("/proc/meminfo", "Shmem")


def vm_rss() -> int:
    """Resident memory of this process (VmRSS in /proc/self/status), in bytes."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def parse_proc_status(text: str) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem and RssFile of a ``/proc/PID/status`` text, in bytes (absent: 0)."""
    keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    out = dict.fromkeys(keys, 0)
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in out:
            value, _, unit = rest.strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"/proc status line {line!r}: expected a size in kB")
            out[name] = int(value) * 1024
    return out


def cpu_seconds(pid: int, tid: Optional[int] = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of its thread ``tid``;
    OSError once it has ended."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    # after the ")" that ends comm: state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (from /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def tree_memory(pid: int) -> Optional[dict[str, int]]:
    """:func:`parse_proc_status` of ``pid`` plus its descendants, summed (None when ``pid`` is gone)."""
    total: Optional[dict[str, int]] = None
    for p in [pid, *descendants(pid)]:
        try:
            status = parse_proc_status(Path(f"/proc/{p}/status").read_text())
        except OSError:
            if p == pid:
                return None
            continue
        total = status if total is None else {k: total[k] + status[k] for k in total}
    return total
