"""Running each benchmarked system on a trace, on the wall clock.

Every system sees the same requests at the same (scaled) arrival times: a request is handed
to the system once its arrival time has passed, idle gaps in the trace really pass, and after
the last request finishes the run stays idle for ``tail_seconds`` so the idle footprint shows.
While it runs, the resident and live KV bytes are sampled into a timeline.

- ``elastic``: :class:`torch_elastic_kv.Engine` with an :class:`ElasticPolicy` (and its prefix
  cache, on by default; ``--prefix-cache-expiry`` sets its expiry).
- ``elastic-noprefix``: the same with ``prefix_caching=False``: every prompt prefilled whole.
- ``static``: the same Engine with ``min_bytes == max_bytes`` (mapped at start, never shrunk),
  which is how serving stacks size their KV cache today.
- ``hf-generate``: transformers ``generate`` with a ``DynamicCache`` on left-padded batches of
  the requests that have arrived (a new batch starts when the previous one ends).
- ``hf-generate-batch``: transformers continuous batching (the manager behind
  ``model.generate_batch``, fed request by request as they arrive) with a paged cache
  pre-allocated to the same ``max_bytes``.

All use greedy decoding and ignore EOS, so each request produces exactly its trace's output
length and the token outputs of different systems can be compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..hf.compat import cache_kwargs
from .models import ModelInfo
from .progress import Progress
from .replay import Recorder, ReplayRequest, SystemRun, clock, replay_engine
from .settings import BenchSettings
from .traces import Trace

# --------------------------------------------------------------------------------------------
# the Engine (elastic and static)


def replay_requests(trace: Trace, prompts: list[list[int]]) -> list[ReplayRequest]:
    """The trace's requests with their prompts, for :func:`replay_engine`."""
    return [ReplayRequest(r.arrival_s, prompt, r.output_tokens) for r, prompt in zip(trace.requests, prompts)]


def engine_pool_info(engine: Any) -> dict[str, Any]:
    """Pool facts the report needs (granule and chunk size, number of arenas, bounds)."""
    pool = getattr(engine, "pool", None)
    if pool is None or not hasattr(pool, "stats"):
        return {}
    keys = (
        "granule_bytes",
        "chunk_bytes",
        "arenas",
        "page_bytes",
        "max_bytes",
        "min_bytes",
        "reserved_bytes",
        "max_pages",
    )
    pool_stats = pool.stats()
    return {k: pool_stats[k] for k in keys if k in pool_stats}


def run_engine_system(
    name: str,
    model: torch.nn.Module,
    trace: Trace,
    prompts: list[list[int]],
    settings: BenchSettings,
    max_bytes: int,
    progress: Progress,
) -> SystemRun:
    """``elastic``, ``elastic-noprefix`` or ``static``: build the Engine and its policy, replay, close."""
    from .. import ElasticPolicy, Engine
    from ..engine.eviction import EvictionPolicy

    # the policy's clock is the harness's clock, so the engine's timeline lines up with ours
    if name == "static":
        policy = ElasticPolicy(min_bytes=max_bytes, max_bytes=max_bytes, clock=clock)
    else:
        policy = ElasticPolicy(
            min_bytes=settings.min_bytes,
            max_bytes=max_bytes,
            headroom=settings.headroom,
            idle_seconds=settings.idle_seconds,
            clock=clock,
        )
    prefix_caching = name != "elastic-noprefix"
    eviction = None
    if prefix_caching and settings.prefix_expiry_s is not None:
        eviction = EvictionPolicy(expiry_seconds=settings.prefix_expiry_s)
    engine = Engine(
        model,
        policy=policy,
        max_batch_tokens=settings.max_batch_tokens,
        max_running=settings.max_running,
        page_tokens=settings.page_tokens,
        prefix_caching=prefix_caching,
        eviction=eviction,
    )
    try:
        run = replay_engine(
            engine,
            replay_requests(trace, prompts),
            name=name,
            sample_interval_s=settings.sample_interval_s,
            tail_seconds=settings.tail_seconds,
            progress=progress,
            measure_from=trace.preroll_requests,
        )
        run.info.update(engine_pool_info(engine))
        return run
    finally:
        engine.close()
        pool_close = getattr(engine.pool, "close", None)
        if callable(pool_close):
            pool_close()  # give its memory back before the next system runs


# --------------------------------------------------------------------------------------------
# transformers generate on padded batches


