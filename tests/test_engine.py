"""Engine on the real KVPagePool and ElasticPagedCache: outputs, memory, budget, steady load.

One workload (32 requests, prompts of 5-200 tokens, max_new_tokens 1-64) is checked token by
token against ``model.generate`` with DynamicCache for each prompt alone; the references are
computed once per module. The clock is injected, so idleness is a number, not a sleep.

The model is tiny in compute but has wide K/V (2 layers x 4 KV heads x head_dim 128, fp32),
so one 16-token page is 128 KiB and a 2 MiB host granule holds 16 pages: the workload spans
many granules and growing, shrinking and compaction are visible in /proc.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.engine.runner import ModelRunner
from torch_elastic_kv.testing import ManualClock, rss_shmem
from torch_elastic_kv.testing.models import tiny_llama

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def workload():
    g = torch.Generator().manual_seed(1234)
    lens = torch.randint(5, 201, (32,), generator=g).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    max_new = torch.randint(1, 65, (32,), generator=g).tolist()
    return prompts, max_new


@pytest.fixture(scope="module")
def references(model, workload):
    prompts, max_new = workload
    out = []
    with torch.no_grad():
        for p, n in zip(prompts, max_new):
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
            out.append(ids[0, len(p) :].tolist())
    return out


def run_staggered(eng: Engine, clock: ManualClock, prompts, max_new, per_step=2, dt=0.01, on_step=None) -> list[int]:
    """Add ``per_step`` requests before each step until all are in; step until done."""
    rids: list[int] = []
    i = 0
    while i < len(prompts) or eng.has_unfinished():
        for _ in range(per_step):
            if i < len(prompts):
                rids.append(eng.add_request(prompts[i], max_new[i]))
                i += 1
        eng.step()
        clock.t += dt
        if on_step is not None:
            on_step(eng)
    return rids


def test_32_staggered_requests_match_generate_and_memory_follows_demand(model, workload, references):
    prompts, max_new = workload
    clock = ManualClock(1000.0)
    policy = ElasticPolicy(min_bytes=3 * MiB, max_bytes=24 * MiB, headroom=0.1, idle_seconds=5.0, clock=clock)
    # memory follows demand alone: no prefix cache keeping finished requests' pages until expiry
    eng = Engine(model, policy=policy, max_batch_tokens=256, background=False, prefix_caching=False)
    granule = eng.stats()["resident_bytes"]  # min_bytes -> 2 granules of 2 MiB
    assert granule == 4 * MiB
    peak = {"resident": 0, "live": 0}

    def watch(e: Engine) -> None:
        st = e.stats()
        assert st["resident_bytes"] <= 24 * MiB, st
        assert st["live_bytes"] <= st["resident_bytes"]
        peak["resident"] = max(peak["resident"], st["resident_bytes"])
        peak["live"] = max(peak["live"], st["live_bytes"])

    rids = run_staggered(eng, clock, prompts, max_new, on_step=watch)
    for rid, ref in zip(rids, references):
        assert eng.output_ids(rid) == ref, rid
    assert peak["resident"] > 8 * MiB and peak["live"] > 8 * MiB  # it did grow
    assert all(e["resident_bytes"] <= 24 * MiB for e in eng.timeline)

    # idle: nothing changes before idle_seconds, then resident falls to min_bytes rounded up
    # to whole granules (one arena here) and the process's shared memory drops with it
    before = eng.stats()
    rss_before = rss_shmem()
    assert before["live_bytes"] == 0 and before["resident_bytes"] > 4 * MiB
    clock.t += 4.0
    eng.step()
    assert eng.stats()["resident_bytes"] == before["resident_bytes"]
    clock.t += 1.1
    eng.step()
    after = eng.stats()
    assert after["resident_bytes"] == 4 * MiB
    dropped = rss_before - rss_shmem()
    given = before["resident_bytes"] - after["resident_bytes"]
    # every granule given back had been written (pages of live requests), so it was resident
    assert dropped >= given // 2, (dropped, given)
    assert after["shrink_events"] >= 1
    eng.close()


def test_budget_cut_to_30_percent_mid_run_preempts_by_swap_and_recompute(model, workload, references):
    prompts, max_new = workload
    clock = ManualClock(1000.0)
    policy = ElasticPolicy(max_bytes=64 * MiB, idle_seconds=5.0, swap_bytes=4 * MiB, clock=clock)
    eng = Engine(model, policy=policy, max_batch_tokens=512, background=False)
    state = {"cut": None, "steps": 0}

    def cut(e: Engine) -> None:
        state["steps"] += 1
        st = e.stats()
        if state["cut"] is None and st["waiting"] == 0 and st["running"] >= 16:
            e.set_budget(int(st["live_bytes"] * 0.3))
            state["cut"] = st["live_bytes"]
            after = e.stats()
            assert after["live_bytes"] <= 0.3 * st["live_bytes"]
            assert after["resident_bytes"] <= 0.3 * st["live_bytes"]
            assert after["preemptions"] > 0
            state["after_cut"] = state["steps"]
        elif state["cut"] is not None and state["steps"] <= state["after_cut"] + 40:
            assert e.stats()["resident_bytes"] <= 0.3 * state["cut"]
            if state["steps"] == state["after_cut"] + 40:
                e.set_budget(None)  # restored: the rest runs under max_bytes again

    rids = run_staggered(eng, clock, prompts, max_new, per_step=8, on_step=cut)
    assert state["cut"] is not None, "live never reached the cut point"
    for rid, ref in zip(rids, references):
        assert eng.output_ids(rid) == ref, rid
    st = eng.stats()
    assert st["finished"] == 32 and st["live_bytes"] == 0
    assert st["swap_preemptions"] >= 1 and st["recompute_preemptions"] >= 1
    assert st["preemptions"] == st["swap_preemptions"] + st["recompute_preemptions"]
    assert st["swap_ins"] == st["swap_outs"] and st["swap_used_bytes"] == 0
    assert max(i["preemptions"] for i in eng.requests_info()) >= 1
    eng.close()


def test_steady_load_shrinks_at_most_once(model):
    clock = ManualClock(1000.0)
    policy = ElasticPolicy(max_bytes=64 * MiB, idle_seconds=2.0, headroom=0.1, clock=clock)
    # memory follows demand alone: no prefix cache keeping finished requests' pages until expiry
    eng = Engine(model, policy=policy, max_batch_tokens=256, background=False, prefix_caching=False)
    g = torch.Generator().manual_seed(7)
    for step in range(240):
        if step % 2 == 0 and step < 200:  # one request every 2 steps (0.2 s), then drain
            n = int(torch.randint(20, 60, (1,), generator=g))
            eng.add_request(torch.randint(3, 256, (n,), generator=g).tolist(), 16)
        eng.step()
        clock.t += 0.1
    st = eng.stats()
    assert st["finished"] == 100
    # the steady part (after warm-up, before draining) must not give memory back
    steady = [e for e in eng.timeline if 1000.0 + 4.0 <= e["t"] <= 1000.0 + 20.0]
    assert steady and min(e["live_bytes"] for e in steady) > 0
    assert st["shrink_events"] <= 1, st
    # the memory work is timed inside the steps: some of their time, never more than all of it
    assert 0 < st["policy_seconds"] < sum(e["step_seconds"] for e in eng.timeline)
    # and the one shrink is the return to the floor once the arrivals stopped
    assert st["resident_bytes"] == 0 and all(e["resident_bytes"] > 0 for e in steady)
    eng.close()


def test_grower_thread_maps_ahead_of_the_step(model):
    policy = ElasticPolicy(max_bytes=32 * MiB, idle_seconds=60.0)
    eng = Engine(
        model, policy=policy, max_batch_tokens=256, background=True, grow_in_background=True
    )  # on CPU the default grows inline
    try:
        assert eng.stats()["resident_bytes"] == 0
        eng.add_request(list(range(3, 203)), 4)  # 200 tokens: 13 pages, one granule
        deadline = time.monotonic() + 1.0
        while eng.stats()["resident_bytes"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # mapped by the grower before any step ran
        assert eng.stats()["resident_bytes"] >= 13 * eng.pool.page_bytes
        assert eng.stats()["steps"] == 0 and eng.stats()["grow_events"] >= 1
        # adding from another thread while this one steps
        done = threading.Event()

        def add_more():
            for k in range(4):
                eng.add_request(list(range(3, 20 + k)), 3)
            done.set()

        threading.Thread(target=add_more).start()
        while not done.is_set() or eng.has_unfinished():
            eng.step()
        assert eng.stats()["finished"] == 5
    finally:
        eng.close()


def test_bad_input_on_the_real_engine_and_it_keeps_serving(model):
    policy = ElasticPolicy(max_bytes=4 * MiB)  # 2 granules = 32 pages = 512 tokens
    eng = Engine(model, policy=policy, background=False)
    ok = eng.add_request([5, 6, 7], 2)
    with pytest.raises(ValueError, match=r"needs 38 KV pages .* allows 32 pages"):
        eng.add_request([3] * 500, 100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([3, 256], 2)
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request([], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        eng.add_request([3], 0)
    with pytest.raises(ValueError, match="unknown request id 99"):
        eng.cancel(99)
    assert (
        eng.generate([[9, 8, 7]], 3)[0]
        == model.generate(torch.tensor([[9, 8, 7]]), max_new_tokens=3, do_sample=False)[0, 3:].tolist()
    )
    assert eng.request_info(ok)["status"] == "finished"
    eng.close()


BAD_SAMPLING = [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1e-45}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 1.0, "seed": 2**64}, "seed"),
    ({"temperature": 1.0, "seed": -1}, "seed"),
    ({"temperature": 1.0, "seed": 1.5}, "seed"),
    ({"temperature": 1.0, "seed": "abc"}, "seed"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p"),
    ({"temperature": 1.0, "top_k": -1}, "top_k"),
]


@pytest.mark.parametrize("sampling,field", BAD_SAMPLING, ids=[f"{f}={s[f]!r}" for s, f in BAD_SAMPLING])
def test_bad_sampling_is_refused_at_add_request_and_nothing_is_queued(model, sampling, field):
    eng = Engine(model, policy=ElasticPolicy(max_bytes=4 * MiB), background=False)
    try:
        with pytest.raises(ValueError, match=f"{field} must be"):
            eng.add_request([5, 6, 7], 2, sampling=sampling)
        assert not eng.has_unfinished() and eng.stats()["waiting"] == 0
    finally:
        eng.close()


def test_a_seed_of_time_ns_size_samples_and_a_failing_sampler_ends_only_its_request(model, monkeypatch):
    """A seed near 2**63 used to overflow the generator seed and make every step raise; and a
    sampler that still fails at run time ends that request alone (finish reason "error")."""
    eng = Engine(model, policy=ElasticPolicy(max_bytes=4 * MiB), background=False)
    big = eng.add_request([5, 6, 7], 4, sampling={"temperature": 1.0, "seed": time.time_ns()})
    top = eng.add_request([5, 6, 7], 4, sampling={"temperature": 1.0, "seed": 2**64 - 1})
    original = ModelRunner.filtered_probs

    def failing(logits, requests):
        probs, order = original(logits, requests)
        for row, request in enumerate(requests):
            if request.sampling.seed == 13:
                probs[row, 0] = float("nan")  # what a model that overflowed in one row hands the sampler
        return probs, order

    monkeypatch.setattr(ModelRunner, "filtered_probs", staticmethod(failing))
    bad = eng.add_request([9, 8, 7], 4, sampling={"temperature": 1.0, "seed": 13})
    greedy = eng.add_request([9, 8, 7], 5)
    while eng.has_unfinished():
        eng.step()
    info = {rid: eng.request_info(rid) for rid in (big, top, bad, greedy)}
    assert info[bad]["finish_reason"] == "error" and info[bad]["output_tokens"] == 0
    for rid in (big, top):
        assert info[rid]["finish_reason"] == "length" and info[rid]["output_tokens"] == 4
    ref = model.generate(torch.tensor([[9, 8, 7]]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert eng.generate([[9, 8, 7]], 5)[0] == ref
    assert eng.stats()["live_bytes"] == 0
    eng.close()


def test_every_entry_point_of_a_closed_engine_says_it_is_closed(model):
    eng = Engine(model, policy=ElasticPolicy(max_bytes=4 * MiB), background=False)
    rid = eng.add_request([5, 6, 7], 2)
    while eng.has_unfinished():
        eng.step()
    before = eng.stats()
    eng.close()
    calls = {
        "add_request": lambda: eng.add_request([5, 6, 7], 2),
        "step": eng.step,
        "generate": lambda: eng.generate([[5, 6, 7]], 2),
        "stream": lambda: next(eng.stream(), None),
        "maintain": eng.maintain,
        "set_budget": lambda: eng.set_budget(2 * MiB),
        "cancel": lambda: eng.cancel(rid),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^Engine\.{name}: the Engine is closed$"):
            call()
    after = eng.stats()  # still answers: the figures at close, its own pool's memory given back
    assert after["closed"] is True and after["finished"] == before["finished"] == 1
    assert after["tokens_generated"] == before["tokens_generated"] == 2
    assert after["resident_bytes"] == 0 and after["live_bytes"] == 0
    eng.close()  # a second close is a no-op
    assert eng.request_info(rid)["status"] == "finished"


def test_a_stream_left_early_loses_no_token(model):
    prompts = [[5, 6, 7], [9, 8, 7, 6], [11, 12], [3, 4, 5, 6, 7]]
    refs = [
        model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in prompts
    ]
    eng = Engine(model, policy=ElasticPolicy(max_bytes=4 * MiB), background=False)
    rids = [eng.add_request(p, 10) for p in prompts]
    got: dict[int, list[int]] = {r: [] for r in rids}
    for stop_after in (3, 5, 1, 7):  # leave the stream mid-step, again and again
        for n, (rid, tok, _) in enumerate(eng.stream(), start=1):
            got[rid].append(tok)
            if n == stop_after:
                break
    for rid, tok, _ in eng.stream():
        got[rid].append(tok)
    assert [got[r] for r in rids] == refs
    eng.close()


def test_requests_arriving_under_a_temporary_budget_cut_queue_and_finish(model):
    """After set_budget(0) a new request waits (it used to be refused); only what can never fit
    under the ceiling is refused. It runs, token-identical, once the budget is back."""
    eng = Engine(model, policy=ElasticPolicy(max_bytes=4 * MiB), background=False)
    eng.set_budget(0)
    rid = eng.add_request([9, 8, 7], 5)
    eng.step()
    assert eng.request_info(rid)["status"] == "waiting" and eng.stats()["live_bytes"] == 0
    with pytest.raises(ValueError, match=r"needs 38 KV pages .* ceiling \(max_bytes 4194304\) allows 32 pages"):
        eng.add_request([3] * 500, 100)
    eng.set_budget(None)
    while eng.has_unfinished():
        eng.step()
    ref = model.generate(torch.tensor([[9, 8, 7]]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert eng.output_ids(rid) == ref
    eng.close()
