"""Host backend: memory given back is measurably gone from the process and the machine."""

from __future__ import annotations

import torch

from torch_elastic_kv import Arena
from torch_elastic_kv.testing import machine_shmem, rss_shmem

MiB = 1 << 20


def test_map_touch_unmap_trim_moves_rssshmem_and_shmem() -> None:
    size = 512 * MiB
    with Arena(size, device="cpu") as arena:
        g = arena.granularity
        rss0, shm0 = rss_shmem(), machine_shmem()
        arena.map(0, size)
        arena.view(torch.uint8, (size,)).fill_(1)  # touch every page
        rss1, shm1 = rss_shmem(), machine_shmem()
        assert rss1 - rss0 >= 500 * MiB, (rss0, rss1)
        # Other processes share the machine: allow them 64 MiB of drift.
        assert shm1 - shm0 >= 448 * MiB, (shm0, shm1)

        arena.unmap(0, size)
        # Unmapped: out of the process at once; the reuse cache still holds its allowance.
        assert rss_shmem() - rss0 <= g
        cached = arena.stats()["cached_bytes"]
        assert cached == arena.stats()["reuse_bytes"] > 0
        released = arena.trim()
        assert released == cached
        rss2, shm2 = rss_shmem(), machine_shmem()
        assert abs(rss2 - rss0) <= g, (rss0, rss2)
        assert shm1 - shm2 >= 448 * MiB, (shm1, shm2)
        s = arena.stats()
        assert s["mapped_bytes"] == s["cached_bytes"] == s["held_bytes"] == 0


def test_view_is_zero_copy_and_survives_remap() -> None:
    with Arena(8 * MiB, device="cpu", reuse_bytes=0) as arena:
        g = arena.granularity
        arena.map(0, 2 * g)
        a = arena.view(torch.float32, (2, g // 4))
        b = arena.view(torch.float32, (g // 4,), offset=g)
        a[1].fill_(2.5)
        assert torch.equal(b, torch.full((g // 4,), 2.5))
        assert a.data_ptr() == arena.base_address
        # Released and re-created granules come back zeroed, at the same address.
        arena.unmap(g, g)
        arena.map(g, g)
        assert b.data_ptr() == arena.base_address + g
        assert int(b.count_nonzero()) == 0


def test_touching_an_unmapped_granule_faults() -> None:
    # The address range stays reserved but has no memory behind it: a read must fault,
    # not return stale data. Run in a child so the fault does not take pytest down.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch_elastic_kv import Arena\n"
        "a = Arena(8 << 20)\n"
        "g = a.granularity\n"
        "a.map(0, g)\n"
        "t = a.view(torch.uint8, (2 * g,))\n"
        "t[:g].fill_(7)\n"
        "a.unmap(0, g)\n"
        "print('before', flush=True)\n"
        "print(int(t[0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "before", proc.stdout + proc.stderr
    assert proc.returncode == -11, (proc.returncode, proc.stderr)  # SIGSEGV
