"""``bench --trace mooncake``: the trace scaled to the model, the offline ideal hit rate, and a
quick replay whose tokens are identical with the prefix cache on and off."""

from __future__ import annotations

import json
import os

import pytest

from torch_elastic_kv import __main__ as cli_main
from torch_elastic_kv.bench.traces import (
    MOONCAKE_ATTRIBUTION,
    Trace,
    TraceRequest,
    block_prompt_ids,
    block_tokens_for,
    bundled_trace_path,
    ideal_hit_rate,
    read_mooncake,
    scale_trace,
)


def test_mooncake_trace_is_packaged_with_attribution():
    path = bundled_trace_path("mooncake")
    requests = read_mooncake(path)
    assert len(requests) == 12031
    first = requests[0]
    assert (first.arrival_s, first.prompt_tokens, first.output_tokens) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert 3500 < requests[-1].arrival_s < 3600  # an hour, timestamps in ms
    readme = open(os.path.join(os.path.dirname(path), "TRACE_README.md")).read()
    assert "Apache License 2.0" in readme and "FAST 2025" in readme and "mooncake_conversation.jsonl" in readme
    assert "Apache License 2.0" in MOONCAKE_ATTRIBUTION


def test_bad_mooncake_lines_name_the_file_and_line(tmp_path):
    from torch_elastic_kv.bench.traces import TraceError

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{"timestamp": 5}\n')
    with pytest.raises(TraceError, match=r"t.jsonl: line 2: cannot parse \(KeyError"):
        read_mooncake(str(path))
    path.write_text('{"timestamp": 0, "input_length": 1025, "output_length": 2, "hash_ids": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"line 1: 2 hash ids cover fewer than input_length=1025"):
        read_mooncake(str(path))


def test_blocks_scale_to_b_tokens_drawn_from_their_hash_ids():
    raw = [
        TraceRequest(0.0, 1000, 10, (7, 8)),  # 1000/32 = 31.25 -> 31 tokens: block 7 whole, block 8 partial
        TraceRequest(2.0, 1024, 320, (7, 9)),  # 32 tokens: block 7, then block 9
        TraceRequest(4.0, 300, 64, (5,)),  # 9 tokens of block 5
    ]
    trace = scale_trace("mooncake", "", raw, time_scale=0.5, token_scale=16 / 512, min_output_tokens=4, block_tokens=16)
    assert [r.prompt_tokens for r in trace.requests] == [31, 32, 9]
    assert [r.output_tokens for r in trace.requests] == [4, 10, 4]  # 10/32 and 64/32 are below the floor
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.0, 2.0]
    assert [r.hash_ids for r in trace.requests] == [(7, 8), (7, 9), (5,)]
    assert trace.scaling["block_tokens"] == 16 and trace.scaling["min_output_tokens"] == 4
    assert "each 512-token block -> 16 tokens drawn from its hash id" in trace.scaling["description"]

    prompts = block_prompt_ids(trace, 16, vocab_size=512, seed=0)
    assert [len(p) for p in prompts] == [31, 32, 9]
    assert prompts[0][:16] == prompts[1][:16] == block_tokens_for(7, 16, 512, 0)  # equal ids -> equal tokens
    assert prompts[0][16:] == block_tokens_for(8, 16, 512, 0)[:15]
    assert prompts[1][16:] == block_tokens_for(9, 16, 512, 0)
    assert prompts[1][16:] != prompts[0][16:31] + [prompts[1][31]]
    assert prompts[2] == block_tokens_for(5, 16, 512, 0)[:9]
    assert all(3 <= t < 512 for p in prompts for t in p)
    assert block_prompt_ids(trace, 16, 512, 0) == prompts  # deterministic
    assert block_prompt_ids(trace, 16, 512, 1)[0] != prompts[0]  # the seed changes every block


def _hand_trace() -> Trace:
    requests = (
        TraceRequest(0.0, 8, 1, (1, 2)),
        TraceRequest(1.0, 10, 1, (1, 2, 3)),
        TraceRequest(2.0, 8, 1, (1, 2)),
        TraceRequest(3.0, 12, 1, (1, 4, 5)),
        TraceRequest(10.0, 8, 1, (1, 2)),
    )
    return Trace("hand", "", requests, scaling={"description": ""})


def test_ideal_hit_rate_on_a_hand_made_trace():
    trace = _hand_trace()  # B = 4 tokens a block, pages of 2 tokens: 46 prompt tokens in all
    # unlimited: 0 + 8 + 6 (the last token is always computed: 3 pages of 8 tokens) + 4 (block 1) + 6
    assert ideal_hit_rate(trace, 4, 2, None) == {
        "capacity_blocks": None,
        "expiry_s": None,
        "preroll_requests": 0,
        "query_tokens": 46,
        "hit_tokens": 24,
        "hit_rate": 24 / 46,
    }
    # two blocks: request 3 leaves (4, 1) cached (block 2 least recently used, gone); request 4 hits block 1 only
    assert ideal_hit_rate(trace, 4, 2, 2)["hit_tokens"] == 22
    # an expiry of 5 s: request 4 comes 7 s after the last use of anything
    assert ideal_hit_rate(trace, 4, 2, None, expiry_s=5.0)["hit_tokens"] == 18
    assert ideal_hit_rate(trace, 4, 2, 0)["hit_tokens"] == 0
    with pytest.raises(ValueError, match=r"block_tokens \(3\) must be a positive multiple of page_tokens \(2\)"):
        ideal_hit_rate(trace, 3, 2, None)


