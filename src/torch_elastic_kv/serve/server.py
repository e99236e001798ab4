"""Load the model, build the Engine and serve it until a signal.

The HTTP side (uvicorn, the drain, the guards against slow clients) is ``http_server``; with
``--front process`` (the default) it runs in a child process (``engine_host``), else here.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Optional

import torch

from ..broker.client import BrokerClient
from ..engine.engine import Engine
from ..engine.eviction import EvictionPolicy
from ..engine.policy import ElasticPolicy
from .app import ServerState
from .default_model import build_default_model, build_default_tokenizer
from .engine_thread import EngineService
from .http_server import serve_http
from .metrics import ServerMetrics
from .settings import MIN_KV_BYTES, ServeSettings, device_memory

_log = logging.getLogger(__name__)

__all__ = [
    "build_state",
    "engine_options",
    "kv_ceiling",
    "load_model",
    "model_bytes",
    "run",
    "serve_http",
    "utilization_ceiling",
]

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
        expedite_prefill_tokens=settings.expedite_prefill_tokens,
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


def run(settings: ServeSettings, sock: socket.socket) -> int:
    """Serve on ``sock`` (bound, not listening) until a signal; returns 0 after a clean drain.
    With ``--front process`` the HTTP front runs in a child process (``engine_host``)."""
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
    if settings.front == "process":
        from .engine_host import serve_with_front_process

        code = serve_with_front_process(settings, state, sock)
        if code is not None:
            return code
    return serve_http(settings, state, sock)
