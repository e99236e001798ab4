"""Paged attention: attend over KV pages through a page table, registered with transformers.

``PAGED_ATTENTION`` (``"elastic_paged"``) is registered in transformers' ``AttentionInterface``
and, with the standard SDPA mask builder, in ``AttentionMaskInterface``; select it with
``model.set_attn_implementation(PAGED_ATTENTION)`` (or ``enable_paged_attention(model)``).

How it reads the pages: ``ElasticPagedCache.update`` writes the new K/V into their slots and
returns, as the layer's key, a view of the pool's K pages that carries a :class:`PagePlan`
(``attach_plan``); the model passes that tensor unchanged to its attention function, which
reads the plan back (``plan_of``). The plan's groups say how:

* decode tokens (packed mode) are bucketed by page count so that padding to a bucket's longest
  page table stays small; each bucket fetches its pages with one ``index_select`` per layer
  from the pool's page-shaped view ``[pages, page_tokens, kv_heads, head_dim]`` and runs one
  SDPA call with a mask from lengths; grouped-query heads are folded into the query length
  (no K/V repeat);
* a prefill chunk is one call over a contiguous query slice (no gather): a chunk that starts
  at position 0 attends causally over its own new K/V (no page read, no mask), a later chunk
  over its sequence's pages. On CPU in float32 the native kernel does it
  (``prefill_attention.causal_prefill_attention``, reading pages in place; ``EKV_NATIVE_PREFILL=0``
  turns it off); otherwise one SDPA call, with ``enable_gqa`` for the heads;
* generate mode: one group over all rows.

Decode rows can skip the gather and SDPA, all of a step's decode rows in one call per layer:

* CUDA: the Triton kernel (``triton_decode.paged_decode_attention_triton``) reads each row's
  K/V in place through the page table, one launch per layer (two when few rows are split
  over the GPU), when ``triton`` imports and the
  tensors suit it (float16/bfloat16/float32, head_dim <= 256). A kernel that fails to compile
  or launch logs a warning once and turns itself off for the process (gather + SDPA then).
* CPU, float32: the native kernel ``_C.paged_decode_attention`` (csrc/kernels/paged_attention.h),
  one pass with an online softmax, threads over (row, KV head).

``EKV_TRITON_DECODE`` in the environment picks the Triton path: ``auto`` (default: CUDA only),
``1`` (every device, CPU tensors through Triton's interpreter: slow, for tests; raises
RuntimeError when triton cannot run them) or ``0`` (never). It is read once, at the first
decode (or :func:`triton_decode_mode` call) of the process, and kept: a layer call never reads
the environment. :func:`set_triton_decode_mode` changes it later (``None``: read the variable
again at the next use). ``EKV_NATIVE_DECODE=0`` turns the
native CPU kernel off. Whatever neither takes runs gather + SDPA, which stays the fallback.
``plan.decode_path`` and :func:`decode_path_stats` say which path served the decode rows.

Without a plan (any other cache) it is plain SDPA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._native import _C
from .native_args import INDEX_DTYPES, check_cpu_float32, check_rows_contiguous, output_like
from .prefill_attention import causal_prefill_attention, native_prefill_enabled

PAGED_ATTENTION = "elastic_paged"
_PLAN_ATTR = "_elastic_kv_plan"
NATIVE_DECODE_ENV = "EKV_NATIVE_DECODE"
TRITON_DECODE_ENV = "EKV_TRITON_DECODE"
TRITON_DECODE_MODES = ("auto", "1", "0")
DECODE_PATHS = ("triton", "native", "gather")

log = logging.getLogger(__name__)
# Layer calls whose decode rows each path served (decode_path_stats); a process-wide tally.
_PATH_CALLS = dict.fromkeys(DECODE_PATHS, 0)
_PATH_ROWS = dict.fromkeys(DECODE_PATHS, 0)
# Why the Triton kernel was turned off in this process (a failed compile or launch), or None.
_triton_failure: str | None = None
# The Triton mode once read from the environment (or set); None until the first decode asks.
_triton_mode: str | None = None


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
    _decode_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _q_start: int | None = field(default=None, repr=False)

    def mask(self, page_tokens: int) -> torch.Tensor:
        """``[S, 1, Q, P * page_tokens]`` boolean: causal, within length, and the extra mask."""
        if self._mask is None:
            span = self.page_table.shape[1] * page_tokens
            kv_pos = torch.arange(span, device=self.page_table.device)
            m = (kv_pos.view(1, 1, -1) <= self.q_positions.unsqueeze(-1)) & (
                kv_pos.view(1, 1, -1) < self.kv_lengths.view(-1, 1, 1)
            )
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
    key_cache: torch.Tensor  # [pages, page_tokens, kv_heads, head_dim]
    value_cache: torch.Tensor
    groups: list[PageGroup]
    num_tokens: int  # packed tokens (packed mode) or 0 (generate mode)
    used: bool = False
    decode_path: str | None = None  # which path served this layer's decode rows (DECODE_PATHS)
    new_key: torch.Tensor | None = None  # packed: this step's K/V [tokens, kv_heads, head_dim]
    new_value: torch.Tensor | None = None


def attach_plan(key_cache: torch.Tensor, plan: PagePlan) -> torch.Tensor:
    """A new view of ``key_cache`` (same storage) that carries ``plan`` to the attention function."""
    view = key_cache.view(key_cache.shape)
    setattr(view, _PLAN_ATTR, plan)
    return view


def plan_of(key: torch.Tensor) -> PagePlan | None:
    """The plan ``attach_plan`` put on ``key``, or None (K/V from any other cache)."""
    return getattr(key, _PLAN_ATTR, None)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """Attention over KV pages (see module docstring); SDPA when the cache gave no plan."""
    plan = plan_of(key)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    plan.used = True
    if plan.num_tokens:  # packed: query [1, heads, T, head_dim]
        out = query.new_empty(plan.num_tokens, query.shape[1], query.shape[3])
        q_flat = query[0]
        groups = plan.groups
        decode = [g for g in groups if _is_decode(g)]
        if decode:
            # Every decode row of the step in one kernel call (one launch or thread split, not
            # one per group).
            path = _decode_path(query, plan)
            table, lens, rows = _decode_batch(decode) if path != "gather" else (None, None, None)
            if path == "triton" and not _run_triton(q_flat.transpose(0, 1), plan, table, lens, rows, scaling, out):
                path = "gather"
            elif path == "native":
                # One thread: right after the model's linear layers torch's OpenMP workers still
                # spin on the other cores, and kernel threads competing with them made decode
                # attention slower than one thread, and slower than gather + SDPA (figures in
                # benchmarks/RESULTS.md, "Figures that were in code comments").
                paged_decode_attention(
                    q_flat.transpose(0, 1),
                    plan.key_cache,
                    plan.value_cache,
                    table,
                    lens,
                    scaling,
                    out=out,
                    row_tokens=rows,
                    threads=1,
                )
            if path != "gather":
                groups = [g for g in groups if not _is_decode(g)]
            _record(plan, path, sum(g.q_index.shape[0] for g in decode))
        for group in groups:
            if group.q_slice is not None:  # one sequence's chunk: contiguous queries
                a, b = group.q_slice
                if native_prefill_enabled(query):
                    _prefill_native(q_flat[:, a:b].transpose(0, 1), plan, group, scaling, out[a:b])
                    continue
                q = q_flat[:, a:b].unsqueeze(0)  # [1, heads, n, head_dim]
                if group.fresh:
                    o = _attend_fresh(q, plan.new_key[a:b], plan.new_value[a:b], scaling)
                else:
                    o = _attend(q, plan, group, scaling)
                out[a:b] = o[0].transpose(0, 1)
                continue
            q = q_flat[:, group.q_index]  # [heads, S, Q, head_dim]
            o = _attend(q.transpose(0, 1), plan, group, scaling)  # [S, heads, Q, head_dim]
            o = o.transpose(1, 2)  # [S, Q, heads, head_dim]
            if group.q_valid is None:
                out[group.q_index.reshape(-1)] = o.reshape(-1, *o.shape[2:])
            else:
                out[group.q_index[group.q_valid]] = o[group.q_valid]
        return out.unsqueeze(0), None
    (group,) = plan.groups  # generate mode: query [batch, heads, q, head_dim]
    if attention_mask is not None and group.extra_mask is None:
        group.extra_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if query.shape[2] == 1:  # a decode step
        # Padding (a mask) stays on gather + SDPA; the kernel attends to every stored token.
        if group.extra_mask is None and _decode_path(query, plan, native=False) == "triton":
            q = query[:, :, 0]  # [batch, heads, head_dim], a view
            out = q.new_empty(q.shape)
            if _run_triton(q, plan, group.page_table, group.kv_lengths, None, scaling, out):
                _record(plan, "triton", q.shape[0])
                return out.unsqueeze(1), None
        _record(plan, "gather", query.shape[0])
    o = _attend(query, plan, group, scaling)
    return o.transpose(1, 2).contiguous(), None


def decode_path_stats() -> dict[str, dict[str, int]]:
    """Process-wide tally of decode attention by path: ``{"calls": {path: layer calls},
    "rows": {path: decode rows}}`` over :data:`DECODE_PATHS`, plus ``"triton_failure"``
    (why the Triton kernel turned itself off, or None)."""
    return {"calls": dict(_PATH_CALLS), "rows": dict(_PATH_ROWS), "triton_failure": _triton_failure}


def reset_decode_path_stats() -> None:
    """Zero :func:`decode_path_stats` and forget a Triton failure (the kernel is tried again)."""
    global _triton_failure
    for d in (_PATH_CALLS, _PATH_ROWS):
        for k in d:
            d[k] = 0
    _triton_failure = None


def _record(plan: PagePlan, path: str, rows: int) -> None:
    plan.decode_path = path
    _PATH_CALLS[path] += 1
    _PATH_ROWS[path] += rows


def _check_mode(mode: object, source: str) -> str:
    norm = mode.strip().lower() if isinstance(mode, str) else mode
    if norm not in TRITON_DECODE_MODES:
        raise ValueError(f"{source}={mode!r}: expected one of {TRITON_DECODE_MODES}")
    return norm


def triton_decode_mode() -> str:
    """The Triton decode mode: ``auto``, ``1`` or ``0``.

    ``$EKV_TRITON_DECODE`` (``auto`` when unset or empty) is read at the first call and kept;
    later changes of the variable have no effect until :func:`set_triton_decode_mode` (the
    decision is made once, not per layer call). ValueError for anything but auto/1/0 (nothing
    is kept then: the next call reads the variable again).
    """
    global _triton_mode
    if _triton_mode is None:
        _triton_mode = _check_mode(os.environ.get(TRITON_DECODE_ENV, "auto").strip() or "auto", TRITON_DECODE_ENV)
    return _triton_mode


def set_triton_decode_mode(mode: str | None) -> None:
    """Set the Triton decode mode for the process: ``"auto"``, ``"1"`` or ``"0"`` (as
    ``$EKV_TRITON_DECODE``), from the next layer call on; ``None`` forgets the kept mode, so the
    next decode reads the environment variable again. ValueError for any other value, and the
    mode is unchanged."""
    global _triton_mode
    _triton_mode = None if mode is None else _check_mode(mode, "set_triton_decode_mode: mode")


def _decode_path(query: torch.Tensor, plan: PagePlan, native: bool = True) -> str:
    """Which path serves this layer's decode rows: "triton", "native" or "gather"."""
    mode = triton_decode_mode()
    if mode == "1" or (mode == "auto" and query.device.type == "cuda" and _triton_failure is None):
        from . import triton_decode

        reason = triton_decode.unsupported_reason(query, plan.key_cache, plan.value_cache)
        if reason is None:
            return "triton"
        if mode == "1":
            raise RuntimeError(f"{TRITON_DECODE_ENV}=1 but the Triton decode kernel cannot run: {reason}")
    if native and _native_decode_enabled(query):
        return "native"
    return "gather"


