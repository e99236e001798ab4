"""The server against hostile and careless clients (issue 21): a real server subprocess on a
free loopback port, driven by httpx and the official ``openai`` client.

Bodies a tokenizer or the JSON parser cannot take are 400s in OpenAI's shape, never 500s; a
request without ``max_tokens`` is served under a small KV ceiling; the admin routes do not
reveal themselves when admin is off; a token-id prompt that ends inside a character does not
take a byte from the output's text; a flood of connections trickling a header byte a second
does not lock other clients out of a server whose open-file limit is lower than the flood.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from serve_helpers import ServerProcess, server_pids
from torch_elastic_kv.serve.default_model import DEFAULT_MODEL_NAME, build_default_tokenizer

MODEL = DEFAULT_MODEL_NAME
KV_TOKENS = (12 << 20) // (8 << 10)  # --max-kv-bytes 12M at the default model's 8 KiB per token
TIMEOUT = 120


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(["--max-kv-bytes", "12M", "--max-waiting", "64", "--drain-seconds", "2", "--body-timeout", "2"])
    try:
        yield s
    finally:
        status = s.stop()
        assert status == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def _post(server, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        kw["content"] = body
        kw.setdefault("headers", {"content-type": "application/json"})
    else:
        kw["json"] = body
    return httpx.post(server.url + path, timeout=TIMEOUT, **kw)


def _assert_openai_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------- item 10 -------
def test_chat_without_max_tokens_is_served_under_a_small_kv_ceiling(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0, stop=["\n"]
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= KV_TOKENS + 1


def test_a_default_max_tokens_is_cut_to_the_kv_ceiling_and_errors_name_sent_fields(server):
    # a completion without max_tokens after a prompt that leaves 7 tokens of the ceiling: served
    prompt = [8 + ord("a")] * (KV_TOKENS - 6)
    r = _post(server, "/v1/completions", {"prompt": prompt, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 7 and r.json()["choices"][0]["finish_reason"] == "length"
    # a prompt with no room at all: the prompt is named, not a max_tokens nobody sent
    err = _assert_openai_error(_post(server, "/v1/completions", {"prompt": [8] * (KV_TOKENS + 1)}), 400, "prompt")
    assert "max_tokens" not in err["message"], err
    # a sent max_completion_tokens past the ceiling is named as sent (the chat prompt is 6 tokens:
    # ceil((6 + n - 1) / 16) pages of the ceiling's 96 hold n <= KV_TOKENS - 5)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2000}
    err = _assert_openai_error(_post(server, "/v1/chat/completions", body), 400, "max_completion_tokens")
    assert err["message"].startswith("prompt (") and "max_completion_tokens (2000) needs" in err["message"], err
    assert "max_tokens" not in err["message"] and err["message"].endswith(f"at most {KV_TOKENS - 5} tokens fit"), err


# ---------------------------------------------------------------------------- item 11 -------
def _nested(depth: int) -> str:
    return '{"prompt": "x", "user": ' + "[" * depth + "]" * depth + "}"


HOSTILE_400 = [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt.1"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}', None),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}], "max_tokens": 1}',
        None,
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}], "max_tokens": 1}',
        None,
    ),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 1}', "stop.0"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "model"),
    ("/v1/completions", '{"\\ud800": 1}', "\\ud800"),
    ("/v1/completions", _nested(3000), None),
    ("/v1/chat/completions", _nested(100_000), None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', None),
    ("/v1/completions", '{"prompt": [[1, 2], []]}', "prompt"),
    ("/v1/completions", '{"prompt": [-1, 5]}', None),
    ("/v1/completions", '{"prompt": [100000000000000000000]}', None),
    ("/v1/completions", '{"prompt": "x", "n": 100000000000000000000}', "n"),
    ("/v1/completions", '{"prompt": "x", "seed": 1e30}', "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "root", "content": "x"}]}', None),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages"),
    ("/v1/completions", '"just a string"', None),
    ("/v1/completions", b"\xff\xfe{}", None),
    ("/v1/completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', None),  # a surrogate encoded in UTF-8
]


@pytest.mark.parametrize("path,body,param", HOSTILE_400, ids=range(len(HOSTILE_400)))
def test_hostile_bodies_are_400_in_openai_shape(server, path, body, param):
    err = _assert_openai_error(_post(server, path, body), 400, param)
    assert err["type"] == "invalid_request_error", err


def test_hostile_values_never_5xx(server, tokenizer):
    big = 10**30
    bodies = [
        {"prompt": "x", "max_tokens": 1, "top_k": big},
        {"prompt": "x", "max_tokens": 1, "top_p": 1e-300},
        {"prompt": "x", "max_tokens": 1, "temperature": 1e-300},
        {"prompt": "x", "max_tokens": 1, "seed": -(2**63)},
        {"prompt": "x", "max_tokens": 1, "stop": "x" * 256},
        {"prompt": "\U0001f600" * 3, "max_tokens": 1},  # a valid surrogate pair on the wire is fine
        {"prompt": "\x00\x01\u2028", "max_tokens": 1},
    ]
    for body in bodies:
        r = _post(server, "/v1/completions", body)
        assert r.status_code < 500, (body, r.status_code, r.text)
    r = _post(server, "/v1/completions", '{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert r.status_code == 200, r.text


def test_a_client_that_leaves_mid_body_logs_no_traceback(server):
    parts = urlsplit(server.url)
    log_before = len(server.log())
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    for _ in range(20):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(head + b'{"prompt": "')
            time.sleep(0.05)  # the handler is reading the body when the client goes
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    time.sleep(0.5)
    log = server.log()[log_before:]
    assert "Traceback" not in log and len(log) < 2000, log[-3000:]


def test_a_trickled_body_is_408_after_the_body_timeout(server):
    parts = urlsplit(server.url)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    answer = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=0.25) as sock:
        t0 = time.monotonic()
        sock.sendall(head + b'{"prompt": "')
        while time.monotonic() - t0 < 20:  # a byte every quarter second: never the whole body
            try:
                sock.send(b"a")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break  # closed by the server after its answer
            answer += chunk
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "timeout" and "--body-timeout" in body["error"]["message"], body
    assert 2.0 <= elapsed < 10.0, elapsed


# ---------------------------------------------------------------------------- item 12 -------
@pytest.mark.parametrize("path", ["/admin/kv-budget", "/admin/sleep", "/admin/wake", "/admin/stats"])
def test_admin_routes_are_404_for_every_method_when_admin_is_off(server, path):
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        r = httpx.request(method, server.url + path, timeout=TIMEOUT, json=None)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "allow" not in r.headers, (method, r.headers)
        if method != "HEAD":
            _assert_openai_error(r, 404)


# ---------------------------------------------------------------------------- item 13 -------
def test_a_token_prompt_ending_inside_a_character_keeps_every_output_byte(server, tokenizer):
    # prompts ending with the lead byte of a 3-byte character; pick one whose first greedy
    # output token is a continuation byte (it would join the prompt's lead byte in the window)
    prompts = [tokenizer.encode(f"price {k}: ") + [8 + 0xE2] for k in range(48)]
    body = {"prompt": prompts, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    continuation = range(8 + 0x80, 8 + 0xC0)
    picks = [c["prompt_token_ids"] for c in r.json()["choices"] if c["token_ids"][0] in continuation]
    assert picks, "no prompt starts its output with a continuation byte"
    body = {"prompt": picks[0], "max_tokens": 6, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    plain = _post(server, "/v1/completions", body).json()["choices"][0]
    assert plain["token_ids"][0] in continuation
    assert plain["text"] == tokenizer.decode(plain["token_ids"], skip_special_tokens=True), plain
    assert plain["text"].startswith("\ufffd"), plain
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[len("data: ") :])["choices"][0]["text"]
    assert text == plain["text"]


# ---------------------------------------------------------------------------- item 7 --------
FD_LIMIT = 256
HEADER_TIMEOUT = 10.0  # the default of --header-timeout


def _lower_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _open_fds(pid: int) -> int:
    """Open descriptors of a server's processes (the front process holds the connections)."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in server_pids(pid))


