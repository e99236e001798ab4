"""The pure logic of benchmarks/bench_serve.py: schedule scaling, parsers, figures and floors.

(Its /metrics and /proc parsers are torch_elastic_kv.testing's, tested in test_load_sampling.py.)

No server runs here (the benchmark itself does that); each test feeds the functions known input
and checks the exact output.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from torch_elastic_kv.bench.traces import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_serve", None)


RAW = [
    TraceRequest(0.0, 1600, 10),
    TraceRequest(10.0, 320, 300),
    TraceRequest(20.0, 16, 1),
    TraceRequest(30.0, 8000, 40),
    TraceRequest(40.0, 800, 20),
]


def test_schedule_scales_time_prompts_and_outputs_separately(bench):
    schedule, scaling = bench.build_schedule(
        RAW,
        time_scale=0.5,
        prompt_scale=1 / 16,
        output_scale=2.0,
        thin=1,
        window=(0.0, None),
        max_prompt=400,
        max_output=128,
    )
    assert [r.arrival_s for r in schedule] == [0.0, 5.0, 10.0, 15.0, 20.0]
    # 8000/16 = 500 is cut to 400; 16/16 = 1
    assert [r.prompt_tokens for r in schedule] == [100, 20, 1, 400, 50]
    # 300*2 = 600 and 40*2 = 80 -> 128 cap on the first only
    assert [r.max_tokens for r in schedule] == [20, 128, 2, 80, 40]
    assert scaling["clipped_prompts"] == 1 and scaling["clipped_outputs"] == 1
    assert scaling["requests"] == 5 and scaling["source_requests"] == 5
    assert "time x1/2" in scaling["description"]
    assert "prompt lengths x1/16" in scaling["description"]
    assert "output lengths x2" in scaling["description"]
    assert "1 prompts cut to 400 tokens" in scaling["description"]


def test_schedule_window_thin_and_max_requests(bench):
    schedule, scaling = bench.build_schedule(
        RAW,
        time_scale=0.1,
        prompt_scale=1.0,
        output_scale=1.0,
        thin=2,
        window=(10.0, None),
        max_prompt=10_000,
        max_output=10_000,
        max_requests=1,
    )
    # window keeps t >= 10 (4 requests), thin 2 keeps the 1st and 3rd, max_requests the first
    assert schedule == [bench.ScheduledRequest(0.0, 320, 300)]
    assert "1 in 2 requests kept" in scaling["description"]
    assert "first 1 requests" in scaling["description"]
    two, _ = bench.build_schedule(
        RAW,
        time_scale=0.1,
        prompt_scale=1.0,
        output_scale=1.0,
        thin=2,
        window=(10.0, None),
        max_prompt=10_000,
        max_output=10_000,
    )
    assert [(r.arrival_s, r.prompt_tokens) for r in two] == [(0.0, 320), (pytest.approx(2.0), 8000)]


def test_schedule_rejects_bad_bounds(bench):
    kwargs = dict(time_scale=1.0, prompt_scale=1.0, output_scale=1.0, thin=1, window=(0.0, None))
    with pytest.raises(ValueError, match="max_prompt and max_output must be >= 1"):
        bench.build_schedule(RAW, max_prompt=0, max_output=10, **kwargs)
    with pytest.raises(ValueError, match="max_requests must be >= 1"):
        bench.build_schedule(RAW, max_prompt=10, max_output=10, max_requests=0, **kwargs)
    with pytest.raises(ValueError, match="time-scale must be a positive number"):
        bench.build_schedule(RAW, max_prompt=10, max_output=10, **{**kwargs, "time_scale": 0.0})


def test_kv_cache_blocks_matches_the_kv_size(bench):
    config = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64}
    # 2 * 4 layers * 4 heads * 64 * 4 bytes = 8 KiB per token; 32-token blocks of 256 KiB
    assert bench.kv_cache_blocks(64 * MIB, config, 4, 32) == 256
    assert bench.kv_cache_blocks(64 * MIB + 255 * 1024, config, 4, 32) == 256
    # grouped-query heads and head_dim from hidden_size
    gqa = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512}
    assert bench.kv_cache_blocks(1 * MIB, gqa, 2, 16) == 1 * MIB // (2 * 2 * 2 * 64 * 2 * 16)
    with pytest.raises(ValueError, match="hold no 32-token block"):
        bench.kv_cache_blocks(1000, config, 4, 32)


def test_parse_bytes(bench):
    assert bench.parse_bytes("64M") == 64 * MIB
    assert bench.parse_bytes("64MiB") == 64 * MIB
    assert bench.parse_bytes("2g") == 2 << 30
    assert bench.parse_bytes("512K") == 512 << 10
    assert bench.parse_bytes("1048576") == MIB
    for bad in ("", "M", "1.5M", "-1", "12Q"):
        with pytest.raises(ValueError):
            bench.parse_bytes(bad)


def test_request_figures(bench):
    rec = {"sent": 1.0, "first": 1.5, "last": 3.5, "end": 3.6, "output_tokens": 5}
    figs = bench.request_figures(rec)
    assert figs["ttft_s"] == pytest.approx(0.5)
    assert figs["tpot_s"] == pytest.approx(0.5)  # 2.0 s over 4 gaps
    assert figs["latency_s"] == pytest.approx(2.6)
    one = bench.request_figures({"sent": 0.0, "first": 0.2, "last": 0.2, "end": 0.3, "output_tokens": 1})
    assert one["ttft_s"] == pytest.approx(0.2) and one["tpot_s"] is None
    failed = bench.request_figures({"sent": 0.0, "first": 0.2, "end": 0.3, "output_tokens": 3, "error": "x"})
    assert failed == {"ttft_s": None, "tpot_s": None, "latency_s": None}


def test_level_and_chunk(bench):
    samples = [(-2.0, 10.0), (-1.0, 12.0), (0.0, 14.0), (5.0, 100.0)]
    assert bench.level(samples, -2.0, 0.0) == 12.0
    assert bench.level(samples, 1.0, 2.0) is None
    two_mib = 2 * MIB
    assert bench.chunk_from_resident([0, 3 * two_mib, 5 * two_mib, 4 * two_mib]) == two_mib
    assert bench.chunk_from_resident([0, 0]) is None


def _result(tok_s, ttft_p99, rss, shmem, chunk=2 * MIB):
    levels = {
        "rss": dict(zip(("pre", "peak", "after"), rss)),
        "rss_shmem": dict(zip(("pre", "peak", "after"), shmem)),
    }
    return {"output_tokens_per_s": tok_s, "ttft_p99_s": ttft_p99, "levels": levels, "chunk_bytes": chunk}


def _verdicts(bench, results):
    return {c["floor"].split(" [")[0]: c["met"] for c in bench.floors(results)}


THROUGHPUT = "ekv-elastic >= 2x hf-serve output tokens/s at an equal or lower TTFT p99"
WITHIN = "ekv-elastic output tokens/s within 3 % of ekv-static"


def test_floors_met(bench):
    m = MIB
    results = {
        "ekv-elastic": _result(300.0, 0.5, (400 * m, 460 * m, 401 * m), (0, 40 * m, 1 * m)),
        "ekv-static": _result(305.0, 0.5, (400 * m, 460 * m, 460 * m), (0, 40 * m, 40 * m), chunk=64 * m),
        "hf-serve": _result(100.0, 0.9, (1500 * m, 1560 * m, 1560 * m), (0, 0, 0), chunk=None),
    }
    v = _verdicts(bench, results)
    assert v[THROUGHPUT] is True
    assert v[WITHIN] is True
    assert v["ekv-elastic: RssShmem back within one chunk of its pre-load level"] is True
    assert v["ekv-elastic: VmRSS back within one chunk of its pre-load level"] is True
    assert v["ekv-static: RssShmem kept after the load (not back within one chunk of its pre-load level)"] is True
    assert v["hf-serve: VmRSS kept after the load (not back within one chunk of its pre-load level)"] is True
    # the chunk is the gcd of both servers' (2 MiB and 64 MiB)
    memory = [c for c in bench.floors(results) if c["floor"].startswith(("ekv-elastic:", "ekv-static:", "hf-serve:"))]
    assert len(memory) == 5
    assert all("chunk 2.0 MiB" in c["figures"] for c in memory)


def test_floors_not_met(bench):
    m = MIB
    results = {
        # slower than 2x and a worse TTFT p99; 3 MiB of shared memory and 30 MiB of RSS kept
        "ekv-elastic": _result(290.0, 1.0, (400 * m, 460 * m, 430 * m), (0, 40 * m, 3 * m)),
        "ekv-static": _result(305.0, 0.5, (400 * m, 460 * m, 460 * m), (0, 40 * m, 40 * m)),
        # back within a chunk of where it started
        "hf-serve": _result(200.0, 0.9, (1500 * m, 1560 * m, 1501 * m), (0, 0, 0), chunk=None),
    }
    v = _verdicts(bench, results)
    assert v[THROUGHPUT] is False
    assert v[WITHIN] is False  # 290 / 305 = 0.951
    assert v["ekv-elastic: RssShmem back within one chunk of its pre-load level"] is False
    assert v["ekv-elastic: VmRSS back within one chunk of its pre-load level"] is False
    assert v["hf-serve: VmRSS kept after the load (not back within one chunk of its pre-load level)"] is False


def test_floors_not_judged_without_growth_or_chunk(bench):
    m = MIB
    grew_nothing = {"ekv-elastic": _result(1.0, 0.1, (400 * m, 401 * m, 400 * m), (0, 1 * m, 0))}
    v = _verdicts(bench, grew_nothing)
    assert (
        v[
            "ekv-elastic: RssShmem back within one chunk of its pre-load level (it did not grow by a chunk: nothing to judge)"
        ]
        is None
    )
    no_chunk = {"ekv-elastic": _result(1.0, 0.1, (400 * m, 460 * m, 400 * m), (0, 40 * m, 0), chunk=None)}
    assert set(_verdicts(bench, no_chunk).values()) == {None}


def test_same_text_counts_matches_against_the_first_system(bench):
    def recs(*hashes):
        return {"records": [{"index": i, "text_sha1": h} for i, h in enumerate(hashes)]}

    results = {"a": recs("x", "y", "z"), "b": recs("x", "q", "z"), "c": recs(None, "y", None)}
    bench.same_text(results)
    assert results["a"]["same_text_as_first"] == {"reference": "a", "same": 3, "of": 3}
    assert results["b"]["same_text_as_first"] == {"reference": "a", "same": 2, "of": 3}
    # a failed request (no text) never counts as the same
    assert results["c"]["same_text_as_first"] == {"reference": "a", "same": 1, "of": 3}


# ------------------------------------------------------------- Mooncake, closed loop, vLLM, PSS


def test_mooncake_schedule_scales_blocks_and_keeps_prefixes(bench):
    raw = [
        TraceRequest(0.0, 1000, 10, (7, 8)),
        TraceRequest(8.0, 1024, 320, (7, 9)),
        TraceRequest(40.0, 60000, 64, tuple(range(100, 218))),  # 1875 tokens: cut to 1024
    ]
    schedule, scaling = bench.build_mooncake_schedule(
        raw, time_scale=0.25, block_tokens=16, window=(0.0, None), max_prompt=1024, max_output=8
    )
    assert [(r.arrival_s, r.prompt_tokens, r.max_tokens) for r in schedule] == [
        (0.0, 31, 4),
        (2.0, 32, 8),  # 320/32 = 10, cut to 8
        (10.0, 1024, 4),
    ]
    assert scaling["clipped_prompts"] == 1 and scaling["clipped_outputs"] == 1
    assert "each 512-token block -> 16 tokens drawn from its hash id" in scaling["description"]
    prompts = bench.mooncake_prompts(schedule, 16, seed=0)
    assert [len(p) for p in prompts] == [31, 32, 1024]
    assert prompts[0][:16] == prompts[1][:16] == bench.block_text(7, 16, 0)  # equal ids, equal text
    assert prompts[0][16:] == bench.block_text(8, 16, 0)[:15] and prompts[1][16:] == bench.block_text(9, 16, 0)
    assert prompts[2][:16] == bench.block_text(100, 16, 0) and prompts[2][-16:] == bench.block_text(163, 16, 0)


def test_a_preroll_is_marked_and_max_requests_cuts_the_window(bench):
    raw = [TraceRequest(float(t), 512 * (1 + t % 3), 64, tuple(range(t, t + 3))) for t in range(0, 40, 5)]  # 0..35 s
    schedule, scaling = bench.build_mooncake_schedule(
        raw, time_scale=0.5, block_tokens=16, window=(20.0, None), max_prompt=1024, max_output=8, preroll_s=10.0
    )
    # the pre-roll is 10 and 15 s, the window 20..35 s; the load starts at 10 s of the trace
    assert [(r.arrival_s, r.preroll) for r in schedule] == [
        (0.0, True),
        (2.5, True),
        (5.0, False),
        (7.5, False),
        (10.0, False),
        (12.5, False),
    ]
    assert schedule[0].hash_ids == (10, 11, 12) and schedule[2].hash_ids == (20, 21, 22)
    assert (scaling["preroll_s"], scaling["preroll_requests"], scaling["window_start_s"]) == (10.0, 2, 5.0)
    assert bench.window_start_s(schedule, scaling) == 5.0
    # max_requests keeps the pre-roll whole and the window's first requests
    cut, scaling = bench.build_mooncake_schedule(
        raw, time_scale=0.5, block_tokens=16, window=(20.0, None), max_prompt=1024, max_output=8, max_requests=1,
        preroll_s=10.0,
    )  # fmt: skip
    assert [r.preroll for r in cut] == [True, True, False] and "first 1 requests of the window" in scaling[
        "description"
    ]
    # the azure-code schedule takes the same pre-roll; none: nothing marked, the window at 0
    schedule, scaling = bench.build_schedule(
        RAW, time_scale=1.0, prompt_scale=1.0, output_scale=1.0, thin=1, window=(20.0, None), max_prompt=400,
        max_output=128, preroll_s=15.0,
    )  # fmt: skip
    assert [(r.arrival_s, r.preroll) for r in schedule] == [(5.0, True), (15.0, False), (25.0, False), (35.0, False)]
    assert bench.window_start_s(schedule, scaling) == 15.0
    plain, scaling = bench.build_schedule(
        RAW, time_scale=1.0, prompt_scale=1.0, output_scale=1.0, thin=1, window=(20.0, None), max_prompt=400,
        max_output=128,
    )  # fmt: skip
    assert not any(r.preroll for r in plain) and bench.window_start_s(plain, scaling) == 0.0
    assert [r.prompt_tokens for r in plain] == [r.prompt_tokens for r in schedule if not r.preroll]


def test_the_replay_reads_the_window_s_start_and_marks_the_preroll(bench):
    """replay() against no server: the requests fail at once, the window's callback still comes due."""
    import asyncio

    schedule = [
        bench.ScheduledRequest(0.0, 4, 2, preroll=True),
        bench.ScheduledRequest(0.05, 4, 2, preroll=False),
    ]
    seen = {}

    async def at_window(records):
        seen["preroll"] = [r["preroll"] for r in records]
        seen["sent"] = [("sent" in r) for r in records]

    records, _ = asyncio.run(
        bench.replay("http://127.0.0.1:9", "m", schedule, ["ab", "cd"], 5.0, 1.0, (0.05, at_window))
    )
    assert [r["preroll"] for r in records] == [True, False]
    assert seen["preroll"] == [True, False] and seen["sent"][0] is True


