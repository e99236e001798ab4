"""The Triton paged decode kernel (hf/triton_decode.py) against gather + SDPA, on CPU through
Triton's interpreter, and the attention's choice of decode path (EKV_TRITON_DECODE).

The interpreter runs the kernel's own code (the loop over each row's pages, masks, strides,
the online softmax) with numpy; what it cannot show is that Triton compiles it for a GPU:
benchmarks/gpu_check.py's decode step checks that on a device.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
# Triton 3.6's interpreter turns a loop bound held in a tensor into an int with int() of a
# 1-element array, which numpy 2.4 refuses; 3.7 squeezes it first.
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
    pytest.skip(f"Triton's interpreter before 3.7 (found {triton.__version__}) cannot run the kernel's loop")

from torch_elastic_kv import Engine  # noqa: E402
from torch_elastic_kv.hf import attention  # noqa: E402
from torch_elastic_kv.hf.attention import PageGroup, PagePlan, _attend, enable_paged_attention  # noqa: E402
from torch_elastic_kv.hf.cache import ElasticPagedCache  # noqa: E402
from torch_elastic_kv.hf.compat import cache_kwargs  # noqa: E402
from torch_elastic_kv.hf.triton_decode import paged_decode_attention_triton  # noqa: E402
from torch_elastic_kv.kv.pool import KVPagePool  # noqa: E402
from torch_elastic_kv.testing.models import tiny_llama  # noqa: E402

MiB = 1 << 20


def _lengths(page_tokens: int, max_pages: int) -> list[int]:
    """1, mid-page, exactly at page ends, one past, the whole table."""
    t = page_tokens
    return [1, t, t + 1, 2 * t - 1, max_pages * t, 3, (max_pages - 2) * t + 2, 2 * t, max_pages * t - 1]


def _gather_sdpa(query, key_cache, value_cache, table, lens, scale):
    """The fallback itself: attention._attend over one decode group of every row."""
    rows = table.shape[0]
    group = PageGroup(table.long(), lens.long(), (lens.long() - 1).view(-1, 1), torch.arange(rows).view(-1, 1))
    plan = PagePlan(0, key_cache, value_cache, [group], rows)
    o = _attend(query.unsqueeze(2), plan, group, scale)  # [rows, heads, 1, d]
    return o[:, :, 0]


def _filled_pool(layout, page_tokens, kv_heads, head_dim, dtype, gen, layers=1):
    pool = KVPagePool(layers, kv_heads, head_dim, dtype, page_tokens=page_tokens, max_bytes=32 * MiB, layout=layout)
    ids = pool.alloc(24)
    for layer in range(layers):
        for cache in (pool.key_cache(layer), pool.value_cache(layer)):
            cache[ids] = torch.randn(len(ids), page_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    return pool, ids


@pytest.mark.parametrize("layout", ["page-major", "layer-major"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_tokens",
    [
        (8, 2, 64, 16),  # GQA 4:1, one page per tile row block
        (6, 2, 16, 5),  # odd page size
        (4, 4, 16, 16),  # MHA: several pages per block
    ],
)
def test_matches_gather_sdpa_float32(layout, heads, kv_heads, head_dim, page_tokens):
    gen = torch.Generator().manual_seed(heads * 31 + head_dim + page_tokens)
    pool, ids = _filled_pool(layout, page_tokens, kv_heads, head_dim, torch.float32, gen)
    key_cache, value_cache = pool.key_cache(0), pool.value_cache(0)
    max_pages = 6
    lens = torch.tensor(_lengths(page_tokens, max_pages))
    rows = len(lens)
    # Each row's pages: a shuffled draw from the allocated ids, so neither sorted nor adjacent.
    table = torch.tensor([[ids[i] for i in torch.randperm(len(ids), generator=gen)[:max_pages]] for _ in range(rows)])
    query = torch.randn(heads, rows, head_dim, generator=gen).transpose(0, 1)  # strided, as the attention has it
    ref = _gather_sdpa(query, key_cache, value_cache, table, lens, 0.25)
    out = paged_decode_attention_triton(query, key_cache, value_cache, table, lens, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    # int32 tables and lengths read the same.
    out32 = paged_decode_attention_triton(query, key_cache, value_cache, table.int(), lens.int(), 0.25)
    assert torch.equal(out32, out)
    pool.close()


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_tokens",
    [
        (6, 2, 20, 3),  # head_dim padded to 32, page_tokens to 4
        (32, 1, 16, 4),  # 32 query heads on one KV head
        (8, 1, 128, 16),  # the heads of one KV head split over two programs (tile bound)
        (2, 2, 7, 1),  # one token per page
    ],
)
def test_matches_gather_sdpa_odd_shapes(heads, kv_heads, head_dim, page_tokens):
    gen = torch.Generator().manual_seed(heads + head_dim + page_tokens)
    # A page-major slab like the pool's: [pages, layers, 2, page_tokens, kv_heads, head_dim].
    planes = torch.randn(20, 3, 2, page_tokens, kv_heads, head_dim, generator=gen)
    key_cache, value_cache = planes[:, 1, 0], planes[:, 1, 1]
    max_pages = 5
    lens = torch.tensor(_lengths(page_tokens, max_pages)[:5])
    table = torch.stack([torch.randperm(20, generator=gen)[:max_pages] for _ in range(len(lens))])
    query = torch.randn(len(lens), heads, head_dim, generator=gen)
    ref = _gather_sdpa(query, key_cache, value_cache, table, lens, None)
    out = paged_decode_attention_triton(query, key_cache, value_cache, table, lens)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    # Split rows (flash-decoding, what CUDA picks for few rows): 8 ways leaves short rows'
    # later splits empty, which the merge must ignore.
    for splits in (2, 8):
        split = paged_decode_attention_triton(query, key_cache, value_cache, table, lens, splits=splits)
        torch.testing.assert_close(split, ref, atol=2e-6, rtol=2e-5)


def test_tiles_inside_large_pages_and_all_padding_tiles():
    """Pages larger than a tile: a tile is a part of a page. With 33-token pages padded to 64
    slots and 16-token tiles, the tile of slots 48-63 holds only padding; a split that starts
    there must contribute nothing (no inf - inf)."""
    from torch_elastic_kv.hf import triton_decode

    config = triton_decode.LaunchConfig(tile_tokens=16)
    assert triton_decode._tiles(2, 33, 16, tile_tokens=16)[2:4] == (64, 16)
    gen = torch.Generator().manual_seed(21)
    key_cache = torch.randn(9, 33, 1, 16, generator=gen)
    value_cache = torch.randn(9, 33, 1, 16, generator=gen)
    lens = torch.tensor([1, 33, 34, 66, 99, 40])
    table = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(len(lens))])
    query = torch.randn(len(lens), 2, 16, generator=gen)
    ref = _gather_sdpa(query, key_cache, value_cache, table, lens, None)
    for splits in (1, 4, 16):
        out = paged_decode_attention_triton(query, key_cache, value_cache, table, lens, splits=splits, config=config)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)


def test_launch_config_is_an_argument_checked_at_the_door():
    """The launch shape travels with the call (no module state to edit); a bad one is refused."""
    from torch_elastic_kv.hf import triton_decode

    assert triton_decode.DEFAULT_LAUNCH == triton_decode.LaunchConfig(32, 4, 2)
    assert not hasattr(triton_decode, "_CONFIG")
    for kwargs, msg in (
        ({"tile_tokens": 24}, r"LaunchConfig: tile_tokens=24 must be a power of two >= 16"),
        ({"tile_tokens": 8}, r"LaunchConfig: tile_tokens=8 must be a power of two >= 16"),
        ({"num_warps": 3}, r"LaunchConfig: num_warps=3 must be a power of two >= 1"),
        ({"num_stages": 0}, r"LaunchConfig: num_stages=0 must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            triton_decode.LaunchConfig(**kwargs)
    gen = torch.Generator().manual_seed(5)
    key_cache = torch.randn(4, 8, 1, 16, generator=gen)
    query = torch.randn(1, 2, 16, generator=gen)
    table, lens = torch.tensor([[2, 0]]), torch.tensor([11])
    out = torch.full((1, 2, 16), 7.0)
    with pytest.raises(ValueError, match=r"config must be a LaunchConfig, got dict"):
        paged_decode_attention_triton(query, key_cache, key_cache, table, lens, out=out, config={"tile_tokens": 16})
    assert torch.all(out == 7.0)
    wide = triton_decode.LaunchConfig(tile_tokens=64, num_warps=8, num_stages=3)
    torch.testing.assert_close(
        paged_decode_attention_triton(query, key_cache, key_cache, table, lens, config=wide),
        paged_decode_attention_triton(query, key_cache, key_cache, table, lens),
        atol=2e-6,
        rtol=2e-5,
    )


# Stated tolerances against gather + SDPA in float32 over the same (rounded) inputs: the kernel
# accumulates in float32, but like flash attention it rounds the probabilities to the cache's
# type for the P @ V product and rounds the output once at the store: a few units in the last
# place of bfloat16 (8 significant bits; 0.008 seen here, SDPA in bfloat16 0.004) or float16
# (11 bits; 0.0005 seen, as SDPA).
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_within_stated_tolerance(dtype, tol):
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, page_tokens = 8, 2, 32, 16
    pool, ids = _filled_pool("page-major", page_tokens, kv_heads, head_dim, dtype, gen)
    key_cache, value_cache = pool.key_cache(0), pool.value_cache(0)
    lens = torch.tensor(_lengths(page_tokens, 5))
    table = torch.tensor([[ids[i] for i in torch.randperm(len(ids), generator=gen)[:5]] for _ in range(len(lens))])
    query = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    out = paged_decode_attention_triton(query, key_cache, value_cache, table, lens)
    assert out.dtype == dtype
    mapped = max(ids) + 1  # the view spans the pool's reservation; only mapped pages are readable
    k32, v32 = key_cache[:mapped].float(), value_cache[:mapped].float()
    ref = _gather_sdpa(query.float(), k32, v32, table, lens, head_dim**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    pool.close()


def test_row_tokens_write_only_their_tokens():
    gen = torch.Generator().manual_seed(7)
    key_cache = torch.randn(12, 4, 2, 16, generator=gen)
    value_cache = torch.randn(12, 4, 2, 16, generator=gen)
    query = torch.randn(6, 4, 16, generator=gen)
    row_tokens = torch.tensor([4, 1, 5])
    table = torch.tensor([[3, 7, 0], [11, 11, 11], [2, 5, 9]])
    lens = torch.tensor([9, 1, 12])
    out = torch.full((6, 4, 16), 123.0)
    paged_decode_attention_triton(query, key_cache, value_cache, table, lens, out=out, row_tokens=row_tokens)
    ref = _gather_sdpa(query[row_tokens], key_cache, value_cache, table, lens, 16**-0.5)
    torch.testing.assert_close(out[row_tokens], ref, atol=2e-6, rtol=2e-5)
    untouched = [t for t in range(6) if t not in (4, 1, 5)]
    assert torch.all(out[untouched] == 123.0)
    # A context of one token is that token's value, whatever the query.
    assert torch.allclose(out[1], value_cache[11, 0, :].repeat_interleave(2, 0), atol=1e-6)


def _args():
    return (
        torch.randn(2, 4, 8),
        torch.randn(5, 4, 2, 8),
        torch.randn(5, 4, 2, 8),
        torch.tensor([[0, 1], [2, 3]]),
        torch.tensor([5, 8]),
    )


@pytest.mark.parametrize(
    "index,value,message",
    [
        (4, torch.tensor([0, 5]), r"row 0 context length 0 is outside \[1, 8\]"),
        (4, torch.tensor([5, 9]), r"row 1 context length 9 is outside \[1, 8\]"),
        (3, torch.tensor([[0, 1], [2, 5]]), r"row 1 page 1 id 5 is outside \[0, 5\)"),
        (3, torch.tensor([[-1, 1], [2, 3]]), r"row 0 page 0 id -1 is outside \[0, 5\)"),
        (3, torch.tensor([[0.0, 1.0], [2.0, 3.0]]), r"page_table must be a 2-d int32/int64"),
        (4, torch.tensor([5]), r"context_lens must be \[rows=2\]"),
        (0, torch.randn(2, 3, 8), r"heads=3 is not a multiple of kv_heads=2"),
        (0, torch.randn(2, 4, 6), r"head_dim 8 != query head_dim 6"),
        (0, torch.randn(1, 4, 8), r"rows=2 exceed num_tokens=1"),
        (0, torch.randn(2, 4, 8, dtype=torch.float64), r"unsupported input: dtype torch.float64"),
        (1, torch.randn(5, 4, 2, 8).half(), r"K/V dtype torch.float16/torch.float32 differs"),
    ],
)
def test_bad_arguments_raise_and_leave_out_unchanged(index, value, message):
    args = list(_args())
    args[index] = value
    if index in (1, 2):
        args[2] = value.clone()
        message = r"K/V dtype torch.float16/torch.float16 differs"
    out = torch.full((2, 4, 8), 7.0)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention_triton(*args, out=out if args[0].shape == (2, 4, 8) else None)
    assert torch.all(out == 7.0)


def test_bad_row_tokens_out_and_splits():
    query, key_cache, value_cache, table, lens = _args()
    for splits in (0, 3, 64, True, 2.0):
        with pytest.raises(ValueError, match=r"splits=.* must be a power of two in \[1, 32\]"):
            paged_decode_attention_triton(query, key_cache, value_cache, table, lens, splits=splits)
    with pytest.raises(ValueError, match=r"row 1 token 2 is outside \[0, 2\)"):
        paged_decode_attention_triton(query, key_cache, value_cache, table, lens, row_tokens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"out \(2, 4, 8\) torch.float16"):
        paged_decode_attention_triton(query, key_cache, value_cache, table, lens, out=torch.empty(2, 4, 8).half())


# --- the attention's decode path -----------------------------------------------------------


@pytest.fixture
def paths(monkeypatch):
    """Decode path tally from zero; EKV_TRITON_DECODE unset."""
    monkeypatch.delenv(attention.TRITON_DECODE_ENV, raising=False)
    monkeypatch.delenv(attention.NATIVE_DECODE_ENV, raising=False)
    attention.set_triton_decode_mode(None)
    attention.reset_decode_path_stats()
    yield monkeypatch
    attention.set_triton_decode_mode(None)
    attention.reset_decode_path_stats()


def _engine_tokens(model, prompts, new_tokens, **engine_kwargs):
    eng = Engine(model, background=False, prepack_weights=False, **engine_kwargs)
    try:
        return eng.generate(prompts, max_new_tokens=new_tokens)
    finally:
        eng.close()


@pytest.mark.parametrize("page_tokens", [16, 5])
def test_engine_greedy_tokens_equal_with_kernel_forced_and_gather(paths, page_tokens):
    model = tiny_llama(seed=2)
    g = torch.Generator().manual_seed(11)
    # Prompt lengths around page ends; the Engine packs their decode rows into one step.
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (4, page_tokens, 2 * page_tokens + 3)]
    attention.set_triton_decode_mode("0")
    paths.setenv(attention.NATIVE_DECODE_ENV, "0")
    gather = _engine_tokens(model, prompts, 6, page_tokens=page_tokens)
    stats = attention.decode_path_stats()
    assert stats["calls"]["triton"] == 0 and stats["calls"]["gather"] > 0
    attention.reset_decode_path_stats()
    attention.set_triton_decode_mode("1")
    kernel = _engine_tokens(model, prompts, 6, page_tokens=page_tokens)
    stats = attention.decode_path_stats()
    # Every decode row went through the kernel: 5 decode steps x 2 layers, 3 rows each at most.
    assert stats["calls"]["gather"] == 0 and stats["calls"]["native"] == 0
    assert stats["calls"]["triton"] >= 2 * 5 and stats["rows"]["triton"] == 2 * 3 * 5
    assert kernel == gather
    assert all(len(t) == 6 for t in kernel)


def test_generate_mode_and_layer_major_pool(paths):
    model = enable_paged_attention(tiny_llama(seed=4))
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))

    def run():
        pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=4, max_bytes=16 * MiB, layout="layer-major")
        cache = ElasticPagedCache(model.config, pool=pool, attention="paged")
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **cache_kwargs(model, cache))
        cache.close()
        pool.close()
        return out

    attention.set_triton_decode_mode("0")
    gather = run()
    assert attention.decode_path_stats()["calls"]["triton"] == 0
    attention.set_triton_decode_mode("1")
    kernel = run()
    assert attention.decode_path_stats()["rows"]["triton"] == 2 * 2 * 4  # 4 decode steps, 2 layers, 2 rows
    assert torch.equal(kernel, gather)


def test_auto_on_cpu_keeps_the_native_kernel_and_bad_mode_raises(paths):
    model = tiny_llama(seed=2)
    prompts = [[5, 6, 7], [8, 9]]
    _engine_tokens(model, prompts, 3)
    stats = attention.decode_path_stats()
    assert stats["calls"]["native"] > 0 and stats["calls"]["triton"] == 0 and stats["calls"]["gather"] == 0
    paths.setenv(attention.TRITON_DECODE_ENV, "yes")
    attention.set_triton_decode_mode(None)  # the variable is read again at the next use
    with pytest.raises(ValueError, match=r"EKV_TRITON_DECODE='yes': expected one of \('auto', '1', '0'\)"):
        attention.triton_decode_mode()


def test_forced_kernel_that_cannot_run_raises(paths):
    paths.setenv(attention.TRITON_DECODE_ENV, "1")
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64)
    kc = torch.randn(3, 4, 2, 8, dtype=torch.float64)
    plan = PagePlan(0, kc, kc, [], 0)
    with pytest.raises(RuntimeError, match=r"EKV_TRITON_DECODE=1 but .* dtype torch.float64"):
        attention._decode_path(q, plan)


def test_automatic_kernel_failure_falls_back_once_and_is_reported(paths):
    """A launch that fails under ``auto`` (a compile error on a GPU, say) turns the kernel off."""
    from torch_elastic_kv.hf import triton_decode

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this GPU")

    paths.setattr(triton_decode, "paged_decode_attention_triton", broken)
    q = torch.randn(2, 4, 8)
    kc = torch.randn(3, 4, 2, 8)
    plan = PagePlan(0, kc, kc, [], 0)
    out = torch.full((2, 4, 8), 1.5)
    args = (q, plan, torch.tensor([[0], [1]]), torch.tensor([2, 3]), None, None, out)
    assert attention._run_triton(*args) is False
    assert torch.all(out == 1.5)
    assert attention.decode_path_stats()["triton_failure"] == "RuntimeError: no compiler for this GPU"
    q_cuda_like = q.unsqueeze(0)  # auto on CPU never picks the kernel; after a failure not on CUDA either
    assert attention._decode_path(q_cuda_like, plan) == "native"
    attention.set_triton_decode_mode("1")
    with pytest.raises(RuntimeError, match="no compiler for this GPU"):
        attention._run_triton(*args)


def test_scale_default_is_head_dim_rsqrt():
    gen = torch.Generator().manual_seed(9)
    key_cache = torch.randn(4, 8, 1, 16, generator=gen)
    value_cache = torch.randn(4, 8, 1, 16, generator=gen)
    query = torch.randn(1, 2, 16, generator=gen)
    table, lens = torch.tensor([[2, 0]]), torch.tensor([11])
    out = paged_decode_attention_triton(query, key_cache, value_cache, table, lens)
    explicit = paged_decode_attention_triton(query, key_cache, value_cache, table, lens, 1 / math.sqrt(16))
    assert torch.equal(out, explicit)


def test_mode_is_read_once_and_changed_by_the_setter_only(paths):
    """EKV_TRITON_DECODE is read at the first decode and kept: a later change of the variable
    does nothing to the layer calls; set_triton_decode_mode does, and None re-reads it."""
    q = torch.randn(2, 4, 8)
    kc = torch.randn(3, 4, 2, 8)
    plan = PagePlan(0, kc, kc, [], 0)
    paths.setenv(attention.TRITON_DECODE_ENV, "0")
    assert attention._decode_path(q, plan) == "native"
    paths.setenv(attention.TRITON_DECODE_ENV, "1")  # too late: the mode was decided
    assert attention.triton_decode_mode() == "0"
    assert attention._decode_path(q, plan) == "native"
    attention.set_triton_decode_mode("1")
    assert attention._decode_path(q, plan) == "triton"
    with pytest.raises(ValueError, match=r"set_triton_decode_mode: mode='on': expected one of"):
        attention.set_triton_decode_mode("on")
    assert attention.triton_decode_mode() == "1"  # unchanged by the refused value
    paths.setenv(attention.TRITON_DECODE_ENV, "0")
    attention.set_triton_decode_mode(None)
    assert attention._decode_path(q, plan) == "native"
    paths.setenv(attention.TRITON_DECODE_ENV, " Auto ")
    attention.set_triton_decode_mode(None)
    assert attention.triton_decode_mode() == "auto"
