"""``python -m torch_elastic_kv broker``: run the memory broker of one device."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from typing import Optional

from .._units import SIZE_HELP, parse_size
from .daemon import Broker, default_max_connections
from .protocol import MAX_MESSAGE_BYTES

__all__ = ["broker_main"]

_DEVICE = re.compile(r"cpu|cuda:\d+")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_elastic_kv broker",
        description="Share one device's KV memory budget between processes by priority and guarantee.",
        epilog=SIZE_HELP,
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--budget", required=True, help="the device's KV budget in bytes (4096, 512Mi, 2GiB, 8GB)")
    p.add_argument("--socket", default=None, help="Unix socket path (default: a per-user directory, mode 0700)")
    p.add_argument("--reclaim-seconds", type=float, default=5.0, help="deadline given with a reclaim (default 5)")
    p.add_argument(
        "--heartbeat-timeout", type=float, default=5.0, help="disconnect a tenant silent this long (default 5)"
    )
    p.add_argument(
        "--register-timeout",
        type=float,
        default=5.0,
        help="close a connection that has not registered after this many seconds (default 5)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="refuse new connections beyond this many open ones "
        f"(default min(1024, soft RLIMIT_NOFILE - 64): {default_max_connections()} here)",
    )
    p.add_argument(
        "--max-output-bytes",
        default="1M",
        help=f"drop a peer with more replies than this unread (default 1M, at least {MAX_MESSAGE_BYTES})",
    )
    p.add_argument(
        "--write-timeout",
        type=float,
        default=5.0,
        help="drop a peer that leaves its replies unread this many seconds (default 5)",
    )
    return p


def broker_main(argv: Optional[list[str]] = None) -> int:
    """Entry point: validate the options, then serve until SIGTERM/SIGINT; returns the exit status."""
    p = _parser()
    args = p.parse_args(argv)
    if not _DEVICE.fullmatch(args.device):
        p.error(f"--device must be cpu or cuda:N, got {args.device!r}")
    try:
        budget = parse_size(args.budget)
    except ValueError as e:
        p.error(f"--budget: {e}")
    if budget <= 0:
        p.error(f"--budget must be > 0, got {args.budget!r}")
    for opt in ("reclaim_seconds", "heartbeat_timeout", "register_timeout", "write_timeout"):
        if not getattr(args, opt) > 0:
            p.error(f"--{opt.replace('_', '-')} must be > 0, got {getattr(args, opt)}")
    if args.max_connections is not None and args.max_connections < 1:
        p.error(f"--max-connections must be >= 1, got {args.max_connections}")
    try:
        max_output = parse_size(args.max_output_bytes)
    except ValueError as e:
        p.error(f"--max-output-bytes: {e}")
    if max_output < MAX_MESSAGE_BYTES:
        p.error(f"--max-output-bytes must be at least {MAX_MESSAGE_BYTES} (one message), got {args.max_output_bytes!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    broker = Broker(
        budget,
        device=args.device,
        socket_path=args.socket,
        reclaim_seconds=args.reclaim_seconds,
        heartbeat_timeout=args.heartbeat_timeout,
        register_timeout=args.register_timeout,
        max_connections=args.max_connections,
        max_output_bytes=max_output,
        write_timeout=args.write_timeout,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, broker.stop)
        await broker.run()

    try:
        asyncio.run(main())
    except (RuntimeError, PermissionError, OSError) as e:
        print(f"torch_elastic_kv broker: error: {e}", file=sys.stderr)
        return 1
    return 0
