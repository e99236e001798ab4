"""The benchmark's command line, traces, scaling and figures, without running a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_elastic_kv import __main__ as cli_main
from torch_elastic_kv.bench import cli
from torch_elastic_kv.bench.metrics import _union_length, output_checksum, time_weighted
from torch_elastic_kv.bench.traces import (
    TraceError,
    TraceRequest,
    bundled_trace_path,
    parse_window,
    prompt_token_ids,
    read_trace_csv,
    scale_trace,
    synthetic_requests,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli_main.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ekv-bench: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--trace", "spiky"], ["unknown trace 'spiky'", "bursty", "azure-code"]),
        (["--systems", "elastic,vllm"], ["unknown system(s) 'vllm'", "hf-generate-batch"]),
        (["--systems", "elastic,elastic"], ["twice"]),
        (["--time-scale", "-1"], ["--time-scale must be > 0, got -1"]),
        (["--time-scale", "0"], ["--time-scale must be > 0, got 0"]),
        (["--token-scale", "-0.5"], ["--token-scale must be > 0, got -0.5"]),
        (["--time-scale", "-1/2"], ["--time-scale must be > 0, got -1/2"]),  # not taken for an option
        (["--token-scale", "1/0"], ["--token-scale expects a number, got '1/0'"]),
        (["--time-scale", "nan"], ["--time-scale must be > 0, got nan"]),
        (["--window", "-5:10"], ["--window '-5:10'", "need 0 <= START < END"]),
        (["--thin", "-3"], ["--thin must be > 0, got -3"]),
        (["--token-scale", "abc"], ["--token-scale expects a number, got 'abc'"]),
        (["--thin", "0"], ["--thin must be > 0"]),
        (["--window", "50:10"], ["--window '50:10'", "START < END"]),
        (["--max-bytes", "12 parsecs"], ["--max-bytes"]),
        (["--min-bytes", "8MiB", "--max-bytes", "4MiB"], ["--min-bytes 8388608 is above --max-bytes 4194304"]),
        (["--idle-seconds", "-2"], ["--idle-seconds must be >= 0, got -2"]),
        (["--max-bytes", "1"], ["--max-bytes must be at least 2 MiB", "got 1"]),
        (["--max-bytes", "1" + "0" * 30], ["--max-bytes 1" + "0" * 30 + " is more than this machine's memory"]),
        (["--headroom", "100"], ["--headroom must be in [0, 10], got 100"]),
        (["--seed", str(2**70)], [f"--seed must be in [0, 2**32), got {2**70}"]),
        (["--threads", "100000"], ["--threads must be at most the", "got 100000"]),
        (["--page-tokens", "1000000000"], ["--page-tokens must be at most 4096, got 1000000000"]),
        (["--out", ""], ["--out must name a directory"]),
        (["--out", "/proc/ekv-bench-out"], ["--out /proc/ekv-bench-out: cannot create files under /proc"]),
        (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], ["--device"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["--model", "/nonexistent/model/dir"], ["--model /nonexistent/model/dir: not a directory"]),
        (["--preroll", "-5"], ["--preroll must be >= 0, got -5"]),
        (["--preroll", "soon"], ["--preroll expects a number, got 'soon'"]),
        (["--preroll", "inf", "--window", "5:9"], ["--preroll must be >= 0, got inf"]),
        (["--preroll", "1"], ["--preroll 1 reaches before the trace's start: the window starts at 0 s"]),
        (
            ["--trace", "azure-code", "--window", "30:60", "--preroll", "45"],
            ["--preroll 45 reaches before the trace's start", "window starts at 30 s", "give at most 30"],
        ),
    ],
)
def test_bad_arguments_fail_with_one_line_and_write_nothing(tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    status, stdout, err = _run_main(["bench", "--quick", "--out", str(out), *extra], capsys)
    _assert_one_line_error(status, err, *needles)
    assert not out.exists()
    assert stdout == ""


def test_unreadable_csv(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.csv"
    status, _, err = _run_main(["bench", "--trace", str(missing), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, f"cannot read trace {missing}", "No such file")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    status, _, err = _run_main(["bench", "--trace", str(binary), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, f"cannot read trace {binary}")
    assert not out.exists()


def test_csv_with_wrong_columns(tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt,output\n0.5,10,3\n")
    status, _, err = _run_main(["bench", "--trace", str(bad), "--out", str(out)], capsys)
    _assert_one_line_error(
        status, err, "missing column(s) TIMESTAMP, ContextTokens, GeneratedTokens", "found time, prompt, output"
    )
    rows = tmp_path / "rows.csv"
    rows.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,10,3\n0.7,ten,3\n")
    status, _, err = _run_main(["bench", "--trace", str(rows), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, "line 3")
    not_a_time = tmp_path / "nan.csv"
    not_a_time.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,10,3\nnan,10,3\n")
    status, _, err = _run_main(["bench", "--trace", str(not_a_time), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, "line 3", "TIMESTAMP must be a finite time")
    negative = tmp_path / "negative.csv"
    negative.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,10,-3\n")
    status, _, err = _run_main(["bench", "--trace", str(negative), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, "line 2", "GeneratedTokens=-3")
    empty = tmp_path / "empty.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    status, _, err = _run_main(["bench", "--trace", str(empty), "--out", str(out)], capsys)
    _assert_one_line_error(status, err, "no requests")
    assert not out.exists()


def test_csv_saved_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\n2.5,10,3\n1.0,7,2\n".encode())
    assert read_trace_csv(str(path)) == [TraceRequest(0.0, 7, 2), TraceRequest(1.5, 10, 3)]


def test_window_that_selects_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = _run_main(["bench", "--trace", "azure-code", "--window", "90000:90001", "--out", str(out)], capsys)
    assert status == 2, err
    assert "selects no requests" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    status, _, err = _run_main(["bench", "--quick", "--out", str(target)], capsys)
    _assert_one_line_error(status, err, "exists and is not a directory")
    assert target.read_text() == "keep me"


def test_module_entry_point_exit_status_and_single_line(tmp_path):
    """``python -m torch_elastic_kv bench`` is wired to the same checks."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "bench", "--trace", "nope", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ekv-bench: error: unknown trace 'nope'; expected one of steady, bursty, ramp, azure-code, mooncake or a path to "
        "a .csv file"
    ]
    assert not out.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "no-such-command"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown command 'no-such-command'" in proc.stderr


