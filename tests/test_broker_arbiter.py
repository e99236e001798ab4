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
