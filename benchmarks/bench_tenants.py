"""Three models on one KV budget, load shifting between them: static split, capped elastic, broker.

One run compares three systems on the same budget and the same load, all real processes on
127.0.0.1 (host backend, the server's embedded default Llama with random weights; the three
"models" are three servers of it with different ``--seed``, so 8 KiB of float32 KV per token
and 2 MiB chunks of 256 tokens):

1. ``static``: three servers, each a static pool of budget/3 (``--min-kv-bytes = --max-kv-bytes``);
2. ``capped``: three elastic pools capped at budget/3 each, no broker (``--min-kv-bytes 0``);
3. ``broker``: three elastic pools under ``python -m torch_elastic_kv broker --budget BUDGET``,
   each ``--max-kv-bytes BUDGET``: the broker lends the budget to whichever is busy.

Load: the bundled Azure LLM inference trace 2023 (code), a window of it split into phases,
one model hot per phase (it gets ``--hot-share`` of the phase's requests, the other two split
the rest), with the trace's inter-arrival gaps multiplied by ``--time-scale``, prompt lengths
by ``--prompt-scale`` and output lengths by ``--output-scale`` (each clipped to a maximum).
Requests go out open-loop (each at its arrival time, whatever the others are doing) from one
asyncio client over httpx, streamed, temperature 0, ``ignore_eos``, ``return_token_ids``:
TTFT is first streamed token minus scheduled arrival, and every request's tokens are compared
across the three systems (same model, same prompt, greedy: they must be identical).

Output: a table on stdout, ``results.json`` and one stacked plot per system of each tenant's
resident KV memory (``/metrics`` every ``--sample-seconds``) with the budget line, in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from torch_elastic_kv.bench import stats  # noqa: E402
from torch_elastic_kv.bench.traces import (  # noqa: E402
    AZURE_ATTRIBUTION,
    TraceError,
    TraceRequest,
    bundled_trace_path,
    read_trace_csv,
)
from torch_elastic_kv.testing.processes import BrokerProcess, ServerProcess, package_env  # noqa: E402
from torch_elastic_kv.testing.sampling import LoadSampler, parse_metrics  # noqa: E402

MiB = 1 << 20
MODELS = ("m0", "m1", "m2")
SYSTEMS = ("static", "capped", "broker")
KV_BYTES_PER_TOKEN = 8192  # default model: 4 layers x (K, V) x 4 heads x 64 dims x float32
VOCAB_LOW, VOCAB_HIGH = 8, 264  # the default tokenizer's byte tokens (ids 0..7 are special)


# --------------------------------------------------------------------------------------------
# the load (pure logic; tests/test_bench_tenants.py)


@dataclass(frozen=True)
class LoadRequest:
    """One request of the run: when (seconds after the start), to which model, its sizes."""

    index: int
    arrival_s: float
    model: str
    phase: int
    hot: bool  # sent to the phase's hot model
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LoadShape:
    """How the trace becomes the run's load; every field is reported with the results."""

    # Sized on the shared 2-core machine: about 2.3 requests/s, which the three servers' compute
    # carries when the hot one has most of the budget, but a budget/3 pool holds only ~3 requests
    # of this size at once, so in the static split the hot model queues for memory.
    window_start_s: float = 1320.0  # trace seconds skipped: minutes 22-23 have steady traffic
    window_s: float = 100.0  # trace seconds replayed
    time_scale: float = 0.8  # arrival gaps x this (< 1: faster than the trace)
    prompt_scale: float = 0.0625  # 1/16: the trace's prompts (median ~1,500) to ~90 tokens
    output_scale: float = 4.0  # code completions are short (median 13): longer outputs hold memory
    max_prompt: int = 256
    max_output: int = 256  # prompt + output fit one static share of the default 12 MiB (512 tokens)
    thin: int = 3  # keep every thin-th request of the window (lowers the rate, keeps the bursts)
    phases: int = 3
    hot_share: float = 0.85
    seed: int = 0


