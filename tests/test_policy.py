"""ElasticPolicy: demand and a budget (in pages) -> resident pages, with hysteresis. Pure Python,
fake clock. The budget itself is ``KVBudget``'s (tests/test_kv_budget.py)."""

from __future__ import annotations

import pytest

from torch_elastic_kv.engine.policy import ElasticPolicy
from torch_elastic_kv.testing import ManualClock

PAGE = 1000  # bytes per page in these tests


def make(clock=None, **kw) -> ElasticPolicy:
    p = ElasticPolicy(clock=clock or ManualClock(100.0), **kw)
    p.bind(PAGE, 16)
    return p


def test_target_is_demand_plus_headroom_within_min_and_budget():
    p = make(min_bytes=5 * PAGE, max_bytes=100 * PAGE, headroom=0.25)
    assert p.target_pages(40, 100) == 50
    assert p.target_pages(0, 100) == 5  # floor
    assert p.target_pages(99, 100) == 100  # budget
    assert p.target_pages(99, 60) == 60  # a lower budget
    assert p.target_pages(0, 3) == 3  # a budget below the floor wins


def test_grow_at_once_shrink_only_after_idle_seconds():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=5.0)
    d = p.decide(demand_pages=30, resident_pages=10, budget_pages=100)
    assert (d.action, d.target_pages) == ("grow", 30)
    # demand drops: nothing happens until idle_seconds have passed
    d = p.decide(10, 30, 100)
    assert d.action == "none"
    clock.t += 4.9
    assert p.decide(10, 30, 100).action == "none"
    clock.t += 0.2
    d = p.decide(10, 30, 100)
    assert (d.action, d.target_pages, d.forced) == ("shrink", 10, False)


def test_shrink_keeps_the_peak_seen_during_the_idle_interval():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=2.0)
    p.decide(5, 40, 100)
    clock.t += 1.8
    p.decide(25, 40, 100)  # the load came back to 25 recently
    clock.t += 0.7
    d = p.decide(5, 40, 100)
    assert (d.action, d.target_pages) == ("shrink", 25)


def test_demand_back_near_resident_resets_the_idle_timer():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=2.0)
    p.decide(10, 40, 100)
    clock.t += 1.5
    assert p.decide(40, 40, 100).action == "none"  # busy again
    clock.t += 1.0
    assert p.decide(10, 40, 100).action == "none"  # timer restarted
    clock.t += 1.9
    assert p.decide(10, 40, 100).action == "none"
    clock.t += 0.2
    assert p.decide(10, 40, 100).action == "shrink"


def test_less_than_a_chunk_below_is_not_idle():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=1.0)
    p.decide(35, 40, 100, chunk_pages=8)
    clock.t += 10
    assert p.decide(35, 40, 100, chunk_pages=8).action == "none"
    clock.t += 10
    assert p.decide(32, 40, 100, chunk_pages=8).action == "none"  # timer starts now
    clock.t += 1
    assert p.decide(32, 40, 100, chunk_pages=8).action == "shrink"


def test_steady_fluctuating_load_never_oscillates():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=1000 * PAGE, headroom=0.1, idle_seconds=5.0)
    resident = 0
    actions = []
    for i in range(2000):
        demand = 100 + (i * 37) % 21 - 10  # 90..110, fluctuating every step
        d = p.decide(demand, resident, 1000, chunk_pages=4)
        if d.action != "none":
            actions.append((i, d.action))
            resident = d.target_pages
        clock.t += 0.05
    # every demand level shows up within the first 21 steps; after that nothing moves
    assert all(a == "grow" and i < 21 for i, a in actions)
    assert resident == 121  # ceil(110 * 1.1)


def test_static_pool_maps_everything_and_never_shrinks():
    clock = ManualClock(100.0)
    p = make(clock, min_bytes=50 * PAGE, max_bytes=50 * PAGE, idle_seconds=0.0)
    assert p.is_static
    d = p.decide(0, 0, 50)
    assert (d.action, d.target_pages) == ("grow", 50)
    clock.t += 1000
    assert p.decide(0, 50, 50).action == "none"
    # a cut holds exactly the cut at once, and the ceiling comes back with the budget
    d = p.decide(0, 50, 20)
    assert (d.action, d.target_pages, d.forced) == ("shrink", 20, True)
    assert (p.decide(0, 20, 50).action, p.decide(0, 20, 50).target_pages) == ("grow", 50)


def test_budget_cut_forces_an_immediate_shrink_and_the_full_budget_grows_back():
    p = make(max_bytes=100 * PAGE, idle_seconds=100.0, headroom=0.0)
    d = p.decide(50, 60, 20)
    assert (d.action, d.target_pages, d.forced) == ("shrink", 20, True)
    d = p.decide(50, 20, 100)
    assert (d.action, d.target_pages) == ("grow", 50)


def test_the_policy_holds_no_budget_state():
    p = make(max_bytes=100 * PAGE)
    for gone in ("set_budget", "budget_bytes", "poll_pressure", "pressure", "budget_pages"):
        assert not hasattr(p, gone), gone
    assert set(p.describe()) == {
        "min_bytes",
        "max_bytes",
        "headroom",
        "idle_seconds",
        "release_seconds",
        "horizon_steps",
        "swap_bytes",
        "expected_output_tokens",
    }
    with pytest.raises(TypeError):
        ElasticPolicy(pressure=lambda: None)  # type: ignore[call-arg]


