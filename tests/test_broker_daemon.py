"""The broker daemon as a real process: socket rules, bad messages, dead tenants, ``top``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_helpers import BrokerProcess, MiB, RawClient
from serve_helpers import wait_until
from torch_elastic_kv.broker.protocol import MAX_MESSAGE_BYTES, message


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ekvb", dir="/tmp"))  # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(sock_dir: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(sock_dir / "private" / "b.sock", "64M", "--heartbeat-timeout", "30")
    yield b
    assert b.stop() == 0


def _error(c: RawClient) -> dict:
    reply = c.recv()
    assert reply["type"] == "error", reply
    assert c.closed_by_peer()
    return reply


def test_the_socket_is_private(broker: BrokerProcess) -> None:
    assert stat.S_IMODE(broker.socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(broker.socket_path.stat().st_mode) == 0o600
    assert broker.socket_path.stat().st_uid == os.getuid()


def test_a_guarantee_is_granted_at_registration(broker: BrokerProcess) -> None:
    with RawClient(broker.socket_path) as c:
        reply = c.register("g1", guarantee=4 * MiB)
        assert reply == {
            "v": 1,
            "type": "registered",
            "lease_bytes": 0,
            "budget_bytes": 64 * MiB,
            "heartbeat_seconds": 1.0,
        }
        grant = c.recv()
        assert grant["type"] == "grant" and grant["lease_bytes"] == 4 * MiB
        assert broker.tenant("g1")["lease_bytes"] == 4 * MiB
        c.send(message("leave", resident_bytes=0))
        wait_until(lambda: broker.tenant("g1") is None, 5, what="g1 to leave")
    assert broker.status()["free_bytes"] == 64 * MiB


def test_bad_messages_close_only_their_connection(broker: BrokerProcess) -> None:
    with RawClient(broker.socket_path) as good:
        good.register("steady", guarantee=2 * MiB)
        assert good.recv()["lease_bytes"] == 2 * MiB
        cases = [
            (b"{not json\n", "bad_json", "not a JSON object"),
            (b"[1, 2]\n", "bad_json", "not a JSON object: list"),
            (b'{"v": 2, "type": "status"}\n', "bad_version", "protocol version 2; this broker speaks 1"),
            (b'{"v": 1, "type": "grant"}\n', "unknown_type", "unknown message type 'grant'"),
            (b'{"v": 1, "type": "heartbeat", "x": 1}\n', "unknown_field", "heartbeat: unknown field(s) ['x']"),
            (b'{"v": 1, "type": "report"}\n', "missing_field", "report: missing field 'demand_bytes'"),
            (
                b'{"v":1,"type":"report","demand_bytes":-1,"resident_bytes":0,"live_bytes":0,"running":0,"waiting":0}\n',
                "bad_value",
                "demand_bytes must be >= 0",
            ),
            (
                b'{"v":1,"type":"report","demand_bytes":1,"resident_bytes":0,"live_bytes":0,"running":0,"waiting":0}\n',
                "out_of_order",
                "report: register first",
            ),
            (
                b'{"v":1,"type":"released","seq":1,"lease_bytes":0,"resident_bytes":0}\n',
                "out_of_order",
                "register first",
            ),
            (b"x" * (MAX_MESSAGE_BYTES + 10) + b"\n", "too_large", f"longer than {MAX_MESSAGE_BYTES} bytes"),
        ]
        for data, code, text in cases:
            with RawClient(broker.socket_path) as bad:
                bad.send_raw(data)
                reply = _error(bad)
                assert reply["code"] == code, (data[:60], reply)
                assert text in reply["message"], (data[:60], reply)
        # the well-behaved tenant was not disturbed
        good.send(message("heartbeat"))
        good.send(message("status"))
        assert good.recv()["type"] == "status"
        assert broker.tenant("steady")["lease_bytes"] == 2 * MiB
        assert broker.tenant("steady")["connected"] is True
        good.send(message("leave", resident_bytes=0))
        wait_until(lambda: broker.tenant("steady") is None, 5, what="steady to leave")


def test_registrations_that_cannot_be_honoured(broker: BrokerProcess) -> None:
    with RawClient(broker.socket_path) as a:
        a.register("big", guarantee=40 * MiB)
        assert a.recv()["lease_bytes"] == 40 * MiB
        with RawClient(broker.socket_path) as b:
            reply = b.register("also-big", guarantee=30 * MiB)
            assert reply["type"] == "error" and b.closed_by_peer()
        assert reply["code"] == "guarantee_does_not_fit"
        assert (
            "guarantee_bytes 31457280 does not fit: budget 67108864, other tenants' guarantees 41943040"
            in reply["message"]
        )
        with RawClient(broker.socket_path) as b:
            assert b.register("big")["code"] == "name_taken"
            assert b.closed_by_peer()
        with RawClient(broker.socket_path) as b:
            reply = b.register("liar", pid=1)
            assert reply["code"] == "bad_value" and "pid 1 is not the connecting process" in reply["message"]
        with RawClient(broker.socket_path) as b:
            assert b.register("a" * 65)["code"] == "bad_value"
        assert [t["name"] for t in broker.status()["tenants"]] == ["big"]
        a.send(message("leave", resident_bytes=0))
        wait_until(lambda: broker.tenant("big") is None, 5, what="big to leave")


def test_impossible_holdings_are_refused_and_change_nothing(broker: BrokerProcess) -> None:
    # the example: a 640 MiB lease on a 1 MiB max, on a 64 MiB budget
    cases = [
        (
            dict(lease_bytes=640 * MiB, max_bytes=1 * MiB),
            "register: lease_bytes 671088640 exceeds the tenant's max_bytes 1048576",
        ),
        (dict(lease_bytes=640 * MiB, max_bytes=1 << 30), "register: lease_bytes 671088640 exceeds the budget 67108864"),
        (
            dict(resident_bytes=8 * MiB, max_bytes=4 * MiB),
            "register: resident_bytes 8388608 exceeds the tenant's max_bytes 4194304",
        ),
    ]
    for fields, text in cases:
        with RawClient(broker.socket_path) as c:
            reply = c.register("hoarder", **fields)
            assert reply == {"v": 1, "type": "error", "code": "bad_value", "message": text}
            assert c.closed_by_peer()
        assert broker.status()["tenants"] == [] and broker.status()["free_bytes"] == 64 * MiB
    with RawClient(broker.socket_path) as late:  # a later tenant's guarantee is granted at once
        late.register("late", guarantee=8 * MiB)
        grant = late.recv()
        assert (grant["type"], grant["lease_bytes"]) == ("grant", 8 * MiB)
        # a report of holdings above the tenant's own max is refused too, and changes nothing
        with RawClient(broker.socket_path) as small:
            small.register("small", max_bytes=4 * MiB)
            small.send(message("report", demand_bytes=0, resident_bytes=MiB, live_bytes=0, running=1, waiting=0))
            wait_until(lambda: broker.tenant("small")["resident_bytes"] == MiB, 5, what="the report")
            small.send(
                message("report", demand_bytes=MiB, resident_bytes=640 * MiB, live_bytes=0, running=1, waiting=0)
            )
            reply = _error(small)
            assert reply["code"] == "bad_value"
            assert reply["message"] == "report: resident_bytes 671088640 exceeds the tenant's max_bytes 4194304"
            wait_until(lambda: broker.tenant("small")["connected"] is False, 5, what="the connection to drop")
            row = broker.tenant("small")
            assert (row["resident_bytes"], row["running"], row["lease_bytes"]) == (MiB, 1, 0)
        with RawClient(broker.socket_path) as small:  # the same process takes it back, and leaves
            assert small.register("small", max_bytes=4 * MiB)["type"] == "registered"
            small.send(message("leave", resident_bytes=0))
            wait_until(lambda: broker.tenant("small") is None, 5, what="small to leave")
        late.send(message("leave", resident_bytes=0))
        wait_until(lambda: broker.tenant("late") is None, 5, what="late to leave")


def test_hostile_bodies_get_an_error_reply_then_close(broker: BrokerProcess) -> None:
    cases = [
        (b'{"v": 1, "type": "status", "x": ' + b"9" * 5000 + b"}\n", "bad_json", "Exceeds the limit (4300 digits)"),
        (b"[" * 20000 + b"]" * 20000 + b"\n", "bad_json", "not a JSON object: nested too deeply"),
        (b'{"v": 1.0, "type": "status"}\n', "bad_version", "protocol version 1.0; this broker speaks 1"),
        (b'{"v": true, "type": "status"}\n', "bad_version", "protocol version True; this broker speaks 1"),
        (b'{"v": NaN, "type": "status"}\n', "bad_json", "NaN is not a JSON number"),
        (
            b'{"v": 1, "type": "leave", "resident_bytes": ' + b"9" * 4000 + b"}\n",
            "bad_value",
            "leave: resident_bytes must be within +-(2**63 - 1), got an integer of 4000 digits",
        ),
        (
            b'{"v": 1, "type": "leave", "resident_bytes": 9223372036854775808}\n',
            "bad_value",
            "got 9223372036854775808",
        ),
    ]
    for data, code, text in cases:
        with RawClient(broker.socket_path) as bad:
            bad.send_raw(data)
            reply = _error(bad)
            assert reply["code"] == code, (data[:40], reply)
            assert text in reply["message"], (data[:40], reply)
    assert broker.status()["type"] == "status"


def test_an_error_reply_survives_a_write_under_way(broker: BrokerProcess) -> None:
    # the peer is still writing when the broker refuses it: the broker reads and drops the rest
    # instead of closing on it, so the write completes and the reason can be read
    with RawClient(broker.socket_path) as bad:
        bad.send_raw(b"{not json\n" + b"x" * (1 << 20))
        reply = _error(bad)
    assert reply["code"] == "bad_json"


_TENANT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from broker_helpers import RawClient
    c = RawClient({path!r})
    c.register("doomed", guarantee={guarantee})
    print(c.recv()["lease_bytes"], flush=True)
    time.sleep(600)
    """
)


