"""``serve --front process`` (the default): HTTP in a child process, the Engine in the server's pid.

The child must answer exactly as the one-process server does, import no torch (it holds no
model and no KV), and neither process may outlive the other: a dead front takes the server down
with one line and its KV memory given back; a dead engine process takes the front with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_helpers import ServerProcess, rss_shmem, wait_until
from torch_elastic_kv.serve.engine_host import EngineHost
from torch_elastic_kv.serve.engine_thread import ChoiceEvent, ChoiceSpec, Submission
from torch_elastic_kv.serve.front_link import EngineLink
from torch_elastic_kv.serve.link_wire import read_frame
from torch_elastic_kv.testing.proc import descendants
from torch_elastic_kv.testing.processes import front_pids

TIMEOUT = 60.0


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _front_pids(server: ServerProcess) -> list[int]:
    return front_pids(server.pid)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie holds nothing
    except FileNotFoundError:
        return True


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _imports_torch(code: str) -> bool:
    """Whether ``code``, run in a fresh interpreter, leaves torch imported."""
    probe = f"import sys\n{code}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().endswith("True")


def test_the_front_process_modules_import_no_torch():
    assert not _imports_torch("import torch_elastic_kv.serve.front_process, torch_elastic_kv.serve.http_server")
    assert _imports_torch("import torch_elastic_kv.serve.server")  # the probe can tell


# Answers that must be the same from both fronts: greedy tokens (n=2, a stop string, logprobs,
# echo), a streamed chat, and the errors the engine's side decides (the KV ceiling, the context).
_BODIES = [
    ("/v1/completions", {"prompt": "elastic memory", "max_tokens": 12, "temperature": 0, "n": 2}),
    ("/v1/completions", {"prompt": [9, 10, 11, 12], "max_tokens": 8, "temperature": 0, "stop": ["e"]}),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 100000}),  # over the context
    ("/v1/completions", {"prompt": "abc", "max_tokens": 1000}),  # within it, over the KV ceiling
    ("/v1/completions", {"prompt": "x" * 4000, "max_tokens": 4}),
    # no max_tokens: the rest of the context cut to what the KV ceiling leaves
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}),
]


def _answers(url: str) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []
    with httpx.Client(timeout=TIMEOUT) as client:
        for path, body in _BODIES:
            r = client.post(url + path, json={**body, "return_token_ids": True})
            data = r.json()
            if r.status_code == 200:
                out.append((200, [(c.get("token_ids"), c.get("text"), c["finish_reason"]) for c in data["choices"]]))
            else:
                out.append((r.status_code, data["error"]))
        # streamed: the token ids of every chunk, and the finish reason
        body = {"messages": [{"role": "user", "content": "more"}], "max_tokens": 20, "temperature": 0}
        ids, finish = [], None
        with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    ids.append(choice["delta"].get("content", ""))
                    finish = choice["finish_reason"] or finish
        out.append((r.status_code, ("".join(ids), finish)))
    return out


def test_the_front_process_answers_as_the_thread_front_without_torch():
    common = ["--max-kv-bytes", "2M"]
    process = ServerProcess([*common, "--front", "process"], wait=False)
    thread = ServerProcess([*common, "--front", "thread"], wait=False)
    try:
        process.wait_ready(180)
        thread.wait_ready(180)
        fronts = _front_pids(process)
        assert len(fronts) == 1, [_cmdline(p) for p in descendants(process.pid)]
        assert _front_pids(thread) == []
        # the child holds no model: torch's library is mapped in the engine's pid only, unless
        # transformers' own tokenizer module brings torch in (5.17 does, through its GGUF loader)
        assert "libtorch" in _maps(process.pid)
        if not _imports_torch("from transformers import PreTrainedTokenizerFast"):
            assert "libtorch" not in _maps(fronts[0])
        got, want = _answers(process.url), _answers(thread.url)
        assert [status for status, _ in got] == [200, 200, 200, 400, 400, 400, 200, 200], got
        assert "at most" in got[4][1]["message"] and len(got[6][1][0][0]) > 200, got  # type: ignore[index]
        assert got == want
    finally:
        process.stop()
        thread.stop()


def test_a_front_that_dies_takes_the_server_down_and_gives_kv_back():
    server = ServerProcess(["--max-kv-bytes", "8M"])
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 4}, timeout=TIMEOUT)
        assert r.status_code == 200
        (front,) = _front_pids(server)
        os.kill(front, signal.SIGKILL)
        assert server.wait(30) == 1
        log = server.log()
        assert f"the HTTP front (process {front}) exited with status {-signal.SIGKILL}" in log, log[-2000:]
        assert "engine closed: KV memory given back" in log
    finally:
        server.stop()


def test_an_engine_process_that_dies_takes_the_front_with_it():
    server = ServerProcess(["--max-kv-bytes", "8M"])
    try:
        (front,) = _front_pids(server)
        url = server.url
        os.kill(server.pid, signal.SIGKILL)
        server.wait(30)
        wait_until(lambda: _gone(front), 10, 0.05, "the front process gone")
        with pytest.raises(httpx.ConnectError):  # nothing listens on the port any more
            httpx.get(url + "/health", timeout=5)
    finally:
        server.stop()


def test_a_stopped_front_does_not_keep_the_kv_memory():
    # The engine thread sends every step's events to the front; a front that stops reading
    # (here SIGSTOP) must not stop the steps, or the requests never end and their KV memory is
    # never given back. Resumed, the front streams every token, as a running front would.
    # no prefix cache: the second request's hit would make its pages worth keeping when idle
    args = ["--max-kv-bytes", "32M", "--min-kv-bytes", "0", "--idle-seconds", "1", "--no-enable-prefix-caching"]
    server = ServerProcess(args)
    try:
        (front,) = _front_pids(server)
        body = {"prompt": "stop the front", "max_tokens": 400, "n": 4, "logprobs": 5, "ignore_eos": True}
        body["temperature"] = 0
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200
        want = sorted((c["index"], c["text"], c["finish_reason"]) for c in r.json()["choices"])
        wait_until(lambda: rss_shmem(server.pid) == 0, 30, what="the KV memory given back after the first request")
        out: dict = {}
        started = threading.Event()

        def client() -> None:
            texts: dict[int, list[str]] = {}
            finish: dict[int, str] = {}
            with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        for c in json.loads(line[6:])["choices"]:
                            texts.setdefault(c["index"], []).append(c["text"])
                            if c["finish_reason"]:
                                finish[c["index"]] = c["finish_reason"]
            out["got"] = sorted((i, "".join(t), finish.get(i)) for i, t in texts.items())

        reader = threading.Thread(target=client, daemon=True)
        reader.start()
        assert started.wait(TIMEOUT)
        os.kill(front, signal.SIGSTOP)
        try:
            assert rss_shmem(server.pid) > 0  # the request's pages, mapped
            wait_until(lambda: rss_shmem(server.pid) == 0, 30, what="the KV memory given back with the front stopped")
        finally:
            os.kill(front, signal.SIGCONT)
        reader.join(TIMEOUT)
        assert out.get("got") == want
    finally:
        server.stop()


# ------------------------------------------------------------------------- the link alone ---
def test_a_torn_frame_shuts_the_link_so_the_front_stops_waiting():
    ours, theirs = socket.socketpair()
    host = EngineHost(None, ours)  # type: ignore[arg-type]  # no frame reaches the service
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    theirs.sendall((3).to_bytes(4, "big") + b"abc")  # a length, then no pickle
    thread.join(10)
    assert not thread.is_alive() and not host.said_bye
    theirs.settimeout(10)
    assert theirs.recv(1) == b""  # the front reads the end of the stream: its calls end with 503
    ours.close()
    theirs.close()


def test_a_front_that_stops_reading_never_blocks_the_engine_thread():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # so the queue is used, whatever the host's default
    host = EngineHost(None, ours)  # type: ignore[arg-type]
    text = "x" * 4096
    rounds = 512  # about 2 MiB of events
    subs = [Submission(host, 1, tag=i) for i in range(rounds)]
    done = threading.Event()

    def engine_thread() -> None:
        for i, sub in enumerate(subs):
            host.deliver([(sub, [ChoiceEvent(0, text, (i,), finish_reason="length")])])
        done.set()

    threading.Thread(target=engine_thread, daemon=True).start()
    assert done.wait(30), "deliver blocked on a front that does not read"
    theirs.settimeout(30)
    got = [read_frame(theirs) for _ in range(rounds)]  # then every frame arrives, in order
    assert [frame[1][0][0] for frame in got] == list(range(rounds))
    assert all(frame[1][0][1][0].token_ids == (i,) and frame[1][0][1][0].text == text for i, frame in enumerate(got))
    host.close(5)
    ours.close()
    theirs.close()


def test_closing_the_host_drops_what_a_stopped_front_never_read():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    host = EngineHost(None, ours)  # type: ignore[arg-type]
    sender = threading.Thread(target=lambda: [host.send(("events", ["y" * 4096])) for _ in range(256)], daemon=True)
    sender.start()
    sender.join(30)
    assert not sender.is_alive(), "send blocked on a front that does not read"
    t0 = time.monotonic()
    host.close(0.5)  # nobody reads: it waits its timeout, then ends the sender
    assert time.monotonic() - t0 < 5
    host._sender.join(5)
    assert not host._sender.is_alive()
    host.send(("events", []))  # after close: dropped, no error
    theirs.settimeout(30)
    frames = 0
    while (frame := read_frame(theirs)) is not None:  # what the socket held, then the end
        assert frame == ("events", ["y" * 4096])
        frames += 1
    assert 0 < frames < 256
    ours.close()
    theirs.close()


def test_a_front_that_leaves_too_much_unread_is_cut_off(caplog):
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    host = EngineHost(None, ours, max_queued_bytes=1 << 20)  # type: ignore[arg-type]
    sender = threading.Thread(target=lambda: [host.send(("events", ["z" * 4096])) for _ in range(1024)], daemon=True)
    with caplog.at_level(logging.ERROR, logger="torch_elastic_kv.serve.engine_host"):
        sender.start()
        sender.join(30)
    assert not sender.is_alive(), "send blocked on a front that does not read"
    assert "the HTTP front has left" in caplog.text and "taking it for hung" in caplog.text
    theirs.settimeout(30)
    frames = 0
    while (frame := read_frame(theirs)) is not None:  # what was in the socket, then the end
        assert frame == ("events", ["z" * 4096])
        frames += 1
    assert 0 < frames < 1024
    host._sender.join(5)
    assert not host._sender.is_alive()
    ours.close()
    theirs.close()


def test_a_submit_cancelled_in_flight_is_cancelled_in_the_engine():
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)  # a frame that never comes fails the test, not hangs it

    async def main() -> tuple:
        link = EngineLink(ours, 264)
        await link.open()
        task = asyncio.create_task(link.submit_request([ChoiceSpec([10, 11], 4, {})], 2))
        loop = asyncio.get_running_loop()
        submit = await loop.run_in_executor(None, read_frame, theirs)
        task.cancel()  # the handler went away before the engine's reply
        with pytest.raises(asyncio.CancelledError):
            await task
        return submit, await loop.run_in_executor(None, read_frame, theirs)

    submit, after = asyncio.run(main())
    assert submit[0] == "submit" and after == ("cancel", submit[1])
    ours.close()
    theirs.close()


# ------------------------------------------------------------------------- signals ----------
def _stream(url: str, max_tokens: int, out: dict) -> None:
    body = {"prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    out["finish"], out["done"], out["chunks"] = None, False, 0
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: {"):
                    out["chunks"] += 1
                    out["finish"] = json.loads(line[6:])["choices"][0]["finish_reason"] or out["finish"]
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)


def test_one_stop_reaching_both_processes_still_drains():
    """A terminal's Ctrl-C (or a service manager's SIGTERM) reaches every process, and the
    engine process passes it on too: the front must count that as one signal, not two."""
    server = ServerProcess(["--max-kv-bytes", "8M", "--drain-seconds", "30"])
    try:
        (front,) = _front_pids(server)
        out: dict = {}
        client = threading.Thread(target=_stream, args=(server.url, 400, out), daemon=True)
        client.start()
        wait_until(lambda: out.get("chunks", 0) >= 3, 60, 0.01, "tokens streaming")
        os.kill(front, signal.SIGINT)  # the group's signal, seen by the front first ...
        time.sleep(0.2)
        os.kill(server.pid, signal.SIGINT)  # ... then the engine process's copy of it
        assert server.wait(60) == 0, server.log()[-2000:]
        client.join(30)
        assert out["finish"] == "length" and out["done"], out  # drained, not cut
        assert "exited with status" not in server.log()
    finally:
        server.stop()


def test_a_second_signal_stops_at_once_and_exits_0():
    server = ServerProcess(["--max-kv-bytes", "64M", "--drain-seconds", "60"])
    try:
        out: dict = {}
        client = threading.Thread(target=_stream, args=(server.url, 1900, out), daemon=True)
        client.start()
        wait_until(lambda: out.get("chunks", 0) >= 3, 60, 0.01, "tokens streaming")
        os.kill(server.pid, signal.SIGINT)
        time.sleep(1.5)  # past the window in which a repeat counts as the same signal
        os.kill(server.pid, signal.SIGINT)
        t0 = time.monotonic()
        assert server.wait(30) == 0, server.log()[-2000:]
        assert time.monotonic() - t0 < 4.0  # no drain: the stream still had seconds to go
        assert out.get("finish") != "length", out
        assert "exited with status" not in server.log()
        client.join(30)
    finally:
        server.stop()
