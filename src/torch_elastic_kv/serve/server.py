"""Load the model, build the Engine and run the app under uvicorn until a signal.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections; the engine service refuses
new requests and lets those in flight run for ``--drain-seconds``, then ends the rest with
``finish_reason`` "abort"; once their responses are written the app's lifespan closes the
Engine, which gives all KV memory back, and the process exits 0 (a second SIGINT exits at
once, without the drain).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Optional

import torch
import uvicorn

from ..broker.client import BrokerClient
from ..engine.engine import Engine
from ..engine.policy import ElasticPolicy
from .app import ServerState, create_app
from .cli import MIN_KV_BYTES, ServeSettings, device_memory
from .default_model import build_default_model, build_default_tokenizer
from .engine_thread import EngineService
from .metrics import ServerMetrics

_log = logging.getLogger(__name__)

__all__ = ["build_state", "load_model", "model_bytes", "run", "utilization_ceiling"]

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


def build_state(settings: ServeSettings) -> ServerState:
    """The model, its Engine on an elastic (or, min == max, static) pool, and the service."""
    model, tokenizer, card = load_model(settings)
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template
    max_kv = settings.max_kv_bytes
    if settings.gpu_memory_utilization is not None:
        max_kv = utilization_ceiling(
            settings.gpu_memory_utilization, device_memory(settings.device), model_bytes(model)
        )
        _log.info("torch_elastic_kv serve: KV ceiling %d bytes (--gpu-memory-utilization)", max_kv)
    policy = ElasticPolicy(
        min_bytes=settings.min_kv_bytes,
        max_bytes=max_kv,
        idle_seconds=settings.idle_seconds,
        swap_bytes=settings.swap_bytes,
    )
    broker = None
    if settings.broker is not None:
        broker = BrokerClient(
            settings.broker, settings.tenant, priority=settings.priority, guarantee_bytes=settings.guarantee_bytes
        )
    # A server runs for days: no per-step timeline, and only recent finished requests kept.
    engine = Engine(
        model,
        policy=policy,
        max_batch_tokens=settings.max_batch_tokens,
        timeline=False,
        keep_finished=1024,
        broker=broker,
    )
    metrics = ServerMetrics(model_name=settings.served_model_name)
    service = EngineService(engine, tokenizer, metrics, settings.max_waiting)
    if broker is not None:
        broker.on_grant = service.wake  # a larger lease may admit requests the engine thread holds
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
        model_card=card,
    )


class _Server(uvicorn.Server):
    """uvicorn with the drain: a signal starts it, and the process exits 0 afterwards (stock
    uvicorn re-raises the signal once shut down, which would end the process by it)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_seconds: float, sock: socket.socket) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._sock = sock

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: no more waiting
        self.should_exit = True

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
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
    config = uvicorn.Config(
        create_app(state),
        log_config=None,
        access_log=False,
        lifespan="on",
        http="h11",
        ws="none",
        loop="asyncio",
        # a backstop only: the drain ends every request by --drain-seconds
        timeout_graceful_shutdown=int(settings.drain_seconds) + 3,
    )
    sock.listen(2048)
    server = _Server(config, state, settings.drain_seconds, sock)
    server.run(sockets=[sock])
    return 0
