"""The server end to end: a real ``python -m torch_elastic_kv serve`` in a subprocess, driven by
the official ``openai`` client and httpx, its outputs compared token for token with
``Engine.generate`` on the same default model in this process.

One server for the module (started once: loading torch and the model is most of the cost);
tests leave it idle, and the idle give-back test runs last.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from serve_helpers import ServerProcess, cpu_seconds, metrics, rss_shmem, wait_until
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve.default_model import (
    DEFAULT_MODEL_NAME,
    EOS_ID,
    build_default_model,
    build_default_tokenizer,
)

API_KEY = "sk-ekv-test-key"
ADMIN_KEY = "admin-ekv-test-key"
MODEL = DEFAULT_MODEL_NAME
CHUNK = 2 << 20  # one host granule: the pool's chunk for this model
MAX_KV = 32 << 20
SERVER_ARGS = [
    "--api-key",
    API_KEY,
    "--admin-key",
    ADMIN_KEY,
    "--idle-seconds",
    "1",
    "--max-kv-bytes",
    "32M",
    "--swap-bytes",
    "8M",
    "--max-waiting",
    "64",
    "--max-body-bytes",
    "64K",
    "--drain-seconds",
    "2",
]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(SERVER_ARGS)
    s.shmem_before = rss_shmem(s.pid)  # before the first request
    try:
        yield s
    finally:
        status = s.stop()
        assert status == 0, s.log()[-3000:]


class Reference:
    """The server's model and tokenizer, rebuilt here, with an Engine to generate the expected
    tokens (the server's Engine runs the same code on the same weights)."""

    def __init__(self) -> None:
        self.tokenizer = build_default_tokenizer()
        self.engine = Engine(build_default_model(), policy=ElasticPolicy(max_bytes=64 << 20))

    def generate(self, prompts: list[list[int]], max_tokens: int, sampling=None) -> list[list[int]]:
        return self.engine.generate(prompts, max_tokens, eos_token_id=EOS_ID, sampling=sampling)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def finish(ids: list[int], max_tokens: int) -> str:
        return "stop" if ids and ids[-1] == EOS_ID else "length"


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)  # the server has the other core
    r = Reference()
    yield r
    r.engine.close()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def admin(server, path: str, body=None, key: str | None = ADMIN_KEY, method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)


def wait_idle(server) -> None:
    """Every request of earlier tests has finished inside the server."""
    wait_until(
        lambda: (m := metrics(server.url))["ekv_requests_running"] == 0 and m["ekv_requests_waiting"] == 0,
        60,
        what="no request running or waiting",
    )


def assert_error_shape(resp: httpx.Response, status: int, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error"), err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------------------- basics --------
def test_health_and_models(server):
    r = httpx.get(server.url + "/health", timeout=30)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0]
    assert card.model_extra["random_weights"] is True
    assert "random weights" in card.model_extra["description"]
    assert card.model_extra["max_model_len"] == 2048


