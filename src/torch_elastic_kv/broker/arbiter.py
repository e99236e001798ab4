"""Who gets the device's KV memory: the broker's arbitration, as plain bookkeeping.

No sockets and no clock of its own: the daemon feeds it what tenants say and sends what
``plan()`` returns. Every byte of the budget is either free or in exactly one tenant's lease;
a lease shrinks only when its tenant confirms the release (``released``) or its process is
gone (``remove``), so memory is never counted free while someone may still hold it.

The rule, per ``plan()``:

1. Targets. Every tenant is owed its guarantee. What remains goes to priority levels from the
   highest down: a level whose wants (demand, at least the guarantee, at most the tenant's
   max) all fit gets them; the first level that does not fit splits what is left among its
   tenants in proportion to their want above guarantee (demand-weighted shares, whole
   chunks), and lower levels get only their guarantees.
2. Grants. Tenants below their target, highest priority first, get free memory up to it.
   A tenant with a reclaim outstanding is granted nothing until it has answered.
3. Reclaims, when grants could not cover every target. Idle memory first (lease above what
   the tenant wants), lowest priority first; then live memory above target (which is never
   below the guarantee), lowest priority first. The tenant is asked to bring its lease down
   to a number by a deadline; it preempts (swap or recompute) as needed and answers with
   ``released``.

A lease above the tenant's want is left alone while nobody else needs the memory: the
tenant's own policy already returns idle memory to the device, and taking the lease too
would only cost a round trip at its next burst.

Borrowers (``kind="borrow"``): a tenant that is not a KV cache but any workload wanting a
fixed amount of memory (a training step between generation phases, a one-off job). It
wants exactly its ``max_bytes``, all or nothing, and has no guarantee:

- In step 1, a priority level's borrowers come before its KV tenants (oldest registration
  first). A borrower's target is its whole want if that fits in what guarantees and higher
  levels leave, else nothing: a partial lease is memory it could not use.
- In step 2, a borrower is granted only its whole target at once; while free memory is
  short of it, it gets nothing and step 3 reclaims the difference from others (idle leases
  first, then live KV above target, lowest priority first, never below a guarantee).
- Once granted, its lease is pinned: the memory is in use by work that cannot give part of
  it back, so it is never reclaimed, and in step 1 it is set aside before anything else, like
  a guarantee, until the borrower leaves (or its process is gone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["KINDS", "Action", "Arbiter", "ArbiterError", "Tenant"]

# what a tenant is: a KV cache that follows its demand, or a borrower of a fixed amount
KINDS = ("kv", "borrow")


class ArbiterError(ValueError):
    """A request the arbiter refuses; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _floor(n: int, unit: int) -> int:
    return n // unit * unit


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass
class Tenant:
    """One tenant process and what it holds."""

    name: str
    pid: int
    priority: int
    guarantee: int
    chunk: int
    max_bytes: int
    lease: int = 0
    resident: int = 0
    live: int = 0
    demand: int = 0
    running: int = 0
    waiting: int = 0
    cached: int = 0  # of resident, cached prefix pages: idle memory the tenant gives up first
    connected: bool = True
    reclaim_to: Optional[int] = None  # lease asked for by an outstanding reclaim
    reclaim_seq: int = 0
    reclaim_deadline: float = 0.0
    kind: str = "kv"
    order: int = 0  # registration order: borrowers of one level are served oldest first

    @property
    def pinned(self) -> bool:
        """A borrower that holds its whole want: its lease is in use and never reclaimed."""
        return self.kind == "borrow" and self.lease >= self.max_bytes

    @property
    def want(self) -> int:
        """Bytes this tenant would use now: for a KV tenant its demand in whole chunks, within
        [guarantee, max]; for a borrower exactly its max."""
        if self.kind == "borrow":
            return self.max_bytes
        return min(self.max_bytes, max(self.guarantee, _ceil(self.demand, self.chunk)))

    def row(self) -> dict[str, Any]:
        """The tenant as a status-reply row."""
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "priority": self.priority,
            "guarantee_bytes": self.guarantee,
            "lease_bytes": self.lease,
            "resident_bytes": self.resident,
            "live_bytes": self.live,
            "demand_bytes": self.demand,
            "want_bytes": self.want,
            "running": self.running,
            "waiting": self.waiting,
            "cached_bytes": self.cached,
            "connected": self.connected,
            "reclaiming_to": self.reclaim_to,
            "idle_bytes": max(0, self.lease - self.want),  # what a reclaim takes first
        }


