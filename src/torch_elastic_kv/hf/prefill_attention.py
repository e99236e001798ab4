"""Causal prefill attention on CPU by the native kernel (``_C.causal_prefill_attention``).

A prompt chunk's queries attend causally over their sequence's K/V: the chunk's own new K/V
when it starts at position 0, or the sequence's KV pages through its page table when it does
not (a later chunk, a prefix-cache hit). The kernel (csrc/kernels/prefill_attention.h) packs
each KV head's keys once and scores blocks of query rows against blocks of keys in vector
registers, compiled for AVX-512, AVX2 and portable code and picked at run time.

It serves a layer's prefill chunks when :func:`native_prefill_enabled` says so: float32 CPU
tensors, a CPU with AVX2 or AVX-512 (the portable code is slower than torch's own flash
attention, which then stays in use; builds by a compiler other than GCC 12 or later have the
portable code only), and ``EKV_NATIVE_PREFILL`` unset or not ``0``, read once per process, at
the first prefill.
"""

from __future__ import annotations

import os

import torch

from .._native import _C
from .native_args import INDEX_DTYPES, check_cpu_float32, check_rows_contiguous, output_like

NATIVE_PREFILL_ENV = "EKV_NATIVE_PREFILL"
# Instruction-set levels: 4 x86-64-v4 (AVX-512), 3 x86-64-v3 (AVX2 + FMA), 1 portable.
ISA_LEVELS = (4, 3, 1)
_FAST_LEVELS = (4, 3)
_enabled: bool | None = None


def isa_levels() -> tuple[int, ...]:
    """The kernel's instruction-set levels this CPU (and this build) can run, best first."""
    return tuple(_C.prefill_isa_levels())


def native_prefill_enabled(query: torch.Tensor) -> bool:
    """Whether the kernel serves prefill attention for ``query`` (see module docstring)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(NATIVE_PREFILL_ENV, "1").strip() != "0" and isa_levels()[0] in _FAST_LEVELS
    return _enabled and query.dtype == torch.float32 and query.device.type == "cpu"


def set_native_prefill(enabled: bool | None) -> None:
    """Turn the kernel on or off for the process; ``None`` reads ``EKV_NATIVE_PREFILL`` and the
    CPU again at the next prefill."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_native_prefill: enabled must be True, False or None, got {enabled!r}")
    _enabled = enabled


def causal_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    *,
    page_table: torch.Tensor | None = None,
    q_start: int = 0,
    out: torch.Tensor | None = None,
    threads: int | None = None,
    isa: int = 0,
) -> torch.Tensor:
    """Causal attention of a chunk's queries over its sequence's K/V (float32, CPU).

    Args:
        query: ``[n, heads, head_dim]`` (any strides, ``head_dim`` contiguous); query ``i`` is
            position ``q_start + i`` and sees keys ``[0, q_start + i]``.
        key, value: without ``page_table``, the chunk's own ``[n, kv_heads, head_dim]`` (then
            ``q_start`` must be 0); with it, the pool's ``[pages, page_tokens, kv_heads,
            head_dim]`` (strided views fine).
        scale: softmax scale (default ``head_dim ** -0.5``).
        page_table: ``[>= ceil((q_start + n) / page_tokens)]`` int32/int64 page ids of the sequence.
        q_start: position of the chunk's first token.
        out: ``[n, heads, head_dim]`` float32 to write into (default: a new tensor).
        threads: worker threads (default ``torch.get_num_threads()``).
        isa: 0 for the best code this CPU runs, else one of :data:`ISA_LEVELS` (tests pin one).

    Returns ``out``. Raises ValueError naming the numbers for bad shapes, dtypes or page ids,
    MemoryError when the kernel's buffers cannot be had; nothing is written then.
    """
    name = "causal_prefill_attention"
    check_cpu_float32(name, query=query, key=key, value=value)
    if isinstance(q_start, bool) or not isinstance(q_start, int) or q_start < 0:
        raise ValueError(f"{name}: q_start must be an int >= 0, got {q_start!r}")
    if isinstance(isa, bool) or isa not in (0, *ISA_LEVELS):
        raise ValueError(f"{name}: isa must be 0 or one of {ISA_LEVELS}, got {isa!r}")
    kv_dims = 3 if page_table is None else 4
    if query.dim() != 3 or key.dim() != kv_dims or key.shape != value.shape:
        want = "[n, kv_heads, head_dim]" if page_table is None else "[pages, page_tokens, kv_heads, head_dim]"
        raise ValueError(
            f"{name}: query {tuple(query.shape)} must be [n, heads, head_dim] and key/value "
            f"{tuple(key.shape)} / {tuple(value.shape)} equal {want}"
        )
    n, heads, head_dim = query.shape
    kv_heads, kv_dim = key.shape[-2:]
    if kv_dim != head_dim:
        raise ValueError(f"{name}: key/value head_dim {kv_dim} != query head_dim {head_dim}")
    if page_table is None:
        if key.shape[0] != n:
            raise ValueError(f"{name}: {n} queries but {key.shape[0]} keys (without a page table they are the same)")
        if q_start != 0:
            raise ValueError(f"{name}: q_start={q_start} needs a page table (the chunk's own K/V start at 0)")
        k_strides = (0, *key.stride()[:2])
        v_strides = (0, *value.stride()[:2])
        pages = page_tokens = table_pages = 0
    else:
        if page_table.dim() != 1 or page_table.dtype not in INDEX_DTYPES or page_table.device.type != "cpu":
            raise ValueError(
                f"{name}: page_table must be a 1-d int32/int64 CPU tensor, got "
                f"{tuple(page_table.shape)} {page_table.dtype} on {page_table.device}"
            )
        page_table = page_table.contiguous()
        k_strides = tuple(key.stride()[:3])
        v_strides = tuple(value.stride()[:3])
        pages, page_tokens = key.shape[:2]
        table_pages = page_table.shape[0]
    out = output_like(name, out, query)
    check_rows_contiguous(name, query=query, out=out, key=key, value=value)
    _C.causal_prefill_attention(
        out=out.data_ptr(),
        query=query.data_ptr(),
        q_strides=tuple(query.stride()[:2]),
        out_strides=tuple(out.stride()[:2]),
        queries=n,
        q_start=q_start,
        key=key.data_ptr(),
        value=value.data_ptr(),
        k_strides=k_strides,
        v_strides=v_strides,
        page_table=0 if page_table is None else page_table.data_ptr(),
        table_index_bytes=8 if page_table is None else page_table.element_size(),
        table_pages=table_pages,
        page_tokens=page_tokens,
        num_pages=pages,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=head_dim**-0.5 if scale is None else float(scale),
        threads=torch.get_num_threads() if threads is None else int(threads),
        isa=isa,
    )
    return out
