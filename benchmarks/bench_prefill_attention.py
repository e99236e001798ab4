"""Causal prefill attention on CPU: torch's SDPA (flash) against our native kernel, side by side.

One sequence of ``n`` tokens attends causally over itself, the shape the Engine's prefill
chunks have at position 0. For each length: the median time of ``--repeats`` calls of torch's
``scaled_dot_product_attention(is_causal=True)`` and of ``causal_prefill_attention`` at each
instruction-set level this CPU runs, and the causal GFLOP/s (``2 n^2 d`` per query head: half of
``Q K^T`` and half of ``P V``). Both get the same inputs and ``--threads`` threads; the kernel's
output is checked against SDPA's before it is timed.

    python benchmarks/bench_prefill_attention.py [--lengths 130,256,454,1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_elastic_kv.hf.prefill_attention import causal_prefill_attention, isa_levels

ISA_NAMES = {4: "native avx512", 3: "native avx2", 1: "native portable"}


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=_positive_ints, default=[130, 256, 454, 1024], help="sequence lengths")
    p.add_argument("--heads", type=_positive_int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="KV heads (default: = heads)")
    p.add_argument("--head-dim", type=_positive_int, default=64, help="head dim (default 64)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch and kernel threads (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed calls per system (default 20)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm: first-call allocations and thread start-up are not what is measured
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in args.lengths:
        q = torch.randn(n, args.heads, args.head_dim, generator=gen)
        k = torch.randn(n, args.kv_heads, args.head_dim, generator=gen)
        v = torch.randn(n, args.kv_heads, args.head_dim, generator=gen)
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        gqa = args.heads != args.kv_heads

        def sdpa():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)

        reference = sdpa()[0].transpose(0, 1)
        systems = {"torch sdpa": sdpa}
        out = torch.empty_like(q)
        for level in isa_levels():
            got = causal_prefill_attention(q, k, v, out=out, threads=args.threads, isa=level)
            torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-3)
            systems[ISA_NAMES[level]] = lambda level=level: causal_prefill_attention(
                q, k, v, out=out, threads=args.threads, isa=level
            )
        flops = 2 * n * n * args.head_dim * args.heads
        base = None
        for name, fn in systems.items():
            seconds = _median_seconds(fn, args.repeats)
            base = seconds if base is None else base
            rows.append(dict(n=n, system=name, us=seconds * 1e6, gflops=flops / seconds / 1e9, speedup=base / seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(
        f"causal prefill attention: heads {args.heads}, kv heads {args.kv_heads}, head dim {args.head_dim}, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'n':>6} {'system':<16} {'us':>10} {'GFLOP/s':>8} {'vs sdpa':>8}")
    for r in rows:
        print(f"{r['n']:>6} {r['system']:<16} {r['us']:>10.0f} {r['gflops']:>8.1f} {r['speedup']:>7.2f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(dict(settings=vars(args) | {"out": str(args.out)}, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
