"""The benchmark's wall-clock replay loop, against a stand-in engine that records what it is asked."""

from __future__ import annotations

import time

import pytest

from torch_elastic_kv.bench import replay, systems
from torch_elastic_kv.bench.progress import Progress
from torch_elastic_kv.bench.settings import BenchSettings
from torch_elastic_kv.bench.traces import Trace, TraceRequest
from torch_elastic_kv.engine.request import StepOutput


class RecordingEngine:
    """One token per step for every request added; remembers when requests came and idle ticks."""

    def __init__(self, produce: bool = True) -> None:
        self.produce = produce
        self.added: list[tuple[float, list[int], int]] = []
        self.remaining: dict[int, int] = {}
        self.maintain_calls: list[float] = []

    def add_request(self, prompt_ids, max_new_tokens, eos_token_id=None):
        assert eos_token_id is None
        request_id = 100 + len(self.added)  # ids unlike trace indices: the harness must map them
        self.added.append((time.perf_counter(), list(prompt_ids), max_new_tokens))
        self.remaining[request_id] = max_new_tokens
        return request_id

    def has_unfinished(self):
        return any(self.remaining.values())

    def step(self):
        if not self.produce:
            return []
        out = []
        for request_id, left in self.remaining.items():
            if left:
                self.remaining[request_id] = left - 1
                out.append(StepOutput(request_id, request_id * 10 + left, None if left > 1 else "length"))
        return out

    def maintain(self):
        self.maintain_calls.append(time.perf_counter())

    def stats(self):
        running = sum(1 for left in self.remaining.values() if left)
        return {
            "resident_bytes": 4096 * max(running, 1),
            "live_bytes": 4096 * running,
            "preemptions": 0,
            "grows": 1,
            "shrinks": 0,
            "compactions": 0,
        }


def _settings(**overrides) -> BenchSettings:
    values = dict(
        trace="t",
        systems=("elastic",),
        model_path=None,
        config="tiny",
        device="cpu",
        dtype="float32",
        seed=0,
        out="x",
        quick=True,
        time_scale=1.0,
        token_scale=1.0,
        window=(0.0, None),
        thin=1,
        max_bytes=None,
        min_bytes=0,
        headroom=0.1,
        idle_seconds=0.1,
        tail_seconds=0.3,
        max_running=4,
        max_batch_tokens=64,
        page_tokens=16,
        sample_interval_s=0.01,
        threads=1,
        progress=False,
    )
    values.update(overrides)
    return BenchSettings(**values)


def _replay(engine, trace, prompts, **kwargs):
    settings = _settings()
    return replay.replay_engine(
        engine,
        systems.replay_requests(trace, prompts),
        name="elastic",
        sample_interval_s=settings.sample_interval_s,
        tail_seconds=settings.tail_seconds,
        progress=Progress(len(prompts), enabled=False),
        **kwargs,
    )


def test_requests_arrive_on_the_wall_clock_and_idle_time_passes():
    trace = Trace("t", "mem", (TraceRequest(0.0, 3, 2), TraceRequest(0.25, 2, 3), TraceRequest(0.6, 1, 1)))
    prompts = [[5, 6, 7], [8, 9], [4]]
    engine = RecordingEngine()
    start = time.perf_counter()
    run = _replay(engine, trace, prompts)
    added_at = [t - start for t, _, _ in engine.added]
    for got, want in zip(added_at, (0.0, 0.25, 0.6)):
        assert want <= got < want + 0.1  # never early, and not held back
    assert [(p, n) for _, p, n in engine.added] == [([5, 6, 7], 2), ([8, 9], 3), ([4], 1)]
    # tokens land on the right requests, in order, with their times
    assert [r.tokens for r in run.records] == [[1002, 1001], [1013, 1012, 1011], [1021]]
    assert all(r.first_token_s >= r.arrival_s for r in run.records)
    # the gaps before 0.25 s and 0.6 s and the tail were idle: the policy got ticks there
    assert sum(1 for t in engine.maintain_calls if 0.05 < t - start < 0.2) >= 3
    assert run.end_s - run.load_end_s == pytest.approx(0.3, abs=0.05)
    assert run.samples[-1][1:] == (4096, 0)
    assert run.counters == {"preemptions": 0, "grows": 1, "shrinks": 0, "compactions": 0}


def test_a_stuck_engine_ends_the_run_with_an_error(monkeypatch):
    monkeypatch.setattr(replay, "STALL_SECONDS", 0.2)
    trace = Trace("t", "mem", (TraceRequest(0.0, 3, 2),))
    with pytest.raises(RuntimeError, match=r"elastic: no output token for 0.2 s with 1 arrived requests unfinished"):
        _replay(RecordingEngine(produce=False), trace, [[1, 2, 3]])


class CancellableEngine(RecordingEngine):
    """Produces one token per step, 10 ms per step, and records cancellations."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[int] = []

    def step(self):
        time.sleep(0.01)
        return super().step()

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.remaining[request_id] = 0
        return True


def test_a_deadline_cancels_what_is_unfinished_and_marks_the_run_truncated():
    trace = Trace("t", "mem", (TraceRequest(0.0, 2, 1), TraceRequest(0.0, 2, 10_000), TraceRequest(5.0, 1, 1)))
    engine = CancellableEngine()
    run = _replay(engine, trace, [[1, 2], [3, 4], [5]], deadline_s=0.2)
    assert run.truncated
    assert engine.cancelled == [101]  # the finished one is not cancelled; the late one never arrived
    assert [len(r.tokens) for r in run.records][0] == 1
    assert 5 < len(run.records[1].tokens) < 10_000 and run.records[1].finish_s is None
    assert run.records[2].tokens == []
    assert 0.2 <= run.load_end_s < 1.0  # it did not wait for the request due at 5 s
    assert run.end_s - run.load_end_s == pytest.approx(0.3, abs=0.05)  # the idle tail still ran


def test_latencies_come_from_the_records_and_skip_what_a_record_lacks():
    done = replay.RequestRecord(1.0, 3, [7, 8, 9], [1.5, 2.0, 3.5])
    single = replay.RequestRecord(0.0, 1, [4], [0.25])
    unfinished = replay.RequestRecord(2.0, 4, [1], [2.5])
    lat = replay.latencies([done, single, unfinished])
    assert lat["ttft"] == [0.5, 0.25, 0.5]
    assert lat["tpot"] == [1.0]  # (3.5 - 1.5) / 2; one-token and unfinished requests have none
    assert lat["e2e"] == [2.5, 0.25]


def test_counters_are_read_when_the_window_s_first_request_is_handed_over():
    trace = Trace("t", "mem", (TraceRequest(0.0, 2, 1), TraceRequest(0.0, 2, 10_000), TraceRequest(0.2, 1, 1)))
    engine = CancellableEngine()  # 10 ms a step: the long pre-roll request is still running at 0.2 s
    run = _replay(engine, trace, [[1, 2], [3, 4], [5]], deadline_s=0.4, measure_from=2)
    window = run.at_window
    assert window is not None and run.measured_from == 2
    assert window["t_s"] >= 0.2  # not before its arrival
    assert {k: window[k] for k in replay.COUNTERS} == {"preemptions": 0, "grows": 1, "shrinks": 0, "compactions": 0}
    assert window["preroll_without_first_token"] == 0  # both pre-roll requests had their first token
    assert len(engine.added) == 3
    # no pre-roll: nothing read
    assert _replay(RecordingEngine(), trace, [[1, 2]] * 3).at_window is None
