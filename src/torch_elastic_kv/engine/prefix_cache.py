"""Prefix caching in the Engine: a new request reuses the longest cached prefix of its tokens.

Levels: a request's tokens -> the chained hashes of its full pages -> pages in the pool,
shared by every request whose tokens start the same way (``kv/page_table.py`` counts the
holders, ``kv/prefix_index.py`` finds pages by hash). At admission the scheduler asks ``find``
(no change) and, once the request fits, ``admit``: it then holds the matched pages and
prefills only the rest (at least its last token is always computed, so its first output
comes from a forward as usual). After each
forward ``publish`` indexes the pages the request has filled (prompt and output alike: the
next turn of a conversation re-sends both). A request that finishes or is preempted lets go of
its pages; those that are indexed stay allocated as *cached* pages, reclaimable, until the
eviction policy (``eviction.py``) gives them up: under allocation pressure, on a budget cut,
a broker reclaim or sleep, past their expiry, or over the cap.

Only full pages are shared, and never written again: the last, partial page of a request is
its own, so two requests that diverge inside a page never see each other's tokens.

The host tier, when the Engine has swap space: pages a budget cut or a lease reclaim takes
are copied to the swap space instead of dropped (if it has room), and a later hit past the
device's part of a prefix brings them back (``prefix_hit_tokens_host``). Preempted requests
come first: a swap-out that needs the room drops demoted pages, oldest first. Host pages
expire like device pages; without swap space, eviction drops.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..kv.page_table import PageTable
from ..kv.prefix_index import PrefixIndex
from ..kv.swap import SwapSpace
from .eviction import EvictionPolicy, RecentReuse, budget_victims, expired_victims, idle_victims, pressure_victims
from .request import Request
from .scheduler import PrefixHit

__all__ = ["EVICTION_REASONS", "PrefixCache"]

# why cached pages were given up: an allocation needed the room, they expired, the cap, a
# budget cut (set_budget, sleep), a lease reclaim (the broker), an idle shrink (pages whose
# tokens never came back), or an explicit reset
EVICTION_REASONS = ("pressure", "expiry", "cap", "budget", "reclaim", "idle", "reset")

# hashes of evicted pages remembered for ghost hits (16 bytes each, plus the dict's overhead)
MAX_GHOSTS = 1 << 16

# evictions whose pages go to the host tier (memory given back on purpose, still worth keeping)
DEMOTED_BY = ("budget", "reclaim")


class PrefixCache:
    """The Engine's prefix cache over its page table (which must carry a ``PrefixIndex``)."""

    def __init__(
        self,
        table: PageTable,
        policy: EvictionPolicy,
        *,
        page_bytes: int,
        pages_per_chunk: int,
        clock: Callable[[], float],
        swap: SwapSpace | None = None,
    ) -> None:
        if table.prefix is None:
            raise ValueError("PrefixCache: the page table has no prefix index")
        self.table = table
        self.index: PrefixIndex = table.prefix
        self.policy = policy
        self.page_bytes = page_bytes
        self.pages_per_chunk = pages_per_chunk
        self.clock = clock
        self.swap = swap if swap is not None and swap.capacity_bytes > 0 else None
        self._host: OrderedDict[bytes, float] = OrderedDict()  # demoted page hash -> when, oldest first
        self.host_hit_tokens = 0
        self.demoted_pages = 0
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found cached
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)  # pages given up, by reason
        self.ghost_hits = 0  # pages computed again whose hash had been evicted
        self._ghosts: OrderedDict[bytes, float] = OrderedDict()  # evicted page hash -> when
        self.recent = RecentReuse(policy.reuse_window_seconds)

    # -- requests ------------------------------------------------------------------------------
    def find(self, request: Request) -> PrefixHit | None:
        """The longest cached prefix of ``request``'s tokens (whole pages, short of its last token),
        or None; changes nothing."""
        if request.sampling.prompt_logprobs is not None:
            return None  # its prompt must be scored by a forward over every position, as vLLM does
        pt = self.table.page_tokens
        usable = (request.num_tokens - 1) // pt * pt
        hashes = self.index.hashes(request.token_ids[:usable])
        pages = self.index.match(hashes)
        k = j = len(pages)
        while j < len(hashes) and hashes[j] in self._host:
            j += 1
        if not j:
            return None
        cached = sum(1 for p in pages if self.index.is_cached(p))
        return PrefixHit(j * pt, cached, j - k, (pages, hashes[:k], hashes[k:j]))

    def admit(self, request: Request, hit: PrefixHit | None) -> int:
        """``request`` (holding no pages yet) is admitted: it holds ``hit``'s pages from now on;
        returns the tokens they cover. Counts the lookup either way."""
        self.query_tokens += request.num_tokens
        if hit is None:
            return 0
        pages, hashes, host = hit.handle
        if pages:
            self.table.share(request.request_id, pages, hashes)
        if host:
            try:
                self._promote(request, len(pages), host)
            except BaseException:
                if request.request_id in self.table:
                    self.table.free(request.request_id)
                raise
        # their tokens came back: worth keeping when idle (a promoted page whose hash another
        # page already holds stays private, and unindexed)
        first = 0
        for p in self.table.get(request.request_id).pages[: len(pages) + len(host)]:
            if self.index.is_indexed(p):
                first += self.index.mark_reused(p)
        self.recent.reused(self.clock(), first)
        self.hit_tokens += hit.tokens
        self.host_hit_tokens += len(host) * self.table.page_tokens
        return hit.tokens

    def _promote(self, request: Request, k: int, host: list[bytes]) -> None:
        """Bring ``host`` (the hashes of pages ``k``.. of ``request``'s prefix) back from the host tier."""
        assert self.swap is not None
        pt = self.table.page_tokens
        pool = self.table.pool
        short = len(host) - pool.free_pages
        if short > 0:
            self.evict_for_alloc(short)
        self.table.ensure(request.request_id, (k + len(host)) * pt)  # MemoryError: nothing allocated
        new = self.table.get(request.request_id).pages[k:]
        data = torch.cat([self.swap.peek(("prefix", h))[0] for h in host])
        pool.write_pages(new, data)
        self.table.fill(request.request_id, (k + len(host)) * pt)
        self.table.publish(request.request_id, request.token_ids, (k + len(host)) * pt)
        for h in host:
            self._drop_host(h)

    def publish(self, request: Request) -> None:
        """Index the pages ``request`` has filled since the last call; a page whose hash had been
        evicted before (a ghost hit) is marked reused: its tokens came back."""
        if request.request_id not in self.table:
            return
        entry = self.table.get(request.request_id)
        done = len(entry.hashes)
        added = self.table.publish(request.request_id, request.token_ids, request.num_computed)
        if not added:
            return
        now = self.clock()
        self.recent.published(now, added)
        if not self._ghosts:
            return
        back = 0
        for h in entry.hashes[done:]:
            if self._ghosts.pop(h, None) is not None:
                page = self.index.page_of(h)
                if page is not None:
                    back += self.index.mark_reused(page)
                    self.ghost_hits += 1
        self.recent.reused(now, back)

    # -- giving pages up -----------------------------------------------------------------------
    def evict_for_alloc(self, n: int) -> int:
        """Free up to ``n`` cached pages for an allocation; returns how many."""
        return self._evict(pressure_victims(self.index, n), "pressure")

    def evict_unused_for_alloc(self, n: int) -> int:
        """An allocation that would map new memory: while ``keeps_unused_when_idle`` is false,
        free ``n`` cached pages whose tokens never came back instead (reason "pressure"), so
        that a cache nobody reads does not grow the pool; none when fewer than ``n`` are
        such pages (the map happens anyway); returns how many."""
        if n <= 0 or self.keeps_unused_when_idle():
            return 0
        victims = idle_victims(self.index, n)
        if len(victims) < n:
            return 0  # the pool maps a chunk anyway: keep them, it has room for them now
        return self._evict(victims, "pressure")

    def evict_to(self, max_pages: int, reason: str) -> int:
        """Free cached pages until held + cached pages fit ``max_pages``: whole all-cached
        chunks first (see ``eviction.py``); returns how many."""
        over = self.table.live_pages + self.index.cached_pages - max_pages
        return self._evict(budget_victims(self.index, over, self.pages_per_chunk, self._held()), reason)

    def keeps_unused_when_idle(self) -> bool:
        """Whether recent traffic reuses enough of its pages that an idle shrink keeps those not
        reused yet (``EvictionPolicy.idle_keep_reuse``)."""
        return self.recent.share(self.clock()) >= self.policy.idle_keep_reuse

    def evict_unused_to(self, max_pages: int) -> int:
        """An idle shrink while ``keeps_unused_when_idle`` is false: free cached pages whose
        tokens never came back until held + cached pages fit ``max_pages`` (as far as such
        pages go); returns how many."""
        over = self.table.live_pages + self.index.cached_pages - max_pages
        return self._evict(idle_victims(self.index, over), "idle") if over > 0 else 0

    def expire(self) -> int:
        """Give up pages past their expiry (on the device and the host), then pages over the
        cap; returns how many device pages went."""
        now = self.clock()
        expiry = self.policy.expiry_seconds
        while self._host and expiry is not None and now - next(iter(self._host.values())) >= expiry:
            self._drop_host(next(iter(self._host)))
        n = self._evict(expired_victims(self.index, now, expiry), "expiry")
        cap = self.policy.cap_bytes
        if cap is not None:
            over = self.index.cached_pages - cap // self.page_bytes
            n += self._evict(pressure_victims(self.index, over), "cap")
        return n

    def reset(self) -> int:
        """Give up every cached page, on the host too (the pages requests hold stay); returns
        how many device pages went."""
        while self._host:
            self._drop_host(next(iter(self._host)))
        return self._evict(budget_victims(self.index, self.index.cached_pages, self.pages_per_chunk, ()), "reset")

    def _evict(self, pages: list[int], reason: str) -> int:
        if not pages:
            return 0
        now = self.clock()
        if self.swap is not None and reason in DEMOTED_BY:
            self._demote(pages, now)
        for p in pages:
            self._ghosts[self.index.hash_of(p)] = now
            self._ghosts.move_to_end(self.index.hash_of(p))
        self.table.evict(pages)
        self.evictions[reason] += len(pages)
        self._forget_ghosts(now)
        return len(pages)

    def _demote(self, pages: list[int], now: float) -> None:
        """Copy evicted pages to the host tier while the swap space has room."""
        assert self.swap is not None
        page_bytes = self.page_bytes
        keep = [p for p in pages if self.index.hash_of(p) not in self._host]
        keep = keep[: (self.swap.capacity_bytes - self.swap.used_bytes) // page_bytes]
        if not keep:
            return
        data = self.table.pool.read_pages(keep)
        for i, p in enumerate(keep):
            h = self.index.hash_of(p)
            self.swap.put(("prefix", h), data[i : i + 1], self.table.page_tokens, 1)
            self._host[h] = now
        self.demoted_pages += len(keep)

    def _drop_host(self, h: bytes) -> None:
        if self._host.pop(h, None) is not None:
            self.swap.drop(("prefix", h))  # type: ignore[union-attr]

    def make_swap_room(self, nbytes: int) -> bool:
        """Drop demoted pages, oldest first, until the swap space can store ``nbytes`` (a
        preempted request comes before cached prefixes); returns whether it can."""
        if self.swap is None:
            return False
        while self._host and not self.swap.can_store(nbytes):
            self._drop_host(next(iter(self._host)))
        return self.swap.can_store(nbytes)

    def _forget_ghosts(self, now: float) -> None:
        expiry = self.policy.expiry_seconds
        ghosts = self._ghosts
        while ghosts and (
            len(ghosts) > MAX_GHOSTS or (expiry is not None and now - next(iter(ghosts.values())) >= expiry)
        ):
            ghosts.popitem(last=False)

    def _held(self) -> list[int]:
        return [p for rid in self.table.ids() for p in self.table.get(rid).pages]

    # -- figures -------------------------------------------------------------------------------
    @property
    def cached_pages(self) -> int:
        return self.index.cached_pages

    def stats(self) -> dict[str, Any]:
        """prefix_query_tokens / prefix_hit_tokens (tokens looked up / found), cached_bytes
        (reclaimable pages no request holds), prefix_evictions_<reason> (pages given up)."""
        out: dict[str, Any] = {
            "prefix_caching": True,
            "prefix_query_tokens": self.query_tokens,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_ghost_hits": self.ghost_hits,
            "prefix_recent_reuse": round(self.recent.share(self.clock()), 4),
            "cached_bytes": self.index.cached_pages * self.page_bytes,
            "cached_host_bytes": len(self._host) * self.page_bytes,
            "prefix_hit_tokens_device": self.hit_tokens - self.host_hit_tokens,
            "prefix_hit_tokens_host": self.host_hit_tokens,
            "prefix_demoted_pages": self.demoted_pages,
            "prefix_expiry_seconds": self.policy.expiry_seconds,
            "prefix_cap_bytes": self.policy.cap_bytes,
        }
        out.update({f"prefix_evictions_{r}": n for r, n in self.evictions.items()})
        return out
