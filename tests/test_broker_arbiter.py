"""The broker's arbitration rule, as bookkeeping: grants, reclaims, guarantees, shares."""

from __future__ import annotations

import pytest

from torch_elastic_kv.broker.arbiter import Action, Arbiter, ArbiterError

MiB = 1 << 20
CHUNK = 2 * MiB


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(budget_mib: int = 100) -> tuple[Arbiter, Clock]:
    clock = Clock()
    return Arbiter(budget_mib * MiB, reclaim_seconds=5.0, clock=clock), clock


def add(arb: Arbiter, name: str, prio: int = 0, guarantee: int = 0, pid: int = 1000, max_mib: int = 1000, **kw):
    return arb.register(name, pid, prio, guarantee * MiB, CHUNK, max_mib * MiB, **kw)


def demand(arb: Arbiter, name: str, mib: int, resident: int | None = None) -> None:
    t = arb.tenants[name]
    arb.report(name, demand=mib * MiB, resident=t.lease if resident is None else resident, live=0, running=0, waiting=0)


def kinds(actions: list[Action]) -> list[tuple[str, str, int]]:
    return [(a.kind, a.tenant, a.lease_bytes // MiB) for a in actions]


def release(arb: Arbiter, name: str) -> None:
    t = arb.tenants[name]
    arb.released(name, t.reclaim_seq, t.reclaim_to, min(t.resident, t.reclaim_to))


def test_free_memory_is_granted_up_to_demand_in_whole_chunks() -> None:
    arb, _ = make(100)
    add(arb, "a", guarantee=4)
    assert kinds(arb.plan()) == [("grant", "a", 4)]  # the guarantee at once
    demand(arb, "a", 31)  # 31 MiB -> 16 chunks
    assert kinds(arb.plan()) == [("grant", "a", 32)]
    assert arb.free_bytes == 68 * MiB
    assert arb.plan() == []  # nothing changes: nothing to do


def test_idle_memory_is_taken_back_lowest_priority_first() -> None:
    arb, _ = make(100)
    add(arb, "low", prio=0)
    add(arb, "mid", prio=1)
    demand(arb, "low", 60)
    demand(arb, "mid", 40)
    arb.plan()
    assert arb.tenants["low"].lease == 60 * MiB and arb.tenants["mid"].lease == 40 * MiB
    demand(arb, "low", 10)  # both go quiet: leases stay while nobody needs them
    demand(arb, "mid", 10)
    assert arb.plan() == []
    add(arb, "high", prio=2)
    demand(arb, "high", 50)
    # 50 MiB needed, none free: idle memory (lease above demand) from the lowest priority first
    assert kinds(arb.plan()) == [("reclaim", "low", 10)]
    assert arb.tenants["mid"].reclaim_to is None
    assert arb.free_bytes == 0  # nothing counts as free before the release
    release(arb, "low")
    assert kinds(arb.plan()) == [("grant", "high", 50)]
    assert arb.free_bytes == 0


def test_live_memory_above_the_guarantee_is_taken_from_lower_priority() -> None:
    arb, _ = make(100)
    add(arb, "low", prio=0, guarantee=20)
    demand(arb, "low", 100)
    arb.plan()
    assert arb.tenants["low"].lease == 100 * MiB
    add(arb, "high", prio=5)
    demand(arb, "high", 60)
    assert kinds(arb.plan()) == [("reclaim", "low", 40)]  # live memory: low preempts
    release(arb, "low")
    assert kinds(arb.plan()) == [("grant", "high", 60)]
    demand(arb, "high", 100)  # more than everything: low keeps its guarantee
    assert kinds(arb.plan()) == [("reclaim", "low", 20)]
    release(arb, "low")
    assert kinds(arb.plan()) == [("grant", "high", 80)]
    assert arb.tenants["low"].lease == 20 * MiB


def test_equal_priorities_converge_to_demand_weighted_shares() -> None:
    arb, _ = make(40)
    add(arb, "a")
    add(arb, "b")
    demand(arb, "a", 40)
    arb.plan()
    assert arb.tenants["a"].lease == 40 * MiB
    demand(arb, "b", 20)  # wants 60 in all; a:b = 2:1 of 40 MiB
    assert arb.targets() == {"a": 26 * MiB, "b": 14 * MiB}  # 26.7/13.3 in whole chunks, rest to b
    assert kinds(arb.plan()) == [("reclaim", "a", 26)]
    release(arb, "a")
    assert kinds(arb.plan()) == [("grant", "b", 14)]
    assert arb.free_bytes == 0


def test_a_tenant_slow_to_release_is_granted_nothing_meanwhile() -> None:
    arb, clock = make(40)
    add(arb, "a")
    add(arb, "b")
    demand(arb, "a", 40)
    arb.plan()
    demand(arb, "b", 40)
    assert kinds(arb.plan()) == [("reclaim", "a", 20)]
    demand(arb, "a", 80)  # a asks for more while its reclaim is outstanding
    assert arb.plan() == []
    assert arb.tenants["a"].lease == 40 * MiB and arb.tenants["b"].lease == 0
    clock.t = 6.0
    assert [t.name for t in arb.overdue()] == ["a"]


def test_released_must_answer_the_outstanding_reclaim() -> None:
    arb, _ = make(40)
    add(arb, "a")
    add(arb, "b", prio=1)
    demand(arb, "a", 40)
    arb.plan()
    with pytest.raises(ArbiterError, match="no reclaim 7 outstanding") as e:
        arb.released("a", 7, 0, 0)
    assert e.value.code == "out_of_order"
    demand(arb, "b", 10)
    (a,) = arb.plan()
    with pytest.raises(ArbiterError, match="above the lease held"):
        arb.released("a", a.seq, 50 * MiB, 0)
    with pytest.raises(ArbiterError, match=r"resident 32505856 is above the lease released to \(31457280\)"):
        arb.released("a", a.seq, 30 * MiB, 31 * MiB)
    assert arb.tenants["a"].lease == 40 * MiB  # refused answers change nothing
    arb.released("a", a.seq, 30 * MiB, 30 * MiB)
    assert arb.tenants["a"].lease == 30 * MiB and arb.tenants["a"].reclaim_to is None


def test_registration_refusals_change_nothing() -> None:
    arb, _ = make(100)
    add(arb, "a", guarantee=60)
    with pytest.raises(ArbiterError, match="guarantee_bytes 62914560 does not fit: budget 104857600") as e:
        add(arb, "b", guarantee=60)
    assert e.value.code == "guarantee_does_not_fit"
    with pytest.raises(ArbiterError, match="'a' is taken") as e:
        add(arb, "a", pid=2000)
    assert e.value.code == "name_taken"
    with pytest.raises(ArbiterError, match="exceeds the tenant's max_bytes"):
        add(arb, "c", guarantee=20, max_mib=10)
    assert sorted(arb.tenants) == ["a"]
    add(arb, "b", guarantee=40)  # what fits is accepted


def test_impossible_holdings_are_refused_and_change_nothing() -> None:
    arb, _ = make(64)
    for fields, text in [
        (dict(max_mib=1, lease=640 * MiB), "lease_bytes 671088640 exceeds the tenant's max_bytes 1048576"),
        (dict(max_mib=1000, lease=640 * MiB), "lease_bytes 671088640 exceeds the budget 67108864"),
        (dict(max_mib=4, resident=8 * MiB), "resident_bytes 8388608 exceeds the tenant's max_bytes 4194304"),
    ]:
        with pytest.raises(ArbiterError, match=text) as e:
            add(arb, "hoarder", **fields)
        assert e.value.code == "bad_value"
    assert arb.tenants == {} and arb.free_bytes == 64 * MiB
    add(arb, "late", guarantee=8)
    assert kinds(arb.plan()) == [("grant", "late", 8)]
    add(arb, "small", max_mib=3)  # resident may reach the max rounded up to whole chunks
    arb.report("small", demand=0, resident=4 * MiB, live=4 * MiB, running=1, waiting=0)
    for field in ("resident", "live"):
        figures = dict(demand=0, resident=MiB, live=MiB, running=2, waiting=0) | {field: 4 * MiB + 1}
        with pytest.raises(ArbiterError, match=f"report: {field}_bytes 4194305 exceeds the tenant's max_bytes 3145728"):
            arb.report("small", **figures)
    assert arb.tenants["small"].row()["resident_bytes"] == 4 * MiB and arb.tenants["small"].running == 1


def test_a_dropped_connection_keeps_the_lease_until_the_process_is_gone() -> None:
    arb, _ = make(100)
    add(arb, "a")
    demand(arb, "a", 30)
    arb.plan()
    arb.disconnected("a")
    add(arb, "b")
    demand(arb, "b", 100)
    assert kinds(arb.plan()) == [("grant", "b", 70)]  # a's 30 MiB may still be in use
    with pytest.raises(ArbiterError, match="taken"):
        add(arb, "a", pid=2000)  # another process cannot take the name meanwhile
    assert add(arb, "a").lease == 30 * MiB  # the same process reconnecting keeps its lease
    arb.disconnected("a")
    arb.remove("a")  # its process exited
    assert kinds(arb.plan()) == [("grant", "b", 100)]


def test_holdings_re_registered_beyond_the_budget_are_reclaimed() -> None:
    # a new broker with a smaller budget: tenants bring what they hold; the excess is reclaimed
    arb, _ = make(60)
    add(arb, "low", prio=0, lease=40 * MiB, resident=40 * MiB)
    add(arb, "high", prio=1, lease=40 * MiB, resident=40 * MiB)
    demand(arb, "low", 40, resident=40 * MiB)
    demand(arb, "high", 40, resident=40 * MiB)
    assert arb.free_bytes == -20 * MiB and arb.status()["free_bytes"] == 0
    assert kinds(arb.plan()) == [("reclaim", "low", 20)]
    release(arb, "low")
    assert arb.free_bytes == 0


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
        Arbiter(0)
    with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
        Arbiter(True)
    with pytest.raises(ValueError, match="reclaim_seconds must be > 0"):
        Arbiter(1 << 20, reclaim_seconds=0)


# -- borrowers: a fixed amount, all or nothing, pinned once granted --------------------------------


def borrow(arb: Arbiter, name: str, mib: int, prio: int = 0, pid: int = 3000, **kw):
    t = arb.register(name, pid, prio, 0, mib * MiB, mib * MiB, kind="borrow", **kw)
    arb.report(name, demand=mib * MiB, resident=t.lease, live=t.lease, running=0, waiting=1)
    return t


def test_a_borrower_gets_its_whole_want_from_free_memory_at_once() -> None:
    arb, _ = make(100)
    add(arb, "kv")
    demand(arb, "kv", 20)
    arb.plan()
    borrow(arb, "job", 75)
    assert kinds(arb.plan()) == [("grant", "job", 75)]  # one grant of all of it, not chunk by chunk
    assert arb.tenants["job"].pinned and arb.free_bytes == 5 * MiB
    row = arb.status()["tenants"][0]
    assert (row["name"], row["kind"], row["want_bytes"], row["lease_bytes"]) == ("job", "borrow", 75 * MiB, 75 * MiB)


def test_a_borrower_is_granted_nothing_until_all_of_it_is_free() -> None:
    arb, _ = make(100)
    add(arb, "a", guarantee=10)
    add(arb, "b", guarantee=10)
    demand(arb, "a", 50)
    demand(arb, "b", 40)  # both idle later: lease above want
    arb.plan()
    demand(arb, "a", 10)
    demand(arb, "b", 30)
    assert arb.plan() == []  # idle leases stay while nobody needs them
    borrow(arb, "job", 75)  # 10 free: it needs 65 more
    # no partial grant; idle memory first (a's 40 above its want), then b's live memory above
    # its target, never below either guarantee
    # (b's target: 14, its want above guarantee in whole chunks of the 5 MiB left beside the job)
    assert kinds(arb.plan()) == [("reclaim", "a", 10), ("reclaim", "b", 14)]
    assert arb.tenants["job"].lease == 0
    release(arb, "a")
    assert arb.plan() == []  # 50 free of the 75: still nothing
    assert arb.tenants["job"].lease == 0 and arb.free_bytes == 50 * MiB
    release(arb, "b")
    assert kinds(arb.plan()) == [("grant", "job", 75)]
    assert arb.tenants["a"].lease == 10 * MiB and arb.tenants["b"].lease == 14 * MiB


def test_a_granted_borrower_is_pinned_until_it_leaves() -> None:
    arb, _ = make(100)
    add(arb, "low", guarantee=10)
    borrow(arb, "job", 60)
    arb.plan()
    add(arb, "high", prio=5)
    demand(arb, "high", 100)  # a higher priority wants everything
    demand(arb, "low", 30)
    # the borrower's lease is set aside like a guarantee: high gets the rest, low keeps its
    # guarantee, and nothing is asked of the borrower
    assert arb.targets() == {"low": 10 * MiB, "job": 60 * MiB, "high": 30 * MiB}
    assert kinds(arb.plan()) == [("grant", "high", 30)]
    assert arb.tenants["job"].reclaim_to is None and arb.tenants["job"].lease == 60 * MiB
    demand(arb, "low", 90)
    arb.plan()
    assert arb.tenants["job"].reclaim_to is None
    # a guarantee cannot be promised out of borrowed memory
    with pytest.raises(ArbiterError, match="does not fit: .* borrowed 62914560") as e:
        add(arb, "late", guarantee=40)
    assert e.value.code == "guarantee_does_not_fit"
    arb.remove("job")  # it left: its memory goes to who wants it
    assert kinds(arb.plan()) == [("grant", "high", 90)]


def test_a_borrower_comes_before_kv_tenants_of_its_level_but_after_higher_levels() -> None:
    arb, _ = make(100)
    add(arb, "kv", prio=0)
    demand(arb, "kv", 100)
    borrow(arb, "first", 60)
    borrow(arb, "second", 60)  # does not fit beside the first: nothing, not the 40 left
    assert arb.targets() == {"kv": 40 * MiB, "first": 60 * MiB, "second": 0}
    add(arb, "vip", prio=1)
    demand(arb, "vip", 50)
    # vip first; then at level 0 neither borrower fits in the 50 left, and the KV tenant takes it
    assert arb.targets() == {"kv": 50 * MiB, "first": 0, "second": 0, "vip": 50 * MiB}
    borrow(arb, "top", 50, prio=2)
    # top (50), then vip (50); level 0 gets nothing
    assert arb.targets() == {"kv": 0, "first": 0, "second": 0, "vip": 50 * MiB, "top": 50 * MiB}


def test_a_borrower_whose_want_cannot_fit_beside_guarantees_waits_and_takes_nothing() -> None:
    arb, _ = make(100)
    add(arb, "a", guarantee=50)
    add(arb, "b", guarantee=30)
    demand(arb, "a", 50)
    demand(arb, "b", 30)
    arb.plan()
    borrow(arb, "job", 30)  # 20 left after guarantees
    assert arb.targets()["job"] == 0
    assert arb.plan() == []  # no reclaim: guarantees are never taken
    assert arb.tenants["a"].lease == 50 * MiB and arb.tenants["b"].lease == 30 * MiB
    assert arb.tenants["job"].lease == 0 and arb.free_bytes == 20 * MiB


def test_borrower_registrations_that_make_no_sense_are_refused() -> None:
    arb, _ = make(100)
    for kw, text in [
        (dict(guarantee=MiB, max_bytes=10 * MiB), "a borrower has no guarantee"),
        (dict(guarantee=0, max_bytes=0), "a borrower's max_bytes 0 must be > 0 and within the budget"),
        (dict(guarantee=0, max_bytes=200 * MiB), "a borrower's max_bytes 209715200 must be > 0 and within"),
        (dict(guarantee=0, max_bytes=10 * MiB, lease=4 * MiB), "holds all of its max_bytes 10485760 or nothing"),
        (dict(guarantee=0, max_bytes=10 * MiB, kind="gpu"), r"kind must be one of \['kv', 'borrow'\], got 'gpu'"),
    ]:
        kw = {"kind": "borrow"} | kw
        with pytest.raises(ArbiterError, match=text) as e:
            arb.register("job", 1, 0, kw.pop("guarantee"), CHUNK, kw.pop("max_bytes"), **kw)
        assert e.value.code == "bad_value"
    assert arb.tenants == {}
    add(arb, "kv")
    arb.disconnected("kv")
    with pytest.raises(ArbiterError, match="'kv' is a kv tenant .* not a borrow one"):
        arb.register("kv", 1000, 0, 0, CHUNK, CHUNK, kind="borrow")
    assert arb.tenants["kv"].kind == "kv"
