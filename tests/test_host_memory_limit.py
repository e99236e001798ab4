"""The host backend refuses a commit the machine cannot back, before committing anything.

Without the check, fallocate on the memfd goes on past RAM and the kernel's OOM killer ends
the process (rc 137) instead of a MemoryError.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torch_elastic_kv import Arena, host_memory, memory_stats

MiB = 1 << 20


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def test_host_memory_reads_meminfo_and_the_cgroup() -> None:
    m = host_memory()
    assert m["mem_total"] == _meminfo_kib("MemTotal") * 1024
    # MemAvailable moves with everything else on the machine: allow 256 MiB of drift.
    assert abs(m["mem_available"] - _meminfo_kib("MemAvailable") * 1024) < 256 * MiB
    assert m["available"] <= m["mem_available"]
    assert m["margin"] >= 64 * MiB
    if m["cgroup_limit"] is not None:
        assert m["available"] <= max(0, m["cgroup_limit"] - m["cgroup_usage"])
        assert int(Path(m["cgroup_path"]).read_text().split()[0]) == m["cgroup_limit"]


def test_map_beyond_what_the_machine_can_give_raises_memory_error_and_maps_nothing() -> None:
    before = host_memory()
    granule = 2 * MiB
    # More than the machine can give: address space and the sparse memfd cost nothing, the
    # commit is what must be refused.
    size = (before["available"] // granule + 1024) * granule
    held0 = memory_stats("cpu")["held_bytes"]
    with Arena(size, device="cpu") as arena:
        with pytest.raises(MemoryError) as info:
            arena.map(0, size)
        msg = str(info.value)
        assert f"map(offset=0, nbytes={size})" in msg, msg
        assert "MemAvailable" in msg and "nothing was mapped" in msg, msg
        committing = float(re.search(r"committing ([0-9.]+) MiB", msg).group(1))
        assert committing == pytest.approx(size / MiB, abs=0.1)
        s = arena.stats()
        assert s["mapped_bytes"] == s["held_bytes"] == s["creates"] == 0
        assert memory_stats("cpu")["held_bytes"] == held0
        # The arena is unharmed: what fits still maps.
        arena.map(0, granule)
        assert arena.stats()["mapped_bytes"] == granule
