"""The prepared GPU check (benchmarks/gpu_check.py) in --dry-run, and the driver probe under it.

The dry run is the same script a GPU machine runs, on CPU with the fake CUDA driver, so the
script cannot rot while no device is at hand. It runs once per module (in a subprocess, as a
user would run it); each test checks one part of what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
MiB = 1 << 20


def _run(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    from torch_elastic_kv.testing import fake_cuda_path

    full_env = {**os.environ, "EKV_LIBCUDA": fake_cuda_path(), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", "--quick", "--no-build", *extra],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=150,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out)
    path = out / "gpu_results.json"
    assert path.exists(), f"no gpu_results.json; rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(path.read_text())


def _num(x: Any, lo: float, hi: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def test_exits_zero_and_prints_the_table_last(dry_run):
    proc, res = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("steps failed: none"), lines[-1]
    header = next(i for i, line in enumerate(lines) if line.startswith("check ") and "verdict" in line)
    table = "\n".join(lines[header:])
    for row in (
        "cuMemCreate per 2 MiB",
        "cuMemMap per 2 MiB",
        "cuMemSetAccess per 2 MiB",
        "cuMemUnmap per 2 MiB",
        "arena grow per granule",
        "decode tokens/s elastic / static",
        "idle footprint (held) vs floor",
        "unmap waits for queued work",
    ):
        assert row in table, f"row {row!r} missing from the table:\n{table}"
    assert res["failed_steps"] == []
    assert res["mode"] == "dry-run-quick"
    assert len(res["table"]) >= 15


def test_every_step_ran(dry_run):
    _, res = dry_run
    steps = res["steps"]
    assert steps["build"] == {"status": "ok", "skipped": "--no-build", "seconds": steps["build"]["seconds"]}
    # tests/gpu skips without a GPU: counted, none failed
    assert steps["gpu_tests"]["status"] in ("ok", "unavailable")
    if steps["gpu_tests"]["status"] == "ok":
        g = steps["gpu_tests"]
        assert g["failures"] == g["errors"] == 0 and g["skipped"] == g["tests"] > 0
    for name in ("driver", "arena", "allocator", "parity", "engine", "stream_order"):
        assert steps[name]["status"] == "ok", (name, steps[name].get("error"), steps[name].get("traceback"))
        assert _num(steps[name]["seconds"], 0, 120)


def test_tensor_parallel_step_says_it_needs_two_gpus(dry_run):
    _, res = dry_run
    tp = res["steps"]["tp"]
    assert tp["status"] == "unavailable"
    assert tp["error"] == "skipped: 0 GPUs (tensor parallel needs 2)"


def test_driver_costs_per_call(dry_run):
    _, res = dry_run
    d = res["steps"]["driver"]
    n = res["settings"]["probe_granules"]
    g = d["granule"]
    assert g["is_fake"] is True and g["granularity"] == 2 * MiB and g["handle_bytes"] == 2 * MiB
    assert g["range_bytes"] == n * 2 * MiB
    for call in ("create", "map", "set_access", "unmap", "release"):
        s = g[f"{call}_us"]
        assert s["n"] == n, (call, s)
        assert _num(s["median"], 0.01, 1e6) and s["min"] <= s["median"] <= s["p90"] <= s["p99"], (call, s)
        assert _num(g["per_2mib_us"][call], 0.01, 1e6)
    assert g["reserve_us"]["n"] == 8 and g["address_free_us"]["n"] == 8
    for call in ("create", "record", "query", "destroy"):  # one event per handle
        s = g[f"event_{call}_us"]
        assert s["n"] == n and _num(s["median"], 0.001, 1e6), (call, s)
    large = d["large"]
    assert large["handle_bytes"] == 16 * 2 * MiB
    # per 2 MiB of a 32 MiB handle is the handle's time / 16
    assert large["per_2mib_us"]["create"] == pytest.approx(large["create_us"]["median"] / 16)


def test_parity_compares_the_engine_with_generate(dry_run):
    _, res = dry_run
    p = res["steps"]["parity"]
    f, m = p["float32"], p["model"]
    assert f["requests"] == 6 and f["identical_requests"] == 6 and f["dtype"] == "torch.float32"
    assert m["requests"] == 4 and m["first_token_equal"] == 4
    assert 0 <= m["logit_max_diff_over_std"] <= 0.05 and p["ok"] is True


def test_arena_reuse_skips_create(dry_run):
    _, res = dry_run
    a = res["steps"]["arena"]
    rounds = res["settings"]["arena_rounds"]
    r, n = a["reuse"], a["no_reuse"]
    assert r["creates"] == r["granules"] and r["reuses"] == r["granules"] * rounds
    assert n["creates"] == n["granules"] * (rounds + 1) and n["releases"] == n["creates"]
    assert r["held_bytes_after"] == r["granules"] * r["granularity"]  # the reuse cache holds them
    assert n["held_bytes_after"] == 0
    # creating a handle (memfd + fallocate on the fake) costs far more than mapping a cached one
    # (best rounds compared: a descheduled round on a shared machine says nothing about either)
    assert _num(a["reuse_over_create"], 0, 100)
    assert r["grow_us_per_granule"]["min"] < 0.5 * n["grow_us_per_granule"]["min"]
    assert r["verified_bytes"] > 0


def test_allocator_pairs_and_trim(dry_run):
    _, res = dry_run
    al = res["steps"]["allocator"]
    for key in ("c_abi_pairs_per_s", "c_abi_host_pairs_per_s", "torch_caching_pairs_per_s"):
        assert _num(al[key], 1, 1e9), (key, al[key])
    tr = al["trim"]
    assert tr["bytes"] == res["settings"]["trim_bytes"]
    assert tr["released_bytes"] >= tr["bytes"] and _num(tr["seconds"], 0, 30)


def test_engine_elastic_vs_static(dry_run):
    _, res = dry_run
    en = res["steps"]["engine"]
    wl = res["settings"]["workload"]
    e, s = en["elastic"], en["static"]
    for run in (e, s):
        assert not run["truncated"]
        assert run["tokens_generated"] > 0 and run["preemptions"] == 0
        assert _num(run["tokens_per_s"], 1e-3, 1e9) and _num(run["decode_tokens_per_s"], 1e-3, 1e9)
        assert run["ttft_ms"]["n"] == wl["requests"]  # every request timed
        for key in ("ttft_ms", "tpot_ms"):
            assert run[key]["n"] > 0 and 0 <= run[key]["median"] <= run[key]["p99"] < 60_000
        assert len(run["resident_over_time"]) >= 2
        assert len(run["idle_phases"]) == wl["bursts"]
    # static, elastic, elastic, static: the same greedy workload, the same tokens out of each run
    assert len(en["repeats"]["static"]) == len(en["repeats"]["elastic"]) == 1
    runs = [s, e, *en["repeats"]["static"], *en["repeats"]["elastic"]]
    assert len({r["tokens_generated"] for r in runs}) == 1
    assert en["repeats"]["elastic"][0]["idle_held_bytes"] == e["floor_bytes"]
    d = en["decode_tokens_per_s"]
    assert d["static"] == pytest.approx(sum(en["decode_tokens_per_s_runs"]["static"]) / 2)
    assert en["decode_ratio"] == pytest.approx(d["elastic"] / d["static"])
    ds = en["decode_tokens_per_s_runs"]["static"]
    assert en["static_aa_decode_ratio"] == pytest.approx(ds[1] / ds[0])  # the A/A noise figure
    # static: the whole pool mapped from start to end; elastic: back at its floor when idle
    assert s["resident_at_start"] == s["peak_resident_bytes"] == s["idle_resident_bytes"]
    assert s["peak_resident_bytes"] >= wl["pool_bytes"] - s["chunk_bytes"]
    assert e["floor_bytes"] == -(-wl["min_bytes"] // e["chunk_bytes"]) * e["chunk_bytes"]
    assert e["idle_held_bytes"] == e["floor_bytes"] and en["idle_at_floor"] is True
    # the elastic pool grew past its floor under load and gave it back when idle ...
    assert e["floor_bytes"] < e["peak_resident_bytes"] < s["peak_resident_bytes"]
    assert e["grow_events"] >= 1 and e["shrink_events"] >= 1
    assert e["idle_phases"][0]["pool_gave_back"] > 0
    # ... to the OS: the process holds no more shared memory than the floor above its start
    assert en["memory_went_back"] is True and en["shmem_above_start_at_idle"] <= e["floor_bytes"]


def test_stream_order_check(dry_run):
    _, res = dry_run
    so = res["steps"]["stream_order"]
    assert so["pending_after_unmap"] == so["bytes"] == so["pending_after_poll_while_busy"]
    assert so["pending_after_completion"] == 0


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    # a driver library that cannot be loaded: the cuda steps fail, the run goes on, exit 1
    proc = _run(
        tmp_path, "--steps", "build,driver,stream_order", env={"EKV_LIBCUDA": str(tmp_path / "no_such_libcuda.so")}
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert set(res["steps"]) == {"build", "driver", "stream_order"}
    for name in ("driver", "stream_order"):
        assert res["steps"][name]["status"] == "failed"
        assert "no_such_libcuda.so" in res["steps"][name]["error"]
    assert res["steps"]["build"]["status"] == "ok"
    assert res["failed_steps"] == ["driver", "stream_order"]
    assert proc.stdout.strip().splitlines()[-1].startswith("steps failed: driver, stream_order")


# -- the driver probe itself (csrc/core/driver_probe.cpp), on the fake driver --------------------


def test_probe_gives_everything_back_when_a_call_fails(fake_cuda):
    from torch_elastic_kv import _C

    for fn in ("cuMemAddressReserve", "cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease"):
        fake_cuda.reset()
        fake_cuda.fail_nth(fn, 3, 1)  # CUDA_ERROR_INVALID_VALUE on the third call
        with pytest.raises(RuntimeError, match=f"probe_driver: {fn}.*CUDA_ERROR_INVALID_VALUE.*cuda:0"):
            _C.probe_driver(0, 6)
        assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}, fn


def test_probe_rejects_bad_arguments(fake_cuda):
    from torch_elastic_kv import _C

    with pytest.raises(ValueError, match="granules=0"):
        _C.probe_driver(0, 0)
    with pytest.raises(ValueError, match="granules=-1 must be >= 0"):
        _C.probe_driver(0, -1)
    with pytest.raises(ValueError, match="cuda:2 does not exist: the driver reports 1 device"):
        _C.probe_driver(2, 4)
    r = _C.probe_driver(0, 3, 2, 1)
    assert r["handle_bytes"] == 4 * MiB and len(r["create_us"]) == 3 and len(r["reserve_us"]) == 1
    assert fake_cuda.create_count() == 3 and fake_cuda.release_count() == 3
    assert fake_cuda.counts()["handles"] == 0


def test_step_time_split(dry_run):
    """The split step: every phase of the Engine's step timed, the forward synchronized; the
    compiled run is for a GPU (skipped, with a reason, in the dry run)."""
    _, res = dry_run
    sp = res["steps"]["split"]
    assert sp["status"] == "ok", sp
    eager = sp["eager"]
    ms = eager["ms_per_step"]
    assert set(ms) == {"schedule", "pack", "forward", "sample", "postprocess", "memory"}
    assert all(_num(v, 0, 60_000) for v in ms.values()), ms
    assert ms["forward"] > 0 and eager["steps"] >= 2 and eager["decode_steps"] >= 1
    assert eager["compile"] is False and eager["compile_seconds"] == 0
    assert sp["compiled"] == {"skipped": "dry run: no compilation on CPU here"}
    assert sp["cuda_graphs"] is False
    assert any(row[0] == "step split eager (ms/step)" for row in res["table"])