def test_api_key_is_required_on_v1(server):
    for path, method, body in (
        ("/v1/models", "GET", None),
        ("/v1/completions", "POST", {"prompt": "x", "max_tokens": 1}),
        ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
            r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert_error_shape(r, 401, code="invalid_api_key")
        ok = httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    # /health and /metrics stay open, as in vLLM
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_admin_needs_its_own_key(server):
    for path, method in (("/admin/stats", "GET"), ("/admin/sleep", "POST"), ("/admin/wake", "POST")):
        for key in (None, "wrong", API_KEY):
            assert_error_shape(admin(server, path, key=key, method=method), 401, code="invalid_api_key")
    for key in (None, API_KEY):
        assert_error_shape(admin(server, "/admin/kv-budget", {"bytes": None}, key=key), 401)
    stats = admin(server, "/admin/stats", method="GET").json()
    assert stats["max_bytes"] == MAX_KV and stats["sleeping"] is False
    for body, param in (({"bytes": -1}, "bytes"), ({"bytes": "1M"}, "bytes"), ({"bytes": MAX_KV + 1}, "bytes")):
        assert_error_shape(admin(server, "/admin/kv-budget", body), 400, param=param)
    assert_error_shape(admin(server, "/admin/kv-budget", {"bytes": 1, "x": 2}), 400)
    assert_error_shape(admin(server, "/admin/kv-budget", {}), 400)
    assert admin(server, "/admin/stats", method="GET").json()["budget_bytes"] == MAX_KV  # unchanged


# ---------------------------------------------------------------------------- parity --------
PROMPTS = ["Hello", "The quick brown fox", "élan vital: 3 € 50", ""]


def test_completions_sync_match_engine_generate(server, ref):
    c = client(server)
    ids = [ref.encode(p) for p in PROMPTS]
    want = ref.generate(ids, 20)
    # one prompt per request, plain and streamed
    for p, pids, w in zip(PROMPTS, ids, want):
        r = c.completions.create(
            model=MODEL, prompt=p, max_tokens=20, temperature=0, extra_body={"return_token_ids": True}
        )
        ch = r.choices[0]
        assert ch.model_extra["token_ids"] == w
        assert ch.model_extra["prompt_token_ids"] == pids
        assert ch.text == ref.text(w)
        assert ch.finish_reason == ref.finish(w, 20)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(pids), len(w))
        assert r.usage.total_tokens == len(pids) + len(w)
        text, n_chunks, finish, usage = "", 0, None, None
        for chunk in c.completions.create(
            model=MODEL, prompt=p, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                n_chunks += 1
            else:
                usage = chunk.usage
        assert text == ref.text(w) and finish == ref.finish(w, 20) and n_chunks >= 2
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(pids), len(w))
    # the batch shapes: a list of strings, token ids, a list of token-id lists
    r = c.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=20, temperature=0)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [ref.text(w) for w in want]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == sum(map(len, want))
    r = c.completions.create(model=MODEL, prompt=ids[1], max_tokens=20, temperature=0)
    assert r.choices[0].text == ref.text(want[1])
    r = c.completions.create(model=MODEL, prompt=ids[:2], max_tokens=20, temperature=0)
    assert [ch.text for ch in r.choices] == [ref.text(w) for w in want[:2]]


def test_chat_async_matches_engine_generate(server, ref):
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}],
    ]
    want = ref.generate([ref.chat_ids(m) for m in conversations], 16)

    async def run():
        c = aclient(server)
        plain = await asyncio.gather(
            *(c.chat.completions.create(model=MODEL, messages=m, max_tokens=16, temperature=0) for m in conversations)
        )
        streamed = []
        for m in conversations:
            text, role, finish, usage = "", None, None, None
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=m,
                max_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if not chunk.choices:
                    usage = chunk.usage
                    continue
                d = chunk.choices[0].delta
                role = d.role or role
                text += d.content or ""
                finish = chunk.choices[0].finish_reason or finish
            streamed.append((text, role, finish, usage))
        await c.close()
        return plain, streamed

    plain, streamed = asyncio.run(run())
    for m, w, r, (text, role, finish, usage) in zip(conversations, want, plain, streamed):
        assert r.object == "chat.completion"
        msg = r.choices[0].message
        assert (msg.role, msg.content, r.choices[0].finish_reason) == ("assistant", ref.text(w), ref.finish(w, 16))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.chat_ids(m)), len(w))
        assert (text, role, finish) == (ref.text(w), "assistant", ref.finish(w, 16))
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.chat_ids(m)), len(w))


def test_stop_strings_cut_the_text(server, ref):
    c = client(server)
    pids = ref.encode("The quick brown fox")
    full = ref.generate([pids], 40)[0]
    text = ref.text(full)
    # a stop string of two ASCII characters from the middle of the greedy text
    k = next(
        i for i in range(len(text) // 3, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
    )
    stop = text[k : k + 2]
    cut = text.index(stop)
    # the tokens the Engine had produced when the stop string was complete
    n_tokens = next(m for m in range(1, len(full) + 1) if stop in ref.text(full[:m]))
    r = c.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=40, temperature=0, stop=[stop, "\x00never"]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:cut], "stop")
    assert r.usage.completion_tokens == n_tokens
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=40, temperature=0, stop=stop, stream=True
        )
        if ch.choices
    )
    assert streamed == text[:cut]


