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
import statistics
import sys
import time
import warnings

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from results_section import replace_section  # noqa: E402  (beside this script)
from torch_elastic_kv.hf.attention import PAGED_ATTENTION
from torch_elastic_kv.hf.cache import ElasticPagedCache
from torch_elastic_kv.hf.compat import cache_kwargs
from torch_elastic_kv.kv.pool import KVPagePool
from torch_elastic_kv.testing.models import left_padded_batch

MARK_BEGIN, MARK_END = "<!-- bench_cache:begin -->", "<!-- bench_cache:end -->"


def small_llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    """A Llama big enough for attention to matter on a CPU: hidden 256, 8 heads over 2 KV heads."""
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
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


def time_generate(model, make_cache, batch, new_tokens):
    """One timed generate; returns (tokens/s, peak KV bytes, KV bytes after the batch)."""
    cache = make_cache()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, **cache_kwargs(model, cache), max_new_tokens=new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
    if isinstance(cache, ElasticPagedCache):
        peak = cache.pool.stats()["resident_bytes"]  # resident only grows during generate
        cache.release()
        cache.pool.trim()
        final = cache.pool.stats()["resident_bytes"]
        cache.close()
    else:
        peak = final = kv_bytes_of(cache)
    return out.shape[0] * new_tokens / dt, peak, final


