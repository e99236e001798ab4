"""torch_elastic_kv: elastic KV-cache memory for PyTorch LLM inference.

Physical memory backs the KV cache only where live KV data sits; it is given back to the
driver when demand falls and taken again when demand rises, while the model keeps running.

Layers, each importing only from those above it in this list (tests/test_layering.py):

- ``memory``  — arenas over reserved address space, per-device budgets, the torch allocator;
- ``kv``      — the KV page pool, page placement, page tables, host swap space;
- ``hf``      — the transformers ``Cache``, the step planner, paged attention, prepacking;
- ``engine``  — continuous batching: requests, scheduler, model runner, memory controller;
- ``broker``  — the memory broker between processes (``broker`` / ``top`` subcommands) and a
  tenant's ``BrokerClient``;
- ``bench``   — the benchmark harness (the ``bench`` subcommand);
- ``testing`` — fake driver control, clocks, /proc readers, tiny models, stand-ins.

Public names are imported lazily so that ``import torch_elastic_kv`` works without
transformers installed and without a GPU. ``allocator`` (``memory.allocator``, torch's pluggable
allocator over the core) stays importable as ``from torch_elastic_kv import allocator``, as the
README shows it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Arena": "memory.arena",
    "set_budget": "memory.arena",
    "memory_stats": "memory.arena",
    "host_memory": "memory.arena",
    "KVPagePool": "kv.pool",
    "ElasticPagedCache": "hf.cache",
    "ElasticPolicy": "engine.policy",
    "Engine": "engine.engine",
    "BrokerClient": "broker.client",
}

# public name -> submodule it stands for
_MODULES = {"allocator": "memory.allocator"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_elastic_kv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
