"""The benchmark harness behind ``python -m torch_elastic_kv bench`` (and ``ekv-bench``).

It replays a request trace on the wall clock through the elastic Engine, the same Engine with a
static pool, transformers ``generate`` and transformers continuous batching, and reports KV
memory over time, latency and throughput side by side. Files: ``cli`` (arguments),
``traces`` (synthetic and CSV traces, scaling), ``models`` (the model under test), ``replay``
(the one harness that drives an Engine through requests on the wall clock), ``systems``
(running each system), ``metrics`` (figures from a run), ``report`` (table, JSON, plots),
``progress`` (the progress bar), ``run`` (one run end to end).
"""

from __future__ import annotations

from .cli import bench_main

__all__ = ["bench_main"]
