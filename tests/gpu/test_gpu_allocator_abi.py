"""The C ABI scenarios of tests/test_allocator_*.py on a real GPU (device 0, the real driver):
mixed sizes, trim, the limit, bad input, stream order, four threads. Contents are checked
through torch tensors over the returned addresses. Skips without a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MiB = 1 << 20
SIZES = [1, 7, 511, 512, 513, 4096, 65537, MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB + 5, 17 * MiB, 64 * MiB]


class _DeviceMemory:
    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def dview(ptr: int, nbytes: int) -> torch.Tensor:
    return torch.as_tensor(_DeviceMemory(ptr, nbytes), device="cuda")


@pytest.fixture
def env():
    from allocator_helpers import tagged
    from torch_elastic_kv.memory import allocator

    torch.cuda.init()
    lib = allocator.c_abi()
    stream = torch.cuda.current_stream().cuda_stream
    allocator.last_error(clear=True)

    def malloc(n: int, s: int | None = None) -> int:
        return lib.ekv_malloc(n, 0, stream if s is None else s) or 0

    def free(p: int, n: int, s: int | None = None) -> None:
        lib.ekv_free(p, n, 0, stream if s is None else s)

    yield allocator, malloc, free, tagged
    allocator.set_limit(None, 0)


def test_mixed_sizes_round_trip_and_trim_gives_the_tag_back(env):
    A, malloc, free, tagged = env
    with tagged("gpu-abi-mixed"):
        blocks = [(malloc(n), n) for n in SIZES]
    assert all(p and p % 512 == 0 for p, _ in blocks), A.last_error()
    spans = sorted(blocks)
    assert all(p + n <= q for (p, n), (q, _) in zip(spans, spans[1:]))
    for i, (p, n) in enumerate(blocks):
        dview(p, n).fill_(i + 1)
    for i, (p, n) in enumerate(blocks):
        v = dview(p, n)
        assert int(v.min()) == int(v.max()) == i + 1
    torch.cuda.synchronize()
    for p, n in blocks:
        free(p, n)
    free0 = torch.cuda.mem_get_info()[0]
    released = A.trim(0)
    assert A.stats(0)["tags"].get("gpu-abi-mixed", {"mapped_bytes": 0})["mapped_bytes"] == 0
    assert released >= sum(SIZES) and torch.cuda.mem_get_info()[0] - free0 >= sum(SIZES) - 4 * MiB


def test_limit_and_bad_input_change_nothing(env):
    A, malloc, free, tagged = env
    with tagged("gpu-abi-limit"):
        p = malloc(8 * MiB)
        dview(p, 8 * MiB).fill_(7)
        A.set_limit(0, 0)  # below use: nothing new may be mapped, live blocks stay
        assert malloc(16 * MiB) == 0 and "allocator limit" in A.last_error(clear=True)
        for size in (0, 1 << 62):
            assert malloc(size) == 0 and A.last_error(clear=True)
        free(p + 512, 100)
        assert "no live allocation" in A.last_error(clear=True)
        assert int(dview(p, 8 * MiB).min()) == 7
        A.set_limit(None, 0)
        q = malloc(16 * MiB)
        assert q
        torch.cuda.synchronize()
        free(q, 16 * MiB)
        free(p, 8 * MiB)
        free(p, 8 * MiB)
        assert "double free" in A.last_error(clear=True)


def test_stream_ordered_reuse_on_the_real_driver(env):
    A, malloc, free, tagged = env
    s1 = torch.cuda.Stream()
    s2 = torch.cuda.Stream()
    with tagged("gpu-abi-streams"):
        p = malloc(6 * MiB, s1.cuda_stream)
        with torch.cuda.stream(s1):
            torch.cuda._sleep(1_000_000_000)  # keep s1 busy
            dview(p, 6 * MiB).fill_(1)
        free(p, 6 * MiB, s1.cuda_stream)
        q = malloc(6 * MiB, s2.cuda_stream)
        r = malloc(6 * MiB, s1.cuda_stream)
        busy = not s1.query()
        assert busy and q != p and r == p
        torch.cuda.synchronize()
        free(q, 6 * MiB, s2.cuda_stream)
        free(r, 6 * MiB, s1.cuda_stream)
    A.trim(0)


def test_four_threads_on_the_device(env):
    A, malloc, free, tagged = env
    before = A.stats(0)
    errors: list[str] = []

    def worker(t: int) -> None:
        import random

        rng = random.Random(t)
        held = []
        with tagged("gpu-abi-threads"):
            for _ in range(1500):
                if held and rng.random() < 0.5:
                    p, n = held.pop(rng.randrange(len(held)))
                    free(p, n, 0)
                else:
                    n = rng.choice([rng.randint(1, 8192), rng.randint(8192, 3 * MiB)])
                    p = malloc(n, 0)
                    if not p:
                        errors.append(A.last_error())
                    else:
                        held.append((p, n))
            for p, n in held:
                free(p, n, 0)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    after = A.stats(0)
    assert after["live_blocks"] == before["live_blocks"] and after["allocated_bytes"] == before["allocated_bytes"]
    assert after["mallocs"] - before["mallocs"] == after["frees"] - before["frees"]
    A.trim(0)
    assert A.stats(0)["tags"].get("gpu-abi-threads", {"mapped_bytes": 0})["mapped_bytes"] == 0
