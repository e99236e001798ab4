"""The broker against a careless operator and a hostile peer: what is at its socket path, two
brokers started at once, floods of silent connections, a peer that never reads."""

from __future__ import annotations

import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from broker_helpers import BrokerProcess, MiB, RawClient
from serve_helpers import wait_until
from torch_elastic_kv.broker.protocol import encode, message
from torch_elastic_kv.testing.processes import package_env


@pytest.fixture()
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ekvh", dir="/tmp"))  # AF_UNIX paths are short
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start(path: Path, timeout: float = 20.0) -> tuple[int | None, str]:
    """Run a broker on ``path``; (exit status, stderr) if it exits within ``timeout``, else it is
    stopped and the status is None (it started serving)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch_elastic_kv", "broker", "--budget", "16M", "--socket", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=package_env(),
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        return None, err


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- what is at the socket path (item 2) ---------------------------------------------------------


def test_a_file_that_is_not_a_stale_socket_is_never_removed(sock_dir: Path) -> None:
    key = sock_dir / "id_rsa"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    fifo = sock_dir / "fifo"
    os.mkfifo(fifo)
    folder = sock_dir / "folder"
    folder.mkdir()
    for path, what in [(key, "a regular file"), (fifo, "a FIFO"), (folder, "a directory")]:
        status, err = _start(path)
        assert status == 1
        assert (
            _one_line(err)
            == f"torch_elastic_kv broker: error: broker: {path} is {what}, not a socket; refusing to start"
        )
    assert key.read_text() == "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    assert fifo.is_fifo() and folder.is_dir()


def test_only_a_dead_socket_of_this_uid_is_replaced(sock_dir: Path) -> None:
    live = sock_dir / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen()
    try:
        status, err = _start(live)
        assert status == 1
        assert (
            _one_line(err) == f"torch_elastic_kv broker: error: broker: {live} is a live socket: a broker answers there"
        )
        assert live.is_socket()
    finally:
        listener.close()
    # the listener is gone: a stale socket of this uid, replaced by a broker that serves
    b = BrokerProcess(live, "16M")
    try:
        assert f"removed the stale socket {live}" in b.log()
        assert b.status()["budget_bytes"] == 16 * MiB
    finally:
        assert b.stop() == 0
    if os.geteuid() == 0:  # root can make a socket another uid owns
        other = sock_dir / "other.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(other))
        s.close()
        os.chown(other, 65534, 65534)
        status, err = _start(other)
        assert status == 1
        assert (
            _one_line(err)
            == f"torch_elastic_kv broker: error: broker: {other} is a socket owned by uid 65534; refusing to start"
        )
        assert other.is_socket()


def test_a_broker_removes_only_the_socket_it_bound(sock_dir: Path) -> None:
    path = sock_dir / "b.sock"
    b = BrokerProcess(path, "16M")
    first = path.stat().st_ino
    path.unlink()  # an operator moved the socket away and something else bound the path
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.bind(str(path))
    try:
        assert path.stat().st_ino != first
        assert b.stop() == 0
        assert path.is_socket()
    finally:
        stranger.close()


# -- brokers started at the same instant (item 3) ------------------------------------------------


def _text(log: IO[str]) -> str:
    log.seek(0)
    return log.read()


_RACER = textwrap.dedent(
    """
    import sys
    from torch_elastic_kv.broker.cli import broker_main
    print("ready", flush=True)
    sys.stdin.readline()  # the start line: every racer is past its imports when it comes
    sys.exit(broker_main(["--budget", "16M", "--socket", sys.argv[1]]))
    """
)


def test_of_brokers_started_at_once_exactly_one_serves(sock_dir: Path) -> None:
    racers, rounds = 6, 4
    for r in range(rounds):
        path = sock_dir / f"r{r}" / "b.sock"
        logs = [tempfile.TemporaryFile(mode="w+") for _ in range(racers)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=package_env(),
            )
            for log in logs
        ]
        try:
            for p in procs:
                assert p.stdout.readline() == "ready\n"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            deadline = time.monotonic() + 30
            while sum(p.poll() is not None for p in procs) < racers - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = [p for p in procs if p.poll() is None]
            assert len(alive) == 1, f"round {r}: {len(alive)} brokers serve"
            (winner,) = alive
            winner_log = logs[procs.index(winner)]
            wait_until(lambda: "listening on" in _text(winner_log), 10, what="the winner to listen")  # noqa: B023
            for p, log in zip(procs, logs):
                if p is winner:
                    continue
                assert p.returncode == 1
                assert _one_line(_text(log)) == (
                    f"torch_elastic_kv broker: error: broker: another broker holds {path}.lock (pid {winner.pid})"
                )
            # the losers are gone; the winner's socket stays and answers
            assert path.is_socket()
            with RawClient(path) as c:
                c.send(message("status"))
                assert c.recv()["budget_bytes"] == 16 * MiB
            winner.send_signal(signal.SIGTERM)
            assert winner.wait(30) == 0
            assert not path.exists() and Path(f"{path}.lock").is_file()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(30)
            for log in logs:
                log.close()


# -- silent connections (item 7) ------------------------------------------------------------------


def _try_register(path: Path, name: str) -> RawClient | None:
    """A registered tenant connection, or None if the broker refused or did not answer."""
    try:
        c = RawClient(path, timeout=2.0)
    except OSError:
        return None
    try:
        if c.register(name)["type"] == "registered":
            return c
    except (OSError, ConnectionError):
        pass
    c.close()
    return None


def test_silent_connections_cannot_lock_tenants_out(sock_dir: Path) -> None:
    nofile = 256
    # --register-timeout 5 and --max-connections 192 (under this descriptor limit) by default
    limits = {resource.RLIMIT_NOFILE: (nofile, nofile)}
    b = BrokerProcess(sock_dir / "b.sock", "64M", "--heartbeat-timeout", "60", limits=limits)
    silent: list[socket.socket] = []
    fresh = None
    steady = RawClient(b.socket_path)
    try:
        steady.register("steady")
        baseline = b.fd_count()
        silent = _flood(b.socket_path, nofile + 100, 20)  # more than its whole descriptor table
        assert len(silent) >= nofile
        t = time.monotonic()
        steady.send(message("status"))  # a registered tenant is served throughout
        assert steady.recv()["type"] == "status" and time.monotonic() - t < 2.0
        start = time.monotonic()
        while fresh is None and time.monotonic() - start < 15:
            fresh = _try_register(b.socket_path, "fresh")
            if fresh is None:
                time.sleep(0.1)
        assert fresh is not None, "a tenant could not register within 15 s"
        assert time.monotonic() - start < 12  # the register timeout (5 s) frees the slots
        # every silent connection was closed by the broker: refused past the cap with a line
        # saying so, or closed at the register timeout
        codes = []
        for s in silent:
            s.settimeout(5.0)
            data = s.recv(4096)
            codes.append(data.split(b'"code":"', 1)[1].split(b'"', 1)[0].decode() if data else "closed")
            if data:
                assert s.recv(4096) == b""
        assert set(codes) == {"too_many_connections", "closed"} and codes[-1] == "too_many_connections", codes
        # its descriptors are back to the listener's and the fresh tenant's
        wait_until(lambda: b.fd_count() <= baseline + 1, 10, what="the broker's descriptors to come back")
        assert b.tenant("fresh")["connected"] is True and b.tenant("steady")["connected"] is True
        log = b.log()
        assert len(log.encode()) < 16 * 1024, log[-2000:]
        assert "did not register within 5 s (--register-timeout)" in log
        assert "connections open (--max-connections); refusing a new one" in log
    finally:
        for s in silent:
            s.close()
        if fresh is not None:
            fresh.close()
        steady.close()
        assert b.stop() == 0


def _flood(path: Path, count: int, seconds: float) -> list[socket.socket]:
    """Up to ``count`` connections that never send a byte, opened within ``seconds``."""
    silent: list[socket.socket] = []
    end = time.monotonic() + seconds
    while len(silent) < count and time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:  # the listen backlog is full: the broker has not accepted yet
            s.close()
            time.sleep(0.005)
            continue
        silent.append(s)
    return silent


def test_accept_errors_are_logged_at_most_once_per_5_s(sock_dir: Path) -> None:
    # a cap set above the descriptor limit: accepting fails (EMFILE) until the register timeout
    # frees descriptors; asyncio reports every failed round, the broker one line per 5 s
    nofile = 256
    b = BrokerProcess(
        sock_dir / "b.sock",
        "64M",
        "--register-timeout",
        "2",
        "--max-connections",
        "1000",
        limits={resource.RLIMIT_NOFILE: (nofile, nofile)},
    )
    silent: list[socket.socket] = []
    fresh = None
    try:
        silent = _flood(b.socket_path, nofile + 100, 10)
        assert len(silent) >= nofile
        start = time.monotonic()
        while fresh is None and time.monotonic() - start < 15:
            fresh = _try_register(b.socket_path, "fresh")
            if fresh is None:
                time.sleep(0.1)
        assert fresh is not None, "a tenant could not register within 15 s"
        log = b.log()
        assert "broker: cannot accept a connection: [Errno 24] Too many open files" in log
        assert log.count("cannot accept a connection") <= 4, log[-2000:]
        assert len(log.encode()) < 16 * 1024, log[-2000:]
    finally:
        for s in silent:
            s.close()
        if fresh is not None:
            fresh.close()
        assert b.stop() == 0


# -- a peer that never reads (item 8) -------------------------------------------------------------


def test_a_peer_that_never_reads_is_dropped_and_slows_nobody(sock_dir: Path) -> None:
    b = BrokerProcess(sock_dir / "b.sock", "64M", "--heartbeat-timeout", "120")
    tenants = []
    hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def probe() -> None:  # another tenant's status round trips, throughout
        try:
            while not stop.is_set():
                t = time.monotonic()
                with RawClient(b.socket_path, timeout=30) as c:
                    c.send(message("status"))
                    reply = c.recv()
                latencies.append(time.monotonic() - t)
                assert reply["type"] == "status", reply
                time.sleep(0.05)
        except BaseException as e:  # reported by the test
            errors.append(e)

    prober = threading.Thread(target=probe)
    try:
        for i in range(8):  # rows that make each status reply a few KiB
            c = RawClient(b.socket_path)
            c.register(f"{i}".ljust(64, "t"))
            tenants.append(c)
        before = b.memory("VmRSS")
        hostile.connect(str(b.socket_path))
        hostile.setblocking(False)
        requests = encode(message("status")) * 2048
        prober.start()
        sent, dropped = 0, False
        deadline = time.monotonic() + 20
        while sent < MiB and time.monotonic() < deadline:
            _, writable, _ = select.select([], [hostile], [], 0.2)
            if not writable:
                continue
            try:
                sent += hostile.send(requests)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
        time.sleep(0.5)  # a few more probes after the drop
        stop.set()
        prober.join(60)
        assert errors == []
        assert dropped, f"the broker read {sent} bytes of requests and kept the connection"
        assert b.memory("VmHWM") - before < 32 * MiB
        assert len(latencies) >= 5 and max(latencies) < 1.0, latencies
        assert f"dropping the connection of pid {os.getpid()} (tenant None): it left its replies unread for 5 s" in (
            b.log()
        )
        assert [t["connected"] for t in b.status()["tenants"]] == [True] * 8
    finally:
        stop.set()
        if prober.is_alive():
            prober.join(60)
        hostile.close()
        for c in tenants:
            c.close()
        assert b.stop() == 0