def _unbuilt_copy(tmp_path: Path) -> Path:
    """The package's Python files without the compiled core, as in a checkout nobody built."""
    import shutil

    import torch_elastic_kv

    source = Path(torch_elastic_kv.__file__).parent
    shutil.copytree(
        source, tmp_path / "torch_elastic_kv", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc")
    )
    return tmp_path / "torch_elastic_kv"


def test_missing_native_core_is_one_line_naming_the_fix(tmp_path):
    """Run from a folder holding an unbuilt package (the shadowing a flat layout allowed): one line
    saying what is wrong and how to fix it, exit 1, no traceback, nothing written."""
    package = _unbuilt_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "bench", "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"ekv-bench: error: torch_elastic_kv's compiled core (_C) cannot be loaded from {package} "
    ), lines[0]
    assert "pip install ." in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
    # As a library: the first use of the core raises the same message as an ImportError subclass.
    code = (
        "import torch_elastic_kv as e\n"
        "try:\n    e.Arena\nexcept ImportError as exc:\n    print(type(exc).__name__, '|', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    name, _, message = proc.stdout.strip().partition(" | ")
    assert name == "NativeCoreMissing" and "compiled core (_C)" in message and str(package) in message


# ---------------------------------------------------------------------------------- traces


def test_synthetic_traces_are_deterministic_by_seed():
    for kind in ("steady", "bursty", "ramp"):
        a, b = synthetic_requests(kind, 7), synthetic_requests(kind, 7)
        assert a == b and len(a) > 10
        assert a != synthetic_requests(kind, 8)
        assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
        assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in a)


def test_bursty_trace_has_idle_gaps():
    requests = synthetic_requests("bursty", 0)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    assert sum(gap > 3.0 for gap in gaps) == 2  # three bursts, two gaps of no arrivals
    quick = synthetic_requests("bursty", 0, quick=True)
    assert sum(b.arrival_s - a.arrival_s > 1.0 for a, b in zip(quick, quick[1:])) == 1


def test_azure_trace_is_packaged_with_attribution():
    path = bundled_trace_path("azure-code")
    requests = read_trace_csv(path)
    assert len(requests) == 8819
    assert requests[0].arrival_s == 0.0
    assert 3400 < requests[-1].arrival_s < 3500  # about an hour
    assert (requests[0].prompt_tokens, requests[0].output_tokens) == (4808, 10)
    readme = open(os.path.join(os.path.dirname(path), "TRACE_README.md")).read()
    assert "CC-BY 4.0" in readme and "Splitwise" in readme


