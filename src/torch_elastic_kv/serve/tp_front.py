"""``serve --tensor-parallel-size N``: the server process is rank 0 of the group.

Two ways to start a group, one behaviour once it runs (``docs/TENSOR_PARALLEL.md``):

* ``serve --tensor-parallel-size N``: this process is rank 0; it starts ranks 1..N-1 as child
  processes (``python -m torch_elastic_kv.serve.tp_front``, the same settings, a gloo store on
  a free 127.0.0.1 port), which die with it (``PR_SET_PDEATHSIG``). A watcher thread polls
  them: when one exits, rank 0 logs one line naming it, kills the others, answers every HTTP
  request in flight with an error (a 503, or an error event on a stream) and exits 1, within
  ``WATCH_SECONDS`` + ``ANSWER_SECONDS`` + ``REAP_SECONDS`` (about 4 s; usually well under 1 s).
* ``torchrun --nproc-per-node N -m torch_elastic_kv serve --tensor-parallel-size N``: every
  process runs ``serve``; rank 0 (``$RANK``) serves HTTP, the others follow; torchrun's agent
  takes the group down when one exits.

Either way a collective that fails on rank 0 (a rank died or hung past ``--tp-timeout``) is
fatal: one line, exit 1. Only rank 0 talks HTTP; every other rank applies rank 0's plans
(``parallel/tp_engine.py``).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from .._util import die_with_parent
from ..parallel.devices import rank_device, torchrun_local
from ..parallel.tp_engine import TensorParallelEngine, TensorParallelGroup, build_rank_engine, follow
from .settings import ServeSettings

_log = logging.getLogger(__name__)

__all__ = ["ANSWER_SECONDS", "WATCH_SECONDS", "rank_settings", "start_group", "torchrun_rank", "worker_main"]

WATCH_SECONDS = 0.2  # how often rank 0 looks at the ranks it started
NAME_SECONDS = 1.0  # after a failed collective, how long rank 0 waits for a child's exit to name it
ANSWER_SECONDS = 2.0  # how long a group going down waits for the answers to requests in flight
REAP_SECONDS = 2.0  # ... and for the other ranks, SIGKILLed, to be gone
_SETTINGS_ENV = "EKV_TP_SETTINGS"  # the child ranks' settings (pickled, base64)
_RANK_ENV = "EKV_TP_RANK"
_INIT_ENV = "EKV_TP_INIT"


def torchrun_rank(settings: ServeSettings) -> int:
    """This process's rank under torchrun (``$RANK``, ``$WORLD_SIZE``); 0 when not under it.
    ``$WORLD_SIZE`` must equal ``--tensor-parallel-size``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0
    world = int(os.environ["WORLD_SIZE"])
    if world != settings.tensor_parallel_size:
        from .settings import UsageError

        raise UsageError(
            f"--tensor-parallel-size {settings.tensor_parallel_size} but torchrun started {world} processes"
        )
    return int(os.environ["RANK"])


