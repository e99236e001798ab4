"""The one replay harness: requests handed to an Engine at their arrival times, on the wall clock.

The main command (``bench.systems``), ``benchmarks/bench_engine.py`` (every request at t=0)
and ``benchmarks/gpu_check.py`` (bursts with idle gaps) all drive the Engine through
:func:`replay_engine`, and read latency from the same :class:`RequestRecord` properties, so
their TTFT, TPOT and memory figures are measured the same way (percentiles: ``bench.stats``).

A request is handed to the engine once its arrival time has passed; while the engine has work
it steps, and when it has none the harness sleeps until the next arrival, giving the policy an
idle tick and sampling memory every ``sample_interval_s``; after the last request finishes it
stays idle for ``tail_seconds`` so the idle footprint shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from .progress import Progress

__all__ = [
    "COUNTERS",
    "STALL_SECONDS",
    "Recorder",
    "ReplayRequest",
    "RequestRecord",
    "SystemRun",
    "clock",
    "latencies",
    "replay_engine",
]

clock = time.perf_counter
COUNTERS = ("preemptions", "grows", "shrinks", "compactions")  # the engine's, in SystemRun.counters
STALL_SECONDS = 120.0  # no token for this long while requests wait: the system is stuck


@dataclass(frozen=True)
class ReplayRequest:
    """One request of a replay: when it arrives (seconds after the replay starts), its prompt,
    and how many tokens it generates (EOS is ignored)."""

    arrival_s: float
    prompt_ids: list[int]
    output_tokens: int


@dataclass
class RequestRecord:
    """What happened to one request, in seconds since the replay started."""

    arrival_s: float
    output_tokens: int
    tokens: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def finish_s(self) -> float | None:
        return self.token_times_s[-1] if len(self.tokens) >= self.output_tokens else None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: first token time - scheduled arrival (None before it)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, for a finished request of 2+ tokens."""
        if self.finish_s is None or len(self.tokens) < 2:
            return None
        return (self.finish_s - self.token_times_s[0]) / (len(self.tokens) - 1)

    @property
    def e2e_s(self) -> float | None:
        """Arrival to last token, for a finished request."""
        return None if self.finish_s is None else self.finish_s - self.arrival_s


def latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """``{"ttft": [...], "tpot": [...], "e2e": [...]}`` over the records that have each figure."""
    out: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}
    for r in records:
        for key, value in (("ttft", r.ttft_s), ("tpot", r.tpot_s), ("e2e", r.e2e_s)):
            if value is not None:
                out[key].append(value)
    return out


@dataclass
class SystemRun:
    """Raw outcome of replaying requests through one system."""

    name: str
    records: list[RequestRecord]
    samples: list[tuple[float, int, int]]  # (seconds, resident KV bytes, live KV bytes)
    load_end_s: float  # when the last request finished
    end_s: float  # end of the idle tail
    counters: dict[str, int | None]  # preemptions, grows, shrinks, compactions (None: not exposed)
    info: dict[str, Any]  # pool facts: max/min bytes, granule bytes, arenas, ...
    load_cpu_s: float = 0.0  # this process's CPU seconds (all threads) from the start to load_end_s
    truncated: bool = False  # the deadline passed: unfinished requests were cancelled
    cached_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, prefix-cached KV bytes)
    prefix: dict[str, Any] | None = None  # the prefix cache's counters at the end (None: no prefix cache)
    # a pre-roll: records[:measured_from] are its requests, left out of the figures, and the
    # measured window starts at window_start_s
    measured_from: int = 0
    window_start_s: float = 0.0
    # the engine's counters (as ``counters`` and ``prefix``) just before the window's first request
    # was handed over, and how many pre-roll requests had no first token then (their lookups, if
    # any, are still to come and count in the window); None without a pre-roll or an engine
    at_window: dict[str, Any] | None = None


class _Arrival(Protocol):
    arrival_s: float
    output_tokens: int


class Recorder:
    """Collects token times and memory samples against one start time."""

    def __init__(self, requests: Sequence[_Arrival], progress: Progress, name: str) -> None:
        self.records = [RequestRecord(r.arrival_s, r.output_tokens) for r in requests]
        self.samples: list[tuple[float, int, int]] = []
        self.progress = progress
        self.name = name
        self.t0 = clock()
        self.cpu0 = time.process_time()
        self.last_progress = 0.0

    def check_progress(self) -> None:
        """Raise if requests are pending but no token came for ``STALL_SECONDS`` (a stuck system
        must end the run with an error, not hang it)."""
        now = self.now()
        if now - self.last_progress > STALL_SECONDS:
            pending = sum(1 for r in self.records if r.arrival_s <= now and r.finish_s is None)
            if pending:
                raise RuntimeError(
                    f"{self.name}: no output token for {STALL_SECONDS:g} s with {pending} arrived requests unfinished"
                )
            self.last_progress = now

    def now(self) -> float:
        return clock() - self.t0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def token(self, index: int, token: int, at: float) -> None:
        record = self.records[index]
        if len(record.tokens) < record.output_tokens:
            record.tokens.append(int(token))
            record.token_times_s.append(at)
            self.progress.tokens(1)
            self.last_progress = max(self.last_progress, at)

    def sample(self, resident: int, live: int, at: float | None = None) -> None:
        self.samples.append((self.now() if at is None else at, int(resident), int(live)))

    def sleep_until(self, deadline: float, interval: float, sample: Callable[[], None]) -> None:
        """Sleep until ``deadline`` (seconds since t0), calling ``sample`` every ``interval``."""
        while True:
            remaining = deadline - self.now()
            if remaining <= 0:
                return
            time.sleep(min(interval, remaining))
            sample()