def test_scaling_and_its_record():
    raw = [TraceRequest(float(t), 100 + t, 10 + t) for t in range(0, 100, 5)]  # 20 requests, 0..95 s
    trace = scale_trace(
        "x", "mem", raw, time_scale=0.1, token_scale=0.5, window=parse_window("10:60"), thin=2, max_total_tokens=70
    )
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])  # 10,20,..,50 s -> shifted, x0.1
    first = trace.requests[0]
    assert (first.prompt_tokens, first.output_tokens) == (55, 10)  # 110 * 0.5, 20 * 0.5: fits in 70
    # the others exceed 70 tokens: output cut to at most a quarter of the context, prompt to the rest
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests[1:]] == [(55, 15)] + [(53, 17)] * 3
    s = trace.scaling
    assert s["clipped_requests"] == 4 and s["thin"] == 2 and s["window_s"] == [10.0, 60.0]
    assert s["description"] == (
        "window 10-60 s of the trace; 1 in 2 requests kept; time x1/10; "
        "token counts x1/2; 4 requests cut to the model's 70-token context"
    )
    assert scale_trace("x", "mem", raw).scaling["description"] == "unscaled"
    with pytest.raises(TraceError, match="--time-scale must be a positive number, got -1"):
        scale_trace("x", "mem", raw, time_scale=-1)


def test_a_preroll_comes_first_and_the_window_is_unchanged():
    raw = [TraceRequest(float(t), 100 + t, 10 + t) for t in range(0, 100, 5)]  # 20 requests, 0..95 s
    plain = scale_trace("x", "mem", raw, time_scale=0.1, window=(40.0, 60.0), thin=2)
    trace = scale_trace("x", "mem", raw, time_scale=0.1, window=(40.0, 60.0), thin=2, preroll_s=20.0)
    # the pre-roll is 20-40 s (20 and 30 with thin 2), the window 40, 50; the replay starts at 20 s
    assert trace.preroll_requests == 2 and trace.window_start_s == pytest.approx(2.0)
    assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert [r.prompt_tokens for r in trace.requests] == [120, 130, 140, 150]
    # the window's requests are those it has without a pre-roll, 2 s later
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.measured] == [
        (r.prompt_tokens, r.output_tokens) for r in plain.requests
    ]
    assert [r.arrival_s - 2.0 for r in trace.measured] == pytest.approx([r.arrival_s for r in plain.requests])
    assert trace.scaling["preroll_s"] == 20.0 and trace.scaling["preroll_requests"] == 2
    assert (
        "after a 20 s pre-roll (20-40 s, 2 requests replayed first, left out of every figure)"
        in (trace.scaling["description"])
    )
    assert "(the first 2 the pre-roll; the window starts at 2.0 s)" in trace.describe()
    assert (plain.preroll_requests, plain.window_start_s, plain.measured) == (0, 0.0, plain.requests)
    with pytest.raises(TraceError, match=r"--preroll 41 reaches before the trace's start: the window starts at 40 s"):
        scale_trace("x", "mem", raw, window=(40.0, 60.0), preroll_s=41.0)
    with pytest.raises(TraceError, match=r"--preroll must be >= 0, got -1"):
        scale_trace("x", "mem", raw, window=(40.0, 60.0), preroll_s=-1.0)


