"""A map that fails while requests are admitted or grow loses nothing (issue 21, item 1).

The device budget (``torch_elastic_kv.set_budget(n, "cpu")``, which every arena of this
process draws from) stands in for a host short of memory or a CUDA OOM: the Engine's own
budget has room, but the pool's map fails. The request must stay queued, unchanged, and finish
with the tokens of a calm run once memory comes back.
"""

from __future__ import annotations

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.testing import ManualClock
from torch_elastic_kv.testing.models import tiny_llama

MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    # wide K/V: one 16-token page is 128 KiB, 16 pages per 2 MiB chunk
    return tiny_llama(hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture
def device_budget():
    """Set the cpu device budget for one test; always restored."""
    try:
        yield lambda n: ekv.set_budget(n, "cpu")
    finally:
        ekv.set_budget(None, "cpu")


def reference(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()


def test_a_request_whose_pages_cannot_be_mapped_stays_queued_and_finishes(model, device_budget):
    prompt = [9, 8, 7, 6, 5]
    eng = Engine(model, policy=ElasticPolicy(max_bytes=8 * MiB), background=False)
    try:
        assert eng.stats()["resident_bytes"] == 0
        device_budget(0)
        rid = eng.add_request(prompt, 8)
        for _ in range(3):
            assert eng.step() == []  # returns: the request is not admitted, nothing is lost
        assert eng.stalled and eng.has_unfinished()
        s = eng.stats()
        assert (s["waiting"], s["running"], s["live_bytes"], s["allocation_failures"]) == (1, 0, 0, 3)
        assert [q.request_id for q in eng.scheduler.waiting] == [rid]
        assert eng.request_info(rid)["status"] == "waiting"
        assert eng.blocked_requests() == {rid: ("memory", eng.pool.page_bytes)}  # 5 tokens: one page
        with pytest.raises(MemoryError, match=rf"request {rid} could not be mapped .* the requests stay queued"):
            eng.generate([prompt], 2)  # generate says so instead of spinning; the new one queues too
        device_budget(None)
        while eng.has_unfinished():
            eng.step()
        assert eng.output_ids(rid) == reference(model, prompt, 8)
        assert eng.request_info(rid)["finish_reason"] == "length"
        assert not eng.stalled and eng.blocked_requests() == {}
    finally:
        eng.close()


def test_six_running_and_one_arriving_under_a_device_cut_lose_nothing(model, device_budget):
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 33, 47, 20, 38, 29)]
    late = torch.randint(3, 256, (300,), generator=g).tolist()  # 19 pages: more than is mapped and free
    max_new = 100  # together they outgrow what is mapped when the cut comes
    want = [reference(model, p, max_new) for p in prompts + [late]]
    clock = ManualClock(100.0)
    eng = Engine(model, policy=ElasticPolicy(max_bytes=24 * MiB, clock=clock), background=False)
    try:
        rids = [eng.add_request(p, max_new) for p in prompts]
        for _ in range(4):
            eng.step()
            clock.t += 0.01
        assert eng.stats()["running"] == 6
        # nothing more can be mapped: what the device holds now is all it may hold
        device_budget(ekv.memory_stats("cpu")["held_bytes"])
        late_rid = eng.add_request(late, max_new)
        failures = 0
        for _ in range(200):
            eng.step()
            clock.t += 0.01
            s = eng.stats()
            assert s["finished"] == 0, "nobody finishes (or fails) under the cut at these lengths"
            failures = s["allocation_failures"]
            if eng.stalled:
                break
        assert eng.stalled and failures > 0
        assert eng.has_unfinished() and s["running"] + s["waiting"] == 7
        assert eng.request_info(late_rid)["status"] == "waiting" and eng.request_info(late_rid)["output_tokens"] == 0
        assert all(eng.request_info(r)["finish_reason"] is None for r in rids)
        blocked = eng.blocked_requests()
        assert blocked and {why for why, _ in blocked.values()} == {"memory"}
        device_budget(None)
        while eng.has_unfinished():
            eng.step()
            clock.t += 0.01
        assert [eng.output_ids(r) for r in rids + [late_rid]] == want
        assert [eng.request_info(r)["finish_reason"] for r in rids + [late_rid]] == ["length"] * 7
        assert eng.stats()["live_bytes"] == 0
    finally:
        eng.close()


def test_set_budget_refuses_a_budget_that_buys_no_page(model):
    eng = Engine(model, policy=ElasticPolicy(max_bytes=8 * MiB), background=False)
    try:
        assert eng.min_budget_bytes == 2 * MiB
        before = eng.stats()["budget_bytes"]
        with pytest.raises(ValueError, match=r"^set_budget: 1048576 bytes is below one KV chunk \(2097152 bytes\)"):
            eng.set_budget(MiB)
        assert eng.stats()["budget_bytes"] == before == 8 * MiB
        eng.set_budget(0)  # holding nothing is allowed (sleep)
        eng.set_budget(2 * MiB)
        assert eng.stats()["budget_bytes"] == 2 * MiB
    finally:
        eng.close()


def test_the_server_ends_a_request_whose_memory_never_comes_with_503(device_budget):
    """The engine thread's side: a request whose pages cannot be mapped waits, counted in
    waiting_for_memory, and ends with a 503 after budget_wait_seconds instead of never."""
    import asyncio

    from torch_elastic_kv.serve.default_model import build_default_model, build_default_tokenizer
    from torch_elastic_kv.serve.engine_thread import ChoiceSpec, EngineService
    from torch_elastic_kv.serve.metrics import ServerMetrics

    engine = Engine(build_default_model(), policy=ElasticPolicy(max_bytes=8 * MiB), background=False)
    service = EngineService(engine, build_default_tokenizer(), ServerMetrics(), 8, budget_wait_seconds=1.0)
    device_budget(0)
    service.start()
    seen = []

    async def run():
        loop = asyncio.get_running_loop()
        sub = service.submit([ChoiceSpec([10, 11, 12], 4, {"temperature": 0.0})], loop)
        events = []
        t0 = loop.time()
        while not sub.done:
            seen.append(service.stats()["waiting_for_memory"])
            try:
                events += await asyncio.wait_for(sub.next_events(), 0.1)
            except asyncio.TimeoutError:
                pass
        return events, loop.time() - t0

    try:
        events, waited = asyncio.run(run())
    finally:
        service.stop()
    last = events[-1]
    assert (last.status, last.code, last.retry_after) == (503, "insufficient_kv_memory", 5)
    assert last.error == (
        "KV memory for this request (131072 bytes) could not be mapped for 1s (--budget-wait-seconds): "
        "the host or device is short of memory"
    )
    assert 1 in seen and 1.0 <= waited < 30
