"""Linear layers: stock nn.Linear (MKL sgemm) vs PackedLinears (oneDNN, weight packed once).

The shapes of the benchmark Llama (hidden 512, intermediate 1376, vocab 8192, 4 KV heads of
64) at the row counts a continuous-batching step has: 1-10 rows (decode tails), 64 (every
request decoding), 512 (a full prefill chunk). For each shape the two are timed in
alternation, ``--repeats`` times, and the median of each is kept; the largest difference
between the two outputs is printed too.

Run: python benchmarks/bench_prepack.py [--threads 2] [--write benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_section import replace_section  # noqa: E402
from torch_elastic_kv.hf.prepack import PackedLinears, prepack_available  # noqa: E402

SHAPES = [("q_proj / o_proj", 512, 512), ("k_proj / v_proj", 512, 256),
          ("gate_proj / up_proj", 512, 1376), ("down_proj", 1376, 512), ("lm_head", 512, 8192)]
ROWS = [1, 5, 10, 64, 512]


def time_call(fn, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", type=str, default=None, help="RESULTS.md to put the table in")
    args = ap.parse_args()
    if not prepack_available():
        sys.exit("this torch build has no usable oneDNN linear")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["| layer | in x out | rows | nn.Linear us | packed us | speed-up | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
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
                a, b = [], []
                for _ in range(args.repeats):
                    a.append(time_call(lambda: stock(x), inner))
                    b.append(time_call(lambda: packed_layer(x), inner))
            ta, tb = statistics.median(a) * 1e6, statistics.median(b) * 1e6
            line = f"| {name} | {k} x {n} | {m} | {ta:.0f} | {tb:.0f} | {ta / tb:.2f}x | {diff:.1e} |"
            lines.append(line)
            print(line, flush=True)
        packed.restore()
    cmd = "python benchmarks/bench_prepack.py" + (f" --threads {args.threads}" if args.threads != 2 else "")
    if args.write:
        section = "\n".join([
            "<!-- bench_prepack:begin -->",
            "## Linear layers: nn.Linear vs oneDNN-prepacked weights (PackedLinears)",
            f"Command: `{cmd} --write benchmarks/RESULTS.md` ({args.threads} threads, torch "
            f"{torch.__version__}, load average {os.getloadavg()[0]:.2f} at the end; median of "
            f"{args.repeats} alternating timings per shape). float32, no bias, input [1, rows, in].",
            "",
            *lines,
            "<!-- bench_prepack:end -->"])
        replace_section(args.write, "<!-- bench_prepack:begin -->", "<!-- bench_prepack:end -->", section)


if __name__ == "__main__":
    main()
