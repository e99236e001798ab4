"""Tensor parallel through the server (issue 26): ``serve --tensor-parallel-size 2`` on CPU, gloo,
the default model split over two processes, each with its own elastic pool of half the KV heads.

Every server listens on 127.0.0.1 on a free port; rank 1 is the server's child; both are
stopped (or checked gone) by pid.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from serve_helpers import ServerProcess, rss_shmem, wait_until
from torch_elastic_kv.engine.engine import Engine
from torch_elastic_kv.serve.default_model import build_default_model

ADMIN = "tp-admin"
MODEL = "ekv-default-llama"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CHUNK = 2 << 20

# two prompts share a 64-token prefix (four full pages): the second reuses the first's pages
SHARED = [(7 * i + 3) % 250 + 8 for i in range(64)]
PROMPTS = [SHARED + [20, 21, 22], SHARED + [30, 31, 32, 33, 34], [(11 * i) % 250 + 8 for i in range(40)]]


def _reference(prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens of one process (TP=1): the in-process Engine on the same default model."""
    with Engine(build_default_model(), background=False) as engine:
        return engine.generate(prompts, max_new)


def _complete(url: str, prompt: list[int], max_tokens: int, timeout: float = 120) -> list[int]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _tp(url: str) -> dict:
    stats = httpx.get(url + "/admin/stats", headers=HEADERS, timeout=30).json()
    return {**stats["tensor_parallel"], "stats": stats}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too (its parent has not reaped it)
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_tp2_tokens_equal_one_process_with_prefix_caching() -> None:
    ref = _reference(PROMPTS, 12)
    server = ServerProcess(["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M"])
    try:
        got = [_complete(server.url, p, 12) for p in PROMPTS]
        tp = _tp(server.url)
        assert got == ref
        assert tp["size"] == 2 and len(tp["ranks"]) == 2
        # the second prompt reused the first's four shared pages
        assert tp["stats"]["prefix_hit_tokens"] >= 64, tp["stats"]
        r0, r1 = tp["ranks"]
        assert r0["digest"] == r1["digest"] and tp["mismatches"] == 0
        # each rank's pool holds half the KV heads: pages of half the one-process size
        with Engine(build_default_model(), background=False) as one:
            assert r0["page_bytes"] == r1["page_bytes"] == one.pool.page_bytes // 2
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_tp2_map_refused_on_rank1_is_undone_on_both_and_the_request_finishes() -> None:
    ref = _reference(PROMPTS[:1], 8)
    server = ServerProcess(
        ["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M"],
        env={"EKV_TP_FAIL_MAPS": "1:3"},
    )
    try:
        assert _tp(server.url)["stats"]["resident_bytes"] == 0
        got = _complete(server.url, PROMPTS[0], 8)
        tp = _tp(server.url)
        assert got == ref[0]
        r0, r1 = tp["ranks"]
        assert r1["maps_refused"] == 3 and r0["maps_refused"] == 0
        # rank 0 mapped and unmapped again each time: both ranks undid the same three maps
        assert r0["maps_undone"] == r1["maps_undone"] == 3
        # the request waited, unchanged, at least one step (a refused grow-ahead counts no wait)
        assert tp["stats"]["allocation_failures"] >= 1
        assert r0["digest"] == r1["digest"] and r0["resident_bytes"] == r1["resident_bytes"] > 0
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_tp2_budget_cut_preempts_on_both_ranks_in_one_step_and_loses_nothing() -> None:
    prompts = [[(13 * i + k) % 250 + 8 for i in range(200)] for k in range(4)]
    ref = _reference(prompts, 40)
    server = ServerProcess(["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M"])
    results: dict[int, list[int]] = {}
    try:

        def run(i: int) -> None:
            results[i] = _complete(server.url, prompts[i], 40)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        # 4 x 200 prompt tokens: more than one 2 MiB chunk of half-size pages (512 tokens)
        wait_until(lambda: _tp(server.url)["stats"]["live_bytes"] > CHUNK, 60, 0.01, "live KV above one chunk")
        r = httpx.post(server.url + "/admin/kv-budget", json={"bytes": CHUNK}, headers=HEADERS, timeout=60)
        assert r.status_code == 200, r.text
        tp = _tp(server.url)
        r0, r1 = tp["ranks"]
        assert r0["preemptions"] == r1["preemptions"] > 0
        assert r0["digest"] == r1["digest"] and r0["live_bytes"] == r1["live_bytes"] <= CHUNK
        r = httpx.post(server.url + "/admin/kv-budget", json={"bytes": None}, headers=HEADERS, timeout=60)
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(120)
        assert [results.get(i) for i in range(4)] == ref
        tp = _tp(server.url)
        assert tp["ranks"][0]["digest"] == tp["ranks"][1]["digest"] and tp["mismatches"] == 0
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize("rank", [1, 0])
def test_tp2_a_step_that_fails_on_one_rank_is_undone_on_both_and_loses_nothing(rank: int) -> None:
    """$EKV_TP_FAIL_FORWARD: that rank's next two steps fail after packing their batch, just
    before the forward: both ranks learn it in the same check, the step advances nothing, and
    the request goes on to the tokens of an undisturbed run."""
    ref = _reference(PROMPTS, 10)
    server = ServerProcess(
        ["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M"],
        env={"EKV_TP_FAIL_FORWARD": f"{rank}:2"},
    )
    try:
        got = [_complete(server.url, p, 10) for p in PROMPTS]
        tp = _tp(server.url)
        assert got == ref
        r0, r1 = tp["ranks"]
        assert [r0["steps_refused"], r1["steps_refused"]] == [2 if r == rank else 0 for r in (0, 1)]
        assert r0["steps_undone"] == r1["steps_undone"] == 2
        assert r0["steps"] == r1["steps"] and r0["digest"] == r1["digest"] and tp["mismatches"] == 0
        log = server.log()
        assert f"the step failed on rank {rank} before its forward (RuntimeError: injected by" in log, log[-3000:]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_tp2_a_forward_that_fails_midway_on_rank1_takes_the_group_down_cleanly() -> None:
    """After the check the forward's all-reduces have begun: a rank that raises then cannot
    leave the others in step. It exits 1 at once, and rank 0 goes down as for a dead rank
    (its request answered with a 503 naming rank 1), well before --tp-timeout."""
    server = ServerProcess(
        ["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M", "--tp-timeout", "300"],
        env={"EKV_TP_FAIL_FORWARD": "1:1:inside"},
    )
    out: list = []
    try:
        rank1 = wait_until(lambda: _tp(server.url)["ranks"], 30, 0.05, "a first round")[1]["pid"]
        _post_status(server.url, out)
        code = server.proc.wait(KILL_BOUND_SECONDS)
        assert code == 1, server.log()[-3000:]
        line = f"tensor-parallel rank 1 (pid {rank1}) exited with status 1; the group is down"
        assert f"torch_elastic_kv serve: {line}; exiting\n" in server.lines, server.log()[-3000:]
        assert "the forward failed on rank 1 after its all-reduces began" in server.log()
        assert out == [(503, {"error": _down_error(line)})], out
        assert _gone(rank1)
    finally:
        if server.proc.poll() is None:
            server.stop()