def _run_triton(
    query: torch.Tensor,
    plan: PagePlan,
    table: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor | None,
    scaling: float | None,
    out: torch.Tensor,
) -> bool:
    """Launch the Triton kernel into ``out``; False (gather + SDPA instead) when an automatic
    choice fails to compile or launch: logged once, then the kernel stays off in this process."""
    global _triton_failure
    from .triton_decode import paged_decode_attention_triton

    try:
        paged_decode_attention_triton(
            query, plan.key_cache, plan.value_cache, table, lens, scaling, out=out, row_tokens=rows, validate=False
        )
    except Exception as e:
        if triton_decode_mode() == "1":
            raise
        _triton_failure = f"{type(e).__name__}: {e}"
        log.warning("Triton paged decode failed, gather + SDPA from now on: %s", _triton_failure)
        return False
    return True


def _native_decode_enabled(query: torch.Tensor) -> bool:
    return query.dtype == torch.float32 and query.device.type == "cpu" and os.environ.get(NATIVE_DECODE_ENV, "1") != "0"


def _is_decode(group: PageGroup) -> bool:
    """One query per row at its last position, no padding mask: what the native kernel does."""
    return (
        group.q_slice is None
        and group.q_index is not None
        and group.q_index.shape[1] == 1
        and group.q_valid is None
        and group.extra_mask is None
    )


