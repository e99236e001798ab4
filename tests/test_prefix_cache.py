"""Prefix caching: shared full pages, cached pages that are reclaimable but never demand, and
the eviction policy's order (pressure, budget, expiry, cap), on a real pool and a tiny model."""

from __future__ import annotations

import pytest
import torch

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.engine.eviction import EvictionPolicy, RecentReuse, pressure_victims
from torch_elastic_kv.kv.page_table import PageTable
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.kv.prefix_index import PrefixIndex
from torch_elastic_kv.testing import ManualClock
from torch_elastic_kv.testing.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MiB = 1 << 20
PT = 16  # tokens per page in these tests


@pytest.fixture(scope="module")
def model():
    # 128 KiB pages of 16 tokens: a 2 MiB chunk holds 16 pages, so chunks fill and empty quickly
    return tiny_llama(hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def make(model, clock=None, caching=True, eviction=None, max_mib=8, **policy_kw) -> Engine:
    policy_kw.setdefault("idle_seconds", 1.0)
    policy = ElasticPolicy(max_bytes=max_mib * MiB, clock=clock or ManualClock(100.0), **policy_kw)
    return Engine(
        model,
        policy=policy,
        max_batch_tokens=256,
        page_tokens=PT,
        background=False,
        prefix_caching=caching,
        eviction=eviction,
    )


def run(eng: Engine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    return eng.generate(prompts, max_new)


# -- the index alone ---------------------------------------------------------------------------
def test_chained_hashes_name_tokens_at_positions_and_depend_on_the_salt() -> None:
    a = PrefixIndex(4, b"model-a")
    h = a.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(h) == 2  # the partial third page has no hash
    assert a.hashes([1, 2, 3, 4]) == h[:1]
    assert a.hashes([9, 9, 9, 9, 5, 6, 7, 8])[1] != h[1]  # same tokens, other parent: other hash
    assert PrefixIndex(4, b"model-b").hashes([1, 2, 3, 4]) != h[:1]
    assert a.hashes([1, 2, 3, 4, 5, 6, 7, 8], h[0], 1) == h[1:]  # resumed from the first page


def test_eviction_takes_least_recently_used_leaves_before_their_parents() -> None:
    clock = ManualClock(0.0)
    with KVPagePool(2, 2, 16, torch.float32, "cpu", page_tokens=4, max_bytes=4 * MiB) as pool:
        table = PageTable(4, pool, PrefixIndex(4, b"s", clock))
        old, new = list(range(1, 13)), list(range(101, 113))  # 3 full pages each
        for rid, toks in ((1, old), (2, new)):
            table.ensure(rid, 12)
            table.publish(rid, toks, 12)
        pages_old, pages_new = table.get(1).pages, table.get(2).pages
        table.free(1)
        clock.t = 5.0
        table.free(2)
        assert table.live_pages == 0 and table.cached_pages == 6 and pool.live_pages == 6
        # oldest release first, and within it the deepest page first
        assert pressure_victims(table.prefix, 4) == [pages_old[2], pages_old[1], pages_old[0], pages_new[2]]
        table.evict(pressure_victims(table.prefix, 2))
        assert table.prefix.match(table.prefix.hashes(old)) == pages_old[:1]  # the chain's head survives
        assert pool.live_pages == 4


# -- sharing in the Engine ---------------------------------------------------------------------
def test_two_requests_share_a_three_page_prefix_and_leave_it_cached(model) -> None:
    eng = make(model)
    system = tokens(3 * PT, 1)
    a, b = system + tokens(5, 2), system + tokens(9, 3)
    ra = eng.add_request(a, 4)
    eng.step()  # a's prefill: its 3 full prompt pages are indexed
    rb = eng.add_request(b, 4)
    eng.step()
    table = eng.cache.page_table
    pa, pb = table.get(ra).pages, table.get(rb).pages
    assert pa[:3] == pb[:3] and len(set(pa[3:]) & set(pb[3:])) == 0
    assert [table.holders(p) for p in pa[:3]] == [2, 2, 2]
    assert table.live_pages == len(set(pa) | set(pb))
    st = eng.stats()
    assert st["prefix_hit_tokens"] == 3 * PT and st["prefix_query_tokens"] == len(a) + len(b)
    while eng.has_unfinished():
        eng.step()
    # both finished: the shared pages are held by nobody, and kept as reclaimable cached pages
    assert all(table.holders(p) == 0 for p in pa + pb)
    assert table.live_pages == 0 and eng.stats()["live_bytes"] == 0
    assert table.cached_pages == eng.pool.live_pages > 0
    assert eng.stats()["cached_bytes"] == table.cached_pages * eng.pool.page_bytes
    eng.close()


def test_tokens_equal_with_the_cache_on_and_off_across_a_conversation(model) -> None:
    system = tokens(2 * PT + 3, 4)
    turn1 = [system + tokens(7, s) for s in (5, 6, 7)]
    off = make(model, caching=False)
    on = make(model)
    out1_off, out1_on = run(off, turn1, 20), run(on, turn1, 20)
    assert out1_on == out1_off
    turn2 = [p + o + tokens(6, 10 + i) for i, (p, o) in enumerate(zip(turn1, out1_on))]
    before = on.stats()["prefix_hit_tokens"]
    assert run(on, turn2, 12) == run(off, turn2, 12)
    # turn 2 re-sends turn 1's prompt and output: whole pages of both are hits
    assert on.stats()["prefix_hit_tokens"] - before == sum((len(p) + len(o)) // PT * PT for p, o in zip(turn1, out1_on))
    off.close()
    on.close()


def test_a_full_prompt_hit_still_computes_its_last_token(model) -> None:
    eng = make(model)
    p = tokens(2 * PT, 8)  # exactly two pages
    first = run(eng, [p], 5)
    assert run(eng, [p], 5) == first
    # only the first page can be shared: the last token's page is computed again
    assert eng.stats()["prefix_hit_tokens"] == PT
    eng.close()


# -- what cached pages are, for memory ---------------------------------------------------------
def test_cached_pages_are_never_demand_and_an_allocation_takes_them(model) -> None:
    clock = ManualClock(100.0)
    eng = make(model, clock=clock, max_mib=2, headroom=0.0)  # one chunk of 16 pages
    cap = eng.pool.max_pages
    assert cap == 16
    run(eng, [tokens(10 * PT, 11)], 1)
    table = eng.cache.page_table
    assert table.cached_pages == 10 and eng.memory.demand() == 0
    # a request that needs more pages than are free takes the cached ones (least recent first)
    big = tokens(13 * PT, 12)
    out = run(eng, [big], 1)
    assert out == run(make(model, caching=False, max_mib=2), [big], 1)
    assert eng.stats()["prefix_evictions_pressure"] >= 13 - (16 - 10)
    eng.close()


def test_expiry_and_the_cap_with_the_injected_clock(model) -> None:
    clock = ManualClock(100.0)
    # idle_keep_reuse=1: the traffic's reuse (5 of 6 pages) does not keep the unused page
    eng = make(model, clock=clock, eviction=EvictionPolicy(expiry_seconds=30.0, cap_bytes=None, idle_keep_reuse=1.0))
    run(eng, [tokens(6 * PT, 13)], 2)
    run(eng, [tokens(6 * PT, 13)], 2)  # hits: those pages' tokens came back, so they are kept
    assert eng.stats()["prefix_recent_reuse"] == pytest.approx(5 / 6, abs=1e-3)
    clock.t += 2.0
    eng.maintain()  # an idle shrink: the pages never reused go, the hit ones stay
    kept = eng.cache.page_table.cached_pages
    assert kept == 5 and eng.stats()["prefix_evictions_idle"] >= 1  # the 5 full pages short of the last token
    clock.t += 27.0  # 29 s after their last use
    eng.maintain()
    assert eng.cache.page_table.cached_pages == kept  # young: kept, though nothing runs
    clock.t += 2.0
    eng.maintain()
    assert eng.cache.page_table.cached_pages == 0 and eng.stats()["prefix_evictions_expiry"] == kept
    for _ in range(3):  # idle: back to the floor after idle_seconds
        clock.t += 1.0
        eng.maintain()
    assert eng.stats()["resident_bytes"] == 0
    eng.close()

    eng = make(model, clock=clock, eviction=EvictionPolicy(expiry_seconds=None, cap_bytes=3 * 128 * 1024))
    run(eng, [tokens(6 * PT, 14)], 2)
    run(eng, [tokens(6 * PT, 14)], 2)
    eng.maintain()
    assert eng.cache.page_table.cached_pages * eng.pool.page_bytes <= 3 * 128 * 1024
    assert eng.stats()["prefix_evictions_cap"] >= 3
    eng.close()


def test_an_idle_shrink_takes_pages_seen_once_and_a_ghost_hit_marks_them_worth_keeping(model) -> None:
    clock = ManualClock(100.0)
    eng = make(model, clock=clock, headroom=0.0)
    p = tokens(6 * PT, 15)
    run(eng, [p], 2)
    assert eng.cache.page_table.cached_pages >= 6
    for _ in range(3):  # idle_seconds pass: no page was ever reused, so they all go back
        clock.t += 1.0
        eng.maintain()
    st = eng.stats()
    assert st["cached_bytes"] == 0 and st["resident_bytes"] == 0 and st["prefix_evictions_idle"] >= 6
    # the same prompt again misses, but its pages had been evicted: computed again, they are
    # marked as seen twice (ghost hits) and outlive the next idle shrink
    run(eng, [p], 2)
    st = eng.stats()
    assert st["prefix_hit_tokens"] == 0 and st["prefix_ghost_hits"] >= 5
    for _ in range(3):
        clock.t += 1.0
        eng.maintain()
    assert eng.cache.page_table.cached_pages >= 5
    assert run(eng, [p], 2) and eng.stats()["prefix_hit_tokens"] == 5 * PT
    eng.close()


def test_traffic_that_reuses_its_pages_keeps_fresh_pages_through_idle_shrinks_until_expiry(model) -> None:
    # a conversation's first turn is not reused until its next turn, a minute or more later:
    # while the traffic's pages come back, idle shrinks keep the pages not reused yet
    clock = ManualClock(100.0)
    eng = make(model, clock=clock, headroom=0.0, eviction=EvictionPolicy(expiry_seconds=60.0))
    first = tokens(6 * PT, 21)
    run(eng, [first], 2)
    run(eng, [first + tokens(3 * PT, 22)], 2)  # its second turn: the 6 pages hit
    assert eng.stats()["prefix_recent_reuse"] >= 0.1
    fresh = tokens(6 * PT, 23)  # another conversation's first turn
    run(eng, [fresh], 2)
    fresh_pages = eng.cache.page_table.prefix.match(eng.cache.page_table.prefix.hashes(fresh))
    assert len(fresh_pages) == 6
    before = eng.stats()
    for _ in range(5):  # idle shrinks: nothing taken, the pages are young
        clock.t += 1.0
        eng.maintain()
    st = eng.stats()
    assert st["prefix_evictions_idle"] == 0 and st["cached_bytes"] == before["cached_bytes"] > 0
    # the kept pages sit on top of what the policy sizes: at most one shrink packs them, not one per tick
    assert st["compactions"] - before["compactions"] <= 1 and st["shrinks"] - before["shrinks"] <= 1
    run(eng, [fresh + tokens(2 * PT, 24)], 2)  # its second turn hits every full page
    assert eng.stats()["prefix_hit_tokens"] == 6 * PT + 6 * PT
    for _ in range(70):  # then idle past the expiry: every page goes, the pool back to 0
        clock.t += 1.0
        eng.maintain()
    st = eng.stats()
    assert st["cached_bytes"] == 0 and st["resident_bytes"] == 0 and st["prefix_evictions_expiry"] > 0
    assert st["prefix_evictions_idle"] == 0 and st["prefix_recent_reuse"] == 0.0  # the window moved on
    eng.close()


def test_recent_reuse_counts_pages_that_came_back_over_its_window() -> None:
    r = RecentReuse(10.0)
    assert r.share(0.0) == 0.0
    r.published(0.5, 8)
    r.reused(3.2, 2)
    assert r.share(4.0) == 0.25
    r.published(9.0, 8)
    assert r.share(9.9) == pytest.approx(2 / 16)
    assert r.share(11.5) == pytest.approx(2 / 8)  # the first second's 8 pages left the window
    assert r.share(20.0) == 0.0
    with pytest.raises(ValueError, match="window_seconds"):
        RecentReuse(-1.0)


def test_a_budget_cut_takes_whole_cached_chunks_first_and_compaction_frees_more(model) -> None:
    clock = ManualClock(100.0)
    # idle_keep_reuse=0: kept as if the traffic reused its pages, so they fill chunks of their own
    eng = make(model, clock=clock, max_mib=16, headroom=0.0, eviction=EvictionPolicy(idle_keep_reuse=0.0))
    per = int(eng.pool.stats()["pages_per_chunk"])
    # three chunks' worth of cached pages, then one running request
    run(eng, [tokens(per * PT, s) for s in (20, 21, 22)], 1)
    live = eng.add_request(tokens(3 * PT, 23), 30)
    eng.step()
    st = eng.stats()
    assert st["cached_bytes"] >= 3 * per * eng.pool.page_bytes - 3 * eng.pool.page_bytes
    eng.set_budget(2 * eng.pool.chunk_bytes)
    st = eng.stats()
    assert st["preemptions"] == 0  # cached pages went first: no live request was touched
    assert st["resident_bytes"] <= 2 * eng.pool.chunk_bytes
    assert st["prefix_evictions_budget"] > 0
    while eng.has_unfinished():
        eng.step()
    assert eng.output_ids(live) == run(make(model, caching=False), [tokens(3 * PT, 23)], 30)[0]
    eng.close()


def test_preemption_compaction_sleep_and_close_with_shared_pages_lose_nothing(model) -> None:
    clock = ManualClock(100.0)
    system = tokens(3 * PT, 30)
    prompts = [system + tokens(10 + 3 * i, 31 + i) for i in range(6)]
    ref = run(make(model, caching=False), prompts, 24)
    for swap in (0, 4 * MiB):  # recompute, then swap preemption
        eng = make(model, clock=clock, max_mib=16, swap_bytes=swap)
        rids = [eng.add_request(p, 24) for p in prompts]
        eng.step()
        eng.step()
        eng.set_budget(eng.pool.chunk_bytes)  # below what runs: cached pages go, then preemption
        assert eng.stats()["preemptions"] >= 1
        eng.step()
        eng.sleep()
        assert eng.stats()["live_bytes"] == 0 and eng.stats()["cached_bytes"] == 0
        eng.wake()
        eng.set_budget(None)
        eng.step()
        with eng._step_lock, eng._pool_lock:
            eng.pool.compact()  # moved pages keep their holders and their hash entries
        while eng.has_unfinished():
            eng.step()
        assert [eng.output_ids(r) for r in rids] == ref, swap
        table = eng.cache.page_table
        assert table.live_pages == 0 and eng.pool.live_pages == table.cached_pages
        # one more round hits the (moved) cached prefix and still matches
        before = eng.stats()["prefix_hit_tokens"]
        assert run(eng, prompts[:2], 24) == ref[:2]
        assert eng.stats()["prefix_hit_tokens"] > before
        eng.close()
        assert eng.stats()["live_bytes"] == 0 and eng.stats()["resident_bytes"] == 0


def test_reset_gives_up_every_cached_page(model) -> None:
    eng = make(model)
    run(eng, [tokens(4 * PT, 40)], 3)
    n = eng.cache.page_table.cached_pages
    assert eng.reset_prefix_cache() == n * eng.pool.page_bytes
    assert eng.cache.page_table.cached_pages == 0 and eng.pool.live_pages == 0
    assert eng.stats()["prefix_evictions_reset"] == n
    eng.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expiry_seconds": -1}, "EvictionPolicy: expiry_seconds must be None or >= 0, got -1"),
        ({"expiry_seconds": "soon"}, "EvictionPolicy: expiry_seconds must be None or >= 0, got 'soon'"),
        ({"cap_bytes": -5}, "EvictionPolicy: cap_bytes must be None or a non-negative int, got -5"),
        ({"cap_bytes": 1.5}, "EvictionPolicy: cap_bytes must be None or a non-negative int, got 1.5"),
        ({"idle_keep_reuse": 1.5}, r"EvictionPolicy: idle_keep_reuse must be a number in \[0, 1\], got 1.5"),
        ({"idle_keep_reuse": True}, r"EvictionPolicy: idle_keep_reuse must be a number in \[0, 1\], got True"),
        ({"idle_keep_reuse": float("nan")}, r"EvictionPolicy: idle_keep_reuse must be a number in \[0, 1\], got nan"),
    ],
)
def test_bad_knobs_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EvictionPolicy(**kwargs)


def test_a_cap_above_the_ceiling_and_bad_switches_are_refused(model) -> None:
    with pytest.raises(ValueError, match=r"the prefix cache's cap_bytes \(16777216\) exceeds the KV ceiling"):
        make(model, eviction=EvictionPolicy(cap_bytes=16 * MiB))
    with pytest.raises(ValueError, match="Engine: prefix_caching must be True or False, got 1"):
        Engine(model, prefix_caching=1)
    with pytest.raises(ValueError, match="Engine: eviction must be an EvictionPolicy, got dict"):
        Engine(model, eviction={"expiry_seconds": 3})


def test_a_budget_cut_evicts_whole_all_cached_chunks_before_pages_beside_live_ones() -> None:
    from torch_elastic_kv.engine.eviction import budget_victims

    clock = ManualClock(0.0)
    with KVPagePool(2, 2, 16, torch.float32, "cpu", page_tokens=4, max_bytes=8 * MiB) as pool:
        per = int(pool.stats()["pages_per_chunk"])
        table = PageTable(4, pool, PrefixIndex(4, b"s", clock))
        # chunk 0: a live request (per - 2 pages) beside an old finished one (2 cached pages);
        # chunk 1: a newer finished request, every page cached
        table.ensure(2, 4 * (per - 2))
        table.ensure(3, 4 * 2)
        table.publish(3, list(range(500, 508)), 8)
        table.free(3)
        clock.t = 10.0
        table.ensure(1, 4 * per)
        table.publish(1, list(range(1, 4 * per + 1)), 4 * per)
        table.free(1)
        live_chunks = {p // per for p in table.get(2).pages}
        old = [p for p in table.prefix.cached() if p // per in live_chunks]
        assert len(old) == 2 and table.cached_pages == per + 2
        # under pressure the least recently used page goes first: the old one beside the live request
        assert pressure_victims(table.prefix, 1)[0] in old
        # a budget cut wants whole chunks back: the all-cached chunk goes first, though newer
        victims = budget_victims(table.prefix, 1, per, table.get(2).pages)
        assert len(victims) == per and not set(victims) & set(old)
        table.evict(victims)
        assert table.cached_pages == 2
        assert pool.shrink(per - 2) > 0  # the emptied chunk unmaps at once


def test_the_host_tier_demotes_on_a_cut_and_promotes_on_a_hit_token_identical(model) -> None:
    clock = ManualClock(100.0)
    system = tokens(5 * PT, 50)
    prompts = [system + tokens(7, 51 + i) for i in range(3)]
    ref = run(make(model, caching=False), prompts, 10)
    eng = make(model, clock=clock, max_mib=16, swap_bytes=8 * MiB)
    assert run(eng, prompts[:1], 10) == ref[:1]
    cached = eng.cache.page_table.cached_pages
    assert cached >= 5
    eng.set_budget(0)  # memory given back on purpose: the cached pages go to the host tier
    st = eng.stats()
    assert st["cached_bytes"] == 0 and st["cached_host_bytes"] == cached * eng.pool.page_bytes
    assert st["prefix_demoted_pages"] == cached and st["resident_bytes"] == 0
    eng.set_budget(None)
    assert run(eng, prompts[1:], 10) == ref[1:]  # the first hit brings the prefix back
    st = eng.stats()
    assert st["prefix_hit_tokens_host"] == 5 * PT  # the system prompt's 5 pages, promoted once
    assert st["prefix_hit_tokens_device"] == 5 * PT  # the second request shares them on the device
    assert st["cached_host_bytes"] == (cached - 5) * eng.pool.page_bytes
    # a preempted request needs the swap space: demoted pages make room for it
    assert eng.prefix.make_swap_room(8 * MiB) and st["swap_capacity_bytes"] == 8 * MiB
    assert eng.stats()["cached_host_bytes"] == 0
    eng.close()


def test_a_held_page_below_a_cached_one_does_not_pin_it(model) -> None:
    """A request that recomputes pages another request cached (its prompt hit only the first)
    and goes on past them hangs its own pages below the cached chain: under pressure the cached
    chain must still go, leaf first, without touching the held pages."""
    clock = ManualClock(100.0)
    eng = make(model, clock=clock, max_mib=4, headroom=0.0)
    prompt = [9] * 20
    ref = run(eng, [prompt], 300)[0]  # its 19 full pages are cached now
    rid = eng.add_request(prompt, 300)  # hits one page, computes the same pages again, then more
    for _ in range(5):
        eng.step()
    eng.budget.set_lease(2 * eng.pool.chunk_bytes)  # the whole pool: cached pages must make room
    while eng.has_unfinished():
        eng.step()
        assert not eng.stalled, eng.stats()
    assert eng.output_ids(rid) == ref
    st = eng.stats()
    assert st["preemptions"] == 0 and st["prefix_evictions_pressure"] + st["prefix_evictions_reclaim"] > 0
    eng.close()


def test_compaction_packs_cached_and_live_pages_so_a_cut_frees_more_chunks(model) -> None:
    """The same interleaved workload, a budget cut to one chunk, with and without compaction:
    once the cached pages are gone, packing the live pages frees whole chunks that a pool which
    cannot move pages keeps mapped."""

    def cut_and_count(compact: bool) -> tuple[int, int]:
        # kept as if reused (idle_keep_reuse=0), so the short requests' pages spread the live ones
        keep = EvictionPolicy(idle_keep_reuse=0.0)
        eng = make(model, clock=ManualClock(100.0), max_mib=16, headroom=0.0, eviction=keep)
        if not compact:
            eng.pool.compact = lambda on_move=None: 0  # a pool that cannot move pages
        # long-lived requests placed between short ones, so live pages land in several chunks
        live = []
        for i in range(2):
            live.append(eng.add_request(tokens(5 * PT + 1, 60 + i), 200))
            eng.step()
            eng.add_request(tokens(9 * PT, 70 + i), 1)
            eng.step()
        eng.step()
        held = eng.stats()["resident_bytes"]
        assert eng.stats()["live_bytes"] <= eng.pool.chunk_bytes  # one chunk could hold them
        eng.set_budget(eng.pool.chunk_bytes)
        st = eng.stats()
        chunk = eng.pool.chunk_bytes
        assert st["preemptions"] == 0
        eng.close()
        return (held - st["resident_bytes"]) // chunk, held // chunk

    (with_compaction, chunks), (without, _) = cut_and_count(True), cut_and_count(False)
    assert chunks >= 2 and with_compaction > without, (with_compaction, without, chunks)


def test_room_that_expiring_pages_leave_is_kept_for_the_next_allocations(model) -> None:
    # under traffic that reuses its pages, a few expiring pages do not make the pool shrink
    # (and compact) only to map the room again a step later; the headroom over the kept pages
    # bounds that room, and once every page expired the pool goes back to its floor
    clock = ManualClock(100.0)
    keep = EvictionPolicy(expiry_seconds=60.0, idle_keep_reuse=0.0)  # idle shrinks keep every young page
    eng = make(model, clock=clock, max_mib=32, headroom=0.5, eviction=keep)
    for i in range(6):  # one at a time: the pool grows with the pages, not with a batch's headroom
        run(eng, [tokens(6 * PT, 40 + i)], 2)  # released at 100 s
    clock.t += 20.0
    for i in range(13):
        run(eng, [tokens(8 * PT, 50 + i)], 2)  # released at 120 s
    eng.maintain()
    before = eng.stats()
    assert before["cached_bytes"] >= 130 * eng.pool.page_bytes
    clock.t += 41.0  # 161 s: the pages released at 100 s expire, those of 120 s stay
    eng.maintain()
    clock.t += 1.5
    eng.maintain()
    st = eng.stats()
    expired = st["prefix_evictions_expiry"]
    assert 16 < expired < 0.5 * st["cached_bytes"] / eng.pool.page_bytes  # more than a chunk, less than the room
    assert st["shrinks"] == before["shrinks"] and st["compactions"] == before["compactions"]
    assert st["resident_bytes"] == before["resident_bytes"]
    clock.t += 20.0  # every page expired: back to the floor
    for _ in range(3):
        clock.t += 1.0
        eng.maintain()
    st = eng.stats()
    assert st["cached_bytes"] == 0 and st["resident_bytes"] == 0
    eng.close()


def test_a_cache_nobody_reads_does_not_grow_the_pool(model) -> None:
    # unrelated prompts one after another: each one's pages are cached when it ends, and the
    # next allocation takes those never reused instead of mapping a chunk, so the pool stays
    # at what the live requests need (one chunk) rather than filling the budget with them
    clock = ManualClock(100.0)
    eng = make(model, clock=clock, max_mib=32, headroom=0.0)
    ref = make(model, caching=False, max_mib=32, headroom=0.0)
    prompts = [tokens(6 * PT, 60 + i) for i in range(12)]  # 7 pages each with its 2 tokens
    for p in prompts:
        assert run(eng, [p], 2) == run(ref, [p], 2)
    st = eng.stats()
    assert st["resident_bytes"] == 2 * MiB and st["grows"] == 1  # 12 x 7 pages passed through 16
    assert st["prefix_evictions_pressure"] >= 12 * 6 - 16 and st["cached_bytes"] > 0  # full pages only are cached
    # what is cached is the most recent: the last prompt hits all its full pages but the last
    run(eng, [prompts[-1]], 2)
    assert eng.stats()["prefix_hit_tokens"] == 5 * PT
    # traffic that reuses its pages keeps them while the budget has room: the pool grows
    keep = make(model, clock=clock, max_mib=32, headroom=0.0, eviction=EvictionPolicy(idle_keep_reuse=0.0))
    for p in prompts:
        run(keep, [p], 2)
    st = keep.stats()
    assert st["resident_bytes"] >= 5 * 2 * MiB and st["prefix_evictions_pressure"] == 0
    for e in (eng, ref, keep):
        e.close()


def test_unused_cached_pages_stay_when_taking_them_would_not_spare_a_map(model) -> None:
    # 3 cached pages cannot make room for a 20-page prompt (13 mapped pages free): the pool maps
    # a chunk anyway, so evicting them would only lose them
    eng = make(model, clock=ManualClock(100.0), max_mib=32, headroom=0.0)
    run(eng, [tokens(3 * PT, 80)], 1)
    assert eng.cache.page_table.cached_pages == 3
    run(eng, [tokens(20 * PT, 81)], 1)
    st = eng.stats()
    assert st["prefix_evictions_pressure"] == 0 and st["resident_bytes"] == 2 * 2 * MiB
    assert eng.cache.page_table.prefix.match(eng.cache.page_table.prefix.hashes(tokens(3 * PT, 80)))
    eng.close()
