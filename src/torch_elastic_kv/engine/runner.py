"""The model runner: one scheduled batch -> packed input -> forward -> sampled tokens.

The Engine hands it a ``Batch``; it packs the chunks' tokens into one row, tells the cache
where each request's tokens go (``set_packed_batch``), runs the model with the cache, and
samples one token for every chunk that ends a request's known tokens: greedy rows in one
``argmax``, the others in one batched temperature / top-k / top-p filter and inverse-CDF draw;
a seeded request's uniform comes from its own generator, so it draws the same tokens however
it is batched. Requests with penalties, bias or ``min_tokens`` have their rows processed first
(``logits``); log-probabilities, when asked, are of the raw logits, and a request asking for its
prompt's makes the forward keep the logits of every prompt position of its chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ..hf.compat import cache_keyword
from .logits import min_p_filter, process_logits, token_logprobs
from .request import Request
from .scheduler import Batch

_log = logging.getLogger(__name__)

__all__ = ["ModelRunner", "STEP_PHASES"]

# The phases of one step that the Engine times (``Engine.stats()["step_phase_seconds"]``):
# the runner times pack (tokens packed, pages planned), forward and sample; the Engine the rest.
STEP_PHASES = ("schedule", "pack", "forward", "sample", "postprocess", "memory")


class ModelRunner:
    """Runs ``model`` over batches whose K/V live in ``cache`` (its packed mode)."""

    def __init__(
        self, model: Any, cache: Any, device: torch.device, on_new_stream: Optional[Callable[[int], None]] = None
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self._cache_keyword = cache_keyword(model)  # past_key_values= or, from 5.24, cache=
        self._on_new_stream = on_new_stream
        self._streams: set[int] = set()
        # perf_counter seconds of the last run's phases: pack, forward, sample
        self.last_phases: dict[str, float] = {"pack": 0.0, "forward": 0.0, "sample": 0.0}

    def note_stream(self, handle: int) -> None:
        """The forward runs on CUDA stream ``handle``: the first time, tell ``on_new_stream``
        (the Engine registers it with the pool, so unmaps from the memory thread wait for the
        kernels queued there; torch's side streams do not order with the default one)."""
        if handle not in self._streams:
            if self._on_new_stream is not None:
                self._on_new_stream(handle)
            self._streams.add(handle)

    @torch.inference_mode()
    def run(self, batch: Batch) -> dict[int, Optional[int]]:
        """One forward over the packed tokens; the sampled token per sampling request (None:
        sampling failed for that request alone). Requests that ask for log-probabilities get
        them appended to ``Request.logprobs`` / ``Request.prompt_logprobs``. The seconds of its
        phases (pack, forward, sample) are in ``last_phases``."""
        t0 = time.perf_counter()
        phases = self.last_phases
        phases["forward"] = phases["sample"] = 0.0
        ids: list[int] = []
        entries: list[tuple[int, int, int]] = []
        keep_rows: list[int] = []  # packed positions whose logits the model returns
        sample_rows: list[int] = []  # ... of them, the rows that sample (index into keep_rows)
        samplers: list[Request] = []
        prompt_spans: list[tuple[Request, int, int, int]] = []  # (request, first row, first position, count)
        for c in batch.chunks:
            request = c.request
            base = len(ids)
            ids.extend(request.token_ids[c.start : c.start + c.num_tokens])
            entries.append((request.request_id, c.start, c.num_tokens))
            if request.sampling.prompt_logprobs is not None:
                # the logits at position p score prompt token p + 1; positions already scored
                # (before a recompute preemption) are not scored again
                if not request.prompt_logprobs:
                    request.prompt_logprobs.append(None)
                lo = max(c.start, len(request.prompt_logprobs) - 1)
                hi = min(c.start + c.num_tokens, request.prompt_len - 1)
                if hi > lo:
                    prompt_spans.append((request, len(keep_rows), lo, hi - lo))
                    keep_rows.extend(range(base + lo - c.start, base + hi - c.start))
            if c.samples:
                if not keep_rows or keep_rows[-1] != len(ids) - 1:
                    keep_rows.append(len(ids) - 1)
                sample_rows.append(len(keep_rows) - 1)
                samplers.append(request)
        if self.device.type == "cuda":
            self.note_stream(torch.cuda.current_stream(self.device).cuda_stream)
        extra = self.cache.set_packed_batch(entries)
        kwargs = {k: v for k, v in extra.items() if k in ("position_ids", "attention_mask", "cache_position")}
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        keep: Any = torch.tensor(keep_rows, dtype=torch.long, device=self.device) if keep_rows else 1
        t1 = time.perf_counter()
        phases["pack"] = t1 - t0
        try:
            out = self.model(
                input_ids=input_ids, **{self._cache_keyword: self.cache}, use_cache=True, logits_to_keep=keep, **kwargs
            )
        finally:
            self.cache.clear_packed_batch()
            t2 = time.perf_counter()
            phases["forward"] = t2 - t1
        try:
            return self._sample(out, keep_rows, sample_rows, samplers, prompt_spans)
        finally:
            phases["sample"] = time.perf_counter() - t2

    def _sample(
        self,
        out: Any,
        keep_rows: list[int],
        sample_rows: list[int],
        samplers: list[Request],
        prompt_spans: list[tuple[Request, int, int, int]],
    ) -> dict[int, Optional[int]]:
        """Tokens (and log-probabilities) from the forward's output ``out``."""
        if not keep_rows:
            return {}
        logits = out.logits[0]
        for request, row, pos, count in prompt_spans:
            targets = request.token_ids[pos + 1 : pos + 1 + count]
            n_top = request.sampling.prompt_logprobs
            request.prompt_logprobs.extend(token_logprobs(logits[row : row + count], targets, [n_top] * count))
        if not samplers:
            return {}
        rows = logits if len(sample_rows) == len(keep_rows) else logits[sample_rows]
        tokens = self.sample_batch(rows, samplers)
        want = [i for i, s in enumerate(samplers) if s.sampling.logprobs is not None and tokens[i] is not None]
        if want:
            chosen = [tokens[i] for i in want]
            found = token_logprobs(rows[want], chosen, [samplers[i].sampling.logprobs for i in want])
            for i, entry in zip(want, found):
                samplers[i].logprobs.append(entry)
        return dict(zip((s.request_id for s in samplers), tokens))

    @classmethod
    def sample_batch(cls, logits: torch.Tensor, requests: Sequence[Request]) -> list[Optional[int]]:
        """One token per row of ``logits`` ``[N, vocab]`` under each request's sampling
        parameters: greedy rows in one ``argmax``, the others in one batched draw. None: sampling
        failed for that request alone (non-finite probabilities); it then finishes with reason
        "error" and the other requests of the step go on."""
        if any(r.sampling.processes_logits for r in requests):
            logits = process_logits(logits, requests)
        if all(r.sampling.greedy for r in requests):
            return logits.argmax(dim=-1).tolist()
        tokens: list[Optional[int]] = [None] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.sampling.greedy]
        rest = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                tokens[i] = t
        drawn = cls.draw(cls.filtered_probs(logits[rest], [requests[i] for i in rest]), [requests[i] for i in rest])
        for i, t in zip(rest, drawn):
            tokens[i] = t
            if t is None:
                _log.warning(
                    "request %d: sampling failed (non-finite probabilities); finishing it with reason 'error'",
                    requests[i].request_id,
                )
        return tokens

    @staticmethod
    def filtered_probs(
        logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Probabilities after temperature, min-p, top-k and top-p, row by row, as ``(probs, order)``:
        with any top-k or top-p in the batch the columns are sorted by logit (``order`` maps a
        column back to its token id); without, ``order`` is None and columns are token ids."""
        device = logits.device
        params = [r.sampling for r in requests]
        x = logits.float() / torch.tensor([p.temperature for p in params], device=device)[:, None]
        vocab = x.shape[-1]
        if any(p.min_p for p in params):
            x = min_p_filter(x, torch.tensor([p.min_p for p in params], device=device))
        if not any(p.top_k or p.top_p < 1.0 for p in params):
            return torch.softmax(x, -1), None
        x, order = torch.sort(x, dim=-1, descending=True)
        keep = torch.tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params], device=device)
        x = x.masked_fill(torch.arange(vocab, device=device)[None, :] >= keep[:, None], float("-inf"))
        probs = torch.softmax(x, -1)
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        # drop what lies wholly beyond top_p: the token that crosses it stays
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
        return probs, order

    @staticmethod
    def draw(
        probs_and_order: tuple[torch.Tensor, Optional[torch.Tensor]], requests: Sequence[Request]
    ) -> list[Optional[int]]:
        """One token per row by inverse CDF. A seeded request's uniform comes from its own
        generator, seeded by (seed, position), so it samples the same tokens however it is
        batched or preempted; the others share the default generator."""
        probs, order = probs_and_order
        uniforms = torch.rand(len(requests), dtype=torch.float64)
        for i, r in enumerate(requests):
            if r.sampling.seed is not None:
                gen = torch.Generator().manual_seed(r.sampling.generator_seed(r.num_tokens))
                uniforms[i] = torch.rand((), generator=gen, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        total = cdf[:, -1]
        valid = torch.isfinite(probs).all(-1) & (total > 0)
        target = (uniforms.to(probs.device) * total)[:, None]
        col = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
        ids = col if order is None else order.gather(1, col)
        return [int(t) if ok else None for t, ok in zip(ids[:, 0].tolist(), valid.tolist())]
