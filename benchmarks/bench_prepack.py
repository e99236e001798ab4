"""Linear layers: stock nn.Linear (MKL sgemm) vs PackedLinears (oneDNN, weight packed once).

Speed (the default): the shapes of the benchmark Llama (hidden 512, intermediate 1376, vocab
8192, 4 KV heads of 64) at the row counts a continuous-batching step has: 1-10 rows (decode
tails), 64 (every request decoding), 512 (a full prefill chunk), and 9 / 65 / 257 rows, which
``PackedLinears`` pads up to a row bucket (10 / 80 / 320, see ``prepack.padded_rows``). Three
ways are timed in alternation, the order rotating, ``--repeats`` times, keeping the median of
each: ``nn.Linear``, the packed layer, and the packed layer calling the op at the exact row
count (``unbucketed``: what ``PackedLinears`` did before the row buckets). The largest
difference between the packed and the stock outputs is printed too.

Memory (``--rss``): VmRSS of a fresh process while two packed layers (512 -> 1376 -> 512) run
every row count from 1 to ``--rss-rows`` twice, unpacked / packed / packed unbucketed, then
after ``restore()`` and ``malloc_trim``. Each oneDNN input shape is a JIT-compiled primitive
held in two caches (1024 entries each); a new row count costs ~0.55 MiB, and once the caches
are full each miss frees one primitive and builds another, fragmenting the heap.

Engine memory (``--engine-requests N``): VmRSS of a fresh process running the bench_engine
model and Azure trace workload (N requests, ``--engine-concurrency`` in flight: the step's
row count varies with every arrival and finish) with ``prepack_weights`` off, on, and on
without the row buckets; the first ``--engine-warmup`` requests are served to the last
before the rest arrive (the drain takes the batch down to one row), and the growth after
them is what a long-running server would see.

Engine speed (``--engine-speed ROUNDS``): bench_engine's elastic Engine on its D and A
workloads, unpacked / packed / packed unbucketed, in one process and alternating rounds (so
the machine's drift hits the three alike; bench_engine itself cannot run the old path).

Run: python benchmarks/bench_prepack.py [--threads 2] [--rss] [--engine-requests 2000]
     [--engine-speed 5] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_section import replace_section  # noqa: E402
from torch_elastic_kv.hf import prepack  # noqa: E402
from torch_elastic_kv.hf.prepack import PackedLinears, prepack_available  # noqa: E402

log = logging.getLogger("bench_prepack")

SHAPES = [
    ("q_proj / o_proj", 512, 512),
    ("k_proj / v_proj", 512, 256),
    ("gate_proj / up_proj", 512, 1376),
    ("down_proj", 1376, 512),
    ("lm_head", 512, 8192),
]
ROWS = [1, 5, 9, 10, 64, 65, 257, 512]
VARIANTS = ("unpacked", "packed", "packed-unbucketed")
MiB = 1 << 20


def time_call(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn``, over ``inner`` calls."""
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def _unbucketed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The packed op at the input's own row count: PackedLinears before the row buckets."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, RssAnon, RssShmem), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the OS (what fragmentation keeps resident)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- speed -------
@contextlib.contextmanager
def unbucketed_path() -> Iterator[None]:
    """Packed layers call the op at the exact row count while inside (the old forward)."""
    real = prepack._packed_linear
    prepack._packed_linear = _unbucketed
    try:
        yield
    finally:
        prepack._packed_linear = real


