"""Byte counts from the OS: what tests assert memory moves against."""

from __future__ import annotations

__all__ = ["rss_shmem", "machine_shmem", "vm_rss"]


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
