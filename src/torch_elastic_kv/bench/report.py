"""What a benchmark run leaves behind: the table, ``results.json``, ``memory.png``, ``latency.png``.

Outputs are written into a fresh temporary directory and moved into ``--out`` only once all of
them exist, so a run that fails leaves nothing partial behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from typing import Any

import numpy as np

from .replay import SystemRun

MIB = 1024 * 1024
COLORS = {
    "elastic": "tab:green",
    "elastic-noprefix": "tab:olive",
    "static": "tab:red",
    "hf-generate": "tab:blue",
    "hf-generate-batch": "tab:purple",
}
# elastic drawn on top; static and continuous batching sit at nearly the same level, so dash one
STYLES = {
    "elastic": {"linewidth": 2.0, "zorder": 5},
    "elastic-noprefix": {"linewidth": 1.6, "linestyle": "-.", "zorder": 4},
    "static": {"linewidth": 2.2, "zorder": 4},
    "hf-generate": {"linewidth": 1.2, "zorder": 2},
    "hf-generate-batch": {"linewidth": 1.6, "linestyle": "--", "zorder": 3},
}
OUTPUT_FILES = ("results.json", "summary.md", "memory.png", "latency.png")
PREFIX_PLOT = "prefix_cache.png"  # written for traces with shared prefixes (results["trace"]["ideal_hit_rate"])


# --------------------------------------------------------------------------------------------
# table


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}"


def _fmt_mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.2f}"


def table(results: dict) -> str:
    """A markdown table of every system's figures (one row per system)."""
    header = (
        "system",
        "tok/s (busy)",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "KV mean/peak/idle MiB",
        "saved vs static MiB*s (%)",
        "preempt",
        "output sha256",
    )
    rows = []
    for name, s in results["systems"].items():
        rows.append(
            (
                name,
                f"{s['tokens_per_s']:.0f} ({s['busy_tokens_per_s']:.0f})",
                f"{_fmt_ms(s['ttft_p50_s'])} / {_fmt_ms(s['ttft_p99_s'])}",
                f"{_fmt_ms(s['tpot_p50_s'])} / {_fmt_ms(s['tpot_p99_s'])}",
                f"{_fmt_mib(s['mean_resident_bytes'])} / {_fmt_mib(s['peak_resident_bytes'])} / "
                f"{_fmt_mib(s['idle_resident_bytes'])}",
                f"{s['memory_byte_seconds_saved_vs_static'] / MIB:.0f} ({100 * s['memory_saved_vs_static_fraction']:.0f}%)",
                "-" if s["preemptions"] is None else str(s["preemptions"]),
                s["output_checksum"][:12],
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _preroll_words(trace: dict) -> str:
    preroll = (trace.get("preroll") or {}).get("requests")
    return f" (after the pre-roll's {preroll})" if preroll else ""


def summary_markdown(results: dict) -> str:
    """The table plus the lines that say what ran on what (model, trace, scaling, pool, checksums)."""
    trace, model, pool = results["trace"], results["model"], results["static_pool_bytes"]
    lines = [
        f"Trace: {trace['name']} ({trace['source']}): {trace['requests']} requests{_preroll_words(trace)} over "
        f"{trace['duration_s']:.1f} s, "
        f"{trace['prompt_tokens']} prompt / {trace['output_tokens']} output tokens; scaling: "
        f"{trace['scaling']['description']}.",
    ]
    if trace.get("attribution"):
        lines.append(f"Data: {trace['attribution']}.")
    lines += [
        f"Model: {model['name']}, {model['parameters'] / 1e6:.1f} M parameters, {model['dtype']} on {model['device']}; "
        f"{model['kv_bytes_per_token']} KV bytes per token.",
        f"Static pool (and elastic max): {_fmt_mib(pool)} MiB; elastic min {_fmt_mib(results['settings']['min_bytes'])} "
        f"MiB, idle_seconds {results['settings']['idle_seconds']:g}, idle tail {results['settings']['tail_seconds']:g} s.",
    ]
    preroll = trace.get("preroll") or {}
    if preroll.get("seconds"):
        lines.append(
            f"Pre-roll: the {preroll['seconds']:g} s of the trace before the window ({preroll['requests']} requests, "
            f"0-{trace['window_start_s']:.1f} s of the replay) ran first through every system. The figures below "
            f"are over the window's {trace['requests']} requests; KV mean/peak and memory saved from the window's "
            f"start at {trace['window_start_s']:.1f} s; hit rates and preemptions from its first request on. The "
            "output checksum covers every request, the pre-roll's included."
        )
    lines += [
        "",
        table(results),
        "",
        results["checksum_note"],
    ]
    if trace.get("ideal_hit_rate"):
        lines += ["", *prefix_lines(results)]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def prefix_lines(results: dict) -> list[str]:
    """The prefix cache's table (hit rate beside the trace's offline ideal) and the issue 23 floors."""
    trace, settings = results["trace"], results["settings"]
    ideal = trace["ideal_hit_rate"]
    expiry = settings["prefix_expiry_s"]
    window = (
        "the window's requests, the pre-roll's replayed through the LRU first"
        if trace.get("preroll", {}).get("requests")
        else "the same requests"
    )
    lines = [
        f"Prefix cache: B = {settings['block_tokens']} tokens per {512}-token block of the trace (drawn from its hash "
        f"id); expiry {expiry:g} s of the replay for this run ({expiry / settings['time_scale']:g} s of trace time; "
        f"the {settings['tail_seconds']:g} s idle tail shows the cache kept, then given back). Offline ideal hit "
        f"rate over {window}: "
        f"{_pct(ideal['lru']['hit_rate'])} (LRU of {ideal['lru']['capacity_blocks']} blocks = the pool), "
        f"{_pct(ideal['lru_expiry']['hit_rate'])} (same LRU and the expiry at the replay's arrival times), "
        f"{_pct(ideal['unlimited']['hit_rate'])} (unlimited).",
        "",
    ]
    header = ("system", "hit rate", "TTFT p50/p99 ms", "tok/s", "peak cached MiB", "KV at end MiB", "floor after s")
    rows = []
    for name, s in results["systems"].items():
        back = s.get("back_to_floor_s")
        rows.append(
            (
                name,
                _pct(s.get("prefix_hit_rate")),
                f"{_fmt_ms(s['ttft_p50_s'])} / {_fmt_ms(s['ttft_p99_s'])}",
                f"{s['tokens_per_s']:.0f}",
                "-" if s.get("peak_cached_bytes") is None else _fmt_mib(s["peak_cached_bytes"]),
                _fmt_mib(s["idle_resident_bytes"]),
                "-" if back is None else f"{back:.1f}",
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in (header, *rows)]
    body.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += body
    lines += ["", "Floors (issue 23):"] + [
        f"- [{c['verdict']}] {c['floor']}: {c['figures']}" for c in prefix_floors(results)
    ]
    return lines


def prefix_floors(results: dict) -> list[dict]:
    """Each issue 23 floor, judged on this run's figures (verdict MET, NOT MET or n/a)."""
    systems, settings = results["systems"], results["settings"]
    ideal = results["trace"]["ideal_hit_rate"]["lru"]["hit_rate"]
    on, off = systems.get("elastic"), systems.get("elastic-noprefix")
    checks = []

    def add(floor: str, met: bool | None, figures: str) -> None:
        checks.append(
            {
                "floor": floor,
                "met": met,
                "verdict": {True: "MET", False: "NOT MET", None: "n/a"}[met],
                "figures": figures,
            }
        )

    rate = on.get("prefix_hit_rate") if on else None
    add(
        "hit rate within 5 points of the ideal for the same cache size",
        None if rate is None else bool(rate >= ideal - 0.05),
        f"elastic {_pct(rate)} vs ideal {_pct(ideal)}",
    )
    if on and off:
        ratio = on["ttft_p50_s"] / off["ttft_p50_s"] if off["ttft_p50_s"] > 0 else None
        add(
            "TTFT p50 with the cache <= 0.5x without",
            None if ratio is None else bool(ratio <= 0.5),
            f"{_fmt_ms(on['ttft_p50_s'])} vs {_fmt_ms(off['ttft_p50_s'])} ms ({'-' if ratio is None else f'{ratio:.2f}x'})",
        )
        add(
            "output tok/s with the cache not lower",
            bool(on["tokens_per_s"] >= off["tokens_per_s"]),
            f"{on['tokens_per_s']:.1f} vs {off['tokens_per_s']:.1f}",
        )
        add(
            "every request's tokens identical with the cache on and off",
            on["output_checksum"] == off["output_checksum"],
            f"{on['output_checksum'][:12]} vs {off['output_checksum'][:12]}",
        )
    if on:
        bound = settings["prefix_expiry_s"] + settings["idle_seconds"]
        back = on.get("back_to_floor_s")
        add(
            "idle: KV back to the floor within expiry + idle_seconds after the last request",
            back is not None and back <= bound,
            f"{'never within the tail' if back is None else f'{back:.1f} s'} (bound {bound:g} s)",
        )
    return checks


# --------------------------------------------------------------------------------------------
# results.json


def _downsample(samples: list[tuple[float, int, int]], limit: int = 2000) -> dict[str, list]:
    if len(samples) > limit:
        keep = np.unique(np.linspace(0, len(samples) - 1, limit).astype(int))
        samples = [samples[i] for i in keep]
    return {
        "t_s": [round(s[0], 4) for s in samples],
        "resident_bytes": [s[1] for s in samples],
        "live_bytes": [s[2] for s in samples],
    }


def checksum_note(systems: dict[str, dict]) -> str:
    """One line saying which systems produced identical tokens."""
    groups: dict[str, list[str]] = {}
    for name, s in systems.items():
        groups.setdefault(s["output_checksum"], []).append(name)
    if len(groups) == 1:
        return f"Output tokens identical across {', '.join(systems)} (sha256 {next(iter(groups))[:12]}, every request)."
    parts = [f"{' = '.join(names)} ({digest[:12]})" for digest, names in groups.items()]
    return "Output checksums: " + "; ".join(parts) + "."


def results_document(
    *,
    command: list[str],
    settings: dict,
    model: dict,
    trace: dict,
    static_pool_bytes: int,
    systems: dict[str, dict],
    runs: list[SystemRun],
    definitions: dict,
) -> dict:
    """Everything in results.json: settings, trace and its scaling, each system's figures and timeline."""
    from .. import __version__

    return {
        "tool": "python -m torch_elastic_kv bench",
        "version": __version__,
        "command": command,
        "settings": settings,
        "model": model,
        "trace": trace,
        "static_pool_bytes": static_pool_bytes,
        "systems": systems,
        "checksum_note": checksum_note(systems),
        "definitions": definitions,
        "timelines": {run.name: _downsample(run.samples) for run in runs},
        "arrivals_s": [r.arrival_s for r in runs[0].records] if runs else [],
    }


# --------------------------------------------------------------------------------------------
# plots


def _step_xy(samples: list[tuple[float, int, int]], column: int, end_s: float) -> tuple[list[float], list[float]]:
    xs = [s[0] for s in samples] + [end_s]
    ys = [s[column] / MIB for s in samples]
    return xs, ys + ys[-1:]


def _footer(fig: Any, trace: dict, least: float) -> float:
    """Write :func:`trace_note` under ``fig``, wrapped to its width; return the bottom of the room
    left for the axes (a figure fraction, at least ``least``)."""
    width_in, height_in = fig.get_size_inches()
    chars = int(width_in * 19)  # about what a line of 6.5-point text holds
    text = "\n".join(textwrap.fill(part, chars) for part in trace_note(trace).split("\n"))
    fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom")
    return max(least, (0.115 * (text.count("\n") + 1) + 0.04) / height_in)


def trace_note(trace: dict) -> str:
    """What each picture says under it: how the trace was scaled and, for real data, whose it is."""
    note = f"scaling: {trace['scaling']['description']}"
    if trace.get("attribution"):
        note += f"\ndata: {trace['attribution']}"
    return note


def _mark_window(results: dict, *axes: Any) -> None:
    """A vertical line where the measured window starts, on each of ``axes`` (none without a pre-roll)."""
    start = results["trace"].get("window_start_s") or 0.0
    if start > 0:
        for i, ax in enumerate(axes):
            label = "window starts (pre-roll before: not in the figures)" if i == 0 else None
            ax.axvline(start, color="tab:brown", linestyle="-.", linewidth=1, label=label)


def plot_memory(path: str, results: dict, runs: list[SystemRun]) -> None:
    """Resident KV bytes over time per system; underneath, live KV bytes and the arrival rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 2])
    end = max((run.end_s for run in runs), default=1.0)
    for run in runs:
        xs, ys = _step_xy(run.samples, 1, run.end_s)
        style = STYLES.get(run.name, {})
        top.step(xs, ys, where="post", color=COLORS.get(run.name), label=run.name, **style)
        xs, ys = _step_xy(run.samples, 2, run.end_s)
        bottom.step(xs, ys, where="post", color=COLORS.get(run.name), label=f"live ({run.name})", linewidth=1.0)
    top.axhline(results["static_pool_bytes"] / MIB, color="grey", linestyle=":", linewidth=1, label="static pool size")
    _mark_window(results, top, bottom)
    top.set_ylabel("resident KV MiB")
    highest = max([results["static_pool_bytes"]] + [s[1] for run in runs for s in run.samples]) / MIB
    top.set_ylim(0, highest * 1.3)  # room above the static line for the legend
    top.legend(loc="upper right", fontsize=8, ncol=3)
    trace = results["trace"]
    top.set_title(f"KV cache memory over time: {trace['name']} trace, {results['model']['name']}", fontsize=10)
    bottom.set_ylabel("live KV MiB")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since replay start")
    arrivals = results["arrivals_s"]
    rate_axis = bottom.twinx()
    if arrivals:
        bin_s = max(end / 60.0, 0.05)
        edges = np.arange(0.0, end + bin_s, bin_s)
        counts, _ = np.histogram(arrivals, bins=edges)
        rate_axis.bar(
            edges[:-1], counts / bin_s, width=bin_s, align="edge", color="orange", alpha=0.25, label="arrivals / s"
        )
    rate_axis.set_ylabel("arrivals / s")
    lines, labels = bottom.get_legend_handles_labels()
    rate_lines, rate_labels = rate_axis.get_legend_handles_labels()
    bottom.legend(lines + rate_lines, labels + rate_labels, loc="upper right", fontsize=7)
    fig.tight_layout(rect=(0, _footer(fig, trace, 0.05), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(path: str, results: dict, runs: list[SystemRun]) -> None:
    """TTFT and TPOT distributions (CDFs) per system, and output tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ttft_ax, tpot_ax, speed_ax) = plt.subplots(1, 3, figsize=(12, 3.8))
    for run in runs:
        records = run.records[run.measured_from :]  # the window's requests (the pre-roll's left out)
        ttft = sorted(r.first_token_s - r.arrival_s for r in records)
        tpot = sorted((r.finish_s - r.first_token_s) / (len(r.tokens) - 1) for r in records if len(r.tokens) > 1)
        color = COLORS.get(run.name)
        if ttft:
            ttft_ax.step(
                np.array(ttft) * 1e3,
                np.linspace(0, 1, len(ttft), endpoint=False) + 1 / len(ttft),
                where="post",
                color=color,
                label=run.name,
            )
        if tpot:
            tpot_ax.step(
                np.array(tpot) * 1e3,
                np.linspace(0, 1, len(tpot), endpoint=False) + 1 / len(tpot),
                where="post",
                color=color,
                label=run.name,
            )
    for ax, label in ((ttft_ax, "time to first token (ms)"), (tpot_ax, "time per output token (ms)")):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        low, high = (max(v, 1e-9) for v in ax.dataLim.intervalx) if ax.lines else (1.0, 1.0)
        if high / low >= 20:  # a log axis only where it has labelled decades; else it shows no numbers
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    names = list(results["systems"])
    speeds = [results["systems"][n]["tokens_per_s"] for n in names]
    busy = [results["systems"][n]["busy_tokens_per_s"] for n in names]
    x = np.arange(len(names))
    speed_ax.bar(
        x - 0.2,
        speeds,
        0.4,
        color=[COLORS.get(n, "grey") for n in names],
        label="from the window's start" if results["trace"].get("window_start_s") else "over the replay",
    )
    speed_ax.bar(x + 0.2, busy, 0.4, color=[COLORS.get(n, "grey") for n in names], alpha=0.45, label="while busy")
    speed_ax.set_xticks(x, names, rotation=15, fontsize=8)
    speed_ax.set_ylabel("output tokens / s")
    speed_ax.set_ylim(0, max(speeds + busy + [1.0]) * 1.25)  # room above the bars for the legend
    speed_ax.legend(fontsize=7)
    fig.suptitle(f"Latency and throughput: {results['trace']['name']} trace, {results['model']['name']}", fontsize=10)
    fig.tight_layout(rect=(0, _footer(fig, results["trace"], 0.07), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prefix(path: str, results: dict, runs: list[SystemRun]) -> None:
    """Per Engine system: resident, live and prefix-cached KV bytes over time, the load's end
    and the cache's expiry after it marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [run for run in runs if run.name in ("elastic", "elastic-noprefix", "static")]
    fig, axes = plt.subplots(len(engines) or 1, 1, figsize=(10, 2.6 * max(1, len(engines))), sharex=True, squeeze=False)
    expiry = results["settings"]["prefix_expiry_s"]
    for ax, run in zip(axes[:, 0], engines):
        for column, label, color in ((1, "resident", "black"), (2, "live (held by requests)", "tab:blue")):
            xs, ys = _step_xy(run.samples, column, run.end_s)
            ax.step(xs, ys, where="post", color=color, label=label, linewidth=1.2)
        if run.cached_samples:
            xs = [t for t, _ in run.cached_samples] + [run.end_s]
            ys = [b / MIB for _, b in run.cached_samples]
            ax.step(xs, ys + ys[-1:], where="post", color="tab:orange", label="cached (no request holds them)")
        _mark_window(results, ax)
        ax.axvline(run.load_end_s, color="grey", linestyle="--", linewidth=1, label="last request done")
        if expiry is not None:
            ax.axvline(run.load_end_s + expiry, color="tab:orange", linestyle=":", linewidth=1, label="+ expiry")
        ax.set_ylabel(f"{run.name}\nKV MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since replay start")
    fig.suptitle(f"Cached vs live KV bytes: {results['trace']['name']} trace, {results['model']['name']}", fontsize=10)
    fig.tight_layout(rect=(0, _footer(fig, results["trace"], 0.06), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# writing


def write_outputs(out_dir: str, results: dict, runs: list[SystemRun]) -> list[str]:
    """Write every output into a temporary directory, then move them into ``out_dir`` together."""
    staging = tempfile.mkdtemp(prefix="ekv-bench-")
    try:
        with open(os.path.join(staging, "results.json"), "w") as handle:
            json.dump(_jsonable(results), handle, indent=1, allow_nan=False)
            handle.write("\n")
        with open(os.path.join(staging, "summary.md"), "w") as handle:
            handle.write(summary_markdown(results))
        plot_memory(os.path.join(staging, "memory.png"), results, runs)
        plot_latency(os.path.join(staging, "latency.png"), results, runs)
        names = list(OUTPUT_FILES)
        if results["trace"].get("ideal_hit_rate"):
            plot_prefix(os.path.join(staging, PREFIX_PLOT), results, runs)
            names.append(PREFIX_PLOT)
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for name in names:
            target = os.path.join(out_dir, name)
            shutil.move(os.path.join(staging, name), target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars become Python numbers; infinities are not allowed)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
