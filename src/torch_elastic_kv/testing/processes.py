"""The package's own commands as subprocesses, for tests and benchmarks.

``ServerProcess`` runs ``python -m torch_elastic_kv serve --port 0 ...`` (a free loopback port
chosen by the kernel, read back from the "listening on" line) and keeps reading its stderr on a
thread so the pipe never fills; ``BrokerProcess`` runs ``python -m torch_elastic_kv broker``
with its log in a file; ``CommandProcess`` runs any other HTTP server command (another
project's server, for a benchmark's comparison), ready once its health route answers. All put
the source tree this package was imported from first on ``PYTHONPATH`` (the package under test,
not whatever an editable install points at) and are stopped by their pid: SIGTERM, then SIGKILL
if they do not exit in time (``tree=True``: and every process they started).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .proc import descendants

__all__ = ["BrokerProcess", "CommandProcess", "ServerProcess", "front_pids", "package_env"]

_SRC = Path(__file__).resolve().parents[2]  # the directory holding the torch_elastic_kv package
_LISTENING = re.compile(r"torch_elastic_kv serve: listening on (http://\S+)")


def package_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment with this package's source tree first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def front_pids(pid: int) -> list[int]:
    """The HTTP front processes (``serve --front process``) that server ``pid`` started."""
    out = []
    for child in descendants(pid):
        try:
            if b"torch_elastic_kv.serve.front_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            continue  # it ended meanwhile
    return out


class _Stoppable:
    proc: subprocess.Popen

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0, tree: bool = False) -> int:
        """SIGTERM, then wait; killed if it does not exit in ``timeout``. Returns the status.

        ``tree``: also SIGKILL, afterwards, the processes it had started (found through /proc
        before the SIGTERM) that are still there."""
        children = descendants(self.proc.pid) if tree and self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode


class ServerProcess(_Stoppable):
    """A server subprocess; ``url`` once it listens, ``lines`` its stderr so far.

    ``wait=False`` returns at once (start several, then ``wait_ready`` each); ``preexec_fn``
    runs in the child before it starts (a lower ``RLIMIT_NOFILE``, say)."""

    def __init__(
        self,
        args: list[str],
        env: Optional[dict[str, str]] = None,
        start_timeout: float = 180.0,
        wait: bool = True,
        preexec_fn: Optional[Callable[[], None]] = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch_elastic_kv", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=package_env(env),
            preexec_fn=preexec_fn,  # e.g. lower a resource limit in the child
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_ready(start_timeout)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited before listening

    def wait_ready(self, timeout: float) -> str:
        """The server's URL once it listens; RuntimeError (with its last log lines) if it
        exits or does not listen within ``timeout`` seconds (it is killed then)."""
        if not self._ready.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))
        return self.url

    def log(self) -> str:
        return "".join(self.lines)


class BrokerProcess(_Stoppable):
    """``python -m torch_elastic_kv broker --budget BUDGET --socket PATH [extra...]``, ready once
    its log says it listens; the log is in the file ``log_path``; ``preexec_fn`` runs in the
    child before it starts (a lower ``RLIMIT_NOFILE``, say)."""

    def __init__(
        self,
        socket_path: Path,
        budget: str | int,
        *extra: str,
        start_timeout: float = 30.0,
        preexec_fn: Optional[Callable[[], None]] = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        fd, log = tempfile.mkstemp(prefix="ekv-broker-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "w") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch_elastic_kv", "broker", "--budget", str(budget)]
                + ["--socket", str(self.socket_path), *extra],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=package_env(),
                preexec_fn=preexec_fn,  # e.g. lower a resource limit in the child
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while "listening on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the broker did not start (status {self.proc.returncode}):\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text()


class CommandProcess(_Stoppable):
    """``argv`` (any HTTP server) with its output in the file ``log_path``; ``wait_ready`` waits
    until ``GET url + health`` answers 200. ``env`` is added to :func:`package_env`'s."""

    def __init__(
        self,
        argv: list[str],
        url: str,
        log_path: Path,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[Path] = None,
    ) -> None:
        self.argv, self.url, self.log_path = list(argv), url, Path(log_path)
        with open(self.log_path, "w") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=package_env(env),
                cwd=cwd,
            )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float, health: str = "/health") -> str:
        """``url`` once ``health`` answers 200; RuntimeError (with its last log lines) if the
        process exits first or is not ready within ``timeout`` seconds (it is killed then)."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.argv[0]} exited with {self.proc.returncode} before it was ready:\n{self.tail()}"
                    )
                try:
                    if client.get(self.url + health).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"{self.argv[0]} not ready after {timeout:g} s:\n{self.tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of its log."""
        try:
            return "\n".join(self.log().splitlines()[-lines:])
        except OSError:
            return "(no log)"
