"""What differs between the transformers 5.x releases this package supports (5.17 and newer).

The one difference callers see is the keyword that hands a model its cache: every 5.x release
takes ``past_key_values=``; 5.24 added ``cache=`` and deprecated ``past_key_values=`` (a
FutureWarning per call site, removal announced for a later release). ``cache_kwargs`` picks the
keyword the model's own ``forward`` declares, so the same call works, silently, on all of them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_keyword(model: torch.nn.Module) -> str:
    """``"cache"`` when ``model.forward`` declares that parameter (5.24+), else ``"past_key_values"``."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # a forward inspect cannot read: the keyword every 5.x takes
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)`` on this release."""
    return {cache_keyword(model): cache}


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder-only transformers config (its text
    config for a multimodal one): the shape a KV pool for the model needs."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim
