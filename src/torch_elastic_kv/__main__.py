"""``python -m torch_elastic_kv <command> ...``: the package's subcommands.

Each entry names the module and function that run it, imported only when chosen, so that
``--help`` and a mistyped command answer without loading torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# command -> (module, function taking argv and returning the exit status, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": (
        "torch_elastic_kv.bench.cli",
        "bench_main",
        "replay a trace through elastic, static, generate and continuous batching; compare memory and speed",
    ),
    "serve": (
        "torch_elastic_kv.serve.cli",
        "serve_main",
        "an OpenAI-compatible server (completions, chat, streaming, /metrics) whose KV memory follows its traffic",
    ),
    "broker": (
        "torch_elastic_kv.broker.cli",
        "broker_main",
        "share one device's KV memory budget between processes by priority and guarantee",
    ),
    "borrow": (
        "torch_elastic_kv.broker.borrow",
        "borrow_main",
        "borrow memory from the broker for any command: wait for the grant, run it, give the memory back",
    ),
    "top": ("torch_elastic_kv.broker.top", "top_main", "the broker's device budget and its tenants, live"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: python -m torch_elastic_kv <command> [options]   (<command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def command(name: str) -> Callable[[list[str]], int]:
    """The entry point of subcommand ``name``; KeyError if there is none."""
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        expected = ", ".join(repr(c) for c in COMMANDS)
        print(f"torch_elastic_kv: error: unknown command {argv[0]!r}; expected {expected}", file=sys.stderr)
        return 2
    return command(argv[0])(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