def _down_error(line: str) -> dict:
    """The error body every request in flight gets when the group goes down."""
    return {
        "message": f"the request could not be served: {line}",
        "type": "server_error",
        "param": None,
        "code": "engine_down",
    }


# the watcher looks every 0.2 s, answering the requests in flight and reaping the ranks take at
# most 2 s each (tp_front: WATCH_SECONDS, ANSWER_SECONDS, REAP_SECONDS); generous for 2 loaded cores
KILL_BOUND_SECONDS = 15.0
LONG_PROMPT = [(5 * i) % 250 + 8 for i in range(300)]


def _post_status(url: str, out: list) -> None:
    """A non-streaming request that outlives the group: its status and JSON body, or how it broke."""
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        out.append((r.status_code, r.json()))
    except Exception as exc:
        out.append((type(exc).__name__, None))


def _stream_events(url: str, out: list) -> None:
    """A streaming request that outlives the group: its status and every ``data:`` payload."""
    body = {
        "model": MODEL,
        "prompt": LONG_PROMPT,
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events: list = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
        out.append((r.status_code, events))
    except Exception as exc:
        out.append((type(exc).__name__, events))


def test_tp2_kill_9_of_rank1_answers_every_request_and_exits_with_one_line() -> None:
    server = ServerProcess(["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "32M"])
    plain: list = []
    streamed: list = []
    try:
        url = server.url
        rank1 = wait_until(lambda: _tp(url)["ranks"], 30, 0.05, "a first round")[1]["pid"]
        threads = [threading.Thread(target=_post_status, args=(url, plain)) for _ in range(2)]
        threads.append(threading.Thread(target=_stream_events, args=(url, streamed)))
        for t in threads:
            t.start()
        wait_until(lambda: _tp(url)["stats"]["running"] == 3, 60, 0.05, "three running")
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        code = server.proc.wait(KILL_BOUND_SECONDS)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        assert code == 1, server.log()[-3000:]
        assert took < KILL_BOUND_SECONDS
        line = f"tensor-parallel rank 1 (pid {rank1}) was killed by signal 9; the group is down"
        lines = [x for x in server.lines if "rank 1" in x]
        assert lines == [f"torch_elastic_kv serve: {line}; exiting\n"], server.log()[-3000:]
        # every request in flight was answered: a 503 in OpenAI's shape naming the dead rank ...
        error = _down_error(line)
        assert plain == [(503, {"error": error})] * 2, plain
        # ... and the stream, already 200, an error event and its end
        ((status, events),) = streamed
        assert status == 200 and events[-2:] == [{"error": error}, "[DONE]"], events[-3:]
        assert all("choices" in e for e in events[:-2])
        assert _gone(rank1) and _gone(server.pid)
    finally:
        if server.proc.poll() is None:
            server.stop()


def test_an_engine_that_is_down_answers_what_is_in_flight_and_refuses_new_requests() -> None:
    """``EngineService.fail_all`` while the engine thread is stuck (as in a collective whose
    peer died): every request in flight gets a 503 event, queued commands and new requests a
    503, without the engine thread's help."""
    import asyncio

    from torch_elastic_kv.engine.policy import ElasticPolicy
    from torch_elastic_kv.serve.default_model import build_default_tokenizer
    from torch_elastic_kv.serve.engine_thread import ChoiceSpec, EngineService
    from torch_elastic_kv.serve.errors import APIError
    from torch_elastic_kv.serve.metrics import ServerMetrics

    engine = Engine(build_default_model(), policy=ElasticPolicy(max_bytes=16 << 20), background=False)
    service = EngineService(engine, build_default_tokenizer(), ServerMetrics(), max_waiting=64)
    stuck, release = threading.Event(), threading.Event()
    real_step = engine.step

    def stuck_step() -> list:
        stuck.set()
        release.wait(60)
        return real_step()

    engine.step = stuck_step  # type: ignore[method-assign]
    service.start()

    async def run() -> tuple:
        loop = asyncio.get_running_loop()
        subs = [service.submit([ChoiceSpec([10, 11, 12], 4, {})] * n, loop) for n in (1, 2)]
        await asyncio.to_thread(stuck.wait, 30)
        command = service.call("sleep")  # queued behind the stuck step
        ended = await asyncio.to_thread(service.fail_all, "rank 1 died")
        events = [await asyncio.wait_for(_all_events(sub), 10) for sub in subs]
        with pytest.raises(APIError) as refused:
            service.submit([ChoiceSpec([10, 11], 4, {})], loop)
        return ended, events, refused.value, command

    try:
        ended, events, refused, command = asyncio.run(run())
        assert service.down == "rank 1 died"
        assert ended == 3
        assert [[(e.status, e.code, e.error, e.token_ids) for e in ev] for ev in events] == [
            [(503, "engine_down", "rank 1 died", ())],
            [(503, "engine_down", "rank 1 died", ())] * 2,
        ]
        assert (refused.status, refused.code) == (503, "engine_down")
        assert refused.message == "the request could not be served: rank 1 died"
        with pytest.raises(APIError, match="the command could not run: rank 1 died"):
            command.result(10)
    finally:
        release.set()
        service.stop()


async def _all_events(sub: object) -> list:
    events: list = []
    while not sub.done:  # type: ignore[attr-defined]
        events += await sub.next_events()  # type: ignore[attr-defined]
    return events


def test_tp2_each_rank_rss_shmem_follows_the_load_and_returns_to_the_floor() -> None:
    server = ServerProcess(
        ["--tensor-parallel-size", "2", "--admin-key", ADMIN, "--max-kv-bytes", "64M", "--idle-seconds", "1"]
    )
    try:
        ranks = wait_until(lambda: _tp(server.url)["ranks"], 30, 0.05, "a first round")
        pids = [r["pid"] for r in ranks]
        floor = [rss_shmem(p) for p in pids]
        peak = list(floor)
        done = threading.Event()

        def load() -> None:
            prompts = [[(17 * i + k) % 250 + 8 for i in range(600)] for k in range(4)]
            threads = [threading.Thread(target=_complete, args=(server.url, p, 30)) for p in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            done.set()

        threading.Thread(target=load).start()
        live_peak = 0
        while not done.is_set():
            peak = [max(a, rss_shmem(p)) for a, p in zip(peak, pids)]
            live_peak = max(live_peak, _tp(server.url)["ranks"][0]["live_bytes"])
            time.sleep(0.02)
        # 4 x 630 tokens of half-size pages: about 5 MiB live per rank, in 2 MiB chunks
        for rank in range(2):
            assert peak[rank] - floor[rank] >= 2 * CHUNK, (rank, floor, peak)
            assert peak[rank] - floor[rank] <= live_peak + 2 * CHUNK, (rank, floor, peak, live_peak)
        wait_until(
            lambda: all(rss_shmem(p) - f < CHUNK for p, f in zip(pids, floor)), 30, 0.1, "RssShmem back at the floor"
        )
        ranks = _tp(server.url)["ranks"]
        assert [r["resident_bytes"] for r in ranks] == [0, 0]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--tensor-parallel-size", "0"], "ekv-serve: error: --tensor-parallel-size must be between 1 and 64, got '0'"),
        (["-tp", "2", "--tp-timeout", "0"], "ekv-serve: error: --tp-timeout must be between 1 and 86400, got '0'"),
    ],
)
def test_bad_tensor_parallel_options_exit_2_with_one_line(args: list[str], line: str) -> None:
    server = ServerProcess(args, wait=False)
    assert server.proc.wait(60) == 2
    wait_until(lambda: server.lines, 10, what="its error line")
    assert [x.rstrip("\n") for x in server.lines] == [line], server.log()


def test_tp2_group_guarantee_is_checked_for_all_ranks(tmp_path) -> None:
    import socket as _socket

    path = tmp_path / "b.sock"
    sock = _socket.socket(_socket.AF_UNIX)
    sock.bind(str(path))
    try:
        args = ["-tp", "2", "--broker", str(path), "--tenant", "a", "--min-kv-bytes", "4M", "--guarantee", "6M"]
        server = ServerProcess(args, wait=False)
        assert server.proc.wait(60) == 2
        wait_until(lambda: server.lines, 10, what="its error line")
        assert [x.rstrip("\n") for x in server.lines] == [
            "ekv-serve: error: --guarantee 6M is below --min-kv-bytes 4M x 2 ranks: the floor is memory the server "
            "never gives back, so the broker must always leave it"
        ]
    finally:
        sock.close()


def test_tp2_group_is_one_broker_tenant_and_a_reclaim_reaches_every_rank_in_one_round() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from broker_helpers import BrokerProcess, RawClient
    from torch_elastic_kv.broker.protocol import message

    d = Path(tempfile.mkdtemp(prefix="ekvtp", dir="/tmp"))
    broker = BrokerProcess(d / "b.sock", "32M")
    server = high = None
    try:
        ref = _reference(PROMPTS, 24)
        server = ServerProcess(
            ["-tp", "2", "--admin-key", ADMIN, "--max-kv-bytes", "16M", "--idle-seconds", "30"]
            + ["--broker", str(broker.socket_path), "--tenant", "tp", "--guarantee", "4M"]
        )
        assert [_complete(server.url, p, 24) for p in PROMPTS] == ref
        (row,) = broker.status()["tenants"]
        assert row["name"] == "tp" and row["guarantee_bytes"] == 4 << 20 and row["lease_bytes"] >= 4 << 20
        # a higher priority takes everything above the group's guarantee: one reclaim for the group
        high = RawClient(broker.socket_path)
        assert high.register("batch", priority=5)["type"] == "registered"
        high.send(message("report", demand_bytes=28 << 20, resident_bytes=0, live_bytes=0, running=0, waiting=1))
        wait_until(lambda: (high.recv() or {}).get("lease_bytes", 0) >= 28 << 20, 30, what="the grant of 28 MiB")
        tp = _tp(server.url)
        assert tp["stats"]["broker_lease_bytes"] <= 4 << 20
        # every rank's budget got its half in the same round: equal page tables, each under 2 MiB
        assert all(r["resident_bytes"] <= 2 << 20 for r in tp["ranks"]), tp["ranks"]
        assert len({r["digest"] for r in tp["ranks"]}) == 1 and tp["mismatches"] == 0
        # and the group still serves, with the same tokens, under its guarantee
        assert _complete(server.url, PROMPTS[0], 24) == ref[0]
        high.send(message("leave", resident_bytes=0))
    finally:
        if high is not None:
            high.close()
        if server is not None:
            assert server.stop() == 0, server.log()[-3000:]
        wait_until(lambda: broker.status()["tenants"] == [], 15, what="the group to leave the broker")
        assert broker.stop() == 0
        shutil.rmtree(d, ignore_errors=True)


def test_split_refuses_a_size_that_does_not_divide_the_heads() -> None:
    from torch_elastic_kv.parallel.shard import ShardError, shard_llama

    model = build_default_model()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(
        ShardError, match=r"--tensor-parallel-size 3 does not divide the model's num_attention_heads \(4\)"
    ):
        shard_llama(model, 0, 3)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


class _TwoRanks:
    """Rank 0's view of a two-rank group whose rank 1 answers ``other`` to every all-gather."""

    world = 2
    rank = 0

    def __init__(self, other: object) -> None:
        self.other = other
        self.calls = 0

    def gather(self, obj: object) -> list[object]:
        self.calls += 1
        return [obj, self.other]


def test_a_map_that_fails_on_another_rank_is_unmapped_here_and_refused() -> None:
    from torch_elastic_kv.kv.pool import KVPagePool
    from torch_elastic_kv.parallel.tp_engine import CollectiveMapGuard

    pool = KVPagePool(2, 2, 16, torch.float32, max_bytes=16 << 20)
    try:
        group = _TwoRanks("MemoryError: host short")
        pool.set_map_guard(CollectiveMapGuard(group))  # type: ignore[arg-type]
        with pytest.raises(
            MemoryError,
            match=r"tensor parallel: rank 1 could not map 1 KV chunk\(s\) \(MemoryError: host short\); undone on all 2 ranks",
        ):
            pool.alloc(1)
        assert group.calls == 1
        stats = pool.stats()
        assert stats["resident_bytes"] == 0 and stats["live_pages"] == 0
        # the chunk rank 0 mapped is unmapped; its memory waits in the reuse cache for the retry
        assert pool.cached_bytes() == pool.chunk_bytes
        group.other = None  # rank 1 maps too: the same call succeeds on both
        pages = pool.alloc(1)
        assert len(pages) == 1 and pool.stats()["resident_bytes"] == pool.chunk_bytes
        assert pool.cached_bytes() == 0
    finally:
        pool.close()


def test_a_refused_map_here_fails_on_every_rank_without_mapping() -> None:
    from torch_elastic_kv.kv.pool import KVPagePool
    from torch_elastic_kv.parallel.tp_engine import CollectiveMapGuard

    pool = KVPagePool(2, 2, 16, torch.float32, max_bytes=16 << 20)
    try:
        guard = CollectiveMapGuard(_TwoRanks(None), refuse=1)  # type: ignore[arg-type]
        pool.set_map_guard(guard)
        with pytest.raises(MemoryError, match=r"rank 0 could not map .*refused by \$EKV_TP_FAIL_MAPS"):
            pool.alloc(1)
        assert guard.refused == 1 and guard.failures == 1 and pool.stats()["resident_bytes"] == 0
        assert len(pool.alloc(1)) == 1
    finally:
        pool.close()


class _TwoRanksSteps(_TwoRanks):
    """Rank 0's view of a two-rank group for a step: rank 1 reports ``failed`` to the step's
    check and no error and no tokens to the gather."""

    def __init__(self, failed: bool) -> None:
        super().__init__((None, None))
        self.failed = failed
        self.checks = 0

    def min(self, value: int) -> int:
        self.checks += 1
        return min(value, 1 if self.failed else 2)


def test_a_step_that_fails_on_another_rank_is_refused_before_the_forward_and_advances_nothing() -> None:
    from torch_elastic_kv.parallel.tp_engine import StepGuard, StepRefused, _step, _sync_runner

    prompt = [(3 * i) % 250 + 8 for i in range(20)]
    ref = _reference([prompt], 4)[0]
    model = build_default_model()
    row_parallel_calls: list[int] = []  # where a split model's first all-reduce would run
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: row_parallel_calls.append(1))
    with Engine(model, background=False) as engine:
        group = _TwoRanksSteps(failed=True)
        steps = StepGuard(group)  # type: ignore[arg-type]
        steps.attach(model)
        _sync_runner(engine, group, steps)  # type: ignore[arg-type]
        rid = engine.add_request(prompt, 4)
        for _ in range(2):
            with pytest.raises(StepRefused, match=r"the step failed on rank 1 before its forward; undone on all 2"):
                _step(engine, steps)
        # checked twice, no forward got to its first row-parallel layer, nothing recorded
        assert group.checks == 2 and steps.undone == 2 and row_parallel_calls == []
        assert engine.output_ids(rid) == [] and engine.stats()["steps"] == 0
        group.failed = False
        while engine.has_unfinished():
            _step(engine, steps)
        assert engine.output_ids(rid) == ref
        # a step with nothing to run still checks once: a rank that failed before its batch is heard
        before = group.checks
        _step(engine, steps)
        assert group.checks == before + 1


def test_a_step_that_raises_here_before_the_forward_tells_the_others_and_names_the_cause() -> None:
    from torch_elastic_kv.parallel.tp_engine import StepGuard, StepRefused, _step

    model = build_default_model()
    with Engine(model, background=False) as engine:
        group = _TwoRanksSteps(failed=False)
        steps = StepGuard(group)  # type: ignore[arg-type]
        steps.attach(model)
        engine.add_request([10, 11, 12], 2)

        def broken_schedule() -> None:
            raise ValueError("scheduler exploded")

        engine.scheduler.schedule = broken_schedule  # type: ignore[method-assign]
        with pytest.raises(
            StepRefused, match=r"failed on rank 0 before its forward \(ValueError: scheduler exploded\)"
        ):
            _step(engine, steps)
        assert group.checks == 1 and steps.undone == 1


@pytest.mark.parametrize("text", ["1", "1:x", "1:2:middle", "a:2", "1:-1", "1:2:before:x"])
def test_a_bad_fail_forward_hook_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    from torch_elastic_kv.parallel.tp_engine import _fail_forward_for

    monkeypatch.setenv("EKV_TP_FAIL_FORWARD", text)
    with pytest.raises(ValueError, match=r"\$EKV_TP_FAIL_FORWARD must be RANK:N or RANK:N:before\|inside"):
        _fail_forward_for(0)
    monkeypatch.setenv("EKV_TP_FAIL_FORWARD", "1:3:inside")
    assert _fail_forward_for(1) == (3, "inside") and _fail_forward_for(0) == (0, "inside")


# ---------------------------------------------------------------- one device per rank -------
def test_rank_device_cpu_for_every_rank_and_one_gpu_per_rank_on_cuda() -> None:
    from torch_elastic_kv.parallel.devices import model_backend, rank_device

    assert [rank_device("cpu", r, 2, cuda_count=0) for r in (0, 1)] == ["cpu", "cpu"]
    assert [rank_device("cuda", r, 4, cuda_count=4) for r in range(4)] == [f"cuda:{r}" for r in range(4)]
    # torchrun: LOCAL_RANK picks the GPU, and only this node's ranks need one here
    assert rank_device("cuda", 3, 4, cuda_count=2, local_rank=1, local_world=2) == "cuda:1"
    assert [model_backend(d) for d in ("cpu", "cuda:1")] == ["gloo", "nccl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cuda", 0, 2, 1), "--tensor-parallel-size 2 needs 2 GPUs on this machine (one per rank), it has 1"),
        (("cuda", 0, 2, 0), "--tensor-parallel-size 2 needs 2 GPUs on this machine (one per rank), it has 0"),
        (("cuda:1", 0, 2, 2), "--device cuda:1 names one GPU, but --tensor-parallel-size 2 gives each rank its own"),
        (("mps", 0, 2, 0), "--device mps: tensor parallel runs on cpu or cuda"),
        (("cuda", 2, 2, 2), "rank 2 of 2: the rank must be in 0..world-1"),
    ],
)
def test_rank_device_refuses_what_cannot_give_each_rank_its_own(args: tuple, message: str) -> None:
    from torch_elastic_kv.parallel.devices import DeviceError, rank_device

    with pytest.raises(DeviceError) as e:
        rank_device(*args)
    assert str(e.value).startswith(message), str(e.value)


