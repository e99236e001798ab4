"""Arena benchmark: map and unmap latency per granule, with and without handle reuse, on the
host backend and on the cuda backend (the real driver when present, else the fake driver);
and bytes given back per second.

    python benchmarks/bench_arena.py                       # print the table
    python benchmarks/bench_arena.py --write benchmarks/RESULTS.md

What each row times, per granule (one map/unmap call per granule, so call overhead counts):
  map          map() of one granule. "reuse": the handle comes from the arena's cache
               (no create); "no reuse": reuse_bytes=0, every map creates a physical handle.
  unmap        unmap() of one granule. On cuda it records an event and returns; the driver
               unmap happens when the event is seen complete (poll/trim), timed as "finish".
  unmap total  all unmap() calls plus the poll() (reuse) or trim(wait=True) (no reuse) that
               finishes them, divided by the granule count: the amortized cost of giving a
               granule up, including the deferred driver unmap and the release or caching
               (an unmap call itself works down a backlog of more than 64 pending events).
  give-back    bytes per second for unmap + finish + trim of the whole mapped range, i.e.
               how fast mapped memory goes back to the OS/driver when handles are not reused.

``--paths`` (fake driver, with the A100's per-call latencies set on it: 200 us per cuMemCreate,
36 us per cuMemSetAccess) prints the issue 14 items 5-7 figures instead, each as before/after
in one build (the "before" replays the old call pattern or lock holding):
  map_range    one map of N granules: one cuMemSetAccess per granule (N one-granule maps, as
               the arena did before) vs one per run; fresh handles and reused ones.
  regrow       a pool grown by the Engine's controller, shrunk after idle, grown again: the
               regrow's cuMemCreate calls and time with the shrink trimming (before) vs keeping
               the reuse caches (after).
  lock wait    how long schedule()-like pool calls (Engine pool lock, alloc + free of a page in a
               mapped chunk) wait while the background grower maps: grow under both locks
               (before) vs outside them (after).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from results_section import replace_section  # noqa: E402  (beside this script)
from torch_elastic_kv import Arena

MiB = 1 << 20
BEGIN = "<!-- bench_arena:begin -->"
END = "<!-- bench_arena:end -->"


def _us(samples: list[float]) -> str:
    med = statistics.median(samples) * 1e6
    p90 = sorted(samples)[int(0.9 * (len(samples) - 1))] * 1e6
    return f"{med:.1f} / {p90:.1f}"


def _cuda_device() -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """The real driver if torch sees a GPU, else the fake driver from the tests."""
    if torch.cuda.is_available() and "EKV_LIBCUDA" not in os.environ:
        return "cuda", contextlib.nullcontext
    from torch_elastic_kv.testing import use_fake_cuda

    return "cuda(fake)", use_fake_cuda


def bench_one(device: str, reuse: bool, granules: int, rounds: int) -> dict[str, object]:
    capacity = granules * 2 * MiB
    with Arena(capacity, device=device, reuse_bytes=capacity if reuse else 0) as a:
        g = a.granularity
        n = min(granules, a.capacity // g)
        maps: list[float] = []
        unmaps: list[float] = []
        finish: list[float] = []
        give_back: list[float] = []
        pc = time.perf_counter
        for r in range(rounds + 1):  # round 0 warms up (and fills the cache with reuse)
            rm, ru = [], []
            for i in range(n):
                t0 = pc()
                a.map(i * g, g)
                rm.append(pc() - t0)
            t_start = pc()
            for i in range(n):
                t0 = pc()
                a.unmap(i * g, g)
                ru.append(pc() - t0)
            if reuse:
                a.poll()
            else:
                a.trim(wait=True)
            t_total = pc() - t_start
            if r > 0:
                maps += rm
                unmaps += ru
                finish.append(t_total / n)
                if not reuse:
                    give_back.append(n * g / t_total)
            assert a.stats()["mapped_bytes"] == 0
        creates = a.stats()["creates"]
    return {
        "map": _us(maps),
        "unmap": _us(unmaps),
        "finish": f"{statistics.median(finish) * 1e6:.1f}",
        "give_back": f"{statistics.median(give_back) / (1 << 30):.1f} GiB/s" if give_back else "-",
        "creates": creates,
        "granule": g,
        "n": n,
    }


def run(granules: int, rounds: int) -> str:
    cuda_name, cuda_ctx = _cuda_device()
    rows = []
    for backend, device, ctx in (("host", "cpu", contextlib.nullcontext), (cuda_name, "cuda", cuda_ctx)):
        with ctx():
            for reuse in (True, False):
                res = bench_one(device, reuse, granules, rounds)
                rows.append((backend, "reuse" if reuse else "no reuse", res))
    g = rows[0][2]["granule"]
    lines = [
        f"{rows[0][2]['n']} granules of {g // MiB} MiB, {rounds} rounds after a warm-up; "
        "latency per granule in microseconds as median / p90.",
        "",
        "| backend | handles | map (us) | unmap call (us) | unmap total (us/granule) | give-back | creates |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, mode, r in rows:
        lines.append(
            f"| {backend} | {mode} | {r['map']} | {r['unmap']} | {r['finish']} | {r['give_back']} | {r['creates']} |"
        )
    return "\n".join(lines)


def write_results(path: Path, table: str, command: str) -> None:
    load = os.getloadavg()[0]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, torch {torch.__version__}; "
        f"1-minute load average {load:.1f} when written (other work on the machine inflates p90 and "
        "the no-reuse rows)"
    )
    section = "\n".join(
        [
            BEGIN,
            "## Arena: map / unmap latency per granule, give-back rate",
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine}.",
            "",
            table,
            "",
            "- *map, reuse*: the handle comes from the arena's cache; *no reuse*: every map creates a "
            "physical handle (host: `fallocate` of 2 MiB in a memfd; cuda: `cuMemCreate`).",
            "- *unmap call* on cuda records an event and returns; *unmap total* amortizes all unmap "
            "calls plus the deferred part (driver unmap, then cache or release) that `poll()`/`trim()` "
            "do once the events completed.",
            "- *give-back*: unmap + finish + trim of the whole range with no reuse, as bytes per second.",
            "- cuda(fake) is the test driver over host memory: it measures the backend's own overhead, "
            "not a GPU (an A100 is quoted at ~200 us per 2 MiB cuMemCreate, ~1.5 us per cuMemMap).",
            END,
        ]
    )
    replace_section(path, BEGIN, END, section)


# -- issue 14 items 5-7 on the fake driver ---------------------------------------------------
CREATE_S, SET_ACCESS_S = 200e-6, 36e-6  # A100 per 2 MiB granule (gpu_check.py's floors)


def _latencies(fake) -> None:
    fake.set_latency("cuMemCreate", CREATE_S)
    fake.set_latency("cuMemSetAccess", SET_ACCESS_S)


def paths_map_range(granules: int, rounds: int) -> list[str]:
    from torch_elastic_kv.testing import use_fake_cuda

    rows = []
    with use_fake_cuda() as fake:
        _latencies(fake)
        for reuse in (False, True):
            for per_run in (False, True):
                cap = granules * 2 * MiB
                with Arena(cap, device="cuda", reuse_bytes=cap if reuse else 0) as a:
                    g = a.granularity
                    times, calls = [], []
                    for r in range(rounds + 1):  # round 0 fills the cache (reuse)
                        before = fake.calls("cuMemSetAccess")
                        t0 = time.perf_counter()
                        if per_run:
                            a.map(0, granules * g)
                        else:
                            for k in range(granules):
                                a.map(k * g, g)
                        dt = time.perf_counter() - t0
                        if r > 0:
                            times.append(dt / granules)
                            calls.append(fake.calls("cuMemSetAccess") - before)
                        a.unmap(0, granules * g)
                        a.poll() if reuse else a.trim(wait=True)
                rows.append(
                    f"| {'reused' if reuse else 'created'} | {'per run (after)' if per_run else 'per granule (before)'} "
                    f"| {statistics.median(calls):.0f} | {statistics.median(times) * 1e6:.1f} |"
                )
    return [
        f"map of {granules} granules (2 MiB) in one range, {rounds} rounds, median:",
        "",
        "| handles | set-access | cuMemSetAccess per map | us per granule |",
        "|---|---|---|---|",
        *rows,
    ]


def _controller(pool, clock=None, pool_lock=None, background=False):
    import threading

    from torch_elastic_kv.engine.memory import MemoryController
    from torch_elastic_kv.engine.policy import ElasticPolicy
    from torch_elastic_kv.testing.standins import PoolDemand

    kw = {"clock": clock} if clock is not None else {}
    policy = ElasticPolicy(max_bytes=pool.max_bytes, idle_seconds=1.0, headroom=0.0, **kw)
    demand = PoolDemand(pool)
    ctrl = MemoryController(
        pool,
        policy,
        demand,
        demand,
        step_lock=threading.RLock(),
        pool_lock=pool_lock or threading.RLock(),
        grow_in_background=background,
    )
    return ctrl, demand


def _pool(chunks: int):
    from torch_elastic_kv.kv.pool import KVPagePool

    # 2 MiB chunks (page-major, 128 pages of 16 KiB)
    return KVPagePool(2, 2, 64, torch.float16, device="cuda:0", page_tokens=16, max_bytes=chunks * 2 * MiB)


def paths_regrow(chunks: int, rounds: int) -> list[str]:
    from torch_elastic_kv.testing import ManualClock, use_fake_cuda

    rows = []
    with use_fake_cuda() as fake:
        for keep in (False, True):
            times, creates = [], []
            for _ in range(rounds):
                clock = ManualClock(0.0)
                with _pool(chunks) as pool:
                    ctrl, demand = _controller(pool, clock)
                    ctrl.keep_reuse = keep  # False: the shrink trims, as every shrink did before
                    demand.waiting = chunks * ctrl.chunk_pages
                    ctrl.tick()
                    demand.waiting = 0
                    while pool.resident_bytes:  # the idle shrink
                        clock.advance(0.5)
                        ctrl.tick()
                    _latencies(fake)
                    demand.waiting = chunks * ctrl.chunk_pages
                    c0 = fake.calls("cuMemCreate")
                    t0 = time.perf_counter()
                    ctrl.tick()
                    times.append(time.perf_counter() - t0)
                    creates.append(fake.calls("cuMemCreate") - c0)
                    fake.reset()
            rows.append(
                f"| {'kept across the shrink (after)' if keep else 'trimmed at the shrink (before)'} "
                f"| {statistics.median(creates):.0f} | {statistics.median(times) * 1e3:.2f} |"
            )
    return [
        f"grow of {chunks} chunks (2 MiB) after an idle shrink to 0, {rounds} rounds, median:",
        "",
        "| reuse caches | cuMemCreate in the regrow | regrow (ms) |",
        "|---|---|---|",
        *rows,
    ]


def paths_lock_wait(chunks: int, rounds: int) -> list[str]:
    import threading

    from torch_elastic_kv.testing import use_fake_cuda

    rows = []
    with use_fake_cuda() as fake:
        for outside in (False, True):
            waits: list[float] = []
            grows: list[float] = []
            for _ in range(rounds):
                with _pool(chunks + 1) as pool:
                    pool_lock = threading.RLock()
                    ctrl, _ = _controller(pool, pool_lock=pool_lock, background=True)
                    per = ctrl.chunk_pages
                    pool.reserve_pages(per)  # one mapped chunk for the step's pages
                    _latencies(fake)
                    done, started = threading.Event(), threading.Event()

                    def grower() -> None:
                        t0 = time.perf_counter()
                        started.set()
                        if outside:
                            ctrl.grow_to((chunks + 1) * per)
                        else:  # before: reserve_pages under the Engine's and the pool's lock
                            with pool_lock, pool._lock:
                                pool.reserve_pages(chunks * per)
                        grows.append(time.perf_counter() - t0)
                        done.set()

                    th = threading.Thread(target=grower)
                    th.start()
                    started.wait()
                    while True:  # schedule()/postprocess()-like calls until the grow returns
                        t0 = time.perf_counter()
                        with pool_lock:
                            page = pool.alloc(1)
                            pool.free(page)
                        waits.append(time.perf_counter() - t0)
                        if done.is_set():
                            break
                        time.sleep(0.0002)
                    th.join()
                    fake.reset()
            waits.sort()
            rows.append(
                f"| {'outside the locks (after)' if outside else 'under both locks (before)'} "
                f"| {statistics.median(grows) * 1e3:.2f} | {len(waits)} "
                f"| {statistics.median(waits) * 1e6:.0f} | {waits[int(0.99 * (len(waits) - 1))] * 1e6:.0f} "
                f"| {waits[-1] * 1e6:.0f} |"
            )
    return [
        f"background grow of {chunks} chunks (2 MiB) while another thread loops Engine-pool-lock + "
        f"alloc(1) + free, {rounds} rounds:",
        "",
        "| grow maps | grow (ms, median) | pool calls | wait median (us) | p99 (us) | max (us) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def run_paths(granules: int, chunks: int, rounds: int) -> str:
    out = paths_map_range(granules, rounds) + [""] + paths_regrow(chunks, rounds) + [""]
    return "\n".join(out + paths_lock_wait(chunks, rounds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--granules", type=int, default=128, help="granules mapped per round (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--write", type=Path, default=None, help="update this RESULTS.md's arena section")
    p.add_argument("--paths", action="store_true", help="issue 14 items 5-7 on the fake driver (see above)")
    p.add_argument("--chunks", type=int, default=16, help="--paths: chunks per grow (default 16)")
    args = p.parse_args(argv)
    if args.paths:
        print(run_paths(args.granules, args.chunks, args.rounds))
        return 0
    table = run(args.granules, args.rounds)
    print(table)
    if args.write is not None:
        cmd = "python benchmarks/bench_arena.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(args.write, table, cmd.strip())
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
