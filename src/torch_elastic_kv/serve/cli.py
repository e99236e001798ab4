"""Command line of the server: ``python -m torch_elastic_kv serve ...`` and ``ekv-serve ...``.

Every option is checked before the model loads (and before torch is imported for anything
but the device check): a bad one ends the command with exit status 2 and one line on stderr,
``ekv-serve: error: ...``. The listening socket is bound then too, so a port in use or a bad
host is also a one-line exit 2, not a traceback after a model load.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import resource
import socket
import stat
import sys
from typing import Optional

from .._units import SIZE_HELP, parse_size
from .settings import (
    FRONT_CHOICES,
    HTTP_CHOICES,
    LOOP_CHOICES,
    MIN_KV_BYTES,
    ServeSettings,
    UsageError,
    device_memory,
    http_stack,
    physical_memory,
)

__all__ = [
    "MIN_KV_BYTES",
    "ServeSettings",
    "UsageError",
    "bind_socket",
    "device_memory",
    "resolve",
    "serve_main",
    "serve_parser",
]

PROG = "ekv-serve"
DTYPES = ("auto", "float32", "float16", "bfloat16")
FD_RESERVE = 64  # file descriptors kept for the model, the engine, logs and the broker, not clients
MAX_CONNECTIONS_DEFAULT = 1024
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vllm serve's spellings
MAX_MODEL_LEN = 1 << 24  # past any real model's context; catches a unit slip (bytes for tokens)
API_KEY_ENV = "EKV_API_KEY"
ADMIN_KEY_ENV = "EKV_ADMIN_KEY"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def serve_parser(prog: str = PROG, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The option parser; ``epilog`` is the text under the options (``--help`` computes it)."""
    p = _Parser(
        prog=prog,
        description="An OpenAI-compatible server (completions, chat completions, SSE streaming, "
        "/metrics) whose KV memory follows its traffic.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model_arg",
        nargs="?",
        metavar="MODEL",
        help="the same as --model PATH, as in 'vllm serve PATH' (both given: they must agree)",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a local Hugging Face model directory with its tokenizer (never the hub); default: the "
        "embedded small Llama with random weights and a byte-level tokenizer",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        nargs="+",
        help="the model ids clients may send; the first is the one responses report (default: the model as given)",
    )
    p.add_argument(
        "--max-model-len",
        metavar="N",
        help="context length in tokens, prompt plus output (default: the model's max_position_embeddings; "
        "at most that)",
    )
    p.add_argument(
        "--chat-template",
        metavar="PATH",
        help="a Jinja chat template file used instead of the tokenizer's own (default: the tokenizer's)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        metavar="F",
        help="KV ceiling = F x the device's memory (RAM on CPU) minus what the model holds, 0 < F <= 1; a "
        "ceiling, not a reservation: KV memory is still taken only as requests need it and given back "
        "(instead of --max-kv-bytes)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", default="8000", help="TCP port (default 8000; 0 picks a free one, logged at start)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else no key)",
    )
    p.add_argument(
        "--admin-key",
        metavar="KEY",
        help=f"enable /admin/* behind this bearer key (default: ${ADMIN_KEY_ENV} if set, else /admin/* is 404)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (float32 on CPU, bfloat16/float16 on GPU), "
        + ", ".join(DTYPES[1:])
        + "; also half (float16) and float (float32)",
    )
    p.add_argument(
        "--max-kv-bytes",
        metavar="SIZE",
        help="KV memory ceiling, e.g. 512Mi, 4G, 4GiB or 4GB (default: the pool's, printed below)",
    )
    p.add_argument(
        "--min-kv-bytes", metavar="SIZE", default="0", help="KV floor kept mapped (default 0); = max: static"
    )
    p.add_argument("--idle-seconds", default="5", help="seconds of low demand before KV memory goes back (default 5)")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep full KV pages of finished requests and share them with requests whose prompts start "
        "the same way (default on; --no-enable-prefix-caching turns it off, as vllm serve spells it)",
    )
    p.add_argument(
        "--prefix-cache-expiry",
        metavar="S",
        default="300",
        help="seconds an unused cached prefix page is kept ('none': until memory is needed); idle, KV "
        "memory returns to the floor this long after the last request (default 300)",
    )
    p.add_argument(
        "--prefix-cache-cap",
        metavar="SIZE",
        default=None,
        help="most bytes of cached prefix pages (default: whatever the KV budget leaves free)",
    )
    p.add_argument(
        "--swap-bytes",
        metavar="SIZE",
        default="0",
        help="host memory for preempted requests' KV (default 0: recompute)",
    )
    p.add_argument("--max-waiting", default="1024", help="queued requests past which new ones get 503 (default 1024)")
    p.add_argument("--drain-seconds", default="10", help="on SIGTERM/SIGINT, how long requests may finish (default 10)")
    p.add_argument("--max-batch-tokens", default="2048", help="most tokens in one Engine step (default 2048)")
    p.add_argument(
        "--expedite-prefill-tokens",
        default="256",
        help="most prompt tokens in a step that decodes a stream still waiting for its first text (its first "
        "character split over tokens), so that its next token comes after a short step; off: no limit "
        "(default 256)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="CPU threads for the model's forward (default: the cores this process may use minus one, at "
        f"least 1: {default_threads()} here; the other core serves HTTP and detokenizes)",
    )
    p.add_argument(
        "--http",
        default="auto",
        help=f"HTTP parser, one of {', '.join(HTTP_CHOICES)} (default auto: httptools when installed, else h11)",
    )
    p.add_argument(
        "--loop",
        default="auto",
        help=f"event loop, one of {', '.join(LOOP_CHOICES)} (default auto: uvloop when installed, else asyncio)",
    )
    p.add_argument(
        "--front",
        default="auto",
        help=f"where HTTP, JSON and tokenization run, one of {', '.join(FRONT_CHOICES)}: process (a child "
        "process, so they never hold the GIL the engine's steps need), thread (this process's event loop); "
        "default auto: process, thread under --tensor-parallel-size > 1",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="compile the decoder layers' MLPs and norms with torch.compile at start (default off: seconds "
        "of start-up, and not faster on CPU for small models; compile time is logged)",
    )
    p.add_argument("--max-body-bytes", metavar="SIZE", default="4M", help="largest request body (default 4M)")
    p.add_argument(
        "--budget-wait-seconds",
        metavar="S",
        default="30",
        help="a request that cannot run under the KV budget (or whose KV memory cannot be mapped) ends "
        "with 503 after waiting this long, unless the server sleeps (default 30)",
    )
    p.add_argument(
        "--header-timeout",
        metavar="S",
        default="10",
        help="seconds a connection has to send a complete request head (after connecting or after its "
        "previous response) before it is closed (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        metavar="S",
        default="30",
        help="seconds a request body has to arrive once its head is in; later is 408 and the connection "
        "is closed (default 30)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        help="open connections past which a new one closes the oldest still waiting for a request head "
        f"(or gets 503); at most the open-file limit less {FD_RESERVE} (default: that, up to "
        f"{MAX_CONNECTIONS_DEFAULT})",
    )
    p.add_argument("--seed", default="0", help="seed of the default model's random weights (default 0)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--broker",
        metavar="SOCKET",
        help="the device's memory broker (python -m torch_elastic_kv broker): KV memory follows its lease",
    )
    p.add_argument("--tenant", metavar="NAME", help="this server's tenant name at the broker (needed with --broker)")
    p.add_argument("--priority", default="0", help="priority at the broker; higher wins under contention (default 0)")
    p.add_argument(
        "--guarantee",
        metavar="SIZE",
        default=None,
        help="KV bytes the broker always leaves this server (default: --min-kv-bytes)",
    )
    p.add_argument(
        "--broker-wait-seconds",
        metavar="S",
        default="10",
        help="a request that needs more than the broker's lease ends with 503 + Retry-After if no grant "
        "comes within this long (default 10)",
    )
    p.add_argument(
        "--broker-timeout",
        metavar="S",
        default="5",
        help="seconds any exchange with the broker may take before it counts as lost (default 5)",
    )
    # tensor parallel (issue 26; serve/tp_front.py, docs/TENSOR_PARALLEL.md)
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        metavar="N",
        default="1",
        help="split the model over N ranks (processes; gloo on cpu), each holding 1/N of the KV heads in its "
        "own elastic pool; this process is rank 0 and starts the others, or runs under torchrun (default 1)",
    )
    p.add_argument(
        "--tp-timeout",
        metavar="S",
        default="120",
        help="with --tensor-parallel-size: seconds a rank waits for the others (the start included) before "
        "the group counts as down and the server exits 1 (default 120)",
    )
    return p


