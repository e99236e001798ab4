#!/usr/bin/env python
"""One prepared GPU check of torch_elastic_kv: the CUDA path proven on a real device in one run.

    python benchmarks/gpu_check.py --out gpu_out            # full run, < 8 min on one H200
    python benchmarks/gpu_check.py --out gpu_out --quick    # < 3 min
    python benchmarks/gpu_check.py --out gpu_out --dry-run --quick --no-build   # CPU + fake driver

Steps, each guarded (a failing step records its error in the json and the rest still run):

1. ``build``: ``pip install -e . --no-build-isolation --no-deps`` (no network needed), then
   ``gpu_tests``: ``pytest tests/gpu`` with pass/fail/skip counts;
2. ``driver``: per-handle cost of each driver VMM call (reserve, create, map, set-access,
   unmap, release) through the cuda backend's own function table (``_C.probe_driver``);
   ``arena``: grow/shrink latency of an Arena with and without handle reuse, plus a
   write/read-back through a torch view of the mapped memory; ``map_range``: one map of a
   multi-granule range with one cuMemSetAccess per granule (the old call pattern) vs one per
   run, created and reused handles (set-access calls and time per granule);
3. ``allocator``: malloc+free pairs/s through the C ABI and through torch (``mem_pool``)
   against torch's caching allocator; ``trim()`` of 8 GiB freed memory;
4. ``engine``: a 1B-class Llama (random weights, bfloat16) on the Engine with an elastic and
   a static pool (static, elastic, elastic, static), same bursty workload: tokens/s, TTFT/TPOT p50/p99, resident bytes over time,
   idle footprint vs its floor, device free memory (``torch.cuda.mem_get_info``) before,
   during and after, to show the memory went back to the driver;
   ``split``: where a decode-heavy run's step time goes (schedule, pack, forward synchronized,
   sample, postprocess, memory), eager and, on a GPU, with ``Engine(compile=True)``;
   ``stream_order``: an unmap while a kernel still writes the memory waits for it (run last:
   if it were wrong, the device context would not survive it);
5. a short table (printed last); ``gpu_results.json`` (everything) and ``gpu_results.md`` (the
   table for benchmarks/RESULTS.md, with date and device) in ``--out``.

``--dry-run`` runs every step it can on CPU: the driver, arena and allocator steps go through
the fake CUDA driver (``$EKV_LIBCUDA``, set here when unset), the engine runs a tiny model on
CPU. It is what tests/test_gpu_check.py runs, so the script cannot rot without CI noticing.
Exit status: 0 when no step failed (a component that is not there is "unavailable", not a
failure), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30

# Public measurements on A100s (per 2 MiB granule), the floors the issue reports against.
A100_US = {"create": 193.0, "map": 1.5, "set_access": 36.0, "unmap": 26.0}
TOKENS_PER_S_TOLERANCE = 0.02  # elastic decode tokens/s within 2 % of static
ENGINE_ORDER = ("static", "elastic", "elastic", "static")


class Unavailable(Exception):
    """A component the step needs is not in this build (not landed yet, or not on this machine)."""


class StepFailed(Exception):
    """A step that ran and measured, but whose result is a failure; ``data`` is kept."""

    def __init__(self, message: str, data: dict) -> None:
        super().__init__(message)
        self.data = data


# ---------------------------------------------------------------------------------- settings --
@dataclass(frozen=True)
class Workload:
    """The engine workload: identical for the elastic and the static pool."""

    requests: int
    prompt_tokens: tuple[int, int]  # uniform range, inclusive
    new_tokens: tuple[int, int]
    bursts: int  # requests arrive in this many bursts with idle gaps
    pool_bytes: int  # max_bytes of both pools (static: all mapped at start)
    min_bytes: int  # the elastic pool's floor
    idle_seconds: float  # the elastic policy's hysteresis
    max_batch_tokens: int
    run_limit_s: float  # per engine run; past it, what is left is cancelled


@dataclass(frozen=True)
class Settings:
    mode: str  # "full", "quick", "dry-run", "dry-run-quick"
    dry_run: bool
    device: str  # "cuda:N" (real or fake driver)
    engine_device: str  # "cuda:N", or "cpu" in a dry run
    probe_granules: int
    probe_large_handles: int  # second probe: handles of 16 granules
    arena_bytes: int
    arena_rounds: int
    alloc_pairs: int
    trim_bytes: int
    tests_timeout_s: float
    budget_s: float  # no step starts past it (skipped = failed): the run
    # stays inside a 10-minute device command
    workload: Workload


def make_settings(dry_run: bool, quick: bool, device_index: int) -> Settings:
    dev = f"cuda:{device_index}"
    if dry_run:
        # KV of 8 KiB per token (see build_model): the elastic pool grows a few 2 MiB chunks
        # past its 1 MiB floor (one chunk once rounded) and must come back to it
        wl = Workload(
            requests=6,
            prompt_tokens=(48, 128),
            new_tokens=(4, 12),
            bursts=2,
            pool_bytes=32 * MiB,
            min_bytes=1 * MiB,
            idle_seconds=0.2,
            max_batch_tokens=128,
            run_limit_s=20.0,
        )
        return Settings(
            "dry-run-quick" if quick else "dry-run",
            True,
            dev,
            "cpu",
            probe_granules=8,
            probe_large_handles=2,
            arena_bytes=16 * MiB,
            arena_rounds=5,
            alloc_pairs=1000,
            trim_bytes=64 * MiB,
            tests_timeout_s=120.0,
            budget_s=170.0 if quick else 450.0,
            workload=wl,
        )
    if quick:
        wl = Workload(
            requests=24,
            prompt_tokens=(32, 256),
            new_tokens=(16, 96),
            bursts=2,
            pool_bytes=2 * GiB,
            min_bytes=64 * MiB,
            idle_seconds=0.5,
            max_batch_tokens=2048,
            run_limit_s=40.0,
        )
        return Settings(
            "quick",
            False,
            dev,
            dev,
            probe_granules=128,
            probe_large_handles=16,
            arena_bytes=256 * MiB,
            arena_rounds=3,
            alloc_pairs=5000,
            trim_bytes=2 * GiB,
            tests_timeout_s=90.0,
            budget_s=240.0,
            workload=wl,
        )
    wl = Workload(
        requests=64,
        prompt_tokens=(64, 512),
        new_tokens=(32, 256),
        bursts=2,
        pool_bytes=4 * GiB,
        min_bytes=128 * MiB,
        idle_seconds=1.0,
        max_batch_tokens=2048,
        run_limit_s=90.0,
    )
    return Settings(
        "full",
        False,
        dev,
        dev,
        probe_granules=256,
        probe_large_handles=32,
        arena_bytes=1 * GiB,
        arena_rounds=5,
        alloc_pairs=20000,
        trim_bytes=8 * GiB,
        tests_timeout_s=180.0,
        budget_s=480.0,
        workload=wl,
    )


# ---------------------------------------------------------------------------------- helpers --
def summary(values: list[float]) -> dict[str, float]:
    """median / p90 / p99 / mean / min / max / n (torch_elastic_kv.bench.stats; an empty list: n = 0)."""
    from torch_elastic_kv.bench.stats import summary as _summary

    return _summary(values)


def cuda_real() -> bool:
    """A real CUDA device is in use (a dry run hides every device from torch first)."""
    return torch.cuda.is_available()


def rss_shmem() -> Optional[int]:
    """This process's resident shared memory (where the host backend's memfd pages count)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_free(device: str) -> Optional[int]:
    """Device free bytes from torch.cuda.mem_get_info, or None off a real GPU."""
    if not device.startswith("cuda") or not cuda_real():
        return None
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def synchronize(device: str) -> None:
    if device.startswith("cuda") and cuda_real():
        torch.cuda.synchronize(torch.device(device))


def downsample(points: list[Any], n: int = 200) -> list[Any]:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


# ---------------------------------------------------------------------------------- step 1 ---
def step_build(s: Settings, args: argparse.Namespace) -> dict:
    if args.no_build:
        return {"skipped": "--no-build"}
    out: dict[str, Any] = {}
    cmds = [
        [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "-q"],
        [sys.executable, "setup.py", "build_ext", "--inplace"],
    ]
    for cmd in cmds:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
        out.setdefault("attempts", []).append(
            {
                "command": " ".join(cmd[1:]),
                "returncode": p.returncode,
                "seconds": round(time.perf_counter() - t0, 1),
                "log_tail": (p.stdout + p.stderr)[-1500:],
            }
        )
        if p.returncode == 0:
            out["built_with"] = " ".join(cmd[1:])
            return out
    raise RuntimeError(f"build failed: {out['attempts'][-1]['log_tail'][-600:]}")


