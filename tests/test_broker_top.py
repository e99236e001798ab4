"""``top`` with idle tenants: a lease kept by a tenant with nothing to do is shown as "lent,
idle", and the header gives free memory with that idle part beside plain free memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from torch_elastic_kv.broker.arbiter import Arbiter
from torch_elastic_kv.broker.top import format_table, free_with_idle

MiB = 1 << 20
CHUNK = 2 * MiB


def _two_tenants_then_idle() -> Arbiter:
    arb = Arbiter(64 * MiB)
    arb.register("chat", 101, 1, 8 * MiB, CHUNK, 64 * MiB)
    arb.register("batch", 102, 0, 0, CHUNK, 64 * MiB)
    arb.report("chat", demand=24 * MiB, resident=0, live=0, running=3, waiting=0)
    arb.report("batch", demand=40 * MiB, resident=0, live=0, running=5, waiting=1)
    arb.plan()
    assert (arb.tenants["chat"].lease, arb.tenants["batch"].lease, arb.free_bytes) == (24 * MiB, 40 * MiB, 0)
    return arb


def _row(table: str, name: str) -> str:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(name + " ")]
    return line


def test_idle_leases_are_shown_as_lent_idle_with_free_including_them() -> None:
    arb = _two_tenants_then_idle()
    busy = format_table({"device": "cpu", **arb.status()})
    assert "free 0.0 MiB   free incl. idle 0.0 MiB" in busy
    assert _row(busy, "chat").endswith("connected") and _row(busy, "batch").endswith("connected")

    # both go idle and keep their leases: the broker takes them back only when someone asks
    arb.report("chat", demand=0, resident=24 * MiB, live=0, running=0, waiting=0)
    arb.report("batch", demand=0, resident=40 * MiB, live=0, running=0, waiting=0)
    assert arb.plan() == []
    status = {"device": "cpu", **arb.status()}
    rows = {t["name"]: t for t in status["tenants"]}
    # chat's guarantee (8 MiB) is never reclaimed, so it is not counted as idle
    assert (rows["chat"]["idle_bytes"], rows["batch"]["idle_bytes"]) == (16 * MiB, 40 * MiB)
    assert status["free_bytes"] == 0 and free_with_idle(status) == 56 * MiB
    table = format_table(status)
    assert "free 0.0 MiB   free incl. idle 56.0 MiB   tenants 2" in table
    assert _row(table, "chat").endswith("lent, idle") and _row(table, "batch").endswith("lent, idle")
    assert " 16.0 " in _row(table, "chat") and " 40.0 " in _row(table, "batch")
    header = table.splitlines()[2].split()
    assert header[5:8] == ["lease", "want", "idle"]

    # a disconnected tenant's lease is not lent to a live tenant that could give it back
    arb.disconnected("batch")
    status = {"device": "cpu", **arb.status()}
    assert free_with_idle(status) == 16 * MiB
    assert _row(format_table(status), "batch").endswith("disconnected")


def test_top_of_a_real_broker_shows_free_incl_idle() -> None:
    from broker_helpers import BrokerProcess  # a real daemon; nobody registered

    sock_dir = Path(tempfile.mkdtemp(prefix="ekvt", dir="/tmp"))  # AF_UNIX paths are short
    broker = BrokerProcess(sock_dir / "broker.sock", "16Mi")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "torch_elastic_kv", "top", "--count", "1", "--socket", str(broker.socket_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "budget 16.0 MiB   free 16.0 MiB   free incl. idle 16.0 MiB   tenants 0" in out.stdout
        snap = subprocess.run(
            [sys.executable, "-m", "torch_elastic_kv", "top", "--json", "--socket", str(broker.socket_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(snap.stdout)["free_bytes"] == 16 * MiB
    finally:
        assert broker.stop() == 0
        shutil.rmtree(sock_dir, ignore_errors=True)