def check_shape(shape: LoadShape) -> None:
    """Raise ValueError naming the first bad field."""
    for name in ("window_s", "time_scale", "prompt_scale", "output_scale"):
        value = getattr(shape, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (shape.window_start_s >= 0 and math.isfinite(shape.window_start_s)):
        raise ValueError(f"window_start_s must be >= 0, got {shape.window_start_s!r}")
    if shape.max_prompt < 1 or shape.max_output < 1:
        raise ValueError(f"max_prompt and max_output must be >= 1, got {shape.max_prompt}, {shape.max_output}")
    if shape.thin < 1:
        raise ValueError(f"thin must be >= 1, got {shape.thin}")
    if shape.phases < 1:
        raise ValueError(f"phases must be >= 1, got {shape.phases}")
    if not 0 <= shape.hot_share <= 1:
        raise ValueError(f"hot_share must be in [0, 1], got {shape.hot_share!r}")


def hot_model(phase: int) -> str:
    """The model hot in ``phase``: each in turn."""
    return MODELS[phase % len(MODELS)]


def phase_of(position: int, count: int, phases: int) -> int:
    """Which of ``phases`` equal runs of ``count`` requests the ``position``-th (0-based) is in.

    Phases hold equal request counts, not equal time: the trace is bursty (minutes with no
    request next to minutes with 600), so equal time slices would leave some models no load.
    """
    if not 0 <= position < count:
        raise ValueError(f"position {position} outside 0..{count - 1}")
    return position * phases // count


def scale_length(n: int, scale: float, maximum: int) -> int:
    """A token count scaled, rounded, at least 1 and at most ``maximum``."""
    return max(1, min(maximum, round(n * scale)))


def build_load(raw: list[TraceRequest], shape: LoadShape) -> list[LoadRequest]:
    """The run's requests from the trace: a window, compressed, phased, each sent to a model.

    Phases are equal runs of consecutive requests (:func:`phase_of`). A request goes to the phase's hot model with
    probability ``hot_share``, else to one of the other two (equally likely); the draws come
    from ``seed`` only, so the load is identical for every system.
    """
    check_shape(shape)
    end = shape.window_start_s + shape.window_s
    selected = [r for r in raw if shape.window_start_s <= r.arrival_s < end][:: shape.thin]
    if not selected:
        raise TraceError(f"trace window {shape.window_start_s:g}-{end:g} s selects no requests")
    rng = np.random.default_rng(shape.seed)
    out = []
    for i, r in enumerate(selected):
        t = (r.arrival_s - shape.window_start_s) * shape.time_scale
        phase = phase_of(i, len(selected), shape.phases)
        hot = hot_model(phase)
        is_hot = bool(rng.random() < shape.hot_share)
        if is_hot:
            model = hot
        else:
            others = [m for m in MODELS if m != hot]
            model = others[int(rng.integers(len(others)))]
        out.append(
            LoadRequest(
                index=i,
                arrival_s=t,
                model=model,
                phase=phase,
                hot=is_hot,
                prompt_tokens=scale_length(r.prompt_tokens, shape.prompt_scale, shape.max_prompt),
                output_tokens=scale_length(r.output_tokens, shape.output_scale, shape.max_output),
            )
        )
    return out


def prompt_ids(load: list[LoadRequest], seed: int) -> list[list[int]]:
    """Random byte-token prompts, one per request, identical for the same load and seed."""
    rng = np.random.default_rng([seed, 7])
    return [rng.integers(VOCAB_LOW, VOCAB_HIGH, size=r.prompt_tokens).tolist() for r in load]


def describe_load(load: list[LoadRequest], shape: LoadShape) -> dict[str, Any]:
    per_model = {m: sum(1 for r in load if r.model == m) for m in MODELS}
    per_phase = [
        {
            "phase": p,
            "hot": hot_model(p),
            "requests": sum(1 for r in load if r.phase == p),
            "to_hot": sum(1 for r in load if r.phase == p and r.hot),
        }
        for p in range(shape.phases)
    ]
    prompts = [r.prompt_tokens for r in load]
    outputs = [r.output_tokens for r in load]
    return {
        "requests": len(load),
        "duration_s": shape.window_s * shape.time_scale,
        "per_model": per_model,
        "per_phase": per_phase,
        "prompt_tokens": {"median": stats.percentile(prompts, 50), "p90": stats.percentile(prompts, 90)},
        "output_tokens": {"median": stats.percentile(outputs, 50), "p90": stats.percentile(outputs, 90)},
        "scaling": (
            f"trace seconds {shape.window_start_s:g}-{shape.window_start_s + shape.window_s:g}"
            f"{f', 1 request in {shape.thin} kept' if shape.thin > 1 else ''}; "
            f"arrival gaps x{shape.time_scale:g}; prompt tokens x{shape.prompt_scale:g} (max {shape.max_prompt}); "
            f"output tokens x{shape.output_scale:g} (max {shape.max_output}); {shape.phases} phases, "
            f"{shape.hot_share:.0%} of each phase's requests to its hot model"
        ),
        "attribution": AZURE_ATTRIBUTION,
    }


# --------------------------------------------------------------------------------------------
# processes


def broker_top(socket_path: Path) -> dict[str, Any]:
    """``python -m torch_elastic_kv top --json``: the broker's snapshot (or the error it printed)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "top", "--json", "--socket", str(socket_path)],
        capture_output=True,
        text=True,
        env=package_env(),
        timeout=30,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()}


def server_args(
    system: str, model: str, budget: int, broker: Optional[Path], settings: argparse.Namespace
) -> list[str]:
    """The serve options of ``model`` in ``system`` (identical elsewhere: swap, batch, idle)."""
    share = budget // len(MODELS)
    common = [
        "--seed",
        str(MODELS.index(model)),
        "--served-model-name",
        model,
        "--swap-bytes",
        str(settings.swap_bytes),
        "--idle-seconds",
        str(settings.idle_seconds),
        "--max-batch-tokens",
        str(settings.max_batch_tokens),
        "--log-level",
        "warning",
    ]
    if system == "static":
        return [*common, "--max-kv-bytes", str(share), "--min-kv-bytes", str(share)]
    if system == "capped":
        return [*common, "--max-kv-bytes", str(share), "--min-kv-bytes", "0"]
    if system == "broker":
        assert broker is not None
        return [*common, "--max-kv-bytes", str(budget), "--broker", str(broker), "--tenant", model]
    raise ValueError(f"unknown system {system!r}")


# --------------------------------------------------------------------------------------------
# measuring


def kv_rows(sampler: LoadSampler) -> list[dict[str, Any]]:
    """Each tick's resident/live/lease KV bytes per server; a server whose /metrics read failed
    in a tick repeats its last point (a busy server's slow answer, counted in ``missed``)."""
    rows: list[dict[str, Any]] = []
    for tick in sampler.ticks:
        row: dict[str, Any] = {"t": tick["t"]}
        for name in sampler.urls:
            m = tick[name]["metrics"]
            if m is None:
                if rows and name in rows[-1]:
                    row[name] = rows[-1][name]
                continue
            row[name] = {
                "resident": m.get("ekv_kv_resident_bytes", 0.0),
                "live": m.get("ekv_kv_live_bytes", 0.0),
                "lease": m.get("ekv_kv_lease_bytes", float("nan")),
            }
        rows.append(row)
    return rows


@dataclass
class Outcome:
    """What one request got: TTFT, its tokens, when it finished; ``error`` if it failed."""

    index: int
    ttft_s: Optional[float] = None
    finish_s: Optional[float] = None
    tokens: list[int] = field(default_factory=list)
    error: Optional[str] = None


async def _one(client: Any, url: str, model: str, req: LoadRequest, prompt: list[int], t0: float) -> Outcome:
    out = Outcome(req.index)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    if ids and out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0 - req.arrival_s
                    out.tokens.extend(ids)
        out.finish_s = time.perf_counter() - t0
        if len(out.tokens) != req.output_tokens:
            out.error = f"{len(out.tokens)} tokens, expected {req.output_tokens}"
    except Exception as exc:  # counted as lost, reported
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def _replay(
    urls: dict[str, str], load: list[LoadRequest], prompts: list[list[int]], t0: float, deadline_s: float
) -> list[Outcome]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=limits) as client:

        async def at_arrival(req: LoadRequest) -> Outcome:
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(client, urls[req.model], req.model, req, prompts[req.index], t0)

        tasks = [asyncio.ensure_future(at_arrival(r)) for r in load]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        outcomes = []
        for req, task in zip(load, tasks):
            if task in done:
                outcomes.append(task.result())
            else:
                outcomes.append(Outcome(req.index, error=f"not finished within {deadline_s:.0f} s"))
        return outcomes


def _warm_up(urls: dict[str, str]) -> None:
    """One short request per server, so first-call costs (oneDNN prepack, lazy imports) are not measured."""
    import httpx

    for model, url in urls.items():
        body = {"model": model, "prompt": [10, 11, 12, 13], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        httpx.post(url + "/v1/completions", json=body, timeout=120).raise_for_status()


def run_system(
    system: str, load: list[LoadRequest], prompts: list[list[int]], settings: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Start the system's processes, replay the load, stop them; the raw outcomes and samples."""
    budget = settings.budget
    broker = None
    servers: dict[str, ServerProcess] = {}
    try:
        sock = work / f"{system}.sock"
        if system == "broker":
            broker = BrokerProcess(sock, budget, "--device", "cpu")
        for m in MODELS:
            servers[m] = ServerProcess(server_args(system, m, budget, sock if broker else None, settings), wait=False)
        urls = {m: s.wait_ready(300) for m, s in servers.items()}
        _warm_up(urls)
        time.sleep(settings.idle_seconds + 1.0)  # the warm-up's memory goes back before the clock starts
        import httpx

        before = {m: parse_metrics(httpx.get(u + "/metrics", timeout=30).text) for m, u in urls.items()}
        duration = max((r.arrival_s for r in load), default=0.0)
        deadline = duration + settings.drain_seconds
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        with LoadSampler(urls, settings.sample_seconds, t0) as sampler:
            outcomes = asyncio.run(_replay(urls, load, prompts, t0, deadline))
            wall = time.perf_counter() - t0
            time.sleep(min(2.0, settings.sample_seconds * 5))  # a few samples after the last request
        after = {m: parse_metrics(httpx.get(u + "/metrics", timeout=30).text) for m, u in urls.items()}
        top = broker_top(sock) if broker else None
        return {
            "outcomes": outcomes,
            "samples": kv_rows(sampler),
            "samples_missed": sampler.missed,
            "wall_s": wall,
            "preemptions": {
                m: after[m].get("ekv_preemptions_total", 0.0) - before[m].get("ekv_preemptions_total", 0.0)
                for m in MODELS
            },
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "broker_top": top,
        }
    finally:
        for s in servers.values():
            s.stop()
        if broker is not None:
            broker.stop()


# --------------------------------------------------------------------------------------------
# summary, report


def summarize(load: list[LoadRequest], raw: dict[str, Any]) -> dict[str, Any]:
    """Per model and for the hot-model requests: TTFT p50/p99, output tokens/s, completed vs sent."""
    outcomes: list[Outcome] = raw["outcomes"]
    groups: dict[str, list[int]] = {m: [r.index for r in load if r.model == m] for m in MODELS}
    groups["hot"] = [r.index for r in load if r.hot]
    rows = {}
    for name, idx in groups.items():
        done = [outcomes[i] for i in idx if outcomes[i].error is None]
        ttft = [o.ttft_s for o in done if o.ttft_s is not None]
        tokens = sum(len(o.tokens) for o in done)
        first = min((load[i].arrival_s for i in idx), default=0.0)
        last = max((o.finish_s for o in done if o.finish_s is not None), default=first)
        rows[name] = {
            "sent": len(idx),
            "completed": len(done),
            "ttft_p50_s": stats.percentile(ttft, 50),
            "ttft_p99_s": stats.percentile(ttft, 99),
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / (last - first) if last > first else float("nan"),
            # preemptions are per server: the "hot" row shows the three servers' total
            "preemptions": raw["preemptions"][name] if name in MODELS else sum(raw["preemptions"].values()),
        }
    return rows


def compare_tokens(load: list[LoadRequest], raws: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Requests whose tokens are identical in every system (of those all systems completed)."""
    systems = list(raws)
    same = differ = 0
    first_diff = None
    for r in load:
        outs = [raws[s]["outcomes"][r.index] for s in systems]
        if any(o.error is not None for o in outs):
            continue
        if all(o.tokens == outs[0].tokens for o in outs):
            same += 1
        else:
            differ += 1
            first_diff = first_diff if first_diff is not None else r.index
    return {"compared": same + differ, "identical": same, "different": differ, "first_different_index": first_diff}


def plot_system(path: Path, system: str, samples: list[dict[str, Any]], budget: int, load: list[LoadRequest]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    layers = [[s.get(m, {}).get("resident", 0.0) / MiB for s in samples] for m in MODELS]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stackplot(t, layers, labels=[f"{m} resident" for m in MODELS], step="post", alpha=0.8)
    ax.axhline(budget / MiB, color="black", linestyle="--", linewidth=1, label="budget")
    starts = {}
    for r in load:
        starts.setdefault(r.phase, r.arrival_s)
    for p, x in sorted(starts.items()):
        ax.axvline(x, color="grey", linewidth=0.6)
        ax.text(x, budget / MiB * 1.02, f" {hot_model(p)} hot", fontsize=8, va="bottom")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident KV (MiB)")
    ax.set_ylim(0, budget / MiB * 1.25)
    ax.set_title(f"{system}: resident KV per tenant (stacked), budget {budget / MiB:g} MiB")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1000:.0f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| system | model | sent | completed | TTFT p50 ms | TTFT p99 ms | output tok/s | preemptions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, rows in results["systems"].items():
        for name, r in rows["summary"].items():
            lines.append(
                f"| {system} | {name} | {r['sent']} | {r['completed']} | {_ms(r['ttft_p50_s'])} | "
                f"{_ms(r['ttft_p99_s'])} | {r['output_tokens_per_s']:.1f} | {r['preemptions']:.0f} |"
            )
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/tenants", help="output directory (default bench_out/tenants/)")
    p.add_argument("--quick", action="store_true", help="a 40 s window of the trace (a smoke run)")
    p.add_argument("--budget", default=str(12 * MiB), help="device KV budget, e.g. 12M (default 12 MiB)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--window-start", type=float, default=LoadShape.window_start_s)
    p.add_argument("--window", type=float, default=None, help="trace seconds replayed (default 100; quick 40)")
    p.add_argument("--time-scale", type=float, default=LoadShape.time_scale)
    p.add_argument("--prompt-scale", type=float, default=LoadShape.prompt_scale)
    p.add_argument("--output-scale", type=float, default=LoadShape.output_scale)
    p.add_argument("--max-prompt", type=int, default=LoadShape.max_prompt)
    p.add_argument("--max-output", type=int, default=LoadShape.max_output)
    p.add_argument("--thin", type=int, default=LoadShape.thin)
    p.add_argument("--phases", type=int, default=LoadShape.phases)
    p.add_argument("--hot-share", type=float, default=LoadShape.hot_share)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swap-bytes", type=int, default=64 * MiB)
    p.add_argument("--idle-seconds", type=float, default=1.0)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--sample-seconds", type=float, default=0.2)
    p.add_argument(
        "--drain-seconds", type=float, default=120.0, help="time after the last arrival before a request counts as lost"
    )
    args = p.parse_args(argv)
    from torch_elastic_kv._units import parse_size

    args.budget = parse_size(args.budget)
    if args.budget < 3 * 2 * MiB:
        p.error("--budget must hold at least one 2 MiB chunk per model (6 MiB)")
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        p.error(f"--systems: unknown {bad}; expected a subset of {','.join(SYSTEMS)}")
    # every request must fit a static pool of budget/3, or the static partition rejects it (400)
    share_tokens = args.budget // len(MODELS) // KV_BYTES_PER_TOKEN
    if args.max_prompt + args.max_output > share_tokens:
        p.error(
            f"--max-prompt + --max-output ({args.max_prompt + args.max_output} tokens) must fit budget/3 "
            f"({share_tokens} tokens of {KV_BYTES_PER_TOKEN} bytes), or the static partition rejects requests"
        )
    if args.window is None:
        args.window = 40.0 if args.quick else LoadShape.window_s
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    shape = LoadShape(
        window_start_s=args.window_start,
        window_s=args.window,
        time_scale=args.time_scale,
        prompt_scale=args.prompt_scale,
        output_scale=args.output_scale,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        thin=args.thin,
        phases=args.phases,
        hot_share=args.hot_share,
        seed=args.seed,
    )
    try:
        load = build_load(read_trace_csv(bundled_trace_path("azure-code")), shape)
    except (TraceError, ValueError) as exc:
        print(f"bench_tenants: error: {exc}", file=sys.stderr)
        return 2
    prompts = prompt_ids(load, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = describe_load(load, shape)
    print(f"load: {info['requests']} requests over {info['duration_s']:.0f} s ({info['scaling']})")
    print(f"      per model {info['per_model']}; {info['attribution']}")
    print(f"budget {args.budget / MiB:g} MiB; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    raws: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ekvbt", dir="/tmp") as work:
        for system in args.systems:
            t = time.perf_counter()
            raws[system] = run_system(system, load, prompts, args, Path(work))
            lost = sum(1 for o in raws[system]["outcomes"] if o.error is not None)
            print(
                f"{system}: done in {time.perf_counter() - t:.0f} s, {lost} lost, "
                f"load average {raws[system]['loadavg_after'][0]:.2f}",
                flush=True,
            )
    results: dict[str, Any] = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "budget_bytes": args.budget,
        "shape": asdict(shape),
        "load": info,
        "settings": {k: getattr(args, k) for k in ("swap_bytes", "idle_seconds", "max_batch_tokens", "sample_seconds")},
        "systems": {},
    }
    for system, raw in raws.items():
        errors = [f"#{o.index}: {o.error}" for o in raw["outcomes"] if o.error is not None]
        results["systems"][system] = {
            "summary": summarize(load, raw),
            "wall_s": raw["wall_s"],
            "loadavg_before": raw["loadavg_before"],
            "loadavg_after": raw["loadavg_after"],
            "errors": errors[:20],
            "broker_top_after": raw["broker_top"],
            "peak_resident_sum_bytes": max(
                (sum(s.get(m, {}).get("resident", 0.0) for m in MODELS) for s in raw["samples"]), default=0.0
            ),
            "samples_missed": raw["samples_missed"],
            "requests": [
                {
                    "index": r.index,
                    "model": r.model,
                    "phase": r.phase,
                    "hot": r.hot,
                    "arrival_s": r.arrival_s,
                    "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens,
                    "ttft_s": o.ttft_s,
                    "finish_s": o.finish_s,
                    "error": o.error,
                }
                for r, o in zip(load, raw["outcomes"])
            ],
            "samples": raw["samples"],
        }
        plot_system(out / f"memory_{system}.png", system, raw["samples"], args.budget, load)
    if len(raws) > 1:
        results["tokens"] = compare_tokens(load, raws)
    if "static" in raws and "broker" in raws:
        s = results["systems"]["static"]["summary"]["hot"]
        b = results["systems"]["broker"]["summary"]["hot"]
        broker_rows = results["systems"]["broker"]["summary"]
        lost = sum(broker_rows[m]["sent"] - broker_rows[m]["completed"] for m in MODELS)
        ratio = b["ttft_p99_s"] / s["ttft_p99_s"] if s["ttft_p99_s"] else float("nan")
        results["floor"] = {
            "hot_ttft_p99_static_s": s["ttft_p99_s"],
            "hot_ttft_p99_broker_s": b["ttft_p99_s"],
            "ratio": ratio,
            "broker_lost": lost,
            "met": bool(ratio <= 1 / 3 and lost == 0),
        }
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    print(table(results))
    for system in raws:
        r = results["systems"][system]
        print(
            f"{system}: wall {r['wall_s']:.0f} s, peak resident sum {r['peak_resident_sum_bytes'] / MiB:.1f} MiB, "
            f"load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}"
        )
    if "tokens" in results:
        t = results["tokens"]
        print(f"tokens: {t['identical']}/{t['compared']} requests identical across {', '.join(raws)}")
    if "floor" in results:
        f = results["floor"]
        print(
            f"floor (broker hot TTFT p99 <= static / 3, none lost): ratio {f['ratio']:.3f}, "
            f"broker lost {f['broker_lost']}: {'met' if f['met'] else 'NOT met'}"
        )
    print(f"wrote {out}/results.json and memory_<system>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