@contextlib.contextmanager
def _no_eos(model: torch.nn.Module):
    """Generate exactly max_new_tokens: the model's default EOS would stop rows early."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        yield
    finally:
        config.eos_token_id = saved


class _StepStreamer:
    """A ``generate`` streamer: one ``put`` per decoding step is where tokens get their times."""

    def __init__(self, on_step: Callable[[torch.Tensor], None]) -> None:
        self._on_step = on_step
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self._on_step(value)

    def end(self) -> None:
        pass


def _dynamic_cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def run_hf_generate(
    model: torch.nn.Module,
    info: ModelInfo,
    trace: Trace,
    prompts: list[list[int]],
    settings: BenchSettings,
    progress: Progress,
) -> SystemRun:
    """Padded batches through ``model.generate``: each batch takes every request that has arrived
    (up to ``max_running``) and runs until its longest output is done."""
    from transformers import DynamicCache, GenerationConfig

    rec = Recorder(trace.requests, progress, "hf-generate")
    requests = trace.requests
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    queue: deque[int] = deque()
    next_arrival = 0
    finished = 0
    rec.sample(0, 0)
    with _no_eos(model), torch.inference_mode():
        while finished < len(requests):
            now = rec.now()
            while next_arrival < len(requests) and requests[next_arrival].arrival_s <= now:
                queue.append(next_arrival)
                next_arrival += 1
            if not queue:
                rec.sleep_until(requests[next_arrival].arrival_s, settings.sample_interval_s, lambda: rec.sample(0, 0))
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), settings.max_running))]
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention[row, width - len(prompts[i]) :] = 1
            cache = DynamicCache(config=model.config)
            steps = [0]

            def on_step(tokens: torch.Tensor, batch=batch, cache=cache, steps=steps) -> None:
                at = rec.now()
                steps[0] += 1
                live_tokens = 0
                for row, i in enumerate(batch):
                    rec.token(i, int(tokens[row]), at)
                    if steps[0] < requests[i].output_tokens:
                        live_tokens += len(prompts[i]) + steps[0] - 1  # K/V stored so far
                rec.sample(_dynamic_cache_bytes(cache), live_tokens * info.kv_bytes_per_token, at)

            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=max(requests[i].output_tokens for i in batch),
                pad_token_id=pad_id,
                eos_token_id=None,
            )
            model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                **cache_kwargs(model, cache),
                generation_config=config,
                streamer=_StepStreamer(on_step),
            )
            del cache
            finished += len(batch)
            rec.sample(0, 0)
    load_end = rec.now()
    rec.sleep_until(load_end + settings.tail_seconds, settings.sample_interval_s, lambda: rec.sample(0, 0))
    counters = {"preemptions": 0, "grows": None, "shrinks": None, "compactions": None}
    return SystemRun("hf-generate", rec.records, rec.samples, load_end, rec.now(), counters, {})


# --------------------------------------------------------------------------------------------
# transformers continuous batching


@contextlib.contextmanager
def _quiet_transformers():
    """Continuous batching logs CPU-only complaints (no psutil, no flash attention) at ERROR."""
    loggers = [logging.getLogger(n) for n in ("ContinuousBatchingLogger", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cb_config_kwargs(config_class: type, **wanted: Any) -> dict[str, Any]:
    """``ContinuousBatchingConfig`` arguments under the names this transformers release uses.

    The page size is ``block_size`` up to 5.23 and ``page_size`` from 5.24; a field the release
    lacks (``auto_switch_to_flash`` before 5.24) is left out: its behaviour is the one asked for.
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    if "page_size" not in names and "page_size" in wanted:
        wanted["block_size"] = wanted.pop("page_size")
    return {k: v for k, v in wanted.items() if k in names}


def _cb_cache_bytes(cache: Any, block_bytes: int) -> tuple[int, int]:
    """(resident, live) KV bytes of transformers' paged cache, in either of its 5.x layouts."""
    if hasattr(cache, "cache_tensor"):  # 5.24+: one tensor, capacity counted in sectors
        resident = cache.cache_tensor.numel() * cache.cache_tensor.element_size()
        capacity = cache.num_sectors * cache.bytes_per_sector
        return resident, max(0, capacity - int(cache.compute_free_capacity(relative=False)))
    tensors = [*cache.key_cache, *cache.value_cache]  # up to 5.23: one K and one V tensor per layer group
    resident = sum(t.numel() * t.element_size() for t in tensors)
    return resident, max(0, cache.num_blocks - cache.get_num_free_blocks()) * block_bytes


