"""Load the model, build the Engine and run the app under uvicorn until a signal.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections; the engine service refuses
new requests and lets those in flight run for ``--drain-seconds``, then ends the rest with
``finish_reason`` "abort"; once their responses are written the app's lifespan closes the
Engine, which gives all KV memory back, and the process exits 0 (a second SIGINT exits at
once, without the drain).

Slow and idle clients: uvicorn has no deadline for a request head, so its HTTP protocol (httptools
or h11, ``--http``) runs under a ``_ConnectionGuard`` (``--header-timeout``,
``--max-connections``), and the log lines a connection flood repeats are rate-limited
(``_RateLimitFilter``).

The event loop and the HTTP parser are uvloop and httptools when they are installed (``--loop``,
``--http``; the ``serve`` extra brings both on Linux and macOS), as uvicorn's own "auto" would
pick: the loop thread shares the process, and so the GIL, with the engine thread, and their C
implementations hold it for less of each streamed token than asyncio's selector loop and h11.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import time
from typing import Any, Optional

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..broker.client import BrokerClient
from ..engine.engine import Engine
from ..engine.eviction import EvictionPolicy
from ..engine.policy import ElasticPolicy
from .app import ServerState, create_app
from .default_model import build_default_model, build_default_tokenizer
from .engine_thread import EngineService
from .metrics import ServerMetrics
from .settings import MIN_KV_BYTES, ServeSettings, device_memory, http_stack

_log = logging.getLogger(__name__)

__all__ = ["build_state", "engine_options", "kv_ceiling", "load_model", "model_bytes", "run", "utilization_ceiling"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(settings: ServeSettings) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, model card fields)``: the local directory, or the default model."""
    dtype = _dtype(settings.dtype, settings.device)
    if settings.model is None:
        model = build_default_model(settings.seed, dtype=dtype, device=settings.device)
        card = {
            "root": "torch_elastic_kv.serve.default_model",
            "random_weights": True,
            "description": f"the embedded default Llama with random weights (seed {settings.seed}) and a "
            "byte-level tokenizer: its text is noise; for tests and benchmarks",
        }
        return model, build_default_tokenizer(), card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(settings.model, local_files_only=True, dtype=dtype)
    model = model.to(settings.device).eval()
    return model, tokenizer, {"root": settings.model}


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def utilization_ceiling(fraction: float, total_bytes: int, held_bytes: int) -> int:
    """``--gpu-memory-utilization``: the KV ceiling, ``fraction`` of the device's memory minus what
    the model holds; ValueError when that leaves less than one KV chunk."""
    ceiling = int(fraction * total_bytes) - held_bytes
    if ceiling < MIN_KV_BYTES:
        raise ValueError(
            f"--gpu-memory-utilization {fraction:g} x {total_bytes} bytes minus the model's {held_bytes} bytes "
            f"leaves {ceiling} bytes for KV, under one KV chunk ({MIN_KV_BYTES} bytes)"
        )
    return ceiling


def kv_ceiling(settings: ServeSettings, model: Any) -> Optional[int]:
    """The KV ceiling the options ask for (None: the pool's default share of the device)."""
    if settings.gpu_memory_utilization is None:
        return settings.max_kv_bytes
    max_kv = utilization_ceiling(settings.gpu_memory_utilization, device_memory(settings.device), model_bytes(model))
    _log.info("torch_elastic_kv serve: KV ceiling %d bytes (--gpu-memory-utilization)", max_kv)
    return max_kv


