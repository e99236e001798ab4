"""The pure logic of benchmarks/bench_tenants.py: phases, model assignment, scaling, checks.

No servers, no timing: the load it builds from a trace, and the arguments it refuses.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from torch_elastic_kv.bench.traces import TraceError, TraceRequest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_tenants.py"
_spec = importlib.util.spec_from_file_location("bench_tenants", _PATH)
bt = importlib.util.module_from_spec(_spec)
sys.modules["bench_tenants"] = bt  # dataclasses resolve their module by name
_spec.loader.exec_module(bt)


def _raw(n: int, gap: float = 1.0, prompt: int = 800, output: int = 20) -> list[TraceRequest]:
    return [TraceRequest(i * gap, prompt + i, output + i) for i in range(n)]


def test_phase_of_splits_counts_evenly() -> None:
    assert [bt.phase_of(i, 9, 3) for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [bt.phase_of(i, 7, 3) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [bt.phase_of(i, 4, 1) for i in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="position 9 outside 0..8"):
        bt.phase_of(9, 9, 3)


def test_hot_model_turns() -> None:
    assert [bt.hot_model(p) for p in range(5)] == ["m0", "m1", "m2", "m0", "m1"]


def test_scale_length_rounds_and_clips() -> None:
    assert bt.scale_length(1469, 0.0625, 256) == 92
    assert bt.scale_length(7433, 0.0625, 256) == 256
    assert bt.scale_length(3, 0.0625, 256) == 1  # never zero tokens
    assert bt.scale_length(13, 4.0, 256) == 52


def test_build_load_window_scaling_and_phases() -> None:
    raw = _raw(30)
    shape = bt.LoadShape(
        window_start_s=6.0,
        window_s=18.0,
        time_scale=0.5,
        prompt_scale=0.25,
        output_scale=2.0,
        max_prompt=204,
        max_output=60,
        thin=2,
        phases=3,
        hot_share=1.0,
    )
    load = bt.build_load(raw, shape)
    # trace requests 6, 8, ..., 22 (window [6, 24), every second one)
    assert [r.arrival_s for r in load] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert [r.prompt_tokens for r in load] == [202, 202, 202, 203, 204, 204, 204, 204, 204]
    assert [r.output_tokens for r in load] == [52, 56, 60, 60, 60, 60, 60, 60, 60]
    assert [r.phase for r in load] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # hot_share 1: every request goes to its phase's hot model
    assert [r.model for r in load] == ["m0"] * 3 + ["m1"] * 3 + ["m2"] * 3
    assert all(r.hot for r in load)
    assert [r.index for r in load] == list(range(9))


def test_build_load_trickle_goes_to_the_other_models_and_is_seeded() -> None:
    raw = _raw(3000, gap=0.01)
    shape = bt.LoadShape(window_start_s=0.0, window_s=30.0, hot_share=0.8, phases=3, seed=4)
    load = bt.build_load(raw, shape)
    assert load == bt.build_load(raw, shape)  # identical for every system
    assert load != bt.build_load(raw, bt.LoadShape(window_start_s=0.0, window_s=30.0, hot_share=0.8, seed=5))
    for p in range(3):
        phase = [r for r in load if r.phase == p]
        hot = [r for r in phase if r.model == bt.hot_model(p)]
        assert all(r.hot for r in hot) and not any(r.hot for r in phase if r not in hot)
        # 1,000 draws at 0.8: far outside 0.74..0.86 is a broken split, not chance
        assert 0.74 < len(hot) / len(phase) < 0.86
        others = {r.model for r in phase if not r.hot}
        assert others == set(bt.MODELS) - {bt.hot_model(p)}


def test_build_load_rejects_bad_shapes() -> None:
    raw = _raw(10)
    with pytest.raises(TraceError, match="selects no requests"):
        bt.build_load(raw, bt.LoadShape(window_start_s=100.0, window_s=5.0))
    for bad, message in (
        (dict(time_scale=0.0), "time_scale must be a positive number"),
        (dict(window_s=float("inf")), "window_s must be a positive number"),
        (dict(thin=0), "thin must be >= 1"),
        (dict(phases=0), "phases must be >= 1"),
        (dict(hot_share=1.5), r"hot_share must be in \[0, 1\]"),
        (dict(max_output=0), "max_prompt and max_output must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            bt.build_load(raw, bt.LoadShape(window_start_s=0.0, **bad))


def test_prompt_ids_are_byte_tokens_of_the_requested_length() -> None:
    load = bt.build_load(_raw(20, prompt=40), bt.LoadShape(window_start_s=0.0, window_s=20.0, prompt_scale=1.0))
    ids = bt.prompt_ids(load, seed=1)
    assert [len(p) for p in ids] == [r.prompt_tokens for r in load]
    assert all(bt.VOCAB_LOW <= t < bt.VOCAB_HIGH for p in ids for t in p)
    assert ids == bt.prompt_ids(load, seed=1)


def test_server_args_per_system() -> None:
    settings = bt.parse_args(["--budget", "12M"])
    static = bt.server_args("static", "m1", 12 << 20, None, settings)
    assert static[static.index("--max-kv-bytes") + 1] == str(4 << 20)
    assert static[static.index("--min-kv-bytes") + 1] == str(4 << 20)
    assert static[static.index("--seed") + 1] == "1"
    capped = bt.server_args("capped", "m1", 12 << 20, None, settings)
    assert capped[capped.index("--min-kv-bytes") + 1] == "0"
    assert "--broker" not in capped
    brokered = bt.server_args("broker", "m2", 12 << 20, Path("/tmp/x.sock"), settings)
    assert brokered[brokered.index("--max-kv-bytes") + 1] == str(12 << 20)
    assert brokered[brokered.index("--tenant") + 1] == "m2"
    with pytest.raises(ValueError, match="unknown system"):
        bt.server_args("shared", "m0", 12 << 20, None, settings)


def test_parse_args_refuses_requests_larger_than_a_static_share(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bt.parse_args(["--budget", "12M", "--max-prompt", "400", "--max-output", "200"])
    assert exc.value.code == 2
    assert "must fit budget/3 (512 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.parse_args(["--systems", "static,shared"])


def test_parse_metrics_reads_ekv_samples() -> None:
    text = (
        "# HELP ekv_kv_resident_bytes KV memory mapped\n"
        "# TYPE ekv_kv_resident_bytes gauge\n"
        "ekv_kv_resident_bytes 4194304.0\n"
        "ekv_preemptions_total 7.0\n"
        'ekv_requests_total{finish_reason="length"} 3.0\n'
        "python_gc_objects_collected_total 12.0\n"
    )
    m = bt.parse_metrics(text)
    assert m["ekv_kv_resident_bytes"] == 4194304.0
    assert m["ekv_preemptions_total"] == 7.0
    assert "python_gc_objects_collected_total" not in m