def run_hf_generate_batch(
    model: torch.nn.Module,
    info: ModelInfo,
    trace: Trace,
    prompts: list[list[int]],
    settings: BenchSettings,
    max_bytes: int,
    progress: Progress,
) -> SystemRun:
    """transformers continuous batching, requests added as they arrive, cache sized to ``max_bytes``."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    rec = Recorder(trace.requests, progress, "hf-generate-batch")
    requests = trace.requests
    block_bytes = settings.page_tokens * info.kv_bytes_per_token
    cb_config = ContinuousBatchingConfig(
        **_cb_config_kwargs(
            ContinuousBatchingConfig,
            page_size=settings.page_tokens,
            num_blocks=max(1, max_bytes // block_bytes),
            max_batch_tokens=settings.max_batch_tokens,
            max_requests_per_batch=settings.max_running,
            allow_block_sharing=False,  # prefix caching would keep finished requests' blocks: not comparable
            auto_switch_to_flash=False,
        )
    )
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.output_tokens for r in requests),
        eos_token_id=-1,
        pad_token_id=model.config.pad_token_id,
    )
    pending: dict[str, int] = {}
    next_arrival = 0
    resident = [0]

    with (
        _quiet_transformers(),
        model.continuous_batching_context_manager(
            generation_config=gen_config,
            continuous_batching_config=cb_config,
            warmup=torch.device(settings.device).type == "cuda",
        ) as manager,
    ):

        def sample() -> None:
            processor = manager.batch_processor
            cache = getattr(processor, "cache", None)
            if cache is None:
                rec.sample(resident[0], 0)
                return
            resident[0], live = _cb_cache_bytes(cache, block_bytes)
            if rec.samples and live != rec.samples[-1][2]:
                rec.last_progress = rec.now()  # tokens come back only when a request ends: KV growth is progress
            rec.sample(resident[0], live)

        def collect(timeout: float) -> None:
            result = manager.get_result(timeout=timeout)
            while result is not None:
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"hf-generate-batch: request {result.request_id} failed: {result.error}")
                    index = pending.pop(result.request_id)
                    for token, stamp in zip(result.generated_tokens, result.timestamps or []):
                        rec.token(index, token, stamp - rec.t0)
                result = manager.get_result(timeout=0)

        sample()
        while pending or next_arrival < len(requests):
            now = rec.now()
            while next_arrival < len(requests) and requests[next_arrival].arrival_s <= now:
                request_id = f"r{next_arrival}"
                manager.add_request(
                    prompts[next_arrival],
                    request_id=request_id,
                    eos_token_id=-1,
                    max_new_tokens=requests[next_arrival].output_tokens,
                    record_timestamps=True,
                )
                pending[request_id] = next_arrival
                next_arrival += 1
            wait = settings.sample_interval_s
            if next_arrival < len(requests):
                wait = max(0.0, min(wait, requests[next_arrival].arrival_s - rec.now()))
            collect(wait)
            sample()
            rec.check_progress()
            if not manager.is_running() and pending:
                raise RuntimeError("hf-generate-batch: the continuous batching thread stopped with requests pending")
        load_end = max((r.finish_s or 0.0) for r in rec.records)
        rec.sleep_until(rec.now() + settings.tail_seconds, settings.sample_interval_s, sample)
        end = rec.now()
    counters = {"preemptions": None, "grows": None, "shrinks": None, "compactions": None}
    return SystemRun("hf-generate-batch", rec.records, rec.samples, load_end, end, counters, {"max_bytes": resident[0]})


def run_system(
    name: str,
    model: torch.nn.Module,
    info: ModelInfo,
    trace: Trace,
    prompts: list[list[int]],
    settings: BenchSettings,
    max_bytes: int,
    progress: Progress,
) -> SystemRun:
    """Replay ``trace`` through the system called ``name`` (its pre-roll first, when it has one).

    Systems switch the model's attention implementation (the Engine to its paged attention,
    continuous batching to its own); each starts from, and leaves, the model as it was loaded.
    """
    progress.system(name)
    attention = model.config._attn_implementation
    try:
        if name in ("elastic", "elastic-noprefix", "static"):
            run = run_engine_system(name, model, trace, prompts, settings, max_bytes, progress)
        elif name == "hf-generate":
            run = run_hf_generate(model, info, trace, prompts, settings, progress)
        elif name == "hf-generate-batch":
            run = run_hf_generate_batch(model, info, trace, prompts, settings, max_bytes, progress)
        else:
            raise ValueError(f"unknown system {name!r}")
        # every system replays the pre-roll first; the figures start at the window
        run.measured_from, run.window_start_s = trace.preroll_requests, trace.window_start_s
        return run
    finally:
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)


AUTO_POOL_ALIGN = 2 * 1024 * 1024  # the mapping granularity of the host backend and of CUDA VMM


def auto_max_bytes(trace: Trace, info: ModelInfo, settings: BenchSettings) -> int:
    """Default pool size: the smallest static pool in which the ``max_running`` largest requests of
    the trace fit at once (whole pages), so memory never makes a request wait on either pool;
    rounded up to whole 2 MiB granules."""
    page = settings.page_tokens
    pages = sorted((-(-(r.prompt_tokens + r.output_tokens) // page) for r in trace.requests), reverse=True)
    nbytes = sum(pages[: settings.max_running]) * page * info.kv_bytes_per_token
    return -(-nbytes // AUTO_POOL_ALIGN) * AUTO_POOL_ALIGN
