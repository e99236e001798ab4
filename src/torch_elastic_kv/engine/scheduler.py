"""Continuous-batching scheduler: which tokens of which requests go into the next forward.

Plain Python, no torch. Pages are reached through a small ``PageBackend`` (the Engine's one
wraps the KV page pool, the cache's page tables and the host swap space; the tests' one only
counts), so admission, chunking and preemption are testable without a model.

Each step, under ``max_batch_tokens``:

1. running requests that decode (one token each), oldest first;
2. running requests still in prefill, a chunk each, oldest first;
3. waiting requests (new, or preempted earlier), oldest first, while their pages plus a
   headroom reserve can be had within the budget; a new request's prompt pages are taken at
   admission, so its later prefill chunks never run out of pages.

A request leaves the waiting queue only once its pages are in hand: when a map fails although
the budget has room (host memory short, a device out of memory), the request stays at the
head of the queue exactly as it was, a running request sits the step out, and nothing more is
admitted that step (``Batch.short``); it runs, unchanged, once memory comes back.

When a running request needs a page and none is free, the latest-arrived running request is
preempted: its KV is swapped to host memory when the swap space has room, else its pages are
dropped and its prompt plus the tokens it produced are recomputed when it is readmitted.
A request preempted ``starvation_limit`` times is protected: others are preempted before it,
so no request is pushed back forever. Preempted requests rejoin the waiting queue in arrival
order, ahead of everything that arrived after them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .._util import ceil_div, is_int
from .request import Request, RequestStatus, StepOutput

__all__ = ["Batch", "Chunk", "PageBackend", "PrefixHit", "Scheduler"]


class PageBackend(Protocol):
    """What the scheduler needs from page storage. Counts are in pages.

    ``ensure`` and ``swap_in`` raise ``MemoryError`` and change nothing when pages cannot be
    had; the scheduler checks ``free_pages`` first, so this happens only when a map fails
    although the budget has room (the host or the device is short of memory). ``swap_in``
    gives the request pages for ``total_tokens`` (its swapped pages and any it grows by), all
    or nothing.
    ``free_pages`` counts pages that can be had, cached prefix pages included (taking one
    evicts it); ``live_pages`` counts pages requests hold, a shared page once.

    Prefix caching (a backend without it finds nothing and publishes nothing):
    ``find_prefix(request)`` looks up a fresh request's cached prefix without changing anything,
    ``admit_prefix(request, hit)`` makes it hold those pages (and counts the lookup), and
    ``computed(request)`` indexes what a forward filled.
    """

    page_tokens: int

    def free_pages(self) -> int: ...
    def live_pages(self) -> int: ...
    def find_prefix(self, request: Request) -> Optional[PrefixHit]: ...
    def admit_prefix(self, request: Request, hit: Optional[PrefixHit]) -> int: ...
    def computed(self, request: Request) -> None: ...
    def held_pages(self, request: Request) -> int: ...
    def ensure(self, request: Request, total_tokens: int) -> None: ...
    def release(self, request: Request) -> None: ...
    def can_swap_out(self, request: Request) -> bool: ...
    def swap_out(self, request: Request) -> None: ...
    def swap_in(self, request: Request, total_tokens: int) -> None: ...
    def drop_swap(self, request: Request) -> None: ...


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix found for a request: ``tokens`` it covers (whole pages), how many of
    its pages on the device are cached now (reclaimable, so no longer free once the request
    holds them), and how many must be allocated to bring the rest back from the host tier."""

    tokens: int
    cached_pages: int
    new_pages: int = 0
    handle: object = None  # the backend's own (its pages and hashes)


