"""Command line of the benchmark: ``python -m torch_elastic_kv bench ...`` and ``ekv-bench ...``.

Every argument is checked before anything runs; a bad one ends the command with exit status 2
and one line on stderr (``ekv-bench: error: ...``), and nothing is written.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile

from .._units import SIZE_HELP, parse_size
from .settings import DEFAULT_SYSTEMS, PREFIX_DEFAULT_SYSTEMS, SYSTEM_NAMES, BenchSettings, ResolvedArgs
from .traces import (
    BUNDLED_TRACES,
    PREFIX_TRACES,
    SYNTHETIC_TRACES,
    TRACE_NAMES,
    TraceError,
    check_preroll,
    parse_window,
)

PROG = "ekv-bench"

# Mooncake on a 2-core CPU (quick, full): arrivals compressed (x1/4 over the first 20 s; x1/10 over
# the full run's window); each 512-token block becomes MOONCAKE_BLOCK_TOKENS tokens (one page) and
# outputs shrink likewise (at least traces.MOONCAKE_MIN_OUTPUT); the full run's pool is
# MOONCAKE_POOL_BYTES, room for the cache beside the live requests.
# The full run measures a server that has been running: the trace's conversations come back after
# minutes, so a window at the trace's start holds mostly first turns whose earlier turns never
# happened. It replays 1200-1800 s after a MOONCAKE_PREROLL_S pre-roll (600-1200 s, replayed first
# through every system and left out of every figure). The prefix cache expires after
# MOONCAKE_EXPIRY seconds of the replay: the bench's own choice, not the Engine's 300 s default.
# Full: 60 s, 600 s of trace time at x1/10, since most of the trace's reuse comes within 900 s of
# trace time; quick: 2 s, so its idle tail shows the cache kept and then given back. The full pool
# is 4 GiB, 32,768 blocks of llama-small's KV: at 2 GiB the pool rather than the expiry bounds what
# the cache can keep of the steady state (offline ideal hit rate of 1200-1800 s: 26.7 % at 2 GiB,
# 36.5 % at 4 GiB, 36.9 % unlimited at the 60 s expiry). The elastic pool maps only what it holds; static maps it all.
MOONCAKE_TIME_SCALE = {True: 1 / 4, False: 1 / 10}
MOONCAKE_BLOCK_TOKENS = {True: 16, False: 8}
MOONCAKE_EXPIRY = {True: 2.0, False: 60.0}
MOONCAKE_PREROLL_S = {True: 0.0, False: 600.0}
MOONCAKE_POOL_BYTES = 4 << 30
DEFAULT_PAGE_TOKENS = 16

# Defaults that depend on the trace: real traces are compressed and thinned to fit a small machine.
# (time_scale, token_scale, window, thin) for a full run and for --quick.
_REPLAY_DEFAULTS = {
    "azure-code": {False: (1 / 120, 1 / 16, "", 40), True: (1 / 100, 1 / 16, "0:300", 20)},
    # token scale: block_tokens / 512, set from --block-tokens
    "mooncake": {
        False: (MOONCAKE_TIME_SCALE[False], None, "1200:1800", 1),
        True: (MOONCAKE_TIME_SCALE[True], None, "0:20", 1),
    },
    "csv": {False: (1.0, 1.0, "", 1), True: (1.0, 1.0, "", 1)},
    "synthetic": {False: (1.0, 1.0, "", 1), True: (1.0, 1.0, "", 1)},
}


MIN_POOL_BYTES = 2 << 20  # one host granule: the smallest pool the Engine can build
MAX_HEADROOM = 10.0  # ElasticPolicy's own bound
MAX_PAGE_TOKENS = 4096  # longer pages only waste memory on short requests


class UsageError(Exception):
    """A bad command-line argument; the message is the one line printed."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _number(text: str) -> float:
    """A float, or a fraction written ``a/b`` (``--time-scale 1/120``)."""
    if re.fullmatch(r"\s*[-+0-9.eE]+\s*/\s*[-+0-9.eE]+\s*", text):
        numerator, denominator = text.split("/")
        value = float(numerator) / float(denominator)
    else:
        value = float(text)
    return value


