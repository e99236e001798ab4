"""Engine logic against a stand-in pool and packed cache written from docs/INTERFACES.md.

These tests pin the Engine's own behaviour (packing, preemption by swap and recompute,
budget changes, cancellation, bad input, threads) independent of the real KV page pool:
the stand-ins hold K/V in ordinary tensors and attend through a 4-D mask. test_engine.py
runs the same Engine on the real ``KVPagePool`` and ``ElasticPagedCache``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_elastic_kv.engine.engine import Engine
from torch_elastic_kv.engine.policy import ElasticPolicy
from torch_elastic_kv.engine.request import RequestRejected
from torch_elastic_kv.engine.runner import ModelRunner
from torch_elastic_kv.testing import ManualClock
from torch_elastic_kv.testing.standins import PAGE_TOKENS, PAGES_PER_CHUNK, StandInCache, StandInPool

PT, GP = PAGE_TOKENS, PAGES_PER_CHUNK


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def reference(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def make_engine(model, max_pages=256, clock=None, background=False, prefix_caching=True, **policy_kw):
    pool = StandInPool(2, 2, 16, max_pages)
    policy_kw.setdefault("max_bytes", max_pages * pool.page_bytes)
    policy = ElasticPolicy(clock=clock or ManualClock(0.0), **policy_kw)
    return Engine(
        model,
        pool=pool,
        policy=policy,
        cache=StandInCache(pool),
        max_batch_tokens=64,
        background=background,
        prefix_caching=prefix_caching,
    )


def prompts(n, seed, lo=3, hi=40):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, 96, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def test_packed_batches_match_generate_token_for_token(model):
    eng = make_engine(model)
    ps = prompts(6, 1)
    outs = eng.generate(ps, [5, 1, 9, 3, 12, 7])
    for p, o, n in zip(ps, outs, [5, 1, 9, 3, 12, 7]):
        assert o == reference(model, p, n)
    st = eng.stats()
    assert st["running"] == 0 and st["waiting"] == 0 and st["live_bytes"] == 0
    assert st["tokens_generated"] == 37


def test_budget_cut_mid_run_preempts_by_swap_and_recompute_without_loss(model):
    clock = ManualClock(0.0)
    pool_pages = 128
    eng = make_engine(model, max_pages=pool_pages, clock=clock, swap_bytes=0)
    page = eng.pool.page_bytes
    eng.swap.capacity_bytes = 6 * page  # room for one or two requests' pages
    ps = prompts(8, 2, 10, 30)
    rids = [eng.add_request(p, 12) for p in ps]
    for _ in range(3):
        eng.step()
        clock.t += 0.1
    live = eng.stats()["live_bytes"]
    assert live > 0
    eng.set_budget(int(live * 0.3))
    st = eng.stats()
    assert st["live_bytes"] <= int(live * 0.3)
    assert st["swap_preemptions"] >= 1 and st["recompute_preemptions"] >= 1
    eng.set_budget(None)
    while eng.has_unfinished():
        eng.step()
    for r, p in zip(rids, ps):
        assert eng.output_ids(r) == reference(model, p, 12)
    assert eng.stats()["preemptions"] == st["preemptions"] + 0 or eng.stats()["preemptions"] >= st["preemptions"]
    assert eng.swap.used_bytes == 0


def test_run_under_a_tight_budget_preempts_in_steps_and_finishes_all(model):
    eng = make_engine(model, max_pages=64, swap_bytes=0)
    eng.swap.capacity_bytes = 3 * eng.pool.page_bytes
    eng.set_budget(12 * eng.pool.page_bytes)
    ps = prompts(6, 3, 20, 40)
    outs = eng.generate(ps, 24)
    for p, o in zip(ps, outs):
        assert o == reference(model, p, 24)
    st = eng.stats()
    assert st["preemptions"] >= 1 and st["resident_bytes"] <= 12 * eng.pool.page_bytes


def test_idle_shrink_after_idle_seconds_with_fake_clock(model):
    clock = ManualClock(0.0)
    eng = make_engine(model, clock=clock, idle_seconds=5.0, min_bytes=0, prefix_caching=False)
    eng.generate(prompts(4, 4), 8)
    high = eng.stats()["resident_bytes"]
    assert high > 0
    eng.step()
    clock.t += 4.0
    eng.step()
    assert eng.stats()["resident_bytes"] == high
    clock.t += 1.5
    eng.step()
    assert eng.stats()["resident_bytes"] == 0
    assert eng.stats()["shrink_events"] == 1


def test_bad_input_raises_and_engine_keeps_serving(model):
    eng = make_engine(model, max_pages=16)
    good = eng.add_request([5, 6, 7], 4)
    cases = [
        (([], 4), "prompt is empty"),
        (([1, 2.5], 4), "position 1 is 2.5"),
        (([1, True], 4), "not an int"),
        (([1, 96], 4), r"outside the vocabulary \[0, 96\)"),
        (([1, -1], 4), "outside the vocabulary"),
        (([1, 2], 0), "max_new_tokens must be an int >= 1"),
        (([1, 2], 2.0), "max_new_tokens"),
        (("hello", 4), "prompt_ids must be"),
        (([1] * 100, 60), r"needs 20 KV pages .* ceiling \(max_bytes \d+\) allows 16 pages"),
        (([1] * 400, 200), "max_position_embeddings"),
        (([1], 3, "eos"), "eos_token_id"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.add_request(*args)
    with pytest.raises(ValueError, match="unknown request id 12345"):
        eng.cancel(12345)
    assert eng.stats()["waiting"] == 1
    while eng.has_unfinished():
        eng.step()
    assert eng.output_ids(good) == reference(model, [5, 6, 7], 4)
    assert eng.cancel(good) is False


def test_cancel_running_and_waiting_requests(model):
    eng = make_engine(model)
    a = eng.add_request(prompts(1, 5)[0], 30)
    b = eng.add_request(prompts(1, 6)[0], 30)
    eng.step()
    assert eng.cancel(a) is True
    c = eng.add_request([3, 4], 2)
    assert eng.cancel(c) is True
    while eng.has_unfinished():
        eng.step()
    assert eng.request_info(a)["status"] == "cancelled"
    assert eng.request_info(c)["finish_reason"] == "abort"
    assert eng.output_ids(b) == reference(model, prompts(1, 6)[0], 30)
    assert eng.stats()["live_bytes"] == 0 and eng.stats()["cancelled"] == 2


def test_add_request_from_another_thread_while_streaming(model):
    eng = make_engine(model, background=True)
    ps = prompts(5, 7)
    first = eng.add_request(ps[0], 20)
    ids = []

    def producer():
        for p in ps[1:]:
            ids.append(eng.add_request(p, 6))

    got: dict[int, list[int]] = {}
    th = threading.Thread(target=producer)
    n = 0
    for rid, tok, _ in eng.stream():
        got.setdefault(rid, []).append(tok)
        n += 1
        if n == 3:
            th.start()
            th.join()
    eng.close()
    assert got[first] == reference(model, ps[0], 20)
    for r, p in zip(ids, ps[1:]):
        assert got[r] == reference(model, p, 6)


def test_request_info_and_timeline_fields(model):
    clock = ManualClock(0.0)
    eng = make_engine(model, clock=clock)
    r = eng.add_request([1, 2, 3], 3)
    while eng.has_unfinished():
        clock.t += 1.0
        eng.step()
    info = eng.request_info(r)
    assert info["arrival_time"] == 0.0 and info["first_token_time"] == 1.0
    assert info["finish_time"] == 3.0 and info["output_tokens"] == 3
    assert info["finish_reason"] == "length"
    keys = {
        "t",
        "step",
        "num_tokens",
        "running",
        "waiting",
        "live_bytes",
        "resident_bytes",
        "budget_bytes",
        "preempted",
        "step_seconds",
    }
    assert keys <= set(eng.timeline[0])
    assert [e["num_tokens"] for e in eng.timeline] == [3, 1, 1]
    for k in (
        "running",
        "waiting",
        "live_bytes",
        "resident_bytes",
        "reserved_bytes",
        "grows",
        "shrinks",
        "compactions",
        "preemptions",
    ):
        assert k in eng.stats()


def test_a_lease_lowers_the_budget_at_the_next_step_and_none_restores_it(model):
    clock = ManualClock(0.0)
    eng = make_engine(model, max_pages=128, clock=clock)
    ps = prompts(6, 9, 15, 30)
    rids = [eng.add_request(p, 10) for p in ps]
    eng.step()
    eng.step()
    live = eng.stats()["live_bytes"]
    version = eng.budget.version
    eng.budget.set_lease(live // 2)  # other work needs memory now (what a broker reclaim does)
    assert eng.budget.version == version + 1
    assert eng.stats()["preemptions"] == 0  # nothing happens until the Engine acts on it
    eng.step()
    st = eng.stats()
    assert st["budget_bytes"] == live // 2 and st["preemptions"] >= 1
    assert st["resident_bytes"] <= live // 2
    eng.budget.set_lease(None)  # and gives it back
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["budget_bytes"] == eng.policy.max_bytes
    for r, p in zip(rids, ps):
        assert eng.output_ids(r) == reference(model, p, 10)


def test_sleep_gives_everything_back_and_wake_finishes_every_request(model):
    eng = make_engine(model, max_pages=128)
    ps = prompts(6, 9, 15)
    rids = [eng.add_request(p, 10) for p in ps]
    eng.step()
    eng.set_budget(64 * eng.pool.page_bytes)
    eng.sleep()
    st = eng.stats()
    assert st["asleep"] and st["budget_bytes"] == 0 and st["live_bytes"] == 0 and st["resident_bytes"] == 0
    assert st["requested_budget_bytes"] == 64 * eng.pool.page_bytes
    eng.step()
    assert eng.stats()["running"] == 0 and eng.has_unfinished()  # nothing runs while asleep
    eng.wake()
    assert eng.stats()["budget_bytes"] == 64 * eng.pool.page_bytes
    while eng.has_unfinished():
        eng.step()
    for r, p in zip(rids, ps):
        assert eng.output_ids(r) == reference(model, p, 10)


def test_seeded_sampling_does_not_depend_on_batching(model):
    sampling = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 5}
    p = prompts(1, 11)[0]
    alone = make_engine(model).generate([p], 12, sampling=sampling)[0]
    eng = make_engine(model)
    others = prompts(4, 12)
    outs = eng.generate(others[:2] + [p] + others[2:], 12, sampling=sampling)
    assert outs[2] == alone
    assert alone != reference(model, p, 12)  # it did sample


def test_numpy_and_tensor_prompts_are_accepted(model):
    import numpy as np

    eng = make_engine(model)
    a = eng.add_request(np.array([5, 6, 7]).tolist(), 3)
    b = eng.add_request(list(np.array([5, 6, 7])), 3)  # numpy integer scalars
    c = eng.add_request(torch.tensor([5, 6, 7]), 3)
    with pytest.raises(ValueError, match="dtype"):
        eng.add_request(torch.tensor([5.0, 6.0]), 3)
    while eng.has_unfinished():
        eng.step()
    assert eng.output_ids(a) == eng.output_ids(b) == eng.output_ids(c) == reference(model, [5, 6, 7], 3)


def test_only_the_last_keep_finished_requests_are_remembered(model):
    pool = StandInPool(2, 2, 16, 64)
    eng = Engine(
        model,
        pool=pool,
        cache=StandInCache(pool),
        background=False,
        keep_finished=2,
        policy=ElasticPolicy(clock=ManualClock(0.0), max_bytes=64 * pool.page_bytes),
    )
    rids = [eng.add_request([3 + i, 4], 2) for i in range(4)]
    eng.cancel(rids[3])
    while eng.has_unfinished():
        eng.step()
    # retired in the order 3 (cancelled), 0, 1, 2: the last two are remembered
    for r in (rids[3], rids[0]):
        with pytest.raises(ValueError, match="forgotten"):
            eng.request_info(r)
    assert [eng.request_info(r)["status"] for r in rids[1:3]] == ["finished", "finished"]
    assert eng.stats()["finished"] == 3 and eng.stats()["cancelled"] == 1


def test_stand_ins_and_the_real_classes_implement_the_engine_protocols():
    from torch_elastic_kv.engine.protocols import EngineCache, EnginePool
    from torch_elastic_kv.hf.cache import ElasticPagedCache
    from torch_elastic_kv.kv.pool import KVPagePool

    pool = StandInPool(2, 2, 16, 64)
    assert isinstance(pool, EnginePool) and isinstance(StandInCache(pool), EngineCache)
    real = KVPagePool(2, 2, 16, torch.float32, "cpu", page_tokens=PT, max_bytes=4 << 20)
    try:
        assert isinstance(real, EnginePool)
        assert isinstance(ElasticPagedCache(tiny_model().config, pool=real), EngineCache)
    finally:
        real.close()
    assert not isinstance(object(), EnginePool)


def test_the_runner_tells_the_pool_each_new_stream_once() -> None:
    seen: list[int] = []
    runner = ModelRunner(model=None, cache=None, device=torch.device("cpu"), on_new_stream=seen.append)
    for handle in (7, 7, 9, 7, 9):
        runner.note_stream(handle)
    assert seen == [7, 9]


def test_a_rejection_names_its_field_in_the_callers_words_and_max_new_tokens_for_is_its_boundary(model):
    eng = make_engine(model, max_pages=8)  # 8 pages: 8 * PT tokens of KV at most
    with pytest.raises(RequestRejected) as info:
        eng.check_request([5] * (6 * PT), 4 * PT, max_tokens_label="max_tokens")
    err = info.value
    assert err.field == "max_new_tokens" and err.where == "add_request"
    assert err.reason.startswith(f"prompt ({6 * PT} tokens) + max_tokens ({4 * PT}) needs 10 KV pages")
    assert str(err) == f"add_request: {err.reason}"
    with pytest.raises(RequestRejected, match=r"^add_request: prompt id 999 at position 0") as info:
        eng.check_request([999], 1)
    assert info.value.field == "prompt"
    with pytest.raises(RequestRejected) as info:
        eng.check_request([5], 3, sampling={"temperature": -1})
    assert info.value.field == "sampling"
    # the largest max_new_tokens check_request accepts, for every prompt length
    for n in (1, PT + 1, 6 * PT, 8 * PT, 8 * PT + 1):
        fits = eng.max_new_tokens_for(n)
        if fits:
            eng.check_request([5] * n, fits)
        with pytest.raises(RequestRejected):
            eng.check_request([5] * n, fits + 1)
    assert eng.max_new_tokens_for(8 * PT + 1) == 0 and eng.max_new_tokens_for(8 * PT) == 1
    with pytest.raises(ValueError, match="max_new_tokens_for: prompt_tokens must be an int >= 1, got 0"):
        eng.max_new_tokens_for(0)
