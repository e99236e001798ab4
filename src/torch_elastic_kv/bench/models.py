"""The model a benchmark runs: a local Hugging Face checkpoint or a Llama built from a config.

Built models have random weights drawn under a fixed seed, so the same ``--config`` and
``--seed`` give the same model (and, with greedy decoding, the same tokens) on every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CONFIG_NAMES = ("tiny", "small", "1b")

# Llama shapes. "1b" is the TinyLlama-1.1B shape. The CPU shapes keep compute small but give each
# token a realistic amount of KV (few, wide heads; no grouped-query sharing), so that a burst
# spans many 2 MiB granules and memory following demand is visible: tiny 4 KiB, small 16 KiB
# per token in float32.
_LLAMA_SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    ),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelInfo:
    """What the report says about the model."""

    name: str
    parameters: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    device: str

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on CPU (fast and exact there); bfloat16 on GPUs that support it, else float16."""
    if torch.device(device).type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_model(config: str | None, path: str | None, device: str, dtype: str, seed: int):
    """Return ``(model, ModelInfo)``: ``path`` (a local checkpoint, never the hub) or ``config``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch_dtype = DTYPES[dtype]
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--model {path}: not a directory with a Hugging Face checkpoint")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        name = os.path.basename(os.path.normpath(path))
    else:
        if config not in _LLAMA_SHAPES:
            raise ValueError(f"--config {config!r}: expected one of {', '.join(CONFIG_NAMES)}")
        llama_config = LlamaConfig(**_LLAMA_SHAPES[config], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        # the seed fixes the random weights; fork_rng keeps the caller's global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama_config)
        model = model.to(dtype=torch_dtype)
        name = f"llama-{config} (random weights, seed {seed})"
    model = model.to(device).eval()
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    info = ModelInfo(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_positions=getattr(cfg, "max_position_embeddings", 2048),
        dtype=dtype,
        device=str(torch.device(device)),
    )
    return model, info
