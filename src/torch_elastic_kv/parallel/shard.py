"""Split a Llama-family model between the ranks of a tensor-parallel group, in place.

Megatron's layout, as transformers' ``base_model_tp_plan`` names it for Llama: q/k/v and the
MLP's gate/up projections are column-parallel (each rank keeps the output rows of its heads,
or of its slice of the intermediate size), o_proj and down_proj are row-parallel (each rank
keeps the matching input columns, and their outputs are summed over the ranks with one
all-reduce each). Embeddings, norms and the LM head stay whole on every rank, so every rank
computes the same logits.

Why not transformers' ``tp_plan="auto"``: in the installed transformers (5.x) it loads through
``from_pretrained`` only, needs ``accelerate``, and turns the weights into DTensors; the paged
attention kernels and the prepacked linears here work on plain tensors. The split below keeps
plain ``nn.Linear`` layers with smaller weights, so everything else runs unchanged.

After the split the model's config names the rank's own heads (``num_attention_heads``,
``num_key_value_heads``), which is what the KV cache and the pool are built from: each rank's
pool holds only its 1/N of the KV heads.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_log = logging.getLogger(__name__)

__all__ = ["ShardError", "shard_llama"]

_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ShardError(ValueError):
    """The model cannot be split between this many ranks."""


def _rows(layer: nn.Linear, index: int, parts: int) -> None:
    """Keep the ``index``-th of ``parts`` equal slices of the output features (column-parallel)."""
    n = layer.out_features // parts
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[index * n : (index + 1) * n].clone(), requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[index * n : (index + 1) * n].clone(), requires_grad=False)
    layer.out_features = n


def _cols(layer: nn.Linear, index: int, parts: int, group: Any) -> None:
    """Keep the ``index``-th slice of the input features (row-parallel); the output is the sum
    over the ranks, taken by an all-reduce after the layer (the bias is added by rank 0 only)."""
    n = layer.in_features // parts
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:, index * n : (index + 1) * n].clone(), requires_grad=False)
        if layer.bias is not None and index != 0:
            layer.bias = nn.Parameter(torch.zeros_like(layer.bias), requires_grad=False)
    layer.in_features = n

    def all_reduce(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    layer.register_forward_hook(all_reduce)


def shard_llama(model: Any, rank: int, world: int, group: Any = None) -> Any:
    """Split ``model`` (a Llama-family ``...ForCausalLM``) in place for ``rank`` of ``world``;
    returns it. ``ShardError`` names what does not divide (heads, KV heads, intermediate size)
    or an architecture it does not know, before anything changes."""
    name = type(model).__name__
    if name not in _LLAMA_LIKE:
        raise ShardError(f"tensor parallel supports {', '.join(_LLAMA_LIKE)}; got {name}")
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for what, value in (
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % world:
            raise ShardError(f"--tensor-parallel-size {world} does not divide the model's {what} ({value})")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rows(proj, rank, world)
        _cols(attn.o_proj, rank, world, group)
        _cols(mlp.down_proj, rank, world, group)
        # the head counts the attention reads are per rank now (its reshapes use -1 for heads)
        if hasattr(attn, "num_heads"):
            attn.num_heads = heads // world
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads // world
    cfg.head_dim = head_dim  # set explicitly: hidden_size // heads no longer holds
    cfg.num_attention_heads = heads // world
    cfg.num_key_value_heads = kv_heads // world
    cfg.tensor_parallel = {"rank": rank, "world": world}
    _log.debug("rank %d of %d: %s split to %d heads, %d KV heads", rank, world, name, heads // world, kv_heads // world)
    return model
