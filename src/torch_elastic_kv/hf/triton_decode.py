"""Paged decode attention as one Triton kernel: K/V read in place through the page table.

One query token per row (a decode step) attends over the first ``context_lens[row]`` tokens of
its pages. One program per (row, KV head, block of the query heads sharing that KV head): it
walks the row's pages a few at a time, loads K/V tiles straight from the pool (any page,
token and head strides, so both pool layouts), and keeps an online softmax in float32. One
launch per layer replaces the gather path's query gather, page ``index_select`` per K and V,
SDPA call and output scatter per decode group (and their copies of the K/V). When rows x KV
heads are too few to fill the GPU (few rows, long contexts), each row's pages are split
among several programs and a second small launch merges their partial softmaxes
(flash-decoding).

Scores and the value sum are ``tl.dot`` products: the query heads sharing a KV head, padded
to 16, form the M side (MMA needs 16; bound by memory traffic, the padding is free), which
keeps register use far below an elementwise product's.

Where it runs: CUDA tensors go to a compiled ``triton.jit`` kernel; CPU tensors go to
Triton's interpreter (numpy, slow, for tests and the dry-run parity check). The kernels use
only long-standing Triton language features (``tl.load``/``tl.store`` with masks,
``tl.arange`` of power-of-two sizes, ``tl.dot`` with ``input_precision``, ``tl.trans``,
``tl.sum``/``tl.max``, ``tl.exp2``, ``tl.where``, a ``range`` loop with runtime bounds,
constexpr branches); no descriptors, no autotuning. Both compile for sm_90 with Triton 3.6
(the GPU image's) and 3.9 (``triton.compile`` to a cubin without a device); the interpreter
needs Triton >= 3.7 under numpy >= 2.4 (3.6's cannot take a loop bound from a tensor).

``triton`` is an optional dependency: :func:`triton_available` says whether it imports.
Running without a device (Triton's interpreter for CPU tensors, the offline compile report)
lives in :mod:`torch_elastic_kv.hf.triton_offline`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import torch

__all__ = [
    "DEFAULT_LAUNCH",
    "SUPPORTED_DTYPES",
    "LaunchConfig",
    "paged_decode_attention_triton",
    "triton_available",
    "unsupported_reason",
]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """The decode kernel's launch shape: K/V tile length in tokens, warps and pipeline stages.

    Every K/V element's address is a 64-bit register while its tile is in flight (a gather
    through the page table), so tiles stay small: the default is the largest tile that compiles
    for sm_90 at head_dim 128 without register spills (``python -m
    torch_elastic_kv.hf.triton_offline`` prints the counts); gpu_check's decode step times
    alternatives on a device by passing its own.
    """

    tile_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for field, value, low in (("tile_tokens", self.tile_tokens, 16), ("num_warps", self.num_warps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
                raise ValueError(f"LaunchConfig: {field}={value!r} must be a power of two >= {low}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"LaunchConfig: num_stages={self.num_stages!r} must be an int >= 1")


DEFAULT_LAUNCH = LaunchConfig()
_TILE_ELEMS = 4096  # tile tokens x D_PAD at most
_MAX_G_BLOCK = 32  # query heads of one KV head per program (64 spills at head_dim 128)
_MIN_SPLIT_BLOCKS = 4
_MAX_SPLITS = 32


def triton_available() -> bool:
    """Whether ``import triton`` worked when this module was imported."""
    return tl is not None


try:  # optional: the kernel exists only where triton imports
    import triton
    import triton.language as tl
except Exception as e:  # ImportError, or a broken install raising anything at import
    triton = tl = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

if tl is not None:
    # A plain function: ``_kernel`` wraps it with ``triton.jit`` (CUDA) or the interpreter (CPU).
    def _paged_decode_kernel(
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        lens_ptr,
        row_tok_ptr,
        q_stride_t,
        q_stride_h,
        o_stride_t,
        o_stride_h,
        k_stride_p,
        k_stride_t,
        k_stride_h,
        v_stride_p,
        v_stride_t,
        v_stride_h,
        table_stride,
        scale_log2,
        num_heads,
        blocks_per_split,
        N_REP: tl.constexpr,
        G_SPLIT: tl.constexpr,
        G_BLOCK: tl.constexpr,
        PAGE_TOKENS: tl.constexpr,
        PT_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1) // G_SPLIT
        g0 = (tl.program_id(1) % G_SPLIT) * G_BLOCK

        tok = tl.load(row_tok_ptr + row).to(tl.int64)
        ctx = tl.load(lens_ptr + row).to(tl.int32)
        # Tiles run over the row's pages each padded to PT_PAD slots (BLOCK_N and PT_PAD are
        # powers of two: a tile is several whole pages, or a part of one).
        n_pages = (ctx + PAGE_TOKENS - 1) // PAGE_TOKENS
        n_blocks = (n_pages * PT_PAD + BLOCK_N - 1) // BLOCK_N

        g = tl.arange(0, G_BLOCK)
        d = tl.arange(0, D_PAD)
        n = tl.arange(0, BLOCK_N)
        g_ok = (g0 + g) < N_REP
        d_ok = d < HEAD_DIM
        heads = kvh * N_REP + g0 + g  # query heads of this program
        q_off = tok * q_stride_t + heads.to(tl.int64)[:, None] * q_stride_h + d[None, :]
        q = tl.load(q_ptr + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_BLOCK, D_PAD]
        if DOT_F32:  # Triton's interpreter gets bfloat16 dots wrong (numpy has no bfloat16)
            q = q.to(tl.float32)

        m_i = tl.full([G_BLOCK], float("-inf"), tl.float32)
        l_i = tl.full([G_BLOCK], 0.0, tl.float32)
        acc = tl.full([G_BLOCK, D_PAD], 0.0, tl.float32)
        table_row = table_ptr + row.to(tl.int64) * table_stride
        # Split SPLITS ways (flash-decoding), this program takes one run of the row's blocks; a
        # run past the row's end is empty and leaves m_i = -inf, l_i = 0 for the combine.
        split = tl.program_id(2)
        first = split * blocks_per_split
        last = tl.minimum(n_blocks, first + blocks_per_split)
        for blk in range(first, last):
            slot = blk * BLOCK_N + n
            page_idx = slot // PT_PAD
            in_page = slot % PT_PAD
            pos = page_idx * PAGE_TOKENS + in_page
            valid = (in_page < PAGE_TOKENS) & (pos < ctx)
            page = tl.load(table_row + page_idx, mask=valid, other=0).to(tl.int64)
            kv_mask = valid[:, None] & d_ok[None, :]
            k_off = page[:, None] * k_stride_p + in_page[:, None] * k_stride_t + kvh * k_stride_h + d[None, :]
            k = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
            if DOT_F32:
                k = k.to(tl.float32)
            # Scores in log2 units (exp2 below). A dot even for one query token per head: the
            # heads sharing this KV head, padded to 16 rows, are its M; bound by memory, the
            # padding costs nothing and the MMA layouts keep registers low.
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [G_BLOCK, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # -inf while nothing valid was seen (a tile of page padding, a split's start): 0
            # keeps exp2 off inf - inf, and alpha, p are then 0 as they should be.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_off = page[:, None] * v_stride_p + in_page[:, None] * v_stride_t + kvh * v_stride_h + d[None, :]
            v = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            # p rounded to the cache's type as the MMA takes it (then widened again for DOT_F32).
            p = p.to(v_ptr.dtype.element_ty).to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new
        if SPLITS == 1:
            o = acc / l_i[:, None]
            o_off = tok * o_stride_t + heads.to(tl.int64)[:, None] * o_stride_h + d[None, :]
            tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:
            part = (row.to(tl.int64) * num_heads + heads) * SPLITS + split  # [G_BLOCK]
            tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)

    def _combine_kernel(
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        row_tok_ptr,
        o_stride_t,
        o_stride_h,
        num_heads,
        SPLITS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
    ):
        """One (row, head): merge the SPLITS partial softmaxes into the output."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        tok = tl.load(row_tok_ptr + row).to(tl.int64)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D_PAD)
        part = (row.to(tl.int64) * num_heads + head) * SPLITS + sp
        m = tl.load(part_ml_ptr + part * 2)
        l_s = tl.load(part_ml_ptr + part * 2 + 1)
        acc = tl.load(part_acc_ptr + part[:, None] * D_PAD + d[None, :])
        m_max = tl.max(m, axis=0)  # finite: the first split holds the row's first block
        w = tl.exp2(m - m_max)  # 0 for an empty split (m = -inf)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_s, axis=0)
        o_off = tok * o_stride_t + head.to(tl.int64) * o_stride_h + d
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=4)
def _kernel(name: str, interpret: bool):
    """A compiled kernel (``interpret=False``, CUDA) or its interpreted twin (CPU tensors)."""
    fn = {"decode": _paged_decode_kernel, "combine": _combine_kernel}[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _auto_splits(device: torch.device, programs: int, max_blocks: int) -> int:
    """How many ways to split each row's blocks: enough programs to cover the GPU's SMs twice
    when rows x heads alone do not, each split keeping at least _MIN_SPLIT_BLOCKS blocks."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    want = min(-(-2 * sms // programs), max(1, max_blocks // _MIN_SPLIT_BLOCKS), _MAX_SPLITS)
    return 1 << (want.bit_length() - 1)  # a power of two: few distinct compiles


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tiles(
    n_rep: int, page_tokens: int, head_dim: int, wide: bool = False, tile_tokens: int = DEFAULT_LAUNCH.tile_tokens
) -> tuple[int, int, int, int, int]:
    """(G_BLOCK, G_SPLIT, PT_PAD, BLOCK_N, D_PAD): every dot dimension >= 16 (the MMA
    minimum), K/V tiles of BLOCK_N tokens x D_PAD within _TILE_ELEMS elements (half that for
    ``wide``, float32, whose dot runs on FMA units with larger register layouts)."""
    d_pad = max(16, _next_pow2(head_dim))
    pt_pad = _next_pow2(page_tokens)
    g_block = min(max(16, _next_pow2(n_rep)), _MAX_G_BLOCK)  # query heads of one KV head, padded
    g_split = -(-n_rep // g_block)
    block_n = max(16, min(tile_tokens, _TILE_ELEMS // (2 if wide else 1) // d_pad))
    return g_block, g_split, pt_pad, block_n, d_pad


def unsupported_reason(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (None: it can). Cheap: no device sync."""
    if not triton_available():
        return f"triton does not import ({_IMPORT_ERROR!r})"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (supported: float16, bfloat16, float32)"
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        return f"K/V dtype {key_cache.dtype}/{value_cache.dtype} differs from the query's {query.dtype}"
    if key_cache.device != query.device or value_cache.device != query.device:
        return f"K/V on {key_cache.device}, query on {query.device}"
    if query.device.type not in ("cuda", "cpu"):
        return f"device {query.device.type}"
    if query.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} > {_MAX_HEAD_DIM}"
    return None


