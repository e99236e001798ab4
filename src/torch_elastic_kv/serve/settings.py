"""The server's checked settings, what the command line (``cli.py``) produces and the server
(``server.py``) runs on: one module both import, so neither imports the other at load time.
No torch import (``device_memory`` imports it when asked)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "FRONT_CHOICES",
    "HTTP_CHOICES",
    "LOOP_CHOICES",
    "MIN_KV_BYTES",
    "ServeSettings",
    "UsageError",
    "device_memory",
    "http_stack",
    "physical_memory",
]

MIN_KV_BYTES = 2 << 20  # one host granule: the smallest pool the Engine can build


class UsageError(Exception):
    """A bad option; the message is the one line printed."""


# --http / --loop, as uvicorn spells them; "auto" takes the C implementation when installed
HTTP_CHOICES = ("auto", "httptools", "h11")
LOOP_CHOICES = ("auto", "uvloop", "asyncio")
FRONT_CHOICES = ("auto", "process", "thread")  # --front
_C_IMPLEMENTATION = {"http": ("httptools", "h11"), "loop": ("uvloop", "asyncio")}


def http_stack(http: str = "auto", loop: str = "auto") -> tuple[str, str]:
    """The HTTP parser and event loop the server runs on, ``auto`` resolved: httptools and uvloop
    when importable, else h11 and asyncio. UsageError for an unknown name or one that is asked
    for by name and not installed."""
    chosen = []
    for option, value, choices in (("--http", http, HTTP_CHOICES), ("--loop", loop, LOOP_CHOICES)):
        fast, fallback = _C_IMPLEMENTATION[option[2:]]
        if value not in choices:
            raise UsageError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        installed = importlib.util.find_spec(fast) is not None
        if value == fast and not installed:
            raise UsageError(f"{option} {fast}: the {fast} package is not installed (pip install {fast})")
        chosen.append(value if value != "auto" else (fast if installed else fallback))
    return chosen[0], chosen[1]


@dataclass(frozen=True)
class ServeSettings:
    """The checked options."""

    model: Optional[str]
    served_model_name: str
    host: str
    port: int
    api_key: Optional[str]
    admin_key: Optional[str]
    device: str
    dtype: str
    max_kv_bytes: Optional[int]
    min_kv_bytes: int
    idle_seconds: float
    swap_bytes: int
    max_waiting: int
    drain_seconds: float
    max_batch_tokens: int
    max_body_bytes: int
    seed: int
    log_level: str
    broker: Optional[str] = None
    tenant: Optional[str] = None
    priority: int = 0
    guarantee_bytes: int = 0
    budget_wait_seconds: float = 30.0
    # most prompt tokens in a step that decodes a stream still waiting for its first text
    # (Engine.expedite); None: such streams wait like the others
    expedite_prefill_tokens: Optional[int] = 256
    broker_wait_seconds: float = 10.0
    broker_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    served_model_names: tuple[str, ...] = ()  # every name requests may send; the first is reported
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    chat_template: Optional[str] = None  # the template's text (read from --chat-template PATH)
    gpu_memory_utilization: Optional[float] = None  # the KV ceiling as a share of device memory
    prefix_caching: bool = True
    prefix_cache_expiry: Optional[float] = 300.0  # None: cached pages never expire
    prefix_cache_cap: Optional[int] = None  # None: what the budget leaves free
    tensor_parallel_size: int = 1  # issue 26: ranks of a tensor-parallel group (serve/tp_front.py)
    tp_timeout: float = 120.0  # seconds a rank waits for the others before the group counts as down
    threads: int = 1  # torch's intra-op threads for the model's forward
    compile: bool = False  # Engine(compile=True): the decoder MLPs and norms through inductor
    http: str = "auto"  # HTTP parser: http_stack() resolves it
    loop: str = "auto"  # event loop: http_stack() resolves it
    front: str = "thread"  # "process": HTTP in a child process (engine_host.py); the CLI's auto picks it


def physical_memory() -> Optional[int]:
    """This machine's RAM in bytes (None if the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def device_memory(device: str) -> int:
    """Total memory of ``device`` in bytes: the GPU's, or this machine's RAM on CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    physical = physical_memory()
    if physical is None:
        raise UsageError("--gpu-memory-utilization: this machine's memory size is unknown")
    return physical