def test_summarize_leaves_the_preroll_out_but_not_of_the_checksum():
    from torch_elastic_kv.bench.metrics import summarize
    from torch_elastic_kv.bench.replay import RequestRecord, SystemRun

    records = [
        RequestRecord(0.0, 2, [1, 2], [5.0, 6.0]),  # pre-roll: TTFT 5 s, would dominate every figure
        RequestRecord(0.5, 1, [3], [9.0]),  # pre-roll
        RequestRecord(2.0, 2, [4, 5], [2.1, 2.3]),  # the window: TTFT 0.1 s and 0.2 s
        RequestRecord(3.0, 3, [6, 7, 8], [3.2, 3.3, 4.0]),
    ]
    samples = [(0.0, 800, 800), (1.0, 400, 0), (2.5, 200, 100), (4.0, 0, 0)]
    run = SystemRun(
        "elastic",
        records,
        samples,
        load_end_s=9.0,
        end_s=10.0,
        counters={"preemptions": 3, "grows": 5, "shrinks": 4, "compactions": 0},
        info={},
        cached_samples=[(0.0, 600), (2.5, 50)],
        prefix={"prefix_query_tokens": 1000, "prefix_hit_tokens": 300, "prefix_evictions_expiry": 9},
        measured_from=2,
        window_start_s=2.0,
        at_window={
            "preemptions": 1,
            "grows": 2,
            "shrinks": 4,
            "compactions": 0,
            "prefix_query_tokens": 600,
            "prefix_hit_tokens": 100,
            "prefix_evictions_expiry": 4,
            "preroll_without_first_token": 1,
        },
    )
    s = summarize(run, static_bytes=1000)
    assert (s["requests"], s["preroll_requests"], s["replayed_requests"]) == (2, 2, 4)
    assert s["output_tokens"] == 5 and s["tokens_per_s"] == pytest.approx(5 / 7.0)  # from the window's start
    assert s["ttft_p50_s"] == pytest.approx(0.15) and s["ttft_p99_s"] < 0.21
    assert s["output_checksum"] == output_checksum([[1, 2], [3], [4, 5], [6, 7, 8]])
    # memory from 2 s on: 400 until 2.5 s, 200 until 4 s, then 0 until 10 s
    assert s["peak_resident_bytes"] == 400 and s["peak_live_bytes"] == 100
    assert s["mean_resident_bytes"] == pytest.approx((400 * 0.5 + 200 * 1.5) / 8.0)
    assert (s["preemptions"], s["grows"], s["shrinks"]) == (2, 3, 0)
    assert (s["prefix_query_tokens"], s["prefix_hit_tokens"], s["prefix_hit_rate"]) == (400, 200, 0.5)
    assert s["prefix_evictions"] == {"expiry": 5} and s["peak_cached_bytes"] == 600
    assert s["preroll_without_first_token_at_window"] == 1 and s["window_start_s"] == 2.0


def test_prompt_ids_are_deterministic_and_in_vocab():
    trace = scale_trace("q", "mem", synthetic_requests("steady", 3, quick=True))
    a = prompt_token_ids(trace, 100, seed=3)
    assert a == prompt_token_ids(trace, 100, seed=3)
    assert a != prompt_token_ids(trace, 100, seed=4)
    assert [len(p) for p in a] == [r.prompt_tokens for r in trace.requests]
    assert all(3 <= t < 100 for p in a for t in p)


def test_parse_size_and_fraction():
    assert cli.parse_size("4096") == 4096
    assert cli.parse_size("64MiB") == 64 << 20
    assert cli.parse_size("1.5G") == 3 << 29
    assert cli._number("1/120") == pytest.approx(1 / 120)
    with pytest.raises(ValueError, match="expected a byte count"):
        cli.parse_size("-3M")


# ---------------------------------------------------------------------------------- figures


def test_time_weighted_mean_and_busy_time():
    samples = [(0.0, 100, 0), (1.0, 300, 0), (3.0, 0, 0)]
    assert time_weighted(samples, 1, 4.0) == pytest.approx((100 * 1 + 300 * 2 + 0 * 1) / 4)
    assert _union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)


def test_checksum_depends_on_order_and_tokens():
    assert output_checksum([[1, 2], [3]]) == output_checksum([[1, 2], [3]])
    assert output_checksum([[1, 2], [3]]) != output_checksum([[3], [1, 2]])
    assert output_checksum([[1, 2], [3]]) != output_checksum([[1], [2, 3]])
    assert len(output_checksum([])) == 64


def test_non_editable_install_ships_the_bench_and_its_data():
    """``pip install .`` installs what pyproject lists: every subpackage, the trace and its README,
    and an ``ekv-bench`` script that resolves to the entry point (checked statically; building a
    wheel compiles the C++ core, too slow for the suite)."""
    import fnmatch
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself needs only 3.10

    project = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    package_root = Path(ROOT) / "src" / "torch_elastic_kv"
    packages = {
        "torch_elastic_kv" + "".join("." + part for part in p.parent.relative_to(package_root).parts)
        for p in package_root.rglob("__init__.py")
    }
    assert "torch_elastic_kv.bench" in packages
    assert packages <= set(tool["packages"]), packages - set(tool["packages"])
    globs = tool["package-data"]["torch_elastic_kv"]
    shipped = [str(p.relative_to(package_root)) for p in (package_root / "data").iterdir()]
    assert {"data/azure_llm_2023_code.csv", "data/TRACE_README.md"} <= set(shipped)
    for name in shipped:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in package-data {globs}"
    module, _, attr = project["project"]["scripts"]["ekv-bench"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.bench_main
