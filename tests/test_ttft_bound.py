"""benchmarks/ttft_bound.py: the ideal server's queue, and the tool's input checks.

The replay's arithmetic is checked against waits worked out by hand; the tool end to end on a
tiny saved model and a made-up schedule. No timing is asserted (the rates are the machine's).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from torch_elastic_kv.testing.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ttft_bound.py"


@pytest.fixture(scope="module")
def bound():
    spec = importlib.util.spec_from_file_location("ttft_bound", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fcfs_serves_in_arrival_order_one_at_a_time(bound):
    # 10 + 10 FLOP at t=0, 1 FLOP at t=5, 1 FLOP/s: done at 10, 20, 21
    assert bound.ideal_ttfts([0.0, 0.0, 5.0], [10.0, 10.0, 1.0], 1.0, "fcfs") == [10.0, 20.0, 16.0]


def test_fcfs_idles_until_the_next_arrival(bound):
    assert bound.ideal_ttfts([0.0, 30.0], [4.0, 4.0], 2.0, "fcfs") == [2.0, 2.0]


def test_an_arrival_at_the_instant_a_prefill_ends_waits_for_nothing(bound):
    for order in ("fcfs", "srpt"):
        assert bound.ideal_ttfts([0.0, 10.0], [10.0, 1.0], 1.0, order) == [10.0, 1.0]


def test_srpt_lets_a_short_arrival_preempt_a_long_prefill(bound):
    # at t=1 the first has 9 s left, the second 2: the second runs to t=3, the first to 12
    assert bound.ideal_ttfts([0.0, 1.0], [10.0, 2.0], 1.0, "srpt") == [12.0, 2.0]
    assert bound.ideal_ttfts([0.0, 20.0], [5.0, 5.0], 1.0, "srpt") == [5.0, 5.0]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_tool_prints_the_ideal_figures_and_the_floor(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    schedule = [
        {"arrival_s": 0.0, "prompt_tokens": 40, "max_tokens": 4},
        {"arrival_s": 0.001, "prompt_tokens": 24, "max_tokens": 4},
        {"arrival_s": 0.5, "prompt_tokens": 8, "max_tokens": 4},
    ]
    result = {
        "schedule": schedule,
        "model_dir": str(model_dir),
        "trace": {"closed_loop": None},
        "results": {"vllm": {"ttft_p99_s": 0.0625}, "ekv-elastic": {"ttft_p99_s": 0.125}},
    }
    path = tmp_path / "bench_serve.json"
    path.write_text(json.dumps(result))
    # a "python" without vLLM: its row is left out with the reason, the rest still runs
    no_vllm = tmp_path / "python"
    no_vllm.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'vllm'\" >&2\nexit 1\n")
    no_vllm.chmod(0o755)
    out = _run(str(path), "--repeats", "1", "--gflops", "0.001", "--vllm-python", str(no_vllm))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    (skipped,) = [line for line in lines if line.startswith("vLLM's prefill: not measured")]
    assert "vLLM's prefill run failed (exit 1)" in skipped and "No module named 'vllm'" in skipped
    assert lines[0].startswith(f"{path}: 3 requests, ")
    # at 1 MFLOP/s the tiny model's 40-token prefill alone takes seconds: both orders show it
    given = next(line for line in lines if line.startswith("| given | 0.0 |"))
    fcfs_p99, srpt_p99 = (float(cell.split("/")[1]) for cell in given.strip("|").split("|")[2:4])
    assert fcfs_p99 > 1000 and srpt_p99 > 1000
    assert sum(1 for line in lines if line.startswith("| matmul 1024^3")) == 2
    assert any(line.startswith("| our Engine's prefill, 1 thread |") for line in lines)
    assert "measured TTFT p99, ekv-elastic: 125.0 ms" in lines
    assert lines[-1] == "the floor (0.5x vLLM's): 31.2 ms"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gflops", "fast"], "--gflops: comma-separated numbers, got 'fast'"),
        (["--gflops", "0"], "--gflops: rates must be > 0, got '0'"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--vllm-python", "/nonexistent/python"], "--vllm-python: no such file '/nonexistent/python'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    out = _run(str(tmp_path / "absent.json"), *args)
    assert out.returncode == 2
    assert message in out.stderr


def test_a_file_that_is_no_result_exits_2(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    out = _run(str(path))
    assert out.returncode == 2
    assert f"{path}: not a bench_serve.py result" in out.stderr
    closed = tmp_path / "closed.json"
    closed.write_text(json.dumps({"schedule": [], "model_dir": "m", "trace": {"closed_loop": {"clients": 8}}}))
    out = _run(str(closed))
    assert out.returncode == 2
    assert "a closed-loop run; the bound is for open-loop arrivals" in out.stderr


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([{"arrival_s": 1.0, "prompt_tokens": 3}, {"arrival_s": 0.5, "prompt_tokens": 3}], "not in arrival order"),
        ([{"arrival_s": 0.0, "prompt_tokens": 3, "hash_ids": [7]}], "its prompts share prefixes (hash_ids)"),
        ([{"arrival_s": 0.0}], "not a bench_serve.py result (KeyError"),
        ([{"arrival_s": "soon", "prompt_tokens": 3}], "not a bench_serve.py result (ValueError"),
    ],
)
def test_a_schedule_the_replay_cannot_use_exits_2(tmp_path, schedule, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schedule": schedule, "model_dir": "m", "trace": {}}))
    out = _run(str(path))
    assert out.returncode == 2
    assert message in out.stderr


def test_an_empty_schedule_exits_2(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(
        json.dumps({"schedule": [{"arrival_s": 0, "prompt_tokens": 3, "preroll": True}], "model_dir": "m", "trace": {}})
    )
    out = _run(str(path))
    assert out.returncode == 2
    assert "its schedule has no requests outside the pre-roll" in out.stderr
