"""References for the logits tests: transformers' processors for a request's sampling, a plain
transformers greedy loop with them, and a plain forward's logits (no cache, no batching)."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from torch_elastic_kv.engine.request import Request, SamplingParams

__all__ = ["PresenceFrequency", "hf_greedy", "hf_processors", "plain_logits", "request"]


def request(prompt: list[int], output: list[int], eos=(2,), **sampling) -> Request:
    r = Request(0, prompt, 16, 0, 0.0, eos_token_ids=frozenset(eos), sampling=SamplingParams(**sampling))
    r.token_ids.extend(output)
    return r


class PresenceFrequency:
    """OpenAI's presence/frequency penalties over the output tokens, written out plainly."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        output = input_ids[0, self.prompt_len :].tolist()
        for t in sorted(set(output)):
            out[0, t] = out[0, t] - self.frequency * float(output.count(t))
            out[0, t] = out[0, t] - self.presence
        return out


def hf_processors(r: Request) -> LogitsProcessorList:
    """transformers' processors for ``r``'s sampling, in the order engine.logits applies them."""
    p = r.sampling
    procs = LogitsProcessorList()
    if p.min_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(r.prompt_len, p.min_tokens, sorted(r.eos_token_ids)))
    if p.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias]))
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        procs.append(PresenceFrequency(r.prompt_len, p.presence_penalty, p.frequency_penalty))
    return procs


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, prompt: list[int], n: int, sampling: dict, eos_id: int) -> list[int]:
    """A plain transformers loop: full forward each step, the processors, argmax, EOS stops."""
    r = request(prompt, [], eos=(eos_id,), **sampling)
    procs = hf_processors(r)
    ids = list(prompt)
    for _ in range(n):
        scores = procs(torch.tensor([ids]), plain_logits(model, ids)[-1:].clone())
        token = int(scores.argmax(-1))
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt) :]
