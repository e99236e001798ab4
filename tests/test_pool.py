"""KVPagePool: geometry, placement, OOM, compaction, shrink/trim, budgets, page I/O."""

from __future__ import annotations

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv.kv.placement import PagePlacement, plan_geometry
from torch_elastic_kv.kv.pool import KVPagePool

MiB = 1 << 20


@pytest.mark.parametrize(
    "page_bytes, granule, stride, per_chunk, granules",
    [
        (16 * 8 * 128 * 2, 2 * MiB, 32768, 64, 1),  # page << granule
        (28 * 2 * 16 * 4 * 128 * 2, 2 * MiB, 917504, 16, 7),  # page spans granules, not a divisor
        (8 * MiB, 2 * MiB, 8 * MiB, 1, 4),  # page = 4 granules
        (3000, 4096, 3072, 4, 3),  # odd size: 2.4 % padding
    ],
)
def test_plan_geometry(page_bytes, granule, stride, per_chunk, granules):
    g = plan_geometry(page_bytes, granule, element_bytes=2)
    assert (g.page_stride, g.pages_per_chunk, g.granules_per_chunk) == (stride, per_chunk, granules)
    assert g.chunk_bytes == g.page_stride * g.pages_per_chunk == granules * granule
    assert (g.page_stride - page_bytes) / page_bytes <= 1 / 32


def test_placement_prefers_fullest_chunk_and_rejects_bad_frees():
    p = PagePlacement(num_chunks=3, pages_per_chunk=4)
    for c in (0, 1):
        p.mark_mapped(c)
    a = p.take(6)  # chunk 0 full, chunk 1 holds 2
    assert a == [0, 1, 2, 3, 4, 5]
    p.give([0, 1, 2])  # chunk 0 holds 1, chunk 1 holds 2
    assert p.take(1) == [6]  # goes to the fuller chunk 1
    with pytest.raises(ValueError, match="page 0 is not allocated"):
        p.give([3, 0])
    assert p.is_live(3) and p.live_pages == 4  # nothing freed by the failed call
    with pytest.raises(ValueError, match="page 99 is out of range"):
        p.give([99])


def _pool(**kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, max_bytes=8 * MiB)
    args.update(kw)
    return KVPagePool(**args)


@pytest.mark.parametrize("layout", ["page-major", "layer-major"])
def test_views_and_page_io_roundtrip(layout):
    pool = _pool(layout=layout, page_tokens=4)
    assert pool.page_bytes == 2 * 2 * 4 * 2 * 16 * 4
    ids = pool.alloc(5)
    for layer in range(2):
        k, v = pool.key_cache(layer), pool.value_cache(layer)
        assert k.shape == (pool.max_pages, 4, 2, 16)
        for i in ids:
            k[i] = i + 100 * layer
            v[i] = -(i + 100 * layer)
    data = pool.read_pages(ids[1:3])
    assert data.shape == (2, 2, 2, 4, 2, 16)
    assert torch.equal(data[1, 1, 0], torch.full((4, 2, 16), ids[2] + 100.0))
    assert torch.equal(data[0, 0, 1], torch.full((4, 2, 16), -float(ids[1])))
    pool.write_pages(ids[3:5], data)
    assert torch.equal(pool.key_cache(1)[ids[4]], torch.full((4, 2, 16), ids[2] + 100.0))
    with pytest.raises(ValueError, match="not allocated"):
        pool.read_pages([pool.max_pages - 1])
    with pytest.raises(ValueError, match="data shape"):
        pool.write_pages(ids[:1], data)


def test_alloc_oom_names_numbers_and_changes_nothing():
    pool = _pool(max_bytes=2 * MiB)
    ids = pool.alloc(10)
    before = pool.stats()
    with pytest.raises(
        MemoryError,
        match=rf"{pool.free_pages + 1} pages \(\d+ bytes\) needed, "
        rf"{pool.free_pages} pages \(\d+ bytes\) free",
    ):
        pool.alloc(pool.free_pages + 1)
    assert pool.stats() == before
    with pytest.raises(ValueError, match="double free"):
        pool.free([ids[0], ids[0]])
    assert pool.stats() == before
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        pool.alloc(-1)


