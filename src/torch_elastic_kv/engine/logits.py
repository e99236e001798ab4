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
from typing import Optional

import torch

from .request import Request, TokenLogprob

__all__ = ["TokenLogprob", "min_p_filter", "process_logits", "token_logprobs"]

# Rows of [rows, vocab] float32 log-softmax computed at once: bounds the temporary for a long
# prompt's log-probabilities to this many rows, whatever the prompt length.
_LOGPROB_ROWS = 256


def process_logits(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """``logits`` ``[N, vocab]`` as float32, each row processed under its request's
    ``min_tokens``, ``logit_bias`` and penalties (module docstring); a new tensor.

    Each kind of processing is one batched operation over every row that asks for it (rows
    that do not are left as they are, bit for bit): the (row, token) pairs it touches become
    indices into the flattened logits, so a step costs a few tensor ops over the tokens
    involved, not a few per request, and nothing over the whole vocabulary."""
    x = logits.float().clone()
    device = x.device
    rows = [(i, r) for i, r in enumerate(requests) if r.sampling.processes_logits]
    # min_tokens: the request's EOS ids masked until it has generated that many
    eos = [
        (i, t)
        for i, r in rows
        if r.sampling.min_tokens and r.num_generated < r.sampling.min_tokens
        for t in r.eos_token_ids
    ]
    if eos:
        at = torch.tensor(eos, device=device)
        x[at[:, 0], at[:, 1]] = float("-inf")
    bias = [(i, t, b) for i, r in rows for t, b in r.sampling.logit_bias]
    if bias:  # a request names each token once (SamplingParams checks), so no pair repeats
        at = torch.tensor([(i, t) for i, t, _ in bias], device=device)
        x[at[:, 0], at[:, 1]] += torch.tensor([b for _, _, b in bias], dtype=torch.float32, device=device)
    rep = [(i, r) for i, r in rows if r.sampling.repetition_penalty != 1.0]
    if rep:  # over prompt and output tokens: every token the request has seen, once
        keys = _flat_keys(x, [(i, r.token_ids) for i, r in rep]).unique()
        penalty = torch.ones(x.shape[0], device=device)
        penalty[[i for i, _ in rep]] = torch.tensor([r.sampling.repetition_penalty for _, r in rep], device=device)
        flat = x.view(-1)
        seen, p = flat[keys], penalty[keys // x.shape[1]]
        flat[keys] = torch.where(seen < 0, seen * p, seen / p)
    pres = [(i, r) for i, r in rows if (r.sampling.presence_penalty or r.sampling.frequency_penalty)]
    pres = [(i, r) for i, r in pres if r.num_tokens > r.prompt_len]
    if pres:  # over output tokens only, OpenAI's formula: count * frequency, then presence
        keys, counts = _flat_keys(x, [(i, r.token_ids[r.prompt_len :]) for i, r in pres]).unique(return_counts=True)
        freq = torch.zeros(x.shape[0], device=device)
        presence = torch.zeros(x.shape[0], device=device)
        idx = [i for i, _ in pres]
        freq[idx] = torch.tensor([r.sampling.frequency_penalty for _, r in pres], device=device)
        presence[idx] = torch.tensor([r.sampling.presence_penalty for _, r in pres], device=device)
        flat = x.view(-1)
        row = keys // x.shape[1]
        flat[keys] = (flat[keys] - freq[row] * counts.float()) - presence[row]
    return x


def _flat_keys(x: torch.Tensor, tokens: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Each (row, token) of ``tokens`` as its index in ``x.view(-1)`` (repeats kept)."""
    vocab = x.shape[1]
    return torch.cat([torch.tensor(ids, dtype=torch.long, device=x.device) + i * vocab for i, ids in tokens])


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