def test_learned_output_length_drives_growth():
    p = make(horizon_steps=16)
    # nothing learned: fall back to max_new_tokens, capped by the horizon
    assert p.growth_tokens(generated=0, max_new_tokens=64) == 16
    assert p.growth_tokens(generated=60, max_new_tokens=64) == 4
    for n in (4, 6, 8):
        p.record_finished(n)
    assert p.expected_output_tokens(64) == 6.0
    assert p.growth_tokens(generated=2, max_new_tokens=64) == 4
    # past the mean: still expected to run one more step
    assert p.growth_tokens(generated=10, max_new_tokens=64) == 1
    assert p.growth_tokens(generated=64, max_new_tokens=64) == 0
    # pages: 15 stored tokens + 4 more crosses one page boundary (page_tokens=16)
    assert p.growth_pages(stored_tokens=15, generated=2, max_new_tokens=64) == 1
    assert p.growth_pages(stored_tokens=16, generated=2, max_new_tokens=64) == 1
    assert p.growth_pages(stored_tokens=17, generated=2, max_new_tokens=64) == 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"min_bytes \(10\) is larger than max_bytes \(5\)"):
        ElasticPolicy(min_bytes=10, max_bytes=5)
    with pytest.raises(ValueError, match="headroom"):
        ElasticPolicy(headroom=-0.1)
    with pytest.raises(ValueError, match="idle_seconds"):
        ElasticPolicy(idle_seconds=-1)
    with pytest.raises(ValueError, match="swap_bytes"):
        ElasticPolicy(swap_bytes=-1)
    with pytest.raises(RuntimeError, match="bind"):
        ElasticPolicy().target_pages(1, 10)
    with pytest.raises(ValueError, match="demand_pages"):
        make().decide(-1, 0, 10)
    with pytest.raises(ValueError, match=r"budget_pages \(-1\) must be >= 0"):
        make().decide(0, 0, -1)


def test_budget_buys_whole_chunks_and_pool_limit_is_adopted():
    p = ElasticPolicy(clock=ManualClock(100.0))
    p.bind(PAGE, 16, pages_per_chunk=4, chunk_bytes=4 * PAGE + 100, pool_max_bytes=50 * PAGE)
    assert p.max_bytes == 50 * PAGE
    # 50000 bytes buy 12 chunks of 4100 bytes -> 48 pages
    assert p.bytes_to_pages(50 * PAGE) == 48
    assert p.bytes_to_pages(8200) == 8


def test_target_follows_the_trailing_window_not_an_old_peak():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=2.0)
    p.decide(30, 40, 100)  # below resident from t=100; target 30
    clock.t += 3  # 30 is now older than idle_seconds
    d = p.decide(5, 40, 100)
    assert (d.action, d.target_pages) == ("shrink", 5)


def test_draining_load_gives_memory_back_once_idle_at_the_floor():
    clock = ManualClock(100.0)
    p = make(clock, min_bytes=4 * PAGE, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=2.0)
    resident, shrinks = 40, []
    for demand in (36, 30, 24, 18, 12, 6, 0):  # a drain: one step every 0.4 s
        d = p.decide(demand, resident, 100)
        if d.action == "shrink":
            shrinks.append(d.target_pages)
            resident = d.target_pages
        clock.t += 0.4
    while clock.t < 100 + 2.8 + 2.0:  # demand 0 from t=102.4
        d = p.decide(0, resident, 100)
        if d.action == "shrink":
            shrinks.append(d.target_pages)
            resident = d.target_pages
        clock.t += 0.1
    assert shrinks == [4]  # once, straight to the floor


def test_settled_lower_load_gets_its_memory_back():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=100 * PAGE, headroom=0.0, idle_seconds=2.0)
    # after a burst to 80, a fluctuating load of 20..30 settles in
    shrinks = []
    for i in range(60):
        d = p.decide(20 + (i * 7) % 11, 80, 100)
        if d.action == "shrink":
            shrinks.append((round(clock.t - 100, 1), d.target_pages))
            break
        clock.t += 0.1
    assert shrinks and shrinks[0][1] == 30 and shrinks[0][0] >= 2.0


def test_kept_pages_sit_on_top_and_their_room_is_not_shrunk_before_it_exceeds_the_headroom():
    clock = ManualClock(100.0)
    p = make(clock, max_bytes=400 * PAGE, headroom=0.5, idle_seconds=1.0)
    # 200 kept pages, nothing running: the target is the kept pages, and a grow never maps room for them
    d = p.decide(0, 200, 400, chunk_pages=16, kept_pages=200)
    assert (d.action, d.target_pages) == ("none", 200)
    # 40 of them expired: 40 pages of room, under 0.5 x 160 + 16, so nothing shrinks however long it lasts
    for _ in range(3):
        clock.t += 1.0
        d = p.decide(0, 200, 400, chunk_pages=16, kept_pages=160)
        assert (d.action, d.target_pages) == ("none", 160)
    # without the kept pages the same 40 pages of room would go back
    clock.t += 1.0
    assert p.decide(0, 40, 240, chunk_pages=16).action == "shrink"
    # 150 expired: 150 pages of room, over 0.5 x 50 + 16: back to the kept pages
    clock.t += 1.0
    d = p.decide(0, 200, 400, chunk_pages=16, kept_pages=50)
    assert (d.action, d.target_pages) == ("shrink", 50)
    # a budget cut is never held back, and demand grows on top of the kept pages
    d = p.decide(0, 200, 100, chunk_pages=16, kept_pages=50)
    assert d.forced and d.action == "shrink" and d.target_pages <= 100
    assert p.decide(100, 200, 400, chunk_pages=16, kept_pages=50).target_pages == 150 + 50
    with pytest.raises(ValueError, match=r"decide: kept_pages \(300\) must be in \[0, resident_pages \(200\)\]"):
        p.decide(0, 200, 400, kept_pages=300)
