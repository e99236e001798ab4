"""Paged attention: attend over KV pages through a page table, registered with transformers.

``PAGED_ATTENTION`` (``"elastic_paged"``) is registered in transformers' ``AttentionInterface``
and, with the standard SDPA mask builder, in ``AttentionMaskInterface``; select it with
``model.set_attn_implementation(PAGED_ATTENTION)`` (or ``enable_paged_attention(model)``).

How it reads the pages: ``ElasticPagedCache.update`` writes the new K/V into their slots and
hands the attention a :class:`PagePlan` through the attention kwargs (the dict the model
passes to both ``cache.update`` and the attention function). The plan's groups say how:

* decode tokens (packed mode) are bucketed by page count so that padding to a bucket's longest
  page table stays small; each bucket fetches its pages with one ``index_select`` per layer
  from the pool's page-shaped view ``[pages, page_tokens, kv_heads, head_dim]`` and runs one
  SDPA call with a mask from lengths; grouped-query heads are folded into the query length
  (no K/V repeat);
* a prefill chunk is one SDPA call over a contiguous query slice (no gather): a chunk that
  starts at position 0 attends causally over its own new K/V (no page read, no mask), a
  later chunk over its sequence's pages; SDPA's ``enable_gqa`` handles the heads;
* generate mode: one group over all rows.

Without a plan (any other cache) it is plain SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PAGED_ATTENTION = "elastic_paged"
PLAN_KWARG = "elastic_kv_plan"


@dataclass
class PageGroup:
    """Sequences attended in one SDPA call: queries of equal padded length over their pages.

    Attributes:
        page_table: ``[S, P]`` page ids (rows padded with a valid page of the same row).
        kv_lengths: ``[S]`` tokens of K/V each row may attend (its stored length after the write).
        q_positions: ``[S, Q]`` absolute position of each query row (padding repeats the last).
        q_index: ``[S, Q]`` index of each query in the packed token axis (``None``: the query
            tensor is already ``[S, heads, Q, head_dim]``, generate mode).
        q_valid: ``[S, Q]`` which query entries are real (``None``: all are).
        extra_mask: optional ``[S, 1, Q, kv]`` boolean mask (padding), ``kv <= P * page_tokens``.
        q_slice: packed mode, one sequence's chunk: its queries are the packed tokens ``[a, b)``
            (a view, no gather); ``S == 1``.
        fresh: with ``q_slice``, the chunk is the sequence's whole K/V (it starts at position
            0): attend causally over the step's new K/V, no page read and no mask.
    """

    page_table: torch.Tensor
    kv_lengths: torch.Tensor
    q_positions: torch.Tensor
    q_index: torch.Tensor | None = None
    q_valid: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None
    q_slice: tuple[int, int] | None = None
    fresh: bool = False
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def mask(self, page_tokens: int) -> torch.Tensor:
        """``[S, 1, Q, P * page_tokens]`` boolean: causal, within length, and the extra mask."""
        if self._mask is None:
            span = self.page_table.shape[1] * page_tokens
            kv_pos = torch.arange(span, device=self.page_table.device)
            m = (kv_pos.view(1, 1, -1) <= self.q_positions.unsqueeze(-1)) & \
                (kv_pos.view(1, 1, -1) < self.kv_lengths.view(-1, 1, 1))
            m = m.unsqueeze(1)
            if self.extra_mask is not None:
                em = self.extra_mask[..., :span]
                if em.shape[-1] < span:
                    em = F.pad(em, (0, span - em.shape[-1]), value=False)
                m = m & em
            self._mask = m
        return self._mask


@dataclass
class PagePlan:
    """What one layer's attention needs to read its K/V from the pool."""

    layer: int
    key_cache: torch.Tensor      # [pages, page_tokens, kv_heads, head_dim]
    value_cache: torch.Tensor
    groups: list[PageGroup]
    num_tokens: int              # packed tokens (packed mode) or 0 (generate mode)
    used: bool = False
    new_key: torch.Tensor | None = None    # packed: this step's K/V [tokens, kv_heads, head_dim]
    new_value: torch.Tensor | None = None


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Attention over KV pages (see module docstring); SDPA when the cache gave no plan."""
    plan: PagePlan | None = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    plan.used = True
    if plan.num_tokens:   # packed: query [1, heads, T, head_dim]
        out = query.new_empty(plan.num_tokens, query.shape[1], query.shape[3])
        q_flat = query[0]
        for group in plan.groups:
            if group.q_slice is not None:   # one sequence's chunk: contiguous queries
                a, b = group.q_slice
                q = q_flat[:, a:b].unsqueeze(0)                  # [1, heads, n, head_dim]
                if group.fresh:
                    o = _attend_fresh(q, plan.new_key[a:b], plan.new_value[a:b], scaling)
                else:
                    o = _attend(q, plan, group, scaling)
                out[a:b] = o[0].transpose(0, 1)
                continue
            q = q_flat[:, group.q_index]                     # [heads, S, Q, head_dim]
            o = _attend(q.transpose(0, 1), plan, group, scaling)  # [S, heads, Q, head_dim]
            o = o.transpose(1, 2)                            # [S, Q, heads, head_dim]
            if group.q_valid is None:
                out[group.q_index.reshape(-1)] = o.reshape(-1, *o.shape[2:])
            else:
                out[group.q_index[group.q_valid]] = o[group.q_valid]
        return out.unsqueeze(0), None
    (group,) = plan.groups  # generate mode: query [batch, heads, q, head_dim]
    if attention_mask is not None and group.extra_mask is None:
        group.extra_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    o = _attend(query, plan, group, scaling)
    return o.transpose(1, 2).contiguous(), None


def _attend(q: torch.Tensor, plan: PagePlan, group: PageGroup, scaling: float | None) -> torch.Tensor:
    """SDPA of ``q [S, heads, Q, d]`` over the group's pages; returns ``[S, heads, Q, d]``."""
    s, p = group.page_table.shape
    page_tokens, kv_heads, head_dim = plan.key_cache.shape[1:]
    flat = group.page_table.reshape(-1)
    # One gather per layer, in page shape; the transpose is a view, SDPA reads it strided.
    k = plan.key_cache.index_select(0, flat).view(s, p * page_tokens, kv_heads, head_dim).transpose(1, 2)
    v = plan.value_cache.index_select(0, flat).view(s, p * page_tokens, kv_heads, head_dim).transpose(1, 2)
    mask = group.mask(page_tokens)
    heads, q_len = q.shape[1], q.shape[2]
    n_rep = heads // kv_heads
    if q_len == 1 and n_rep > 1:
        # Fold the query heads that share a KV head into the query axis: no K/V repeat.
        o = F.scaled_dot_product_attention(q.reshape(s, kv_heads, n_rep, head_dim), k, v,
                                           attn_mask=mask, scale=scaling)
        return o.reshape(s, heads, 1, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=n_rep > 1)


def _attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal SDPA of ``q [1, heads, n, d]`` over a chunk's own new K/V ``[n, kv_heads, d]``."""
    k = k.transpose(0, 1).unsqueeze(0)
    v = v.transpose(0, 1).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])


def register() -> None:
    """Register ``PAGED_ATTENTION`` with transformers (idempotent; done on import)."""
    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
    AttentionMaskInterface.register(PAGED_ATTENTION, sdpa_mask)


def enable_paged_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` to the paged attention (it falls back to SDPA with other caches)."""
    register()
    model.set_attn_implementation(PAGED_ATTENTION)
    return model


register()