def test_ideal_hit_rate_counts_the_window_after_its_preroll():
    # a conversation whose first turn is in the pre-roll: its second turn, in the window, hits it
    requests = (
        TraceRequest(0.0, 8, 1, (1, 2)),  # pre-roll: fills the LRU, not counted
        TraceRequest(1.0, 12, 1, (1, 2, 3)),  # the window: 8 of its 12 tokens cached
        TraceRequest(2.0, 4, 1, (9,)),  # a first turn: nothing to hit (its one block is the last token's)
    )
    with_preroll = Trace("hand", "", requests, scaling={"description": ""}, preroll_requests=1, window_start_s=1.0)
    got = ideal_hit_rate(with_preroll, 4, 2, None)
    assert (got["query_tokens"], got["hit_tokens"], got["preroll_requests"]) == (16, 8, 1)
    assert got["hit_rate"] == 0.5
    # the same window replayed cold: the second turn finds nothing
    cold = Trace("hand", "", requests[1:], scaling={"description": ""})
    assert ideal_hit_rate(cold, 4, 2, None)["hit_tokens"] == 0
    # the pre-roll's blocks count against the capacity and expire like the window's
    assert ideal_hit_rate(with_preroll, 4, 2, 1)["hit_tokens"] == 4  # block 2 evicted, block 1 left
    assert ideal_hit_rate(with_preroll, 4, 2, None, expiry_s=1.0)["hit_tokens"] == 0


@pytest.fixture(scope="module")
def quick_mooncake(tmp_path_factory):
    out = tmp_path_factory.mktemp("mooncake") / "out"
    argv = ["bench", "--trace", "mooncake", "--quick", "--systems", "elastic,elastic-noprefix"]
    status = cli_main.main([*argv, "--out", str(out), "--no-progress"])
    assert status == 0
    with open(out / "results.json") as handle:
        return out, json.load(handle)