def _decode_batch(decode: list[PageGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode groups' page tables (padded to the widest), lengths and token rows, stacked.

    Kept on the first group: a step's groups serve every layer, so this is built once a step.
    """
    if decode[0]._decode_batch is None:
        width = max(g.page_table.shape[1] for g in decode)
        table = torch.cat([F.pad(g.page_table, (0, width - g.page_table.shape[1])) for g in decode])
        lens = torch.cat([g.kv_lengths for g in decode])
        rows = torch.cat([g.q_index.reshape(-1) for g in decode])
        decode[0]._decode_batch = (table, lens, rows)
    return decode[0]._decode_batch


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    row_tokens: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Decode attention read in place from KV pages by the native kernel (float32, CPU).

    Args:
        query: ``[tokens, heads, head_dim]`` (any strides, ``head_dim`` contiguous).
        key_cache, value_cache: ``[pages, page_tokens, kv_heads, head_dim]`` (strided views fine).
        page_table: ``[rows, max_pages]`` int32/int64 page ids; row ``r`` reads the first
            ``ceil(context_lens[r] / page_tokens)`` of its entries.
        context_lens: ``[rows]`` int32/int64, each in ``[1, max_pages * page_tokens]``.
        scale: softmax scale (default ``head_dim ** -0.5``).
        out: ``[tokens, heads, head_dim]`` float32 to write into (default: a new tensor).
        row_tokens: ``[rows]`` int64: row ``r`` is token ``row_tokens[r]`` of ``query``/``out``
            (default: row ``r`` is token ``r``, ``rows <= tokens``).
        threads: worker threads (default ``torch.get_num_threads()``).

    Returns ``out``; only the rows' tokens are written. Raises ValueError naming the numbers.
    """
    name = "paged_decode_attention"
    check_cpu_float32(name, query=query, key_cache=key_cache, value_cache=value_cache)
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"{name}: query {tuple(query.shape)} must be [tokens, heads, head_dim] and "
            f"key/value caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} "
            "equal [pages, page_tokens, kv_heads, head_dim]"
        )
    tokens, heads, head_dim = query.shape
    pages, page_tokens, kv_heads, kv_dim = key_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"{name}: key/value head_dim {kv_dim} != query head_dim {head_dim}")
    if page_table.dim() != 2 or page_table.dtype not in INDEX_DTYPES or page_table.device.type != "cpu":
        raise ValueError(
            f"{name}: page_table must be a 2-d int32/int64 CPU tensor, got {tuple(page_table.shape)} {page_table.dtype}"
        )
    rows, max_pages = page_table.shape
    if context_lens.shape != (rows,) or context_lens.dtype not in INDEX_DTYPES or context_lens.device.type != "cpu":
        raise ValueError(
            f"{name}: context_lens must be [rows={rows}] int32/int64 on CPU, got "
            f"{tuple(context_lens.shape)} {context_lens.dtype}"
        )
    if row_tokens is not None and (
        row_tokens.shape != (rows,) or row_tokens.dtype != torch.int64 or row_tokens.device.type != "cpu"
    ):
        raise ValueError(
            f"{name}: row_tokens must be [rows={rows}] int64 on CPU, got {tuple(row_tokens.shape)} {row_tokens.dtype}"
        )
    out = output_like(name, out, query)
    check_rows_contiguous(name, query=query, out=out, key_cache=key_cache, value_cache=value_cache)
    if page_table.stride(1) != 1 and max_pages > 1:
        page_table = page_table.contiguous()
    context_lens = context_lens.contiguous()
    if row_tokens is not None:
        row_tokens = row_tokens.contiguous()
    _C.paged_decode_attention(
        out=out.data_ptr(),
        query=query.data_ptr(),
        q_token_stride=query.stride(0),
        q_head_stride=query.stride(1),
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        row_tokens=0 if row_tokens is None else row_tokens.data_ptr(),
        num_tokens=tokens,
        key_cache=key_cache.data_ptr(),
        value_cache=value_cache.data_ptr(),
        k_strides=tuple(key_cache.stride()[:3]),
        v_strides=tuple(value_cache.stride()[:3]),
        num_pages=pages,
        page_tokens=page_tokens,
        page_table=page_table.data_ptr(),
        table_index_bytes=page_table.element_size(),
        table_row_stride=page_table.stride(0),
        max_pages=max_pages,
        context_lens=context_lens.data_ptr(),
        lens_index_bytes=context_lens.element_size(),
        rows=rows,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=head_dim**-0.5 if scale is None else float(scale),
        threads=torch.get_num_threads() if threads is None else int(threads),
    )
    return out


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
        o = F.scaled_dot_product_attention(q.reshape(s, kv_heads, n_rep, head_dim), k, v, attn_mask=mask, scale=scaling)
        return o.reshape(s, heads, 1, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=n_rep > 1)


def _prefill_native(
    q: torch.Tensor, plan: PagePlan, group: PageGroup, scaling: float | None, out: torch.Tensor
) -> None:
    """The native kernel for one chunk ``q [n, heads, d]``, written into ``out [n, heads, d]``."""
    a, b = group.q_slice
    if group.fresh:
        causal_prefill_attention(q, plan.new_key[a:b], plan.new_value[a:b], scaling, out=out)
        return
    if group._q_start is None:  # once a step, not once a layer
        group._q_start = int(group.kv_lengths[0]) - (b - a)
    causal_prefill_attention(
        q, plan.key_cache, plan.value_cache, scaling, page_table=group.page_table[0], q_start=group._q_start, out=out
    )


def _attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal SDPA of ``q [1, heads, n, d]`` over a chunk's own new K/V ``[n, kv_heads, d]``."""
    k = k.transpose(0, 1).unsqueeze(0)
    v = v.transpose(0, 1).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


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
