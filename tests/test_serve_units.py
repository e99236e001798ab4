"""The server's parts in this process: options, text, request checks, the engine thread.

The engine-thread tests run the real Engine on the default model with a real asyncio loop,
and break one request on purpose to show that only that request fails.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys

import pytest
import torch

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve import cli
from torch_elastic_kv.serve.default_model import EOS_ID, build_default_model, build_default_tokenizer
from torch_elastic_kv.serve.detokenize import IncrementalDetokenizer, StopStrings
from torch_elastic_kv.serve.engine_thread import ChoiceSpec, EngineService
from torch_elastic_kv.serve.errors import APIError
from torch_elastic_kv.serve.metrics import ServerMetrics
from torch_elastic_kv.serve.protocol import ChatRequest, CompletionRequest, parse_request, to_sampling


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_default_model()


# ---------------------------------------------------------------------------- options -------
def test_parse_size_is_written_once_and_every_cli_uses_it():
    from torch_elastic_kv import _units
    from torch_elastic_kv.bench import cli as bench_cli
    from torch_elastic_kv.broker import cli as broker_cli
    from torch_elastic_kv.serve import cli as serve_cli

    assert bench_cli.parse_size is _units.parse_size
    assert serve_cli.parse_size is _units.parse_size
    assert broker_cli.parse_size is _units.parse_size
    assert [_units.parse_size(t) for t in ("4096", "64M", "1G", "1.5GiB", "2kb")] == [
        4096,
        64 << 20,
        1 << 30,
        3 << 29,
        2000,
    ]
    with pytest.raises(ValueError, match="byte count"):
        _units.parse_size("-3M")


def _bad_args(tmp_path):
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    sock = tmp_path / "broker.sock"  # a socket file, nobody listening: the options are checked first
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()
    cases = [
        (["--port", "70000"], "--port"),
        (["--port", "eighty"], "--port"),
        (["--max-kv-bytes", "1M"], "--max-kv-bytes"),
        (["--max-kv-bytes", "12Q"], "--max-kv-bytes"),
        (["--max-kv-bytes", "32M", "--min-kv-bytes", "64M"], "--min-kv-bytes"),
        (["--max-kv-bytes", "1000000G"], "--max-kv-bytes"),
        (["--swap-bytes", "lots"], "--swap-bytes"),
        (["--idle-seconds", "-1"], "--idle-seconds"),
        (["--drain-seconds", "nan"], "--drain-seconds"),
        (["--max-waiting", "0"], "--max-waiting"),
        (["--max-batch-tokens", "1.5"], "--max-batch-tokens"),
        (["--expedite-prefill-tokens", "-1"], "--expedite-prefill-tokens must be between 0 and"),
        (["--expedite-prefill-tokens", "none"], "--expedite-prefill-tokens must be an integer"),
        (["--max-body-bytes", "10"], "--max-body-bytes"),
        (["--model", str(tmp_path / "missing")], "not a directory"),
        (["--model", str(no_config)], "no config.json"),
        (["--model", str(no_tokenizer)], "no tokenizer"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "float8"], "--dtype"),
        (["--api-key", ""], "--api-key"),
        (["--admin-key", "has space"], "--admin-key"),
        (["--host", "no such host.invalid"], "--host"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--header-timeout", "0"], "--header-timeout must be between 0.1 and 3600"),
        (["--body-timeout", "never"], "--body-timeout must be a number"),
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", str(10**9)], "above the open-file limit"),
        (["--tenant", "a"], "--tenant needs --broker"),
        (["--priority", "01"], "--priority needs --broker"),
        (["--guarantee", "4M"], "--guarantee needs --broker"),
        (["--broker", str(tmp_path / "nobody.sock"), "--tenant", "a"], "no broker socket there"),
        (["--broker", str(no_config), "--tenant", "a"], "not a socket"),
        (["--broker", str(sock), "--priority", "1"], "--broker needs --tenant NAME"),
        (["--broker", str(sock), "--tenant", ""], "--tenant must be 1-64 printable"),
        (["--broker", str(sock), "--tenant", "a", "--priority", "high"], "--priority must be an integer"),
        (["--broker", str(sock), "--tenant", "a", "--min-kv-bytes", "8M", "--guarantee", "4M"], "below --min-kv-bytes"),
        (
            ["--broker", str(sock), "--tenant", "a", "--max-kv-bytes", "8M", "--guarantee", "16M"],
            "above --max-kv-bytes",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    return cases


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    for argv, needle in _bad_args(tmp_path):
        assert cli.serve_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ekv-serve: error: "), (argv, err)
        assert needle in err, (argv, err)


def test_a_port_in_use_is_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.serve_main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ekv-serve: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_entry_point_is_wired():
    listed = subprocess.run([sys.executable, "-m", "torch_elastic_kv", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and "\n  serve " in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "serve", "--port", "-5"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("ekv-serve: error: --port")


def test_resolve_reads_sizes_keys_and_static_pool(monkeypatch):
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    s = cli.resolve(["--max-kv-bytes", "64M", "--min-kv-bytes", "64M", "--port", "0", "--device", "cpu"])
    assert (s.max_kv_bytes, s.min_kv_bytes, s.port, s.api_key, s.admin_key) == (64 << 20, 64 << 20, 0, "from-env", None)
    assert (s.host, s.device, s.served_model_name, s.max_waiting) == ("127.0.0.1", "cpu", "ekv-default-llama", 1024)
    assert cli.resolve(["--api-key", "flag", "--device", "cpu"]).api_key == "flag"  # the flag wins


def test_max_connections_stays_below_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(cli.resource, "getrlimit", lambda what: (256, 4096))
    s = cli.resolve(["--device", "cpu"])
    assert (s.max_connections, s.header_timeout) == (256 - cli.FD_RESERVE, 10.0)
    assert cli.resolve(["--device", "cpu", "--max-connections", "100"]).max_connections == 100
    with pytest.raises(cli.UsageError, match=r"--max-connections 193 is above the open-file limit \(256"):
        cli.resolve(["--device", "cpu", "--max-connections", "193"])
    monkeypatch.setattr(cli.resource, "getrlimit", lambda what: (65536, 65536))
    assert cli.resolve(["--device", "cpu"]).max_connections == cli.MAX_CONNECTIONS_DEFAULT


def test_flood_log_lines_are_rate_limited():
    from torch_elastic_kv.serve.http_server import REPORT_SECONDS, _RateLimitFilter

    now = [100.0]
    flt = _RateLimitFilter("socket.accept() out of system resource", clock=lambda: now[0])
    error = OSError(24, "Too many open files")

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (OSError, error, None))

    first = record("socket.accept() out of system resource\nexception: ...")
    assert flt.filter(first) and first.exc_info is None
    assert first.getMessage() == (
        f"torch_elastic_kv serve: socket.accept() out of system resource: {error} (0 more in the last {REPORT_SECONDS:g}s)"
    )
    assert [flt.filter(record("socket.accept() out of system resource")) for _ in range(1000)] == [False] * 1000
    assert flt.filter(record("something else"))  # other lines pass untouched
    now[0] += REPORT_SECONDS
    again = record("socket.accept() out of system resource")
    assert flt.filter(again) and "(1000 more in the last" in again.getMessage()


class _FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _FakeConnection:
    """What the guard reads of uvicorn's protocol: the shared set, the transport, the loop."""

    def __init__(self, connections: set, loop: asyncio.AbstractEventLoop) -> None:
        self.connections, self.loop, self.transport = connections, loop, _FakeTransport()
        connections.add(self)


