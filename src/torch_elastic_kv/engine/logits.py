"""Per-request logits processing and log-probabilities, for the runner's batched sampler.

A request's ``SamplingParams`` may ask for processing of its logits row before the token is
chosen. The order is vLLM's sampler's: ``min_tokens`` (the request's EOS ids masked until it
has generated that many), ``logit_bias`` (added), the repetition penalty (over prompt and
output tokens: a positive logit divided by it, a negative one multiplied, as transformers'
``RepetitionPenaltyLogitsProcessor``), the presence and frequency penalties (over output tokens
only, OpenAI's formula); then, in the runner, temperature, ``min_p`` (``min_p_filter``, as
transformers' ``MinPLogitsWarper``), top-k and top-p. Rows without such fields are not touched,
and a batch without any skips this module entirely.

Log-probabilities are those of the raw logits, before any processing or temperature: what
vLLM returns by default, and what a client scoring text (lm-eval) wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .request import Request

__all__ = ["TokenLogprob", "min_p_filter", "process_logits", "token_logprobs"]

# Rows of [rows, vocab] float32 log-softmax computed at once: bounds the temporary for a long
# prompt's log-probabilities to this many rows, whatever the prompt length.
_LOGPROB_ROWS = 256


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the token there, its log-probability, and the
    ``top`` most likely tokens as ``(token_id, logprob)``, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def process_logits(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """``logits`` ``[N, vocab]`` as float32, each row processed under its request's
    ``min_tokens``, ``logit_bias`` and penalties (module docstring); a new tensor."""
    x = logits.float().clone()
    device = x.device
    for i, r in enumerate(requests):
        p = r.sampling
        if not p.processes_logits:
            continue
        row = x[i]
        if p.min_tokens and r.num_generated < p.min_tokens and r.eos_token_ids:
            row[torch.tensor(sorted(r.eos_token_ids), device=device)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
            row[ids] += torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=device)
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(r.token_ids)), device=device)
            seen = row[ids]
            row[ids] = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            output = r.token_ids[r.prompt_len :]
            if output:
                ids, counts = torch.tensor(output, device=device).unique(return_counts=True)
                row[ids] -= p.frequency_penalty * counts.float()
                row[ids] -= p.presence_penalty
    return x


def min_p_filter(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) each row's tokens whose probability is below ``min_p`` times the row's
    largest; ``x`` are tempered logits ``[N, vocab]``, ``min_p`` ``[N]`` (0: keep all)."""
    probs = torch.softmax(x, -1)
    return x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """For row ``i`` of raw ``logits`` ``[N, vocab]``: the log-probability of ``chosen[i]`` and
    the ``top[i]`` most likely tokens with theirs (log-softmax in float32, ``_LOGPROB_ROWS``
    rows at a time)."""
    out: list[TokenLogprob] = []
    for lo in range(0, logits.shape[0], _LOGPROB_ROWS):
        block = torch.log_softmax(logits[lo : lo + _LOGPROB_ROWS].float(), -1)
        ids = torch.tensor(chosen[lo : lo + _LOGPROB_ROWS], device=block.device)
        picked = block.gather(1, ids[:, None])[:, 0].tolist()
        n_top = max(top[lo : lo + _LOGPROB_ROWS], default=0)
        tops: Optional[tuple[list[list[float]], list[list[int]]]] = None
        if n_top:
            values, indices = block.topk(min(n_top, block.shape[-1]), dim=-1)
            tops = (values.tolist(), indices.tolist())
        for j, (token, lp) in enumerate(zip(chosen[lo : lo + _LOGPROB_ROWS], picked)):
            k = top[lo + j]
            pairs: tuple[tuple[int, float], ...] = ()
            if k and tops is not None:
                pairs = tuple(zip(tops[1][j][:k], tops[0][j][:k]))
            out.append(TokenLogprob(int(token), float(lp), pairs))
    return out
