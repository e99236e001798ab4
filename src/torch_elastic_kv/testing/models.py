"""Tiny causal LMs built from configs with random weights and a fixed seed.

Shared by the cache, engine and benchmark tests. Each factory returns a model in eval mode
whose weights depend only on ``seed`` and the overrides; ``overrides`` go to the config
(e.g. ``num_hidden_layers=4``, ``dtype=torch.bfloat16``, ``attn_implementation="eager"``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Small enough that a forward takes well under a millisecond per token on one CPU core,
# large enough to have grouped-query attention (4 query heads over 2 KV heads).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(config_cls, model_cls, seed: int, overrides: dict[str, Any]) -> PreTrainedModel:
    dtype = overrides.pop("dtype", torch.float32)
    attn = overrides.pop("attn_implementation", "sdpa")
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.set_attn_implementation(attn)
    # Random weights give a flat next-token distribution; a larger init spreads the logits so
    # greedy decoding is not decided by float noise (ties are what make caches disagree).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = None  # generate the full max_new_tokens
    return model.eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, 4 heads over 2 KV heads, head_dim 16, vocab 256)."""
    return _build(LlamaConfig, LlamaForCausalLM, seed, dict(overrides))


def tiny_qwen2(seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (QKV bias) of the same size; sliding window off (all full attention)."""
    return _build(Qwen2Config, Qwen2ForCausalLM, seed, {"use_sliding_window": False, **overrides})


def tiny_mistral(seed: int = 0, **overrides: Any) -> MistralForCausalLM:
    """A 2-layer Mistral of the same size with ``sliding_window=None`` (full attention)."""
    return _build(MistralConfig, MistralForCausalLM, seed, {"sliding_window": None, **overrides})


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def left_padded_batch(
    lengths: list[int], vocab_size: int = 256, seed: int = 1, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Random prompts of the given lengths, left-padded: ``input_ids`` and ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}
