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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--granules", type=int, default=128, help="granules mapped per round (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--write", type=Path, default=None, help="update this RESULTS.md's arena section")
    args = p.parse_args(argv)
    table = run(args.granules, args.rounds)
    print(table)
    if args.write is not None:
        cmd = "python benchmarks/bench_arena.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(args.write, table, cmd.strip())
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