@dataclass
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start``, packed in this order."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk ends at the sequence's last token, so a token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class Batch:
    """One step's work: the chunks to run and the preemptions made to fit them.

    ``short``: requests whose pages could not be mapped this step (they wait, unchanged);
    ``memory_error``: the last such failure's message."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[tuple[Request, str]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    short: list[Request] = field(default_factory=list)
    memory_error: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    """Admission by pages, chunked prefill packed with decode, preemption latest-first."""

    def __init__(
        self,
        backend: PageBackend,
        max_batch_tokens: int = 2048,
        max_running: Optional[int] = None,
        headroom: float = 0.0,
        starvation_limit: int = 3,
        expedite_prefill_tokens: Optional[int] = None,
    ) -> None:
        if not is_int(max_batch_tokens) or max_batch_tokens < 1:
            raise ValueError(f"Scheduler: max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
        if max_running is not None and (not is_int(max_running) or max_running < 1):
            raise ValueError(f"Scheduler: max_running must be None or an int >= 1, got {max_running!r}")
        if starvation_limit < 1:
            raise ValueError(f"Scheduler: starvation_limit must be >= 1, got {starvation_limit!r}")
        if expedite_prefill_tokens is not None and (not is_int(expedite_prefill_tokens) or expedite_prefill_tokens < 0):
            raise ValueError(
                f"Scheduler: expedite_prefill_tokens must be None or an int >= 0, got {expedite_prefill_tokens!r}"
            )
        self.backend = backend
        self.page_tokens = backend.page_tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.headroom = float(headroom)
        self.starvation_limit = starvation_limit
        self.expedite_prefill_tokens = expedite_prefill_tokens
        self._expedited: set[int] = set()  # request ids whose next token is awaited (one step)
        self.expedited_steps = 0  # steps run under the cap (a marked request decoded in them)
        self.running: list[Request] = []  # sorted by arrival_index
        self.waiting: list[Request] = []  # sorted by arrival_index (WAITING and SWAPPED)
        self.preemptions = 0
        self.swap_preemptions = 0
        self.recompute_preemptions = 0

    # ---- queues -------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return ceil_div(tokens, self.page_tokens)

    def add(self, request: Request) -> None:
        """Queue a new request (status WAITING)."""
        request.status = RequestStatus.WAITING
        self._insert_waiting(request)

    def _insert_waiting(self, request: Request) -> None:
        keys = [s.arrival_index for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, request.arrival_index), request)

    def _insert_running(self, request: Request) -> None:
        keys = [s.arrival_index for s in self.running]
        self.running.insert(bisect.bisect(keys, request.arrival_index), request)

    def expedite(self, request: Request) -> None:
        """Mark ``request``'s next token as awaited: if the next step decodes it, that step
        takes at most ``expedite_prefill_tokens`` prompt tokens (prefill chunks and swapped
        requests resumed), so it is short. The mark lasts for the next step only (``None``:
        marks change nothing)."""
        self._expedited.add(request.request_id)

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may take: all of the batch unless an expedited request decodes."""
        if not self._expedited:
            return self.max_batch_tokens
        marked, self._expedited = self._expedited, set()
        if self.expedite_prefill_tokens is None:
            return self.max_batch_tokens
        if any(s.request_id in marked and s.num_uncomputed == 1 for s in self.running):
            self.expedited_steps += 1
            return self.expedite_prefill_tokens
        return self.max_batch_tokens

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def num_swapped(self) -> int:
        return sum(1 for s in self.waiting if s.status is RequestStatus.SWAPPED)

    # ---- preemption ---------------------------------------------------------------------
    def _pick_victim(self) -> Request:
        """Latest-arrived running request, sparing protected ones while others remain."""
        unprotected = [s for s in self.running if s.preemptions < self.starvation_limit]
        pool = unprotected or self.running
        return pool[-1]

    def preempt(self, request: Request) -> str:
        """Take ``request`` off the running list: swap its KV out if there is room, else drop it."""
        self.running.remove(request)
        if request.num_computed > 0 and self.backend.can_swap_out(request):
            self.backend.swap_out(request)
            request.status = RequestStatus.SWAPPED
            request.swap_preemptions += 1
            self.swap_preemptions += 1
            mode = "swap"
        else:
            self.backend.release(request)
            request.num_computed = 0
            request.status = RequestStatus.WAITING
            request.recompute_preemptions += 1
            self.recompute_preemptions += 1
            mode = "recompute"
        request.preemptions += 1
        self.preemptions += 1
        self._insert_waiting(request)
        return mode

    def preempt_until(self, max_live_pages: int) -> list[tuple[Request, str]]:
        """Preempt latest-arrived first until at most ``max_live_pages`` pages are live."""
        out: list[tuple[Request, str]] = []
        while self.running and self.backend.live_pages() > max_live_pages:
            victim = self._pick_victim()
            out.append((victim, self.preempt(victim)))
        return out

    # ---- one step -----------------------------------------------------------------------
    def schedule(self) -> Batch:
        """Choose this step's chunks; allocates their pages and preempts to make room."""
        batch = Batch()
        budget = self.max_batch_tokens
        prefill_budget = self._prefill_budget()
        scheduled: dict[int, Chunk] = {}
        prefill_ids: set[int] = set()  # scheduled chunks counted against prefill_budget

        def make_room(request: Request, need: int) -> bool:
            """Preempt until ``need`` pages are free for ``request``; False if ``request`` itself went."""
            nonlocal budget, prefill_budget
            while self.backend.free_pages() < need:
                victim = self._pick_victim()
                chunk = scheduled.pop(victim.request_id, None)
                if chunk is not None:
                    batch.chunks.remove(chunk)
                    budget += chunk.num_tokens
                    if victim.request_id in prefill_ids:
                        prefill_budget += chunk.num_tokens
                batch.preempted.append((victim, self.preempt(victim)))
                if victim is request:
                    return False
            return True

        # running: decoders first (one token each keeps time per output token low), then
        # prefill chunks; both oldest first
        order = [s for s in self.running if s.num_uncomputed == 1] + [s for s in self.running if s.num_uncomputed > 1]
        for request in order:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted above to make room for an older request
            prefill = request.num_uncomputed > 1
            n = min(request.num_uncomputed, budget, prefill_budget) if prefill else 1
            if n <= 0:
                continue
            need = self.pages_for(request.num_computed + n) - self.backend.held_pages(request)
            if need > 0:
                if not make_room(request, need):
                    continue
                try:
                    self.backend.ensure(request, request.num_computed + n)
                except MemoryError as exc:
                    # within the budget but not mappable now: it sits this step out, unchanged
                    batch.short.append(request)
                    batch.memory_error = str(exc)
                    continue
            chunk = Chunk(request, request.num_computed, n)
            batch.chunks.append(chunk)
            scheduled[request.request_id] = chunk
            budget -= n
            if prefill:
                prefill_budget -= n
                prefill_ids.add(request.request_id)

        # admission, oldest first; stop at the first that does not fit so that a large
        # request is not overtaken forever by small ones
        held = sum(self.backend.held_pages(s) for s in self.running) if self.waiting else 0
        while self.waiting and min(budget, prefill_budget) > 0 and not batch.short:
            if self.max_running is not None and len(self.running) >= self.max_running:
                break
            request = self.waiting[0]
            fresh = request.status is RequestStatus.WAITING and request.num_computed == 0
            hit = self.backend.find_prefix(request) if fresh else None
            need = self.pages_for(request.num_tokens) - (hit.tokens // self.page_tokens - hit.new_pages if hit else 0)
            # keep a headroom for the running requests' next pages, so that admitting one
            # does not preempt another a few steps later
            reserve = math.ceil(self.headroom * held) if self.running else 0
            if self.backend.free_pages() - (hit.cached_pages if hit else 0) < need + reserve:
                break
            try:
                if request.status is RequestStatus.SWAPPED:
                    self.backend.swap_in(request, request.num_tokens)
                else:
                    if fresh:
                        request.num_computed = self.backend.admit_prefix(request, hit)
                    self.backend.ensure(request, request.num_tokens)
            except MemoryError as exc:
                # the pages could not be mapped: it stays first in the queue, as it was (a
                # prefix it was given goes back to the cache)
                if fresh:
                    if self.backend.held_pages(request):
                        self.backend.release(request)
                    request.num_computed = 0
                batch.short.append(request)
                batch.memory_error = str(exc)
                break
            self.waiting.pop(0)
            held += self.backend.held_pages(request)
            request.status = RequestStatus.RUNNING
            self._insert_running(request)
            batch.admitted.append(request)
            n = min(request.num_uncomputed, budget, prefill_budget)
            chunk = Chunk(request, request.num_computed, n)
            batch.chunks.append(chunk)
            scheduled[request.request_id] = chunk
            budget -= n
            prefill_budget -= n
            prefill_ids.add(request.request_id)
        return batch

    def postprocess(
        self, batch: Batch, sampled: dict[int, Optional[int]], now: float
    ) -> tuple[list[StepOutput], list[Request]]:
        """Advance the chunks that ran; append sampled tokens; finish and free done requests.

        ``sampled`` maps request_id -> token for every chunk whose ``samples`` is true.
        Returns what each sampling request got (a ``StepOutput``: its token, and its finish
        reason when this step ended it) and the requests that finished.
        """
        produced: list[StepOutput] = []
        finished: list[Request] = []
        for chunk in batch.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # cancelled while the forward ran
            request.num_computed = chunk.start + chunk.num_tokens
            self.backend.computed(request)
            if not chunk.samples:
                continue
            tok = sampled[request.request_id]
            if tok is None:  # its sampling failed: this request ends, the others go on
                request.finish(now, "error")
                done = True
            else:
                done = request.append_token(tok, now)
            produced.append(StepOutput(request.request_id, tok, request.finish_reason if done else None))
            if done:
                self.running.remove(request)
                self.backend.release(request)
                finished.append(request)
        return produced, finished

    def cancel(self, request: Request, now: float) -> None:
        """Remove a request wherever it is and free what it holds."""
        if request in self.running:
            self.running.remove(request)
            self.backend.release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            if request.status is RequestStatus.SWAPPED:
                self.backend.drop_swap(request)
        request.finish(now, "abort")

    # ---- demand for the policy --------------------------------------------------------------
    def demand_pages(self, growth_pages) -> tuple[int, int, int]:
        """(held, expected growth, waiting) pages; ``growth_pages(request)`` is the policy's estimate."""
        held = self.backend.live_pages()  # a page shared by several requests counts once
        growth = 0
        for s in self.running:
            growth += growth_pages(s)
        waiting = 0
        for s in self.waiting:
            waiting += self.pages_for(s.num_tokens)
        return held, growth, waiting
