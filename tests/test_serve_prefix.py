"""The prefix cache through the server: hits visible in /metrics under our names and vLLM's, the
admin reset, the CLI's knobs, and a broker reclaim that takes cached pages before any live
request (real server and broker subprocesses on 127.0.0.1 / a temp socket directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from broker_helpers import BrokerProcess, MiB, RawClient
from serve_helpers import ServerProcess, metrics, wait_until
from torch_elastic_kv.broker.protocol import message
from torch_elastic_kv.serve.default_model import DEFAULT_MODEL_NAME

ADMIN = "prefix-admin-key"
SYSTEM = [7 + (i * 31) % 240 for i in range(200)]  # 12 full pages of 16 tokens, and 8 tokens over


def complete(url: str, prompt: list[int], max_tokens: int, stream: bool = False) -> list[int]:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def admin(url: str, path: str) -> httpx.Response:
    return httpx.post(url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def test_hits_metrics_reset_and_tokens_equal_without_the_cache() -> None:
    on = ServerProcess(["--admin-key", ADMIN, "--max-kv-bytes", "32M"], wait=False)
    off = ServerProcess(["--no-enable-prefix-caching", "--max-kv-bytes", "32M"], wait=False)
    try:
        url_on, url_off = on.wait_ready(180), off.wait_ready(180)
        prompts = [SYSTEM + [40 + i, 41 + i, 42 + i] for i in range(3)]
        got_on = [complete(url_on, p, 8) for p in prompts]
        got_off = [complete(url_off, p, 8) for p in prompts]
        assert got_on == got_off  # the same tokens, whether the prefix was prefilled or shared
        m = metrics(url_on)
        labels = f"{{engine=0,model_name={DEFAULT_MODEL_NAME}}}"
        # requests 2 and 3 found the 12 pages of the shared system prompt
        assert m[f"vllm:prefix_cache_hits_total{labels}"] == 2 * 12 * 16 == m["ekv_prefix_hit_tokens_total"]
        assert m[f"vllm:prefix_cache_queries_total{labels}"] == sum(len(p) for p in prompts)
        cached = m["ekv_kv_cached_bytes"]
        assert cached > 0 and m["ekv_kv_live_bytes"] == 0
        m_off = metrics(url_off)
        assert f"vllm:prefix_cache_hits_total{labels}" not in m_off and m_off["ekv_kv_cached_bytes"] == 0
        r = admin(url_on, "/admin/reset-prefix-cache")
        assert r.status_code == 200 and r.json()["freed_bytes"] == cached, r.text
        m = metrics(url_on)
        assert m["ekv_kv_cached_bytes"] == 0 and m["ekv_prefix_evictions_total{reason=reset}"] * 128 * 1024 == cached
        assert admin(url_on, "/reset_prefix_cache").status_code == 200  # vLLM's spelling
        assert httpx.post(url_on + "/admin/reset-prefix-cache", timeout=30).status_code == 401
        assert httpx.post(url_off + "/admin/reset-prefix-cache", timeout=30).status_code == 404  # admin is off
    finally:
        assert on.stop() == 0, on.log()[-3000:]
        assert off.stop() == 0, off.log()[-3000:]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--prefix-cache-expiry", "-1"], "--prefix-cache-expiry"),
        (["--prefix-cache-expiry", "soon"], "--prefix-cache-expiry"),
        (["--prefix-cache-cap", "lots"], "--prefix-cache-cap"),
        (["--max-kv-bytes", "16M", "--prefix-cache-cap", "1G"], "--prefix-cache-cap 1G is above --max-kv-bytes 16M"),
    ],
)
def test_bad_prefix_cache_options_exit_2_with_one_line(args: list[str], line: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "serve", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], r.stderr


def test_a_broker_reclaim_takes_cached_pages_before_any_live_request() -> None:
    d = Path(tempfile.mkdtemp(prefix="ekvp", dir="/tmp"))
    broker = BrokerProcess(d / "b.sock", "16M")
    server = None
    high = None
    try:
        server = ServerProcess(
            [
                "--broker",
                str(broker.socket_path),
                "--tenant",
                "chat",
                "--guarantee",
                "4M",
                "--max-kv-bytes",
                "16M",
                "--admin-key",
                ADMIN,
            ]
        )
        url = server.url
        long_prompt = [5 + (i * 13) % 250 for i in range(600)]  # 37 full pages, about 4.7 MiB
        complete(url, long_prompt, 2)
        complete(url, long_prompt, 2)  # a hit: reuse seen, so the cached pages are kept
        stats = httpx.get(url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        assert stats["cached_bytes"] >= 4 * MiB and stats["preemptions"] == 0
        cached_before = stats["cached_bytes"]
        reference = complete(url, [9] * 20, 300)  # what the live request must produce, calm

        # a live request (20 + 300 tokens: 20 pages, 2.5 MiB, under the 4 MiB guarantee) runs
        # while a higher-priority tenant asks for everything above that guarantee
        out: dict = {}
        live = threading.Thread(target=lambda: out.update(tokens=complete(url, [9] * 20, 300)))
        live.start()
        wait_until(lambda: broker.tenant("chat")["running"] == 1, 30, what="the live request to run")
        high = RawClient(broker.socket_path)
        assert high.register("batch", priority=5)["type"] == "registered"
        high.send(message("report", demand_bytes=12 * MiB, resident_bytes=0, live_bytes=0, running=0, waiting=1))
        wait_until(lambda: (high.recv() or {}).get("lease_bytes", 0) >= 12 * MiB, 30, what="the grant of 12 MiB")
        live.join(timeout=120)
        assert out.get("tokens") == reference  # nothing lost, nothing changed
        stats = httpx.get(url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        # the cached pages made the room (taken by the reclaim itself, or, when the live request's
        # next page came first under the lowered lease, by that allocation: the order is a race)
        assert stats["cached_bytes"] < cached_before and stats["cached_bytes"] + stats["live_bytes"] <= 4 * MiB, stats
        assert stats["preemptions"] == 0  # and no live request was touched
        assert stats["broker_lease_bytes"] <= 4 * MiB
    finally:
        if high is not None:
            high.close()
        if server is not None:
            assert server.stop() == 0, server.log()[-3000:]
        assert broker.stop() == 0
        shutil.rmtree(d, ignore_errors=True)
