"""Scheduler: admission by pages, packing, preemption order. Pure Python with a counting backend."""

from __future__ import annotations

import pytest

from torch_elastic_kv.engine.request import Request, RequestStatus, SamplingParams, StepOutput
from torch_elastic_kv.engine.scheduler import Scheduler

PT = 4  # page_tokens


class CountingBackend:
    """Pages as counts: a budget, pages held per sequence, a swap space of N pages."""

    page_tokens = PT

    def __init__(self, budget_pages: int, swap_pages: int = 0) -> None:
        self.budget = budget_pages
        self.held: dict[int, int] = {}
        self.swap_pages = swap_pages
        self.swapped: dict[int, int] = {}
        self.swap_outs = 0
        self.swap_ins = 0
        self.fail_maps = False  # a map fails although the budget has room (host or device short)

    def free_pages(self) -> int:
        return self.budget - self.live_pages()

    def live_pages(self) -> int:
        return sum(self.held.values())

    def held_pages(self, seq) -> int:
        return self.held.get(seq.request_id, 0)

    def ensure(self, seq, total_tokens) -> None:
        need = -(-total_tokens // PT) - self.held_pages(seq)
        if need > self.free_pages() or (need > 0 and self.fail_maps):
            raise MemoryError(f"need {need} free {self.free_pages()}")
        if need > 0:
            self.held[seq.request_id] = self.held_pages(seq) + need

    def release(self, seq) -> None:
        self.held.pop(seq.request_id, None)

    def can_swap_out(self, seq) -> bool:
        return sum(self.swapped.values()) + self.held_pages(seq) <= self.swap_pages

    def swap_out(self, seq) -> None:
        self.swapped[seq.request_id] = self.held.pop(seq.request_id)
        self.swap_outs += 1

    def swap_in(self, seq, total_tokens) -> None:
        n = max(self.swapped[seq.request_id], -(-total_tokens // PT))
        if n > self.free_pages() or self.fail_maps:
            raise MemoryError("swap in")
        self.swapped.pop(seq.request_id)
        self.held[seq.request_id] = n
        self.swap_ins += 1

    def drop_swap(self, seq) -> None:
        self.swapped.pop(seq.request_id)

    def find_prefix(self, seq):  # no prefix caching here (tests/test_prefix_cache.py has it)
        return None

    def admit_prefix(self, seq, hit) -> int:
        return 0

    def computed(self, seq) -> None:
        pass


_next = [0]


def seq(prompt_len: int, max_new: int = 8, eos=()) -> Request:
    _next[0] += 1
    return Request(
        request_id=_next[0],
        prompt_ids=list(range(1, prompt_len + 1)),
        max_new_tokens=max_new,
        arrival_index=_next[0],
        arrival_time=0.0,
        eos_token_ids=frozenset(eos),
    )


def run_step(s: Scheduler, token: int = 7):
    b = s.schedule()
    sampled = {c.request.request_id: token for c in b.chunks if c.samples}
    produced, finished = s.postprocess(b, sampled, now=1.0)
    return b, produced, finished


def test_prefill_is_chunked_under_max_batch_tokens_and_decode_goes_first():
    be = CountingBackend(100)
    s = Scheduler(be, max_batch_tokens=10)
    a, b = seq(6), seq(9)
    s.add(a)
    s.add(b)
    batch, produced, _ = run_step(s)
    # a's whole prompt (6) then 4 tokens of b's prompt; b's pages are taken in full
    assert [(c.request is a, c.start, c.num_tokens) for c in batch.chunks] == [(True, 0, 6), (False, 0, 4)]
    assert produced == [StepOutput(a.request_id, 7)]
    assert be.held_pages(b) == 3
    batch, produced, _ = run_step(s)
    # a decodes first (1 token), then b's remaining 5 prompt tokens
    assert [(c.request is a, c.start, c.num_tokens) for c in batch.chunks] == [(True, 6, 1), (False, 4, 5)]
    assert sorted(produced) == sorted([StepOutput(a.request_id, 7), StepOutput(b.request_id, 7)])
    assert batch.num_tokens == 6


def test_admission_waits_for_pages_and_is_first_come_first_served():
    be = CountingBackend(5)
    s = Scheduler(be, max_batch_tokens=100)
    big, small = seq(17), seq(2)  # big needs 5 pages, small 1
    blocker = seq(8, max_new=2)  # 2 pages, finishes after 2 tokens
    s.add(blocker)
    run_step(s)
    s.add(big)
    s.add(small)
    b, _, _ = run_step(s)
    # big does not fit (5 > 3 free); small must not overtake it
    assert [c.request for c in b.chunks] == [blocker]
    assert blocker.status is RequestStatus.FINISHED
    b, _, _ = run_step(s)
    assert [c.request for c in b.chunks] == [big]
    assert small.status is RequestStatus.WAITING


def test_admission_keeps_a_headroom_reserve_for_running_requests():
    be = CountingBackend(10)
    s = Scheduler(be, max_batch_tokens=100, headroom=0.5)
    a = seq(16, max_new=50)  # 4 pages held, then 5 with its first decode
    s.add(a)
    run_step(s)
    b = seq(16)  # needs 4; reserve ceil(0.5 * 5) = 3; free 5 < 7
    s.add(b)
    batch, _, _ = run_step(s)
    assert [c.request for c in batch.chunks] == [a] and b.status is RequestStatus.WAITING


def test_max_running_caps_admission():
    be = CountingBackend(100)
    s = Scheduler(be, max_batch_tokens=100, max_running=2)
    seqs = [seq(3) for _ in range(3)]
    for q in seqs:
        s.add(q)
    run_step(s)
    assert [q.status for q in seqs] == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING]


def test_out_of_pages_preempts_latest_arrived_swapping_when_room_else_recompute():
    be = CountingBackend(budget_pages=6, swap_pages=2)
    s = Scheduler(be, max_batch_tokens=100)
    a, b, c = seq(7, 20), seq(7, 20), seq(7, 20)  # 2 pages each, all 6 pages used
    for q in (a, b, c):
        s.add(q)
    run_step(s)
    assert be.free_pages() == 0
    # each now has 8 tokens (7 prompt + 1 sampled); the next decode writes token 8's KV in
    # page 2 -> 8 tokens fit in 2 pages; one more step then all need a third page
    run_step(s)
    batch, _, _ = run_step(s)
    # a needs a third page: c (latest) is preempted and swapped (2 pages fit the swap
    # space); that frees enough for b too
    assert batch.preempted == [(c, "swap")]
    assert c.status is RequestStatus.SWAPPED and [ch.request for ch in batch.chunks] == [a, b]
    for _ in range(3):
        batch, _, _ = run_step(s)
        assert batch.preempted == []
    # both now need a fourth page: b is the latest running; swap is full -> recompute
    batch, _, _ = run_step(s)
    assert batch.preempted == [(b, "recompute")]
    assert b.status is RequestStatus.WAITING and b.num_computed == 0 and b.num_generated == 6
    assert [q.request_id for q in s.waiting] == [b.request_id, c.request_id]
    assert s.preemptions == 2 and s.swap_preemptions == 1 and s.recompute_preemptions == 1
    assert [ch.request for ch in batch.chunks] == [a]


def test_preempted_requests_resume_with_the_same_tokens_to_feed():
    be = CountingBackend(budget_pages=4, swap_pages=10)
    s = Scheduler(be, max_batch_tokens=100)
    a, b = seq(4, 12), seq(4, 12)
    s.add(a)
    s.add(b)
    for _ in range(30):
        if not s.has_unfinished():
            break
        run_step(s)
    assert a.status is RequestStatus.FINISHED and b.status is RequestStatus.FINISHED
    assert a.num_generated == 12 and b.num_generated == 12
    assert b.preemptions >= 1 and be.swap_ins == be.swap_outs >= 1
    assert be.live_pages() == 0 and be.swapped == {}


def test_recompute_resume_feeds_prompt_and_outputs():
    be = CountingBackend(budget_pages=100)
    s = Scheduler(be, max_batch_tokens=100)
    a = seq(5, 10)
    s.add(a)
    run_step(s)
    run_step(s)
    assert a.num_computed == 6 and a.num_tokens == 7
    mode = s.preempt(a)
    assert mode == "recompute" and a.num_computed == 0 and be.live_pages() == 0
    b, produced, _ = run_step(s)
    assert [(c.start, c.num_tokens) for c in b.chunks] == [(0, 7)]
    assert produced == [StepOutput(a.request_id, 7)] and a.num_generated == 3


def test_starvation_limit_protects_a_repeatedly_preempted_request():
    be = CountingBackend(budget_pages=100)
    s = Scheduler(be, max_batch_tokens=100, starvation_limit=2)
    old, young = seq(4), seq(4)
    s.add(old)
    s.add(young)
    run_step(s)
    young.preemptions = 2  # preempted twice already: protected now
    assert s._pick_victim() is old
    old.preemptions = 2
    assert s._pick_victim() is young


def test_preempt_until_frees_latest_first():
    be = CountingBackend(budget_pages=100)
    s = Scheduler(be, max_batch_tokens=100)
    qs = [seq(8) for _ in range(4)]  # 2 pages each + decode
    for q in qs:
        s.add(q)
    run_step(s)
    live = be.live_pages()
    out = s.preempt_until(live // 2)
    assert [q for q, _ in out] == [qs[3], qs[2]]
    assert be.live_pages() <= live // 2


def test_eos_finishes_and_frees_pages():
    be = CountingBackend(budget_pages=100)
    s = Scheduler(be, max_batch_tokens=100)
    a = seq(3, 50, eos=(7,))
    s.add(a)
    _, produced, finished = run_step(s, token=7)
    assert finished == [a] and a.finish_reason == "stop" and be.live_pages() == 0
    assert produced == [StepOutput(a.request_id, 7, "stop")]  # the step says how it ended
    assert not s.has_unfinished()


def test_cancel_frees_wherever_the_request_is():
    be = CountingBackend(budget_pages=100, swap_pages=100)
    s = Scheduler(be, max_batch_tokens=100)
    a, b, c = seq(3), seq(3), seq(3)
    for q in (a, b, c):
        s.add(q)
    run_step(s)
    s.preempt(b)  # swapped
    s.cancel(a, 2.0)
    s.cancel(b, 2.0)
    assert a.status is RequestStatus.CANCELLED and b.status is RequestStatus.CANCELLED
    assert be.swapped == {} and set(be.held) == {c.request_id}


def test_a_failed_map_leaves_requests_where_they_were():
    be = CountingBackend(100, swap_pages=100)
    s = Scheduler(be, max_batch_tokens=64)
    a, b = seq(6, max_new=20), seq(5)
    s.add(a)
    run_step(s)
    s.preempt(a)  # swapped out: 2 pages in the swap space
    s.add(b)
    be.fail_maps = True
    batch = s.schedule()
    assert not batch and batch.short == [a] and batch.memory_error == "swap in"
    assert s.waiting == [a, b] and s.running == []  # nobody left the queue
    assert a.status is RequestStatus.SWAPPED and be.swapped == {a.request_id: 2} and be.live_pages() == 0
    be.fail_maps = False
    _, produced, _ = run_step(s)
    assert s.waiting == [] and sorted(out.request_id for out in produced) == [a.request_id, b.request_id]
    assert be.held_pages(a) == 2 and be.held_pages(b) == 2
    be.fail_maps = True
    batch, produced, _ = run_step(s)  # both still fit in their pages
    assert not batch.short and len(produced) == 2
    batch, produced, _ = run_step(s)  # a's 9th token needs a third page: it sits the step out
    assert batch.short == [a] and [out.request_id for out in produced] == [b.request_id]
    assert s.running == [a, b] and a.num_computed == 8 and be.held_pages(a) == 2


def test_demand_counts_held_growth_and_waiting():
    be = CountingBackend(budget_pages=100)
    s = Scheduler(be, max_batch_tokens=100)
    a = seq(8)
    s.add(a)
    run_step(s)
    s.add(seq(9))
    held, growth, waiting = s.demand_pages(lambda q: 2)
    assert (held, growth, waiting) == (2, 2, 3)


def test_bad_settings():
    be = CountingBackend(1)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(be, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_running"):
        Scheduler(be, max_running=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="unknown keys"):
        SamplingParams.coerce({"temp": 1})