def test_device_budget_oom_rolls_back():
    pool = _pool(max_bytes=16 * MiB, layout="layer-major")  # 4 arenas: one growth step maps 4 granules
    pool.alloc(1)
    resident = pool.resident_bytes
    used = ekv.memory_stats("cpu")["mapped_bytes"]
    try:
        ekv.set_budget(used + 2 * pool.granularity, "cpu")  # room for 2 of the 4 granules
        with pytest.raises(MemoryError, match="mapping 1 chunk"):
            pool.alloc(pool.free_pages - 1)
        assert pool.resident_bytes == resident and pool.live_pages == 1
        assert ekv.memory_stats("cpu")["mapped_bytes"] == used  # the 2 granules that fitted were rolled back
    finally:
        ekv.set_budget(None, "cpu")


def test_compact_moves_pages_keeps_data_and_gives_back():
    pool = _pool(page_tokens=64, max_bytes=16 * MiB)  # 32 KiB pages, 64 per 2 MiB chunk
    per_chunk = pool.stats()["pages_per_chunk"]
    ids = pool.alloc(3 * per_chunk)
    for i in ids:
        pool.key_cache(0)[i] = float(i)
    owner = {i: i for i in ids}  # a page table: tag -> page
    seen = []
    pool.add_move_listener(seen.append)
    pool.free([i for i in ids if i % 3 != 0])  # one page in three survives
    live = [i for i in ids if i % 3 == 0]
    assert pool.resident_bytes == 3 * pool.chunk_bytes
    given = pool.compact(on_move=lambda m: owner.update({t: m.get(p, p) for t, p in owner.items()}))
    assert given == 2 * pool.chunk_bytes and pool.resident_bytes == pool.chunk_bytes
    assert seen and len(seen[0]) == pool.stats()["pages_moved"] > 0
    for tag in live:  # every survivor's data followed it to its new page
        assert torch.equal(pool.key_cache(0)[owner[tag]], torch.full((64, 2, 16), float(tag)))
    assert pool.compact() == 0  # nothing left to do


def test_shrink_reserve_min_bytes_and_trim():
    pool = _pool(page_tokens=64, max_bytes=16 * MiB, min_bytes=2 * MiB)
    assert pool.resident_bytes == pool.chunk_bytes  # the floor is mapped up front
    per_chunk = pool.stats()["pages_per_chunk"]
    pool.reserve_pages(3 * per_chunk)
    assert pool.resident_bytes == 3 * pool.chunk_bytes and pool.live_pages == 0
    assert pool.shrink(keep_pages=2 * per_chunk) == pool.chunk_bytes
    assert pool.shrink(0) == pool.chunk_bytes  # down to min_bytes, not below
    assert pool.resident_bytes == pool.chunk_bytes
    pool.trim()
    assert pool.resident_bytes == pool.chunk_bytes
    assert pool.stats()["grows"] >= 2 and pool.stats()["shrinks"] == 2


def test_set_max_bytes():
    pool = _pool(page_tokens=64, max_bytes=8 * MiB)
    per_chunk = pool.stats()["pages_per_chunk"]
    ids = pool.alloc(3 * per_chunk)
    pool.free(ids[per_chunk:])
    with pytest.raises(ValueError, match="exceeds the reserved"):
        pool.set_max_bytes(64 * MiB)
    with pytest.raises(ValueError, match=r"below the 2097152 bytes that 64 live pages need"):
        pool.set_max_bytes(MiB)
    pool.set_max_bytes(2 * MiB)  # shrinks to fit
    assert pool.resident_bytes == pool.chunk_bytes and pool.max_bytes == 2 * MiB
    assert pool.free_pages == 0 and not pool.can_alloc(1)
    with pytest.raises(MemoryError):
        pool.alloc(1)
    pool.set_max_bytes(8 * MiB)
    assert pool.can_alloc(per_chunk)


