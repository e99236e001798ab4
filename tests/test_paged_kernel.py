"""The native paged decode kernel (_C.paged_decode_attention via attention.paged_decode_attention)
against a reference: gather each row's pages, then torch SDPA over its context length."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torch_elastic_kv.hf.attention import paged_decode_attention


def _reference(query, key_cache, value_cache, page_table, lens, scale, row_tokens=None):
    tokens, heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    out = torch.zeros(tokens, heads, head_dim)
    for r in range(page_table.shape[0]):
        n = int(lens[r])
        used = math.ceil(n / key_cache.shape[1])
        pages = page_table[r, :used].long()
        k = key_cache.index_select(0, pages).reshape(-1, kv_heads, head_dim)[:n].transpose(0, 1)
        v = value_cache.index_select(0, pages).reshape(-1, kv_heads, head_dim)[:n].transpose(0, 1)
        t = r if row_tokens is None else int(row_tokens[r])
        q = query[t].unsqueeze(1)  # [heads, 1, d]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=scale, enable_gqa=heads != kv_heads
        )
        out[t] = o[0, :, 0]
    return out


def _pool(pages, page_tokens, kv_heads, head_dim, layers=3, layer=1, gen=None):
    """A page-major pool like KVPagePool's: [pages, layers, 2, page_tokens, kv_heads, head_dim]."""
    planes = torch.randn(pages, layers, 2, page_tokens, kv_heads, head_dim, generator=gen)
    return planes[:, layer, 0], planes[:, layer, 1]


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_tokens",
    [
        (8, 4, 64, 16),
        (4, 4, 32, 8),
        (6, 2, 20, 5),
        (32, 1, 16, 4),
        (2, 2, 7, 3),
    ],
)
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_matches_gather_sdpa(heads, kv_heads, head_dim, page_tokens, table_dtype):
    gen = torch.Generator().manual_seed(heads * 100 + head_dim + page_tokens)
    pages, rows, max_pages = 40, 9, 7
    key_cache, value_cache = _pool(pages, page_tokens, kv_heads, head_dim, gen=gen)
    assert not key_cache.is_contiguous()
    # Lengths: 1, exact page multiples, non-multiples, the full table.
    lens = torch.tensor(
        [
            1,
            page_tokens,
            page_tokens + 1,
            2 * page_tokens - 1,
            max_pages * page_tokens,
            3,
            5 * page_tokens + 2,
            2,
            max_pages * page_tokens - 1,
        ],
        dtype=torch.int64,
    )
    table = torch.stack([torch.randperm(pages, generator=gen)[:max_pages] for _ in range(rows)]).to(table_dtype)
    # The query as the attention sees it: [heads, tokens, d] transposed to [tokens, heads, d].
    query = torch.randn(heads, rows, head_dim, generator=gen).transpose(0, 1)
    scale = 0.3
    out = paged_decode_attention(query, key_cache, value_cache, table, lens, scale, threads=3)
    ref = _reference(query, key_cache, value_cache, table, lens, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # One thread computes the same numbers (threads split work, not sums).
    one = paged_decode_attention(query, key_cache, value_cache, table, lens.to(torch.int32), scale, threads=1)
    assert torch.equal(one, out)


def test_row_tokens_write_only_their_rows():
    gen = torch.Generator().manual_seed(7)
    key_cache, value_cache = _pool(12, 4, 2, 16, gen=gen)
    tokens = 6
    query = torch.randn(tokens, 4, 16, generator=gen)
    row_tokens = torch.tensor([4, 1, 5], dtype=torch.int64)
    table = torch.tensor([[3, 7, 0], [11, 11, 11], [2, 5, 9]])
    lens = torch.tensor([9, 1, 12])
    out = torch.full((tokens, 4, 16), 123.0)
    paged_decode_attention(query, key_cache, value_cache, table, lens, out=out, row_tokens=row_tokens)
    ref = _reference(query, key_cache, value_cache, table, lens, 16**-0.5, row_tokens)
    for t in range(tokens):
        if t in (4, 1, 5):
            torch.testing.assert_close(out[t], ref[t], atol=1e-5, rtol=1e-5)
        else:
            assert torch.all(out[t] == 123.0)


def test_length_one_returns_that_value():
    key_cache, value_cache = _pool(3, 4, 1, 8)
    query = torch.randn(1, 2, 8)
    out = paged_decode_attention(query, key_cache, value_cache, torch.tensor([[2]]), torch.tensor([1]))
    assert torch.allclose(out[0], value_cache[2, 0, 0].expand(2, 8))


def _args():
    key_cache, value_cache = _pool(5, 4, 2, 8)
    return torch.randn(2, 4, 8), key_cache, value_cache, torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 8])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.__setitem__(4, torch.tensor([0, 5])), r"row 0 context length 0 is outside \[1, 8\]"),
        (lambda a: a.__setitem__(4, torch.tensor([5, 9])), r"row 1 context length 9 is outside \[1, 8\]"),
        (lambda a: a.__setitem__(3, torch.tensor([[0, 1], [2, 5]])), r"row 1 page 1 id 5 is outside \[0, 5\)"),
        (lambda a: a.__setitem__(3, torch.tensor([[-1, 1], [2, 3]])), r"row 0 page 0 id -1 is outside \[0, 5\)"),
        (lambda a: a.__setitem__(0, torch.randn(2, 3, 8)), r"heads=3 is not a multiple of kv_heads=2"),
        (lambda a: a.__setitem__(0, torch.randn(2, 4, 8, dtype=torch.float64)), r"query must be float32"),
        (lambda a: a.__setitem__(0, torch.randn(2, 4, 6)), r"head_dim 8 != query head_dim 6"),
        (lambda a: a.__setitem__(3, torch.tensor([[0.0, 1.0], [2.0, 3.0]])), r"page_table must be a 2-d int32/int64"),
        (lambda a: a.__setitem__(4, torch.tensor([5])), r"context_lens must be \[rows=2\]"),
        (lambda a: a.__setitem__(0, torch.randn(1, 4, 8)), r"rows=2 exceed num_tokens=1"),
    ],
)
def test_bad_arguments_raise_and_leave_out_unchanged(change, message):
    args = list(_args())
    change(args)
    out = torch.full((args[0].shape[0], args[0].shape[1], args[0].shape[2]), 7.0)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*args, out=out if args[0].dtype == torch.float32 else None)
    assert torch.all(out == 7.0)


def test_bad_row_tokens_and_threads():
    query, key_cache, value_cache, table, lens = _args()
    with pytest.raises(ValueError, match=r"row 1 token 2 is outside \[0, 2\)"):
        paged_decode_attention(query, key_cache, value_cache, table, lens, row_tokens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"threads=0 must be >= 1"):
        paged_decode_attention(query, key_cache, value_cache, table, lens, threads=0)