def step_gpu_tests(s: Settings, args: argparse.Namespace) -> dict:
    gpu_dir = ROOT / "tests" / "gpu"
    files = sorted(p.name for p in gpu_dir.glob("test_*.py")) if gpu_dir.is_dir() else []
    if not files:
        raise Unavailable("tests/gpu holds no test files yet")
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        raise Unavailable("pytest is not installed here (pip install pytest)")
    xml = Path(args.out).resolve() / "gpu_tests.xml"
    env = dict(os.environ)
    if not s.dry_run:
        env.pop("EKV_LIBCUDA", None)  # the real driver
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={xml}"]
    t0 = time.perf_counter()
    # own session: on a timeout the whole group goes (the tests start subprocesses of their own)
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = p.communicate(timeout=s.tests_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        raise StepFailed(
            f"pytest tests/gpu ran past {s.tests_timeout_s:.0f} s and was stopped", {"log_tail": (log or "")[-2000:]}
        ) from None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if xml.exists():
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for k in counts:
                counts[k] += int(suite.get(k, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out = {
        "files": files,
        **counts,
        "failed_tests": failed,
        "returncode": p.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "log_tail": log[-2000:],
    }
    if p.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        raise StepFailed(
            f"pytest tests/gpu: {counts['failures']} failed, {counts['errors']} errors (returncode {p.returncode})", out
        )
    return out


# ---------------------------------------------------------------------------------- step 2 ---
def step_driver(s: Settings, args: argparse.Namespace) -> dict:
    from torch_elastic_kv import _C

    if not hasattr(_C, "probe_driver"):
        raise Unavailable("this build of torch_elastic_kv._C has no probe_driver (csrc/core/driver_probe.cpp)")
    index = torch.device(s.device).index
    if cuda_real():
        torch.cuda.init()  # the primary context exists, as it will when torch runs kernels
    out: dict[str, Any] = {}
    for name, granules, per_handle in (("granule", s.probe_granules, 1), ("large", s.probe_large_handles, 16)):
        r = _C.probe_driver(index, granules, per_handle, 8)
        res = {
            k: r[k]
            for k in (
                "library",
                "is_fake",
                "driver_version",
                "granularity",
                "recommended_granularity",
                "handle_bytes",
                "range_bytes",
            )
        }
        for call in ("reserve", "address_free", "create", "map", "set_access", "unmap", "release"):
            res[f"{call}_us"] = summary(r[f"{call}_us"])
        for call in ("create", "record", "query", "destroy"):
            if f"event_{call}_us" in r:  # builds before the event probe lack them
                res[f"event_{call}_us"] = summary(r[f"event_{call}_us"])
        res["set_access_range_us"] = r["set_access_range_us"]
        # per 2 MiB, the unit of the A100 floors
        per_2mib = (2 * MiB) / r["handle_bytes"]
        res["per_2mib_us"] = {
            c: res[f"{c}_us"]["median"] * per_2mib for c in ("create", "map", "set_access", "unmap", "release")
        }
        out[name] = res
    return out


def step_arena(s: Settings, args: argparse.Namespace) -> dict:
    from torch_elastic_kv import Arena

    out: dict[str, Any] = {}
    for reuse in (True, False):
        arena = Arena(s.arena_bytes, s.device, reuse_bytes=s.arena_bytes if reuse else 0)
        try:
            cap, gran = arena.capacity, arena.granularity
            granules = cap // gran
            grow, unmap_call, finish = [], [], []
            for _ in range(s.arena_rounds + 1):  # the first round creates every handle
                t0 = time.perf_counter()
                arena.map(0, cap)
                grow.append(time.perf_counter() - t0)
                synchronize(s.device)
                t0 = time.perf_counter()
                arena.unmap(0, cap)
                unmap_call.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                if reuse:
                    # the driver unmap done, handles in the cache (a map now would only revive)
                    deadline = time.monotonic() + 10
                    while arena.stats()["pending_bytes"] and time.monotonic() < deadline:
                        arena.poll()
                else:
                    arena.trim(wait=True)
                finish.append(time.perf_counter() - t0)
            st = arena.stats()
            key = "reuse" if reuse else "no_reuse"
            steady = slice(1, None)
            out[key] = {
                "granularity": gran,
                "granules": granules,
                "rounds": s.arena_rounds,
                "grow_us_per_granule": summary([t / granules * 1e6 for t in grow[steady]]),
                "first_grow_us_per_granule": grow[0] / granules * 1e6,
                "unmap_call_us_per_granule": summary([t / granules * 1e6 for t in unmap_call[steady]]),
                "shrink_finish_us_per_granule": summary([t / granules * 1e6 for t in finish[steady]]),
                "grow_gib_per_s": cap / statistics.median(grow[steady]) / GiB,
                "creates": st["creates"],
                "reuses": st["reuses"],
                "releases": st["releases"],
                "held_bytes_after": st["held_bytes"],
            }
            if reuse:
                out["reuse"]["verified_bytes"] = _check_view(arena, s.device)
        finally:
            arena.close()
    r, n = out["reuse"], out["no_reuse"]
    out["reuse_over_create"] = r["grow_us_per_granule"]["median"] / n["grow_us_per_granule"]["median"]
    if r["creates"] != r["granules"]:
        raise StepFailed(
            f"handle reuse: {r['creates']} creates for {r['granules']} granules over "
            f"{s.arena_rounds + 1} grows (expected one per granule)",
            out,
        )
    return out


def _check_view(arena: Any, device: str) -> int:
    """Map, write through a tensor view, read back; returns the bytes verified."""
    nbytes = min(arena.capacity, 64 * MiB)
    arena.map(0, nbytes)
    try:
        n = nbytes // 4
        if arena.backend == "cuda(fake)":
            view = arena.host_view(torch.float32, (n,))
        else:
            view = arena.view(torch.float32, (n,))
        view.copy_(torch.arange(n, dtype=torch.float32, device=view.device))
        synchronize(device)
        ok = bool(torch.equal(view.cpu(), torch.arange(n, dtype=torch.float32)))
        if not ok:
            raise RuntimeError("data written through the arena view did not read back")
        del view
    finally:
        synchronize(device)
        arena.unmap(0, nbytes)
        arena.trim(wait=True)
    return nbytes


# ---------------------------------------------------------------------------------- step 2a --
def step_map_range(s: Settings, args: argparse.Namespace) -> dict:
    """One map of a multi-granule range: one cuMemSetAccess per granule (one-granule maps, the
    arena's old call pattern) vs one per run (Backend::map_range), with created and with
    reused handles; then a torch write/read-back through a range mapped as one run."""
    from torch_elastic_kv import Arena

    fake = None
    if not cuda_real():
        from torch_elastic_kv.testing import FakeCuda

        fake = FakeCuda(os.environ.get("EKV_LIBCUDA"))
    out: dict[str, Any] = {}
    for reuse in (False, True):
        arena = Arena(s.arena_bytes, s.device, reuse_bytes=s.arena_bytes if reuse else 0)
        try:
            cap, gran = arena.capacity, arena.granularity
            granules = cap // gran
            for per_run in (False, True):
                times, calls = [], []
                for r in range(s.arena_rounds + 1):  # round 0 fills the cache (reuse)
                    before = fake.calls("cuMemSetAccess") if fake else 0
                    t0 = time.perf_counter()
                    if per_run:
                        arena.map(0, cap)
                    else:
                        for k in range(granules):
                            arena.map(k * gran, gran)
                    dt = time.perf_counter() - t0
                    if r > 0:
                        times.append(dt / granules * 1e6)
                        if fake:
                            calls.append(fake.calls("cuMemSetAccess") - before)
                    synchronize(s.device)
                    arena.unmap(0, cap)
                    if reuse:  # the driver unmaps done, handles cached
                        deadline = time.monotonic() + 10
                        while arena.stats()["pending_bytes"] and time.monotonic() < deadline:
                            arena.poll()
                    else:
                        arena.trim(wait=True)
                key = f"{'reused' if reuse else 'created'}_{'per_run' if per_run else 'per_granule'}"
                out[key] = {
                    "granules": granules,
                    "us_per_granule": summary(times),
                    # counted by the fake driver; on a GPU, by construction: one per map call
                    "set_access_calls": statistics.median(calls) if calls else (1 if per_run else granules),
                    "set_access_counted": fake is not None,
                }
            if reuse:
                out["verified_bytes"] = _check_view(arena, s.device)  # one run, one access call
        finally:
            arena.close()
    for h in ("created", "reused"):
        out[f"{h}_saved_us_per_granule"] = (
            out[f"{h}_per_granule"]["us_per_granule"]["median"] - out[f"{h}_per_run"]["us_per_granule"]["median"]
        )
    if fake and out["reused_per_run"]["set_access_calls"] != 1:
        raise StepFailed(f"a one-range map made {out['reused_per_run']['set_access_calls']} cuMemSetAccess calls", out)
    return out


def _map_range_rows(st: dict) -> list[list[str]]:
    r = st.get("map_range", {})
    if r.get("status") != "ok":
        return [["map_range (set-access per run)", r.get("status", "not run"), "-", (r.get("error") or "-")[:60]]]
    rows = []
    for h in ("created", "reused"):
        g, run = r[f"{h}_per_granule"], r[f"{h}_per_run"]
        rows.append(
            [
                f"map {g['granules']} granules, {h} handles: set-access per granule / per run",
                f"{_fmt(g['us_per_granule']['median'], ' us')} / {_fmt(run['us_per_granule']['median'], ' us')}"
                f" per granule ({g['set_access_calls']:.0f} / {run['set_access_calls']:.0f} calls)",
                "per run below per granule" if h == "reused" else "-",
                # created handles: cuMemCreate dominates, the saving is within its noise
                ("ok" if run["us_per_granule"]["median"] < g["us_per_granule"]["median"] else "MISS")
                if h == "reused"
                else "-",
            ]
        )
    return rows


# ---------------------------------------------------------------------------------- step 3 ---
def _size_mix(n: int, seed: int = 0) -> list[int]:
    """Log-uniform sizes from 512 B to 32 MiB, 512-aligned: activations and workspaces."""
    rng = random.Random(seed)
    return [max(512, int(2 ** rng.uniform(9, 25)) // 512 * 512) for _ in range(n)]


def step_allocator(s: Settings, args: argparse.Namespace) -> dict:
    try:
        from torch_elastic_kv.memory import allocator
    except ImportError as e:
        raise Unavailable(f"torch_elastic_kv.memory.allocator is not in this tree yet ({e})") from None
    missing = [f for f in ("c_abi", "trim", "mem_pool", "last_error") if not hasattr(allocator, f)]
    if missing:
        raise Unavailable(f"torch_elastic_kv.memory.allocator lacks {missing}")
    index = torch.device(s.device).index
    lib = allocator.c_abi()  # ekv_malloc / ekv_free through ctypes, from the very _C torch loads
    sizes = _size_mix(s.alloc_pairs)
    out: dict[str, Any] = {"pairs": len(sizes), "size_mix": "log-uniform 512 B .. 32 MiB"}

    def c_abi_pairs(device: int) -> float:
        for sz in sizes[:200]:  # warm: segments mapped once
            lib.ekv_free(lib.ekv_malloc(sz, device, None), sz, device, None)
        t0 = time.perf_counter()
        for sz in sizes:
            p = lib.ekv_malloc(sz, device, None)
            if not p:
                raise MemoryError(f"ekv_malloc({sz}, device={device}) failed: {allocator.last_error()}")
            lib.ekv_free(p, sz, device, None)
        return len(sizes) / (time.perf_counter() - t0)

    out["c_abi_pairs_per_s"] = c_abi_pairs(index)
    out["c_abi_host_pairs_per_s"] = c_abi_pairs(-1)

    def torch_pairs(device: torch.device) -> float:
        for sz in sizes[:200]:  # warm: the caching allocator holds its segments
            torch.empty(sz, dtype=torch.uint8, device=device)
        t0 = time.perf_counter()
        for sz in sizes:
            t = torch.empty(sz, dtype=torch.uint8, device=device)
            del t
        return len(sizes) / (time.perf_counter() - t0)

    if cuda_real():
        dev = torch.device(s.device)
        out["torch_caching_pairs_per_s"] = torch_pairs(dev)
        with allocator.mem_pool(device=index):
            out["torch_mem_pool_pairs_per_s"] = torch_pairs(dev)
        out["baseline"] = "torch CUDA caching allocator"
    else:
        out["torch_caching_pairs_per_s"] = torch_pairs(torch.device("cpu"))
        out["baseline"] = "torch CPU allocator (no CUDA here)"

    # trim: map trim_bytes through the C ABI, free it all, time trim()
    block = 64 * MiB
    free0 = mem_free(s.device)
    ptrs = []
    try:
        for _ in range(s.trim_bytes // block):
            p = lib.ekv_malloc(block, index, None)
            if not p:
                raise MemoryError(f"ekv_malloc({block}) failed after {len(ptrs)} blocks: {allocator.last_error()}")
            ptrs.append(p)
        free_alloc = mem_free(s.device)
    finally:
        for p in ptrs:
            lib.ekv_free(p, block, index, None)
    synchronize(s.device)
    t0 = time.perf_counter()
    released = allocator.trim(index)
    dt = time.perf_counter() - t0
    free1 = mem_free(s.device)
    out["trim"] = {
        "bytes": len(ptrs) * block,
        "released_bytes": int(released or 0),
        "seconds": dt,
        "gib_per_s": (int(released or 0) / GiB) / dt if dt > 0 else None,
        "free_before": free0,
        "free_allocated": free_alloc,
        "free_after_trim": free1,
    }
    if cuda_real():
        torch.cuda.empty_cache()  # blocks torch kept in the MemPool go back to us, then to the driver
    allocator.trim(index)
    if int(released or 0) < len(ptrs) * block:
        raise StepFailed(f"trim released {released} bytes of {len(ptrs) * block} freed", out)
    return out


# ---------------------------------------------------------------------------------- step 4 ---
def build_model(s: Settings) -> tuple[Any, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if s.dry_run:
        cfg = dict(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=32,
            max_position_embeddings=1024,
        )
        dtype = torch.float32
    else:
        cfg = dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=4096,
        )
        dtype = torch.bfloat16
    config = LlamaConfig(**cfg)
    with torch.device(s.engine_device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, {**cfg, "dtype": str(dtype), "params": n_params}


def make_requests(wl: Workload, vocab: int, seed: int = 1) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(wl.requests):
        n = rng.randint(*wl.prompt_tokens)
        reqs.append(([rng.randrange(3, vocab) for _ in range(n)], rng.randint(*wl.new_tokens)))
    return reqs


class _Sampler:
    """Samples resident KV bytes (and device free memory) every ``period`` seconds."""

    def __init__(self, pool: Any, device: str, period: float) -> None:
        self.pool, self.device, self.period = pool, device, period
        self.points: list[tuple[float, int, Optional[int]]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="gpu-check-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> None:
        self.points.append(
            (round(time.monotonic() - self._t0, 3), int(self.pool.resident_bytes), mem_free(self.device))
        )

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class _Held:
    """Physical bytes (mapped + pending + cached) held on a device since this was made: the
    device budget counts every arena, so the difference is what the engine's pool holds."""

    def __init__(self, device: str) -> None:
        from torch_elastic_kv import memory_stats

        self._stats = memory_stats
        self.device = device
        self.base = memory_stats(device)["held_bytes"]

    def __call__(self) -> int:
        return int(self._stats(self.device)["held_bytes"] - self.base)


def run_engine(model: Any, s: Settings, kind: str, requests: list[tuple[list[int], int]]) -> dict:
    """One engine over ``requests`` in bursts with idle gaps (each burst through the shared
    replay harness, all at once); returns its figures."""
    from torch_elastic_kv import ElasticPolicy, Engine
    from torch_elastic_kv.bench import replay

    wl = s.workload
    dev = s.engine_device
    if kind == "static":
        policy = ElasticPolicy(min_bytes=wl.pool_bytes, max_bytes=wl.pool_bytes)
    else:
        policy = ElasticPolicy(min_bytes=wl.min_bytes, max_bytes=wl.pool_bytes, idle_seconds=wl.idle_seconds)
    synchronize(dev)
    if cuda_real():
        torch.cuda.empty_cache()
    free_before = mem_free(dev)
    shmem_start = rss_shmem()
    held = _Held(dev)
    engine = Engine(model, policy=policy, max_batch_tokens=wl.max_batch_tokens, page_tokens=16)
    pool = engine.pool
    floor = -(-wl.min_bytes // pool.chunk_bytes) * pool.chunk_bytes
    out: dict[str, Any] = {
        "kind": kind,
        "chunk_bytes": pool.chunk_bytes,
        "page_bytes": pool.page_bytes,
        "floor_bytes": floor,
        "free_before": free_before,
        "shmem_start": shmem_start,
        "resident_at_start": pool.resident_bytes,
    }
    idle_phases = []
    records = []
    truncated = False
    t_start = time.perf_counter()
    deadline = time.monotonic() + wl.run_limit_s
    try:
        with _Sampler(pool, dev, 0.05) as sampler:
            per_burst = -(-len(requests) // wl.bursts)
            for b in range(wl.bursts):
                burst = [replay.ReplayRequest(0.0, p, n) for p, n in requests[b * per_burst : (b + 1) * per_burst]]
                run = replay.replay_engine(
                    engine,
                    burst,
                    name=f"{kind} burst {b}",
                    sample_interval_s=0.05,
                    tail_seconds=0.0,
                    deadline_s=max(0.0, deadline - time.monotonic()),
                )
                records.extend(run.records)
                truncated = run.truncated
                idle_phases.append(_idle_phase(engine, pool, held, s, floor))
                if truncated:
                    break
        out["truncated"] = truncated
        out["wall_seconds"] = time.perf_counter() - t_start
        out.update(_engine_figures(engine, records))
        out["idle_phases"] = idle_phases
        last = idle_phases[-1]
        out["idle_resident_bytes"] = last["resident_after"]
        out["idle_held_bytes"] = last["held_after"]
        out["peak_resident_bytes"] = max(p[1] for p in sampler.points)
        # [seconds, resident KV bytes, device free bytes (None off a GPU)]
        out["resident_over_time"] = downsample([list(p) for p in sampler.points])
        frees = [f for _, _, f in sampler.points if f is not None]
        out["free_during_min"] = min(frees) if frees else None
        out["free_after_idle"] = last["free_after"]
    finally:
        engine.close()
        pool.close()
    synchronize(dev)
    if cuda_real():
        torch.cuda.empty_cache()
    out["free_after_close"] = mem_free(dev)
    return out


def _idle_phase(engine: Any, pool: Any, held: _Held, s: Settings, floor: int) -> dict:
    """Load stopped: wait (the engine's background thread gives memory back) until the pool is
    at its floor or the wait runs out; the device's free memory before and after, with torch's
    own cache emptied both times so only the KV pool's memory moves."""
    dev = s.engine_device
    synchronize(dev)
    if cuda_real():
        torch.cuda.empty_cache()
    before = {"resident": pool.resident_bytes, "held": held(), "free": mem_free(dev), "shmem": rss_shmem()}
    t0 = time.monotonic()
    wait = s.workload.idle_seconds * 3 + 1.0
    while time.monotonic() - t0 < wait:
        if engine.policy.is_static:
            time.sleep(s.workload.idle_seconds)  # nothing to give back: the same idle time, once
            break
        if pool.resident_bytes <= floor and held() <= floor:
            break
        time.sleep(0.02)
    reached = time.monotonic() - t0
    synchronize(dev)
    if cuda_real():
        torch.cuda.empty_cache()
    after = {"resident": pool.resident_bytes, "held": held(), "free": mem_free(dev), "shmem": rss_shmem()}
    phase = {
        "resident_before": before["resident"],
        "held_before": before["held"],
        "shmem_before": before["shmem"],
        "shmem_after": after["shmem"],
        "resident_after": after["resident"],
        "held_after": after["held"],
        "free_before": before["free"],
        "free_after": after["free"],
        "seconds_to_settle": reached,
    }
    # who got the memory back: the driver (device free memory), or on CPU the OS (the host
    # backend's memfd pages leave RssShmem when punched out)
    if before["free"] is not None and after["free"] is not None:
        phase["returned_to"] = "driver: torch.cuda.mem_get_info free"
        phase["got_back"] = after["free"] - before["free"]
    elif dev == "cpu" and before["shmem"] is not None and after["shmem"] is not None:
        phase["returned_to"] = "OS: RssShmem"
        phase["got_back"] = before["shmem"] - after["shmem"]
    phase["pool_gave_back"] = before["held"] - after["held"]
    return phase


def _engine_figures(engine: Any, records: list) -> dict:
    from torch_elastic_kv.bench import replay

    st = engine.stats()
    tl = engine.timeline or []
    busy = [e for e in tl if e["num_tokens"] > 0]
    decode = [e for e in busy if e["num_tokens"] == e["num_seqs"]]
    busy_s = sum(e["step_seconds"] for e in busy)
    decode_s = sum(e["step_seconds"] for e in decode)
    lat = replay.latencies(records)  # the shared harness's records: the main command's definitions
    ttft, tpot = lat["ttft"], lat["tpot"]
    return {
        "tokens_generated": st["tokens_generated"],
        "tokens_forwarded": st["tokens_forwarded"],
        "steps": st["steps"],
        "busy_seconds": busy_s,
        "tokens_per_s": st["tokens_generated"] / busy_s if busy_s else None,
        "decode_steps": len(decode),
        "decode_tokens_per_s": sum(e["num_tokens"] for e in decode) / decode_s if decode_s else None,
        "ttft_ms": {k: v * 1e3 for k, v in summary(ttft).items() if k != "n"} | {"n": len(ttft)},
        "tpot_ms": {k: v * 1e3 for k, v in summary(tpot).items() if k != "n"} | {"n": len(tpot)},
        "grow_events": st["grow_events"],
        "shrink_events": st["shrink_events"],
        "compact_events": st["compact_events"],
        "bytes_given_back": st["bytes_given_back"],
        "preemptions": st["preemptions"],
    }


def step_engine(s: Settings, args: argparse.Namespace) -> dict:
    try:
        from torch_elastic_kv import ElasticPolicy, Engine  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"the Engine is not in this tree yet ({e})") from None
    t0 = time.perf_counter()
    model, model_info = build_model(s)
    out: dict[str, Any] = {
        "model": model_info,
        "workload": asdict(s.workload),
        "model_build_seconds": time.perf_counter() - t0,
    }
    requests = make_requests(s.workload, model.config.vocab_size)
    # warm-up: kernels, cuBLAS handles and allocator pools exist before anything is measured
    warm = Workload(**{**asdict(s.workload), "requests": 4, "bursts": 1, "idle_seconds": 0.05, "new_tokens": (4, 4)})
    run_engine(model, Settings(**{**asdict(s), "workload": warm}), "elastic", requests[:4])
    # static, elastic, elastic, static: drift (clocks, heat, the machine) cancels out of the means
    runs: dict[str, list[dict]] = {"static": [], "elastic": []}
    for kind in ENGINE_ORDER:
        runs[kind].append(run_engine(model, s, kind, requests))
    out["static"], out["elastic"] = runs["static"][0], runs["elastic"][0]
    out["repeats"] = {kind: rs[1:] for kind, rs in runs.items()}
    e, _st = out["elastic"], out["static"]

    def mean(kind: str, key: str) -> Optional[float]:
        vals = [r[key] for r in runs[kind]]
        return statistics.fmean(vals) if all(vals) else None

    for key in ("decode_tokens_per_s", "tokens_per_s"):
        out[key] = {kind: mean(kind, key) for kind in runs}
        out[f"{key}_runs"] = {kind: [r[key] for r in rs] for kind, rs in runs.items()}
    d, a = out["decode_tokens_per_s"], out["tokens_per_s"]
    out["decode_ratio"] = d["elastic"] / d["static"] if d["elastic"] and d["static"] else None
    out["tokens_ratio"] = a["elastic"] / a["static"] if a["elastic"] and a["static"] else None
    # static against static (the first and the last run): how far two runs of one system differ
    # here, the noise the elastic / static ratio is read against
    ds = out["decode_tokens_per_s_runs"]["static"]
    out["static_aa_decode_ratio"] = ds[-1] / ds[0] if len(ds) > 1 and ds[0] and ds[-1] else None
    out["idle_at_floor"] = all(r["idle_held_bytes"] == r["floor_bytes"] for r in runs["elastic"])
    shrink = e["idle_phases"][-1]
    if shrink.get("returned_to", "").startswith("driver"):
        # what the pool gave back shows up as free device memory (5 % slack: other allocations)
        out["memory_went_back"] = shrink["pool_gave_back"] > 0 and shrink["got_back"] >= 0.95 * shrink["pool_gave_back"]
        out["device_bytes_held_after_idle"] = e["free_before"] - e["free_after_idle"]
    elif shrink.get("returned_to"):
        # the OS counts only pages that were touched, so compare with the start instead: at idle
        # the process holds no more shared memory than the floor above what it held before
        out["shmem_above_start_at_idle"] = shrink["shmem_after"] - e["shmem_start"]
        out["memory_went_back"] = out["shmem_above_start_at_idle"] <= e["floor_bytes"]
    del model
    if cuda_real():
        torch.cuda.empty_cache()
    if any(r["truncated"] for rs in runs.values() for r in rs):
        raise StepFailed("an engine run hit its time limit; the rest of its requests were cancelled", out)
    return out


# ---------------------------------------------------------------------------------- step 4a --
PARITY_LOGIT_TOLERANCE = 0.05  # bf16: max |engine - reference| first-token logit, over the reference's std


def _reference_outputs(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list]:
    """Per-request ``model.generate`` (greedy, no EOS, the model's own attention) and the
    last-position logits of each prompt from a plain forward."""
    from transformers import GenerationConfig

    device = model.device
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    tokens, logits = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            tokens.append(model.generate(input_ids=ids, generation_config=config)[0, len(p) :].tolist())
            logits.append(model(input_ids=ids).logits[0, -1].float().cpu())
    return tokens, logits


def _engine_outputs(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list, str]:
    """The Engine's tokens for ``prompts`` run together, and each prompt's first-token logits
    (its prefill step run alone, taken where the runner samples); plus the attention path."""
    from torch_elastic_kv import ElasticPolicy, Engine
    from torch_elastic_kv.engine.runner import ModelRunner
    from torch_elastic_kv.hf.attention import decode_path_stats, reset_decode_path_stats

    attention = model.config._attn_implementation
    captured: list = []
    original = ModelRunner.__dict__["sample_batch"]

    def capture(cls: Any, logits: torch.Tensor, requests: Any) -> list:
        captured.append(logits.float().cpu())
        return original.__func__(cls, logits, requests)

    engine = Engine(model, policy=ElasticPolicy(max_bytes=256 * MiB), max_batch_tokens=4096)
    try:
        ModelRunner.sample_batch = classmethod(capture)
        first = []
        for p in prompts:
            captured.clear()
            engine.generate([p], 1)
            first.append(captured[0][0])
        ModelRunner.sample_batch = original
        reset_decode_path_stats()
        tokens = engine.generate(prompts, new_tokens)
        # which decode attention ran, by layer calls (e.g. "triton 46" or "gather 46, triton 0")
        calls = decode_path_stats()["calls"]
        path = ", ".join(f"{k} {v}" for k, v in calls.items() if v) or None
    finally:
        ModelRunner.sample_batch = original
        engine.close()
        engine.pool.close()
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
    return tokens, first, path


def parity(model: Any, prompts: list[list[int]], new_tokens: int) -> dict:
    """The Engine against per-request ``generate`` on one model: tokens, and first-token logits."""
    ref_tokens, ref_logits = _reference_outputs(model, prompts, new_tokens)
    tokens, logits, path = _engine_outputs(model, prompts, new_tokens)
    diffs = [float((a - b).abs().max() / b.std()) for a, b in zip(logits, ref_logits)]
    return {
        "requests": len(prompts),
        "new_tokens": new_tokens,
        "dtype": str(next(model.parameters()).dtype),
        "identical_requests": sum(a == b for a, b in zip(tokens, ref_tokens)),
        "first_token_equal": sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(logits, ref_logits)),
        "logit_max_diff_over_std": max(diffs),
        "attention_path": path,
    }


def step_parity(s: Settings, args: argparse.Namespace) -> dict:
    """Output parity before any throughput figure: a small float32 model must give the same
    tokens as per-request ``generate``; the engine step's model (bf16 1B on a GPU) its
    first-token logits within ``PARITY_LOGIT_TOLERANCE`` of the reference's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(3)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    with torch.device(s.engine_device):
        small = LlamaForCausalLM(config).float().eval()
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(5, 300))] for _ in range(6)]
    out = {"float32": parity(small, prompts, 12)}
    del small
    model, info = build_model(s)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 400))] for _ in range(4)]
    out["model"] = {**parity(model, prompts, 4), "params": info["params"]}
    del model
    if cuda_real():
        torch.cuda.empty_cache()
    f, m = out["float32"], out["model"]
    out["ok"] = f["identical_requests"] == f["requests"] and m["logit_max_diff_over_std"] <= PARITY_LOGIT_TOLERANCE
    if not out["ok"]:
        raise StepFailed(
            f"the Engine's outputs differ from generate: float32 {f['identical_requests']}/{f['requests']} identical, "
            f"{m['dtype']} logits max diff {m['logit_max_diff_over_std']:.3g} std (tolerance {PARITY_LOGIT_TOLERANCE})",
            out,
        )
    return out


# ---------------------------------------------------------------------------------- step 4b --
def step_stream_order(s: Settings, args: argparse.Namespace) -> dict:
    """Unmap memory a kernel is still writing: the unmap must wait for the stream, not fault."""
    from torch_elastic_kv import Arena

    arena = Arena(64 * MiB, s.device, reuse_bytes=0)
    try:
        cap = arena.capacity
        arena.map(0, cap)
        if arena.backend == "cuda(fake)":
            from torch_elastic_kv.testing import FakeCuda

            fake = FakeCuda()
            fake.set_events_complete(False)  # the fake's model of queued device work
            try:
                arena.unmap(0, cap)
                pending = arena.stats()["pending_bytes"]
                arena.poll()
                still = arena.stats()["pending_bytes"]
                fake.complete_events()
            finally:
                fake.set_events_complete(True)
            arena.poll()
            done = arena.stats()["pending_bytes"]
            kernel_ms = None
        else:
            view = arena.view(torch.float32, (cap // 4,))
            stream = torch.cuda.Stream(torch.device(s.device))
            with torch.cuda.stream(stream):
                t0 = time.perf_counter()
                torch.cuda._sleep(200_000_000)  # ~0.1 s of queued work ahead of the write
                view.fill_(3.0)
            del view
            arena.unmap(0, cap, stream=stream)
            pending = arena.stats()["pending_bytes"]
            arena.poll()
            still = arena.stats()["pending_bytes"]
            stream.synchronize()
            kernel_ms = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()  # raises if the write hit an unmapped page
            arena.poll()
            done = arena.stats()["pending_bytes"]
        out = {
            "bytes": cap,
            "pending_after_unmap": pending,
            "pending_after_poll_while_busy": still,
            "pending_after_completion": done,
            "queued_work_ms": kernel_ms,
        }
        if not (pending == cap and still == cap and done == 0):
            raise StepFailed("the unmap did not wait for the queued work on its stream", out)
        return out
    finally:
        arena.close()


# ---------------------------------------------------------------------------------- decode ---
# Triton paged decode against gather + SDPA: max |diff| allowed over outputs of order 1.
DECODE_TOLERANCE = {"torch.float32": 1e-4, "torch.float16": 5e-3, "torch.bfloat16": 3e-2}


def _decode_case(
    device: str, dtype: torch.dtype, batch: int, context: int, shape: tuple[int, int, int, int], iters: int
) -> dict:
    """One layer's decode attention, ``batch`` rows of about ``context`` tokens on shuffled pages,
    through the attention function (paged_attention_forward) with the Triton kernel forced on
    and off: max |diff| and time per call (launches included, which is what the kernel saves)."""
    from torch_elastic_kv.hf import attention as attn
    from torch_elastic_kv.hf.planner import plan_packed_step
    from torch_elastic_kv.kv.page_table import PageList

    heads, kv_heads, head_dim, page_tokens = shape
    gen = torch.Generator().manual_seed(batch * 7 + context)
    lens = [max(1, context - 3 * i) for i in range(batch)]  # ends mid-page and on page ends
    need = [-(-n // page_tokens) for n in lens]
    n_pages = sum(need) + 4
    # A page-major slab like the pool's ([pages, layers, 2, page_tokens, kv_heads, head_dim]).
    planes = torch.randn(n_pages, 2, 2, page_tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    kc, vc = planes[:, 1, 0], planes[:, 1, 1]
    perm = torch.randperm(n_pages, generator=gen).tolist()
    seqs, at = [], 0
    for n, k in zip(lens, need):
        seqs.append(PageList(perm[at : at + k], n - 1))
        at += k
    step = plan_packed_step(seqs, [(i, n - 1, 1) for i, n in enumerate(lens)], page_tokens, torch.device(device), True)
    query = torch.randn(1, heads, batch, head_dim, generator=gen).to(dtype).to(device)
    saved_native = os.environ.get(attn.NATIVE_DECODE_ENV)
    saved_mode = attn.triton_decode_mode()

    def call(mode: str) -> torch.Tensor:
        attn.set_triton_decode_mode(mode)
        plan = attn.PagePlan(1, kc, vc, step.groups, step.packed_tokens)
        out, _ = attn.paged_attention_forward(None, query, attn.attach_plan(kc, plan), vc, None, scaling=None)
        return out

    res: dict[str, Any] = {"batch": batch, "context": context, "dtype": str(dtype)}
    try:
        os.environ[attn.NATIVE_DECODE_ENV] = "0"  # the CPU side of a dry run: gather, not the C++ kernel
        ref, got = call("0").float(), call("1").float()
        res["max_abs_diff"] = float((ref - got).abs().max())
        for mode, name in (("0", "gather_ms"), ("1", "triton_ms")):
            for _ in range(min(iters, 3)):  # warm-up: compile, caches
                call(mode)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                call(mode)
            synchronize(device)
            res[name] = (time.perf_counter() - t0) * 1e3 / iters
        if cuda_real():
            res["kernels_gather"] = _count_kernels(lambda: call("0"))
            res["kernels_triton"] = _count_kernels(lambda: call("1"))
        else:  # what would launch on a device: gather's compute ops (the kernel is one launch by construction)
            res["aten_ops_gather"] = _count_ops(lambda: call("0"))
    finally:
        attn.set_triton_decode_mode(saved_mode)
        if saved_native is None:
            os.environ.pop(attn.NATIVE_DECODE_ENV, None)
        else:
            os.environ[attn.NATIVE_DECODE_ENV] = saved_native
    return res


def _count_kernels(fn: Callable[[], Any]) -> Optional[int]:
    """Device kernels one call launches (torch profiler), None where the profiler fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a count is a nicety, not the check
        return None


# Ops that only make views or allocate: no kernel on a device.
_VIEW_OPS = frozenset(
    "aten::" + n
    for n in "view transpose reshape unsqueeze squeeze select slice as_strided expand t alias _unsafe_view "
    "empty empty_strided new_empty detach lift_fresh resize_".split()
)


def _count_ops(fn: Callable[[], Any]) -> Optional[int]:
    """Top-level aten ops of one call that compute (not views, not allocations), CPU profiler."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(
            1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in _VIEW_OPS
        )
    except Exception:  # noqa: BLE001 - a count is a nicety, not the check
        return None


def _decode_tuning(device: str) -> list[dict]:
    """Time a few launch shapes of the Triton kernel alone (bfloat16, Llama-3-8B heads) for the
    next tuning pass: the default was picked from register counts, not timings."""
    from torch_elastic_kv.hf import triton_decode as td

    rows: list[dict] = []
    for batch, context in ((64, 2048), (1, 8192)):
        gen = torch.Generator().manual_seed(batch + context)
        pages = batch * (context // 16) + 1
        kc = torch.randn(pages, 16, 8, 128, generator=gen).to(torch.bfloat16).to(device)
        vc = torch.randn(pages, 16, 8, 128, generator=gen).to(torch.bfloat16).to(device)
        table = torch.randperm(pages, generator=gen)[: batch * (context // 16)].view(batch, -1).to(device)
        lens = torch.full((batch,), context, device=device)
        q = torch.randn(batch, 32, 128, generator=gen).to(torch.bfloat16).to(device)
        for tile, warps, stages in ((32, 4, 2), (16, 4, 3), (64, 8, 2), (32, 8, 3)):
            config = td.LaunchConfig(tile_tokens=tile, num_warps=warps, num_stages=stages)
            for _ in range(3):
                td.paged_decode_attention_triton(q, kc, vc, table, lens, validate=False, config=config)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(20):
                td.paged_decode_attention_triton(q, kc, vc, table, lens, validate=False, config=config)
            synchronize(device)
            ms = (time.perf_counter() - t0) * 1e3 / 20
            kv_bytes = 2 * batch * context * 8 * 128 * 2
            rows.append(
                {"batch": batch, "context": context, "tile_tokens": tile, "num_warps": warps, "num_stages": stages}
                | {"ms": ms, "kv_gb_per_s": kv_bytes / ms / 1e6}
            )
        del kc, vc
    return rows


def step_decode(s: Settings, args: argparse.Namespace) -> dict:
    """The Triton paged decode kernel against gather + SDPA: parity, then time per layer call.

    On a GPU: bfloat16 at a Llama-3-8B shape (32 heads over 8 KV heads, head_dim 128, 16-token
    pages) over a few batch sizes and contexts, plus float32 and float16 parity. In a dry run
    (no CUDA): parity only, at tiny sizes, on CPU through Triton's interpreter (its times are
    the interpreter's, not a kernel's)."""
    from torch_elastic_kv.hf import triton_decode

    if not triton_decode.triton_available():
        raise Unavailable("triton does not import")
    import triton

    real = cuda_real()
    if not real and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        raise Unavailable(f"skipped: no CUDA, and Triton {triton.__version__}'s interpreter cannot run the kernel")
    if real:
        llama = (32, 8, 128, 16)
        sizes = (
            [(1, 1024), (16, 1024), (64, 2048)]
            if s.mode == "quick"
            else [(1, 1024), (16, 1024), (64, 2048), (8, 8192), (128, 512)]
        )
        cases = [(s.device, torch.bfloat16, b, c, llama, 20) for b, c in sizes]
        cases += [(s.device, torch.float32, 8, 777, (8, 2, 64, 5), 5), (s.device, torch.float16, 8, 777, llama, 5)]
    else:
        cases = [
            ("cpu", torch.float32, 3, 37, (4, 2, 16, 16), 1),
            ("cpu", torch.float32, 2, 23, (6, 2, 20, 5), 1),
            ("cpu", torch.float32, 64, 20, (4, 2, 16, 16), 1),  # 8 decode groups on the gather path
        ]
    out: dict[str, Any] = {"device": s.device if real else "cpu (Triton interpreter)", "triton": triton.__version__}
    out["cases"] = [_decode_case(*c) for c in cases]
    bad = [c for c in out["cases"] if not c["max_abs_diff"] <= DECODE_TOLERANCE[c["dtype"]]]
    for c in out["cases"]:
        print(
            f"[gpu_check] decode {c['dtype']} batch {c['batch']} ctx {c['context']}: |diff| {c['max_abs_diff']:.2e}, "
            f"gather {c['gather_ms']:.3f} ms, triton {c['triton_ms']:.3f} ms per layer call"
            + (
                f", kernels {c.get('kernels_gather')} vs {c.get('kernels_triton')}"
                if real
                else f" (interpreter); gather runs {c.get('aten_ops_gather')} compute ops, the kernel 1 launch"
            ),
            flush=True,
        )
    if bad:
        raise StepFailed(f"Triton decode differs from gather + SDPA beyond tolerance in {len(bad)} case(s)", out)
    if real:
        out["tuning"] = _decode_tuning(s.device)
        for t in out["tuning"]:
            print(f"[gpu_check] decode tuning {t}", flush=True)
    return out


def step_tp(s: Settings, args: argparse.Namespace) -> dict:
    """Tensor parallel (issue 26) on CUDA: ``serve -tp 2 --device cuda`` runs rank r on cuda:r,
    the model's all-reduces over NCCL and the plans over gloo (docs/TENSOR_PARALLEL.md). Needs
    two GPUs; with fewer it says so and is skipped.

    The default model in float32 takes three prompts (two share a 64-token prefix); checked:
    the greedy tokens equal one process's on cuda:0, each rank reports its own GPU and pages of
    half one process's size, equal page-table digests and no mismatch, and each rank's resident
    KV back at 0 once idle (``--idle-seconds 1``)."""
    gpus = torch.cuda.device_count() if cuda_real() else 0
    if gpus < 2:
        raise Unavailable(f"skipped: {gpus} GPU{'' if gpus == 1 else 's'} (tensor parallel needs 2)")
    import httpx

    from torch_elastic_kv.engine.engine import Engine
    from torch_elastic_kv.serve.default_model import build_default_model
    from torch_elastic_kv.testing.processes import ServerProcess

    shared = [(7 * i + 3) % 250 + 8 for i in range(64)]
    prompts = [shared + [20, 21, 22], shared + [30, 31, 32, 33, 34], [(11 * i) % 250 + 8 for i in range(40)]]
    new_tokens = 16
    with Engine(build_default_model(dtype=torch.float32, device="cuda:0"), background=False) as one:
        ref = one.generate(prompts, new_tokens)
        one_page_bytes = one.pool.page_bytes
    admin = "gpu-check"
    headers = {"Authorization": f"Bearer {admin}"}
    t0 = time.perf_counter()
    server = ServerProcess(
        ["-tp", "2", "--device", "cuda", "--dtype", "float32", "--admin-key", admin]
        + ["--max-kv-bytes", "64M", "--idle-seconds", "1"]
    )
    out: dict[str, Any] = {"gpus": gpus, "start_s": round(time.perf_counter() - t0, 2)}
    try:
        got = []
        t1 = time.perf_counter()
        for p in prompts:
            body = {"model": "ekv-default-llama", "prompt": p, "max_tokens": new_tokens, "temperature": 0}
            body.update(ignore_eos=True, return_token_ids=True)
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            if r.status_code != 200:
                raise StepFailed(f"a completion answered {r.status_code}: {r.text[:300]}", out)
            got.append(r.json()["choices"][0]["token_ids"])
        out["requests_s"] = round(time.perf_counter() - t1, 3)
        tp = httpx.get(server.url + "/admin/stats", headers=headers, timeout=30).json()["tensor_parallel"]
        ranks = tp["ranks"]
        out.update(
            tokens_equal=got == ref,
            devices=[r["device"] for r in ranks],
            page_bytes=[r["page_bytes"] for r in ranks],
            one_process_page_bytes=one_page_bytes,
            digests_equal=len({r["digest"] for r in ranks}) == 1,
            mismatches=tp["mismatches"],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ranks = httpx.get(server.url + "/admin/stats", headers=headers, timeout=30).json()["tensor_parallel"][
                "ranks"
            ]
            if all(r["resident_bytes"] == 0 for r in ranks):
                break
            time.sleep(0.2)
        out["idle_resident_bytes"] = [r["resident_bytes"] for r in ranks]
    finally:
        out["exit_status"] = server.stop()
    print(f"[gpu_check] tp {out}", flush=True)
    problems = []
    if not out["tokens_equal"]:
        problems.append("tokens differ from one process")
    if out["devices"] != ["cuda:0", "cuda:1"]:
        problems.append(f"ranks on {out['devices']}, not cuda:0 and cuda:1")
    if out["page_bytes"] != [one_page_bytes // 2] * 2:
        problems.append(f"page bytes {out['page_bytes']}, not half of {one_page_bytes}")
    if not out["digests_equal"] or out["mismatches"]:
        problems.append("page tables differ between the ranks")
    if out["idle_resident_bytes"] != [0, 0]:
        problems.append(f"resident KV {out['idle_resident_bytes']} once idle, not 0")
    if out["exit_status"] != 0:
        problems.append(f"the server exited {out['exit_status']}")
    if problems:
        raise StepFailed("; ".join(problems), out)
    return out


# ---------------------------------------------------------------------------------- step 4c --
class _SyncedModel:
    """The model, its forward followed by a device synchronize: the Engine's ``forward`` phase
    then holds the kernels' time, not only their launch (on CUDA a launch returns at once and
    the first host sync, in sampling, would wait for them)."""

    def __init__(self, model: Any, device: str) -> None:
        self._model = model
        self._device = device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._model(*args, **kwargs)
        synchronize(self._device)
        return out


def _split_run(model: Any, s: Settings, requests: list[tuple[list[int], int]], compile: bool) -> dict:
    """One Engine over ``requests`` (all queued at once, run to the end, a first round as
    warm-up): the step time split per phase (``stats()["step_phase_seconds"]``), ms per step,
    and decode steps' mean time from the timeline."""
    from torch_elastic_kv import ElasticPolicy, Engine

    wl = s.workload
    engine = Engine(
        model,
        policy=ElasticPolicy(max_bytes=wl.pool_bytes),
        max_batch_tokens=wl.max_batch_tokens,
        background=False,
        compile=compile,
    )
    try:
        engine.runner.model = _SyncedModel(model, s.engine_device)
        engine.generate([p for p, _ in requests[:2]], 2)  # warm-up: kernels and allocator pools
        before = engine.stats()
        engine.timeline.clear()
        t0 = time.perf_counter()
        engine.generate([p for p, _ in requests], [n for _, n in requests])
        wall = time.perf_counter() - t0
        st = engine.stats()
    finally:
        engine.close()
    steps = st["steps"] - before["steps"]
    phases = {k: (v - before["step_phase_seconds"][k]) * 1e3 / steps for k, v in st["step_phase_seconds"].items()}
    decode = [e["step_seconds"] for e in engine.timeline if e["num_tokens"] and e["num_tokens"] == e["num_seqs"]]
    return {
        "compile": compile,
        "compile_seconds": st["compile_seconds"],
        "steps": steps,
        "wall_seconds": wall,
        "tokens_per_s": (st["tokens_generated"] - before["tokens_generated"]) / wall,
        "ms_per_step": phases,
        "decode_steps": len(decode),
        "decode_step_ms_mean": 1e3 * statistics.fmean(decode) if decode else None,
    }


def step_split(s: Settings, args: argparse.Namespace) -> dict:
    """Where a step's time goes on the engine device: schedule, pack (tokens packed, pages
    planned), forward (synchronized), sample, postprocess, memory; eager, and on a GPU also
    with ``Engine(compile=True)`` (its compile time reported; a dry run skips it: inductor on
    a shared CPU takes longer than the run's budget allows). CUDA graphs are not used: the
    paged attention and cache run eagerly between the compiled modules and their page tables
    change every step, so there is no one static graph per step to capture."""
    try:
        from torch_elastic_kv.hf.compile import CompiledLayers  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"the compiled Engine is not in this tree yet ({e})") from None
    model, model_info = build_model(s)
    wl = s.workload
    decode_heavy = Workload(**{**asdict(wl), "new_tokens": (wl.new_tokens[1], wl.new_tokens[1])})
    requests = make_requests(decode_heavy, model.config.vocab_size, seed=3)
    out: dict[str, Any] = {"model": model_info, "requests": len(requests), "cuda_graphs": False}
    out["eager"] = _split_run(model, s, requests, compile=False)
    if cuda_real():
        out["compiled"] = _split_run(model, s, requests, compile=True)
    else:
        out["compiled"] = {"skipped": "dry run: no compilation on CPU here"}
    for name in ("eager", "compiled"):
        r = out[name]
        if "ms_per_step" in r:
            print(
                f"[gpu_check] split {name}: {r['tokens_per_s']:.1f} tok/s, ms per step "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_step"].items())
                + (f"; compiled in {r['compile_seconds']:.1f} s" if r["compile"] else ""),
                flush=True,
            )
    del model
    if cuda_real():
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------- runner ---
STEPS: list[tuple[str, Callable[[Settings, argparse.Namespace], dict]]] = [
    ("build", step_build),
    ("gpu_tests", step_gpu_tests),
    ("driver", step_driver),
    ("arena", step_arena),
    ("map_range", step_map_range),
    ("allocator", step_allocator),
    ("parity", step_parity),
    ("decode", step_decode),
    ("engine", step_engine),
    ("split", step_split),
    ("stream_order", step_stream_order),
    ("tp", step_tp),
]


def run_step(name: str, fn: Callable, s: Settings, args: argparse.Namespace, started: float) -> dict:
    if time.perf_counter() - started > s.budget_s:
        return {"status": "skipped", "error": f"the run passed its {s.budget_s:.0f} s budget before this step"}
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        data = fn(s, args)
        rec = {"status": "ok", **data}
    except Unavailable as e:
        rec = {"status": "unavailable", "error": str(e)}
    except StepFailed as e:
        rec = {"status": "failed", "error": str(e), **e.data}
    except BaseException as e:  # noqa: BLE001 - a step must never end the run
        if isinstance(e, KeyboardInterrupt):
            raise
        rec = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    print(
        f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s)"
        + (f" - {rec['error']}" if rec.get("error") else ""),
        flush=True,
    )
    return rec


def environment(s: Settings) -> dict:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "EKV_LIBCUDA": os.environ.get("EKV_LIBCUDA"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if cuda_real():
        idx = torch.device(s.device).index
        p = torch.cuda.get_device_properties(idx)
        env.update(
            device_name=p.name,
            device_total_bytes=p.total_memory,
            cuda_runtime=torch.version.cuda,
            capability=f"{p.major}.{p.minor}",
        )
    elif s.dry_run:
        env["device_name"] = "none (dry run: fake CUDA driver over host memory; engine on CPU)"
    else:
        env["device_name"] = "none: torch sees no CUDA device"
    return env


# ---------------------------------------------------------------------------------- table ----
def _fmt(x: Any, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x}{unit}"


def _mib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / MiB:,.1f} MiB"


def build_table(res: dict) -> list[list[str]]:
    """Rows of (what, measured, reference, verdict)."""
    st = res["steps"]
    rows: list[list[str]] = []

    def status_row(name: str, what: str) -> bool:
        r = st.get(name, {})
        if r.get("status") != "ok":
            rows.append([what, r.get("status", "not run"), "-", (r.get("error") or "-")[:60]])
            return False
        return True

    env = res.get("environment", {})
    drv = st.get("driver", {}).get("granule", {})
    rows.append(
        [
            "versions",
            f"python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
            f"CUDA runtime {env.get('cuda_runtime', '-')}, driver {drv.get('driver_version', '-')}",
            "-",
            "-",
        ]
    )
    b = st.get("build", {})
    rows.append(
        [
            "build",
            b.get("status", "not run") if "skipped" not in b else "skipped (--no-build)",
            "-",
            (b.get("error") or "-")[:60],
        ]
    )
    t = st.get("gpu_tests", {})
    if t.get("status") in ("ok", "failed") and "tests" in t:
        rows.append(
            [
                "tests/gpu",
                f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped",
                "all pass",
                "ok" if t["status"] == "ok" else "FAIL",
            ]
        )
    else:
        status_row("gpu_tests", "tests/gpu")
    if status_row("driver", "driver calls"):
        d = st["driver"]["granule"]
        g = d["granularity"]
        for call, label in (
            ("create", "cuMemCreate"),
            ("map", "cuMemMap"),
            ("set_access", "cuMemSetAccess"),
            ("unmap", "cuMemUnmap"),
            ("release", "cuMemRelease"),
        ):
            ref = A100_US.get(call)
            v = d["per_2mib_us"][call]
            rows.append(
                [
                    f"{label} per 2 MiB (median)",
                    _fmt(v, " us", 2),
                    _fmt(ref, " us (A100)") if ref else "-",
                    f"{v / ref:.2f}x A100" if ref else "-",
                ]
            )
        rows.append(
            [
                "granularity min / recommended",
                f"{g // 1024} KiB / {d['recommended_granularity'] // 1024} KiB",
                "2 MiB",
                "ok" if g == 2 * MiB else "differs",
            ]
        )
        rows.append(
            [
                "cuMemSetAccess whole range, 1 call / 1 per handle",
                f"{_fmt(d['set_access_range_us'], ' us', 1)} / {_fmt(d['set_access_us']['mean'] * d['set_access_us']['n'], ' us', 1)}",
                f"{d['range_bytes'] // MiB} MiB",
                "-",
            ]
        )
        if "event_record_us" in d:
            rows.append(
                [
                    "cuEvent create / record / query / destroy (median)",
                    " / ".join(
                        _fmt(d[f"event_{c}_us"]["median"], " us", 2) for c in ("create", "record", "query", "destroy")
                    ),
                    "-",
                    "-",
                ]
            )
        lg = st["driver"]["large"]
        rows.append(
            [
                f"cuMemCreate per 2 MiB, {lg['handle_bytes'] // MiB} MiB handles",
                _fmt(lg["per_2mib_us"]["create"], " us", 2),
                "-",
                "-",
            ]
        )
    if status_row("arena", "arena grow/shrink"):
        a = st["arena"]
        r, n = a["reuse"], a["no_reuse"]
        rows.append(
            [
                "arena grow per granule: reuse / create",
                f"{_fmt(r['grow_us_per_granule']['median'], ' us')} / {_fmt(n['grow_us_per_granule']['median'], ' us')}",
                "reuse well under create",
                "ok" if a["reuse_over_create"] < 0.5 else "MISS",
            ]
        )
        rows.append(
            [
                "arena shrink per granule: reuse / release",
                f"{_fmt(r['shrink_finish_us_per_granule']['median'] + r['unmap_call_us_per_granule']['median'], ' us')}"
                f" / {_fmt(n['shrink_finish_us_per_granule']['median'] + n['unmap_call_us_per_granule']['median'], ' us')}",
                "-",
                "-",
            ]
        )
    rows += _map_range_rows(st)
    if status_row("allocator", "allocator"):
        al = st["allocator"]
        rows.append(
            [
                "malloc+free pairs/s: ekv C ABI / torch",
                f"{_fmt(al['c_abi_pairs_per_s'], '', 0)} / {_fmt(al['torch_caching_pairs_per_s'], '', 0)}",
                al["baseline"],
                "-",
            ]
        )
        if al.get("torch_mem_pool_pairs_per_s"):
            rows.append(
                [
                    "pairs/s through torch in ekv mem_pool",
                    _fmt(al["torch_mem_pool_pairs_per_s"], "", 0),
                    "torch caching",
                    "-",
                ]
            )
        tr = al["trim"]
        rows.append(
            [
                f"trim() of {tr['bytes'] / GiB:.2f} GiB",
                f"{tr['seconds'] * 1e3:,.1f} ms",
                f"{_fmt(tr['gib_per_s'], ' GiB/s')}",
                "ok" if tr["released_bytes"] >= tr["bytes"] else "FAIL",
            ]
        )
    if status_row("parity", "output parity"):
        f, m = st["parity"]["float32"], st["parity"]["model"]
        rows.append(
            [
                "parity float32: Engine = generate",
                f"{f['identical_requests']}/{f['requests']} requests identical",
                "all",
                "ok" if f["identical_requests"] == f["requests"] else "FAIL",
            ]
        )
        rows.append(
            [
                f"parity {m['dtype'].replace('torch.', '')}: first-token logits",
                f"max diff {m['logit_max_diff_over_std']:.3g} std, argmax {m['first_token_equal']}/{m['requests']}",
                f"<= {PARITY_LOGIT_TOLERANCE} std",
                "ok" if m["logit_max_diff_over_std"] <= PARITY_LOGIT_TOLERANCE else "FAIL",
            ]
        )
        rows.append(["decode attention path", str(f.get("attention_path") or "-"), "-", "-"])
    elif st.get("parity", {}).get("status") == "failed":
        rows.append(["parity", "FAILED: throughput below may come from a wrong path", "-", "FAIL"])
    if status_row("engine", "engine"):
        en = st["engine"]
        e, s_ = en["elastic"], en["static"]
        ratio = en.get("decode_ratio")
        dm, am = en["decode_tokens_per_s"], en["tokens_per_s"]
        rows.append(
            [
                "decode tokens/s elastic / static (2 runs each)",
                f"{_fmt(dm['elastic'])} / {_fmt(dm['static'])}",
                "within 2 %",
                "-"
                if ratio is None
                else (f"{(ratio - 1) * 100:+.1f} % " + ("ok" if ratio >= 1 - TOKENS_PER_S_TOLERANCE else "MISS")),
            ]
        )
        aa = en.get("static_aa_decode_ratio")
        rows.append(
            [
                "decode tokens/s static / static (A/A noise)",
                "-" if aa is None else f"{(aa - 1) * 100:+.1f} %",
                "the elastic ratio is read against it",
                "-",
            ]
        )
        rows.append(
            ["tokens/s (all steps) elastic / static", f"{_fmt(am['elastic'])} / {_fmt(am['static'])}", "-", "-"]
        )
        for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            rows.append(
                [
                    f"{label} p50 / p99 elastic",
                    f"{_fmt(e[key].get('median'), ' ms')} / {_fmt(e[key].get('p99'), ' ms')}",
                    f"static {_fmt(s_[key].get('median'), ' ms')} / {_fmt(s_[key].get('p99'), ' ms')}",
                    "-",
                ]
            )
        rows.append(
            [
                "KV resident peak elastic / static",
                f"{_mib(e['peak_resident_bytes'])} / {_mib(s_['peak_resident_bytes'])}",
                "-",
                "-",
            ]
        )
        rows.append(
            [
                "idle footprint (held) vs floor",
                _mib(e["idle_held_bytes"]),
                _mib(e["floor_bytes"]),
                "ok" if en["idle_at_floor"] else "MISS",
            ]
        )
        ph = e["idle_phases"][-1]
        verdict = "ok" if en.get("memory_went_back") else "MISS"
        if "device_bytes_held_after_idle" in en:
            rows.append(
                [
                    "device free memory back at idle",
                    _mib(ph["got_back"]),
                    f"pool gave {_mib(ph['pool_gave_back'])}",
                    verdict,
                ]
            )
        elif "shmem_above_start_at_idle" in en:
            rows.append(
                [
                    "RssShmem above start at idle",
                    _mib(en["shmem_above_start_at_idle"]),
                    f"<= floor {_mib(e['floor_bytes'])}",
                    verdict,
                ]
            )
        if e["free_before"] is not None:
            rows.append(
                [
                    "device free: before / min during / after",
                    f"{_mib(e['free_before'])} / {_mib(e['free_during_min'])} / {_mib(e['free_after_idle'])}",
                    "-",
                    "-",
                ]
            )
    if status_row("split", "step time split"):
        for name in ("eager", "compiled"):
            r = st["split"][name]
            if "ms_per_step" not in r:
                continue
            ms = r["ms_per_step"]
            rows.append(
                [
                    f"step split {name} (ms/step)",
                    f"fwd {ms['forward']:.2f}, pack {ms['pack']:.2f}, sample {ms['sample']:.2f}, "
                    f"sched {ms['schedule']:.2f}, post {ms['postprocess']:.2f}, mem {ms['memory']:.2f}",
                    f"compile {r['compile_seconds']:.1f} s" if r["compile"] else "-",
                    "-",
                ]
            )
    if status_row("stream_order", "deferred unmap (stream order)"):
        so = st["stream_order"]
        rows.append(
            ["unmap waits for queued work", f"pending {_mib(so['pending_after_unmap'])} until done", "no fault", "ok"]
        )
    return rows


def markdown_table(res: dict, rows: list[list[str]]) -> str:
    """The table as a benchmarks/RESULTS.md section: command, date, device, rows."""
    env = res["environment"]
    flags = {"full": "", "quick": " --quick", "dry-run": " --dry-run", "dry-run-quick": " --dry-run --quick"}
    lines = [
        f"Command: `python benchmarks/gpu_check.py --out DIR{flags[res['mode']]}`  ",
        f"Date: {res['date']}; device: {env.get('device_name')}; torch {env['torch']}, "
        f"CUDA runtime {env.get('cuda_runtime', '-')}; total {res['total_seconds']:.0f} s; "
        f"steps failed: {', '.join(res['failed_steps']) or 'none'}.",
        "",
        "| check | measured | reference | verdict |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(res: dict, rows: list[list[str]]) -> None:
    head = ["check", "measured", "reference", "verdict"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print()
    print(f"torch_elastic_kv GPU check - mode {res['mode']} - {res['environment'].get('device_name')} - {res['date']}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(line)
    failed = res["failed_steps"]
    print(
        f"steps failed: {', '.join(failed) if failed else 'none'}; total {res['total_seconds']:.1f} s; "
        f"results in {res['results_path']}"
    )


# ---------------------------------------------------------------------------------- main -----
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="directory for gpu_results.json (created)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: under 3 minutes on one H200")
    p.add_argument(
        "--dry-run", action="store_true", help="no GPU: fake CUDA driver for driver/arena/allocator, tiny model on CPU"
    )
    p.add_argument("--no-build", action="store_true", help="skip the in-place build (already built)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument(
        "--steps", default=None, help=f"comma-separated subset of: {','.join(n for n, _ in STEPS)} (default: all)"
    )
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out = str(out_dir)
    if args.dry_run:
        # a dry run never touches a real GPU, even on a machine with one: torch must not see it
        # (the arenas' "cuda" memory is the fake driver's host memory)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if not os.environ.get("EKV_LIBCUDA"):
            sys.path.insert(0, str(ROOT / "src"))
            from torch_elastic_kv.testing import fake_cuda_path  # no _C import: safe before a build

            os.environ["EKV_LIBCUDA"] = fake_cuda_path()
    else:
        if "libekv_fake_cuda" in os.environ.get("EKV_LIBCUDA", ""):
            print("[gpu_check] EKV_LIBCUDA points at the fake test driver; a real run unsets it", file=sys.stderr)
            del os.environ["EKV_LIBCUDA"]
        if not cuda_real():
            print("[gpu_check] torch sees no CUDA device: run with --dry-run on a machine without one", file=sys.stderr)
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    s = make_settings(args.dry_run, args.quick, args.device)
    if s.dry_run:
        # CPU figures are for the script's sake only; one intra-op thread keeps them from
        # swinging tenfold on a shared machine (OpenMP barriers wait on descheduled threads)
        torch.set_num_threads(1)
    wanted = None if args.steps is None else {x.strip() for x in args.steps.split(",") if x.strip()}
    unknown = (wanted or set()) - {n for n, _ in STEPS}
    if unknown:
        print(f"[gpu_check] unknown steps {sorted(unknown)}", file=sys.stderr)
        return 2
    res: dict[str, Any] = {
        "schema": 1,
        "mode": s.mode,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": asdict(s),
        "floors": {
            "a100_us_per_2mib": A100_US,
            "decode_tokens_per_s_tolerance": TOKENS_PER_S_TOLERANCE,
            "idle_footprint": "== floor (min_bytes rounded up to chunks)",
        },
        "steps": {},
    }
    res["environment"] = environment(s)
    for name, fn in STEPS:
        if wanted is not None and name not in wanted:
            continue
        res["steps"][name] = run_step(name, fn, s, args, started)
    res["failed_steps"] = [n for n, r in res["steps"].items() if r["status"] in ("failed", "skipped")]
    res["total_seconds"] = time.perf_counter() - started
    path = out_dir / "gpu_results.json"
    res["results_path"] = str(path)
    try:
        rows = build_table(res)
    except Exception as e:  # noqa: BLE001 - the json must still be written
        rows = [["table", "failed", "-", f"{type(e).__name__}: {e}"[:80]]]
        res["failed_steps"].append("table")
    res["table"] = rows
    path.write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "gpu_results.md").write_text(markdown_table(res, rows))
    print_table(res, rows)
    return 1 if res["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
