"""Packed (continuous-batching) mode of ElasticPagedCache against DynamicCache, one sequence at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from torch_elastic_kv.hf.attention import enable_paged_attention
from torch_elastic_kv.hf.cache import ElasticPagedCache
from torch_elastic_kv.hf.compat import cache_kwargs
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing.models import tiny_llama, tiny_qwen2

NEW_TOKENS = 10


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _reference(model, prompts, new_tokens=NEW_TOKENS):
    """Each prompt alone through DynamicCache: last-prompt-token logits and greedy continuation."""
    logits, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(input_ids=ids).logits[0, -1])
            out = model.generate(
                input_ids=ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                **cache_kwargs(model, DynamicCache(config=model.config)),
            )
            tokens.append(out[0, len(p) :].tolist())
    return logits, tokens


def _run_packed(model, cache, prompts, chunk, new_tokens=NEW_TOKENS, ids=None):
    """Drive the cache like the Engine: prefill chunks and decode tokens of all sequences packed."""
    ids = ids or list(range(len(prompts)))
    pos = {i: 0 for i in ids}
    gen = {i: [] for i in ids}
    first = {}
    with torch.no_grad():
        while any(len(gen[i]) < new_tokens for i in ids):
            entries, tokens = [], []
            for i, p in zip(ids, prompts):
                if len(gen[i]) >= new_tokens:
                    continue
                n = min(chunk, len(p) - pos[i]) if pos[i] < len(p) else 1
                feed = p[pos[i] : pos[i] + n] if pos[i] < len(p) else [gen[i][-1]]
                cache.ensure_capacity(i, pos[i] + n)
                entries.append((i, pos[i], n))
                tokens += feed
            extra = cache.set_packed_batch(entries)
            assert extra["position_ids"].shape == (1, len(tokens))
            out = model(input_ids=torch.tensor([tokens]), **cache_kwargs(model, cache), **extra)
            assert out.logits.shape[:2] == (1, len(entries))
            for j, (i, start, n) in enumerate(entries):
                pos[i] = start + n
                assert cache.request_tokens(i) == pos[i]
                if pos[i] >= len(prompts[ids.index(i)]):
                    if not gen[i]:
                        first[i] = out.logits[0, j]
                    gen[i].append(int(out.logits[0, j].argmax()))
    return first, gen


@pytest.mark.filterwarnings("ignore:ElasticPagedCache packed mode with a stock attention")
@pytest.mark.parametrize("paged", [True, False], ids=["paged-attention", "stock-sdpa"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_packed_matches_each_sequence_alone(factory, paged):
    model = factory()
    if paged:
        enable_paged_attention(model)
    prompts = _prompts([5, 23, 40, 1, 17, 9])
    ref_logits, ref_tokens = _reference(model, prompts)
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=8, max_bytes=8 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    first, gen = _run_packed(model, cache, prompts, chunk=16)
    for i in range(len(prompts)):
        torch.testing.assert_close(first[i], ref_logits[i], rtol=1e-5, atol=1e-5)
        assert gen[i] == ref_tokens[i], f"sequence {i}"
    assert pool.live_pages == sum(-(-(len(p) + NEW_TOKENS - 1) // 8) for p in prompts)
    for i in range(len(prompts)):
        cache.free_request(i)
    assert pool.live_pages == 0


def test_packed_detach_attach_and_swap_roundtrip():
    """Detach a sequence, copy its pages out and back into fresh pages, attach: it continues exactly."""
    model = enable_paged_attention(tiny_llama())
    prompts = _prompts([12, 30])
    _, ref_tokens = _reference(model, prompts)
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=4, max_bytes=8 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    with torch.no_grad():  # prefill both
        for i, p in enumerate(prompts):
            cache.ensure_capacity(i, len(p))
        extra = cache.set_packed_batch([(0, 0, len(prompts[0])), (1, 0, len(prompts[1]))])
        out = model(input_ids=torch.tensor([prompts[0] + prompts[1]]), **cache_kwargs(model, cache), **extra)
    pages, ntok = cache.detach_request(1)
    saved = pool.read_pages(pages)
    pool.free(pages)
    fresh = pool.alloc(len(pages))
    pool.write_pages(fresh, saved)
    cache.attach_request(1, fresh, ntok)
    assert cache.request_tokens(1) == len(prompts[1]) and cache.request_pages(1) == fresh
    last = [int(out.logits[0, 0].argmax()), int(out.logits[0, 1].argmax())]
    gen = [[last[0]], [last[1]]]
    with torch.no_grad():
        for _ in range(NEW_TOKENS - 1):
            entries = []
            for i, _p in enumerate(prompts):
                n = cache.request_tokens(i)
                cache.ensure_capacity(i, n + 1)
                entries.append((i, n, 1))
            extra = cache.set_packed_batch(entries)
            out = model(input_ids=torch.tensor([[gen[0][-1], gen[1][-1]]]), **cache_kwargs(model, cache), **extra)
            for i in range(2):
                gen[i].append(int(out.logits[0, i].argmax()))
    assert gen == ref_tokens


def test_packed_errors_leave_state_intact():
    model = enable_paged_attention(tiny_llama())
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=16, max_bytes=2 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    cache.ensure_capacity(7, 20)
    assert len(cache.request_pages(7)) == 2
    with pytest.raises(KeyError, match="unknown request 8"):
        cache.set_packed_batch([(8, 0, 1)])
    with pytest.raises(ValueError, match="needs 40 tokens of pages, has 32"):
        cache.set_packed_batch([(7, 0, 40)])
    with pytest.raises(ValueError, match="start_pos=5"):
        cache.set_packed_batch([(7, 5, 1)])  # nothing stored yet: cannot start at 5
    # OOM: a sequence that would exceed the pool's budget; the other sequence keeps its pages
    budget_pages = pool.free_pages + 2
    before = cache.request_pages(7)
    with pytest.raises(MemoryError, match=r"needed, \d+ pages \(\d+ bytes\) free"):
        cache.ensure_capacity(9, budget_pages * 16 + 1)
    assert cache.request_pages(7) == before and cache.request_ids() == [7]
    assert pool.live_pages == 2
    # a model whose attention ignores the paged plan is caught at the next layer
    plain = tiny_llama()
    forced = ElasticPagedCache(plain.config, pool=pool, attention="paged")
    forced.ensure_capacity(1, 3)
    with pytest.raises(ValueError, match="needs the model to use the paged attention"):
        plain(
            input_ids=torch.tensor([[5, 6, 7]]), **cache_kwargs(plain, forced), **forced.set_packed_batch([(1, 0, 3)])
        )


def test_compaction_between_set_packed_batch_and_forward():
    """Pages moved after set_packed_batch are re-indexed before the forward uses them."""
    model = enable_paged_attention(tiny_llama())
    prompts = _prompts([20, 25, 30])
    _, ref_tokens = _reference(model, prompts, new_tokens=3)
    # 1 MiB pages: two per 2 MiB chunk, so sequence 2's page sits alone in the second chunk
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=2048, max_bytes=8 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            cache.ensure_capacity(i, len(p) + 3)
        out = model(
            input_ids=torch.tensor([sum(prompts, [])]),
            **cache_kwargs(model, cache),
            **cache.set_packed_batch([(i, 0, len(p)) for i, p in enumerate(prompts)]),
        )
        nxt = int(out.logits[0, 2].argmax())
        cache.free_request(0)
        before = cache.request_pages(2)
        extra = cache.set_packed_batch([(2, len(prompts[2]), 1)])
        assert pool.compact() > 0 and cache.request_pages(2) != before
        out = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(model, cache), **extra)
    assert [nxt, int(out.logits[0, 0].argmax())] == ref_tokens[2][:2]


def test_compaction_before_the_first_forward_reaches_the_cache():
    """Packed mode allocates before any forward: a compaction then must still remap its pages."""
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=1024, max_bytes=8 << 20)  # 4 pages/chunk
    cache = ElasticPagedCache(tiny_llama().config, pool=pool)
    filler = pool.alloc(6)  # a full first chunk, two pages in the second
    cache.ensure_capacity(0, 1024)  # one page, in the second chunk
    before = cache.request_pages(0)
    pool.free([filler[0], filler[4], filler[5]])  # first chunk: one hole; second: only the cache's page
    assert pool.compact() > 0  # the cache's page moves into the hole
    after = cache.request_pages(0)
    assert after != before and all(pool.is_live(p) for p in after)
    assert not any(pool.is_live(p) for p in before)


def test_interrupted_forward_leaves_the_cache_usable():
    """A forward stopped between a layer's cache update and its attention (Ctrl-C) must not
    make every later forward fail."""
    model = enable_paged_attention(tiny_llama())
    prompt = _prompts([9])[0]
    _, ref_tokens = _reference(model, [prompt], new_tokens=3)
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=8, max_bytes=8 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    update = cache.update

    def interrupted(key_states, value_states, layer_idx, *args, **kwargs):
        out = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            raise KeyboardInterrupt
        return out

    cache.update = interrupted
    cache.ensure_capacity(5, len(prompt))
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(
            input_ids=torch.tensor([prompt]),
            **cache_kwargs(model, cache),
            **cache.set_packed_batch([(5, 0, len(prompt))]),
        )
    del cache.update
    cache.free_request(5)
    first, gen = _run_packed(model, cache, [prompt], chunk=16, new_tokens=3)
    assert gen[0] == ref_tokens[0]


def test_closed_cache_refuses_every_use_and_release_keeps_it_usable():
    model = tiny_llama()
    cache = ElasticPagedCache(model.config, max_bytes=8 << 20)
    prompt = _prompts([5])[0]
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt]), **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 5
    cache.release()  # not final: the cache serves again
    cache.ensure_capacity(7, 20)
    assert cache.request_tokens(7) == 0 and len(cache.request_pages(7)) == 2
    pool = cache.pool
    cache.close()
    assert pool._closed  # the cache created it, so closing the cache closes it
    k = torch.zeros(1, model.config.num_key_value_heads, 1, model.config.head_dim)
    calls = {
        "update": lambda: cache.update(k, k, 0),
        "get_seq_length": lambda: cache.get_seq_length(),
        "get_mask_sizes": lambda: cache.get_mask_sizes(1),
        "get_max_length": lambda: cache.get_max_length(),
        "reorder_cache": lambda: cache.reorder_cache(torch.tensor([0])),
        "crop": lambda: cache.crop(-1),
        "batch_repeat_interleave": lambda: cache.batch_repeat_interleave(2),
        "batch_select_indices": lambda: cache.batch_select_indices(torch.tensor([0])),
        "reset": lambda: cache.reset(),
        "ensure_capacity": lambda: cache.ensure_capacity(1, 4),
        "free_request": lambda: cache.free_request(7),
        "request_tokens": lambda: cache.request_tokens(7),
        "request_pages": lambda: cache.request_pages(7),
        "request_ids": lambda: cache.request_ids(),
        "detach_request": lambda: cache.detach_request(7),
        "attach_request": lambda: cache.attach_request(8, [0], 1),
        "set_packed_batch": lambda: cache.set_packed_batch([(7, 0, 1)]),
        "clear_packed_batch": lambda: cache.clear_packed_batch(),
        "release": lambda: cache.release(),
        "stats": lambda: cache.stats(),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^ElasticPagedCache\.{name}: the cache is closed$"):
            call()
    # The model's own forward through a closed cache gets the same error, not a crash.
    with pytest.raises(RuntimeError, match="the cache is closed"), torch.no_grad():
        model(input_ids=torch.tensor([prompt]), **cache_kwargs(model, cache))
    cache.close()  # twice is fine