# A value that starts with "-" but is not a plain negative number ("-1/2", "-5:10") would be taken
# for an option by argparse ("expected one argument"); written as --opt=VALUE it reaches the range
# checks, which name the option and the value.
_DASH_VALUE = re.compile(r"-[0-9.][-+0-9.eE/:]*")


def _attach_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and _DASH_VALUE.fullmatch(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def bench_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``bench`` arguments (every default left as None is resolved in :func:`resolve`)."""
    p = _Parser(
        prog=prog,
        description=(
            "Replay a request trace through the elastic KV Engine and the systems people use today; report "
            "KV memory over time (memory.png), latency (latency.png), a table and results.json."
        ),
    )
    p.add_argument(
        "--trace",
        default="bursty",
        help=f"{', '.join(TRACE_NAMES)}, or a CSV path with columns TIMESTAMP,ContextTokens,"
        "GeneratedTokens (default: bursty)",
    )
    p.add_argument(
        "--systems",
        help=f"comma-separated subset of {','.join(SYSTEM_NAMES)} (default: {','.join(DEFAULT_SYSTEMS)}; "
        f"with --trace mooncake {','.join(PREFIX_DEFAULT_SYSTEMS[False])}, all of them with --quick)",
    )
    p.add_argument(
        "--block-tokens",
        metavar="B",
        help="--trace mooncake: tokens each 512-token block of the trace becomes, a multiple of --page-tokens "
        f"(default {MOONCAKE_BLOCK_TOKENS[False]}, {MOONCAKE_BLOCK_TOKENS[True]} with --quick)",
    )
    p.add_argument(
        "--prefix-cache-expiry",
        metavar="S",
        help="the Engine's prefix cache gives up pages unused this long, in seconds of the replay (default: the "
        f"Engine's 300 s; --trace mooncake {MOONCAKE_EXPIRY[False]:g} s, i.e. "
        f"{MOONCAKE_EXPIRY[False] / MOONCAKE_TIME_SCALE[False]:g} s of trace time, within which most of the "
        f"trace's reuse falls; {MOONCAKE_EXPIRY[True]:g} s with --quick; the idle tail shows the cache kept "
        "until its expiry and given back after)",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH", help="local Hugging Face checkpoint directory (never the hub)")
    model.add_argument(
        "--config",
        choices=("tiny", "small", "1b"),
        help="Llama built from a config with random weights (default: small; tiny with --quick)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present, else cpu)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model and KV dtype (default: float32 on CPU, bfloat16/float16 on GPU)",
    )
    p.add_argument(
        "--time-scale",
        type=str,
        metavar="X",
        help="multiply arrival times by X (0.01 or 1/100 compresses 100x; default 1, azure-code 1/120)",
    )
    p.add_argument(
        "--token-scale",
        type=str,
        metavar="X",
        help="multiply prompt and output lengths by X (default 1, azure-code 1/16)",
    )
    p.add_argument(
        "--window",
        metavar="[START:]END",
        help="replay only requests arriving in this span of trace seconds (default: all; --trace mooncake "
        f"{_REPLAY_DEFAULTS['mooncake'][False][2]}, {_REPLAY_DEFAULTS['mooncake'][True][2]} with --quick)",
    )
    p.add_argument(
        "--preroll",
        metavar="S",
        help="replay the S trace seconds before the window's start first, at the same time scale, through "
        "every system, and leave those requests out of every figure (latency, tok/s, hit rates, KV mean/peak; "
        "the output checksum still covers them): the window then sees a system that has been running. At "
        "most the window's START (default 0; --trace mooncake "
        f"{MOONCAKE_PREROLL_S[False]:g}, or the window's START if less; 0 with --quick)",
    )
    p.add_argument("--thin", type=str, metavar="K", help="keep 1 in K requests (default 1, azure-code 40)")
    p.add_argument("--seed", type=str, default="0", help="seed for synthetic traces, prompts and weights (default 0)")
    p.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run (tiny model, short trace)")
    p.add_argument(
        "--max-bytes",
        metavar="SIZE",
        help="static pool size and elastic maximum (default: the smallest pool that holds the "
        "trace's max-running largest requests at once, rounded up to 2 MiB; --trace mooncake "
        f"{MOONCAKE_POOL_BYTES >> 30} GiB, the default with --quick)",
    )
    p.add_argument(
        "--min-bytes", metavar="SIZE", default="0", help=f"elastic minimum resident bytes (default 0); {SIZE_HELP}"
    )
    p.add_argument("--headroom", type=str, default="0.1", help="elastic headroom fraction (default 0.1)")
    p.add_argument(
        "--idle-seconds",
        type=str,
        metavar="S",
        help="elastic: shrink after demand stayed below resident this long (default 1.0; 0.3 quick)",
    )
    p.add_argument(
        "--tail-seconds",
        type=str,
        metavar="S",
        help="idle time measured after the last request (default: idle-seconds + 1.0; + 0.7 quick)",
    )
    p.add_argument("--max-running", type=str, metavar="N", help="most requests running at once (default 16; 8 quick)")
    p.add_argument(
        "--max-batch-tokens", type=str, metavar="N", default="1024", help="most tokens in one forward (default 1024)"
    )
    p.add_argument(
        "--page-tokens",
        type=str,
        metavar="N",
        help=f"tokens per KV page (default {DEFAULT_PAGE_TOKENS}; --trace mooncake: --block-tokens)",
    )
    p.add_argument(
        "--threads",
        type=str,
        metavar="N",
        help="torch CPU threads (default on CPU: cores - 1, at least 1, leaving a core for the "
        "engine's grower thread and the replay loop; else torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _positive(name: str, text: str, integer: bool = False, allow_zero: bool = False) -> float:
    try:
        value = int(text) if integer else _number(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{name} expects a {'whole ' if integer else ''}number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"{name} must be {bound}, got {text}")
    return value


def _check_out_dir(out: str) -> None:
    if not out.strip():
        raise UsageError("--out must name a directory, got ''")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create files under {probe} (permission denied)")
    # access() says yes to root everywhere, /sys and /proc included: make (and remove) a folder
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ekv-bench-probe-", dir=probe))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create files under {probe} ({exc.strerror})") from None


def _physical_memory_bytes() -> int | None:
    """RAM of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve(argv: list[str]) -> ResolvedArgs:
    """Parse and check ``bench`` arguments; raise :class:`UsageError` (one line) on the first problem."""
    import torch

    from .models import default_device, default_dtype
    from .traces import (
        AZURE_ATTRIBUTION,
        MOONCAKE_ATTRIBUTION,
        bundled_trace_path,
        read_mooncake,
        read_trace_csv,
    )

    args = bench_parser().parse_args(_attach_dash_values(argv))
    quick = args.quick

    prefix_trace = args.trace in PREFIX_TRACES
    if args.systems is None:
        args.systems = ",".join(PREFIX_DEFAULT_SYSTEMS[quick] if prefix_trace else DEFAULT_SYSTEMS)
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in SYSTEM_NAMES]
    if unknown or not systems:
        raise UsageError(
            f"unknown system(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"expected a comma-separated subset of {', '.join(SYSTEM_NAMES)}"
        )
    if len(set(systems)) != len(systems):
        raise UsageError(f"--systems lists a system twice: {args.systems}")

    # the trace: a name, or a CSV path that must be readable and have the right columns
    trace = args.trace
    attribution = None
    try:
        if trace in SYNTHETIC_TRACES:
            kind, raw, source = "synthetic", None, f"synthetic ({'quick' if quick else 'full'} shape)"
        elif trace in BUNDLED_TRACES:
            source = bundled_trace_path(trace)
            kind, raw, attribution = trace, read_trace_csv(source), AZURE_ATTRIBUTION
            source = f"torch_elastic_kv/data/{BUNDLED_TRACES[trace]}"
        elif prefix_trace:
            source = bundled_trace_path(trace)
            kind, raw, attribution = trace, read_mooncake(source), MOONCAKE_ATTRIBUTION
            source = f"torch_elastic_kv/data/{PREFIX_TRACES[trace]}"
        elif trace.lower().endswith(".csv") or os.path.sep in trace or os.path.exists(trace):
            kind, raw, source = "csv", read_trace_csv(trace), trace
        else:
            raise UsageError(
                f"unknown trace {trace!r}; expected one of {', '.join(TRACE_NAMES)} or a path to a .csv file"
            )
    except TraceError as exc:
        raise UsageError(str(exc)) from None

    d_time, d_token, d_window, d_thin = _REPLAY_DEFAULTS[kind][quick]
    time_scale = _positive("--time-scale", args.time_scale) if args.time_scale is not None else d_time
    block_tokens = prefix_expiry = None
    if args.prefix_cache_expiry is not None:
        prefix_expiry = _positive("--prefix-cache-expiry", args.prefix_cache_expiry, allow_zero=True)
    if prefix_trace:
        if args.token_scale is not None:
            raise UsageError("--token-scale does not apply to --trace mooncake: its blocks scale with --block-tokens")
        block_tokens = int(
            _positive("--block-tokens", args.block_tokens, integer=True)
            if args.block_tokens is not None
            else MOONCAKE_BLOCK_TOKENS[quick]
        )
        d_token = block_tokens / 512
        if prefix_expiry is None:
            prefix_expiry = MOONCAKE_EXPIRY[quick]
    elif args.block_tokens is not None:
        raise UsageError(f"--block-tokens applies to --trace mooncake only, not {trace!r}")
    token_scale = _positive("--token-scale", args.token_scale) if args.token_scale is not None else d_token
    thin = int(_positive("--thin", args.thin, integer=True)) if args.thin is not None else d_thin
    window_text = args.window if args.window is not None else d_window
    try:
        window = parse_window(window_text) if window_text else (0.0, None)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    if args.preroll is not None:
        preroll = _positive("--preroll", args.preroll, allow_zero=True)
        try:
            check_preroll(preroll, window[0])
        except TraceError as exc:
            raise UsageError(str(exc)) from None
    else:
        # the default pre-roll is as much of its span as the trace has before the window
        preroll = min(MOONCAKE_PREROLL_S[quick], window[0]) if prefix_trace else 0.0
    try:
        seed = int(args.seed)
    except ValueError:
        raise UsageError(f"--seed expects a whole number, got {args.seed!r}") from None
    if not 0 <= seed < 2**32:  # numpy's and torch's generators both take it
        raise UsageError(f"--seed must be in [0, 2**32), got {seed}")

    if args.max_bytes is None and prefix_trace and not quick:
        args.max_bytes = f"{MOONCAKE_POOL_BYTES >> 30}GiB"
    try:
        max_bytes = parse_size(args.max_bytes) if args.max_bytes is not None else None
        min_bytes = parse_size(args.min_bytes)
    except ValueError as exc:
        raise UsageError(f"--max-bytes/--min-bytes: {exc}") from None
    if max_bytes is not None and max_bytes < MIN_POOL_BYTES:
        raise UsageError(
            f"--max-bytes must be at least {MIN_POOL_BYTES >> 20} MiB (one KV pool chunk), got {args.max_bytes}"
        )
    physical = _physical_memory_bytes()
    for flag, text, value in (("--max-bytes", args.max_bytes, max_bytes), ("--min-bytes", args.min_bytes, min_bytes)):
        # the static system maps its whole pool at once: more than the machine has cannot run
        if value is not None and physical is not None and value > physical:
            raise UsageError(f"{flag} {text} is more than this machine's memory ({physical} bytes)")
    if max_bytes is not None and min_bytes > max_bytes:
        raise UsageError(f"--min-bytes {min_bytes} is above --max-bytes {max_bytes}")

    headroom = _positive("--headroom", args.headroom, allow_zero=True)
    if headroom > MAX_HEADROOM:
        raise UsageError(f"--headroom must be in [0, {MAX_HEADROOM:g}], got {args.headroom}")
    idle_seconds = (
        _positive("--idle-seconds", args.idle_seconds, allow_zero=True)
        if args.idle_seconds is not None
        else (0.3 if quick else 1.0)
    )
    if args.tail_seconds is not None:
        tail_seconds = _positive("--tail-seconds", args.tail_seconds, allow_zero=True)
    elif prefix_trace:
        # long enough to see the cache kept until its expiry and the pool back at its floor within
        # expiry + idle_seconds (the floor check's bound), then a margin: quick, a second expiry and
        # 0.7 s, as before; full, a tenth of the expiry (at least 1 s), not a second expiry (121 s a
        # system at the 60 s default, against 67 s)
        margin = prefix_expiry + 0.7 if quick else max(1.0, prefix_expiry / 10)
        tail_seconds = prefix_expiry + idle_seconds + margin
    else:
        tail_seconds = idle_seconds + (0.7 if quick else 1.0)
    max_running = (
        int(_positive("--max-running", args.max_running, integer=True))
        if args.max_running is not None
        else (8 if quick else 16)
    )
    max_batch_tokens = int(_positive("--max-batch-tokens", args.max_batch_tokens, integer=True))
    if args.page_tokens is not None:
        page_tokens = int(_positive("--page-tokens", args.page_tokens, integer=True))
    else:
        page_tokens = block_tokens if block_tokens is not None else DEFAULT_PAGE_TOKENS
    if page_tokens > MAX_PAGE_TOKENS:  # a page is allocated whole: 1e9 tokens asked for terabytes
        raise UsageError(f"--page-tokens must be at most {MAX_PAGE_TOKENS}, got {page_tokens}")
    if block_tokens is not None and block_tokens % page_tokens:
        # a block that ends inside a page would make equal blocks land in pages of different tokens
        raise UsageError(f"--block-tokens ({block_tokens}) must be a multiple of --page-tokens ({page_tokens})")

    device = args.device or default_device()
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a device (expected cpu, cuda or cuda:N)") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if torch_device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads is not None:
        threads = int(_positive("--threads", args.threads, integer=True))
        if threads > cores:  # libgomp crashes on absurd counts; more than the cores only slows down
            raise UsageError(f"--threads must be at most the {cores} cores this process may use, got {threads}")
    elif torch_device.type == "cpu":
        threads = max(1, cores - 1)
    else:
        threads = torch.get_num_threads()

    if args.model is not None and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a directory (a local Hugging Face checkpoint is needed)")
    config = args.config or ("tiny" if quick else "small")
    _check_out_dir(args.out)

    settings = BenchSettings(
        trace=trace,
        systems=systems,
        model_path=args.model,
        config=None if args.model else config,
        device=str(torch_device),
        dtype=dtype,
        seed=seed,
        out=args.out,
        quick=quick,
        time_scale=time_scale,
        token_scale=token_scale,
        window=window,
        thin=thin,
        max_bytes=max_bytes,
        min_bytes=min_bytes,
        headroom=headroom,
        idle_seconds=idle_seconds,
        tail_seconds=tail_seconds,
        max_running=max_running,
        max_batch_tokens=max_batch_tokens,
        page_tokens=page_tokens,
        sample_interval_s=0.01 if quick else 0.02,
        threads=threads,
        progress=not args.no_progress,
        block_tokens=block_tokens,
        prefix_expiry_s=prefix_expiry,
        preroll_s=preroll,
    )
    return ResolvedArgs(settings, raw, trace if kind != "csv" else os.path.basename(trace), source, attribution)


def _fail(message: str, status: int) -> int:
    first_line = " ".join(str(message).split())  # exactly one line, whatever the message held
    print(f"{PROG}: error: {first_line}", file=sys.stderr)
    return status


def _native_core_error() -> str | None:
    """Why the compiled core cannot be loaded (one message naming the fix), or None when it can."""
    try:
        from .. import _native  # noqa: F401
    except ImportError as exc:  # _native.NativeCoreMissing, or an ImportError inside torch itself
        return str(exc)
    return None


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ekv-bench``: run the benchmark, return the exit status."""
    from .run import run_bench
    from .traces import TraceError as _TraceError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        bench_parser().print_help()
        return 0
    core_error = _native_core_error()
    if core_error is not None:
        return _fail(core_error, 1)
    try:
        resolved = resolve(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    try:
        run_bench(resolved, command=[PROG, *argv])
    except (UsageError, _TraceError) as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing written", 130)
    except Exception as exc:  # a failure while running: one line, no partial outputs (see report.write_outputs)
        if os.environ.get("EKV_BENCH_TRACEBACK"):
            raise
        return _fail(f"{type(exc).__name__}: {exc} (set EKV_BENCH_TRACEBACK=1 for the traceback); nothing written", 1)
    return 0