class _Trickler:
    """``count`` connections that each send one byte of a request head a second and never end
    it; while ``reconnect`` is set, a connection the server closed is opened again."""

    HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "

    def __init__(self, url: str, count: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.socks: list = [None] * count
        self.sent = [0] * count
        self.connects = 0
        self.closed_by_server = 0
        self.reconnect = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _byte(self, i: int) -> bytes:
        k = self.sent[i]
        return self.HEAD[k : k + 1] if k < len(self.HEAD) else b"a"

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            for i, sock in enumerate(self.socks):
                if self._stop.is_set():
                    return
                if sock is None:
                    if not self.reconnect:
                        continue
                    try:
                        sock = socket.create_connection(self.address, timeout=2)
                    except OSError:
                        continue
                    self.socks[i], self.sent[i] = sock, 0
                    self.connects += 1
                try:
                    sock.send(self._byte(i))
                    self.sent[i] += 1
                except OSError:  # closed by the server
                    sock.close()
                    self.socks[i] = None
                    self.closed_by_server += 1
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self.socks:
            if sock is not None:
                sock.close()


@pytest.mark.parametrize("stack", [("httptools", "uvloop"), ("h11", "asyncio")])
def test_the_header_deadline_holds_on_both_http_stacks(stack):
    """A silent connection, one whose head trickles, and a kept-alive one after its response are
    closed after --header-timeout; a request sent at once is served, on each parser and loop."""
    http, loop = stack
    if any(importlib.util.find_spec(name) is None for name in stack):
        pytest.skip(f"{http} / {loop} not installed")
    server = ServerProcess(["--header-timeout", "1", "--http", http, "--loop", loop, "--drain-seconds", "1"])
    address = urlsplit(server.url)
    try:
        kept = socket.create_connection((address.hostname, address.port), timeout=10)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while not response.endswith(b"}"):  # the head and the JSON body may come in separate writes
            data = kept.recv(65536)
            assert data, response
            response += data
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
        t0 = time.monotonic()
        silent = socket.create_connection((address.hostname, address.port), timeout=10)
        trickle = socket.create_connection((address.hostname, address.port), timeout=10)
        for byte in _Trickler.HEAD[:3]:  # bytes trickling in do not extend the deadline
            trickle.sendall(bytes([byte]))
            time.sleep(0.2)
        for sock in (silent, trickle, kept):
            assert sock.recv(65536) == b""  # closed by the server
            sock.close()
        # by our deadline: uvicorn's own keep-alive timeout (5 s) would close the kept one later
        assert 0.9 < time.monotonic() - t0 < 4
        r = httpx.get(server.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        log = server.log()
        assert f"HTTP: {http} on {loop}" in log, log[-2000:]
    finally:
        status = server.stop()
    assert status == 0, server.log()[-3000:]


def test_a_trickling_connection_flood_does_not_lock_clients_out():
    server = ServerProcess(["--drain-seconds", "1"], preexec_fn=_lower_fd_limit)
    flood = None
    try:
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
        baseline = _open_fds(server.pid)
        log_before = len(server.log())
        flood = _Trickler(server.url, FD_LIMIT + 64)
        latencies = []
        t_end = time.monotonic() + 12
        while time.monotonic() < t_end:  # /health every half second while the flood lasts
            t0 = time.monotonic()
            r = httpx.get(server.url + "/health", timeout=30)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.5)
        assert max(latencies) < 5.0, latencies
        assert flood.connects > FD_LIMIT and flood.closed_by_server > 0, (flood.connects, flood.closed_by_server)
        # the flood stops reconnecting but its open connections keep trickling: the header
        # timeout closes them all, and the server's descriptors return to where they were
        flood.reconnect = False
        deadline = time.monotonic() + HEADER_TIMEOUT + 20
        while _open_fds(server.pid) > baseline + 8 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _open_fds(server.pid) <= baseline + 8, (_open_fds(server.pid), baseline)
        # one summary line per 5 s says what was closed, and the log stays small
        timed_out = "closed without a complete request head within --header-timeout 10s"
        deadline = time.monotonic() + 15
        while timed_out not in server.log()[log_before:] and time.monotonic() < deadline:
            time.sleep(0.5)
        log = server.log()[log_before:]
        assert timed_out in log and len(log) < 20_000, log[-3000:]
        # served as before, no restart
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        if flood is not None:
            flood.stop()
        status = server.stop()
    assert status == 0, server.log()[-3000:]
