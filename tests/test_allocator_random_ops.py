"""Random sequences of allocator operations against a plain-Python reference.

malloc/free on several streams and tags, trim, pause/resume (with and without backup), limit
changes and, on the fake driver, device work that completes late. After every operation the
live blocks must be disjoint, aligned and hold their bytes (paused tags with a backup: after
resume), and the stats must agree with the reference. Runs on the host backend and the fake
CUDA driver. EKV_RANDOM_OPS_SEED picks another sequence (for hunting bugs by hand).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from allocator_helpers import Abi, MiB, assert_disjoint_and_aligned, tagged, view
from torch_elastic_kv.memory import allocator as ekv_alloc

TAGS = ["rand-a", "rand-b", "rand-c"]
STREAMS = [0x10, 0x20]


@pytest.fixture(params=["host", "fake-cuda"])
def setup(request):
    if request.param == "host":
        yield Abi(-1), None
        ekv_alloc.close(-1)
        return
    from torch_elastic_kv.testing import use_fake_cuda

    with use_fake_cuda() as fake:
        for s in STREAMS:
            fake.create_stream(s)
        yield Abi(0), fake
        fake.set_events_complete(True)
        fake.complete_events()
        ekv_alloc.close(0)
        assert fake.counts()["handles"] == 0


def test_random_operation_sequences_keep_blocks_and_stats_right(setup):
    abi, fake = setup
    dev = abi.device
    rng = random.Random(int(os.environ.get("EKV_RANDOM_OPS_SEED", "1234")))
    live: dict[int, tuple[int, str, int, int]] = {}  # ptr -> (size, tag, mark, stream)
    paused: dict[str, bool] = {}  # tag -> backup

    def check_all() -> None:
        spans = [(p, n) for p, (n, *_rest) in live.items()]
        assert_disjoint_and_aligned(spans)
        for p, (n, tag, mark, _) in live.items():
            if tag in paused:
                continue
            v = view(p, n)
            assert v[0] == mark and v[n // 2] == mark and v[-1] == mark, f"block {p:#x} ({n} B, {tag}) changed"
        s = ekv_alloc.stats(dev)
        assert s["live_blocks"] == len(live)
        assert s["requested_bytes"] == sum(n for n, *_ in live.values())
        assert s["allocated_bytes"] >= s["requested_bytes"]
        for tag in TAGS:
            t = s["tags"].get(tag)
            if t is not None:
                assert t["blocks"] == sum(1 for _, tg, _, _ in live.values() if tg == tag)
                assert t["paused"] == (tag in paused)

    for _step in range(900):
        r = rng.random()
        if r < 0.5 or not live:
            tag = rng.choice(TAGS)
            n = rng.choice([rng.randint(1, 5000), rng.randint(5000, 900_000), rng.randint(MiB, 6 * MiB)])
            stream = rng.choice(STREAMS)
            with tagged(tag):
                p = abi.malloc(n, stream)
            if not p:
                assert "limit" in ekv_alloc.last_error(clear=True)
                continue
            mark = rng.randint(1, 255)
            v = view(p, n)  # mapped even if its tag is paused: only earlier blocks are paused
            v[0] = v[n // 2] = v[-1] = mark
            live[p] = (n, tag, mark, stream)
        elif r < 0.85:
            p = rng.choice(list(live))
            n, tag, _, stream = live.pop(p)
            abi.free(p, n, stream)
            assert ekv_alloc.last_error() is None, ekv_alloc.last_error(clear=True)
        elif r < 0.89:
            ekv_alloc.trim(dev)
        elif r < 0.94:
            tag = rng.choice(TAGS)
            if tag in paused:
                try:
                    ekv_alloc.resume(tag, device=dev)
                except (MemoryError, torch.OutOfMemoryError) as e:  # past the limit: refused, and the tag stays paused
                    assert "stays paused" in str(e)
                    continue
                if not paused.pop(tag):  # without a backup the bytes are gone: write them again
                    for p, (n, tg, mark, _) in live.items():
                        if tg == tag:
                            v = view(p, n)
                            v[0] = v[n // 2] = v[-1] = mark
            elif any(tg == tag for _, tg, _, _ in live.values()):
                backup = rng.random() < 0.7
                ekv_alloc.pause(tag, backup=backup, device=dev)
                paused[tag] = backup
        elif r < 0.97:
            ekv_alloc.set_limit(rng.choice([None, None, 64 * MiB, 16 * MiB]), dev)
        elif fake is not None:
            fake.set_events_complete(rng.random() < 0.5)
            if rng.random() < 0.5:
                fake.complete_events()
        check_all()
    ekv_alloc.set_limit(None, dev)
    for tag in list(paused):
        ekv_alloc.resume(tag, device=dev)
        if not paused.pop(tag):
            for p, (n, tg, mark, _) in live.items():
                if tg == tag:
                    v = view(p, n)
                    v[0] = v[n // 2] = v[-1] = mark
    check_all()
    for p, (n, _, _, stream) in list(live.items()):
        abi.free(p, n, stream)
    ekv_alloc.trim(dev)
    s = ekv_alloc.stats(dev)
    assert s["live_blocks"] == 0 and s["mapped_bytes"] == 0 and s["paused_bytes"] == 0
