"""Thread safety: 4 threads mapping and unmapping disjoint ranges of one arena."""

from __future__ import annotations

import random
import threading

import torch_elastic_kv as ekv
from torch_elastic_kv import Arena

MiB = 1 << 20
THREADS = 4
ITERATIONS = 1500  # per thread; each maps and unmaps 1-3 granules


def test_four_threads_disjoint_ranges_keep_stats_consistent(arena_device: str) -> None:
    per_thread = 8  # granules each thread owns
    with Arena(THREADS * per_thread * 2 * MiB, device=arena_device, reuse_bytes=16 * MiB) as a:
        g = a.granularity
        assert a.capacity >= THREADS * per_thread * g
        errors: list[BaseException] = []
        still_mapped: list[int] = [0] * THREADS
        map_calls: list[int] = [0] * THREADS

        def worker(t: int) -> None:
            rng = random.Random(t)
            base = t * per_thread * g
            mapped: set[int] = set()  # granule indices within this thread's range
            try:
                for i in range(ITERATIONS):
                    n = rng.randint(1, 3)
                    start = rng.randrange(0, per_thread - n + 1)
                    span = set(range(start, start + n))
                    if span & mapped:
                        if span <= mapped:
                            a.unmap(base + start * g, n * g)
                            mapped -= span
                    else:
                        a.map(base + start * g, n * g)
                        map_calls[t] += n
                        mapped |= span
                    if i % 100 == 0:
                        a.trim() if t % 2 else a.poll()
                        a.stats()
                still_mapped[t] = len(mapped)
                for k in mapped:
                    assert a.is_mapped(base + k * g, g)
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        a.trim(wait=True)
        s = a.stats()
        total = sum(still_mapped)
        assert s["mapped_bytes"] == total * g
        assert s["maps"] == sum(map_calls) > ITERATIONS
        assert s["maps"] - s["unmaps"] == total
        assert s["pending_bytes"] == 0 and s["cached_bytes"] == 0
        assert (s["creates"] - s["releases"]) * g == s["held_bytes"] == total * g
        d = ekv.memory_stats(arena_device)
        assert (d["mapped_bytes"], d["held_bytes"], d["cached_bytes"]) == (total * g, total * g, 0)
    assert ekv.memory_stats(arena_device)["held_bytes"] == 0


def test_threads_with_fake_driver_leave_no_driver_objects(fake_cuda) -> None:
    with Arena(16 * MiB, device="cuda", reuse_bytes=2 * MiB) as a:
        g = a.granularity

        def worker(t: int) -> None:
            for _ in range(300):
                a.map(t * 2 * g, 2 * g)
                a.unmap(t * 2 * g, 2 * g)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        a.trim(wait=True)
        assert fake_cuda.live_handles() == 0 and fake_cuda.live_mappings() == 0
        assert fake_cuda.live_events() == 0
    assert fake_cuda.counts()["reservations"] == 0
