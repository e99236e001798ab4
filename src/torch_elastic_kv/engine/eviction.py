"""Which cached prefix pages to give up, and when: the prefix cache's eviction policy.

Plain Python, no torch. A cached page is a full KV page that no request holds but whose
tokens a later request may share (``kv/prefix_index.py``). Cached pages are *reclaimable*,
never demand: the elastic policy sizes residency from live requests alone, and this policy
says how long the rest is kept.

Kept while all of these hold:

* the budget (or a broker's lease) has room: any allocation that needs the room takes cached
  pages first, and a budget cut, a lease reclaim or sleep takes them before it preempts any
  live request;
* the pool has them mapped already, unless the traffic reuses its pages (``idle_keep_reuse``,
  below): without reuse, an allocation that would map a new chunk takes the cached pages
  never reused first, so a cache nobody reads never makes the pool grow (and then shrink
  again under load once the idle hysteresis sees resident memory far above demand);
* each page is younger than ``expiry_seconds`` since its last use (default 300 s: replaying the
  Mooncake conversation trace, 79 % of prefix hits come within 300 s of the block's last use,
  97 % within 900 s);
* together they fit ``cap_bytes`` (default ``None``: whatever the budget leaves free);
* and, when memory goes back on an idle shrink, the page is worth keeping: its tokens came
  back at least once, as a hit, or as a page computed again whose hash had been evicted (a
  *ghost* hit: the hashes of evicted pages are remembered for ``expiry_seconds``) -- or the
  traffic shows that pages come back: at least ``idle_keep_reuse`` (default 2 %) of the pages
  published over the last ``expiry_seconds`` were reused later (``RecentReuse``; traffic
  of unrelated prompts stays at 0 or near it, the Mooncake conversation replay climbs past
  2 % within its first 10 s and to 30 %). So traffic
  without shared prefixes gives memory back on idle shrinks as if there were no cache (one
  accidental match keeps only the pages it matched), while conversation traffic, whose next
  turn comes back a minute or more later, keeps its fresh pages until they expire. With too
  little reuse a conversation's second turn (a ghost hit) marks its prefix and its third turn
  hits (admission on the second sighting, as caches in front of CDNs do); the ghost hits also
  raise the measured reuse, which turns the keeping back on.

Order, in each case:

* **pressure** (an allocation needs room) and **cap**: least recently used first, the deepest
  page of a chain before its parent, so a chain is never cut in the middle (pages never
  reused only, when the allocation would otherwise map memory);
* **giving memory back** (budget cut, lease reclaim, sleep): first whole chunks whose pages
  are all cached, least recently used chunk first, since each such chunk unmaps at once; then
  pages in the pressure order; the memory controller's compaction then packs the surviving
  cached and live pages into fewer chunks;
* **expiry**: every page past its age, deepest first;
* **idle** (an idle shrink): the pages never reused, in the pressure order, unless recent
  traffic reuses enough of its pages (above).

Idle, a server therefore keeps its cached prefixes until they expire and then returns to the
floor; everything here is undone by a miss, never by a wrong answer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Protocol

from .._util import is_int

__all__ = ["EvictionPolicy", "RecentReuse", "budget_victims", "expired_victims", "idle_victims", "pressure_victims"]


class _Index(Protocol):
    """What the policy reads of ``kv.prefix_index.PrefixIndex``."""

    @property
    def cached_pages(self) -> int: ...
    def cached(self) -> list[int]: ...
    def iter_cached(self) -> Iterable[int]: ...
    def is_reused(self, page: int) -> bool: ...
    def released_at(self, page: int) -> float: ...
    def subtree(self, page: int) -> list[int]: ...
    def children(self, page: int) -> set[int]: ...


@dataclass(frozen=True)
class EvictionPolicy:
    """The prefix cache's knobs.

    Args:
        expiry_seconds: a cached page unused this long is given back (``None``: never).
        cap_bytes: most bytes of cached pages (``None``: what the budget leaves free).
        idle_keep_reuse: an idle shrink keeps cached pages not reused yet while at least this
            share (0-1) of the pages published over the last ``expiry_seconds`` came back; 0
            keeps them always (until they expire), 1 only when every page came back.
    """

    expiry_seconds: Optional[float] = 300.0
    cap_bytes: Optional[int] = None
    idle_keep_reuse: float = 0.02

    def __post_init__(self) -> None:
        e = self.expiry_seconds
        if e is not None and (not isinstance(e, (int, float)) or isinstance(e, bool) or not e >= 0):
            raise ValueError(f"EvictionPolicy: expiry_seconds must be None or >= 0, got {e!r}")
        c = self.cap_bytes
        if c is not None and (not is_int(c) or c < 0):
            raise ValueError(f"EvictionPolicy: cap_bytes must be None or a non-negative int, got {c!r}")
        k = self.idle_keep_reuse
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 <= k <= 1:
            raise ValueError(f"EvictionPolicy: idle_keep_reuse must be a number in [0, 1], got {k!r}")

    @property
    def reuse_window_seconds(self) -> float:
        """How far back ``RecentReuse`` looks: the expiry, or 300 s when pages never expire."""
        return 300.0 if self.expiry_seconds is None else float(self.expiry_seconds)


class RecentReuse:
    """Of the pages published over the last ``window_seconds``, how many came back later.

    Counts per second (a bounded deque), so it costs O(1) per event. The share is the
    evidence an idle shrink weighs before giving up pages not reused yet: traffic whose pages
    come back (conversations, agents re-sending their context) keeps them until they expire;
    traffic whose pages do not, gives them back.
    """

    def __init__(self, window_seconds: float) -> None:
        if not (window_seconds >= 0 and math.isfinite(window_seconds)):
            raise ValueError(f"RecentReuse: window_seconds must be a finite number >= 0, got {window_seconds!r}")
        self.window_seconds = window_seconds
        self._buckets: deque[list[int]] = deque()  # [second, published, reused], oldest first
        self._published = 0
        self._reused = 0

    def _bucket(self, now: float) -> list[int]:
        self._forget(now)
        second = math.floor(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def _forget(self, now: float) -> None:
        b = self._buckets
        while b and now - b[0][0] > self.window_seconds:
            _, published, reused = b.popleft()
            self._published -= published
            self._reused -= reused

    def published(self, now: float, pages: int) -> None:
        """``pages`` pages were indexed at ``now``."""
        if pages > 0:
            self._bucket(now)[1] += pages
            self._published += pages

    def reused(self, now: float, pages: int) -> None:
        """``pages`` pages (or their hashes, evicted) came back for the first time at ``now``."""
        if pages > 0:
            self._bucket(now)[2] += pages
            self._reused += pages

    def share(self, now: float) -> float:
        """Pages that came back / pages published, over the window (0 with nothing published)."""
        self._forget(now)
        return min(1.0, self._reused / self._published) if self._published else 0.0


def _leaves_in_order(index: _Index, n: int, taken: set[int], only_unused: bool = False) -> list[int]:
    """Up to ``n`` cached pages in eviction order, each a leaf once the pages before it are
    gone (a page whose children are all taken is a leaf for this plan). Pages released
    together are queued deepest first, so the first pass usually suffices, and it stops as soon
    as it has ``n``: an allocation's eviction does not walk the whole cache.
    ``only_unused``: pages never reused only."""
    out: list[int] = []
    while len(out) < n:
        progress = False
        for page in index.iter_cached():
            if page in taken or (only_unused and index.is_reused(page)):
                continue
            if index.children(page) <= taken:
                out.append(page)
                taken.add(page)
                progress = True
                if len(out) >= n:
                    break
        if not progress:
            break
    return out


def pressure_victims(index: _Index, n: int) -> list[int]:
    """``n`` pages (fewer if fewer are cached) to free for an allocation, in removal order."""
    return _leaves_in_order(index, n, set()) if n > 0 else []


def idle_victims(index: _Index, n: int) -> list[int]:
    """Up to ``n`` cached pages whose tokens never came back, to free on an idle shrink."""
    return _leaves_in_order(index, n, set(), only_unused=True) if n > 0 else []


def expired_victims(index: _Index, now: float, expiry_seconds: Optional[float]) -> list[int]:
    """Every cached page unused for ``expiry_seconds``, with whatever sits below it, deepest first."""
    if expiry_seconds is None:
        return []
    old: list[int] = []
    for page in index.iter_cached():  # oldest release first: stop at the first young page
        if now - index.released_at(page) < expiry_seconds:
            break
        old.append(page)
    out: list[int] = []
    taken: set[int] = set()
    for page in old:
        if page not in taken:
            for p in index.subtree(page):
                if p not in taken:
                    taken.add(p)
                    out.append(p)
    return out


def budget_victims(index: _Index, n: int, pages_per_chunk: int, held: Iterable[int]) -> list[int]:
    """At least ``n`` pages (or every cached one) to free for a budget cut, in removal order:
    whole chunks with no held page first (least recently used chunk first), then leaves."""
    if n <= 0:
        return []
    held_chunks = {p // pages_per_chunk for p in held}
    chunks: dict[int, list[int]] = {}
    for page in index.cached():
        c = page // pages_per_chunk
        if c not in held_chunks:
            chunks.setdefault(c, []).append(page)
    order = sorted(chunks, key=lambda c: max(index.released_at(p) for p in chunks[c]))
    out: list[int] = []
    taken: set[int] = set()
    for c in order:
        if len(out) >= n:
            break
        for page in chunks[c]:
            for p in index.subtree(page):
                if p not in taken:
                    taken.add(p)
                    out.append(p)
    if len(out) < n:
        out += _leaves_in_order(index, n - len(out), taken)
    return out