def test_a_killed_tenant_s_lease_comes_back(broker: BrokerProcess) -> None:
    code = _TENANT.format(tests=str(Path(__file__).parent), path=str(broker.socket_path), guarantee=8 * MiB)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == str(8 * MiB)
        row = broker.tenant("doomed")
        assert row["pid"] == child.pid and row["lease_bytes"] == 8 * MiB
        assert broker.status()["free_bytes"] == 56 * MiB
        os.kill(child.pid, 9)  # not reaped yet: a zombie's memory is gone all the same
        wait_until(lambda: broker.tenant("doomed") is None, 2.0, what="the dead tenant's lease to be returned")
        assert broker.status()["free_bytes"] == 64 * MiB
    finally:
        child.kill()
        child.wait()


def test_a_silent_tenant_is_disconnected_but_keeps_its_lease(sock_dir: Path) -> None:
    b = BrokerProcess(sock_dir / "hb.sock", "16M", "--heartbeat-timeout", "0.3")
    try:
        with RawClient(b.socket_path) as c:
            c.register("quiet", guarantee=2 * MiB)
            assert c.recv()["type"] == "grant"
            assert wait_until(c.closed_by_peer, 5, what="the broker to drop the silent tenant")
            row = b.tenant("quiet")
            assert row["connected"] is False and row["lease_bytes"] == 2 * MiB  # this process still lives
            with RawClient(b.socket_path) as again:  # the same process may come back for it
                assert again.register("quiet", guarantee=2 * MiB)["lease_bytes"] == 2 * MiB
    finally:
        assert b.stop() == 0