def paged_decode_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    row_tokens: torch.Tensor | None = None,
    validate: bool = True,
    splits: int | None = None,
    config: LaunchConfig = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """Decode attention read in place from KV pages by the Triton kernel (one launch, two
    when rows are split).

    Same contract as :func:`torch_elastic_kv.hf.attention.paged_decode_attention` (the native
    CPU kernel), for float16/bfloat16/float32 tensors on CUDA (compiled) or CPU (Triton's
    interpreter):

    Args:
        query: ``[tokens, heads, head_dim]`` (any strides, ``head_dim`` contiguous).
        key_cache, value_cache: ``[pages, page_tokens, kv_heads, head_dim]`` (strided views fine).
        page_table: ``[rows, max_pages]`` int32/int64 page ids; row ``r`` reads the first
            ``ceil(context_lens[r] / page_tokens)`` of its entries.
        context_lens: ``[rows]`` int32/int64, each in ``[1, max_pages * page_tokens]``.
        scale: softmax scale (default ``head_dim ** -0.5``).
        out: ``[tokens, heads, head_dim]`` of the query's dtype to write into (default: new).
        row_tokens: ``[rows]`` int64: row ``r`` is token ``row_tokens[r]`` of ``query``/``out``
            (default: row ``r`` is token ``r``, ``rows <= tokens``).
        validate: also check the values of ``page_table``, ``context_lens`` and ``row_tokens``
            (reads them back: a device sync on CUDA; the attention path passes False, its
            planner builds them in range).
        splits: split each row's pages this many ways (a power of two <= 32), one program
            each, merged by a second launch: flash-decoding, for few rows over long contexts.
            Default: 1 on CPU; on CUDA enough to give every SM two programs when rows x KV
            heads do not, keeping at least 4 tiles per split.
        config: the launch shape (:class:`LaunchConfig`; benchmarks time others).

    Returns ``out``; only the rows' tokens are written. Raises ValueError naming the numbers,
    RuntimeError when triton is not installed; nothing is written then.
    """
    name = "paged_decode_attention_triton"
    if not triton_available():
        raise RuntimeError(f"{name}: triton does not import ({_IMPORT_ERROR!r}); pip install triton")
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"{name}: query {tuple(query.shape)} must be [tokens, heads, head_dim] and "
            f"key/value caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} "
            "equal [pages, page_tokens, kv_heads, head_dim]"
        )
    reason = unsupported_reason(query, key_cache, value_cache)
    if reason is not None:
        raise ValueError(f"{name}: unsupported input: {reason}")
    tokens, heads, head_dim = query.shape
    pages, page_tokens, kv_heads, kv_dim = key_cache.shape
    dev = query.device
    if kv_dim != head_dim:
        raise ValueError(f"{name}: key/value head_dim {kv_dim} != query head_dim {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"{name}: heads={heads} is not a multiple of kv_heads={kv_heads}")
    if page_table.dim() != 2 or page_table.dtype not in _INDEX_DTYPES or page_table.device != dev:
        raise ValueError(
            f"{name}: page_table must be a 2-d int32/int64 tensor on {dev}, got "
            f"{tuple(page_table.shape)} {page_table.dtype} on {page_table.device}"
        )
    rows, max_pages = page_table.shape
    if context_lens.shape != (rows,) or context_lens.dtype not in _INDEX_DTYPES or context_lens.device != dev:
        raise ValueError(
            f"{name}: context_lens must be [rows={rows}] int32/int64 on {dev}, got "
            f"{tuple(context_lens.shape)} {context_lens.dtype} on {context_lens.device}"
        )
    if row_tokens is None:
        if rows > tokens:
            raise ValueError(f"{name}: rows={rows} exceed num_tokens={tokens}")
    elif row_tokens.shape != (rows,) or row_tokens.dtype != torch.int64 or row_tokens.device != dev:
        raise ValueError(
            f"{name}: row_tokens must be [rows={rows}] int64 on {dev}, got {tuple(row_tokens.shape)} "
            f"{row_tokens.dtype} on {row_tokens.device}"
        )
    if out is None:
        out = torch.empty(tokens, heads, head_dim, dtype=query.dtype, device=dev)
    elif out.shape != query.shape or out.dtype != query.dtype or out.device != dev:
        raise ValueError(
            f"{name}: out {tuple(out.shape)} {out.dtype} on {out.device} must be {tuple(query.shape)} "
            f"{query.dtype} on {dev}"
        )
    for t, what in ((query, "query"), (out, "out"), (key_cache, "key_cache"), (value_cache, "value_cache")):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: {what}'s last dimension must be contiguous (stride {t.stride(-1)})")
    if splits is not None and (
        isinstance(splits, bool)
        or not isinstance(splits, int)
        or not 1 <= splits <= _MAX_SPLITS
        or splits & (splits - 1)
    ):
        raise ValueError(f"{name}: splits={splits!r} must be a power of two in [1, {_MAX_SPLITS}]")
    if not isinstance(config, LaunchConfig):
        raise ValueError(f"{name}: config must be a LaunchConfig, got {type(config).__name__}")
    if validate and rows:
        _check_values(name, page_table, context_lens, row_tokens, pages, page_tokens, max_pages, tokens)
    if rows == 0:
        return out
    if page_table.stride(1) != 1 and max_pages > 1:
        page_table = page_table.contiguous()
    context_lens = context_lens.contiguous()
    if row_tokens is None:
        row_tokens = torch.arange(rows, dtype=torch.int64, device=dev)
    else:
        row_tokens = row_tokens.contiguous()
    n_rep = heads // kv_heads
    g_block, g_split, pt_pad, block_n, d_pad = _tiles(
        n_rep, page_tokens, head_dim, query.dtype == torch.float32, config.tile_tokens
    )
    scale = head_dim**-0.5 if scale is None else float(scale)
    max_blocks = -(-(max_pages * pt_pad) // block_n)
    if splits is None:
        splits = _auto_splits(dev, rows * kv_heads * g_split, max_blocks)
    per_split = -(-max_blocks // splits)
    if splits > 1:  # partial softmaxes: float32 [rows, heads, splits, D_PAD] and (max, sum)
        part_acc = torch.empty(rows, heads, splits, d_pad, dtype=torch.float32, device=dev)
        part_ml = torch.empty(rows, heads, splits, 2, dtype=torch.float32, device=dev)
    else:
        part_acc = part_ml = out  # not read: the kernel writes ``out`` directly
    interpret = dev.type == "cpu"
    dot_f32 = interpret and query.dtype == torch.bfloat16
    if interpret:
        from .triton_offline import interpretable_stdlib

        stdlib = interpretable_stdlib()
    else:
        stdlib = contextlib.nullcontext()
    with stdlib:
        _kernel("decode", interpret)[(rows, kv_heads * g_split, splits)](
            out,
            part_acc,
            part_ml,
            query,
            key_cache,
            value_cache,
            page_table,
            context_lens,
            row_tokens,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            value_cache.stride(0),
            value_cache.stride(1),
            value_cache.stride(2),
            page_table.stride(0),
            scale * math.log2(math.e),
            heads,
            per_split,
            N_REP=n_rep,
            G_SPLIT=g_split,
            G_BLOCK=g_block,
            PAGE_TOKENS=page_tokens,
            PT_PAD=pt_pad,
            BLOCK_N=block_n,
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            SPLITS=splits,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_f32 else "tf32",  # unused for 16-bit
            DOT_F32=dot_f32,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if splits > 1:
            _kernel("combine", interpret)[(rows, heads)](
                out,
                part_acc,
                part_ml,
                row_tokens,
                out.stride(0),
                out.stride(1),
                heads,
                SPLITS=splits,
                HEAD_DIM=head_dim,
                D_PAD=d_pad,
            )
    return out


def _check_values(
    name: str,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    row_tokens: torch.Tensor | None,
    pages: int,
    page_tokens: int,
    max_pages: int,
    tokens: int,
) -> None:
    lens = context_lens.tolist()
    for r, n in enumerate(lens):
        if not 1 <= n <= max_pages * page_tokens:
            raise ValueError(f"{name}: row {r} context length {n} is outside [1, {max_pages * page_tokens}]")
    table = page_table.tolist()
    for r, n in enumerate(lens):
        for j in range(-(-n // page_tokens)):
            if not 0 <= table[r][j] < pages:
                raise ValueError(f"{name}: row {r} page {j} id {table[r][j]} is outside [0, {pages})")
    if row_tokens is not None:
        for r, t in enumerate(row_tokens.tolist()):
            if not 0 <= t < tokens:
                raise ValueError(f"{name}: row {r} token {t} is outside [0, {tokens})")