def test_pages_spanning_several_granules():
    # 2 layers x 2 x 12288 tokens x 2 x 16 x 4 B = 6 MiB pages: three 2 MiB granules each
    pool = _pool(page_tokens=12288, max_bytes=64 * MiB)
    g = pool.stats()
    assert g["pages_per_chunk"] == 1 and pool.chunk_bytes == pool.page_bytes == 3 * g["granule_bytes"]
    ids = pool.alloc(4)
    for i in ids:
        pool.value_cache(1)[i, -1] = float(i)  # the last granule of each page
    assert pool.resident_bytes == 4 * pool.page_bytes
    pool.free(ids[:2])
    assert pool.trim() == 2 * pool.page_bytes and pool.resident_bytes == 2 * pool.page_bytes
    for i in ids[2:]:
        assert torch.equal(pool.value_cache(1)[i, -1], torch.full((2, 16), float(i)))


# -- error paths leave the pool as it was; placement and compaction order -----------------------


def _state(pool):
    """Everything observable about the pool's pages: stats, which pages are live, their K data."""
    live = [i for i in range(pool.max_pages) if pool.is_live(i)]
    return pool.stats(), live, pool.read_pages(live).clone() if live else None


def _assert_same(pool, state):
    stats, live, data = state
    assert pool.stats() == stats
    assert [i for i in range(pool.max_pages) if pool.is_live(i)] == live
    if live:
        assert torch.equal(pool.read_pages(live), data)


def _fragmented(pool):
    """Three chunks filled, then two of every three pages freed; each survivor's K holds its id."""
    per_chunk = pool.stats()["pages_per_chunk"]
    ids = pool.alloc(3 * per_chunk)
    for i in ids:
        pool.key_cache(0)[i] = float(i)
    pool.free([i for i in ids if i % 3 != 0])
    return [i for i in ids if i % 3 == 0]


def test_free_of_unknown_or_double_id_changes_nothing():
    pool = _pool(page_tokens=64, max_bytes=8 * MiB)
    ids = pool.alloc(5)
    pool.free(ids[:1])
    state = _state(pool)
    for bad, reason in (
        ([ids[1], ids[0]], "not allocated"),  # freed already
        ([ids[2], pool.max_pages + 3], "out of range"),  # never a page
        ([ids[3], -1], "out of range"),
        ([ids[4], pool.max_pages - 1], "not allocated"),
    ):  # a page never handed out
        with pytest.raises(ValueError, match=reason):
            pool.free(bad)
        _assert_same(pool, state)  # the valid id was not freed either