def test_connection_guard_evicts_the_oldest_waiting_then_refuses_with_503():
    from torch_elastic_kv.serve.http_server import _ConnectionGuard

    async def run() -> None:
        loop = asyncio.get_running_loop()
        guard, live = _ConnectionGuard(header_timeout=0.3, max_connections=2), set()

        def connect() -> _FakeConnection:
            conn = _FakeConnection(live, loop)
            if guard.admit(conn):
                guard.wait_for_head(conn)
            return conn

        a, b = connect(), connect()
        c = connect()  # over the cap: the oldest still waiting for a head (a) is closed
        assert a.transport.closed and not b.transport.closed and not c.transport.closed
        live.discard(a)
        guard.head_received(b)  # b and c have requests in progress now
        guard.head_received(c)
        d = connect()  # nobody to evict: 503 in OpenAI's shape, then closed
        assert d.transport.closed and d.transport.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"retry-after: 1\r\n" in d.transport.written and b'"code": "overloaded"' in d.transport.written
        assert not b.transport.closed and not c.transport.closed  # requests in progress are never touched
        live.discard(d)
        live.discard(c)
        e = connect()
        await asyncio.sleep(0.6)  # no head within the timeout: closed
        assert e.transport.closed and not b.transport.closed and not guard.waiting

    asyncio.run(run())


