"""ElasticPagedCache in model.generate(): token identity with DynamicCache, memory, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from torch_elastic_kv.hf.attention import enable_paged_attention
from torch_elastic_kv.hf.cache import ElasticPagedCache
from torch_elastic_kv.hf.compat import cache_kwargs
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing import rss_shmem
from torch_elastic_kv.testing.models import FACTORIES, left_padded_batch, tiny_llama, tiny_mistral

LENGTHS = [5, 9, 3, 12, 17]  # >= 4 prompts of different lengths, left-padded
NEW = 12


def _model(name, attention, **overrides):
    model = FACTORIES[name](**overrides)
    return enable_paged_attention(model) if attention == "paged" else model


def _generate(model, cache, batch, **kw):
    kw = {"max_new_tokens": NEW, "do_sample": False, **kw}
    return model.generate(**batch, **cache_kwargs(model, cache), **kw)


@pytest.mark.parametrize("attention", ["gather", "paged"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_greedy_float32_token_identical(name, attention):
    model = _model(name, attention)
    batch = left_padded_batch(LENGTHS)
    ref = _generate(model, DynamicCache(config=model.config), batch)
    cache = ElasticPagedCache(model.config, max_bytes=8 << 20)
    assert cache.uses_paged_attention == (attention == "paged")
    out = _generate(model, cache, batch)
    assert torch.equal(out, ref)
    width = batch["input_ids"].shape[1]
    assert cache.get_seq_length() == width + NEW - 1
    assert cache.stats()["pages"] == len(LENGTHS) * -(-(width + NEW - 1) // 16)


@pytest.mark.parametrize("attention", ["gather", "paged"])
def test_both_cache_keywords_give_the_same_tokens_and_cache_kwargs_warns_nothing(attention):
    """``past_key_values=`` (what every 5.x takes, and the README shows) and ``cache_kwargs`` (the
    keyword the installed release declares) drive the same cache the same way; the latter without
    the deprecation warning 5.24+ gives for ``past_key_values=``."""
    import warnings

    model = _model("llama", attention)
    batch = left_padded_batch(LENGTHS)
    ref = _generate(model, DynamicCache(config=model.config), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        by_old_name = model.generate(
            **batch,
            past_key_values=ElasticPagedCache(model.config, max_bytes=8 << 20),
            max_new_tokens=NEW,
            do_sample=False,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        by_declared_name = _generate(model, ElasticPagedCache(model.config, max_bytes=8 << 20), batch)
    assert torch.equal(by_old_name, ref) and torch.equal(by_declared_name, ref)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_greedy_bfloat16_gather_token_identical(name):
    model = _model(name, "gather", dtype=torch.bfloat16)
    batch = left_padded_batch(LENGTHS)
    ref = _generate(model, DynamicCache(config=model.config), batch)
    out = _generate(model, ElasticPagedCache(model.config, max_bytes=8 << 20), batch)
    assert torch.equal(out, ref)


def _teacher_forced_logits(model, cache, batch, tokens):
    """Logits of every step when ``tokens`` [rows, steps] are fed one at a time after the prompt."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = []
    with torch.no_grad():
        for step in range(tokens.shape[1] + 1):
            feed = ids if step == 0 else tokens[:, step - 1 : step]
            if step:
                mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1] :]
            out = model(
                input_ids=feed, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True
            )
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


# bfloat16 K/V attended in a different order (page-padded, strided) round differently (measured:
# max 0.016 on logits of magnitude ~2.5); a wrong page moves logits by their own scale.
BF16_PAGED_LOGIT_ATOL = 0.05


def test_bfloat16_paged_attention_logits_within_tolerance():
    model = _model("llama", "paged", dtype=torch.bfloat16)
    batch = left_padded_batch(LENGTHS)
    forced = torch.randint(3, 256, (len(LENGTHS), 10), generator=torch.Generator().manual_seed(5))
    ref = _teacher_forced_logits(model, DynamicCache(config=model.config), batch, forced)
    got = _teacher_forced_logits(model, ElasticPagedCache(model.config, max_bytes=8 << 20), batch, forced)
    diff = (got - ref).abs().max().item()
    assert diff <= BF16_PAGED_LOGIT_ATOL, f"max |logit diff| {diff}"
    assert ref.abs().max().item() > 40 * BF16_PAGED_LOGIT_ATOL  # the bound is meaningful


