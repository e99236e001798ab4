"""torch_elastic_kv.testing.sampling and the /proc readers the benchmarks share: the /metrics
parser, the load sampler against a real loopback HTTP server, and CommandProcess's start, ready
check and stop by pid (its process tree included)."""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from torch_elastic_kv.testing.proc import descendants, parse_proc_status, tree_memory
from torch_elastic_kv.testing.processes import CommandProcess
from torch_elastic_kv.testing.sampling import LoadSampler, parse_metrics

MIB = 1 << 20


def test_parse_metrics_reads_prometheus_text():
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    resident = prom.Gauge("ekv_kv_resident_bytes", "resident", registry=registry)
    running = prom.Gauge("ekv_requests_running", "running", ["model"], registry=registry)
    pre = prom.Counter("ekv_preemptions", "preemptions", registry=registry)
    ttft = prom.Histogram("ekv_time_to_first_token_seconds", "ttft", buckets=(0.1, 1.0), registry=registry)
    prom.Gauge("other_bytes", "not ours", registry=registry).set(5)
    resident.set(6 * MIB)
    running.labels("a").set(2)
    running.labels("b").set(3)
    pre.inc(4)
    ttft.observe(0.05)
    ttft.observe(0.5)
    parsed = parse_metrics(prom.generate_latest(registry).decode())
    assert parsed["ekv_kv_resident_bytes"] == 6 * MIB
    assert parsed["ekv_requests_running"] == 5  # labels summed
    assert parsed["ekv_preemptions_total"] == 4
    assert parsed["ekv_time_to_first_token_seconds_count"] == 2
    assert parsed["ekv_time_to_first_token_seconds_sum"] == pytest.approx(0.55)
    assert "other_bytes" not in parsed
    assert not any(k.endswith(("_bucket", "_created")) for k in parsed)
    # Untyped lines (no # TYPE) keep their names; another prefix reads other samples.
    assert parse_metrics("ekv_preemptions_total 7.0\nx_y 2\n") == {"ekv_preemptions_total": 7.0}
    assert parse_metrics("ekv_a 1\nx_y 2\n", prefix="x_") == {"x_y": 2.0}


def test_parse_proc_status_and_tree_memory():
    text = "Name:\tpython\nVmPeak:\t  900 kB\nVmRSS:\t  2048 kB\nRssAnon:\t  1024 kB\nRssFile:\t 512 kB\nRssShmem:\t 512 kB\n"
    assert parse_proc_status(text) == {
        "VmRSS": 2048 * 1024,
        "RssAnon": 1024 * 1024,
        "RssFile": 512 * 1024,
        "RssShmem": 512 * 1024,
    }
    assert parse_proc_status("Name:\tx\n") == {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    with pytest.raises(ValueError, match="expected a size in kB"):
        parse_proc_status("VmRSS:\t12 pages\n")
    mine = tree_memory(os.getpid())
    assert mine is not None and mine["VmRSS"] >= parse_proc_status(Path("/proc/self/status").read_text())["RssAnon"]


class _Metrics(http.server.BaseHTTPRequestHandler):
    """/metrics: ekv_kv_resident_bytes = the number of pages served so far x 1 MiB; every third
    request answers 500."""

    count = 0

    def do_GET(self):  # noqa: N802 - the stdlib's name
        type(self).count += 1
        if self.path != "/metrics" or self.count % 3 == 0:
            self.send_error(500)
            return
        body = f"# TYPE ekv_kv_resident_bytes gauge\nekv_kv_resident_bytes {self.count * MIB}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_load_sampler_reads_metrics_and_memory_and_counts_misses():
    pytest.importorskip("httpx")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with LoadSampler({"a": url}, 0.02, pids={"a": os.getpid(), "gone": 2**22 + 1}) as sampler:
            deadline = time.monotonic() + 30
            while len(sampler.ticks) < 9 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        server.shutdown()
        server.server_close()
    ticks = sampler.ticks
    assert len(ticks) >= 9
    assert [t["a"]["metrics"] is None for t in ticks[:9]] == [False, False, True] * 3
    assert sampler.missed == sum(t["a"]["metrics"] is None for t in ticks)
    resident = sampler.series("a", "ekv_kv_resident_bytes")
    assert [v for _, v in resident[:6]] == [k * MIB for k in (1, 2, 4, 5, 7, 8)]
    assert all(t0 < t1 for (t0, _), (t1, _) in zip(resident, resident[1:]))
    assert sampler.last_metrics["a"]["ekv_kv_resident_bytes"] == resident[-1][1]
    assert all(t["a"]["memory"]["VmRSS"] > 0 for t in ticks)
    assert all(t["gone"] == {"metrics": None, "memory": None} for t in ticks)  # no such pid
    n = len(sampler.ticks)
    time.sleep(0.1)
    assert len(sampler.ticks) == n  # stopped
    with pytest.raises(ValueError, match="LoadSampler: interval must be > 0 seconds, got 0"):
        LoadSampler({}, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_command_process_ready_then_stopped_with_its_children(tmp_path):
    pytest.importorskip("httpx")
    port = _free_port()
    # An HTTP server that first starts a child of its own (which would outlive a plain SIGTERM).
    script = (
        "import http.server, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')\n"
    )
    proc = CommandProcess([sys.executable, "-c", script], f"http://127.0.0.1:{port}", tmp_path / "log", cwd=tmp_path)
    try:
        assert proc.wait_ready(60, health="/") == f"http://127.0.0.1:{port}"
        children = descendants(proc.pid)
        assert len(children) == 1
    finally:
        status = proc.stop(timeout=30, tree=True)
    assert status != 0  # ended by the signal
    deadline = time.monotonic() + 10
    while not _gone_or_zombie(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone_or_zombie(children[0])


def test_command_process_that_exits_is_reported_with_its_log(tmp_path):
    proc = CommandProcess(
        [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"],
        f"http://127.0.0.1:{_free_port()}",
        tmp_path / "log",
    )
    with pytest.raises(RuntimeError, match=r"exited with 3 before it was ready:\nno model here"):
        proc.wait_ready(60)