# ---------------------------------------------------------------------------- text ----------
def test_incremental_detokenizer_equals_full_decode(tokenizer):
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        ids = torch.randint(0, len(tokenizer), (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        prompt = tokenizer.encode(f"prompt {trial} é")
        d = IncrementalDetokenizer(tokenizer, prompt)
        text = "".join(d.add(t) for t in ids) + d.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer):
    euro = list("€".encode())  # 3 bytes, one token each
    d = IncrementalDetokenizer(tokenizer, tokenizer.encode("price: "))
    assert [d.add(8 + b) for b in euro] == ["", "", "€"]
    assert d.add(EOS_ID) == "" and d.flush() == ""
    d = IncrementalDetokenizer(tokenizer, [1])
    assert d.add(8 + euro[0]) == "" and d.flush() == "\ufffd"  # an incomplete character at the end


def test_incremental_detokenizer_after_a_prompt_that_ends_inside_a_character(tokenizer):
    # the prompt ends with the first byte of "€"; the output starts with a lone continuation byte
    prompt = tokenizer.encode("price: ") + [8 + 0xE2]
    for out in ([8 + 0x82, 8 + ord("A")], [8 + 0x82, 8 + 0xAC, 8 + ord("!")], [8 + 0xBF]):
        d = IncrementalDetokenizer(tokenizer, prompt)
        text = "".join(d.add(t) for t in out) + d.flush()
        assert text == tokenizer.decode(out, skip_special_tokens=True), out
    d = IncrementalDetokenizer(tokenizer, prompt)
    assert [d.add(8 + 0x82), d.add(8 + ord("A"))] == ["", "\ufffdA"]


def test_incremental_detokenizer_keeps_leading_spaces_in_context():
    # a SentencePiece-style vocabulary: "▁" marks a space, dropped at the start of a text
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    d = IncrementalDetokenizer(tok, [1])
    assert [d.add(t) for t in (2, 3, 4)] == [" world", "!", " again"]
    assert tok.decode([1, 2, 3, 4]) == "hello world! again"


def test_stop_strings():
    s = StopStrings(["END", "xyz"])
    assert not s.feed("abc E") and s.sendable(final=False) == len("abc E") - 2
    assert s.feed("NDmore") and s.text == "abc " and s.stopped == "END"
    assert s.sendable(final=False) == 4 and s.feed("ignored") and s.text == "abc "
    s = StopStrings(["bb", "ab"])
    assert s.feed("aabb") and (s.text, s.stopped) == ("a", "ab")  # the earliest occurrence wins
    s = StopStrings([])
    assert not s.feed("anything") and s.sendable(final=False) == len("anything")
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings([""])


# ---------------------------------------------------------------------------- protocol ------
def test_parse_request_names_the_field():
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 2.5})
    assert (e.value.status, e.value.param) == (400, "max_tokens")
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, {"prompt": "x", "bogus": 1})
    assert e.value.param == "bogus" and "unknown field" in e.value.message
    with pytest.raises(APIError) as e:
        parse_request(ChatRequest, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]})
    assert e.value.param == "messages.0.tool_calls"
    req = parse_request(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
    assert req.conversation() == [{"role": "user", "content": "a"}]
    assert parse_request(CompletionRequest, {"prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]


def test_to_sampling():
    req = parse_request(CompletionRequest, {"prompt": "x"})
    assert to_sampling(req, 0, [EOS_ID]).sampling == {"temperature": 1.0}  # OpenAI's default
    req = parse_request(
        CompletionRequest, {"prompt": "x", "temperature": 1e-6, "top_k": -1, "seed": -1, "ignore_eos": True}
    )
    s = to_sampling(req, 3, [EOS_ID])
    assert s.sampling == {"temperature": 0.0, "seed": 2} and s.eos_token_ids == ()  # (-1 + 3) mod 2**64
    req = parse_request(CompletionRequest, {"prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 9})
    assert to_sampling(req, 1, [EOS_ID]).sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 10}


# ---------------------------------------------------------------------------- Engine --------
def test_check_request_raises_what_add_request_would_and_queues_nothing(model):
    with Engine(model, policy=ElasticPolicy(max_bytes=4 << 20)) as engine:
        for args in (([], 4), ([1, 300], 4), ([1, 2], 0), ([1] * 10, 600)):
            with pytest.raises(ValueError) as checked:
                engine.check_request(*args)
            with pytest.raises(ValueError) as added:
                engine.add_request(*args)
            assert str(checked.value) == str(added.value)
        engine.check_request([1, 2, 3], 4, EOS_ID, {"temperature": 0.5, "seed": 1})
        assert engine.stats()["waiting"] == 0 and not engine.has_unfinished()


def test_stalled_until_the_budget_returns(model):
    with Engine(model, policy=ElasticPolicy(max_bytes=4 << 20)) as engine:
        engine.set_budget(0)
        rid = engine.add_request([1, 2, 3], 4)
        assert engine.step() == [] and engine.stalled
        engine.set_budget(None)
        assert [out.request_id for out in engine.step()] == [rid] and not engine.stalled


# ---------------------------------------------------------------------------- engine thread -
def _service(model, tokenizer, max_waiting=64, **kw):
    engine = Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False)
    return EngineService(engine, tokenizer, ServerMetrics(), max_waiting=max_waiting, **kw)


async def _drain(sub):
    events = []
    while not sub.done:
        events += await sub.next_events()
    return events


class _PoisonedTokenizer:
    """The default tokenizer, except that decoding anything with ``<|end|>`` (id 7) in it
    fails: a request whose prompt ends in it breaks in the detokenizer, the others do not."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, **kw):
        if 7 in ids:
            raise RuntimeError("detokenizer broke")
        return self.inner.decode(ids, **kw)


def test_a_failure_in_one_request_fails_it_alone(model, tokenizer):
    prompts = [tokenizer.encode("good one"), tokenizer.encode("bad one") + [7]]
    with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20)) as ref:
        want = ref.generate(prompts[:1], 12)[0]
    service = _service(model, _PoisonedTokenizer(tokenizer))
    service.start()

    async def run():
        loop = asyncio.get_running_loop()
        good = service.submit([ChoiceSpec(prompts[0], 12, {"temperature": 0.0})], loop)
        bad = service.submit([ChoiceSpec(prompts[1], 12, {"temperature": 0.0}), ChoiceSpec(prompts[0], 12, {})], loop)
        return await _drain(good), await _drain(bad)

    try:
        good, bad = asyncio.run(run())
    finally:
        service.stop()
    assert [t for e in good for t in e.token_ids] == want and good[-1].finish_reason == "length"
    assert [e.error for e in bad if e.error] == [
        "RuntimeError: detokenizer broke",
        "another choice of this request failed",
    ]
    stats = service.engine.stats()  # closed: the figures it had when it closed
    assert stats["cancelled"] == 2 and stats["finished"] == 1 and stats["running"] == 0


def test_a_failed_step_loses_no_request_and_steps_that_keep_failing_end_them(model, tokenizer):
    """Issue 21, item 1: one failing step used to fail every active request. The Engine keeps
    them where they were, so they go on (tokens equal to a calm run); a request the failed
    step had finished inside the Engine still gets its tokens; only steps failing for
    budget_wait_seconds in a row end requests, with a 500."""
    ids = [tokenizer.encode("after the failure"), tokenizer.encode("finished in the failing step")]
    with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20)) as ref:
        want = ref.generate(ids, [5, 1])
    service = _service(model, tokenizer, budget_wait_seconds=1.0)
    engine = service.engine
    real_step = engine.step
    calls = {"n": 0, "fail": {1, 2}}

    def failing_step():
        calls["n"] += 1
        if calls["fail"] == "always":
            raise RuntimeError("forward exploded for good")
        if calls["n"] in calls["fail"]:
            real_step()  # the Engine ran the step (and finished a request) before it raised
            raise RuntimeError("forward exploded")
        return real_step()

    engine.step = failing_step
    service.start()

    async def run():
        loop = asyncio.get_running_loop()
        subs = [service.submit([ChoiceSpec(p, n, {"temperature": 0.0})], loop) for p, n in zip(ids, [5, 1])]
        calm = [await _drain(sub) for sub in subs]
        calls["fail"] = "always"
        t0 = loop.time()
        failed = await _drain(service.submit([ChoiceSpec(ids[0], 5, {"temperature": 0.0})], loop))
        return calm, failed, loop.time() - t0

    try:
        calm, failed, waited = asyncio.run(run())
    finally:
        service.stop()
    assert [[t for e in events for t in e.token_ids] for events in calm] == want
    assert [events[-1].finish_reason for events in calm] == ["length", "length"]
    assert not any(e.error for events in calm for e in events)
    assert failed[-1].status == 500 and failed[-1].error.startswith("the engine failed: every step for ")
    assert failed[-1].error.endswith("RuntimeError: forward exploded for good")
    assert 1.0 <= waited < 30


def test_submit_checks_every_choice_first_and_bounds_the_queue(model, tokenizer):
    service = _service(model, tokenizer, max_waiting=3)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(APIError) as e:
            service.submit([ChoiceSpec([1, 2], 4, {}), ChoiceSpec([1, 999], 4, {})], loop)
        assert e.value.status == 400 and "outside the vocabulary" in e.value.message
        assert not service.engine.has_unfinished()  # the good first choice was not queued either
        service.submit([ChoiceSpec([1, 2], 4, {})] * 3, loop)
        with pytest.raises(APIError) as e:
            service.submit([ChoiceSpec([1, 2], 4, {})], loop)
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
        assert service.queued == 3
    finally:
        service.engine.close()
        loop.close()
