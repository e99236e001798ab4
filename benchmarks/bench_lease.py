"""How fast a lower lease takes effect in an Engine that nobody steps (issue 22).

An Engine holds mapped KV memory while idle (a long ``idle_seconds``, so the policy would not
give it back); the lease on its budget drops (what a broker reclaim does); we time until its
resident bytes are under the lease. The budget's change wakes the memory thread: no poll.

    python benchmarks/bench_lease.py [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.testing.models import tiny_llama

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    model = tiny_llama(hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    seconds = []
    for _ in range(args.trials):
        policy = ElasticPolicy(max_bytes=32 * MiB, idle_seconds=30.0)
        eng = Engine(model, policy=policy, background=True, prefix_caching=False)
        eng.generate([[5] * 600] * 4, 2)
        before = eng.stats()["resident_bytes"]
        t = time.perf_counter()
        eng.budget.set_lease(2 * MiB)
        while eng.stats()["resident_bytes"] > 2 * MiB:
            time.sleep(0.0005)
        seconds.append(time.perf_counter() - t)
        eng.close()
    print(f"resident before: {before / MiB:.0f} MiB; lease: 2 MiB; trials: {args.trials}")
    print("seconds until resident <= lease, nothing stepping: " + ", ".join(f"{s:.4f}" for s in seconds))
    print(f"median {statistics.median(seconds):.4f} s")


if __name__ == "__main__":
    main()
