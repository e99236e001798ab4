"""``python -m torch_elastic_kv borrow``: run a command on memory borrowed from the broker.

``borrow --broker SOCKET --bytes SIZE [--name NAME] [--priority P] [--timeout S] -- COMMAND
[ARGS...]`` registers as a borrower (``BrokerClient.borrow``), waits until the broker grants
all of SIZE, runs COMMAND with ``EKV_LEASE_BYTES`` (the lease) and ``EKV_BROKER_SOCKET`` in its
environment, keeps the lease while COMMAND runs, and leaves the broker (the lease is free at
once) when COMMAND exits. Exit status: COMMAND's (128 + N if a signal N ended it); 2 for bad
options; 124 when no grant came within ``--timeout`` (as timeout(1) does); 1 when the broker
cannot be reached or refuses; 126/127 when COMMAND cannot be run / is not found; 128 + N if
signal N ended the wait for the grant.

COMMAND runs in its own process group, so that a signal reaches it once: SIGTERM, SIGINT and
SIGHUP sent to ``borrow`` (a Ctrl-C at its terminal included) are forwarded to COMMAND, and
``borrow`` releases the lease when COMMAND has exited. (Being outside the terminal's foreground
group, COMMAND cannot read from the terminal.) If ``borrow`` itself is killed, the kernel kills
COMMAND too (``PR_SET_PDEATHSIG``), and the broker frees the lease once the process is gone:
no memory stays in use that the broker counts as free.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional

from .._units import parse_size
from .client import BrokerClient, BrokerUnavailable

__all__ = ["EXIT_NO_GRANT", "borrow_main"]

PROG = "torch_elastic_kv borrow"
EXIT_NO_GRANT = 124  # timeout(1)'s status when its time ran out
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_log = logging.getLogger(__name__)

# Runs between fork and COMMAND's exec: asks the kernel to kill COMMAND if borrow dies (its
# lease would then be freed while COMMAND still used the memory), and undoes the signal
# dispositions this interpreter set at startup, which an exec would keep (ignored SIGPIPE).
_EXEC = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(128 + signal.SIGKILL)  # borrow died before the line above took effect
for sig in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write(f"torch_elastic_kv borrow: error: cannot run {sys.argv[2]!r}: {e.strerror}\\n")
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""


class UsageError(Exception):
    """A bad option; the message is the one line printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class _Interrupted(BaseException):
    """A signal ended the wait for the grant (BaseException: nothing on the way catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m torch_elastic_kv borrow",
        usage="%(prog)s --broker SOCKET --bytes SIZE [options] -- COMMAND [ARGS...]",
        description="Borrow SIZE bytes of the device's memory budget from the broker, run COMMAND while "
        "holding them (EKV_LEASE_BYTES in its environment), give them back when it exits.",
        epilog=f"Exit status: COMMAND's (128+N if signal N ended it); 2 bad options; {EXIT_NO_GRANT} no grant "
        "within --timeout; 1 broker unreachable or refusing; 126/127 COMMAND not runnable / not found.",
    )
    p.add_argument("--broker", required=True, metavar="SOCKET", help="the broker's Unix socket")
    p.add_argument("--bytes", required=True, metavar="SIZE", help="bytes to borrow, all or nothing (4096, 512M, 2GiB)")
    p.add_argument("--name", default=None, help="tenant name at the broker (default borrow-PID)")
    p.add_argument(
        "--priority", default="0", metavar="P", help="priority at the broker; higher wins under contention (default 0)"
    )
    p.add_argument(
        "--timeout",
        default="60",
        metavar="S",
        help=f"seconds to wait for the grant before giving up with status {EXIT_NO_GRANT} (default 60)",
    )
    return p


def _options(argv: list[str]) -> tuple[argparse.Namespace, int, int, float, list[str]]:
    """(args, bytes, priority, timeout, command); UsageError on a bad option."""
    if "--" in argv:
        cut = argv.index("--")
        opts, command = argv[:cut], argv[cut + 1 :]
    else:
        opts, command = argv, []
    p = _parser()
    args = p.parse_args(opts)
    if not command:
        raise UsageError("missing '-- COMMAND [ARGS...]': the command to run on the borrowed memory")
    try:
        nbytes = parse_size(args.bytes)
    except ValueError as e:
        raise UsageError(f"--bytes: {e}") from None
    if not 0 < nbytes < 2**63:
        raise UsageError(f"--bytes must be > 0, got {args.bytes!r}")
    try:
        priority = int(args.priority)
    except ValueError:
        raise UsageError(f"--priority must be an integer, got {args.priority!r}") from None
    if not -(2**31) <= priority < 2**31:
        raise UsageError(f"--priority must be within a 32-bit integer, got {args.priority!r}")
    try:
        timeout = float(args.timeout)
    except ValueError:
        raise UsageError(f"--timeout must be a number of seconds, got {args.timeout!r}") from None
    if not (timeout > 0 and math.isfinite(timeout)):
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout!r}")
    if args.name is not None and not (0 < len(args.name) <= 64 and args.name.isprintable()):
        raise UsageError(f"--name must be 1-64 printable characters, got {args.name!r}")
    return args, nbytes, priority, timeout, command


def _status(returncode: int) -> int:
    """A shell's exit status for a child's: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def borrow_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m torch_elastic_kv borrow``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, nbytes, priority, timeout, command = _options(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    _log.setLevel(logging.INFO)
    socket_path = Path(args.broker).absolute()
    name = args.name or f"borrow-{os.getpid()}"
    child: Optional[subprocess.Popen] = None

    def on_signal(signum: int, frame: Optional[types.FrameType]) -> None:
        if child is None:
            raise _Interrupted(signum)
        child.send_signal(signum)  # COMMAND decides; the lease goes when it has exited

    previous = {sig: signal.signal(sig, on_signal) for sig in _FORWARDED}
    try:
        client = BrokerClient(socket_path, name, priority=priority)
        with client.borrow(nbytes, timeout=timeout) as lease:
            _log.info(
                "%s: %r granted %d bytes after %.3f s; running %s",
                PROG,
                name,
                nbytes,
                lease.waited_seconds,
                command[0],
            )
            env = dict(os.environ, EKV_LEASE_BYTES=str(nbytes), EKV_BROKER_SOCKET=str(socket_path))
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _EXEC, str(os.getpid()), *command], env=env, process_group=0
            )
            returncode = child.wait()
        _log.info("%s: %r gave back %d bytes; %s exited with %d", PROG, name, nbytes, command[0], returncode)
        return _status(returncode)
    except TimeoutError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_NO_GRANT
    except BrokerUnavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except _Interrupted as e:
        print(f"{PROG}: {signal.Signals(e.signum).name} while waiting for the grant; nothing borrowed", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
