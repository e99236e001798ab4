"""allocator.trim() reaches memory freed inside mem_pool() (issue 14, item 3).

torch gives a MemPool's cached blocks back only when the pool is destroyed; the bridge used to
keep every pool forever. CPU torch has no CUDA, so torch's side is a stand-in here that keeps
what the real one keeps: a pool's cache goes when the pool object dies (its destructor), and
empty_cache() is called after. What is checked is the bridge's part: which pools trim lets go."""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref

import pytest
import torch

from torch_elastic_kv.memory import allocator as ekv_alloc


class _Pool:
    destroyed: list[int] = []
    made = 0

    def __init__(self, allocator: object) -> None:
        _Pool.made += 1
        self.serial = _Pool.made

    def __del__(self) -> None:  # torch's ~MemPool: releasePool + emptyCache(id)
        _Pool.destroyed.append(self.serial)


@pytest.fixture
def torch_cuda(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "MemPool", _Pool)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", lambda pool, device=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    bridge = ekv_alloc._TorchBridge()
    bridge.pluggable = type("Alloc", (), {"allocator": lambda self: None})()
    monkeypatch.setattr(ekv_alloc, "_BRIDGE", bridge)
    _Pool.destroyed, _Pool.made = [], 0
    yield bridge, calls


def test_trim_destroys_idle_pools_then_empties_the_cache(torch_cuda) -> None:
    bridge, calls = torch_cuda
    with ekv_alloc.mem_pool("weights", device=0) as p:
        ref = weakref.ref(p)
    del p
    assert bridge.pools and ref() is not None  # kept between blocks, cache and all
    ekv_alloc.trim(device=-1)
    gc.collect()
    assert ref() is None and _Pool.destroyed == [1] and calls == ["empty_cache"]
    assert bridge.pools == {}
    with ekv_alloc.mem_pool("weights", device=0) as p2:  # the tag gets a fresh pool
        assert p2.serial == 2


def test_trim_keeps_a_pool_a_block_is_inside_on_another_thread(torch_cuda) -> None:
    bridge, calls = torch_cuda
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with ekv_alloc.mem_pool("kv", device=0):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(5)
    with ekv_alloc.mem_pool("act", device=0):
        pass
    ekv_alloc.trim(device=-1)
    gc.collect()
    assert set(bridge.pools) == {(0, "kv")} and _Pool.destroyed == [2]  # "act" went, "kv" is in use
    release.set()
    t.join()
    ekv_alloc.trim(device=-1)
    gc.collect()
    assert bridge.pools == {} and sorted(_Pool.destroyed) == [1, 2] and calls == ["empty_cache"] * 2


def test_a_pool_the_caller_holds_is_forgotten_but_lives_until_dropped(torch_cuda) -> None:
    bridge, _ = torch_cuda
    with ekv_alloc.mem_pool("held", device=0) as p:
        pass
    ekv_alloc.trim(device=-1)
    assert bridge.pools == {} and _Pool.destroyed == []  # the caller's reference keeps it
    del p
    gc.collect()
    assert _Pool.destroyed == [1]
