"""Eight threads on one allocator through its C ABI (ekv_malloc/ekv_free via ctypes), on the host
backend and on the fake CUDA driver.

Each thread mallocs and frees mixed sizes (both sides of the small/large split and of a
granule), fills every block with its own byte and checks every byte before the free. A quarter
of the frees are handed to whichever thread comes next, as torch frees a tensor on another
thread than the one that made it (on the block's stream). One thread trims and another reads
the stats meanwhile. On the fake driver threads share streams two by two and device work
finishes at arbitrary points, so per-stream reuse, pending frees and their events all race.
ctypes drops the GIL around each call, so the allocator's lock is what keeps the threads apart.
"""

from __future__ import annotations

import queue
import random
import threading

import pytest

from allocator_helpers import Abi, MiB, view
from torch_elastic_kv.memory import allocator as ekv_alloc
from torch_elastic_kv.testing import use_fake_cuda

THREADS = 8
OPS = 1000  # per thread
MAX_HELD = 12  # blocks a thread holds at most


@pytest.fixture(params=["cpu", "cuda"])
def setup(request):
    if request.param == "cpu":
        ekv_alloc.close(-1)
        yield Abi(-1), None
        ekv_alloc.close(-1)
        return
    with use_fake_cuda() as fake:
        ekv_alloc.close(0)
        yield Abi(0), fake
        fake.set_events_complete(True)
        fake.complete_events()
        ekv_alloc.close(0)
        assert fake.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


def size_for(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 16 * 1024)
    if r < 0.9:
        return rng.randint(16 * 1024, 2 * MiB + 1)
    return rng.randint(2 * MiB, 3 * MiB)


def test_eight_threads_malloc_free_with_every_byte_checked(setup):
    abi, fake = setup
    dev = abi.device
    before = ekv_alloc.stats(dev)
    gran = before["granularity"]
    if fake is not None:
        fake.set_events_complete(False)
    stream_of = (lambda t: 0) if fake is None else (lambda t: 0x10000 * (t // 2 + 1))
    if fake is not None:
        for t in range(0, 8, 2):
            fake.create_stream(stream_of(t))
    errors: list[str] = []
    live: dict[int, int] = {}  # address -> size, of blocks handed out and not yet freed
    live_mu = threading.Lock()
    handoff: queue.SimpleQueue = queue.SimpleQueue()
    mallocs = [0] * THREADS

    def release(who: int, p: int, n: int, mark: int, stream: int) -> None:
        if not (view(p, n) == mark).all():
            errors.append(f"thread {who}: the {n}-byte block at {p:#x} was overwritten")
        with live_mu:
            del live[p]
        abi.free(p, n, stream)

    def worker(t: int) -> None:
        rng, stream, held = random.Random(100 + t), stream_of(t), []
        try:
            for i in range(OPS):
                if fake is not None and i % 40 == t:
                    fake.complete_events()
                if t == 0 and i % 50 == 25:
                    ekv_alloc.trim(dev)
                if t == 1 and i % 25 == 0:
                    s = ekv_alloc.stats(dev)  # one consistent snapshot, taken under the allocator's lock
                    if not (
                        s["mapped_bytes"] % gran == 0
                        and s["mapped_bytes"] >= s["allocated_bytes"] >= s["requested_bytes"]
                    ):
                        errors.append(f"inconsistent stats mid-run: {s}")
                if held and (len(held) >= MAX_HELD or rng.random() < 0.45):
                    p, n, mark, s_ = held.pop(rng.randrange(len(held)))
                    if rng.random() < 0.25:
                        handoff.put((p, n, mark, s_))
                    else:
                        release(t, p, n, mark, s_)
                else:
                    n = size_for(rng)
                    p = abi.malloc(n, stream)
                    if not p:
                        errors.append(f"thread {t}: malloc({n}) failed: {ekv_alloc.last_error()}")
                        continue
                    mallocs[t] += 1
                    with live_mu:
                        clash = p in live
                        live[p] = n
                    if clash:
                        errors.append(f"thread {t}: {p:#x} handed out while still live")
                    mark = (t * 37 + i) % 251 + 1
                    view(p, n)[:] = mark
                    held.append((p, n, mark, stream))
                try:
                    release(t, *handoff.get_nowait())
                except queue.Empty:
                    pass
        except BaseException as e:  # surfaced in the main thread
            errors.append(f"thread {t}: {e!r}")
        finally:
            for p, n, mark, s_ in held:
                release(t, p, n, mark, s_)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    while True:
        try:
            release(-1, *handoff.get_nowait())
        except queue.Empty:
            break
    assert not errors, errors[:5]
    assert live == {}
    s = ekv_alloc.stats(dev)
    assert (s["live_blocks"], s["allocated_bytes"], s["requested_bytes"], s["paused_bytes"]) == (0, 0, 0, 0)
    assert s["mallocs"] - before["mallocs"] == s["frees"] - before["frees"] == sum(mallocs) > THREADS * OPS // 2
    for key in ("failed_mallocs", "failed_frees", "free_event_failures", "leaked_events"):
        assert s[key] == before[key], key
    assert s["cached_bytes"] == s["mapped_bytes"] > 0 and s["peak_mapped_bytes"] >= s["mapped_bytes"]
    assert s["maps"] - s["unmaps"] == s["mapped_bytes"] // gran
    if fake is not None:
        fake.set_events_complete(True)
        fake.complete_events()
    ekv_alloc.trim(dev)
    s = ekv_alloc.stats(dev)
    assert (s["mapped_bytes"], s["cached_bytes"], s["pending_free_bytes"], s["segments"]) == (0, 0, 0, 0)
    if fake is not None:
        assert (fake.live_handles(), fake.live_mappings(), fake.live_events()) == (0, 0, 0)