def help_epilog() -> str:
    """The text under ``--help``'s options: size suffixes and this machine's default KV ceiling."""
    lines = [
        SIZE_HELP[0].upper() + SIZE_HELP[1:] + "; a bare K/M/G/T is binary (64M = 64 MiB).",
        "",
        "Default KV ceiling here:",
    ]
    physical = physical_memory()
    if physical is not None:
        lines.append(f"  cpu: 25 % of RAM = {physical // 4 / 2**30:.1f} GiB")
    try:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, _total = torch.cuda.mem_get_info(i)
            lines.append(
                f"  cuda:{i}: 90 % of the memory free when the Engine starts (now {free * 0.9 / 2**30:.1f} GiB)"
            )
    except Exception as exc:  # a broken driver must not break --help
        lines.append(f"  cuda: unknown ({type(exc).__name__}: {exc})")
    lines.append("A ceiling, not a reservation: KV memory is mapped as requests need it and given back when idle.")
    return "\n".join(lines)


def _number(flag: str, text: str, *, integer: bool, low: float, high: float = math.inf) -> float:
    try:
        value: float = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{flag} must be {kind}, got {text!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise UsageError(f"{flag} must be {bound}, got {text!r}")
    return value


def _size(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _max_connections(text: Optional[str]) -> int:
    """``--max-connections``: the open-file limit less ``FD_RESERVE`` bounds it, so accept()
    never runs out of descriptors while the cap holds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = MAX_CONNECTIONS_DEFAULT * 1024 if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
    if room < 1:
        raise UsageError(f"the open-file limit ({soft}, ulimit -n) leaves no descriptors for connections")
    if text is None:
        return min(MAX_CONNECTIONS_DEFAULT, room)
    value = int(_number("--max-connections", text, integer=True, low=1))
    if value > room:
        raise UsageError(
            f"--max-connections {text} is above the open-file limit ({soft}, ulimit -n) less {FD_RESERVE}: "
            f"at most {room}; raise the limit or lower --max-connections"
        )
    return value


def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"--model {path}: not a directory (a local Hugging Face model directory is expected)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--model {path}: no config.json in it")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise UsageError(f"--model {path}: no tokenizer in it (none of {', '.join(tokenizer_files)})")


def _model_max_positions(path: Optional[str]) -> Optional[int]:
    """``max_position_embeddings`` from the model's config.json (or its text config), if it says."""
    if path is None:
        from .default_model import default_max_positions

        return default_max_positions()
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(cfg, dict) and isinstance(cfg.get("max_position_embeddings"), int):
            return cfg["max_position_embeddings"]
    return None


def _read_chat_template(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--chat-template {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--chat-template {path}: a directory, not a template file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template {path}: cannot read it ({exc})") from None
    if not text.strip():
        raise UsageError(f"--chat-template {path}: the file is empty")
    return text


def _model_options(args: argparse.Namespace) -> tuple[Optional[str], Optional[int], Optional[str]]:
    """The model (positional or ``--model``), ``--max-model-len`` and ``--chat-template``, checked."""
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise UsageError(f"the model is given twice and differently: {args.model_arg!r} and --model {args.model!r}")
    model = args.model if args.model is not None else args.model_arg
    if model is not None:
        _check_model_dir(model)
    max_len = None
    if args.max_model_len is not None:
        max_len = int(_number("--max-model-len", args.max_model_len, integer=True, low=1, high=MAX_MODEL_LEN))
        limit = _model_max_positions(model)
        if limit is not None and max_len > limit:
            raise UsageError(f"--max-model-len {max_len} is above the model's max_position_embeddings ({limit})")
    template = _read_chat_template(args.chat_template) if args.chat_template is not None else None
    return model, max_len, template


def _check_key(flag: str, key: Optional[str]) -> Optional[str]:
    if key is None:
        return None
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise UsageError(f"{flag} must be a non-empty key without spaces or control characters")
    return key


def _device(text: Optional[str]) -> str:
    import torch

    from .._util import parse_device

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = parse_device(text)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def _check_rank_devices(device: str, world: int) -> None:
    """``--tensor-parallel-size N`` on CUDA: one GPU per rank, checked before anything loads
    (``parallel.devices.rank_device``)."""
    import torch

    from ..parallel.devices import DeviceError, rank_device, torchrun_local

    count = torch.cuda.device_count() if device.startswith("cuda") and torch.cuda.is_available() else 0
    try:
        local_rank, local_world = torchrun_local(os.environ) if "RANK" in os.environ else (None, None)
        rank_device(device, 0, world, count, local_rank, local_world)
    except DeviceError as exc:
        raise UsageError(str(exc)) from None


def resolve(argv: list[str]) -> ServeSettings:
    """Parse and check ``argv``; raises ``UsageError`` with a one-line message."""
    args = serve_parser().parse_args(argv)
    model, max_model_len, chat_template = _model_options(args)
    port = int(_number("--port", args.port, integer=True, low=0, high=65535))
    if not args.host or any(c.isspace() for c in args.host):
        raise UsageError(f"--host must be an address or a host name, got {args.host!r}")
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES + tuple(DTYPE_ALIASES))}, got {args.dtype!r}")
    max_kv = _size("--max-kv-bytes", args.max_kv_bytes) if args.max_kv_bytes is not None else None
    min_kv = _size("--min-kv-bytes", args.min_kv_bytes)
    swap = _size("--swap-bytes", args.swap_bytes)
    body = _size("--max-body-bytes", args.max_body_bytes)
    if max_kv is not None and max_kv < MIN_KV_BYTES:
        raise UsageError(
            f"--max-kv-bytes must be at least {MIN_KV_BYTES >> 20} MiB (one KV chunk), got {args.max_kv_bytes}"
        )
    physical = physical_memory()
    for flag, text, value in (
        ("--max-kv-bytes", args.max_kv_bytes, max_kv),
        ("--min-kv-bytes", args.min_kv_bytes, min_kv),
    ):
        if physical is not None and value is not None and value > physical:
            raise UsageError(f"{flag} {text} is more than this machine's memory ({physical} bytes)")
    if max_kv is not None and min_kv > max_kv:
        raise UsageError(f"--min-kv-bytes {args.min_kv_bytes} is above --max-kv-bytes {args.max_kv_bytes}")
    utilization = None
    if args.gpu_memory_utilization is not None:
        if max_kv is not None:
            raise UsageError("--gpu-memory-utilization and --max-kv-bytes both set the KV ceiling: give one")
        utilization = _number("--gpu-memory-utilization", args.gpu_memory_utilization, integer=False, low=0, high=1)
        if utilization == 0:
            raise UsageError(f"--gpu-memory-utilization must be above 0, got {args.gpu_memory_utilization!r}")
    if physical is not None and swap > physical:
        raise UsageError(f"--swap-bytes {args.swap_bytes} is more than this machine's memory ({physical} bytes)")
    if body < 1024:
        raise UsageError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    idle = _number("--idle-seconds", args.idle_seconds, integer=False, low=0, high=86400)
    expiry = (
        None
        if str(args.prefix_cache_expiry).strip().lower() == "none"
        else _number("--prefix-cache-expiry", args.prefix_cache_expiry, integer=False, low=0, high=86400 * 30)
    )
    cap = _size("--prefix-cache-cap", args.prefix_cache_cap) if args.prefix_cache_cap is not None else None
    if cap is not None and max_kv is not None and cap > max_kv:
        raise UsageError(f"--prefix-cache-cap {args.prefix_cache_cap} is above --max-kv-bytes {args.max_kv_bytes}")
    drain = _number("--drain-seconds", args.drain_seconds, integer=False, low=0, high=86400)
    max_waiting = int(_number("--max-waiting", args.max_waiting, integer=True, low=1))
    max_batch = int(_number("--max-batch-tokens", args.max_batch_tokens, integer=True, low=1, high=1 << 20))
    expedite = (
        None
        if args.expedite_prefill_tokens == "off"
        else int(_number("--expedite-prefill-tokens", args.expedite_prefill_tokens, integer=True, low=0, high=1 << 20))
    )
    http, loop = http_stack(args.http, args.loop)
    threads = (
        default_threads() if args.threads is None else int(_number("--threads", args.threads, integer=True, low=1))
    )
    if threads > _usable_cores():
        raise UsageError(f"--threads must be at most the {_usable_cores()} cores this process may use, got {threads}")
    seed = int(_number("--seed", args.seed, integer=True, low=0, high=2**63 - 1))
    budget_wait = _number("--budget-wait-seconds", args.budget_wait_seconds, integer=False, low=0, high=86400)
    broker_wait = _number("--broker-wait-seconds", args.broker_wait_seconds, integer=False, low=0, high=86400)
    broker_timeout = _number("--broker-timeout", args.broker_timeout, integer=False, low=0.01, high=3600)
    header_timeout = _number("--header-timeout", args.header_timeout, integer=False, low=0.1, high=3600)
    body_timeout = _number("--body-timeout", args.body_timeout, integer=False, low=0.1, high=3600)
    max_connections = _max_connections(args.max_connections)
    api_key = _check_key("--api-key", args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV))
    admin_key = _check_key(
        "--admin-key", args.admin_key if args.admin_key is not None else os.environ.get(ADMIN_KEY_ENV)
    )
    tp_size = int(_number("--tensor-parallel-size", args.tensor_parallel_size, integer=True, low=1, high=64))
    tp_timeout = _number("--tp-timeout", args.tp_timeout, integer=False, low=1, high=86400)
    # a tensor-parallel group is one broker tenant: its guarantee covers every rank's floor
    broker, tenant, priority, guarantee = _broker_options(
        args, min_kv * tp_size, None if max_kv is None else max_kv * tp_size, tp_size
    )
    front = _front(args.front, tp_size)
    device = _device(args.device)
    if tp_size > 1:
        # the text as given: _device resolves "cuda" to "cuda:0", and an index is refused here
        _check_rank_devices(device.partition(":")[0] if args.device is None else args.device.strip(), tp_size)
    if utilization is not None:
        _check_utilization(utilization, device, min_kv, args.min_kv_bytes)
    names = _served_names(args.served_model_name, model)
    return ServeSettings(
        model=model,
        served_model_name=names[0],
        host=args.host,
        port=port,
        api_key=api_key,
        admin_key=admin_key,
        device=device,
        dtype=dtype,
        max_kv_bytes=max_kv,
        min_kv_bytes=min_kv,
        idle_seconds=idle,
        prefix_caching=bool(args.enable_prefix_caching),
        prefix_cache_expiry=expiry,
        prefix_cache_cap=cap,
        swap_bytes=swap,
        max_waiting=max_waiting,
        drain_seconds=drain,
        max_batch_tokens=max_batch,
        expedite_prefill_tokens=expedite,
        max_body_bytes=body,
        seed=seed,
        log_level=args.log_level,
        broker=broker,
        tenant=tenant,
        priority=priority,
        guarantee_bytes=guarantee,
        budget_wait_seconds=budget_wait,
        broker_wait_seconds=broker_wait,
        broker_timeout=broker_timeout,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        served_model_names=names,
        max_model_len=max_model_len,
        chat_template=chat_template,
        gpu_memory_utilization=utilization,
        tensor_parallel_size=tp_size,
        tp_timeout=tp_timeout,
        threads=threads,
        compile=bool(args.compile),
        http=http,
        loop=loop,
        front=front,
    )


def _front(text: str, tp_size: int) -> str:
    """``--front``: "auto" resolved; a front process serves one Engine, not a tensor-parallel group."""
    value = text.strip().lower()
    if value not in FRONT_CHOICES:
        raise UsageError(f"--front must be one of {', '.join(FRONT_CHOICES)}, got {text!r}")
    if value == "auto":
        return "process" if tp_size == 1 else "thread"
    if value == "process" and tp_size > 1:
        raise UsageError(
            f"--front process serves one Engine; with --tensor-parallel-size {tp_size} the HTTP front is a thread "
            "of rank 0 (--front thread or auto)"
        )
    return value


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """``--threads`` by default: the cores this process may use, less one for the HTTP event
    loop, the detokenizer and the clients' own work, at least 1. Why not all: torch's worker
    threads wait for each other at every operation, so one of them descheduled by other work
    on its core stalls the whole forward (on a busy 2-core machine, 2 threads made the
    Engine's decode steps several times slower than 1; benchmarks/RESULTS.md, "Decode speed")."""
    return max(1, _usable_cores() - 1)


def _served_names(given: Optional[list[str]], model: Optional[str]) -> tuple[str, ...]:
    from .default_model import DEFAULT_MODEL_NAME

    if not given:
        return (model if model is not None else DEFAULT_MODEL_NAME,)
    for name in given:
        if not name or not name.isprintable() or len(name) > 256:
            raise UsageError(f"--served-model-name must be 1-256 printable characters, got {name!r}")
    return tuple(dict.fromkeys(given))  # repeats dropped, order kept


def _check_utilization(fraction: float, device: str, min_kv: int, min_text: str) -> None:
    """What can be checked before the model loads: F x device memory must hold the floor."""
    share = int(fraction * device_memory(device))
    if share < max(MIN_KV_BYTES, min_kv):
        raise UsageError(
            f"--gpu-memory-utilization {fraction:g} leaves {share} bytes of {device}, below the KV floor "
            f"({max(MIN_KV_BYTES, min_kv)} bytes; --min-kv-bytes {min_text})"
        )


def _broker_options(
    args: argparse.Namespace, min_kv: int, max_kv: Optional[int], ranks: int = 1
) -> tuple[Optional[str], Optional[str], int, int]:
    """``--broker``, ``--tenant``, ``--priority``, ``--guarantee``, checked together."""
    priority = int(_number("--priority", args.priority, integer=True, low=-(2**31), high=2**31 - 1))
    if args.broker is None:
        for flag, value in (("--tenant", args.tenant), ("--guarantee", args.guarantee)):
            if value is not None:
                raise UsageError(f"{flag} needs --broker")
        if priority != 0:
            raise UsageError("--priority needs --broker")
        return None, None, 0, 0
    try:
        is_socket = stat.S_ISSOCK(os.stat(args.broker).st_mode)
    except OSError as exc:
        raise UsageError(f"--broker {args.broker}: no broker socket there ({exc.strerror})") from None
    if not is_socket:
        raise UsageError(f"--broker {args.broker}: not a socket")
    if args.tenant is None:
        raise UsageError("--broker needs --tenant NAME")
    if not (0 < len(args.tenant) <= 64) or not args.tenant.isprintable():
        raise UsageError(f"--tenant must be 1-64 printable characters, got {args.tenant!r}")
    per_rank = f" x {ranks} ranks" if ranks > 1 else ""  # a group's guarantee is for all its ranks
    guarantee = _size("--guarantee", args.guarantee) if args.guarantee is not None else min_kv
    if guarantee < min_kv:
        raise UsageError(
            f"--guarantee {args.guarantee} is below --min-kv-bytes {args.min_kv_bytes}{per_rank}: the floor is memory "
            "the server never gives back, so the broker must always leave it"
        )
    if max_kv is not None and guarantee > max_kv:
        raise UsageError(f"--guarantee {args.guarantee} is above --max-kv-bytes {args.max_kv_bytes}{per_rank}")
    return args.broker, args.tenant, priority, guarantee


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to ``host:port``; UsageError if it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_main(argv: Optional[list[str]] = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status (2: bad options)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        serve_parser(epilog=help_epilog()).print_help()
        return 0
    try:
        settings = resolve(argv)
        if settings.tensor_parallel_size > 1:  # under torchrun, ranks above 0 serve no HTTP
            from .tp_front import torchrun_rank, worker_main

            if torchrun_rank(settings) > 0:
                return worker_main(settings)
        sock = bind_socket(settings.host, settings.port)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    if not _is_loopback(settings.host) and settings.api_key is None:
        logging.getLogger(__name__).warning(
            "torch_elastic_kv serve: listening on %s without --api-key: anyone who can reach it can use it",
            settings.host,
        )
    from .server import run

    try:
        code = run(settings, sock)
    finally:
        sock.close()
    # The Engine is closed and its KV memory given back. What is left is the interpreter's
    # teardown, a last garbage collection over the model, the tokenizer and the request records
    # that holds SIGTERM's exit up for seconds on a loaded machine; a server has nothing else to
    # finalize, so the logs are flushed and the process ends here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