@pytest.mark.parametrize("attention", ["gather", "paged"])
def test_sampled_generation_identical(attention):
    model = _model("llama", attention)
    batch = left_padded_batch(LENGTHS)
    kw = dict(do_sample=True, top_k=40, temperature=0.9)
    torch.manual_seed(11)
    ref = _generate(model, DynamicCache(config=model.config), batch, **kw)
    torch.manual_seed(11)
    out = _generate(model, ElasticPagedCache(model.config, max_bytes=8 << 20), batch, **kw)
    assert torch.equal(out, ref)


def _continue(model, cache, batch, first):
    """A second turn: append 3 user tokens to the first output and generate again on the same cache."""
    extra = torch.randint(3, 256, (first.shape[0], 3), generator=torch.Generator().manual_seed(9))
    ids = torch.cat([first, extra], 1)
    mask = torch.cat(
        [
            batch["attention_mask"],
            torch.ones(first.shape[0], ids.shape[1] - batch["attention_mask"].shape[1], dtype=torch.long),
        ],
        1,
    )
    return _generate(model, cache, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("attention", ["gather", "paged"])
def test_continuation_matches_dynamic_cache(attention):
    model = _model("qwen2", attention)
    batch = left_padded_batch(LENGTHS)
    ref_cache = DynamicCache(config=model.config)
    ref2 = _continue(model, ref_cache, batch, _generate(model, ref_cache, batch))
    cache = ElasticPagedCache(model.config, max_bytes=8 << 20)
    out2 = _continue(model, cache, batch, _generate(model, cache, batch))
    assert torch.equal(out2, ref2)
    assert cache.get_seq_length() == ref_cache.get_seq_length()


def test_release_then_reuse_with_another_batch():
    model = _model("llama", "paged")
    cache = ElasticPagedCache(model.config, max_bytes=8 << 20)
    _generate(model, cache, left_padded_batch(LENGTHS))
    assert cache.pool.live_pages > 0
    cache.release()
    assert cache.pool.live_pages == 0 and cache.get_seq_length() == 0
    batch = left_padded_batch([7, 2, 11], seed=4)  # another batch size
    ref = _generate(model, DynamicCache(config=model.config), batch)
    assert torch.equal(_generate(model, cache, batch), ref)


@pytest.mark.parametrize("layout", ["page-major", "layer-major"])
def test_release_and_trim_return_physical_memory(layout):
    # 4 layers x 4 KV heads x 32 dims: 64 KiB pages (page-major), so the batch spans several granules
    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4)
    before = rss_shmem()
    pool = KVPagePool(4, 4, 32, torch.float32, max_bytes=64 << 20, layout=layout)
    cache = ElasticPagedCache(model.config, pool=pool)
    _generate(model, cache, left_padded_batch([200, 180, 150, 220, 90, 60, 240, 10]), max_new_tokens=4)
    stats = pool.stats()
    slack = stats["granule_bytes"] * stats["arenas"]
    assert stats["resident_bytes"] >= 4 * stats["granule_bytes"]
    assert rss_shmem() - before >= stats["live_bytes"] - slack  # the pages really are resident
    cache.release()
    pool.compact()
    given = pool.trim()
    stats = pool.stats()
    assert stats["live_pages"] == 0 and given > 0
    assert stats["resident_bytes"] <= slack
    assert rss_shmem() - before <= slack