def test_quick_mooncake_tokens_identical_with_the_cache_on_and_off(quick_mooncake):
    out, results = quick_mooncake
    on, off = results["systems"]["elastic"], results["systems"]["elastic-noprefix"]
    assert on["output_checksum"] == off["output_checksum"]
    assert on["output_tokens"] == off["output_tokens"] == results["trace"]["output_tokens"]
    # the cache was used: hits counted, cached pages seen; without it, no figures
    assert 0 < on["prefix_hit_tokens"] <= on["prefix_query_tokens"]
    assert on["prefix_hit_rate"] == on["prefix_hit_tokens"] / on["prefix_query_tokens"]
    assert on["peak_cached_bytes"] > 0
    assert off["prefix_hit_rate"] is None and off["peak_cached_bytes"] is None
    assert sorted(p.name for p in out.iterdir()) == [
        "latency.png",
        "memory.png",
        "prefix_cache.png",
        "results.json",
        "summary.md",
    ]
    assert (out / "prefix_cache.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_mooncake_says_b_the_scaling_and_the_ideal(quick_mooncake):
    out, results = quick_mooncake
    assert results["settings"]["block_tokens"] == 16
    assert results["settings"]["prefix_expiry_s"] == 2.0
    assert results["trace"]["attribution"] == MOONCAKE_ATTRIBUTION
    ideal = results["trace"]["ideal_hit_rate"]
    assert set(ideal) == {"lru", "lru_expiry", "unlimited"}
    assert ideal["lru"]["query_tokens"] == results["trace"]["prompt_tokens"]
    summary = (out / "summary.md").read_text()
    assert "B = 16 tokens per 512-token block" in summary
    assert "window 0-20 s of the trace; time x1/4" in summary
    assert "[MET] every request's tokens identical with the cache on and off" in summary


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--block-tokens", "24", "--page-tokens", "16"],
            "--block-tokens (24) must be a multiple of --page-tokens (16)",
        ),
        (["--block-tokens", "0"], "--block-tokens must be > 0, got 0"),
        (["--token-scale", "0.5"], "--token-scale does not apply to --trace mooncake"),
        (["--prefix-cache-expiry", "-1"], "--prefix-cache-expiry must be >= 0, got -1"),
        (["--systems", "elastic,nope"], "unknown system(s) 'nope'"),
        (["--preroll", "-5"], "--preroll must be >= 0, got -5"),
        (["--preroll", "5"], "--preroll 5 reaches before the trace's start: the window starts at 0 s"),
        (["--preroll", "700", "--window", "600:900"], "give at most 600, or a later --window START"),
    ],
)
def test_bad_mooncake_arguments_fail_with_one_line(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    status = cli_main.main(["bench", "--trace", "mooncake", "--quick", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("ekv-bench: error: ")
    assert needle in err[0], err[0]
    assert not out.exists()


def test_block_tokens_needs_the_mooncake_trace(tmp_path, capsys):
    status = cli_main.main(["bench", "--quick", "--block-tokens", "16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "ekv-bench: error: --block-tokens applies to --trace mooncake only, not 'bursty'"


def test_full_mooncake_defaults_replay_a_warm_window_with_room_for_the_cache(tmp_path):
    from torch_elastic_kv.bench.cli import resolve

    s = resolve(["--trace", "mooncake", "--out", str(tmp_path / "o")]).settings
    assert (s.window, s.preroll_s, s.time_scale, s.block_tokens, s.page_tokens) == ((1200.0, 1800.0), 600.0, 0.1, 8, 8)
    assert s.max_bytes == 4 << 30 and s.prefix_expiry_s == 60.0
    # the tail covers the idle floor's bound (expiry + idle_seconds) and a tenth of the expiry
    assert s.tail_seconds == pytest.approx(60.0 + 1.0 + 6.0)
    assert s.systems == ("elastic", "elastic-noprefix", "static")
    # explicit values win, and the quick run keeps its own
    s = resolve(["--trace", "mooncake", "--out", str(tmp_path / "o"), "--page-tokens", "4", "--max-bytes", "64Mi"])
    assert (s.settings.page_tokens, s.settings.max_bytes) == (4, 64 << 20)
    q = resolve(["--trace", "mooncake", "--quick", "--out", str(tmp_path / "o")]).settings
    assert (q.window, q.preroll_s, q.block_tokens, q.page_tokens, q.max_bytes) == ((0.0, 20.0), 0.0, 16, 16, None)
    assert (q.prefix_expiry_s, q.tail_seconds) == (2.0, pytest.approx(2 * 2.0 + 0.3 + 0.7))
    assert "hf-generate" in q.systems
    # another window: the default pre-roll is as much of its 600 s as the trace has before it
    w = resolve(["--trace", "mooncake", "--window", "300:900", "--out", str(tmp_path / "o")]).settings
    assert (w.window, w.preroll_s) == ((300.0, 900.0), 300.0)
    w = resolve(["--trace", "mooncake", "--window", "0:600", "--out", str(tmp_path / "o")]).settings
    assert w.preroll_s == 0.0
    w = resolve(["--trace", "mooncake", "--preroll", "0", "--out", str(tmp_path / "o")]).settings
    assert (w.window, w.preroll_s) == ((1200.0, 1800.0), 0.0)


@pytest.fixture(scope="module")
def preroll_mooncake(tmp_path_factory):
    out = tmp_path_factory.mktemp("preroll") / "out"
    argv = ["bench", "--trace", "mooncake", "--quick", "--window", "4:10", "--preroll", "4"]
    status = cli_main.main([*argv, "--systems", "elastic,elastic-noprefix", "--out", str(out), "--no-progress"])
    assert status == 0
    with open(out / "results.json") as handle:
        return out, json.load(handle)


def test_a_preroll_is_replayed_but_left_out_of_the_figures(preroll_mooncake):
    out, results = preroll_mooncake
    raw = read_mooncake(bundled_trace_path("mooncake"))
    window = [r for r in raw if 4.0 <= r.arrival_s < 10.0]
    preroll = [r for r in raw if r.arrival_s < 4.0]
    assert window and preroll
    trace = results["trace"]
    assert trace["requests"] == len(window) and trace["preroll"]["requests"] == len(preroll)
    assert trace["window_start_s"] == pytest.approx(4.0 / 4)  # x1/4
    assert results["settings"]["preroll_s"] == 4.0
    for name, s in results["systems"].items():
        assert (s["requests"], s["preroll_requests"]) == (len(window), len(preroll)), name
        assert s["replayed_requests"] == len(window) + len(preroll), name
        assert s["output_tokens"] == trace["output_tokens"], name
    on, off = results["systems"]["elastic"], results["systems"]["elastic-noprefix"]
    # tokens checked over every request, the pre-roll's included
    assert on["output_checksum"] == off["output_checksum"]
    # the hit rate counts the window's lookups: at least its prompts, and, when every pre-roll
    # request had started by then and nothing was preempted, exactly them
    assert on["prefix_query_tokens"] >= trace["prompt_tokens"]
    if on["preroll_without_first_token_at_window"] == 0 and on["preemptions"] == 0:
        assert on["prefix_query_tokens"] == trace["prompt_tokens"]
    assert trace["ideal_hit_rate"]["lru"]["query_tokens"] == trace["prompt_tokens"]
    assert trace["ideal_hit_rate"]["lru"]["preroll_requests"] == len(preroll)
    summary = (out / "summary.md").read_text()
    assert f"Pre-roll: the 4 s of the trace before the window ({len(preroll)} requests" in summary
    assert f"after a 4 s pre-roll (0-4 s, {len(preroll)} requests replayed first" in summary
