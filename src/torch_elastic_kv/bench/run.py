"""One benchmark run from resolved settings: model, trace, each system in turn, report."""

from __future__ import annotations

import dataclasses
import sys

import torch

from .metrics import DEFINITIONS, summarize
from .models import load_model
from .progress import Progress
from .replay import SystemRun
from .report import results_document, summary_markdown, write_outputs
from .settings import BenchSettings, ResolvedArgs
from .systems import auto_max_bytes, run_system
from .traces import (
    MOONCAKE_MIN_OUTPUT,
    Trace,
    block_prompt_ids,
    format_scale,
    ideal_hit_rate,
    prompt_token_ids,
    scale_trace,
    synthetic_requests,
)

WARM_UP_REQUESTS = 32


def _warm_up(
    model: torch.nn.Module, settings: BenchSettings, prompts: list[list[int]], trace: Trace, max_bytes: int
) -> None:
    """Untimed, before any system: the model once, and (for the Engine systems) the first
    ``WARM_UP_REQUESTS`` requests of the trace through an Engine all at once, so that one-time
    setup (kernel selection for the many packed batch shapes, paged-attention setup, lazy
    imports) is not charged to whichever system happens to run first. With a prefix trace, a
    second round prefills the same prompts' continuations after their cached prefixes."""
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompts[0]], device=model.device))
    if "elastic" not in settings.systems and "static" not in settings.systems:
        return
    from .. import ElasticPolicy, Engine

    attention = model.config._attn_implementation
    engine = Engine(
        model,
        policy=ElasticPolicy(max_bytes=max_bytes),
        max_batch_tokens=settings.max_batch_tokens,
        max_running=settings.max_running,
        page_tokens=settings.page_tokens,
    )
    try:
        count = min(WARM_UP_REQUESTS, len(prompts))
        engine.generate(prompts[:count], max_new_tokens=[min(r.output_tokens, 8) for r in trace.requests[:count]])
        if settings.block_tokens is not None:
            # a prefix trace's requests mostly prefill a suffix after a cached prefix: warm those
            # shapes too (each warm-up prompt again, followed by the next one's tokens)
            room = getattr(model.config, "max_position_embeddings", 2048) - 8
            longer = [(prompts[i] + prompts[(i + count) % len(prompts)])[:room] for i in range(count)]
            engine.generate(longer, max_new_tokens=2)
    finally:
        engine.close()
        engine.pool.close()
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)


def ideal_hit_rates(trace: Trace, settings: BenchSettings, max_bytes: int, kv_bytes_per_token: int) -> dict:
    """The trace's offline hit rates beside which the measured ones are printed: an LRU of blocks
    as large as the pool (without and with the run's expiry, at the replay's arrival times) and
    an unlimited cache. The pre-roll's requests fill each LRU first and are not counted."""
    block = settings.block_tokens
    assert block is not None
    capacity = max_bytes // (block * kv_bytes_per_token)
    return {
        "lru": ideal_hit_rate(trace, block, settings.page_tokens, capacity),
        "lru_expiry": ideal_hit_rate(trace, block, settings.page_tokens, capacity, settings.prefix_expiry_s),
        "unlimited": ideal_hit_rate(trace, block, settings.page_tokens, None),
    }


def replay_line(trace: Trace, settings: BenchSettings) -> str:
    """What the replay covers, for the output's header: time scale, window and pre-roll."""
    start, end = settings.window
    window = f"{start:g}-{'end' if end is None else f'{end:g}'} s"
    line = f"time x{format_scale(settings.time_scale)}; window {window} of the trace"
    if settings.preroll_s > 0:
        line += (
            f" after a {settings.preroll_s:g} s pre-roll: {trace.preroll_requests} requests replayed first (0-"
            f"{trace.window_start_s:.1f} s of the replay) through every system, left out of every figure but the "
            f"output checksum; {len(trace.measured)} requests measured"
        )
    else:
        line += f", no pre-roll; {len(trace.measured)} requests measured"
    return line


def run_bench(resolved: ResolvedArgs, command: list[str]) -> dict:
    """Run every system of ``resolved.settings`` on its trace; write the outputs; return results.json's content."""
    threads = torch.get_num_threads()
    torch.set_num_threads(resolved.settings.threads)
    try:
        return _run(resolved, command)
    finally:
        torch.set_num_threads(threads)