def test_top_json_and_table(broker: BrokerProcess) -> None:
    with RawClient(broker.socket_path) as c:
        c.register("shown", priority=3, guarantee=6 * MiB)
        c.recv()
        c.send(
            message("report", demand_bytes=10 * MiB, resident_bytes=4 * MiB, live_bytes=3 * MiB, running=2, waiting=5)
        )
        wait_until(lambda: broker.tenant("shown")["waiting"] == 5, 5, what="the report")
        out = subprocess.run(
            [sys.executable, "-m", "torch_elastic_kv", "top", "--json", "--socket", str(broker.socket_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        assert snap["budget_bytes"] == 64 * MiB
        assert snap["free_bytes"] == snap["budget_bytes"] - sum(t["lease_bytes"] for t in snap["tenants"])
        (row,) = [t for t in snap["tenants"] if t["name"] == "shown"]
        assert row["pid"] == os.getpid()
        assert (row["priority"], row["guarantee_bytes"], row["demand_bytes"], row["resident_bytes"]) == (
            3,
            6 * MiB,
            10 * MiB,
            4 * MiB,
        )
        assert (row["live_bytes"], row["waiting"]) == (3 * MiB, 5)
        assert row["lease_bytes"] == 10 * MiB  # demand granted from free memory
        text = subprocess.run(
            [sys.executable, "-m", "torch_elastic_kv", "top", "--count", "1", "--socket", str(broker.socket_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert text.returncode == 0, text.stderr
        assert "budget 64.0 MiB" in text.stdout and "shown" in text.stdout and "10.0" in text.stdout
        c.send(message("leave", resident_bytes=0))
        wait_until(lambda: broker.tenant("shown") is None, 5, what="shown to leave")


def test_command_line_errors(sock_dir: Path, broker: BrokerProcess) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch_elastic_kv", *args], capture_output=True, text=True, timeout=60
        )

    r = run("broker", "--budget", "lots", "--socket", str(sock_dir / "x.sock"))
    assert r.returncode == 2 and "--budget: expected a byte count" in r.stderr
    r = run("broker", "--budget", "1G", "--device", "gpu0", "--socket", str(sock_dir / "x.sock"))
    assert r.returncode == 2 and "--device must be cpu or cuda:N, got 'gpu0'" in r.stderr
    r = run("broker", "--budget", "1G", "--socket", str(broker.socket_path))
    assert r.returncode == 1
    assert r.stderr == (
        f"torch_elastic_kv broker: error: broker: another broker holds {broker.socket_path}.lock (pid {broker.pid})\n"
    )
    for flag, value, text in [
        ("--register-timeout", "0", "--register-timeout must be > 0, got 0.0"),
        ("--write-timeout", "-1", "--write-timeout must be > 0, got -1.0"),
        ("--max-connections", "0", "--max-connections must be >= 1, got 0"),
        ("--max-output-bytes", "1K", f"--max-output-bytes must be at least {MAX_MESSAGE_BYTES} (one message)"),
        ("--max-output-bytes", "lots", "--max-output-bytes: expected a byte count"),
    ]:
        r = run("broker", "--budget", "1G", "--socket", str(sock_dir / "x.sock"), flag, value)
        assert r.returncode == 2 and text in r.stderr, (flag, value, r.stderr)
    r = run("top", "--json", "--socket", str(sock_dir / "nobody.sock"))
    assert r.returncode == 1 and "no broker at" in r.stderr
    assert not (sock_dir / "x.sock").exists()


_OTHER_UID = textwrap.dedent(
    """
    import json, os, socket, sys
    os.setgid(65534)
    os.setuid(65534)  # nobody
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(b'{"v": 1, "type": "status"}\\n')
    print(s.makefile().readline(), end="")
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_refused_by_peer_credentials(sock_dir: Path) -> None:
    # The directory (0700) and socket (0600) already keep other users out; open them up here to
    # show the broker's own check: it reads the peer's uid and refuses it.
    b = BrokerProcess(sock_dir / "open" / "b.sock", "16M")
    try:
        for d in (sock_dir, b.socket_path.parent):
            os.chmod(d, 0o755)
        os.chmod(b.socket_path, 0o666)
        out = subprocess.run(
            [sys.executable, "-c", _OTHER_UID, str(b.socket_path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["type"] == "error" and reply["code"] == "permission_denied"
        assert "uid 65534 may not use this broker" in reply["message"]
        assert b.status()["type"] == "status"  # and it keeps serving its own user
    finally:
        assert b.stop() == 0
