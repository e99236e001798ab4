"""Borrowing: any workload takes a fixed lease from the broker, all or nothing, and gives it back.

Real processes: a ``python -m torch_elastic_kv broker`` per test (temp socket directory), the
``borrow`` command and its COMMAND, and, for the end-to-end test, two ``serve --broker`` servers
of the default model under load (host backend: their KV memory is their RssShmem).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from allocator_helpers import Abi
from broker_helpers import BrokerProcess, MiB, RawClient
from serve_helpers import wait_until
from torch_elastic_kv.broker.client import BorrowedLease, BrokerClient, BrokerUnavailable
from torch_elastic_kv.broker.daemon import pid_alive
from torch_elastic_kv.testing.processes import package_env

_GRANTED = re.compile(r"granted (\d+) bytes after ([0-9.]+) s")


@pytest.fixture()
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ekvw", dir="/tmp"))  # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def broker(sock_dir: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(sock_dir / "b.sock", "64M", "--heartbeat-timeout", "30")
    yield b
    assert b.stop() == 0


def borrow_cmd(socket_path: Path, nbytes: int | str, *options: str, command: Optional[list[str]] = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch_elastic_kv", "borrow", "--broker", str(socket_path), "--bytes", str(nbytes)]
    return cmd + list(options) + (["--", *command] if command is not None else [])


def start_borrow(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        borrow_cmd(*args, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=package_env()
    )


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def hold_guarantees(broker: BrokerProcess, nbytes: int) -> RawClient:
    """A KV tenant (this process) whose guarantee takes ``nbytes`` of the budget."""
    c = RawClient(broker.socket_path)
    assert c.register("kv", guarantee=nbytes)["type"] == "registered"
    assert c.recv()["type"] == "grant"
    return c


# -- the Python API ----------------------------------------------------------------------------


def test_borrow_holds_the_lease_for_the_block_and_frees_it_on_exit(broker: BrokerProcess) -> None:
    client = BrokerClient(broker.socket_path, "job")
    with client.borrow(48 * MiB, timeout=10) as lease:
        assert isinstance(lease, BorrowedLease) and lease.nbytes == 48 * MiB
        assert 0 <= lease.waited_seconds < 10
        row = broker.tenant("job")
        assert (row["kind"], row["lease_bytes"], row["want_bytes"], row["pid"]) == (
            "borrow",
            48 * MiB,
            48 * MiB,
            os.getpid(),
        )
        # once granted, all of it is in use: reported resident, and kept alive by heartbeats
        wait_until(lambda: broker.tenant("job")["resident_bytes"] == 48 * MiB, 5, what="the resident report")
        assert broker.status()["free_bytes"] == 16 * MiB
        with pytest.raises(RuntimeError, match="'job': already borrowing 50331648 bytes"):
            with client.borrow(MiB):
                pass
    status = broker.status()
    assert (status["free_bytes"], status["tenants"]) == (64 * MiB, [])
    with client.borrow(8 * MiB, timeout=10):  # the same client borrows again
        assert broker.tenant("job")["lease_bytes"] == 8 * MiB
    assert broker.status()["tenants"] == []


def test_bad_borrows_are_refused_and_register_nothing(broker: BrokerProcess) -> None:
    client = BrokerClient(broker.socket_path, "job")
    for kw, error, text in [
        (dict(nbytes=0), ValueError, "borrow: nbytes must be an int > 0"),
        (dict(nbytes=1.5), ValueError, "borrow: nbytes must be an int > 0"),
        (dict(nbytes=MiB, timeout=0), ValueError, "borrow: timeout must be a number of seconds > 0, got 0"),
        (dict(nbytes=MiB, timeout=float("inf")), ValueError, "borrow: timeout must be a number of seconds > 0"),
        (dict(nbytes=MiB, limit_allocator="tpu:0"), ValueError, "tpu:0"),
    ]:
        with pytest.raises(error, match=re.escape(text)):
            with client.borrow(**kw):
                pass
    with pytest.raises(ValueError, match="a borrower has no guarantee .* guarantee_bytes=1048576"):
        with BrokerClient(broker.socket_path, "g", guarantee_bytes=MiB).borrow(MiB):
            pass
    with pytest.raises(BrokerUnavailable, match="max_bytes 134217728 must be > 0 and within the budget 67108864"):
        with client.borrow(128 * MiB):
            pass
    assert broker.status()["tenants"] == []
    with client.borrow(MiB, timeout=10):  # the refusals left the client usable
        assert broker.tenant("job")["lease_bytes"] == MiB


def test_a_borrow_that_cannot_be_granted_times_out_with_the_broker_s_figures(broker: BrokerProcess) -> None:
    kv = hold_guarantees(broker, 60 * MiB)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as e:
            with BrokerClient(broker.socket_path, "job").borrow(8 * MiB, timeout=1.0):
                pass
        assert 1.0 <= time.monotonic() - t0 < 10
        assert str(e.value) == (
            f"borrow: the broker at {broker.socket_path} did not grant 8388608 bytes within 1 s "
            "(budget 67108864, free 4194304, leased 62914560 bytes)"
        )
        # it left: nothing of it stays at the broker, and the guarantee was never touched
        assert [t["name"] for t in broker.status()["tenants"]] == ["kv"]
        assert broker.tenant("kv")["lease_bytes"] == 60 * MiB and broker.tenant("kv")["reclaiming_to"] is None
    finally:
        kv.close()


def test_limit_allocator_caps_the_allocator_while_held(fake_cuda, broker: BrokerProcess) -> None:
    # the cuda path on the fake driver: the cap the allocator enforces is the lease while held
    from torch_elastic_kv.memory import allocator

    allocator.set_limit(40 * MiB, "cuda:0")
    try:
        with BrokerClient(broker.socket_path, "job").borrow(16 * MiB, timeout=10, limit_allocator="cuda:0"):
            assert allocator.stats(0)["limit_bytes"] == 16 * MiB
            assert Abi(0).malloc(24 * MiB) == 0  # past the lease: NULL
            assert "limit of 16777216 bytes" in allocator.last_error(clear=True)
        assert allocator.stats(0)["limit_bytes"] == 40 * MiB  # the previous cap is back
    finally:
        allocator.set_limit(None, 0)
        allocator.close(0)


# -- the command -------------------------------------------------------------------------------


def test_bad_options_exit_2_with_one_line(sock_dir: Path, broker: BrokerProcess) -> None:
    s = broker.socket_path
    cases = [
        (borrow_cmd(s, "8M"), "missing '-- COMMAND [ARGS...]': the command to run on the borrowed memory"),
        (borrow_cmd(s, "8M", command=[]), "missing '-- COMMAND [ARGS...]': the command to run on the borrowed memory"),
        (
            borrow_cmd(s, "lots", command=["true"]),
            "--bytes: expected a byte count such as 4096, 64MiB or 1GiB, got 'lots'",
        ),
        (borrow_cmd(s, "0", command=["true"]), "--bytes must be > 0, got '0'"),
        (borrow_cmd(s, "8M", "--timeout", "0", command=["true"]), "--timeout must be > 0 seconds, got '0'"),
        (
            borrow_cmd(s, "8M", "--timeout", "soon", command=["true"]),
            "--timeout must be a number of seconds, got 'soon'",
        ),
        (borrow_cmd(s, "8M", "--timeout", "nan", command=["true"]), "--timeout must be > 0 seconds, got 'nan'"),
        (borrow_cmd(s, "8M", "--priority", "high", command=["true"]), "--priority must be an integer, got 'high'"),
        (borrow_cmd(s, "8M", "--name", "", command=["true"]), "--name must be 1-64 printable characters, got ''"),
        (
            [sys.executable, "-m", "torch_elastic_kv", "borrow", "--bytes", "8M", "--", "true"],
            "the following arguments are required: --broker",
        ),
    ]
    for cmd, text in cases:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=package_env())
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr == f"torch_elastic_kv borrow: error: {text}\n", cmd
        assert r.stdout == ""
    assert broker.status()["tenants"] == []


def test_borrow_runs_the_command_with_its_lease_and_exits_with_its_status(broker: BrokerProcess) -> None:
    show = "import os, sys; print(os.environ['EKV_LEASE_BYTES'], os.environ['EKV_BROKER_SOCKET']); sys.exit(3)"
    r = subprocess.run(
        borrow_cmd(broker.socket_path, "8M", "--name", "job", command=[sys.executable, "-c", show]),
        capture_output=True,
        text=True,
        timeout=60,
        env=package_env(),
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"{8 * MiB} {broker.socket_path}\n"
    assert "'job' granted 8388608 bytes after" in r.stderr and "'job' gave back 8388608 bytes" in r.stderr
    assert broker.status()["tenants"] == []
    r = subprocess.run(
        borrow_cmd(broker.socket_path, "8M", command=["/nonexistent/cmd"]),
        capture_output=True,
        text=True,
        timeout=60,
        env=package_env(),
    )
    assert r.returncode == 127 and "cannot run '/nonexistent/cmd': No such file or directory" in r.stderr


def test_no_grant_within_the_timeout_exits_124_with_one_line(broker: BrokerProcess) -> None:
    kv = hold_guarantees(broker, 60 * MiB)
    try:
        r = subprocess.run(
            borrow_cmd(
                broker.socket_path, "8M", "--timeout", "1", command=["touch", str(broker.socket_path.parent / "ran")]
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=package_env(),
        )
        assert r.returncode == 124
        assert r.stderr == (
            f"torch_elastic_kv borrow: error: borrow: the broker at {broker.socket_path} did not grant 8388608 bytes "
            "within 1 s (budget 67108864, free 4194304, leased 62914560 bytes)\n"
        )
        assert not (broker.socket_path.parent / "ran").exists()  # COMMAND never ran
        assert [t["name"] for t in broker.status()["tenants"]] == ["kv"]
    finally:
        kv.close()


def test_sigterm_is_forwarded_and_the_lease_released(broker: BrokerProcess) -> None:
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = start_borrow(broker.socket_path, "8M", "--name", "job", command=[sys.executable, "-c", child])
    try:
        assert p.stdout.readline() == "ready\n"
        assert broker.tenant("job")["lease_bytes"] == 8 * MiB
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 7  # COMMAND's own status: it got the signal and chose to exit 7
        assert broker.status()["tenants"] == []
    finally:
        p.kill()
        p.wait(30)


def test_a_signal_while_waiting_for_the_grant_ends_the_wait(broker: BrokerProcess) -> None:
    kv = hold_guarantees(broker, 60 * MiB)
    try:
        p = start_borrow(broker.socket_path, "8M", "--name", "job", "--timeout", "60", command=["true"])
        wait_until(lambda: broker.tenant("job"), 30, what="the borrower to register")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM
        assert p.stderr.read() == "torch_elastic_kv borrow: SIGTERM while waiting for the grant; nothing borrowed\n"
        assert [t["name"] for t in broker.status()["tenants"]] == ["kv"]
    finally:
        kv.close()


def test_kill_9_of_borrow_frees_its_lease_and_ends_its_command(broker: BrokerProcess) -> None:
    p = start_borrow(
        broker.socket_path,
        "8M",
        "--name",
        "job",
        command=[sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(60)"],
    )
    try:
        assert p.stdout.readline() == "ready\n"
        (command,) = children(p.pid)
        assert broker.tenant("job")["lease_bytes"] == 8 * MiB
        t0 = time.monotonic()
        p.kill()
        p.wait(30)
        wait_until(lambda: broker.tenant("job") is None, 5, interval=0.01, what="the lease to be freed")
        freed = time.monotonic() - t0
        wait_until(lambda: not pid_alive(command), 5, what="COMMAND to die with borrow")
        print(f"kill -9 of borrow: lease freed after {freed:.3f} s")
        assert broker.status()["free_bytes"] == 64 * MiB
    finally:
        p.kill()
        p.wait(30)