class EngineLike(Protocol):
    def add_request(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> int: ...
    def step(self) -> list[tuple[int, int]]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> dict: ...


def replay_engine(
    engine: EngineLike,
    requests: Sequence[ReplayRequest],
    *,
    name: str,
    sample_interval_s: float,
    tail_seconds: float,
    progress: Optional[Progress] = None,
    deadline_s: Optional[float] = None,
    measure_from: int = 0,
) -> SystemRun:
    """Drive ``engine`` through ``requests`` on the wall clock; one thread, so runs are reproducible.

    Idle ticks call ``engine.maintain()`` (an empty ``step()`` for engines without it). Memory
    after a step comes from the engine's per-step timeline when it keeps one (cheap, taken
    inside the step), else from ``stats()``. ``deadline_s`` (seconds after the start) bounds
    the load: once it passes, unfinished requests are cancelled (``engine.cancel``) and the run
    is marked truncated; the idle tail still runs. ``measure_from`` > 0: ``requests[:measure_from]``
    are a pre-roll; the engine's counters are read just before ``requests[measure_from]`` is
    handed over (``SystemRun.at_window``), so the figures can leave the pre-roll's out.
    """
    rec = Recorder(requests, progress or Progress(len(requests), enabled=False), name)
    index_of: dict[int, int] = {}
    next_arrival = 0
    timeline = getattr(engine, "timeline", None)
    idle_policy_tick = getattr(engine, "maintain", None) or engine.step
    truncated = False
    # cached pages are read off the prefix cache directly: cheap, and the timeline does not keep them
    prefix = getattr(engine, "prefix", None)
    page_bytes = getattr(getattr(engine, "pool", None), "page_bytes", 0)
    cached: list[tuple[float, int]] = []

    def sample_cached() -> None:
        if prefix is not None:
            cached.append((rec.samples[-1][0], prefix.cached_pages * page_bytes))

    def sample() -> None:
        stats = engine.stats()
        rec.sample(stats["resident_bytes"], stats["live_bytes"])
        sample_cached()

    def sample_after_step() -> None:
        if timeline:
            entry = timeline[-1]
            rec.sample(entry["resident_bytes"], entry["live_bytes"])
            sample_cached()
        else:
            sample()

    def idle_tick() -> None:
        idle_policy_tick()
        sample()

    at_window: dict[str, Any] | None = None

    def read_counters() -> dict[str, Any]:
        stats = engine.stats()
        out = {k: stats.get(k) for k in COUNTERS}
        out.update({k: v for k, v in stats.items() if k.startswith("prefix_")})
        out["preroll_without_first_token"] = sum(1 for r in rec.records[:measure_from] if r.first_token_s is None)
        out["t_s"] = rec.now()
        return out

    sample()
    while True:
        now = rec.now()
        if deadline_s is not None and now > deadline_s and (engine.has_unfinished() or next_arrival < len(requests)):
            truncated = True
            for request_id, index in index_of.items():
                if rec.records[index].finish_s is None:
                    engine.cancel(request_id)  # type: ignore[attr-defined]
            break
        while next_arrival < len(requests) and requests[next_arrival].arrival_s <= now:
            request = requests[next_arrival]
            if next_arrival == measure_from and measure_from > 0:
                at_window = read_counters()
            request_id = engine.add_request(request.prompt_ids, max_new_tokens=request.output_tokens, eos_token_id=None)
            index_of[request_id] = next_arrival
            next_arrival += 1
        if engine.has_unfinished():
            produced = engine.step()
            at = rec.now()
            for request_id, token, _reason in produced:
                if token is not None:
                    rec.token(index_of[request_id], token, at)
            sample_after_step()
            if not produced:
                rec.check_progress()
        elif next_arrival < len(requests):
            rec.sleep_until(requests[next_arrival].arrival_s, sample_interval_s, idle_tick)
        else:
            break
    load_end, load_cpu = rec.now(), rec.cpu()
    rec.sleep_until(load_end + tail_seconds, sample_interval_s, idle_tick)
    stats = engine.stats()
    counters = {k: stats.get(k) for k in COUNTERS}
    prefix_stats = None
    if stats.get("prefix_caching"):
        prefix_stats = {k: v for k, v in stats.items() if k.startswith("prefix_") or k.startswith("cached_")}
    return SystemRun(
        name,
        rec.records,
        rec.samples,
        load_end,
        rec.now(),
        counters,
        {},
        load_cpu,
        truncated,
        cached,
        prefix_stats,
        measured_from=measure_from,
        at_window=at_window,
    )
