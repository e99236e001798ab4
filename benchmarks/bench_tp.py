"""Tensor parallel on this machine: ``serve --tensor-parallel-size 2`` vs one process (issue 26).

Same model (the embedded default Llama, random weights, float32), same load, one after the
other, each server on 127.0.0.1: ``--requests`` completions of ``--prompt-tokens`` prompt tokens
and ``--max-tokens`` generated tokens (greedy, ``ignore_eos``), ``--concurrency`` at a time.
Reported per size: wall time of the load, generated tokens per second, and with TP the rounds,
the seconds spent broadcasting the plans (``/admin/stats`` ``tensor_parallel.plan_seconds``)
and their mean per round. Tokens must be identical between the sizes (checked).

On a CPU machine with few cores this measures the overhead of the group (the plan broadcast,
two all-reduces per layer, the token all-gather) and its correctness, not a speed-up: the two
ranks share the same cores that one process would use.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import httpx

from torch_elastic_kv.testing.processes import ServerProcess

ADMIN = "bench-tp"
MODEL = "ekv-default-llama"


def _load(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[float, list[list[int]]]:
    out: list[Any] = [None] * len(prompts)
    next_index = [0]
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(prompts):
                    return
                body = {
                    "model": MODEL,
                    "prompt": prompts[i],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                }
                r = client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                out[i] = r.json()["choices"][0]["token_ids"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sizes", default="1,2", help="tensor-parallel sizes to run, in order (default 1,2)")
    args = p.parse_args(argv)
    prompts = [[(31 * i + 7 * k) % 250 + 8 for i in range(args.prompt_tokens)] for k in range(args.requests)]
    results: dict[str, Any] = {}
    tokens: dict[int, list[list[int]]] = {}
    for size in (int(x) for x in args.sizes.split(",")):
        server = ServerProcess(["--tensor-parallel-size", str(size), "--admin-key", ADMIN, "--max-kv-bytes", "256M"])
        try:
            _load(server.url, prompts[:2], 4, 2)  # warm up: first forwards, oneDNN kernels
            before = httpx.get(server.url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
            wall, got = _load(server.url, prompts, args.max_tokens, args.concurrency)
            stats = httpx.get(server.url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        finally:
            code = server.stop()
        tokens[size] = got
        row: dict[str, Any] = {
            "wall_seconds": round(wall, 3),
            "generated_tokens_per_second": round(args.requests * args.max_tokens / wall, 1),
            "steps": stats["steps"] - before["steps"],
            "exit": code,
        }
        tp, tp0 = stats.get("tensor_parallel"), before.get("tensor_parallel")
        if tp is not None:
            rounds = tp["rounds"] - tp0["rounds"]
            plan = tp["plan_seconds"] - tp0["plan_seconds"]
            row.update(rounds=rounds, plan_seconds=round(plan, 4), plan_ms_per_round=round(1000 * plan / rounds, 3))
        results[f"tp{size}"] = row
        print(f"TP={size}: {json.dumps(row)}", flush=True)
    sizes = sorted(tokens)
    same = all(tokens[s] == tokens[sizes[0]] for s in sizes)
    print(f"tokens identical across sizes {sizes}: {same}", flush=True)
    print(json.dumps({"args": vars(args), "results": results, "tokens_identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