def test_mooncake_block_text_is_one_token_a_character(bench):
    from torch_elastic_kv.serve.default_model import build_default_tokenizer

    tok = build_default_tokenizer()
    text = bench.block_text(3, 16, 0) + bench.block_text(4, 16, 0)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 32


def test_prefix_counters_and_pss_parsers(bench):
    page = (
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n"
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0\n'
        "vllm:prefix_cache_hits_created 17.0\n"
    )
    assert bench.prefix_counters(page) == (1200.0, 300.0)
    assert bench.prefix_counters("ekv_kv_resident_bytes 0\n") == (None, None)
    rollup = "55d4-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  2048 kB\nPss:  1536 kB\nPss_Anon:  512 kB\n"
    assert bench.parse_smaps_rollup(rollup) == 1536 * 1024
    import os

    own = bench.tree_pss(os.getpid())
    assert own is not None and 0 < own <= bench.parse_smaps_rollup(open("/proc/self/smaps_rollup").read()) * 4


def _parse_error(bench, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--closed-clients", "0", "--closed-per-client", "4"], "--closed-clients: expected a whole number >= 1"),
        (["--closed-clients", "8"], "--closed-clients and --closed-per-client go together"),
        (["--closed-per-client", "x", "--closed-clients", "2"], "--closed-per-client: expected a whole number"),
        (["--vllm-python", "/nonexistent/bin/python"], "--vllm-python /nonexistent/bin/python: not an executable"),
        (["--trace", "sharegpt"], "argument --trace: invalid choice: 'sharegpt'"),
        (["--block-tokens", "-16"], "--block-tokens: expected a whole number >= 1, got '-16'"),
        (["--prefix-cache-expiry", "-1"], "--prefix-cache-expiry: expected a number >= 0, got '-1'"),
        (["--systems", "vllm,sglang"], "--systems: unknown sglang"),
        (["--preroll", "-5"], "argument --preroll: expected a number >= 0, got '-5'"),
        (["--preroll", "5"], "--preroll 5 reaches before the trace's start: the window starts at 0 s"),
        (["--trace", "mooncake", "--window", "300:900", "--preroll", "400"], "give at most 300, or a later --window"),
        (["--window", "10:20", "--preroll", "5", "--closed-clients", "2", "--closed-per-client", "2"], "closed"),
        (["--window", "x:20"], "--window 'x:20': expected END or START:END in seconds"),
    ],
)
def test_new_options_bad_values_exit_2_with_one_line(bench, capsys, argv, needle):
    code, err = _parse_error(bench, capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("bench_serve.py: error: ") or err[0].split(":")[1].strip() == "error", err[0]
    assert needle in err[0], err[0]


def test_vllm_is_skipped_with_a_note_without_vllm_python(bench, tmp_path):
    args = bench.parse_args(["--trace", "mooncake"])
    assert args.systems == ["ekv-elastic", "ekv-noprefix", "hf-serve", "vllm"]
    assert args.prefix_cache_expiry == 60.0 and args.time_scale == 0.1 and args.max_prompt == 1024
    assert (args.window, args.preroll, args.max_kv_bytes) == ("1200:1800", 600.0, 4 << 30)
    assert args.tail_seconds == 2 * 3.0 + 4 + 60.0  # past the expiry and the idle shrink
    quick = bench.parse_args(["--trace", "mooncake", "--quick"])
    assert (quick.window, quick.preroll, quick.time_scale, quick.prefix_cache_expiry, quick.max_kv_bytes) == (
        "0:20",
        0.0,
        0.25,
        8.0,
        64 << 20,
    )
    # another window gets as much of the default pre-roll as the trace has before it; none for azure-code
    assert bench.parse_args(["--trace", "mooncake", "--window", "200:800"]).preroll == 200.0
    assert bench.parse_args(["--trace", "mooncake", "--preroll", "0"]).preroll == 0.0
    assert bench.parse_args([]).preroll == 0.0
    assert bench.parse_args(["--window", "100:200", "--preroll", "100"]).preroll == 100.0
    assert bench.skipped_systems(args) == {"vllm": bench.VLLM_NOTE}
    assert "\n" not in bench.VLLM_NOTE and "--vllm-python" in bench.VLLM_NOTE
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    args = bench.parse_args(["--vllm-python", str(python), "--closed-clients", "8", "--closed-per-client", "16"])
    assert bench.skipped_systems(args) == {}
    assert (args.closed_clients, args.closed_per_client) == (8, 16)
    assert args.systems == ["ekv-elastic", "ekv-static", "hf-serve", "vllm"]
    argv, kv = bench.server_argv("vllm", args, tmp_path, 8123, {}, "key")
    assert argv[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(64 << 20) and "--enable-prefix-caching" in argv
    assert kv == {"kv_cache_memory_bytes": 64 << 20}
    argv, _ = bench.server_argv("ekv-noprefix", args, tmp_path, 0, {}, "key")
    assert "--no-enable-prefix-caching" in argv
    # --ekv-arg reaches our servers' command lines, in order, and nobody else's
    args = bench.parse_args(["--vllm-python", str(python), "--ekv-arg=--threads=2", "--ekv-arg=--compile"])
    for system in ("ekv-elastic", "ekv-static", "ekv-noprefix"):
        assert bench.server_argv(system, args, tmp_path, 0, {}, "key")[0][-2:] == ["--threads=2", "--compile"]
    assert "--compile" not in bench.server_argv("vllm", args, tmp_path, 8123, {}, "key")[0]


def test_prefix_floors(bench):
    def result(ttft, tps, texts):
        records = [{"text_sha1": t} for t in texts]
        return {"ttft_p50_s": ttft, "output_tokens_per_s": tps, "records": records}

    checks = bench.prefix_floors(
        {"ekv-elastic": result(0.1, 200.0, ["a", "b"]), "ekv-noprefix": result(0.4, 190.0, ["a", "b"])}
    )
    assert [c["met"] for c in checks] == [True, True, True]
    checks = bench.prefix_floors(
        {"ekv-elastic": result(0.3, 150.0, ["a", "c"]), "ekv-noprefix": result(0.4, 190.0, ["a", "b"])}
    )
    assert [c["met"] for c in checks] == [False, False, False]
    assert checks[2]["figures"] == "1/2 identical"
    assert bench.prefix_floors({"ekv-elastic": result(0.1, 1.0, [])}) == []
