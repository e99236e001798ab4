"""torch_elastic_kv: elastic KV-cache memory for PyTorch LLM inference.

Physical memory backs the KV cache only where live KV data sits; it is given back to the
driver when demand falls and taken again when demand rises, while the model keeps running.

Public names are imported lazily so that ``import torch_elastic_kv`` works without
transformers installed and without a GPU.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Arena": "arena",
    "set_budget": "arena",
    "memory_stats": "arena",
    "host_memory": "arena",
    "KVPagePool": "pool",
    "ElasticPagedCache": "cache",
    "ElasticPolicy": "policy",
    "Engine": "engine",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_elastic_kv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
