"""A broker and three server tenants on one budget: memory follows the load from server to server.

Real processes: ``python -m torch_elastic_kv broker`` and three ``serve --broker`` servers of the
default model (host backend). The budget (12 MiB, six 2 MiB chunks) is tight enough that a
burst of long prompts on one server wants more than an equal share (4 MiB).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from broker_helpers import BrokerProcess, MiB
from serve_helpers import ServerProcess, rss_shmem, wait_until
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve.default_model import DEFAULT_MODEL_NAME, build_default_model

BUDGET = 12 * MiB
CHUNK = 2 * MiB
NAMES = ("t0", "t1", "t2")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[BrokerProcess, dict[str, ServerProcess]]]:
    d = Path(tempfile.mkdtemp(prefix="ekvs", dir="/tmp"))
    broker = BrokerProcess(d / "b.sock", str(BUDGET))
    servers: dict[str, ServerProcess] = {}
    try:
        for name in NAMES:
            servers[name] = ServerProcess(
                [
                    "--broker",
                    str(broker.socket_path),
                    "--tenant",
                    name,
                    "--max-kv-bytes",
                    str(BUDGET),
                    "--idle-seconds",
                    "0.5",
                    "--swap-bytes",
                    "16M",
                    "--max-batch-tokens",
                    "1024",
                ]
            )
        yield broker, servers
    finally:
        for s in servers.values():
            assert s.stop() == 0, s.log()[-3000:]
        wait_until(lambda: broker.status()["tenants"] == [], 10, what="the servers to leave the broker")
        assert broker.stop() == 0
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def workload() -> tuple[list[list[int]], int]:
    g = torch.Generator().manual_seed(5)
    # 12 prompts of 300-400 tokens: ~4,300 tokens of KV (8 KiB each), about 34 MiB in all
    prompts = [
        torch.randint(8, 264, (int(n),), generator=g).tolist() for n in torch.randint(300, 400, (12,), generator=g)
    ]
    return prompts, 12


@pytest.fixture(scope="module")
def references(workload) -> list[list[int]]:
    prompts, new = workload
    torch.set_num_threads(1)
    with Engine(build_default_model(), policy=ElasticPolicy(max_bytes=64 * MiB)) as eng:
        return eng.generate(prompts, max_new_tokens=new)


async def _burst(url: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:

        async def one(p: list[int]) -> list[int]:
            body = {
                "model": DEFAULT_MODEL_NAME,
                "prompt": p,
                "max_tokens": new,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        return await asyncio.gather(*(one(p) for p in prompts))


class Sampler:
    """Every 0.1 s: the servers' RssShmem summed, and each tenant's lease at the broker."""

    def __init__(self, broker: BrokerProcess, servers: dict[str, ServerProcess]) -> None:
        self.broker, self.servers = broker, servers
        self.samples: list[tuple[int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            shmem = sum(rss_shmem(s.pid) for s in self.servers.values())
            leases = {t["name"]: t["lease_bytes"] for t in self.broker.status()["tenants"]}
            self.samples.append((shmem, leases))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_memory_follows_the_load_between_tenants(cluster, workload, references) -> None:
    broker, servers = cluster
    prompts, new = workload
    wait_until(lambda: len(broker.status()["tenants"]) == 3, 10, what="three tenants")
    equal_share = BUDGET // 3
    phases = []
    for hot in ("t0", "t1"):
        t0 = time.monotonic()
        with Sampler(broker, servers) as sampler:
            outputs = asyncio.run(_burst(servers[hot].url, prompts, new))
            # the burst is over: the hot tenant's memory goes back after --idle-seconds
            wait_until(lambda h=hot: broker.tenant(h)["resident_bytes"] == 0, 20, what=f"{hot}'s idle give-back")
        assert outputs == references, f"{hot}: tokens differ from the same requests run alone"
        phases.append((hot, time.monotonic() - t0, sampler.samples))
    for hot, _, samples in phases:
        assert samples, "no samples"
        # every sample: the servers' KV memory (their shared memory) within the budget + a chunk each
        worst = max(s for s, _ in samples)
        assert worst <= BUDGET + 3 * CHUNK, (hot, worst)
        # the busy tenant grew past an equal share while the others idled
        peak = max(leases.get(hot, 0) for _, leases in samples)
        assert peak > equal_share, (hot, peak)
    # when the load moved on, the first hot tenant's lease went back down (to the second)
    t1_samples = phases[1][2]
    assert min(leases.get("t0", 0) for _, leases in t1_samples) <= equal_share
    assert max(leases.get("t1", 0) for _, leases in t1_samples) > equal_share