def packed_decode_rate(model, layout, paged, seqs, context, steps):
    """Output tokens/s of packed decode steps: ``seqs`` sequences of ``context`` tokens, one token each."""
    model.set_attn_implementation(PAGED_ATTENTION if paged else "sdpa")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    pool = KVPagePool(
        cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, torch.float32, max_bytes=512 << 20, layout=layout
    )
    cache = ElasticPagedCache(cfg, pool=pool)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(seqs):
            cache.ensure_capacity(i, context)
            with warnings.catch_warnings():  # the stock-attention row warns by design
                warnings.simplefilter("ignore")
                extra = cache.set_packed_batch([(i, 0, context)])
            model(input_ids=torch.randint(3, 512, (1, context), generator=g), **cache_kwargs(model, cache), **extra)
        t0 = time.perf_counter()
        for _ in range(steps):
            entries = []
            for i in range(seqs):
                n = cache.request_tokens(i)
                cache.ensure_capacity(i, n + 1)
                entries.append((i, n, 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extra = cache.set_packed_batch(entries)
            model(input_ids=torch.randint(3, 512, (1, seqs), generator=g), **cache_kwargs(model, cache), **extra)
        dt = time.perf_counter() - t0
    stats = pool.stats()
    cache.close()
    pool.close()
    model.set_attn_implementation("sdpa")
    return seqs * steps / dt, stats


def decode_step_ms(model, batch, steps: int) -> dict[str, tuple[float, float]]:
    """Median and best milliseconds of one batched decode forward, per cache/attention path.

    The three paths decode in lockstep (one step each, in turn), so load from other processes
    falls on all of them alike; per-step timing makes the comparison robust on a busy machine.
    """
    paths = {
        "DynamicCache + SDPA": ("sdpa", DynamicCache(config=model.config)),
        "ElasticPagedCache, gather + SDPA": (
            "sdpa",
            ElasticPagedCache(model.config, max_bytes=256 << 20, attention="gather"),
        ),
        "ElasticPagedCache, paged attention": (PAGED_ATTENTION, ElasticPagedCache(model.config, max_bytes=256 << 20)),
    }
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ids.shape[0]
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for _name, (attn, cache) in paths.items():
            model.set_attn_implementation(attn)
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                **cache_kwargs(model, cache),
                use_cache=True,
            )
        for _ in range(steps):
            token = torch.randint(3, 512, (rows, 1), generator=g)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            pos = mask.sum(-1, keepdim=True) - 1
            for name, (attn, cache) in paths.items():
                model.set_attn_implementation(attn)
                t0 = time.perf_counter()
                model(
                    input_ids=token, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True
                )
                times[name].append((time.perf_counter() - t0) * 1e3)
    model.set_attn_implementation("sdpa")
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def page_read_us(layout: str, layers: int, seqs: int, context: int, repeats: int) -> tuple[float, float]:
    """Microseconds to fetch every sequence's K and V pages of one layer (the paged attention's
    read), and to map one growth step, for a pool of ``layout``."""
    pool = KVPagePool(layers, 2, 32, torch.float32, max_bytes=512 << 20, layout=layout)
    pages = -(-context // pool.page_tokens)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(pool.alloc(seqs * pages))
    table = ids[torch.randperm(len(ids), generator=g)].view(seqs, pages)  # pages interleaved
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(layers):
            pool.key_cache(layer).index_select(0, table.view(-1))
            pool.value_cache(layer).index_select(0, table.view(-1))
        best = min(best, (time.perf_counter() - t0) / layers * 1e6)
    grow = float("inf")
    for _ in range(repeats):
        pool.trim()
        t0 = time.perf_counter()
        pool.reserve_pages(pool.stats()["resident_pages"] - pool.live_pages + 1)  # exactly one more chunk
        grow = min(grow, (time.perf_counter() - t0) * 1e6)
    pool.close()
    return best, grow


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
    out(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} torch thread(s); best of {args.repeats}."
    )
    out("")
    out(
        f"Model: Llama, {args.layers} layers, hidden 256, 8 heads over 2 KV heads (head_dim 32), "
        f"float32. Batch: {args.batch} left-padded prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{args.new_tokens} new tokens each (greedy). Elastic pool: page-major, 16-token pages, "
        f"2 MiB granules."
    )
    out("")
    out("| cache | tokens/s | peak KV bytes (MiB) | after the batch (MiB) |")
    out("|---|---|---|---|")
    rows = [
        ("DynamicCache", lambda: DynamicCache(config=model.config), "sdpa"),
        (
            "StaticCache (max_cache_len = prompt + new)",
            lambda: StaticCache(config=model.config, max_cache_len=total),
            "sdpa",
        ),
        ("ElasticPagedCache, gather path", lambda: ElasticPagedCache(model.config, max_bytes=256 << 20), "sdpa"),
        (
            "ElasticPagedCache, paged attention",
            lambda: ElasticPagedCache(model.config, max_bytes=256 << 20),
            PAGED_ATTENTION,
        ),
    ]
    results = {name: (0.0, 0, 0) for name, _, _ in rows}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every row alike
        for name, make, attn in rows:
            model.set_attn_implementation(attn)
            rate, peak, final = time_generate(model, make, batch, args.new_tokens)
            results[name] = (max(rate, results[name][0]), peak, final)
    for name, _, _ in rows:
        rate, peak, final = results[name]
        after = mib(final) if "Elastic" in name else f"{mib(final)} (until the cache object is dropped)"
        out(f"| {name} | {rate:.0f} | {mib(peak)} | {after} |")
        print(f"{name}: {rate:.0f} tok/s", file=sys.stderr)
    model.set_attn_implementation("sdpa")
    out("")
    steps = decode_step_ms(model, batch, args.decode_steps)
    out(
        f"One decode step of the same batch, timed per step with the three paths in lockstep "
        f"({args.decode_steps} steps from the prompt):"
    )
    out("")
    out("| path | median step (ms) | best step (ms) |")
    out("|---|---|---|")
    for name, (med, best) in steps.items():
        out(f"| {name} | {med:.2f} | {best:.2f} |")
        print(f"step {name}: {med:.2f} ms", file=sys.stderr)
    out("")
    out(
        f"Packed decode steps (the Engine's mode): {args.seqs} sequences of {args.context} tokens, "
        f"one new token each per step, {args.steps} steps; output tokens/s."
    )
    out("")
    out("| layout | attention | tokens/s | arenas | growth step (MiB) | resident (MiB) | live (MiB) |")
    out("|---|---|---|---|---|---|---|")
    configs = [(layout, paged) for layout in ("page-major", "layer-major") for paged in (True, False)]
    packed = {c: (0.0, None) for c in configs}
    for _ in range(args.repeats):
        for layout, paged in configs:
            rate, stats = packed_decode_rate(model, layout, paged, args.seqs, args.context, args.steps)
            packed[(layout, paged)] = (max(rate, packed[(layout, paged)][0]), stats)
    for layout, paged in configs:
        best, stats = packed[(layout, paged)]
        attn = "paged" if paged else "stock SDPA, block mask"
        out(
            f"| {layout} | {attn} | {best:.0f} | {stats['arenas']} | {mib(stats['chunk_bytes'])} | "
            f"{mib(stats['resident_bytes'])} | {mib(stats['live_bytes'])} |"
        )
        print(f"packed {layout} paged={paged}: {best:.0f} tok/s", file=sys.stderr)
    out("")
    out(
        f"Page reads and growth by layout ({args.layers} layers, 2 KV heads x 32, float32): fetching the K "
        f"and V pages of {args.seqs} sequences x {args.context} tokens for one layer (pages shuffled), "
        "and mapping one growth step after trim() (fresh physical memory)."
    )
    out("")
    out("| layout | page read per layer (us) | one growth step (us) |")
    out("|---|---|---|")
    reads = {}
    for layout in ("page-major", "layer-major"):
        read, grow = page_read_us(layout, args.layers, args.seqs, args.context, max(args.repeats, 5))
        reads[layout] = read
        out(f"| {layout} | {read:.0f} | {grow:.0f} |")
    gather = steps["ElasticPagedCache, gather + SDPA"][0]
    paged = steps["ElasticPagedCache, paged attention"][0]
    dynamic = steps["DynamicCache + SDPA"][0]
    pm, lm = packed[("page-major", True)], packed[("layer-major", True)]
    out("")
    out("Findings (this run):")
    by_rate = results[rows[3][0]][0] / results[rows[2][0]][0] - 1  # > 0: paged faster
    by_step = gather / paged - 1  # > 0: paged faster
    if by_rate * by_step > 0 and min(abs(by_rate), abs(by_step)) > 0.10:
        verdict = f"the {'paged attention' if by_rate > 0 else 'gather path'} is faster"
    else:
        verdict = (
            "neither is reliably faster: the two measures disagree or differ by under 10 %, "
            "within this shared machine's run-to-run noise"
        )
    out(
        f"- Gather vs paged attention on CPU, generate mode: paged/gather = {by_rate * 100:+.0f} % in "
        f"generate() tokens/s and {by_step * 100:+.0f} % in median decode step time (positive: paged "
        f"faster); {verdict}. The paged read skips the contiguous `[batch, heads, tokens, dim]` copy and "
        "`repeat_kv` but attends a page-padded span under a mask; at these sizes the model's matmuls "
        f'dominate (DynamicCache step: {dynamic:.2f} ms). `attention="auto"` follows the model: paged '
        "when it uses `PAGED_ATTENTION`, else gather."
    )
    out(
        f"- Packed mode (continuous batching): the paged attention is "
        f"{pm[0] / packed[('page-major', False)][0]:.1f}x the stock SDPA path, which must attend every "
        "token over all sequences' K/V under a block mask. The Engine uses the paged attention."
    )
    out(
        f"- Layout: layer-major reads a layer's pages {(1 - reads['layer-major'] / reads['page-major']) * 100:.0f} % "
        f"faster (contiguous per layer) and decodes {(lm[0] / pm[0] - 1) * 100:+.0f} % faster in packed steps, "
        f"but every growth step maps one chunk in each of its {lm[1]['arenas']} arenas "
        f"({mib(lm[1]['chunk_bytes'])} MiB here, 2 x layers x 2 MiB on a GPU: 128 MiB for a 32-layer "
        f"model) against one granule for page-major, and it held {mib(lm[1]['resident_bytes'])} MiB "
        f"resident for {mib(lm[1]['live_bytes'])} MiB live against {mib(pm[1]['resident_bytes'])} MiB. "
        "Elasticity is the point of the pool, so **page-major is the default**; layer-major is an option "
        "for deep-context, static-size workloads."
    )
    out(
        "- After the batch, ElasticPagedCache gives every byte back (`release()` + `trim()`); DynamicCache "
        "and StaticCache keep theirs until the object is dropped (DynamicCache also copies its whole "
        "K/V with `torch.cat` every step, so its transient peak is about twice the table's figure)."
    )
    return "\n".join(lines)


def write_section(path: str, body: str) -> None:
    section = f"{MARK_BEGIN}\n## KV page pool and cache: generate() and packed decode\n\n{body}\n{MARK_END}\n"
    replace_section(path, MARK_BEGIN, MARK_END, section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256, help="longest prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--decode-steps", type=int, default=40)
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
