"""benchmarks/bench_prefill_attention.py: one row per length and system, the kernel checked
against SDPA before it is timed, and bad flags exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torch_elastic_kv.hf.prefill_attention import isa_levels

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_prefill_attention.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_rows_for_every_length_and_level(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--lengths", "5,17", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--repeats", "2"]
    done = _run(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    names = {4: "native avx512", 3: "native avx2", 1: "native portable"}
    systems = ["torch sdpa"] + [names[level] for level in isa_levels()]
    assert [(r["n"], r["system"]) for r in rows] == [(n, s) for n in (5, 17) for s in systems]
    assert all(r["us"] > 0 and r["gflops"] > 0 for r in rows)
    assert [r["speedup"] for r in rows if r["system"] == "torch sdpa"] == [1.0, 1.0]
    assert "causal prefill attention: heads 4, kv heads 2, head dim 8, 1 thread(s), median of 2" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "8,x"], "expected comma-separated integers, got '8,x'"),
        (["--lengths", "0"], "expected integers >= 1, got '0'"),
        (["--threads", "1,2"], "expected one integer >= 1, got '1,2'"),
        (["--heads", "6", "--kv-heads", "4"], "--heads 6 is not a multiple of --kv-heads 4"),
    ],
)
def test_bad_flags_exit_2(args, message):
    done = _run(*args)
    assert done.returncode == 2
    assert message in done.stderr