def test_seeded_sampling_is_reproducible(server, ref):
    c = client(server)
    pids = ref.encode("Hello")
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    kw = dict(model=MODEL, prompt="Hello", max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    first = c.completions.create(**kw, extra_body={"top_k": 50, "return_token_ids": True})
    again = c.completions.create(**kw, n=2, extra_body={"top_k": 50, "return_token_ids": True})
    want = ref.generate([pids], 16, sampling={**sampling, "seed": 1234})[0]
    want1 = ref.generate([pids], 16, sampling={**sampling, "seed": 1235})[0]
    assert first.choices[0].model_extra["token_ids"] == want
    assert [ch.model_extra["token_ids"] for ch in again.choices] == [want, want1]
    assert want != want1


def test_32_concurrent_streams(server, ref):
    prompts = [f"request {i}: " + "ab" * i for i in range(32)]
    want = ref.generate([ref.encode(p) for p in prompts], 24)

    async def one(c, p):
        text, finish, usage = "", None, None
        stream = await c.completions.create(
            model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        return text, finish, usage

    async def run():
        c = aclient(server)
        out = await asyncio.gather(*(one(c, p) for p in prompts))
        await c.close()
        return out

    results = asyncio.run(run())
    for p, w, (text, finish, usage) in zip(prompts, want, results):
        assert (text, finish) == (ref.text(w), ref.finish(w, 24))
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            len(ref.encode(p)),
            len(w),
            len(ref.encode(p)) + len(w),
        )


# ---------------------------------------------------------------------------- memory --------
def _stream_in_thread(server, prompt: str, max_tokens: int, out: dict, key) -> threading.Thread:
    def run():
        r = client(server).completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        ids, finish = [], None
        for chunk in r:
            if chunk.choices:
                ids += chunk.choices[0].model_extra["token_ids"]
                finish = chunk.choices[0].finish_reason or finish
        out[key] = (ids, finish)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_disconnect_mid_stream_frees_pages(server):
    wait_idle(server)
    body = {"model": MODEL, "prompt": "disconnect me", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    assert metrics(server.url)["ekv_kv_live_bytes"] > 0
                    break  # leaving the iteration closes the connection
    # the connection is closed: the request is cancelled and its pages freed within a second
    wait_until(lambda: metrics(server.url)["ekv_kv_live_bytes"] == 0, 1.0, what="live KV bytes back to 0")
    m = metrics(server.url)
    assert m["ekv_requests_running"] == 0
    assert m["ekv_requests_total{finish_reason=cancelled}"] >= 1


def test_disconnect_while_waiting_for_a_plain_response_cancels(server):
    wait_idle(server)
    body = {"model": MODEL, "prompt": "nobody waits", "max_tokens": 1500, "ignore_eos": True}
    cancelled = metrics(server.url).get("ekv_requests_total{finish_reason=cancelled}", 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1)
    wait_until(
        lambda: (
            (m := metrics(server.url))["ekv_kv_live_bytes"] == 0
            and m["ekv_requests_total{finish_reason=cancelled}"] == cancelled + 1
        ),
        1.0,
        what="the plain request cancelled and its pages freed",
    )


def test_kv_budget_cut_preempts_and_loses_nothing(server, ref):
    wait_idle(server)
    prompts = [f"budget {i} " + "xy" * i for i in range(12)]
    want = ref.generate([ref.encode(p) for p in prompts], 160)
    out: dict = {}
    threads = [_stream_in_thread(server, p, 160, out, i) for i, p in enumerate(prompts)]
    live = wait_until(lambda: (v := metrics(server.url)["ekv_kv_live_bytes"]) >= 8 << 20 and v, 120, 0.01, "8 MiB live")
    before = metrics(server.url)["ekv_preemptions_total"]
    cut = int(live * 0.3)
    r = admin(server, "/admin/kv-budget", {"bytes": cut})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["budget_bytes"] == cut
    assert stats["preemptions"] > before
    assert stats["live_bytes"] <= cut
    # run under the cut for a while: live stays under it
    tokens0 = metrics(server.url)["ekv_generation_tokens_total"]
    for _ in range(20):
        m = metrics(server.url)
        assert m["ekv_kv_live_bytes"] <= cut and m["ekv_kv_budget_bytes"] == cut
        if m["ekv_generation_tokens_total"] >= tokens0 + 30 or not any(t.is_alive() for t in threads):
            break
        time.sleep(0.05)
    assert metrics(server.url)["ekv_preemptions_total"] > before
    r = admin(server, "/admin/kv-budget", {"bytes": None})
    assert r.status_code == 200 and r.json()["budget_bytes"] == MAX_KV
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(len(prompts))] == [(w, ref.finish(w, 160)) for w in want]


def test_sleep_gives_memory_back_and_wake_resumes(server, ref):
    wait_idle(server)
    prompts = [f"sleeper {i}" for i in range(6)]
    want = ref.generate([ref.encode(p) for p in prompts], 120)
    out: dict = {}
    threads = [_stream_in_thread(server, p, 120, out, i) for i, p in enumerate(prompts)]
    wait_until(lambda: metrics(server.url)["ekv_requests_running"] >= 1, 60, what="requests running")
    r = admin(server, "/admin/sleep")
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["sleeping"] is True and stats["running"] == 0 and stats["live_bytes"] == 0
    assert stats["resident_bytes"] == 0  # the floor (--min-kv-bytes 0)
    m = metrics(server.url)
    assert (m["ekv_kv_resident_bytes"], m["ekv_server_sleeping"], m["ekv_requests_running"]) == (0, 1, 0)
    # asleep, nothing runs: a new request queues and no token comes
    late: dict = {}
    queued = m["ekv_requests_queued"]
    threads.append(_stream_in_thread(server, "late sleeper", 8, late, 0))
    wait_until(lambda: metrics(server.url)["ekv_requests_queued"] == queued + 1, 30, what="late request queued")
    tokens = metrics(server.url)["ekv_generation_tokens_total"]
    time.sleep(0.3)
    assert metrics(server.url)["ekv_generation_tokens_total"] == tokens
    assert admin(server, "/admin/sleep").json()["sleeping"] is True  # twice is fine
    r = admin(server, "/admin/wake")
    assert r.status_code == 200 and r.json()["sleeping"] is False and r.json()["budget_bytes"] == MAX_KV
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(len(prompts))] == [(w, ref.finish(w, 120)) for w in want]
    late_want = ref.generate([ref.encode("late sleeper")], 8)[0]
    assert late[0] == (late_want, ref.finish(late_want, 8))


