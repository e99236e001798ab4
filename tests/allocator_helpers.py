"""Helpers shared by the allocator tests: the C ABI through ctypes, byte patterns, RssShmem."""

from __future__ import annotations

import ctypes
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from torch_elastic_kv import _C
from torch_elastic_kv.memory import allocator as ekv_alloc
from torch_elastic_kv.testing import rss_shmem  # noqa: F401  (re-exported for the allocator tests)

MiB = 1 << 20

# 1 byte .. 64 MiB: both sides of the 512-byte block size, the small/large split at 1 MiB and
# the 2 MiB granule, plus odd sizes.
EDGE_SIZES = [
    1,
    7,
    100,
    511,
    512,
    513,
    4096,
    65537,
    MiB - 1,
    MiB,
    MiB + 1,
    2 * MiB - 3,
    2 * MiB,
    2 * MiB + 1,
    3 * MiB + 5,
    17 * MiB,
    64 * MiB,
]


def mixed_sizes(n: int, seed: int) -> list[int]:
    """EDGE_SIZES plus n random sizes, mostly small (as tensors are)."""
    rng = random.Random(seed)
    out = list(EDGE_SIZES)
    for _ in range(n):
        r = rng.random()
        if r < 0.7:
            out.append(rng.randint(1, 64 * 1024))
        elif r < 0.95:
            out.append(rng.randint(64 * 1024, 2 * MiB))
        else:
            out.append(rng.randint(2 * MiB, 12 * MiB))
    rng.shuffle(out)
    return out


def view(ptr: int, size: int) -> np.ndarray:
    """A writable numpy view of size bytes at ptr (host-accessible memory only)."""
    return np.frombuffer((ctypes.c_ubyte * size).from_address(ptr), dtype=np.uint8)


def fill(ptr: int, size: int, seed: int) -> None:
    view(ptr, size)[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def check(ptr: int, size: int, seed: int) -> bool:
    expect = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return bool(np.array_equal(view(ptr, size), expect))


@contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Tag this thread's allocations (what mem_pool does around torch's calls)."""
    prev = _C.allocator_set_thread_tag(tag)
    try:
        yield
    finally:
        _C.allocator_set_thread_tag(prev)


class Abi:
    """ekv_malloc/ekv_free on one device, through ctypes."""

    def __init__(self, device: int) -> None:
        self.lib = ekv_alloc.c_abi()
        self.device = device

    def malloc(self, size: int, stream: int = 0) -> int:
        return self.lib.ekv_malloc(size, self.device, stream) or 0

    def free(self, ptr: int, size: int, stream: int = 0) -> None:
        self.lib.ekv_free(ptr, size, self.device, stream)


def assert_disjoint_and_aligned(blocks: list[tuple[int, int]], align: int = 512) -> None:
    spans = sorted(blocks)
    for (p, n), (q, _) in zip(spans, spans[1:]):
        assert p + n <= q, f"blocks overlap: [{p:#x}, +{n}) and {q:#x}"
    for p, _ in spans:
        assert p != 0 and p % align == 0, f"block {p:#x} is not {align}-byte aligned"


def stable_counts(s: dict) -> dict:
    """Stats that a rejected call must leave exactly as they were."""
    keep = (
        "mapped_bytes",
        "allocated_bytes",
        "requested_bytes",
        "cached_bytes",
        "paused_bytes",
        "mallocs",
        "frees",
        "maps",
        "unmaps",
        "live_blocks",
        "segments",
    )
    return {k: s[k] for k in keep}


def four_thread_stress(
    abi: Abi,
    ops: int,
    max_held: int,
    tag_prefix: str,
    stream_of: Callable[[int], int] = lambda t: 0,
    tick: Callable[[int], None] | None = None,
) -> list[str]:
    """Four threads malloc/free mixed sizes through the C ABI (thread t on stream_of(t), tags
    alternating between two), marking each block's first and last byte and checking the marks
    at free; every thread frees what it holds at the end. ``tick(i)`` runs before op i.
    Returns the errors seen (empty when nothing was overwritten and no malloc failed)."""
    errors: list[str] = []

    def worker(t: int) -> None:
        rng, stream, held = random.Random(t), stream_of(t), []
        with tagged(f"{tag_prefix}{t % 2}"):
            for i in range(ops):
                if tick is not None:
                    tick(i)
                if held and (len(held) > max_held or rng.random() < 0.45):
                    p, n, mark = held.pop(rng.randrange(len(held)))
                    v = view(p, n)
                    if v[0] != mark or v[-1] != mark:
                        errors.append(f"thread {t}: block {p:#x} was overwritten")
                    abi.free(p, n, stream)
                else:
                    n = rng.choice([rng.randint(1, 4096), rng.randint(4096, 600_000), rng.randint(MiB, 5 * MiB)])
                    p = abi.malloc(n, stream)
                    if not p:
                        errors.append(f"thread {t}: malloc({n}) failed: {ekv_alloc.last_error()}")
                        continue
                    mark = rng.randint(1, 255)
                    v = view(p, n)
                    v[0] = v[-1] = mark
                    held.append((p, n, mark))
            for p, n, _ in held:
                abi.free(p, n, stream)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors
