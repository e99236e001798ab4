"""Benchmark: generate() with ElasticPagedCache vs DynamicCache vs StaticCache, and the pool layouts.

Same model, same batch, same run. Reports output tokens/s of ``model.generate`` and the KV
bytes each cache holds at its peak and after the batch is done (for ElasticPagedCache, after
``release()`` + ``trim()``); then page-major vs layer-major and gather vs paged attention,
in generate mode and in packed decode steps (the Engine's continuous batching).

    python benchmarks/bench_cache.py                # print a markdown table
    python benchmarks/bench_cache.py --write benchmarks/RESULTS.md   # and update our section
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import left_padded_batch  # noqa: E402

from torch_elastic_kv.attention import PAGED_ATTENTION  # noqa: E402
from torch_elastic_kv.cache import ElasticPagedCache  # noqa: E402
from torch_elastic_kv.pool import KVPagePool  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench_cache:begin -->", "<!-- bench_cache:end -->"


def small_llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    """A Llama big enough for attention to matter on a CPU: hidden 256, 8 heads over 2 KV heads."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def kv_bytes_of(cache) -> int:
    """Bytes of the K/V tensors a transformers cache holds."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def time_generate(model, make_cache, batch, new_tokens, repeats):
    """Best-of-``repeats`` tokens/s; returns (tokens/s, peak KV bytes, final KV bytes, cache)."""
    best, peak, final = 0.0, 0, 0
    for _ in range(repeats):
        cache = make_cache()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, cache=cache, max_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t0
        assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
        best = max(best, out.shape[0] * new_tokens / dt)
        if isinstance(cache, ElasticPagedCache):
            peak = cache.pool.stats()["resident_bytes"]   # resident only grows during generate
            cache.release()
            cache.pool.trim()
            final = cache.pool.stats()["resident_bytes"]
            cache.close()
        else:
            peak = final = kv_bytes_of(cache)
    return best, peak, final


def packed_decode_rate(model, layout, paged, seqs, context, steps):
    """Output tokens/s of packed decode steps: ``seqs`` sequences of ``context`` tokens, one token each."""
    model.set_attn_implementation(PAGED_ATTENTION if paged else "sdpa")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    pool = KVPagePool(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, torch.float32,
                      max_bytes=512 << 20, layout=layout)
    cache = ElasticPagedCache(cfg, pool=pool)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(seqs):
            cache.ensure_capacity(i, context)
            model(input_ids=torch.randint(3, 512, (1, context), generator=g), cache=cache,
                  **cache.set_packed_batch([(i, 0, context)]))
        t0 = time.perf_counter()
        for _ in range(steps):
            entries = []
            for i in range(seqs):
                n = cache.seq_tokens(i)
                cache.ensure_capacity(i, n + 1)
                entries.append((i, n, 1))
            extra = cache.set_packed_batch(entries)
            model(input_ids=torch.randint(3, 512, (1, seqs), generator=g), cache=cache, **extra)
        dt = time.perf_counter() - t0
    stats = pool.stats()
    cache.close()
    pool.close()
    model.set_attn_implementation("sdpa")
    return seqs * steps / dt, stats


def mib(n: int) -> str:
    return f"{n / (1 << 20):.2f}"


def run(args) -> str:
    torch.set_num_threads(args.threads)
    model = small_llama(args.layers)
    lengths = [args.prompt - (i * args.prompt) // (2 * args.batch) for i in range(args.batch)]
    batch = left_padded_batch(lengths, vocab_size=512, seed=3)
    width = batch["input_ids"].shape[1]
    total = width + args.new_tokens
    lines = []
    out = lines.append
    out(f"Command: `python benchmarks/bench_cache.py {' '.join(sys.argv[1:])}`  ")
    out(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} torch thread(s); best of {args.repeats}.")
    out("")
    out(f"Model: Llama, {args.layers} layers, hidden 256, 8 heads over 2 KV heads (head_dim 32), "
        f"float32. Batch: {args.batch} left-padded prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{args.new_tokens} new tokens each (greedy). Elastic pool: page-major, 16-token pages, "
        f"2 MiB granules.")
    out("")
    out("| cache | tokens/s | peak KV bytes (MiB) | after the batch (MiB) |")
    out("|---|---|---|---|")
    rows = [
        ("DynamicCache", lambda: DynamicCache(config=model.config), "sdpa"),
        ("StaticCache (max_cache_len = prompt + new)",
         lambda: StaticCache(config=model.config, max_cache_len=total), "sdpa"),
        ("ElasticPagedCache, gather path", lambda: ElasticPagedCache(model.config, max_bytes=256 << 20), "sdpa"),
        ("ElasticPagedCache, paged attention",
         lambda: ElasticPagedCache(model.config, max_bytes=256 << 20), PAGED_ATTENTION),
    ]
    for name, make, attn in rows:
        model.set_attn_implementation(attn)
        rate, peak, final = time_generate(model, make, batch, args.new_tokens, args.repeats)
        after = "freed when the cache is dropped" if "Elastic" not in name else mib(final)
        if "Elastic" not in name:
            after = f"{mib(final)} (until the cache object is dropped)"
        out(f"| {name} | {rate:.0f} | {mib(peak)} | {after} |")
        print(f"{name}: {rate:.0f} tok/s", file=sys.stderr)
    model.set_attn_implementation("sdpa")
    out("")
    out(f"Packed decode steps (the Engine's mode): {args.seqs} sequences of {args.context} tokens, "
        f"one new token each per step, {args.steps} steps; output tokens/s.")
    out("")
    out("| layout | attention | tokens/s | arenas | growth step (MiB) | resident (MiB) | live (MiB) |")
    out("|---|---|---|---|---|---|---|")
    for layout in ("page-major", "layer-major"):
        for paged in (True, False):
            best, stats = 0.0, None
            for _ in range(args.repeats):
                rate, stats = packed_decode_rate(model, layout, paged, args.seqs, args.context, args.steps)
                best = max(best, rate)
            attn = "paged" if paged else "stock SDPA, block mask"
            out(f"| {layout} | {attn} | {best:.0f} | {stats['arenas']} | {mib(stats['chunk_bytes'])} | "
                f"{mib(stats['resident_bytes'])} | {mib(stats['live_bytes'])} |")
            print(f"packed {layout} paged={paged}: {best:.0f} tok/s", file=sys.stderr)
    return "\n".join(lines)


def write_section(path: str, body: str) -> None:
    section = f"{MARK_BEGIN}\n## KV page pool and cache: generate() and packed decode\n\n{body}\n{MARK_END}\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256, help="longest prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", metavar="RESULTS_MD")
    args = p.parse_args()
    body = run(args)
    print(body)
    if args.write:
        write_section(args.write, body)


if __name__ == "__main__":
    main()