def test_fragmentation_compaction_keeps_survivors_exact():
    """32 sequences interleaved across granules; free every other one; compact; the rest go on exactly."""
    model = enable_paged_attention(
        tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4)
    )
    pool = KVPagePool(4, 4, 32, torch.float32, page_tokens=16, max_bytes=64 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (96 + (i % 5) * 8,), generator=g).tolist() for i in range(32)]
    pos = [0] * 32
    with torch.no_grad():  # prefill 16 tokens of every sequence per step: pages interleave
        while any(pos[i] < len(p) for i, p in enumerate(prompts)):
            entries, toks = [], []
            for i, p in enumerate(prompts):
                if pos[i] < len(p):
                    n = min(16, len(p) - pos[i])
                    cache.ensure_capacity(i, pos[i] + n)
                    entries.append((i, pos[i], n))
                    toks += p[pos[i] : pos[i] + n]
                    pos[i] += n
            out = model(input_ids=torch.tensor([toks]), **cache_kwargs(model, cache), **cache.set_packed_batch(entries))
    for i in range(0, 32, 2):
        cache.free_request(i)
    fragmented = pool.stats()
    kept = {i: (cache.request_pages(i), pool.read_pages(cache.request_pages(i))) for i in range(1, 32, 2)}
    moves = []
    given = pool.compact(on_move=moves.append)
    stats = pool.stats()
    granule = stats["granule_bytes"]
    assert moves and given > 0 and stats["pages_moved"] == len(moves[0])
    # every survivor's page table followed its pages, and the K/V behind it is bit for bit the same
    assert any(cache.request_pages(i) != pages for i, (pages, _) in kept.items())
    for i, (pages, data) in kept.items():
        assert cache.request_pages(i) == [moves[0].get(p, p) for p in pages], f"sequence {i}"
        assert torch.equal(pool.read_pages(cache.request_pages(i)), data), f"sequence {i}"
    assert stats["resident_bytes"] < fragmented["resident_bytes"]
    assert stats["resident_bytes"] - stats["live_bytes"] <= granule * stats["arenas"]
    # survivors continue; compare with each alone through DynamicCache
    survivors = list(range(1, 32, 2))[:6]
    with torch.no_grad():
        for i in survivors:
            ref = model.generate(
                input_ids=torch.tensor([prompts[i]]),
                max_new_tokens=6,
                do_sample=False,
                **cache_kwargs(model, DynamicCache(config=model.config)),
            )[0, len(prompts[i]) :].tolist()
            got = []
            nxt = None
            for _step in range(6):
                n = cache.request_tokens(i)
                if nxt is None:  # re-feed the last prompt token to get its logits again
                    entries, toks = [(i, n - 1, 1)], [prompts[i][-1]]
                else:
                    cache.ensure_capacity(i, n + 1)
                    entries, toks = [(i, n, 1)], [nxt]
                out = model(
                    input_ids=torch.tensor([toks]), **cache_kwargs(model, cache), **cache.set_packed_batch(entries)
                )
                nxt = int(out.logits[0, -1].argmax())
                got.append(nxt)
            assert got == ref, f"sequence {i}"


# -- unsupported use ---------------------------------------------------------------------------


def test_beam_search_raises_and_releases():
    model = _model("llama", "gather")
    cache = ElasticPagedCache(model.config, max_bytes=8 << 20)
    with pytest.raises(ValueError, match="beam search"):
        _generate(model, cache, left_padded_batch(LENGTHS), num_beams=2)
    assert cache.pool.live_pages == 0 and cache.get_seq_length() == 0


def test_sliding_window_and_linear_layers_rejected():
    with pytest.raises(ValueError, match="layer 0 is 'sliding_attention'"):
        ElasticPagedCache(tiny_mistral(sliding_window=8).config)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="layer 1 is 'linear_attention'"):
        ElasticPagedCache(cfg)


def test_pool_shape_and_dtype_mismatch_rejected():
    model = _model("llama", "gather")
    with pytest.raises(ValueError, match=r"pool shape .*\(2, 2, 32\).*\(2, 2, 16\)"):
        ElasticPagedCache(model.config, pool=KVPagePool(2, 2, 32, torch.float32, max_bytes=4 << 20))
    pool = KVPagePool(2, 2, 16, torch.bfloat16, max_bytes=4 << 20)
    cache = ElasticPagedCache(model.config, pool=pool)
    with pytest.raises(ValueError, match="K/V are torch.float32 .* pool holds torch.bfloat16"):
        _generate(model, cache, left_padded_batch(LENGTHS))
    assert pool.live_pages == 0


def test_out_of_memory_leaves_other_sequences_intact():
    model = _model("llama", "paged")
    pool = KVPagePool(2, 2, 16, torch.float32, page_tokens=16, max_bytes=2 << 20)
    batch = left_padded_batch(LENGTHS)
    ref = _generate(model, DynamicCache(config=model.config), batch)
    first = ElasticPagedCache(model.config, pool=pool)
    prompt_only = _generate(model, first, batch, max_new_tokens=1)
    held = first.stats()["pages"]
    snapshot = pool.read_pages(first._rows[0].pages)
    hog = ElasticPagedCache(model.config, pool=pool)
    big = left_padded_batch([4000] * 16, seed=8)
    with pytest.raises(MemoryError, match=r"KVPagePool.alloc: \d+ pages \(\d+ bytes\) needed, \d+ pages"):
        _generate(model, hog, big, max_new_tokens=1)
    assert hog.stats()["pages"] == 0 and first.stats()["pages"] == held
    assert torch.equal(pool.read_pages(first._rows[0].pages), snapshot)
    # the first cache carries on as if nothing happened
    out = _generate(
        model,
        first,
        {
            "input_ids": prompt_only,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones(len(LENGTHS), 1, dtype=torch.long)], 1),
        },
        max_new_tokens=NEW - 1,
    )
    assert torch.equal(out, ref)