def speed_table(repeats: int) -> list[str]:
    lines = [
        "| layer | in x out | rows | nn.Linear us | packed us | packed unbucketed us | "
        "packed / nn.Linear | packed / unbucketed | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, k, n in SHAPES:
        stock = torch.nn.Linear(k, n, bias=False)
        packed_layer = torch.nn.Linear(k, n, bias=False)
        packed_layer.weight.data.copy_(stock.weight.data)
        packed = PackedLinears(packed_layer)
        for m in ROWS:
            x = torch.randn(1, m, k)
            inner = max(3, int(2e8 // (2 * m * k * n + 2e6)))
            with torch.inference_mode():
                diff = (stock(x) - packed_layer(x)).abs().max().item()
                for _ in range(3):
                    stock(x), packed_layer(x)
                    with unbucketed_path():
                        packed_layer(x)
                times: list[list[float]] = [[], [], []]
                for rep in range(repeats):
                    # the order rotates: whichever runs second finds the caches the first
                    # warmed, and the two packed ways share one packed weight
                    for i in (rep % 3, (rep + 1) % 3, (rep + 2) % 3):
                        if i == 0:
                            times[0].append(time_call(lambda: stock(x), inner))
                        elif i == 1:
                            times[1].append(time_call(lambda: packed_layer(x), inner))
                        else:
                            with unbucketed_path():
                                times[2].append(time_call(lambda: packed_layer(x), inner))
            ta, tb, tc = (statistics.median(t) * 1e6 for t in times)
            line = (
                f"| {name} | {k} x {n} | {m} | {ta:.0f} | {tb:.0f} | {tc:.0f} | {ta / tb:.2f}x | "
                f"{tc / tb:.2f}x | {diff:.1e} |"
            )
            lines.append(line)
            log.info("%s", line)
        packed.restore()
    return lines


# ----------------------------------------------------------------------------- memory ------
def child_layers(variant: str, rows: int) -> dict:
    """In a fresh process: two layers over row counts 1..rows, twice; VmRSS along the way."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 1376), torch.nn.Linear(1376, 512))
    if variant == "packed-unbucketed":
        prepack._packed_linear = _unbucketed
    packed = PackedLinears(net) if variant != "unpacked" else None
    out = {"variant": variant, "start": status_mib("VmRSS")}
    with torch.inference_mode():
        for rep in ("pass1", "pass2"):
            for m in range(1, rows + 1):
                net(torch.randn(m, 512))
            out[rep] = status_mib("VmRSS")
    malloc_trim()
    out["trimmed"] = status_mib("VmRSS")
    if packed is not None:
        packed.restore()
    malloc_trim()
    out["restored"] = status_mib("VmRSS")
    return out


def child_engine(variant: str, requests: int, concurrency: int, warmup: int) -> dict:
    """In a fresh process: the bench_engine model serving ``requests`` trace requests with
    ``concurrency`` in flight; VmRSS after the warm-up (its requests served to the last, so
    that the batch sizes have gone down to one) and along the rest."""
    import bench_engine
    from torch_elastic_kv import ElasticPolicy, Engine

    model = bench_engine.build_model()
    trace = next(p for p in bench_engine.TRACE_CANDIDATES if p.exists())
    prompts, outs = bench_engine.load_workload(trace, requests, 32, 512, 96, model.config.vocab_size, seed=0)
    inner = _unbucketed if variant == "packed-unbucketed" else prepack._packed_linear
    shapes: set[tuple] = set()

    def counting(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        shapes.add((tuple(packed.shape), rows if inner is _unbucketed else prepack.padded_rows(rows)))
        return inner(x, packed, bias)

    prepack._packed_linear = counting
    eng = Engine(
        model,
        policy=ElasticPolicy(max_bytes=96 * MiB),
        max_batch_tokens=512,
        prepack_weights=False if variant == "unpacked" else True,
    )
    rows: set[int] = set()
    marks: list[dict] = []
    nxt, finished, _tokens = 0, 0, 0
    t0 = time.perf_counter()
    live: list[int] = []
    while finished < requests:
        # the warm-up requests run to the end before the rest arrive: the drain steps down
        # through every small batch size once, as a server's quiet moments will
        while nxt < (warmup if finished < warmup else requests) and len(live) < concurrency:
            live.append(eng.add_request(prompts[nxt], outs[nxt]))
            nxt += 1
        eng.step()
        if eng.timeline:
            rows.add(eng.timeline[-1]["num_tokens"])
        still = [r for r in live if eng.request_info(r)["finish_time"] is None]
        done = len(live) - len(still)
        live = still
        before, finished = finished, finished + done
        for mark in sorted({warmup, requests} | set(range(500, requests, 500))):
            if before < mark <= finished:
                marks.append(
                    {
                        "requests": finished,
                        "vmrss": status_mib("VmRSS"),
                        "shmem": status_mib("RssShmem"),
                        "distinct_rows": len(rows),
                        "op_shapes": len(shapes),
                    }
                )
    wall = time.perf_counter() - t0
    st = eng.stats()
    eng.close()
    return {
        "variant": variant,
        "marks": marks,
        "seconds": wall,
        "tokens_per_s": st["tokens_generated"] / wall,
        "prepacked_layers": st["prepacked_layers"],
    }


def run_child(args: list[str]) -> dict:
    """Run this script in a fresh process for one measurement; its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_table(rows: int, threads: int) -> list[str]:
    lines = [
        f"| variant | start MiB | after 1..{rows} rows MiB | after a second pass MiB | "
        "after malloc_trim MiB | after restore + trim MiB |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = run_child(["--child", "layers", "--variant", v, "--rss-rows", str(rows), "--threads", str(threads)])
        line = (
            f"| {v} | {r['start']:.0f} | {r['pass1']:.0f} | {r['pass2']:.0f} | {r['trimmed']:.0f} | "
            f"{r['restored']:.0f} |"
        )
        lines.append(line)
        log.info("%s", line)
    return lines


def engine_table(requests: int, concurrency: int, warmup: int, threads: int) -> list[str]:
    lines = [
        f"| prepack_weights | VmRSS after {warmup} requests MiB | VmRSS at the end MiB | growth MiB | "
        "growth without RssShmem (KV pool) MiB | distinct step row counts | tok/s | VmRSS along the way |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = run_child(
            [
                "--child",
                "engine",
                "--variant",
                v,
                "--engine-requests",
                str(requests),
                "--engine-concurrency",
                str(concurrency),
                "--engine-warmup",
                str(warmup),
                "--threads",
                str(threads),
            ]
        )
        w = next(m for m in r["marks"] if m["requests"] >= warmup)
        e = r["marks"][-1]
        name = {"unpacked": "False", "packed": "on (row buckets)", "packed-unbucketed": "on, unbucketed (before)"}[v]
        along = " / ".join(f"{m['vmrss']:.0f}" for m in r["marks"])
        line = (
            f"| {name} | {w['vmrss']:.0f} | {e['vmrss']:.0f} | {e['vmrss'] - w['vmrss']:+.0f} | "
            f"{(e['vmrss'] - e['shmem']) - (w['vmrss'] - w['shmem']):+.0f} | {e['distinct_rows']} | "
            f"{r['tokens_per_s']:.0f} | {along} |"
        )
        lines.append(line)
        log.info("%s", line)
    return lines


def engine_speed(workload: str, rounds: int) -> list[str]:
    """bench_engine's elastic Engine on its D or A workload, unpacked / packed / packed
    unbucketed in one process, in alternating rounds (order rotating), after one untimed round."""
    import bench_engine

    model = bench_engine.build_model()
    trace = next(p for p in bench_engine.TRACE_CANDIDATES if p.exists())
    if workload == "D":  # the decode-heavier workload of the Engine section
        prompts, outs = bench_engine.load_workload(trace, 64, 32, 512, 256, model.config.vocab_size, 0, output_scale=4)
        max_bytes = 192 * MiB
    else:  # A: the trace's own prefill-heavy shape
        prompts, outs = bench_engine.load_workload(trace, 48, 32, 512, 96, model.config.vocab_size, 0)
        max_bytes = 96 * MiB
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rnd in range(rounds + 1):
        order = VARIANTS[rnd % 3 :] + VARIANTS[: rnd % 3]
        for v in order:
            ctx = unbucketed_path() if v == "packed-unbucketed" else contextlib.nullcontext()
            with ctx:
                r = bench_engine.run_engine(model, prompts, outs, max_bytes, False, 512, 0.2, prepack=v != "unpacked")
            log.info(
                "  [%s %d/%d] %s: %.1f tok/s, %.1f tok/CPU-s (load %.2f)",
                workload,
                rnd,
                rounds,
                v,
                r["tokens_per_s"],
                r["tokens_per_cpu_s"],
                os.getloadavg()[0],
            )
            if rnd:
                runs[v].append(r)
    lines = []
    for v in VARIANTS:
        tps = [r["tokens_per_s"] for r in runs[v]]
        cps = [r["tokens_per_cpu_s"] for r in runs[v]]
        cells = [f"{statistics.median(tps):.1f}", f"{statistics.median(cps):.1f}"]
        for ref in ("unpacked", "packed-unbucketed"):
            if ref == v:
                cells.append("")
                continue
            cells.append(
                " / ".join(
                    f"{statistics.median(a[k] / b[k] for a, b in zip(runs[v], runs[ref])):.3f}"
                    for k in ("tokens_per_s", "tokens_per_cpu_s")
                )
            )
        cells.append(" / ".join(f"{x:.0f}" for x in tps))
        lines.append(f"| {workload} | {v} | " + " | ".join(cells) + " |")
        log.info("%s", lines[-1])
    return lines


# ----------------------------------------------------------------------------- main --------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-speed", action="store_true", help="skip the timing table")
    ap.add_argument("--rss", action="store_true", help="measure VmRSS of two layers over many row counts")
    ap.add_argument("--rss-rows", type=int, default=2048)
    ap.add_argument("--engine-requests", type=int, default=0, help="measure an Engine's VmRSS over N requests")
    ap.add_argument("--engine-concurrency", type=int, default=32)
    ap.add_argument("--engine-warmup", type=int, default=200)
    ap.add_argument(
        "--engine-speed",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time the elastic Engine unpacked / packed / unbucketed on bench_engine's D and A",
    )
    ap.add_argument("--write", type=str, default=None, help="RESULTS.md to put the tables in")
    ap.add_argument("--child", choices=("layers", "engine"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not prepack_available():
        sys.exit("this torch build has no usable oneDNN linear")
    torch.set_num_threads(args.threads)
    if args.child:
        r = (
            child_layers(args.variant, args.rss_rows)
            if args.child == "layers"
            else child_engine(args.variant, args.engine_requests, args.engine_concurrency, args.engine_warmup)
        )
        sys.stdout.write(json.dumps(r) + "\n")
        return
    torch.manual_seed(0)
    log.info("torch %s, %d threads, load average %.2f", torch.__version__, args.threads, os.getloadavg()[0])
    thr = f" --threads {args.threads}" if args.threads != 2 else ""
    sections: list[tuple[str, list[str]]] = []
    if not args.no_speed:
        lines = speed_table(args.repeats)
        sections.append(
            (
                "bench_prepack",
                [
                    "## Linear layers: nn.Linear vs oneDNN-prepacked weights (PackedLinears)",
                    f"Command: `python benchmarks/bench_prepack.py{thr} --write benchmarks/RESULTS.md` ({args.threads} "
                    f"thread{'s' if args.threads != 1 else ''}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at the end; median "
                    f"of {args.repeats} alternating timings per shape, the order rotating). float32, no bias, input [1, rows, in]; "
                    "`packed` pads the rows up to a row bucket (9 -> 10, 65 -> 80, 257 -> 320), "
                    "`unbucketed` is the packed layer calling the op at the exact row count (before the buckets).",
                    "",
                    *lines,
                ],
            )
        )
    if args.rss:
        lines = rss_table(args.rss_rows, args.threads)
        sections.append(
            (
                "bench_prepack_rss",
                [
                    "### VmRSS: two layers over many row counts",
                    f"Command: `python benchmarks/bench_prepack.py{thr} --no-speed --rss --rss-rows {args.rss_rows} "
                    f"--write benchmarks/RESULTS.md` (one fresh process per row; layers 512 -> 1376 -> 512 with "
                    f"bias, input [rows, 512], rows 1..{args.rss_rows} in order, twice).",
                    "",
                    *lines,
                ],
            )
        )
    if args.engine_requests:
        lines = engine_table(args.engine_requests, args.engine_concurrency, args.engine_warmup, args.threads)
        sections.append(
            (
                "bench_prepack_engine_rss",
                [
                    "### VmRSS: an Engine serving many requests",
                    f"Command: `python benchmarks/bench_prepack.py{thr} --no-speed --engine-requests "
                    f"{args.engine_requests} --engine-concurrency {args.engine_concurrency} --engine-warmup "
                    f"{args.engine_warmup} --write benchmarks/RESULTS.md` (one fresh process per row; the "
                    "bench_engine model and Azure code trace rows, prompt = ContextTokens/32 capped at 512, "
                    f"output = GeneratedTokens capped at 96, {args.engine_concurrency} requests in flight, "
                    "max_batch_tokens 512, ElasticPolicy(max_bytes=96 MiB), Engine defaults otherwise; "
                    "tok/s is one run each, not a throughput benchmark).",
                    "",
                    *lines,
                ],
            )
        )
    if args.engine_speed:
        lines = [*engine_speed("D", args.engine_speed), *engine_speed("A", args.engine_speed)]
        sections.append(
            (
                "bench_prepack_engine_speed",
                [
                    "### Engine throughput: unpacked / packed / packed unbucketed, in one process",
                    f"Command: `python benchmarks/bench_prepack.py{thr} --no-speed --engine-speed {args.engine_speed} "
                    f"--write benchmarks/RESULTS.md` (bench_engine's `run_engine`, elastic pool, on its D and A "
                    f"workloads; {args.engine_speed} rounds after an untimed one, the three in rotating order; "
                    f"load average {os.getloadavg()[0]:.2f} at the end). Ratios: median of the per-round ratios, "
                    "tok/s / tok/CPU-s.",
                    "",
                    "| workload | variant | tok/s | tok/CPU-s | vs unpacked | vs unbucketed | tok/s per round |",
                    "|---|---|---|---|---|---|---|",
                    *lines,
                ],
            )
        )
    if args.write:
        for name, body in sections:
            begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
            replace_section(args.write, begin, end, "\n".join([begin, *body, end]))


if __name__ == "__main__":
    main()
