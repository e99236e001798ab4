"""The server's default model: a small Llama with random weights and a byte-level tokenizer.

Both are built offline from fixed settings (no hub, no files): the same seed gives the same
weights, so a test or a benchmark can rebuild the model the server runs and compare tokens.
``write_default_model_dir`` saves them as a local Hugging Face model directory (config,
safetensors weights, tokenizer with a chat template), which any server that loads a local
checkpoint (``--model DIR`` here, ``transformers serve DIR``) can serve.

The tokenizer is byte-level BPE without merges: every byte is one token, so any text
round-trips, and the special tokens (padding, begin/end of sequence, chat roles) come first.
The model's vocabulary is exactly the tokenizer's, so every token the model can produce
decodes to something.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from .token_bytes import byte_level_alphabet

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_SEED",
    "build_default_model",
    "build_default_tokenizer",
    "default_config",
    "default_max_positions",
    "write_default_model_dir",
]

DEFAULT_MODEL_NAME = "ekv-default-llama"
DEFAULT_SEED = 0

# ids 0..7; bytes follow at 8 + byte value
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# One turn per message, the role as a special token; the generation prompt opens the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Few, wide KV heads: 8 KiB of float32 K/V per token, so a 2 MiB chunk holds 256 tokens and
# memory following a handful of requests is visible; small matmuls keep CPU steps fast.
_LLAMA = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)


def default_max_positions() -> int:
    """The default model's context length (``max_position_embeddings``), without building it."""
    return int(_LLAMA["max_position_embeddings"])


def default_config() -> Any:
    """The default model's ``LlamaConfig``."""
    from transformers import LlamaConfig

    return LlamaConfig(**_LLAMA)


def build_default_model(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """The default Llama with random weights drawn under ``seed``, in eval mode.

    The caller's global RNG is left untouched. Weights use a wider spread than the default
    init: with the default, next-token logits are nearly flat and greedy decoding would be
    decided by float rounding (which differs with batch shape), so two correct runs could
    disagree.
    """
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(default_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 if "embed" in name else 0.08)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.to(device=device, dtype=dtype).eval()


def build_default_tokenizer() -> Any:
    """The default byte-level tokenizer as a ``PreTrainedTokenizerFast`` (built in memory).

    Encoding adds ``<s>`` in front; decoding with ``skip_special_tokens=True`` drops the
    special tokens; ``chat_template`` renders ``<s><|role|>content<|end|>...<|assistant|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in byte_level_alphabet().items():
        vocab[ch] = len(SPECIAL_TOKENS) + b
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=_LLAMA["max_position_embeddings"],
    )


def write_default_model_dir(path: str | pathlib.Path, seed: int = DEFAULT_SEED) -> pathlib.Path:
    """Write the default model (float32) and tokenizer as a local Hugging Face model directory.

    Creates ``path`` (and its parents) if needed and overwrites the files it writes:
    ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer's
    files. ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)`` load them back. Returns the directory.
    """
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"write_default_model_dir: {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    build_default_model(seed).save_pretrained(out, safe_serialization=True)
    build_default_tokenizer().save_pretrained(out)
    return out
