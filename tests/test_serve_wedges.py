"""Nothing hostile wedges a server or loses a request (issue 21, items 1, 4, 5, 6).

Real servers: ``python -m torch_elastic_kv serve`` subprocesses on 127.0.0.1 (a broker in a
temporary socket directory where one is needed), stopped by pid; and, for the map failure, the
same app under uvicorn in this process, so that the device budget of this process can make the
server's page maps fail mid-burst. Every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

import torch_elastic_kv as ekv
from broker_helpers import BrokerProcess
from serve_helpers import ServerProcess, metrics, wait_until
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve import cli
from torch_elastic_kv.serve.app import create_app
from torch_elastic_kv.serve.default_model import DEFAULT_MODEL_NAME, EOS_ID, build_default_model
from torch_elastic_kv.serve.server import build_state

ADMIN_KEY = "admin-wedges"
MiB = 1 << 20
PAGE = 128 << 10  # the default model's KV page: 16 tokens


def admin(url: str, path: str, body=None, method: str = "POST") -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def complete(url: str, prompt, max_tokens: int, timeout: float = 120, **extra) -> httpx.Response:
    body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


@pytest.fixture(scope="module")
def reference() -> Iterator[Engine]:
    torch.set_num_threads(1)  # the servers have the other core
    eng = Engine(build_default_model(), policy=ElasticPolicy(max_bytes=64 * MiB))
    yield eng
    eng.close()


# ---------------------------------------------------------------- item 6: the budget's floor ----
def test_a_budget_below_a_request_is_refused_or_ends_it_with_503(reference):
    """1 MiB is refused like --max-kv-bytes 1M; under 2 MiB a request that outgrows it (200 + 103
    tokens: 19 pages of 16) is counted and ends with a 503 naming both numbers after
    --budget-wait-seconds instead of waiting forever; what fits still runs."""
    server = ServerProcess(["--admin-key", ADMIN_KEY, "--max-kv-bytes", "32M", "--budget-wait-seconds", "3"])
    try:
        url = server.url
        r = admin(url, "/admin/kv-budget", {"bytes": MiB})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "bytes" and err["message"].startswith(
            "bytes (1048576) is below the smallest KV budget, 2097152 bytes"
        )
        assert admin(url, "/admin/stats", method="GET").json()["budget_bytes"] == 32 * MiB  # unchanged
        r = admin(url, "/admin/kv-budget", {"bytes": 2 * MiB})
        assert r.status_code == 200 and r.json()["budget_bytes"] == 2 * MiB

        prompt = [8 + (i * 37) % 256 for i in range(200)]  # 13 pages: admitted; at 257 tokens it needs 17
        out: dict = {}

        def big() -> None:
            t0 = time.monotonic()
            out["r"] = complete(url, prompt, 103, ignore_eos=True)
            out["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=big, daemon=True)
        t.start()
        seen = wait_until(
            lambda: metrics(url).get("ekv_requests_blocked_by_budget") == 1, 60, 0.05, "the request counted as blocked"
        )
        assert seen and admin(url, "/admin/stats", method="GET").json()["blocked_by_budget"] == 1
        t.join(90)
        r = out["r"]
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        err = r.json()["error"]
        assert err["code"] == "insufficient_kv_memory" and err["type"] == "server_error"
        assert "the KV budget (2097152 bytes) is below what this request needs to run (2228224 bytes)" in err["message"]
        assert "3s (--budget-wait-seconds)" in err["message"]
        assert 3 <= out["seconds"] < 60
        m = metrics(url)
        assert m["ekv_requests_blocked_by_budget"] == 0 and m["ekv_requests_waiting"] == 0
        # what fits the budget runs, token for token
        small = [8 + b for b in b"fits under the cut"]
        r = complete(url, small, 12)
        assert r.status_code == 200, r.text
        want = reference.generate([small], 12, eos_token_id=EOS_ID)[0]
        got = r.json()["choices"][0]
        assert got["finish_reason"] == ("stop" if want[-1] == EOS_ID else "length")
        assert admin(url, "/admin/kv-budget", {"bytes": None}).json()["budget_bytes"] == 32 * MiB
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# ---------------------------------------------------------------- item 1: a map failure mid-burst
class _InProcessServer:
    """The server's app under uvicorn on a thread of this process, on a free loopback port."""

    def __init__(self, args: list[str]) -> None:
        settings = cli.resolve(["--host", "127.0.0.1", "--port", "0", *args])
        self.sock = cli.bind_socket("127.0.0.1", 0)
        self.sock.listen(128)
        self.state = build_state(settings)
        config = uvicorn.Config(create_app(self.state), log_config=None, access_log=False, lifespan="on", http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 60, what="uvicorn to start")
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def test_a_map_failure_during_a_burst_loses_nothing(reference):
    """The device budget of this process cut to what is mapped while 8 streams run: their next
    pages cannot be mapped. No request fails; once memory is back all finish, tokens equal to
    a calm run."""
    prompts = [[8 + (7 * i + j) % 256 for j in range(30 + 9 * i)] for i in range(8)]
    want = reference.generate(prompts, 96, eos_token_id=EOS_ID)
    srv = _InProcessServer(["--max-kv-bytes", "32M", "--budget-wait-seconds", "120"])
    results: dict[int, tuple[int, list[int], str | None]] = {}

    def stream(i: int) -> None:
        body = {
            "model": DEFAULT_MODEL_NAME,
            "prompt": prompts[i],
            "max_tokens": 96,
            "temperature": 0,
            "stream": True,
            "return_token_ids": True,
        }
        ids: list[int] = []
        finish = None
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    finish = "error: " + chunk["error"]["message"]
                    break
                ids += chunk["choices"][0].get("token_ids", [])
                finish = chunk["choices"][0]["finish_reason"] or finish
            results[i] = (r.status_code, ids, finish)

    try:
        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: metrics(srv.url)["ekv_requests_running"] >= 4, 60, 0.01, "the burst running")
        ekv.set_budget(ekv.memory_stats("cpu")["held_bytes"], "cpu")  # nothing more can be mapped
        try:
            engine = srv.state.service.engine
            wait_until(
                lambda: engine.stats().get("allocation_failures") or any(f for _, _, f in results.values()),
                60,
                0.01,
                "a failed page map",
            )
            time.sleep(0.5)  # the requests wait under the cut for a while
            m = metrics(srv.url)
            assert m.get("ekv_requests_total{finish_reason=error}", 0) == 0
            assert not any(f and f.startswith("error") for _, _, f in results.values())
        finally:
            ekv.set_budget(None, "cpu")
        for t in threads:
            t.join(120)
        got = [results[i] for i in range(8)]
        assert [g[0] for g in got] == [200] * 8
        assert [g[1] for g in got] == want
        assert [g[2] for g in got] == [("stop" if w[-1] == EOS_ID else "length") for w in want]
    finally:
        ekv.set_budget(None, "cpu")
        srv.stop()