@dataclass(frozen=True)
class Action:
    """What ``plan()`` decided for one tenant: ``grant`` (lease raised now) or ``reclaim``
    (lease to be brought down to ``lease_bytes`` by ``deadline``)."""

    kind: str
    tenant: str
    lease_bytes: int
    seq: int
    deadline: float = 0.0


class Arbiter:
    """The budget of one device and the leases of its tenants."""

    def __init__(
        self, budget_bytes: int, *, reclaim_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
            raise ValueError(f"Arbiter: budget_bytes must be a positive int, got {budget_bytes!r}")
        if not reclaim_seconds > 0:
            raise ValueError(f"Arbiter: reclaim_seconds must be > 0, got {reclaim_seconds!r}")
        self.budget = budget_bytes
        self.reclaim_seconds = float(reclaim_seconds)
        self.clock = clock
        self.tenants: dict[str, Tenant] = {}
        self._seq = 0
        self._registrations = 0

    # -- figures --------------------------------------------------------------------------------
    @property
    def leased_bytes(self) -> int:
        return sum(t.lease for t in self.tenants.values())

    @property
    def free_bytes(self) -> int:
        """Budget not in any lease (negative only while re-registered holdings exceed it)."""
        return self.budget - self.leased_bytes

    def status(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "free_bytes": max(0, self.free_bytes),
            "tenants": [t.row() for t in sorted(self.tenants.values(), key=lambda t: t.name)],
        }

    # -- what tenants say -----------------------------------------------------------------------
    def register(
        self,
        name: str,
        pid: int,
        priority: int,
        guarantee: int,
        chunk: int,
        max_bytes: int,
        lease: int = 0,
        resident: int = 0,
        kind: str = "kv",
    ) -> Tenant:
        """Add a tenant (or take back one whose connection dropped: same name and pid).

        ``lease``/``resident``: what a tenant re-registering with a new broker holds; the
        broker counts it as leased (it is memory in use) and reclaims any excess through
        ``plan()``. Refuses a taken name, a guarantee the budget cannot honour, and holdings
        no tenant can have: a lease above the tenant's max or above the whole budget, resident
        memory above its max. ``max_bytes`` may exceed the budget (a tenant's pool can be
        larger than its device's share); the budget bounds what it is granted anyway. Nothing
        changes when it refuses.

        ``kind``: ``"kv"`` or ``"borrow"`` (see the module docstring). A borrower wants
        ``max_bytes``, which must be > 0 and within the budget, and has no guarantee."""
        if kind not in KINDS:
            raise ArbiterError("bad_value", f"register: kind must be one of {list(KINDS)}, got {kind!r}")
        if kind == "borrow":
            if guarantee:
                raise ArbiterError(
                    "bad_value", f"register: a borrower has no guarantee (its grant is all or nothing), got {guarantee}"
                )
            if not 0 < max_bytes <= self.budget:
                raise ArbiterError(
                    "bad_value",
                    f"register: a borrower's max_bytes {max_bytes} must be > 0 and within the budget {self.budget}",
                )
            if lease not in (0, max_bytes):
                raise ArbiterError(
                    "bad_value", f"register: a borrower holds all of its max_bytes {max_bytes} or nothing, not {lease}"
                )
        if chunk <= 0:
            raise ArbiterError("bad_value", f"register: chunk_bytes must be > 0, got {chunk}")
        if guarantee > max_bytes:
            raise ArbiterError(
                "bad_value", f"register: guarantee_bytes {guarantee} exceeds the tenant's max_bytes {max_bytes}"
            )
        if lease > max_bytes:
            raise ArbiterError("bad_value", f"register: lease_bytes {lease} exceeds the tenant's max_bytes {max_bytes}")
        if lease > self.budget:
            raise ArbiterError("bad_value", f"register: lease_bytes {lease} exceeds the budget {self.budget}")
        if resident > _ceil(max_bytes, chunk):
            raise ArbiterError(
                "bad_value", f"register: resident_bytes {resident} exceeds the tenant's max_bytes {max_bytes}"
            )
        old = self.tenants.get(name)
        if old is not None and (old.connected or old.pid != pid):
            raise ArbiterError("name_taken", f"register: tenant name {name!r} is taken (pid {old.pid})")
        others = sum(t.guarantee for t in self.tenants.values() if t.name != name)
        # a granted borrower's lease is memory in use until it leaves: no guarantee can count on it
        borrowed = sum(t.lease for t in self.tenants.values() if t.name != name and t.pinned)
        if guarantee and guarantee + others + borrowed > self.budget:
            raise ArbiterError(
                "guarantee_does_not_fit",
                f"register: guarantee_bytes {guarantee} does not fit: budget {self.budget}, "
                f"other tenants' guarantees {others}, borrowed {borrowed}, room {self.budget - others - borrowed}",
            )
        if old is not None and old.kind != kind:
            raise ArbiterError(
                "name_taken", f"register: tenant name {name!r} is a {old.kind} tenant (pid {old.pid}), not a {kind} one"
            )
        self._registrations += 1
        t = Tenant(
            name,
            pid,
            priority,
            guarantee,
            chunk,
            max_bytes,
            lease=lease,
            resident=resident,
            kind=kind,
            order=self._registrations if old is None else old.order,
        )
        if old is not None:  # a reconnect: what the broker knew stands unless the tenant says more
            t.lease = max(lease, old.lease)
            t.demand, t.live, t.running, t.waiting = old.demand, old.live, old.running, old.waiting
        self.tenants[name] = t
        return t

    def report(
        self, name: str, *, demand: int, resident: int, live: int, running: int, waiting: int, cached: int = 0
    ) -> None:
        """The tenant's figures. Resident and live memory above its max (in whole chunks: its
        pool grows by chunks) are impossible and refused; demand may exceed anything (it is a
        wish, capped by the max when targets are set). Nothing changes when it refuses."""
        t = self._get(name)
        cap = _ceil(t.max_bytes, t.chunk)
        for field, value in (("resident_bytes", resident), ("live_bytes", live), ("cached_bytes", cached)):
            if value > cap:
                raise ArbiterError("bad_value", f"report: {field} {value} exceeds the tenant's max_bytes {t.max_bytes}")
        t.demand, t.resident, t.live, t.running, t.waiting = demand, resident, live, running, waiting
        t.cached = cached

    def released(self, name: str, seq: int, lease: int, resident: int) -> None:
        """The tenant's answer to reclaim ``seq``: its lease is now ``lease`` bytes."""
        t = self._get(name)
        if t.reclaim_to is None or seq != t.reclaim_seq:
            raise ArbiterError("out_of_order", f"released: no reclaim {seq} outstanding for {name!r}")
        if lease > t.lease:
            raise ArbiterError("bad_value", f"released: lease {lease} is above the lease held ({t.lease})")
        if resident > lease:
            raise ArbiterError("bad_value", f"released: resident {resident} is above the lease released to ({lease})")
        t.lease, t.resident = lease, resident
        t.reclaim_to = None

    def disconnected(self, name: str) -> None:
        """The tenant's connection is gone; its lease stays until ``remove`` (process gone)."""
        if name in self.tenants:
            self.tenants[name].connected = False

    def remove(self, name: str) -> Optional[Tenant]:
        """The tenant's process is gone, and its memory with it: the lease is free."""
        return self.tenants.pop(name, None)

    def overdue(self) -> list[Tenant]:
        """Tenants whose outstanding reclaim is past its deadline (they get nothing more)."""
        now = self.clock()
        return [t for t in self.tenants.values() if t.reclaim_to is not None and now > t.reclaim_deadline]

    def _get(self, name: str) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            raise ArbiterError("unknown_tenant", f"no tenant {name!r}")
        return t

    # -- the decision ---------------------------------------------------------------------------
    def targets(self) -> dict[str, int]:
        """Each tenant's share of the budget (see the module docstring, step 1)."""
        # a pinned borrower's lease is set aside first, like a guarantee
        alloc = {t.name: t.lease if t.pinned else t.guarantee for t in self.tenants.values()}
        avail = max(0, self.budget - sum(alloc.values()))  # below 0 only while re-registered holdings overcommit
        for prio in sorted({t.priority for t in self.tenants.values()}, reverse=True):
            for b in sorted(
                (t for t in self.tenants.values() if t.priority == prio and t.kind == "borrow" and not t.pinned),
                key=lambda t: t.order,
            ):
                if b.want <= avail:  # all or nothing
                    alloc[b.name] = b.want
                    avail -= b.want
            level = [t for t in self.tenants.values() if t.priority == prio and t.kind == "kv"]
            extra = {t.name: max(0, t.want - t.guarantee) for t in level}
            total = sum(extra.values())
            if total <= avail:
                for t in level:
                    alloc[t.name] += extra[t.name]
                avail -= total
                continue
            exact = {t.name: avail * extra[t.name] / total for t in level}
            shares = {t.name: _floor(int(exact[t.name]), t.chunk) for t in level}
            avail -= sum(shares.values())
            # whole chunks leave less than a chunk per tenant over: hand it out a chunk at a
            # time, largest remainder first (the share rounding shorted most)
            for t in sorted(level, key=lambda t: (shares[t.name] - exact[t.name], t.name)):
                if shares[t.name] + t.chunk <= extra[t.name] and t.chunk <= avail:
                    shares[t.name] += t.chunk
                    avail -= t.chunk
            for name, s in shares.items():
                alloc[name] += s
            break
        return alloc

    def plan(self) -> list[Action]:
        """Grants and reclaims that move leases toward the targets; applies grants at once
        and records reclaims as outstanding. Call after anything changes."""
        now = self.clock()
        actions: list[Action] = []
        targets = self.targets()
        free = self.free_bytes
        needers = sorted(
            (t for t in self.tenants.values() if t.connected and t.reclaim_to is None and t.lease < targets[t.name]),
            # a level's borrowers first, oldest first; then its KV tenants, furthest below target first
            key=lambda t: (
                -t.priority,
                t.kind != "borrow",
                t.order if t.kind == "borrow" else t.lease - targets[t.name],
                t.name,
            ),
        )
        for t in needers:
            if t.kind == "borrow":  # the whole target or nothing: part of it is of no use
                grant = targets[t.name] - t.lease if targets[t.name] - t.lease <= free else 0
            else:
                grant = _floor(min(targets[t.name] - t.lease, free), t.chunk)
            if grant > 0:
                t.lease += grant
                free -= grant
                actions.append(Action("grant", t.name, t.lease, self._next_seq()))
        # what targets still lack, plus any overcommit (holdings re-registered beyond the
        # budget make free negative), less what free memory and outstanding reclaims cover
        shortfall = sum(max(0, targets[t.name] - t.lease) for t in needers)
        incoming = sum(t.lease - t.reclaim_to for t in self.tenants.values() if t.reclaim_to is not None)
        shortfall -= free + incoming
        if shortfall <= 0:
            return actions
        # what each tenant could give: idle (lease above want) first, then live above target
        idle = {t.name: max(0, t.lease - max(t.want, targets[t.name])) for t in self.tenants.values()}
        above = {t.name: max(0, t.lease - targets[t.name]) - idle[t.name] for t in self.tenants.values()}
        asked: dict[str, int] = {}
        for pool in (idle, above):
            for t in sorted(self.tenants.values(), key=lambda t: (t.priority, t.name)):
                if shortfall <= 0:
                    break
                if t.reclaim_to is not None or not t.connected or t.kind == "borrow":
                    continue
                take = min(pool[t.name], _ceil(shortfall, t.chunk))
                if take <= 0:
                    continue
                asked[t.name] = asked.get(t.name, 0) + take
                shortfall -= take
        for name, take in asked.items():
            t = self.tenants[name]
            t.reclaim_to = t.lease - take
            t.reclaim_seq = self._next_seq()
            t.reclaim_deadline = now + self.reclaim_seconds
            actions.append(Action("reclaim", name, t.reclaim_to, t.reclaim_seq, t.reclaim_deadline))
        return actions

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