def engine_options(settings: ServeSettings, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ElasticPolicy kwargs, Engine kwargs)`` of the options; a tensor-parallel rank builds
    its Engine from the same."""
    policy = dict(
        min_bytes=settings.min_kv_bytes,
        max_bytes=kv_ceiling(settings, model),
        idle_seconds=settings.idle_seconds,
        swap_bytes=settings.swap_bytes,
    )
    # A server runs for days: no per-step timeline, and only recent finished requests kept.
    engine = dict(
        max_batch_tokens=settings.max_batch_tokens,
        timeline=False,
        keep_finished=1024,
        prefix_caching=settings.prefix_caching,
        eviction=EvictionPolicy(settings.prefix_cache_expiry, settings.prefix_cache_cap),
        compile=settings.compile,
    )
    return policy, engine


def broker_client(settings: ServeSettings) -> BrokerClient:
    """The tenant's link to the broker the options name (``--broker``, ``--tenant``, ...)."""
    return BrokerClient(
        settings.broker,
        settings.tenant,
        priority=settings.priority,
        guarantee_bytes=settings.guarantee_bytes,
        connect_timeout=settings.broker_timeout,
        io_timeout=settings.broker_timeout,
    )


def build_state(settings: ServeSettings) -> ServerState:
    """The model, its Engine on an elastic (or, min == max, static) pool, and the service."""
    # before the model runs: torch's intra-op pool is sized at its first parallel operation
    torch.set_num_threads(settings.threads)
    _log.info("torch_elastic_kv serve: %d thread(s) for the forward (--threads)", settings.threads)
    model, tokenizer, card = load_model(settings)
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template
    if settings.tensor_parallel_size > 1:  # issue 26: rank 0 of a tensor-parallel group (tp_front.py)
        from .tp_front import start_group

        engine: Any = start_group(settings, model)
    else:
        policy_kwargs, engine_kwargs = engine_options(settings, model)
        broker = broker_client(settings) if settings.broker is not None else None
        engine = Engine(model, policy=ElasticPolicy(**policy_kwargs), broker=broker, **engine_kwargs)
    if settings.compile:
        _log.info("torch_elastic_kv serve: compiled in %.1f s (--compile)", engine.stats()["compile_seconds"])
    metrics = ServerMetrics(model_name=settings.served_model_name)
    service = EngineService(
        engine,
        tokenizer,
        metrics,
        settings.max_waiting,
        budget_wait_seconds=settings.budget_wait_seconds,
        broker_wait_seconds=settings.broker_wait_seconds,
    )
    # a larger budget (a grant, a raised kv-budget, wake) may admit requests the thread holds
    engine.budget.add_listener(service.wake)
    metrics.watch(service.stats)
    metrics.vllm.describe_cache(
        block_size=engine.pool.page_tokens,
        cache_dtype=str(engine.pool.dtype).removeprefix("torch."),
        swap_bytes=settings.swap_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_positions = int(getattr(cfg, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048))
    if settings.max_model_len is not None:
        max_positions = min(max_positions, settings.max_model_len)
    return ServerState(
        service=service,
        tokenizer=tokenizer,
        model_name=settings.served_model_name,
        model_aliases=settings.served_model_names[1:],
        max_positions=max_positions,
        eos_token_ids=_eos_ids(model, tokenizer),
        api_key=settings.api_key,
        admin_key=settings.admin_key,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        model_card=card,
    )


REPORT_SECONDS = 5.0  # at most one log line per this many seconds about refused or dropped connections


class _ConnectionGuard:
    """What uvicorn lacks against slow and idle clients: a deadline for each request head and a
    cap on open connections below the open-file limit.

    A connection must send a complete request head within ``header_timeout`` seconds of
    connecting or of its previous response (bytes trickling in do not extend it), else it is
    closed. Past ``max_connections``, a new connection closes the oldest one still waiting for
    a head (a slow or idle client; a request in progress is never touched), or, when every
    connection has a request in progress, is answered 503 and closed. Open connections thus
    stay below the fd limit (a burst accepted in one go may still meet it once; asyncio then
    pauses accept() for a second), and a client that sends its request at once (``/health``)
    is served whatever a flood of silent connections does. Such closures are logged as one
    summary line per ``REPORT_SECONDS``.
    """

    def __init__(self, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.waiting: collections.OrderedDict[Any, asyncio.TimerHandle] = collections.OrderedDict()
        self._counts: collections.Counter[str] = collections.Counter()
        self._report: Optional[asyncio.TimerHandle] = None

    def protocol_class(self, http: str = "h11") -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol class for ``http`` ("h11" or "httptools") bound to this guard
        (``uvicorn.Config(http=...)``). Each parser says when a head is complete and when the
        connection is idle again (keep-alive: the next head gets the same deadline)."""
        guard = self

        class Guarded:  # the hooks both parsers share; listed first, so super() is the parser
            def connection_made(self, transport: asyncio.Transport) -> None:
                super().connection_made(transport)  # type: ignore[misc]
                if guard.admit(self):
                    guard.wait_for_head(self)

            def connection_lost(self, exc: Optional[Exception]) -> None:
                guard.head_received(self)
                super().connection_lost(exc)  # type: ignore[misc]

        if http == "h11":

            class GuardedH11Protocol(Guarded, H11Protocol):
                def data_received(self, data: bytes) -> None:
                    super().data_received(data)
                    if self.conn.their_state is not h11.IDLE:
                        guard.head_received(self)

                def on_response_complete(self) -> None:
                    super().on_response_complete()
                    if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                        guard.wait_for_head(self)

            return GuardedH11Protocol
        if http != "httptools":
            raise ValueError(f"http must be 'h11' or 'httptools', got {http!r}")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class GuardedHttpToolsProtocol(Guarded, HttpToolsProtocol):
            def on_headers_complete(self) -> None:
                guard.head_received(self)
                super().on_headers_complete()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                # a pipelined request whose head is in already started its own cycle
                idle = self.cycle is None or self.cycle.response_complete
                if not self.transport.is_closing() and idle:
                    guard.wait_for_head(self)

        return GuardedHttpToolsProtocol

    def admit(self, conn: Any) -> bool:
        """Make room for ``conn`` (just connected); False if it was refused and closed."""
        if len(conn.connections) <= self.max_connections:
            return True
        if self.waiting:  # conn is not in it yet
            oldest = next(iter(self.waiting))
            self.head_received(oldest)
            oldest.transport.close()
            self._count(
                f"closed while waiting for a request head, to stay under --max-connections {self.max_connections}"
            )
            return True
        body = json.dumps(
            {
                "error": {
                    "message": f"too many connections (--max-connections {self.max_connections}); retry later",
                    "type": "server_error",
                    "param": None,
                    "code": "overloaded",
                }
            }
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        conn.transport.write(head.encode() + body)
        conn.transport.close()
        self._count("refused with 503: every connection had a request in progress")
        return False

    def wait_for_head(self, conn: Any) -> None:
        self.head_received(conn)
        self.waiting[conn] = conn.loop.call_later(self.header_timeout, self._expire, conn)

    def head_received(self, conn: Any) -> None:
        timer = self.waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, conn: Any) -> None:
        if self.waiting.pop(conn, None) is not None and not conn.transport.is_closing():
            conn.transport.close()
            self._count(f"closed without a complete request head within --header-timeout {self.header_timeout:g}s")

    def _count(self, what: str) -> None:
        self._counts[what] += 1
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(REPORT_SECONDS, self._log_counts)

    def _log_counts(self) -> None:
        self._report = None
        for what, n in self._counts.items():
            _log.warning("torch_elastic_kv serve: %d connection(s) %s in the last %gs", n, what, REPORT_SECONDS)
        self._counts.clear()


class _RateLimitFilter(logging.Filter):
    """One line per ``REPORT_SECONDS`` for a log message a flood repeats once per connection
    (asyncio's accept() error when file descriptors run out, uvicorn's invalid request), with
    the count of those left out and without the traceback."""

    def __init__(self, prefix: str, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.prefix = prefix
        self.clock = clock
        self._last: Optional[float] = None
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < REPORT_SECONDS:
            self._suppressed += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        detail = f": {error}" if error is not None else ""
        record.msg = "torch_elastic_kv serve: %s%s (%d more in the last %gs)"
        record.args = (self.prefix, detail, self._suppressed, REPORT_SECONDS)
        record.exc_info, record.exc_text = None, None
        self._last, self._suppressed = now, 0
        return True


# (logger, message prefix) of the lines a connection flood repeats
_FLOOD_MESSAGES = (
    ("asyncio", "socket.accept() out of system resource"),
    ("uvicorn.error", "Invalid HTTP request received."),
)


class _Server(uvicorn.Server):
    """uvicorn with the drain: a signal starts it, and the process exits 0 afterwards (stock
    uvicorn re-raises the signal once shut down, which would end the process by it)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_seconds: float, sock: socket.socket) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._sock = sock
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: no more waiting
        self.should_exit = True

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.should_exit:
            return
        host, port = self._sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        # the line scripts wait for: logged whatever --log-level says
        _log.log(
            max(logging.INFO, _log.getEffectiveLevel()),
            "torch_elastic_kv serve: listening on http://%s:%d",
            shown,
            port,
        )

    def answer_in_flight(self, message: str, seconds: float) -> None:
        """The Engine is gone for good (a tensor-parallel rank died; called off the loop): every
        request in flight gets its error now and new ones a 503 (``EngineService.fail_all``);
        returns once uvicorn has written every response in progress, or after ``seconds``."""
        self._state.service.fail_all(message)
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def written() -> None:
            deadline = loop.time() + seconds
            while self.server_state.tasks and loop.time() < deadline:
                await asyncio.sleep(0.01)

        try:
            asyncio.run_coroutine_threadsafe(written(), loop).result(seconds + 1)
        except Exception as exc:  # the loop stopped meanwhile: nothing more can be written
            _log.debug("waiting for the answers in flight: %s: %s", type(exc).__name__, exc)

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        _log.info("torch_elastic_kv serve: shutting down; in-flight requests have %gs to finish", self._drain_seconds)
        self._state.service.begin_drain(self._drain_seconds)
        await super().shutdown(sockets)


def run(settings: ServeSettings, sock: socket.socket) -> int:
    """Serve on ``sock`` (bound, not listening) until a signal; returns 0 after a clean drain."""
    t0 = time.perf_counter()
    try:
        state = build_state(settings)
    except Exception as exc:
        _log.error("torch_elastic_kv serve: cannot load the model: %s: %s", type(exc).__name__, exc)
        return 1
    _log.info(
        "torch_elastic_kv serve: model %s on %s loaded in %.1fs",
        settings.served_model_name,
        settings.device,
        time.perf_counter() - t0,
    )
    http, loop = http_stack(settings.http, settings.loop)
    _log.info("torch_elastic_kv serve: HTTP: %s on %s", http, loop)
    guard = _ConnectionGuard(settings.header_timeout, settings.max_connections)
    filters = [(logging.getLogger(name), _RateLimitFilter(prefix)) for name, prefix in _FLOOD_MESSAGES]
    for logger, flt in filters:
        logger.addFilter(flt)
    config = uvicorn.Config(
        create_app(state),
        log_config=None,
        access_log=False,
        lifespan="on",
        http=guard.protocol_class(http),
        ws="none",
        loop=loop,
        # a backstop only: the drain ends every request by --drain-seconds
        timeout_graceful_shutdown=int(settings.drain_seconds) + 3,
    )
    sock.listen(2048)
    server = _Server(config, state, settings.drain_seconds, sock)
    on_down = getattr(state.service.engine, "on_down", None)
    if on_down is not None:  # a tensor-parallel group that goes down answers its requests first
        from .tp_front import ANSWER_SECONDS

        on_down(lambda message: server.answer_in_flight(message, ANSWER_SECONDS))
    try:
        server.run(sockets=[sock])
    finally:
        for logger, flt in filters:
            logger.removeFilter(flt)
    return 0
