"""Request traces for the benchmark: synthetic generators, CSV replay, scaling to the machine.

A trace is a list of requests, each an arrival time (seconds from the start of the replay), a
prompt length and an output length, in tokens. Synthetic traces are deterministic for a seed.
CSV traces use the columns of the Azure LLM inference trace 2023 (``TIMESTAMP``,
``ContextTokens``, ``GeneratedTokens``). Real traces are too big for a laptop, so the replay is
scaled (a time window, compressed time, scaled token counts, every k-th request) and the
:class:`Trace` records exactly what was changed so every report can say it.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

SYNTHETIC_TRACES = ("steady", "bursty", "ramp")
BUNDLED_TRACES = {"azure-code": "azure_llm_2023_code.csv"}
# traces with the ids of shared prompt blocks, for prefix caching (one JSON object a line)
PREFIX_TRACES = {"mooncake": "mooncake_conversation.jsonl"}
TRACE_NAMES = SYNTHETIC_TRACES + tuple(BUNDLED_TRACES) + tuple(PREFIX_TRACES)
MOONCAKE_BLOCK_TOKENS = 512  # the trace's hash ids each cover this many prompt tokens
MOONCAKE_MIN_OUTPUT = 4  # scaled outputs are at least this long, so decode still shows
CSV_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023, code sample (Azure Public Dataset, CC-BY 4.0; "
    "Patel et al., 'Splitwise: Efficient generative LLM inference using phase splitting', ISCA 2024)"
)

MOONCAKE_ATTRIBUTION = (
    "Mooncake FAST'25 trace release, conversation workload (kvcache-ai/Mooncake, Apache License 2.0; "
    "Qin et al., 'Mooncake: Trading More Storage for Less Computation - A KVCache-centric Architecture "
    "for Serving LLM Chatbot', FAST 2025)"
)


class TraceError(ValueError):
    """A trace cannot be read or its scaling selects nothing; the message says why."""


@dataclass(frozen=True)
class TraceRequest:
    """One request: when it arrives and how many tokens go in and come out."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # ids of the prompt's blocks (Mooncake: one per 512 tokens; equal ids, equal tokens and prefix)
    hash_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Trace:
    """A replayable trace plus the record of how it was derived from its source."""

    name: str
    source: str
    requests: tuple[TraceRequest, ...]
    attribution: str | None = None
    scaling: dict = field(default_factory=dict)
    # the pre-roll: the first ``preroll_requests`` requests come from the trace seconds before the
    # window and are replayed first, to warm the systems up; every figure leaves them out, and
    # the measured window starts ``window_start_s`` seconds into the replay
    preroll_requests: int = 0
    window_start_s: float = 0.0

    @property
    def duration_s(self) -> float:
        """Arrival time of the last request (the first arrives at or after 0), pre-roll included."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def measured(self) -> tuple[TraceRequest, ...]:
        """The window's requests: those every figure is computed over (the pre-roll's left out)."""
        return self.requests[self.preroll_requests :]

    @property
    def output_tokens(self) -> int:
        """Output tokens of every request replayed, pre-roll included."""
        return sum(r.output_tokens for r in self.requests)

    def describe(self) -> str:
        """One line naming the trace and what was scaled."""
        preroll = ""
        if self.preroll_requests:
            preroll = (
                f" (the first {self.preroll_requests} the pre-roll; the window starts at {self.window_start_s:.1f} s)"
            )
        return (
            f"{self.name}: {len(self.requests)} requests over {self.duration_s:.1f} s{preroll}; "
            f"{self.scaling['description']}"
        )


# --------------------------------------------------------------------------------------------
# synthetic traces


@dataclass(frozen=True)
class SyntheticShape:
    """Sizes of a synthetic trace; ``quick`` uses a much smaller one."""

    duration_s: float
    rate_per_s: float  # steady rate, burst rate, or peak of the ramp
    prompt_median: int
    prompt_max: int
    output_median: int
    output_max: int
    burst_on_s: float = 0.0
    burst_off_s: float = 0.0
    bursts: int = 0


def synthetic_shape(kind: str, quick: bool) -> SyntheticShape:
    """The default size of each synthetic trace (chosen so the default bench fits 3 minutes on 2 CPU cores)."""
    if kind not in SYNTHETIC_TRACES:
        raise TraceError(f"unknown synthetic trace {kind!r}; expected one of {', '.join(SYNTHETIC_TRACES)}")
    if quick:
        base = dict(prompt_median=64, prompt_max=256, output_median=8, output_max=16)
        if kind == "bursty":
            return SyntheticShape(duration_s=0, rate_per_s=10.0, burst_on_s=0.6, burst_off_s=1.2, bursts=2, **base)
        return SyntheticShape(duration_s=1.5, rate_per_s=8.0, **base)
    base = dict(prompt_median=96, prompt_max=512, output_median=32, output_max=128)
    if kind == "bursty":
        return SyntheticShape(duration_s=0, rate_per_s=8.0, burst_on_s=3.0, burst_off_s=4.0, bursts=3, **base)
    if kind == "steady":
        return SyntheticShape(duration_s=18.0, rate_per_s=4.0, **base)
    return SyntheticShape(duration_s=18.0, rate_per_s=8.0, **base)


def _lengths(rng: np.random.Generator, n: int, median: int, maximum: int) -> np.ndarray:
    # log-normal: most requests short, a long tail, as in real traffic
    values = rng.lognormal(mean=math.log(median), sigma=0.6, size=n)
    return np.clip(np.rint(values), 1, maximum).astype(np.int64)


def _poisson_arrivals(rng: np.random.Generator, start: float, end: float, rate: float) -> list[float]:
    times, t = [], start
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= end:
            return times
        times.append(t)


def synthetic_requests(kind: str, seed: int, quick: bool = False) -> list[TraceRequest]:
    """Requests of a synthetic trace, identical for the same ``kind``, ``seed`` and ``quick``.

    ``steady``: Poisson arrivals at a constant rate. ``bursty``: bursts of ``rate x burst_on_s``
    requests at uniformly random times, separated by idle gaps with no arrivals (long enough for an elastic pool to give memory back). ``ramp``: the
    rate rises linearly from zero to its peak (a thinned Poisson process).
    """
    shape = synthetic_shape(kind, quick)
    rng = np.random.default_rng(seed)
    if kind == "steady":
        arrivals = _poisson_arrivals(rng, 0.0, shape.duration_s, shape.rate_per_s)
    elif kind == "bursty":
        arrivals = []
        period = shape.burst_on_s + shape.burst_off_s
        per_burst = max(1, round(shape.rate_per_s * shape.burst_on_s))
        for burst in range(shape.bursts):
            # a fixed count per burst (uniform times within it): every burst is a real burst
            start = burst * period
            arrivals += sorted((start + rng.uniform(0.0, shape.burst_on_s, per_burst)).tolist())
    else:
        candidates = _poisson_arrivals(rng, 0.0, shape.duration_s, shape.rate_per_s)
        keep = rng.random(len(candidates)) < np.asarray(candidates) / shape.duration_s
        arrivals = [t for t, k in zip(candidates, keep) if k]
    n = len(arrivals)
    prompts = _lengths(rng, n, shape.prompt_median, shape.prompt_max)
    outputs = _lengths(rng, n, shape.output_median, shape.output_max)
    return [TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(arrivals, prompts, outputs)]


# --------------------------------------------------------------------------------------------
# CSV traces


def bundled_trace_path(name: str) -> str:
    """Path of a trace shipped in ``torch_elastic_kv/data``."""
    files = BUNDLED_TRACES | PREFIX_TRACES
    return str(resources.files("torch_elastic_kv").joinpath("data", files[name]))


def _parse_timestamp(text: str) -> float:
    text = text.strip()
    try:
        return float(text)  # plain seconds
    except ValueError:
        pass
    # Python's ISO parser accepts at most 6 fractional digits; the Azure trace has 7
    head, dot, frac = text.partition(".")
    if dot:
        text = f"{head}.{(frac + '000000')[:6]}"
    return datetime.datetime.fromisoformat(text).timestamp()


def read_trace_csv(path: str) -> list[TraceRequest]:
    """Read a CSV with columns TIMESTAMP, ContextTokens, GeneratedTokens (others ignored).

    Arrival times become seconds after the earliest request; rows are sorted by arrival.
    Raises :class:`TraceError` naming the file, row and problem.
    """
    try:
        # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark before TIMESTAMP
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in CSV_COLUMNS if c not in columns]
            if missing:
                raise TraceError(
                    f"trace {path}: missing column(s) {', '.join(missing)}; "
                    f"expected {', '.join(CSV_COLUMNS)}, found {', '.join(columns) or 'no header'}"
                )
            raw = []
            for line, row in enumerate(reader, start=2):
                try:
                    stamp = _parse_timestamp(row["TIMESTAMP"] or "")
                    context, generated = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (TypeError, ValueError) as exc:
                    raise TraceError(f"trace {path}: line {line}: cannot parse {dict(row)} ({exc})") from None
                if not math.isfinite(stamp):
                    raise TraceError(
                        f"trace {path}: line {line}: TIMESTAMP must be a finite time, got {row['TIMESTAMP']!r}"
                    )
                if context < 1 or generated < 1:
                    raise TraceError(
                        f"trace {path}: line {line}: token counts must be >= 1, got "
                        f"ContextTokens={context} GeneratedTokens={generated}"
                    )
                raw.append((stamp, context, generated))
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"cannot read trace {path}: not a text CSV file") from None
    if not raw:
        raise TraceError(f"trace {path}: no requests (only a header)")
    raw.sort(key=lambda r: r[0])
    start = raw[0][0]
    return [TraceRequest(stamp - start, c, g) for stamp, c, g in raw]


# --------------------------------------------------------------------------------------------
# scaling


def parse_window(text: str) -> tuple[float, float | None]:
    """``"END"`` or ``"START:END"`` (seconds of trace time) -> (start, end); end None = open."""
    start_text, sep, end_text = text.partition(":")
    if not sep:
        start_text, end_text = "0", start_text
    try:
        start = float(start_text) if start_text.strip() else 0.0
        end = float(end_text) if end_text.strip() else None
    except ValueError:
        raise TraceError(f"--window {text!r}: expected END or START:END in seconds") from None
    if start < 0 or (end is not None and end <= start) or not math.isfinite(start):
        raise TraceError(f"--window {text!r}: need 0 <= START < END, got start={start} end={end}")
    return start, end


def format_scale(x: float) -> str:
    """``1/120`` rather than ``0.00833333`` when the scale is the inverse of a whole number."""
    if x < 1 and abs(1 / x - round(1 / x)) < 1e-6:
        return f"1/{round(1 / x)}"
    return f"{x:g}"


def scale_trace(
    name: str,
    source: str,
    raw: list[TraceRequest],
    *,
    time_scale: float = 1.0,
    token_scale: float = 1.0,
    window: tuple[float, float | None] = (0.0, None),
    thin: int = 1,
    max_total_tokens: int | None = None,
    attribution: str | None = None,
    min_output_tokens: int = 1,
    block_tokens: int | None = None,
    preroll_s: float = 0.0,
) -> Trace:
    """Select, compress and scale ``raw`` into a replayable :class:`Trace`.

    Order of operations: keep requests whose arrival is in ``window`` (trace seconds), keep
    every ``thin``-th of them, shift so the window starts at 0, multiply arrival times by
    ``time_scale`` and token counts by ``token_scale`` (rounded, at least 1), then cap each
    request at ``max_total_tokens`` (the model's context) by shortening its prompt, then its
    output. The result's ``scaling`` dict records each of these and how many requests they touched.

    Outputs are at least ``min_output_tokens`` long. ``block_tokens`` (a trace with hash ids) is
    the size each block of the source becomes; it is recorded, and ``token_scale`` should be
    ``block_tokens / 512`` so that a prompt spans its blocks, the last one partial.

    ``preroll_s`` (trace seconds, at most the window's start): the requests arriving in the
    ``preroll_s`` seconds before the window (every ``thin``-th of them too) come first, scaled
    alike; the replay then starts at the pre-roll's start, the window at ``preroll_s *
    time_scale`` (``Trace.window_start_s``), and ``Trace.preroll_requests`` counts them. The
    window's requests are the same with or without a pre-roll.
    """
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise TraceError(f"--time-scale must be a positive number, got {time_scale}")
    if not (token_scale > 0 and math.isfinite(token_scale)):
        raise TraceError(f"--token-scale must be a positive number, got {token_scale}")
    if thin < 1:
        raise TraceError(f"--thin must be >= 1, got {thin}")
    if min_output_tokens < 1:
        raise TraceError(f"min_output_tokens must be >= 1, got {min_output_tokens}")
    start, end = window
    check_preroll(preroll_s, start)
    selected = [r for r in raw if r.arrival_s >= start and (end is None or r.arrival_s < end)]
    selected = selected[::thin]
    if not selected:
        span = f"{raw[0].arrival_s:.1f}..{raw[-1].arrival_s:.1f} s" if raw else "nothing"
        raise TraceError(
            f"--window {start:g}:{'' if end is None else f'{end:g}'} selects no requests (trace spans {span})"
        )
    origin = start - preroll_s
    preroll = [r for r in raw if origin <= r.arrival_s < start][::thin] if preroll_s > 0 else []
    clipped = 0
    requests = []
    for r in preroll + selected:
        prompt = max(1, round(r.prompt_tokens * token_scale))
        output = max(min_output_tokens, round(r.output_tokens * token_scale))
        if max_total_tokens is not None and prompt + output > max_total_tokens:
            clipped += 1
            output = min(output, max(1, max_total_tokens // 4))
            prompt = max(1, min(prompt, max_total_tokens - output))
        requests.append(TraceRequest((r.arrival_s - origin) * time_scale, prompt, output, r.hash_ids))
    parts = []
    if start > 0 or end is not None:
        parts.append(f"window {start:g}-{'end' if end is None else f'{end:g}'} s of the trace")
    if preroll_s > 0:
        parts.append(
            f"after a {preroll_s:g} s pre-roll ({origin:g}-{start:g} s, {len(preroll)} requests replayed first, "
            "left out of every figure)"
        )
    if thin > 1:
        parts.append(f"1 in {thin} requests kept")
    if time_scale != 1.0:
        parts.append(f"time x{format_scale(time_scale)}")
    if block_tokens is not None:
        parts.append(
            f"each {MOONCAKE_BLOCK_TOKENS}-token block -> {block_tokens} tokens drawn from its hash id "
            f"(prompts x{format_scale(token_scale)}, the last block partial; outputs likewise, at least "
            f"{min_output_tokens})"
        )
    elif token_scale != 1.0:
        parts.append(f"token counts x{format_scale(token_scale)}")
    if clipped:
        parts.append(f"{clipped} requests cut to the model's {max_total_tokens}-token context")
    scaling = {
        "time_scale": time_scale,
        "token_scale": token_scale,
        "window_s": [start, end],
        "thin": thin,
        "clipped_requests": clipped,
        "max_total_tokens": max_total_tokens,
        "min_output_tokens": min_output_tokens,
        "block_tokens": block_tokens,
        "source_requests": len(raw),
        "preroll_s": preroll_s,
        "preroll_requests": len(preroll),
        "description": "; ".join(parts) if parts else "unscaled",
    }
    return Trace(
        name=name,
        source=source,
        requests=tuple(requests),
        attribution=attribution,
        scaling=scaling,
        preroll_requests=len(preroll),
        window_start_s=preroll_s * time_scale,
    )


def check_preroll(preroll_s: float, window_start_s: float) -> None:
    """Raise :class:`TraceError` unless ``preroll_s`` (trace seconds) is a number in [0, the window's start]:
    the pre-roll replays the trace before the window, and there is none before the trace's start."""
    if not (math.isfinite(preroll_s) and preroll_s >= 0):
        raise TraceError(f"--preroll must be >= 0, got {preroll_s:g}")
    if preroll_s > window_start_s:
        raise TraceError(
            f"--preroll {preroll_s:g} reaches before the trace's start: the window starts at {window_start_s:g} s "
            f"(give at most {window_start_s:g}, or a later --window START)"
        )


def prompt_token_ids(trace: Trace, vocab_size: int, seed: int) -> list[list[int]]:
    """Random prompt token ids for each request, identical for the same trace, vocab and seed."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    rng = np.random.default_rng([seed, 1])  # a stream separate from the one that drew the lengths
    # skip the lowest ids: special tokens (pad/bos/eos) in most vocabularies
    return [rng.integers(3, vocab_size, size=r.prompt_tokens).tolist() for r in trace.requests]


# --------------------------------------------------------------------------------------------
# prefix-sharing traces (Mooncake)


def read_mooncake(path: str) -> list[TraceRequest]:
    """Read a Mooncake trace (JSON lines: ``timestamp`` in ms, ``input_length``,
    ``output_length``, ``hash_ids``); arrival times in seconds after the earliest request.
    Raises :class:`TraceError` naming the file, line and problem."""
    raw = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    stamp = float(row["timestamp"]) / 1000.0
                    prompt, output = int(row["input_length"]), int(row["output_length"])
                    hashes = tuple(int(h) for h in row["hash_ids"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise TraceError(
                        f"trace {path}: line {line_no}: cannot parse ({type(exc).__name__}: {exc})"
                    ) from None
                if not math.isfinite(stamp) or prompt < 1 or output < 1 or not hashes:
                    raise TraceError(
                        f"trace {path}: line {line_no}: need a finite timestamp, lengths >= 1 and hash ids, got {row}"
                    )
                if len(hashes) * MOONCAKE_BLOCK_TOKENS < prompt:
                    raise TraceError(
                        f"trace {path}: line {line_no}: {len(hashes)} hash ids cover fewer than input_length={prompt} "
                        f"tokens ({MOONCAKE_BLOCK_TOKENS} a block)"
                    )
                raw.append(TraceRequest(stamp, prompt, output, hashes))
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    if not raw:
        raise TraceError(f"trace {path}: no requests")
    raw.sort(key=lambda r: r.arrival_s)
    start = raw[0].arrival_s
    return [TraceRequest(r.arrival_s - start, r.prompt_tokens, r.output_tokens, r.hash_ids) for r in raw]


def block_tokens_for(hash_id: int, block_tokens: int, vocab_size: int, seed: int) -> list[int]:
    """The fixed tokens of one block: drawn from a generator seeded by ``seed`` and the block's
    hash id, so equal ids give equal tokens (the lowest ids, special tokens, are skipped)."""
    rng = np.random.default_rng([seed, 3, hash_id])
    return rng.integers(3, vocab_size, size=block_tokens).tolist()


def block_prompt_ids(trace: Trace, block_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Each request's prompt built from its hash ids: the blocks' tokens in order, cut to the
    request's prompt length (the last block partial). Requests sharing their first k ids share
    their first ``k * block_tokens`` tokens."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    blocks: dict[int, list[int]] = {}
    prompts = []
    for r in trace.requests:
        if r.hash_ids is None:
            raise ValueError("block_prompt_ids: the trace has no hash ids")
        ids: list[int] = []
        for h in r.hash_ids:
            if len(ids) >= r.prompt_tokens:
                break
            if h not in blocks:
                blocks[h] = block_tokens_for(h, block_tokens, vocab_size, seed)
            ids += blocks[h]
        if len(ids) < r.prompt_tokens:
            raise ValueError(
                f"a request's {len(r.hash_ids)} blocks hold fewer than its {r.prompt_tokens} prompt tokens"
            )
        prompts.append(ids[: r.prompt_tokens])
    return prompts


def ideal_hit_rate(
    trace: Trace,
    block_tokens: int,
    page_tokens: int,
    capacity_blocks: int | None,
    expiry_s: float | None = None,
) -> dict[str, float | int | None]:
    """The prefix-cache hit rate the trace allows, computed offline from its hash ids.

    Replays the requests in order through an LRU of blocks holding at most ``capacity_blocks``
    (``None``: unlimited). A request hits the longest run of its leading blocks that are
    cached, and at most what the Engine can reuse: whole pages short of its last token
    (``(prompt - 1) // page_tokens`` pages). Then its full blocks are cached, the deepest least
    recently used (the Engine evicts a chain's leaves before their parents). A partial last
    block is never cached. ``expiry_s``: a block unused this long before a request's arrival
    (the replay's scaled times) is gone first, as the Engine's expiry would do at that rate.
    The pre-roll's requests (``trace.preroll_requests``, the first ones) go through the LRU
    like the others but are not counted: a window's second turn hits its pre-roll first turn.
    Returns query and hit tokens over the window's requests and their ratio.
    """
    if block_tokens < 1 or page_tokens < 1 or block_tokens % page_tokens:
        raise ValueError(f"block_tokens ({block_tokens}) must be a positive multiple of page_tokens ({page_tokens})")
    if capacity_blocks is not None and capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be None or >= 0, got {capacity_blocks}")
    lru: OrderedDict[int, float] = OrderedDict()  # block -> last use, least recently used first
    query = hit = 0
    for i, r in enumerate(trace.requests):
        if r.hash_ids is None:
            raise ValueError("ideal_hit_rate: the trace has no hash ids")
        while expiry_s is not None and lru and r.arrival_s - next(iter(lru.values())) >= expiry_s:
            lru.popitem(last=False)
        full = r.prompt_tokens // block_tokens
        chain = r.hash_ids[:full]
        k = 0
        while k < len(chain) and chain[k] in lru:
            k += 1
        if i >= trace.preroll_requests:
            query += r.prompt_tokens
            hit += min(k * block_tokens, (r.prompt_tokens - 1) // page_tokens * page_tokens)
        for h in reversed(chain):  # the root ends most recently used
            lru[h] = r.arrival_s
            lru.move_to_end(h)
        while capacity_blocks is not None and len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return {
        "capacity_blocks": capacity_blocks,
        "expiry_s": expiry_s,
        "preroll_requests": trace.preroll_requests,
        "query_tokens": query,
        "hit_tokens": hit,
        "hit_rate": hit / query if query else 0.0,
    }
