"""Test aids, for this project's tests and benchmarks and for users testing code built on it.

- ``fake_cuda``: the fake CUDA driver (``use_fake_cuda``, ``FakeCuda``), so the cuda backend
  runs on a machine with no GPU;
- ``proc``: byte counts from /proc (``rss_shmem``, ``machine_shmem``, ``vm_rss``, a process
  tree's ``tree_memory``);
- ``processes``: the package's server and broker (and any HTTP server command) as subprocesses;
- ``sampling``: ``parse_metrics`` (a Prometheus page) and ``LoadSampler`` (servers' /metrics and
  memory polled on a thread), what the serving benchmarks watch;
- ``clock``: ``ManualClock``;
- ``models``: tiny causal LMs built from configs with random weights and a fixed seed
  (needs transformers; import ``torch_elastic_kv.testing.models`` explicitly).
"""

from __future__ import annotations

from .clock import ManualClock
from .fake_cuda import FakeCuda, fake_cuda_path, use_fake_cuda
from .proc import machine_shmem, rss_shmem, vm_rss

__all__ = ["FakeCuda", "ManualClock", "fake_cuda_path", "machine_shmem", "rss_shmem", "use_fake_cuda", "vm_rss"]