# ---------------------------------------------------------------- items 4, 5: a hung broker -----
@pytest.fixture(scope="module")
def tenant() -> Iterator[tuple[BrokerProcess, ServerProcess]]:
    d = Path(tempfile.mkdtemp(prefix="ekvw", dir="/tmp"))
    broker = BrokerProcess(d / "b.sock", "64M")
    server = None
    try:
        server = ServerProcess(
            [
                "--admin-key",
                ADMIN_KEY,
                "--broker",
                str(broker.socket_path),
                "--tenant",
                "hung",
                "--max-kv-bytes",
                "16M",
                "--idle-seconds",
                "0.5",
                "--broker-wait-seconds",
                "2",
                "--broker-timeout",
                "1",
                "--drain-seconds",
                "2",
            ]
        )
        wait_until(lambda: broker.tenant("hung") is not None, 30, what="the tenant registered")
        yield broker, server
    finally:
        broker.signal(signal.SIGCONT)
        if server is not None:
            server.stop()
        broker.stop()


def test_a_tenant_with_lease_0_and_a_hung_broker_answers_503(tenant, reference):
    broker, server = tenant
    url = server.url
    wait_until(lambda: broker.tenant("hung")["lease_bytes"] == 0, 30, what="an idle lease of 0")
    broker.signal(signal.SIGSTOP)
    try:
        prompt = [8 + b for b in b"is anyone there"]
        out: dict = {}

        def ask() -> None:
            t0 = time.monotonic()
            out["r"] = complete(url, prompt, 8, timeout=60)
            out["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        wait_until(lambda: metrics(url).get("ekv_requests_waiting_for_lease") == 1, 30, 0.05, "a request waiting")
        stats = admin(url, "/admin/stats", method="GET").json()
        assert stats["waiting_for_lease"] == 1 and stats["broker_lease_bytes"] == 0
        assert stats["broker_connected"] is True and stats["broker_seconds_since_message"] > 0
        t.join(60)
        r = out["r"]
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        msg = r.json()["error"]["message"]
        assert "the memory broker's lease (0 bytes) is below what this request needs to run (131072 bytes)" in msg
        assert "no grant came within 2s (--broker-wait-seconds)" in msg
        assert 2 <= out["seconds"] < 30
        m = metrics(url)
        assert m["ekv_requests_waiting_for_lease"] == 0 and m["ekv_broker_seconds_since_message"] >= 2
    finally:
        broker.signal(signal.SIGCONT)
    # the broker is back: the same request is served, token for token
    r = complete(url, prompt, 8, timeout=60)
    assert r.status_code == 200, r.text
    want = reference.generate([prompt], 8, eos_token_id=EOS_ID)[0]
    assert r.json()["choices"][0]["finish_reason"] == ("stop" if want[-1] == EOS_ID else "length")


def test_a_hung_broker_does_not_block_shutdown(tenant):
    """SIGSTOP the broker and keep the server busy until its reports fill the socket buffer (a
    send times out: the broker connection counts as lost, ``ekv_broker_connected`` 0); SIGTERM
    then exits 0 within the drain and a few seconds."""
    broker, server = tenant
    url = server.url
    r = complete(url, [10, 11, 12], 8, timeout=60)  # a lease to serve with while the broker hangs
    assert r.status_code == 200, r.text
    broker.signal(signal.SIGSTOP)
    stop = threading.Event()
    served = {"n": 0}

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                r = complete(url, [8 + (i + k) % 256 for k in range(20)], 24, timeout=60, ignore_eos=True)
            except httpx.HTTPError:
                return  # the server is shutting down
            if r.status_code == 200:
                served["n"] += 1

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: metrics(url)["ekv_broker_connected"] == 0, 240, 0.5, "a broker send timing out")
        assert served["n"] > 0  # it served meanwhile
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        try:
            status = server.wait(2 + 15)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within the drain + 15 s:\n" + server.log()[-3000:])
        took = time.monotonic() - t0
        assert status == 0, server.log()[-3000:]
        assert took < 2 + 15
    finally:
        stop.set()
        broker.signal(signal.SIGCONT)
        for t in threads:
            t.join(60)


def test_a_tenant_with_lease_0_and_a_dead_broker_answers_503():
    d = Path(tempfile.mkdtemp(prefix="ekvw", dir="/tmp"))
    broker = BrokerProcess(d / "b.sock", "64M")
    server = None
    try:
        args = ["--broker", str(broker.socket_path), "--tenant", "orphan", "--max-kv-bytes", "16M"]
        server = ServerProcess([*args, "--broker-wait-seconds", "2", "--broker-timeout", "1"])
        wait_until(lambda: broker.tenant("orphan") is not None, 30, what="the tenant registered")
        assert broker.tenant("orphan")["lease_bytes"] == 0
        broker.kill()
        wait_until(lambda: metrics(server.url).get("ekv_broker_connected") == 0, 30, 0.05, "the broker gone")
        t0 = time.monotonic()
        r = complete(server.url, [8 + b for b in b"hello?"], 8, timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "no grant came within 2s (--broker-wait-seconds)" in r.json()["error"]["message"]
        assert 2 <= took < 30
        assert metrics(server.url)["ekv_kv_lease_bytes"] == 0
    finally:
        if server is not None:
            assert server.stop() == 0, server.log()[-3000:]
        broker.kill()