def test_new_pages_go_to_the_fullest_chunk():
    pool = _pool(page_tokens=64, max_bytes=8 * MiB)
    per_chunk = pool.stats()["pages_per_chunk"]
    ids = pool.alloc(3 * per_chunk)  # chunks 0, 1, 2 full
    chunk_of = {i: i // per_chunk for i in ids}
    by_chunk = {c: [i for i in ids if chunk_of[i] == c] for c in range(3)}
    pool.free(by_chunk[0][:10])  # chunk 0: 10 holes
    pool.free(by_chunk[1][:30])  # chunk 1: 30 holes (sparsest)
    pool.free(by_chunk[2][:4])  # chunk 2: 4 holes (fullest)
    resident = pool.resident_bytes
    got = pool.alloc(14)
    # 4 fill chunk 2, then 10 fill chunk 0; the sparse chunk 1 is left to empty out
    assert sorted(i // per_chunk for i in got) == [0] * 10 + [2] * 4
    assert pool.resident_bytes == resident  # holes used before mapping more
    pool.free(by_chunk[1][30:])
    assert pool.shrink(0) == pool.chunk_bytes  # chunk 1 emptied whole


def test_compaction_reports_moves_before_memory_goes_back():
    pool = _pool(page_tokens=64, max_bytes=16 * MiB)
    live = _fragmented(pool)
    seen = []

    def owner(moves):
        # both ends are live and mapped, the data is already at the new page, nothing released yet
        assert pool.resident_bytes == 3 * pool.chunk_bytes
        for old, new in moves.items():
            assert pool.is_live(old) and pool.is_live(new)
            assert torch.equal(pool.key_cache(0)[new], pool.key_cache(0)[old])
        seen.append(dict(moves))

    pool.add_move_listener(owner)
    assert pool.compact() == 2 * pool.chunk_bytes
    moves = seen[0]
    assert set(moves) <= set(live) and len(moves) == pool.stats()["pages_moved"] > 0
    assert all(not pool.is_live(old) for old in moves)
    now = [moves.get(i, i) for i in live]
    assert all(pool.is_live(i) for i in now) and pool.live_pages == len(live)
    for tag, page in zip(live, now):
        assert torch.equal(pool.key_cache(0)[page], torch.full((64, 2, 16), float(tag)))


def test_compaction_whose_owner_fails_changes_nothing():
    pool = _pool(page_tokens=64, max_bytes=16 * MiB)
    live = _fragmented(pool)
    table = {i: i for i in live}  # an owner that did update
    pool.add_move_listener(lambda m: table.update({t: m.get(p, p) for t, p in table.items()}))

    def broken(moves):
        raise RuntimeError("owner refused")

    state = _state(pool)
    with pytest.raises(RuntimeError, match="owner refused"):
        pool.compact(on_move=broken)  # fails before the listener
    _assert_same(pool, state)
    assert table == {i: i for i in live}
    pool.add_move_listener(broken)  # fails after the listener ran
    with pytest.raises(RuntimeError, match="owner refused"):
        pool.compact()
    _assert_same(pool, state)
    assert table == {i: i for i in live}  # it was told to move back
    with pytest.raises(RuntimeError, match="owner refused"):
        pool.set_max_bytes(pool.chunk_bytes)  # needs a compaction
    _assert_same(pool, state)
    pool.remove_move_listener(broken)
    assert pool.compact() == 2 * pool.chunk_bytes  # and it still works
    assert all(pool.is_live(p) for p in table.values()) and len(set(table.values())) == len(live)


def test_compaction_whose_copy_fails_changes_nothing(monkeypatch):
    pool = _pool(page_tokens=64, max_bytes=16 * MiB)
    _fragmented(pool)
    calls = []
    pool.add_move_listener(calls.append)
    state = _state(pool)

    def failing_copy(src, dst):
        raise RuntimeError("device error during copy")

    monkeypatch.setattr(pool, "_copy_pages", failing_copy)
    with pytest.raises(RuntimeError, match="device error"):
        pool.compact()
    _assert_same(pool, state)
    assert calls == []  # no owner was told of a move


def test_move_listeners_of_dropped_owners_are_let_go():
    import gc
    import weakref

    class Owner:
        def __init__(self):
            self.calls = 0

        def on_move(self, moves):
            self.calls += 1

    pool = _pool(page_tokens=64, max_bytes=16 * MiB)
    kept, dropped, seen = Owner(), Owner(), []
    gone = weakref.ref(dropped)
    for fn in (kept.on_move, dropped.on_move, seen.append):
        pool.add_move_listener(fn)
    del dropped
    gc.collect()
    assert gone() is None  # the pool did not keep it alive
    _fragmented(pool)
    pool.compact()
    assert kept.calls == 1 and len(seen) == 1  # the others are still called
    pool.remove_move_listener(kept.on_move)  # a fresh bound method finds its entry
    with pytest.raises(ValueError, match="is not registered"):
        pool.remove_move_listener(kept.on_move)
    pool.remove_move_listener(seen.append)


def test_closed_pool_refuses_every_use():
    pool = _pool()
    ids = pool.alloc(2)
    data = pool.read_pages(ids)
    pool.close()
    calls = {
        "alloc": lambda: pool.alloc(1),
        "free": lambda: pool.free(ids),
        "read_pages": lambda: pool.read_pages(ids),
        "write_pages": lambda: pool.write_pages(ids, data),
        "key_cache": lambda: pool.key_cache(0),
        "value_cache": lambda: pool.value_cache(1),
        "compact": lambda: pool.compact(),
        "trim": lambda: pool.trim(),
        "reserve_pages": lambda: pool.reserve_pages(1),
        "shrink": lambda: pool.shrink(0),
        "set_max_bytes": lambda: pool.set_max_bytes(pool.max_bytes),
        "can_alloc": lambda: pool.can_alloc(1),
        "is_live": lambda: pool.is_live(ids[0]),
        "add_move_listener": lambda: pool.add_move_listener(print),
        "stats": lambda: pool.stats(),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^KVPagePool\.{name}: the pool is closed$"):
            call()
    assert repr(pool).endswith("closed)")
    pool.close()  # twice is fine


@pytest.mark.parametrize("layout", ["page-major", "layer-major"])
def test_stats_agree_with_the_arena_layer(layout):
    """stats() against the device-wide accounting the arenas keep on their own."""
    import gc

    gc.collect()  # pools dropped by earlier tests must not go away in the middle of this one
    base = ekv.memory_stats("cpu")
    pool = _pool(page_tokens=64, max_bytes=16 * MiB, layout=layout)
    try:
        ids = pool.alloc(100)
        s = pool.stats()
        now = ekv.memory_stats("cpu")
        for key in ("resident_bytes", "live_bytes", "reserved_bytes", "live_pages", "resident_pages", "granule_bytes"):
            assert key in s, key
        assert s["live_pages"] == 100 and s["live_bytes"] == 100 * pool.page_bytes
        assert s["resident_bytes"] == now["mapped_bytes"] - base["mapped_bytes"]
        assert s["reserved_bytes"] == now["reserved_bytes"] - base["reserved_bytes"] >= 16 * MiB
        assert s["arenas"] == now["arenas"] - base["arenas"] == (1 if layout == "page-major" else 4)
        assert s["resident_pages"] * pool.page_bytes <= s["resident_bytes"]  # padding at most
        assert s["resident_pages"] == s["resident_bytes"] // pool.chunk_bytes * s["pages_per_chunk"]
        assert s["live_pages"] <= s["resident_pages"] and s["granule_bytes"] == 2 * MiB
        pool.free(ids)
        pool.trim()
        assert ekv.memory_stats("cpu")["mapped_bytes"] == base["mapped_bytes"] and pool.resident_bytes == 0
    finally:
        pool.close()
    assert ekv.memory_stats("cpu")["reserved_bytes"] == base["reserved_bytes"]


def test_four_threads_alloc_write_free_on_one_pool():
    """Threads sharing a pool: every page handed out is unique and holds what its thread wrote,
    and the counts add up (three of four threads died with 'already mapped' without the lock)."""
    import threading

    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=16, max_bytes=64 << 20)
    errors: list[BaseException] = []
    owned: list[list[int]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            barrier.wait()
            rng = __import__("random").Random(t)
            for _ in range(300):
                if owned[t] and rng.random() < 0.45:
                    k = rng.randrange(1, len(owned[t]) + 1)
                    ids, owned[t] = owned[t][:k], owned[t][k:]
                    pool.free(ids)
                else:
                    ids = pool.alloc(rng.randrange(1, 9))
                    pool.key_cache(0)[ids] = float(t)
                    owned[t].extend(ids)
                if rng.random() < 0.05:
                    pool.shrink(0)
        except BaseException as exc:  # collected: a thread's failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors[0]
    every = [p for ids in owned for p in ids]
    assert len(every) == len(set(every)) == pool.live_pages
    for t, ids in enumerate(owned):
        if ids:
            assert torch.all(pool.key_cache(0)[ids] == float(t))
    pool.close()