def test_too_many_waiting_is_503_with_retry_after(server, ref):
    wait_idle(server)
    assert admin(server, "/admin/sleep").status_code == 200
    prompts = [f"queue {i}" for i in range(8)]
    result: dict = {}

    def fill():  # 8 prompts x n=8: exactly --max-waiting 64 choices
        result["r"] = client(server).completions.create(model=MODEL, prompt=prompts, n=8, max_tokens=4, temperature=0)

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    try:
        wait_until(lambda: metrics(server.url)["ekv_requests_queued"] == 64, 30, what="64 queued")
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": MODEL, "prompt": "one too many", "max_tokens": 1},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert_error_shape(r, 503, code="overloaded")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        assert admin(server, "/admin/wake").status_code == 200
    t.join(60)
    want = ref.generate([ref.encode(p) for p in prompts], 4)
    got = sorted(result["r"].choices, key=lambda ch: ch.index)
    assert [ch.text for ch in got] == [ref.text(w) for w in want for _ in range(8)]


# ---------------------------------------------------------------------------- bad input -----
def _post(server, path, body=None, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (path, body or raw bytes, status, param)
    (C, b'{"prompt": "x",', 400, None),
    (C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, {"prompt": "x", "foo": 1}, 400, "foo"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    (C, {"prompt": list(range(2100))}, 400, "prompt"),
    (C, {"prompt": [1, 264]}, 400, None),
    (C, {"prompt": [1, -1]}, 400, None),
    (C, {"prompt": [[1, 2], [3, 99999]]}, 400, None),
    (C, {}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": [1.5, 2]}, 400, "prompt"),
    (C, {"prompt": [True]}, 400, "prompt"),
    (C, {"prompt": "x", "temperature": 3}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "n": 1000}, 400, "n"),
    (C, {"prompt": ["x"] * 40, "n": 8}, 400, "n"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, None),
    (C, {"prompt": "x" * (70 << 10)}, 413, None),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "max_tokens": 10, "max_completion_tokens": 20}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_4xx_in_openai_shape(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    resp = _post(server, path, None if raw is not None else body, raw)
    err = assert_error_shape(resp, status, param=param)
    if status == 400 and isinstance(body, dict) and body.get("prompt") in ([1, 264], [1, -1]):
        assert "outside the vocabulary [0, 264)" in err["message"]
    if status == 400 and isinstance(body, dict) and body.get("max_tokens") == 5000:
        assert "2048" in err["message"] and err["code"] == "context_length_exceeded"


def test_routes_and_methods_answer_in_openai_shape(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert_error_shape(httpx.get(server.url + "/v1/completions", headers=headers), 405)
    assert_error_shape(httpx.get(server.url + "/v1/nothing-here", headers=headers), 404)
    # the server still serves after all of that
    r = client(server).completions.create(model=MODEL, prompt="still here", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 or r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- metrics -------
REQUIRED = {
    "ekv_kv_resident_bytes": "gauge",
    "ekv_kv_live_bytes": "gauge",
    "ekv_kv_reserved_bytes": "gauge",
    "ekv_kv_budget_bytes": "gauge",
    "ekv_requests_running": "gauge",
    "ekv_requests_waiting": "gauge",
    "ekv_preemptions": "counter",
    "ekv_kv_grows": "counter",
    "ekv_kv_shrinks": "counter",
    "ekv_prompt_tokens": "counter",
    "ekv_generation_tokens": "counter",
    "ekv_time_to_first_token_seconds": "histogram",
    "ekv_time_per_output_token_seconds": "histogram",
}


def test_metrics_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(server.url + "/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert {n: families[n].type for n in REQUIRED if n in families} == REQUIRED
    m = metrics(server.url)
    assert m["ekv_kv_reserved_bytes"] >= MAX_KV and m["ekv_kv_budget_bytes"] == MAX_KV
    assert m["ekv_generation_tokens_total"] > 0 and m["ekv_prompt_tokens_total"] > 0
    assert m["ekv_kv_grows_total"] >= 1 and m["ekv_kv_shrinks_total"] >= 1
    assert m["ekv_time_to_first_token_seconds_count"] >= 1


# ---------------------------------------------------------------------------- idle (last) ---
def test_idle_gives_memory_back_and_sleeps(server):
    wait_idle(server)
    # after the last request plus --idle-seconds (1 s): resident at the floor (0)
    wait_until(lambda: metrics(server.url)["ekv_kv_resident_bytes"] == 0, 1 + 10, 0.1, "resident at the floor")
    shmem = rss_shmem(server.pid)
    assert abs(shmem - server.shmem_before) <= CHUNK, (shmem, server.shmem_before)
    # an idle server does not spin: under 0.2 s of CPU over 5 s
    c0 = cpu_seconds(server.pid)
    time.sleep(5)
    used = cpu_seconds(server.pid) - c0
    assert used < 0.2, f"idle server used {used:.3f}s of CPU in 5s"