def _run(resolved: ResolvedArgs, command: list[str]) -> dict:
    settings = resolved.settings
    model, info = load_model(settings.config, settings.model_path, settings.device, settings.dtype, settings.seed)
    raw = resolved.raw_requests
    if raw is None:
        raw = synthetic_requests(settings.trace, settings.seed, settings.quick)
    trace = scale_trace(
        resolved.trace_name,
        resolved.trace_source,
        raw,
        time_scale=settings.time_scale,
        token_scale=settings.token_scale,
        window=settings.window,
        thin=settings.thin,
        max_total_tokens=info.max_positions,
        attribution=resolved.attribution,
        min_output_tokens=MOONCAKE_MIN_OUTPUT if settings.block_tokens is not None else 1,
        block_tokens=settings.block_tokens,
        preroll_s=settings.preroll_s,
    )
    if settings.block_tokens is not None:
        prompts = block_prompt_ids(trace, settings.block_tokens, info.vocab_size, settings.seed)
    else:
        prompts = prompt_token_ids(trace, info.vocab_size, settings.seed)
    max_bytes = settings.max_bytes if settings.max_bytes is not None else auto_max_bytes(trace, info, settings)
    if settings.min_bytes > max_bytes:
        raise ValueError(f"--min-bytes {settings.min_bytes} is above the pool size {max_bytes}")
    print(
        f"ekv-bench: {trace.describe()}; model {info.name} ({info.parameters / 1e6:.1f} M params, {info.dtype}, "
        f"{info.device}); pool {max_bytes / 2**20:.2f} MiB",
        file=sys.stderr,
    )
    print(f"ekv-bench: {replay_line(trace, settings)}", file=sys.stderr)
    ideal = None
    if settings.block_tokens is not None:
        ideal = ideal_hit_rates(trace, settings, max_bytes, info.kv_bytes_per_token)
        expiry = settings.prefix_expiry_s
        trace_time = "" if expiry is None else f" ({expiry / settings.time_scale:g} s of trace time)"
        print(
            f"ekv-bench: B = {settings.block_tokens} tokens per trace block; prefix cache expiry "
            f"{'the Engine default' if expiry is None else f'{expiry:g} s'}{trace_time}; ideal hit rate over the "
            f"window {100 * ideal['lru']['hit_rate']:.1f} % (LRU of {ideal['lru']['capacity_blocks']} blocks, the "
            f"pool), {100 * ideal['lru_expiry']['hit_rate']:.1f} % (and the expiry), "
            f"{100 * ideal['unlimited']['hit_rate']:.1f} % (unlimited)",
            file=sys.stderr,
        )
    _warm_up(model, settings, prompts, trace, max_bytes)

    progress = Progress(trace.output_tokens * len(settings.systems), enabled=settings.progress)
    runs: list[SystemRun] = []
    try:
        for name in settings.systems:
            runs.append(run_system(name, model, info, trace, prompts, settings, max_bytes, progress))
    finally:
        progress.close()

    systems = {run.name: summarize(run, max_bytes) for run in runs}
    model_json = dataclasses.asdict(info) | {"kv_bytes_per_token": info.kv_bytes_per_token}
    measured, preroll = trace.measured, trace.requests[: trace.preroll_requests]
    trace_json = {
        "name": trace.name,
        "source": trace.source,
        "attribution": trace.attribution,
        # the window's requests: those the figures are computed over
        "requests": len(measured),
        "duration_s": trace.duration_s,
        "prompt_tokens": sum(r.prompt_tokens for r in measured),
        "output_tokens": sum(r.output_tokens for r in measured),
        "preroll": {
            "seconds": settings.preroll_s,
            "requests": len(preroll),
            "prompt_tokens": sum(r.prompt_tokens for r in preroll),
            "output_tokens": sum(r.output_tokens for r in preroll),
        },
        "window_start_s": trace.window_start_s,
        "scaling": trace.scaling,
    }
    settings_json = settings.to_json() | {"max_bytes_resolved": max_bytes}
    if ideal is not None:
        trace_json["ideal_hit_rate"] = ideal
    results = results_document(
        command=command,
        settings=settings_json,
        model=model_json,
        trace=trace_json,
        static_pool_bytes=max_bytes,
        systems=systems,
        runs=runs,
        definitions=DEFINITIONS,
    )
    written = write_outputs(settings.out, results, runs)
    print(summary_markdown(results))
    print("wrote " + ", ".join(written))
    return results
