"""The native causal prefill kernel (_C.causal_prefill_attention via
prefill_attention.causal_prefill_attention) against torch SDPA, at every instruction-set level
this CPU runs; its argument checks; and the Engine's tokens with it on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_elastic_kv import Engine
from torch_elastic_kv.hf import attention, prefill_attention
from torch_elastic_kv.hf.prefill_attention import causal_prefill_attention, isa_levels
from torch_elastic_kv.testing.models import tiny_llama

LEVELS = isa_levels()


def _reference(query, key, value, q_start, scale=None):
    """SDPA of ``query [n, heads, d]`` at positions ``q_start..`` over ``key/value [L, kv, d]``."""
    n, heads, _ = query.shape
    keys = key.shape[0]
    allowed = torch.arange(keys).view(1, -1) <= (q_start + torch.arange(n)).view(-1, 1)
    o = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),
        key.transpose(0, 1).unsqueeze(0),
        value.transpose(0, 1).unsqueeze(0),
        attn_mask=allowed,
        scale=scale,
        enable_gqa=heads != key.shape[1],
    )
    return o[0].transpose(0, 1)


def test_levels_name_what_this_cpu_runs():
    assert LEVELS[-1] == 1  # the portable code is always built
    assert list(LEVELS) == sorted(LEVELS, reverse=True)
    with open("/proc/cpuinfo") as f:
        lines = [line for line in f if line.startswith("flags")]
    if not lines:  # not x86: only the portable code is built
        assert LEVELS == (1,)
        return
    flags = lines[0].split(":", 1)[1].split()
    assert (4 in LEVELS) == all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"))
    if "avx2" not in flags or "fma" not in flags:
        assert 3 not in LEVELS


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize(
    "n,heads,kv_heads,head_dim",
    [
        (1, 4, 4, 64),  # one query, one key
        (7, 2, 2, 64),  # fewer rows than a row block
        (16, 4, 2, 64),  # one key block exactly
        (33, 8, 2, 80),  # a key block and one more; head_dim not a multiple of 64
        (130, 4, 4, 64),
        (100, 6, 1, 24),  # head_dim padded to 32
        (47, 3, 3, 128),
        (40, 2, 2, 48),  # three vectors of dims in the weighted values
        (21, 4, 1, 96),  # 64 dims, then three vectors
        (9, 2, 1, 5),
    ],
)
def test_fresh_chunk_matches_causal_sdpa(isa, n, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(n * 7 + head_dim)
    # The layout the model hands over: queries a [heads, T, d] view, K/V the step's [T, kv, d].
    q_all = torch.randn(heads, n + 5, head_dim, generator=gen)
    query = q_all[:, 2 : 2 + n].transpose(0, 1)
    key = torch.randn(n, kv_heads, head_dim, generator=gen)
    value = torch.randn(n, kv_heads, head_dim, generator=gen)
    out = torch.full((n + 3, heads, head_dim), 7.0)
    got = causal_prefill_attention(query, key, value, 0.3, out=out[1 : 1 + n], isa=isa)
    torch.testing.assert_close(got, _reference(query, key, value, 0, scale=0.3), atol=1e-5, rtol=1e-4)
    # Only the chunk's rows were written.
    assert torch.all(out[0] == 7.0) and torch.all(out[1 + n :] == 7.0)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("q_start,n,page_tokens", [(5, 3, 4), (16, 16, 16), (37, 20, 5), (200, 1, 16), (1, 40, 3)])
def test_paged_chunk_matches_sdpa_over_its_pages(isa, table_dtype, q_start, n, page_tokens):
    heads, kv_heads, head_dim = 4, 2, 32
    gen = torch.Generator().manual_seed(q_start * 31 + n)
    keys = q_start + n
    used = -(-keys // page_tokens)
    pages = used + 6
    # A page-major pool's layer view: K/V planes are strided, not contiguous.
    planes = torch.randn(pages, 2, 2, page_tokens, kv_heads, head_dim, generator=gen)
    key_cache, value_cache = planes[:, 1, 0], planes[:, 1, 1]
    assert not key_cache.is_contiguous()
    table = torch.randperm(pages, generator=gen)[: used + 2].to(table_dtype)  # longer than needed
    query = torch.randn(n, heads, head_dim, generator=gen)
    got = causal_prefill_attention(query, key_cache, value_cache, page_table=table, q_start=q_start, isa=isa)
    flat = table[:used].long()
    k = key_cache.index_select(0, flat).reshape(-1, kv_heads, head_dim)[:keys]
    v = value_cache.index_select(0, flat).reshape(-1, kv_heads, head_dim)[:keys]
    torch.testing.assert_close(got, _reference(query, k, v, q_start), atol=1e-5, rtol=1e-4)


def test_threads_give_the_same_bits():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(300, 4, 64, generator=gen)
    key = torch.randn(300, 2, 64, generator=gen)
    value = torch.randn(300, 2, 64, generator=gen)
    one = causal_prefill_attention(query, key, value, threads=1)
    assert torch.equal(causal_prefill_attention(query, key, value, threads=3), one)
    # The paged path too, with four query heads a kv head.
    planes = torch.randn(30, 2, 8, 2, 64, generator=gen)
    table = torch.randperm(30, generator=gen)
    q = torch.randn(50, 8, 64, generator=gen)
    paged = [
        causal_prefill_attention(q, planes[:, 0], planes[:, 1], page_table=table, q_start=133, threads=t)
        for t in (1, 4)
    ]
    assert torch.equal(paged[0], paged[1])


def _args():
    planes = torch.randn(6, 2, 4, 2, 8)
    return dict(
        query=torch.randn(3, 4, 8),
        key=planes[:, 0],
        value=planes[:, 1],
        page_table=torch.tensor([0, 1, 2]),
        q_start=5,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(page_table=torch.tensor([3])), r"8 keys need 2 pages of 4 tokens, the page table has 1"),
        (dict(q_start=10), r"13 keys need 4 pages of 4 tokens, the page table has 3"),
        (dict(page_table=torch.tensor([0, 6, 1])), r"page 1 id 6 is outside \[0, 6\)"),
        (dict(page_table=torch.tensor([-1, 1, 2])), r"page 0 id -1 is outside \[0, 6\)"),
        (dict(page_table=torch.tensor([[0, 1]])), r"page_table must be a 1-d int32/int64 CPU tensor"),
        (dict(page_table=torch.tensor([0.0, 1.0])), r"page_table must be a 1-d int32/int64 CPU tensor"),
        (dict(query=torch.randn(3, 3, 8)), r"heads=3 is not a multiple of kv_heads=2"),
        (dict(query=torch.randn(3, 4, 6)), r"key/value head_dim 8 != query head_dim 6"),
        (dict(query=torch.randn(3, 4, 8).double()), r"query must be float32 on CPU"),
        (dict(q_start=-1), r"q_start must be an int >= 0, got -1"),
        (dict(q_start=1.5), r"q_start must be an int >= 0, got 1.5"),
        (dict(page_table=None), r"key/value \(6, 4, 2, 8\) / \(6, 4, 2, 8\) equal \[n, kv_heads, head_dim\]"),
    ],
)
def test_bad_arguments_raise_and_leave_out_unchanged(change, message):
    args = _args()
    args.update(change)
    out = torch.full((3, 4, 8), 7.0)
    with pytest.raises(ValueError, match=message):
        causal_prefill_attention(**args, out=out if args["query"].shape == (3, 4, 8) else None)
    assert torch.all(out == 7.0)


def test_bad_contiguous_chunk_isa_and_threads():
    query, key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"q_start=2 needs a page table"):
        causal_prefill_attention(query, key, value, q_start=2)
    with pytest.raises(ValueError, match=r"4 queries but 3 keys"):
        causal_prefill_attention(query, key[:3], value[:3])
    with pytest.raises(ValueError, match=r"isa must be 0 or one of \(4, 3, 1\), got 2"):
        causal_prefill_attention(query, key, value, isa=2)
    with pytest.raises(ValueError, match=r"threads=0 must be >= 1"):
        causal_prefill_attention(query, key, value, threads=0)
    with pytest.raises(ValueError, match=r"out \(4, 2, 7\) torch.float32 must be float32 \(4, 2, 8\)"):
        causal_prefill_attention(query, key, value, out=torch.empty(4, 2, 7))
    missing = [lvl for lvl in (4, 3) if lvl not in LEVELS]
    if missing:
        with pytest.raises(ValueError, match=rf"isa={missing[0]} cannot run here"):
            causal_prefill_attention(query, key, value, isa=missing[0])


def test_positions_past_int32_are_refused():
    planes = torch.randn(2, 2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"q_start=2147483647 \+ queries=1 keys exceed 2\^31 - 1"):
        causal_prefill_attention(
            torch.randn(1, 1, 8), planes[:, 0], planes[:, 1], page_table=torch.tensor([0]), q_start=2**31 - 1
        )


def test_when_the_kernel_serves_the_model(monkeypatch):
    f32, bf16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    try:
        monkeypatch.delenv(prefill_attention.NATIVE_PREFILL_ENV, raising=False)
        prefill_attention.set_native_prefill(None)
        fast = LEVELS[0] in (4, 3)
        assert prefill_attention.native_prefill_enabled(f32) is fast
        assert prefill_attention.native_prefill_enabled(bf16) is False
        monkeypatch.setenv(prefill_attention.NATIVE_PREFILL_ENV, "0")
        assert prefill_attention.native_prefill_enabled(f32) is fast  # read once: still the first answer
        prefill_attention.set_native_prefill(None)
        assert prefill_attention.native_prefill_enabled(f32) is False
        prefill_attention.set_native_prefill(True)
        assert prefill_attention.native_prefill_enabled(f32) is True
    finally:
        prefill_attention.set_native_prefill(None)
    with pytest.raises(ValueError, match=r"enabled must be True, False or None, got 'yes'"):
        prefill_attention.set_native_prefill("yes")


@pytest.fixture
def counted(monkeypatch):
    """Count the kernel's calls from the attention; the process switch restored afterwards."""
    calls = {"fresh": 0, "paged": 0}
    real = attention.causal_prefill_attention

    def counting(*args, **kwargs):
        calls["paged" if kwargs.get("page_table") is not None else "fresh"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_prefill_attention", counting)
    yield calls
    prefill_attention.set_native_prefill(None)


def _tokens(model, prompts, **kwargs):
    eng = Engine(model, background=False, prepack_weights=False, **kwargs)
    try:
        return eng.generate(prompts, max_new_tokens=6)
    finally:
        eng.close()


@pytest.mark.skipif(LEVELS[0] == 1, reason="the kernel serves the model only with AVX2 or AVX-512")
def test_engine_greedy_tokens_equal_with_kernel_on_and_off(counted):
    model = tiny_llama(seed=5)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 256, (40,), generator=g).tolist()
    # Long prompts split into chunks by a small step budget (later chunks read their pages), and
    # a prompt that shares 40 tokens with another (a prefix-cache hit, also read from pages).
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 70, 130)]
    prompts += [shared + [9, 10, 11], shared + [12]]
    prefill_attention.set_native_prefill(False)
    off = _tokens(model, prompts, max_batch_tokens=64)
    assert counted == {"fresh": 0, "paged": 0}
    prefill_attention.set_native_prefill(True)
    on = _tokens(model, prompts, max_batch_tokens=64)
    assert counted["fresh"] > 0 and counted["paged"] > 0
    assert on == off
    assert all(len(t) == 6 for t in on)
