"""The model runner: one scheduled batch -> packed input -> forward -> sampled tokens.

The Engine hands it a ``Batch``; it packs the chunks' tokens into one row, tells the cache
where each request's tokens go (``set_packed_batch``), runs the model with the cache, and
samples one token for every chunk that ends a request's known tokens. Greedy batches are one
``argmax`` over all rows; other requests sample one by one, each with its own generator so
that a seeded request draws the same tokens however it is batched.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..hf.compat import cache_keyword
from .request import Request
from .scheduler import Batch

_log = logging.getLogger(__name__)

__all__ = ["ModelRunner"]


class ModelRunner:
    """Runs ``model`` over batches whose K/V live in ``cache`` (its packed mode)."""

    def __init__(self, model: Any, cache: Any, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self._cache_keyword = cache_keyword(model)  # past_key_values= or, from 5.24, cache=

    @torch.inference_mode()
    def run(self, batch: Batch) -> dict[int, Optional[int]]:
        """One forward over the packed tokens; the sampled token per sampling request (None:
        sampling failed for that request alone)."""
        ids: list[int] = []
        entries: list[tuple[int, int, int]] = []
        last: list[int] = []
        samplers: list[Request] = []
        for c in batch.chunks:
            seq = c.seq
            ids.extend(seq.token_ids[c.start : c.start + c.num_tokens])
            entries.append((seq.request_id, c.start, c.num_tokens))
            if c.samples:
                last.append(len(ids) - 1)
                samplers.append(seq)
        extra = self.cache.set_packed_batch(entries)
        kwargs = {k: v for k, v in extra.items() if k in ("position_ids", "attention_mask", "cache_position")}
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        keep: Any = torch.tensor(last, dtype=torch.long, device=self.device) if last else 1
        try:
            out = self.model(
                input_ids=input_ids, **{self._cache_keyword: self.cache}, use_cache=True, logits_to_keep=keep, **kwargs
            )
        finally:
            self.cache.clear_packed_batch()
        if not last:
            return {}
        logits = out.logits[0]
        if all(s.sampling.greedy for s in samplers):
            toks: list[Optional[int]] = logits.argmax(dim=-1).tolist()
        else:
            toks = [self.sample_or_none(logits[i], s) for i, s in enumerate(samplers)]
        return {s.request_id: t for s, t in zip(samplers, toks)}

    @classmethod
    def sample_or_none(cls, logits: torch.Tensor, seq: Request) -> Optional[int]:
        """The sampled token, or None when sampling failed for this request alone (it then
        finishes with reason "error"; the other requests of the step go on)."""
        try:
            return cls.sample(logits, seq)
        except (RuntimeError, ValueError, OverflowError) as exc:
            _log.warning("request %d: sampling failed (%s); finishing it with reason 'error'", seq.request_id, exc)
            return None

    @staticmethod
    def sample(logits: torch.Tensor, seq: Request) -> int:
        """One token from ``logits`` under ``seq``'s sampling parameters."""
        p = seq.sampling
        if p.greedy:
            return int(logits.argmax())
        x = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            srt, idx = torch.sort(x, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = cum - torch.softmax(srt, -1) > p.top_p  # keep the token that crosses top_p
            x = x.scatter(0, idx[drop], float("-inf"))
        gen = None
        if p.seed is not None:
            # seeded by (seed, position): the same request samples the same tokens however
            # it is batched or preempted
            gen = torch.Generator(device=x.device).manual_seed(p.generator_seed(seq.num_tokens))
        return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))