def rank_settings(settings: ServeSettings, rank: int) -> ServeSettings:
    """``settings`` with this rank's own device: "cpu" stays; "cuda" becomes ``cuda:RANK``, or
    ``cuda:$LOCAL_RANK`` under torchrun (``parallel.devices.rank_device``; its ``DeviceError``
    when this machine has too few GPUs, which ``serve``'s option check reports first)."""
    import torch

    kind = settings.device.partition(":")[0]  # the options' check refused an index already
    cuda = kind == "cuda" and torch.cuda.is_available()
    local_rank, local_world = torchrun_local(os.environ) if "RANK" in os.environ else (None, None)
    device = rank_device(
        kind,
        rank,
        settings.tensor_parallel_size,
        torch.cuda.device_count() if cuda else 0,
        local_rank,
        local_world,
    )
    return dataclasses.replace(settings, device=device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_FATAL = threading.Lock()  # one line, from whichever thread learns it first


class _GroupDown:
    """How rank 0 takes the group down, from whichever thread learns it first (the watcher, a
    collective that failed on the engine thread, the ticker): one line, the other ranks killed
    by pid, every HTTP request in flight answered with an error (``before_exit``, at most
    ``ANSWER_SECONDS``), exit 1. There is no drain: the group cannot step any more."""

    def __init__(self, children: dict[int, subprocess.Popen]) -> None:
        self.children = children
        # set by the server (``_FrontEngine.on_down``): answer the requests in flight, bounded
        self.before_exit: Optional[Callable[[str], None]] = None

    def fatal(self, message: str) -> None:
        """Never returns: the process exits 1 (a second caller waits for the first's exit)."""
        if not _FATAL.acquire(blocking=False):
            time.sleep(3600)  # the other thread is exiting the process
        _log.error("torch_elastic_kv serve: %s; exiting", message)
        for child in self.children.values():
            if child.poll() is None:
                child.kill()
        if self.before_exit is not None:
            try:
                self.before_exit(message)
            except Exception:
                _log.exception("tensor parallel: answering the requests in flight failed")
        deadline = time.monotonic() + REAP_SECONDS
        for child in self.children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        logging.shutdown()
        os._exit(1)


def _exited(children: dict[int, subprocess.Popen]) -> Optional[str]:
    """ "tensor-parallel rank R (pid P) <how>; the group is down" for the first child that
    exited, or None."""
    for rank, child in children.items():
        code = child.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            return f"tensor-parallel rank {rank} (pid {child.pid}) {how}; the group is down"
    return None


def _watch(down: _GroupDown, closing: threading.Event) -> None:
    """Rank 0's watcher: the first child rank to exit takes the group down (unless rank 0 is
    closing the group itself: then they exit as told)."""
    while not closing.is_set():
        message = _exited(down.children)
        if message is not None and not closing.is_set():
            down.fatal(message)
        time.sleep(WATCH_SECONDS)


def start_group(settings: ServeSettings, model: Any) -> TensorParallelEngine:
    """Rank 0: start (or, under torchrun, join) the group, split ``model`` and build this
    rank's Engine; returns the group's engine, which the server uses as its Engine."""
    from .server import engine_options, kv_ceiling

    world = settings.tensor_parallel_size
    children: dict[int, subprocess.Popen] = {}
    closing = threading.Event()
    down = _GroupDown(children)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        init = "env://"
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = dict(os.environ)
        env[_SETTINGS_ENV] = base64.b64encode(pickle.dumps(settings)).decode()
        env[_INIT_ENV] = init
        for rank in range(1, world):
            env[_RANK_ENV] = str(rank)
            children[rank] = subprocess.Popen(
                [sys.executable, "-m", "torch_elastic_kv.serve.tp_front"],
                env=env,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # before exec: no window where rank 0 is gone unseen
            )
        _log.info(
            "torch_elastic_kv serve: tensor parallel over %d ranks; started ranks %s",
            world,
            ", ".join(f"{r} (pid {c.pid})" for r, c in children.items()),
        )
        threading.Thread(target=_watch, args=(down, closing), name="ekv-tp-watch", daemon=True).start()
    try:
        # the model is on settings.device already ("cuda" is cuda:0, rank 0's GPU); the
        # children get the unresolved settings and resolve their own
        group = TensorParallelGroup.init(0, world, init, settings.tp_timeout, rank_settings(settings, 0).device)
        policy_kwargs, engine_kwargs = engine_options(settings, model)
        policy_kwargs.pop("max_bytes")
        engine, clock, guards = build_rank_engine(
            model, group, policy_kwargs, engine_kwargs, ceiling=lambda m: kv_ceiling(settings, m)
        )
    except BaseException:
        for child in children.values():
            child.kill()
        raise

    def broken(message: str) -> None:
        # a dead rank usually breaks a collective before the watcher looks: name it if it exited
        deadline = time.monotonic() + NAME_SECONDS
        exited = _exited(children)
        while exited is None and children and time.monotonic() < deadline:
            time.sleep(WATCH_SECONDS / 4)
            exited = _exited(children)
        down.fatal(exited or f"the tensor-parallel group is down ({message})")

    front = _FrontEngine(engine, clock, guards, group, on_broken=broken, closing=closing, down=down)
    if settings.broker is not None:  # the group is one tenant: rank 0 holds its lease
        from .server import broker_client

        client = broker_client(settings)
        try:
            front.attach_broker(client)
        except BaseException:
            front.close()
            raise
    return front


class _FrontEngine(TensorParallelEngine):
    """The group's engine in a server that started the other ranks: closing it tells the
    watcher first, then waits for them to exit."""

    def __init__(self, *args: Any, closing: threading.Event, down: _GroupDown, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._closing = closing
        self._down = down

    def on_down(self, answer: Callable[[str], None]) -> None:
        """``answer(message)`` runs when the group goes down, before the process exits: the
        server answers every request in flight with an error there (it returns within its own
        bound; ``ANSWER_SECONDS`` is the one the server uses)."""
        self._down.before_exit = answer

    def close(self) -> None:
        self._closing.set()
        super().close()
        for child in self._down.children.values():
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def worker_main(settings: Optional[ServeSettings] = None) -> int:
    """A rank above 0: load the model, split it, apply rank 0's plans until it stops (0) or
    the group breaks (1)."""
    from .server import engine_options, kv_ceiling, load_model

    if settings is None:
        settings = pickle.loads(base64.b64decode(os.environ[_SETTINGS_ENV]))
        rank, init = int(os.environ[_RANK_ENV]), os.environ[_INIT_ENV]
    else:
        rank, init = int(os.environ["RANK"]), "env://"
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"[rank {rank}] %(message)s", stream=sys.stderr, force=True
    )
    # a terminal's Ctrl-C reaches every process of the group: rank 0 drains, then stops the
    # others with its own plan (a child started by rank 0 also dies with it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = rank_settings(settings, rank)  # this rank's own GPU on CUDA
    group = TensorParallelGroup.init(rank, settings.tensor_parallel_size, init, settings.tp_timeout, settings.device)
    model, _, _ = load_model(settings)
    policy_kwargs, engine_kwargs = engine_options(settings, model)
    policy_kwargs.pop("max_bytes")
    engine, clock, guards = build_rank_engine(
        model, group, policy_kwargs, engine_kwargs, ceiling=lambda m: kv_ceiling(settings, m)
    )
    code = follow(engine, clock, guards, group)
    if code != 0:
        # the group broke inside a collective: its threads may still wait in it, and tearing them
        # down at interpreter exit aborts (std::terminate, signal 6) instead of exiting 1
        logging.shutdown()
        os._exit(code)
    group.close()
    return code


if __name__ == "__main__":
    sys.exit(worker_main())
