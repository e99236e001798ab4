"""One Engine per rank of a tensor-parallel group, kept in step by rank 0.

Levels: the group (N processes, one per device; gloo on CPU) -> one ``Engine`` per rank, over
that rank's shard of the model (``shard.py``) and its own elastic pool of its KV heads ->
rounds: each change of state is one round, decided by rank 0 and replayed by every rank.

How the ranks stay in step. Rank 0 takes the requests, the cancels and the budget changes;
each round it broadcasts one ``Plan`` (the requests that arrived, with their ids, one operation
— a step, an idle tick, a cancel, a budget change, sleep, wake, a prefix-cache reset — and the
group's clock) and every rank, rank 0 included, applies the same plan to its own Engine. The
scheduler, the policy, the ``KVBudget`` and the prefix cache are deterministic given their
inputs and the clock, so every rank makes the same decisions: the same batch, the same page
ids mapped, freed, moved by a compaction and swapped, and so equal page tables by
construction. After the round every rank reports a digest of its page table, and rank 0
checks them (``debug``: a mismatch raises; otherwise it is logged). This is SGLang's layout
(each tensor-parallel worker runs the scheduler on the requests rank 0 broadcasts) rather
than a plan of page ids: one implementation of placement, compaction and swap serves every
rank, and the plan stays as small as the inputs.

What is not deterministic is made collective:

* a map of KV chunks (the host or device may be short on one rank only) goes through
  ``CollectiveMapGuard``: every rank maps, all learn each rank's outcome in the same call,
  and if any failed those that mapped unmap again and all raise ``MemoryError``: the
  scheduler then keeps the request waiting, unchanged, on every rank, as it does on one;
* the sampled tokens are rank 0's (gathered after each forward); a step that failed on any
  rank before its forward's first all-reduce fails on every rank at one status check and
  advances nothing (``StepGuard``); a forward that fails midway takes the group down;
* the KV ceiling is the smallest over the ranks (an all-reduce MIN), so memory decisions fit
  the rank with the least memory;
* time: the Engines' clock is the group's (rank 0's time at the start of the round), and
  they run no background memory thread; rank 0 runs idle ticks as rounds instead.

A rank that dies or stops answering breaks the group: rank 0's next collective fails (or its
launcher sees the process exit) and the group goes down; see ``serve/tp_front.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..engine.engine import Engine
from ..engine.policy import ElasticPolicy
from ..kv.pool import default_max_bytes
from .devices import model_backend
from .shard import shard_llama

_log = logging.getLogger(__name__)

__all__ = [
    "FAIL_FORWARD_ENV",
    "FAIL_MAPS_ENV",
    "CollectiveMapGuard",
    "GroupClock",
    "Plan",
    "RankGuards",
    "StepGuard",
    "StepRefused",
    "TensorParallelEngine",
    "TensorParallelGroup",
    "build_rank_engine",
    "follow",
]

# "RANK:N": that rank refuses its next N maps of KV chunks (tests inject a failure on one rank)
FAIL_MAPS_ENV = "EKV_TP_FAIL_MAPS"
# "RANK:N[:before|inside]": that rank's next N steps fail just before the forward's check, or
# after its first all-reduce (tests: a step undone on every rank; a group that goes down)
FAIL_FORWARD_ENV = "EKV_TP_FAIL_FORWARD"
# "1": a page-table mismatch between the ranks raises instead of being logged
DEBUG_ENV = "EKV_TP_DEBUG"

_OPS = ("step", "maintain", "cancel", "set_budget", "set_lease", "sleep", "wake", "reset_prefix_cache", "stop")


class GroupBroken(RuntimeError):
    """A collective failed: a rank died or stopped answering; the group cannot go on."""


class TensorParallelGroup:
    """The ranks' gloo process group and the three collectives the rounds use, plus the group
    the model's all-reduces go over (``model_group``: None on CPU, the default gloo group; an
    NCCL group when the ranks run on CUDA, one GPU each: ``parallel/devices.py``)."""

    def __init__(self, rank: int, world: int, timeout: float, model_group: Any = None, device: str = "cpu") -> None:
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self.model_group = model_group
        self.device = device

    @classmethod
    def init(cls, rank: int, world: int, init_method: str, timeout: float, device: str = "cpu") -> TensorParallelGroup:
        """Join the group (waits up to ``timeout`` seconds for every rank). ``device``: this
        rank's ("cpu", or its own "cuda:N"); on CUDA it becomes the current device and every
        rank also joins an NCCL group for the model's all-reduces (collective: all ranks pass a
        CUDA device or none does)."""
        if model_backend(device) == "nccl":
            torch.cuda.set_device(torch.device(device))  # NCCL's communicator binds to it
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        model_group = None
        if model_backend(device) == "nccl":
            model_group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=timeout))
            _log.info("tensor parallel: rank %d on %s, the model's all-reduces over NCCL", rank, device)
        return cls(rank, world, timeout, model_group, device)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as exc:
            raise GroupBroken(f"broadcast failed: {exc}") from exc
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except Exception as exc:
            raise GroupBroken(f"all-gather failed: {exc}") from exc
        return out

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks."""
        t = torch.tensor([int(value)], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        except Exception as exc:
            raise GroupBroken(f"all-reduce failed: {exc}") from exc
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class GroupClock:
    """The Engines' clock: rank 0's monotonic time at the start of the current round, the same
    on every rank, so that time-driven decisions (idle give-back, prefix expiry) agree."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _fail_maps_for(rank: int) -> int:
    """Maps this rank is told to refuse by ``$EKV_TP_FAIL_MAPS`` ("RANK:N")."""
    text = os.environ.get(FAIL_MAPS_ENV, "").strip()
    if not text:
        return 0
    try:
        who, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"${FAIL_MAPS_ENV} must be RANK:N, got {text!r}") from None
    return count if who == rank else 0


class CollectiveMapGuard:
    """``KVPagePool.set_map_guard`` for a group: a map succeeds on every rank or on none.

    Every rank maps, then all exchange their outcome in one all-gather; if any failed, the
    ranks that mapped unmap again and every rank raises the same ``MemoryError`` naming the
    first rank that failed. ``refuse`` maps are refused on this rank first (a test hook)."""

    def __init__(self, group: TensorParallelGroup, refuse: int = 0) -> None:
        self.group = group
        self.refuse = refuse
        self.refused = 0  # maps refused here by the hook
        self.failures = 0  # maps that failed on some rank and were undone here

    def __call__(self, chunks: list[int], map_chunks: Callable[[], None], unmap_chunks: Callable[[], None]) -> None:
        error: Optional[str] = None
        try:
            if self.refuse > 0:
                self.refuse -= 1
                self.refused += 1
                raise MemoryError(f"refused by ${FAIL_MAPS_ENV}")
            map_chunks()
        except Exception as exc:  # a driver error counts as a failed map too: all ranks must agree
            error = f"{type(exc).__name__}: {exc}"
        outcomes = self.group.gather(error)
        failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
        if not failed:
            return
        if error is None:
            unmap_chunks()
        self.failures += 1
        rank, why = failed[0]
        raise MemoryError(
            f"tensor parallel: rank {rank} could not map {len(chunks)} KV chunk(s) ({why}); "
            f"undone on all {self.group.world} ranks"
        )


@dataclass
class Plan:
    """One round: the requests that arrived (``(request_id, prompt_ids, max_new_tokens,
    eos_token_id, sampling)``, queued in this order) and the ids marked by ``expedite`` (they
    shape the next step's plan, so every rank marks them), then ``op`` with ``arg``, at ``now``."""

    op: str
    now: float
    arg: Any = None
    adds: list[tuple[int, Any, int, Any, Any]] = field(default_factory=list)
    expedites: list[int] = field(default_factory=list)


class StepRefused(RuntimeError):
    """A step failed on rank ``rank`` before its forward's collectives began; every rank raised
    this from the same check and the step advanced nothing on any of them."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def _fail_forward_for(rank: int) -> tuple[int, str]:
    """``(count, where)`` this rank is told to fail by ``$EKV_TP_FAIL_FORWARD``
    ("RANK:N[:before|inside]"; before: the default)."""
    text = os.environ.get(FAIL_FORWARD_ENV, "").strip()
    if not text:
        return 0, "before"
    parts = text.split(":")
    try:
        who, count = int(parts[0]), int(parts[1])
        where = parts[2] if len(parts) == 3 else "before"
        if len(parts) > 3 or where not in ("before", "inside") or count < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"${FAIL_FORWARD_ENV} must be RANK:N or RANK:N:before|inside, got {text!r}") from None
    return (count if who == rank else 0), where


class StepGuard:
    """Keeps a step's failures in step across the ranks.

    Every step round runs exactly one status check on every rank (an all-reduce MIN of "the
    first rank whose step failed"): at the model's forward pre-hook when the rank got that far
    (after packing the batch and planning its pages: everything of the step that can fail
    before the forward's first all-reduce), else where its step raised, else, with nothing to
    run, after the step. If any rank failed, every rank raises ``StepRefused`` from that check,
    before any collective of the forward: no token is recorded and no request advances, so the
    Engines keep their requests where they were, as one Engine does after a failed forward, and
    the next step runs the same batch again.

    After the check the forward's all-reduces run; a rank whose forward raises then (or whose
    collective fails) cannot leave the others in step: this raises ``GroupBroken`` and the group
    goes down (the others' all-reduce fails when the rank exits, or ``--tp-timeout`` ends it).

    ``fail``/``where``: the test hook (``$EKV_TP_FAIL_FORWARD``): this rank's next ``fail``
    steps raise just before the check ("before") or after the first row-parallel all-reduce
    ("inside")."""

    def __init__(self, group: TensorParallelGroup, fail: int = 0, where: str = "before") -> None:
        if where not in ("before", "inside"):
            raise ValueError(f"StepGuard: where must be 'before' or 'inside', got {where!r}")
        self.group = group
        self.fail = fail
        self.where = where
        self.injected = 0  # steps the hook failed here
        self.undone = 0  # steps that failed on some rank before the forward and advanced nothing here
        self.in_step = False
        self.checked = False
        self.forwarding = False  # between a passed check and the end of the forward

    def attach(self, model: Any) -> None:
        """Hook ``model`` (split already): the check before its forward, the end after it, and
        the "inside" test hook after the first row-parallel layer's all-reduce."""
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)
        if self.where == "inside" and self.fail > 0:
            model.model.layers[0].self_attn.o_proj.register_forward_hook(self._inside_forward)

    def begin(self) -> None:
        self.in_step, self.checked, self.forwarding = True, False, False

    def end(self) -> None:
        self.in_step = self.forwarding = False

    def check(self, error: Optional[str]) -> None:
        """The step's one status check: returns if every rank got here without an error, else
        raises ``StepRefused`` naming the first rank that failed (``error``: this rank's)."""
        self.checked = True
        world = self.group.world
        first = self.group.min(self.group.rank if error is not None else world)
        if first == world:
            self.forwarding = True
            return
        self.undone += 1
        why = f" ({error})" if first == self.group.rank else ""
        raise StepRefused(
            first,
            f"tensor parallel: the step failed on rank {first} before its forward{why}; undone on all {world} ranks",
        )

    def _before_forward(self, module: Any, args: Any) -> None:
        if not self.in_step or self.checked:
            return
        error = None
        if self.where == "before" and self.fail > 0:
            self.fail -= 1
            self.injected += 1
            error = f"RuntimeError: injected by ${FAIL_FORWARD_ENV}"
        self.check(error)

    def _after_forward(self, module: Any, args: Any, output: Any) -> None:
        self.forwarding = False

    def _inside_forward(self, module: Any, args: Any, output: Any) -> None:
        if self.in_step and self.forwarding and self.fail > 0:
            self.fail -= 1
            self.injected += 1
            raise RuntimeError(f"injected by ${FAIL_FORWARD_ENV} after an all-reduce")


@dataclass
class RankGuards:
    """What keeps one rank's Engine in step with the others: its maps and its steps."""

    maps: CollectiveMapGuard
    steps: StepGuard


def _sync_runner(engine: Engine, group: TensorParallelGroup, steps: StepGuard) -> None:
    """Every rank's step samples rank 0's tokens. A step that fails on any rank before its
    forward fails on every rank at the check (``StepGuard``); one that fails after the forward
    (sampling) fails on every rank at the gather of the tokens; one whose forward fails midway
    takes the group down."""
    run = engine.runner.run

    def synced(batch: Any) -> dict[int, Optional[int]]:
        tokens: Optional[dict[int, Optional[int]]] = None
        error: Optional[str] = None
        try:
            tokens = run(batch)
        except (StepRefused, GroupBroken):
            raise  # every rank knows already
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if steps.forwarding:
                raise GroupBroken(
                    f"the forward failed on rank {group.rank} after its all-reduces began ({error}); "
                    "the ranks cannot stay in step"
                ) from exc
            if not steps.checked:
                steps.check(error)  # raises StepRefused on every rank
        got = group.gather((error, tokens if group.rank == 0 else None))
        for rank, (err, _) in enumerate(got):
            if err is not None:
                raise RuntimeError(f"tensor parallel: the step failed on rank {rank} after its forward: {err}")
        return got[0][1]

    engine.runner.run = synced  # type: ignore[method-assign]


def build_rank_engine(
    model: Any,
    group: TensorParallelGroup,
    policy_kwargs: dict[str, Any],
    engine_kwargs: dict[str, Any],
    ceiling: Optional[Callable[[Any], Optional[int]]] = None,
) -> tuple[Engine, GroupClock, RankGuards]:
    """This rank's Engine: ``model`` split for the rank (in place), the KV ceiling the smallest
    over the ranks, the group's clock, no background thread, maps, steps and samples collective.

    ``ceiling(model)``: the KV ceiling in bytes for the split model (None: the pool's default
    share of the device); every rank must call this at the same point (it is collective)."""
    device = next(model.parameters()).device
    if group.model_group is not None and device != torch.device(group.device):
        raise ValueError(f"tensor parallel: rank {group.rank}'s model is on {device}, its group on {group.device}")
    shard_llama(model, group.rank, group.world, group.model_group)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the ranks share the machine's cores: more threads than cores spin against each other
        # while a rank waits in an all-reduce
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world))
    mine = ceiling(model) if ceiling is not None else None
    if mine is None:
        mine = default_max_bytes(device)
    smallest = group.min(mine)
    if smallest < mine:
        _log.info("tensor parallel: KV ceiling %d bytes, the smallest over the ranks (this one: %d)", smallest, mine)
    clock = GroupClock()
    policy = ElasticPolicy(**{**policy_kwargs, "max_bytes": smallest}, clock=clock)
    engine = Engine(model, policy=policy, background=False, **engine_kwargs)
    guards = RankGuards(
        CollectiveMapGuard(group, _fail_maps_for(group.rank)), StepGuard(group, *_fail_forward_for(group.rank))
    )
    engine.pool.set_map_guard(guards.maps)
    guards.steps.attach(model)
    _sync_runner(engine, group, guards.steps)
    return engine, clock, guards


def _step(engine: Engine, steps: StepGuard) -> Any:
    """``engine.step()`` with the step's one status check on every rank (``StepGuard``), wherever
    this rank's step ended: at the forward, where it raised, or after it (nothing to run)."""
    steps.begin()
    try:
        try:
            out = engine.step()
        except (StepRefused, GroupBroken):
            raise
        except Exception as exc:
            if not steps.checked:
                steps.check(f"{type(exc).__name__}: {exc}")  # raises StepRefused on every rank
            raise
        if not steps.checked:
            steps.check(None)
        return out
    finally:
        steps.end()


def _digest(engine: Engine) -> str:
    """What must be equal on every rank: each request's pages and tokens, the cached pages,
    the mapped pages."""
    table = engine.cache.page_table
    h = hashlib.sha256()
    for rid in sorted(table.ids()):
        entry = table.get(rid)
        h.update(repr((rid, entry.pages, entry.tokens)).encode())
    h.update(repr((table.cached_pages, engine.pool.stats()["resident_pages"])).encode())
    return h.hexdigest()[:16]


def _apply(engine: Engine, clock: GroupClock, guards: RankGuards, plan: Plan) -> tuple[Any, Optional[BaseException]]:
    """Apply ``plan`` to this rank's Engine: ``(result, error)``. The requests' ids must come
    out as rank 0 gave them; a different one means the ranks diverged (RuntimeError)."""
    clock.now = plan.now
    for rid, prompt, max_new, eos, sampling in plan.adds:
        got = engine.add_request(prompt, max_new, eos, sampling)
        if got != rid:
            raise RuntimeError(f"tensor parallel: request got id {got} here, {rid} on rank 0: the ranks diverged")
    for rid in plan.expedites:
        try:
            engine.expedite(rid)
        except ValueError:
            pass  # forgotten since it was marked: a stale mark is harmless, and equal on every rank
    try:
        if plan.op == "step":
            return _step(engine, guards.steps), None
        if plan.op == "maintain":
            return engine.maintain(), None
        if plan.op == "cancel":
            return engine.cancel(plan.arg), None
        if plan.op == "set_budget":
            return engine.set_budget(plan.arg), None
        if plan.op == "set_lease":  # a broker's grant or reclaim, for this rank's share
            engine.budget.set_lease(plan.arg)
            return engine.maintain(), None
        if plan.op == "sleep":
            return engine.sleep(), None
        if plan.op == "wake":
            return engine.wake(), None
        if plan.op == "reset_prefix_cache":
            return engine.reset_prefix_cache(), None
    except GroupBroken:
        raise
    except Exception as exc:
        return None, exc
    raise RuntimeError(f"tensor parallel: unknown operation {plan.op!r}")


def _report(engine: Engine, guards: RankGuards, rank: int, error: Optional[BaseException]) -> dict:
    """This rank's state after a round, as rank 0 shows it (``stats()["tensor_parallel"]``)."""
    ps = engine.pool.stats()
    return {
        "rank": rank,
        "pid": os.getpid(),
        "device": str(engine.pool.device),
        "digest": _digest(engine),
        "live_bytes": engine.cache.page_table.live_pages * engine.pool.page_bytes,
        "resident_bytes": ps["resident_bytes"],
        "page_bytes": engine.pool.page_bytes,
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "preemptions": engine.scheduler.preemptions,
        "steps": engine.stats()["steps"],
        "maps_refused": guards.maps.refused,
        "maps_undone": guards.maps.failures,
        "steps_refused": guards.steps.injected,
        "steps_undone": guards.steps.undone,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }


def follow(engine: Engine, clock: GroupClock, guards: RankGuards, group: TensorParallelGroup) -> int:
    """A rank other than 0: apply rank 0's plans until it says stop (returns 0) or the group
    breaks (logs one line, returns 1)."""
    try:
        while True:
            plan = group.broadcast(None)
            if plan.op == "stop":
                engine.close()
                return 0
            _, error = _apply(engine, clock, guards, plan)
            group.gather(_report(engine, guards, group.rank, error))
    except GroupBroken as exc:
        _log.error("torch_elastic_kv tensor parallel: rank %d: the group is down (%s); exiting", group.rank, exc)
        return 1


class TensorParallelEngine:
    """Rank 0's face of the group, used as an ``Engine``: requests, cancels, budget changes,
    sleep and wake become rounds that every rank applies; reads (stats, budget, request info)
    answer from rank 0's Engine. ``add_request`` is thread-safe and queues the request for the
    next round; every other change runs a round at once, one round at a time.

    ``on_broken(message)``: called once when a collective fails (a rank died or hung); the
    default raises ``GroupBroken`` from the round. ``tick_seconds``: how often an idle group
    runs a policy tick (the Engines have no background thread; memory goes back on these)."""

    def __init__(
        self,
        engine: Engine,
        clock: GroupClock,
        guards: RankGuards,
        group: TensorParallelGroup,
        *,
        debug: Optional[bool] = None,
        tick_seconds: Optional[float] = None,
        on_broken: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.guards = guards
        self.group = group
        self.debug = os.environ.get(DEBUG_ENV, "") == "1" if debug is None else debug
        self.on_broken = on_broken
        self._lock = threading.Lock()  # the queued requests
        self._round_lock = threading.RLock()  # one round at a time
        self._pending: list[tuple[int, Any, int, Any, Any]] = []
        self._expedites: list[int] = []  # expedite() marks for the next round
        self._next_id = 0
        self._broken: Optional[str] = None
        self._closed = False
        self.ranks: list[dict] = []  # each rank's report after the last round
        self.broker: Any = None  # a BrokerClient once attach_broker made the group a tenant
        self.rounds = 0
        self.plan_seconds = 0.0  # broadcasting the plans
        self.mismatches = 0
        self._last_round = time.monotonic()
        idle = engine.policy.idle_seconds
        self.tick_seconds = tick_seconds if tick_seconds is not None else min(1.0, max(0.05, idle / 4))
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="ekv-tp-ticker", daemon=True)
        self._ticker.start()

    def __getattr__(self, name: str) -> Any:
        # reads (budget, pool, policy, asleep, stats figures, ...) answer from rank 0's Engine
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Any, max_new_tokens: int, eos_token_id: Any = None, sampling: Any = None) -> int:
        """Check the request (``ValueError`` as ``Engine.add_request``, nothing queued) and queue
        it for the next round; returns the id every rank will give it. Any thread."""
        self._require_open("add_request")
        self.engine.check_request(prompt_ids, max_new_tokens, eos_token_id, sampling)
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._pending.append((rid, list(prompt_ids), max_new_tokens, eos_token_id, sampling))
        return rid

    def has_unfinished(self) -> bool:
        with self._lock:
            if self._pending:
                return True
        return self.engine.has_unfinished()

    def cancel(self, request_id: int) -> bool:
        """``Engine.cancel`` on every rank, in one round."""
        with self._lock:
            queued = any(p[0] == request_id for p in self._pending)
        if not queued:
            self.engine.request_info(request_id)  # ValueError for an unknown id, before any round
        return self._round("cancel", request_id)

    def expedite(self, request_id: int) -> bool:
        """``Engine.expedite`` on every rank, with the next round; True when the request is
        running on rank 0 now. Unknown id: ValueError."""
        self._require_open("expedite")
        with self._lock:
            if any(p[0] == request_id for p in self._pending):
                return False  # queued for the next round: not running yet
        if self.engine.request_info(request_id)["status"] != "running":
            return False
        with self._lock:
            self._expedites.append(request_id)
        return True

    def step(self) -> list:
        """One step on every rank; rank 0's ``StepOutput`` list."""
        return self._round("step")

    def maintain(self) -> Any:
        return self._round("maintain")

    def set_budget(self, nbytes: Optional[int]) -> None:
        """``Engine.set_budget`` on every rank (each rank's pool holds 1/N of the KV bytes: the
        budget is per rank)."""
        self._round("set_budget", nbytes)

    def set_lease(self, nbytes: Optional[int]) -> None:
        """A lease on every rank's budget in one round (``nbytes`` per rank; None: no lease)."""
        self._round("set_lease", nbytes)

    def attach_broker(self, client: Any) -> None:
        """Make the group one tenant of a memory broker (``broker.client.BrokerClient``): rank 0
        holds one lease for the group, and each grant or reclaim goes to every rank's budget in
        one round, 1/N each (the ranks hold equal shares of the KV heads). The group reports
        the sums over the ranks."""
        client.attach(
            _GroupLease(self), self._broker_stats, chunk_bytes=int(self.engine.pool.chunk_bytes) * self.group.world
        )
        self.broker = client

    def _broker_stats(self) -> dict[str, Any]:
        """The group's figures for the broker: rank 0's times the ranks where every rank holds
        the same (demand, live, cached), the ranks' own resident bytes where they are known."""
        s = self.engine.stats()
        n = self.group.world
        resident = sum(r["resident_bytes"] for r in self.ranks) if len(self.ranks) == n else s["resident_bytes"] * n
        return {
            "demand_bytes": s["demand_bytes"] * n,
            "resident_bytes": resident,
            "live_bytes": s["live_bytes"] * n,
            "cached_bytes": s.get("cached_bytes", 0) * n,
            "running": s["running"],
            "waiting": s["waiting"],
        }

    def sleep(self) -> None:
        self._round("sleep")

    def wake(self) -> None:
        self._round("wake")

    def reset_prefix_cache(self) -> int:
        return self._round("reset_prefix_cache")

    def stats(self) -> dict:
        """Rank 0's ``Engine.stats()``, queued requests counted as waiting, plus
        ``tensor_parallel``: size, rounds, plan_seconds (broadcasting plans), mismatches, and
        each rank's report after the last round (``ranks``)."""
        out = dict(self.engine.stats())
        with self._lock:
            out["waiting"] += len(self._pending)
        if self.broker is not None:
            out["broker_lease_bytes"] = self.broker.lease_bytes
        out["tensor_parallel"] = {
            "size": self.group.world,
            "rounds": self.rounds,
            "plan_seconds": self.plan_seconds,
            "mismatches": self.mismatches,
            "ranks": [dict(r) for r in self.ranks],
        }
        return out

    # -- rounds --------------------------------------------------------------------------------
    def _require_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"TensorParallelEngine.{what}: the engine is closed")
        if self._broken is not None:
            raise GroupBroken(self._broken)

    def _round(self, op: str, arg: Any = None) -> Any:
        with self._round_lock:
            self._require_open(op)
            with self._lock:
                adds, self._pending = self._pending, []
                expedites, self._expedites = self._expedites, []
            plan = Plan(op, time.monotonic(), arg, adds, expedites)
            try:
                t0 = time.perf_counter()
                self.group.broadcast(plan)
                self.plan_seconds += time.perf_counter() - t0
                result, error = _apply(self.engine, self.clock, self.guards, plan)
                reports = self.group.gather(_report(self.engine, self.guards, 0, error))
            except GroupBroken as exc:
                self._fail(str(exc))
                raise
            self.rounds += 1
            self._last_round = time.monotonic()
            self.ranks = reports
            self._check(reports, op)
            if isinstance(error, StepRefused) and error.rank != 0:
                # the failing rank's own message names the cause; this rank knows only who
                cause = (reports[error.rank]["error"] or str(error)).removeprefix("StepRefused: ")
                raise StepRefused(error.rank, cause)
            if error is not None:
                raise error
            for r in reports[1:]:
                if r["error"] is not None:
                    raise RuntimeError(f"tensor parallel: {op} failed on rank {r['rank']}: {r['error']}")
            return result

    def _check(self, reports: list[dict], op: str) -> None:
        digests = {r["digest"] for r in reports}
        if len(digests) == 1:
            return
        self.mismatches += 1
        message = f"tensor parallel: page tables differ between the ranks after {op}: " + ", ".join(
            f"rank {r['rank']} {r['digest']}" for r in reports
        )
        if self.debug:
            raise RuntimeError(message)
        _log.error(message)

    def _fail(self, message: str) -> None:
        if self._broken is None:
            # the callback first: a server's answers the requests in flight and exits, and it
            # refuses new requests itself (a broken engine here would make them 500s meanwhile)
            if self.on_broken is not None:
                self.on_broken(message)
            self._broken = message

    def _tick(self) -> None:
        """Idle policy ticks as rounds (memory goes back while nobody steps)."""
        while not self._stop.wait(self.tick_seconds):
            if time.monotonic() - self._last_round < self.tick_seconds:
                continue
            if not self._round_lock.acquire(blocking=False):
                continue  # a round is running: it ticks the policy itself
            try:
                if not self._closed and self._broken is None:
                    self._round("maintain")
            except GroupBroken:
                return
            except Exception:
                _log.exception("tensor parallel: idle tick failed")
            finally:
                self._round_lock.release()

    def close(self) -> None:
        """Stop every rank's Engine (each gives its KV memory back) and leave the group."""
        if self._closed:
            return
        self._stop.set()
        with self._round_lock:
            self._closed = True
            if self._broken is None:
                try:
                    self.group.broadcast(Plan("stop", time.monotonic()))
                except GroupBroken as exc:
                    self._fail(str(exc))
            self.engine.close()
        if self.broker is not None:
            broker, self.broker = self.broker, None
            broker.close()  # after the pools: the group leaves with nothing resident
        if self._ticker.is_alive() and self._ticker is not threading.current_thread():
            self._ticker.join(5)
        self.group.close()

    def __enter__(self) -> TensorParallelEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _GroupLease:
    """What a broker tenant steers (``engine.budget.LeaseTarget``), for a whole group: the lease
    is the group's, each rank's budget gets 1/N of it in one round."""

    def __init__(self, tp: TensorParallelEngine) -> None:
        self._tp = tp
        n = tp.group.world
        self.ceiling_bytes = tp.engine.budget.ceiling_bytes * n
        self.floor_bytes = tp.engine.budget.floor_bytes * n

    def set_lease(self, nbytes: Optional[int]) -> None:
        self._tp.set_lease(None if nbytes is None else nbytes // self._tp.group.world)