def test_rank_device_under_torchrun_checks_this_nodes_gpus_and_local_rank() -> None:
    from torch_elastic_kv.parallel.devices import DeviceError, rank_device, torchrun_local

    with pytest.raises(DeviceError, match=r"needs 4 GPUs on this machine \(one per rank\), it has 2"):
        rank_device("cuda", 0, 4, cuda_count=2, local_rank=0, local_world=4)
    with pytest.raises(DeviceError, match=r"\$LOCAL_RANK 2 names a GPU this machine lacks \(it has 2\)"):
        rank_device("cuda", 2, 4, cuda_count=2, local_rank=2, local_world=2)
    assert torchrun_local({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    assert torchrun_local({}) == (None, None)
    with pytest.raises(DeviceError, match=r"\$LOCAL_RANK must be a whole number, got 'x'"):
        torchrun_local({"LOCAL_RANK": "x"})


def test_serve_refuses_tp2_on_one_gpu_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``serve -tp 2 --device cuda`` says on a machine with one GPU (the GPU faked: this
    check runs before anything touches the device)."""
    from torch_elastic_kv.serve import cli
    from torch_elastic_kv.serve.settings import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        UsageError, match=r"^--tensor-parallel-size 2 needs 2 GPUs on this machine \(one per rank\), it has 1$"
    ):
        cli.resolve(["-tp", "2", "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    settings = cli.resolve(["-tp", "2", "--device", "cuda"])
    assert settings.device == "cuda:0" and settings.tensor_parallel_size == 2  # _device names the index
    from torch_elastic_kv.serve.tp_front import rank_settings

    assert [rank_settings(settings, r).device for r in (0, 1)] == ["cuda:0", "cuda:1"]
    with pytest.raises(UsageError, match=r"^--device cuda:1 names one GPU, but --tensor-parallel-size 2 gives"):
        cli.resolve(["-tp", "2", "--device", "cuda:1"])
    assert cli.resolve(["-tp", "2"]).device == "cuda"  # the default on a GPU machine: each rank its own
    cpu = cli.resolve(["-tp", "2", "--device", "cpu"])
    assert rank_settings(cpu, 1).device == "cpu"


def test_tp2_expedite_marks_reach_every_rank_and_change_no_token() -> None:
    """A stream whose first token starts a character (no text yet) is expedited while a long
    prompt is chunked beside it: the mark travels with the round, so both ranks shorten the same
    step (equal page tables) and the tokens stay those of one process."""
    candidates = [[(13 * i + 7 * s) % 95 + 40 for i in range(40)] for s in range(200)]
    with Engine(build_default_model(), background=False) as one:
        firsts = [out[0] for out in one.generate(candidates, 1)]
    pending = next(p for p, t in zip(candidates, firsts) if 0xC2 <= t - 8 <= 0xF4)
    long = [(5 * i) % 250 + 8 for i in range(600)]
    ref = _reference([pending, long], 6)
    server = ServerProcess(
        [
            "--tensor-parallel-size",
            "2",
            "--admin-key",
            ADMIN,
            "--max-kv-bytes",
            "32M",
            "--max-batch-tokens",
            "64",
            "--expedite-prefill-tokens",
            "0",
        ]  # fmt: skip
    )
    try:
        # one request, two prompts: queued together, so the long one is still chunking when the
        # first one's first token (no text) comes
        body = {"model": MODEL, "prompt": [pending, long], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = [c["token_ids"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        tp = _tp(server.url)
        assert got == ref
        r0, r1 = tp["ranks"]
        assert r0["digest"] == r1["digest"] and tp["mismatches"] == 0
        assert tp["stats"]["expedited_steps"] >= 1, tp["stats"]
    finally:
        assert server.stop() == 0, server.log()[-3000:]
