"""Which cached prefix pages to give up, and when: the prefix cache's eviction policy.

Plain Python, no torch. A cached page is a full KV page that no request holds but whose
tokens a later request may share (``kv/prefix_index.py``). Cached pages are *reclaimable*,
never demand: the elastic policy sizes residency from live requests alone, and this policy
says how long the rest is kept.

Kept while all of these hold:

* the budget (or a broker's lease) has room: any allocation that needs the room takes cached
  pages first, and a budget cut, a lease reclaim or sleep takes them before it preempts any
  live request;
* each page is younger than ``expiry_seconds`` since its last use (default 300 s: replaying the
  Mooncake conversation trace, 79 % of prefix hits come within 300 s of the block's last use,
  97 % within 900 s);
* together they fit ``cap_bytes`` (default ``None``: whatever the budget leaves free);
* and, when memory goes back on an idle shrink, the page has shown it is worth keeping: its
  tokens came back at least once, as a hit, or as a page computed again whose hash had been
  evicted (a *ghost* hit: the hashes of evicted pages are remembered for ``expiry_seconds``).
  Pages whose tokens were seen once go back with the idle shrink like free pages, so traffic
  without shared prefixes gives memory back as if there were no cache, a conversation's
  second turn (a ghost hit) marks its prefix, and its third turn hits (admission on the
  second sighting, as caches in front of CDNs do).

Order, in each case:

* **pressure** (an allocation needs room) and **cap**: least recently used first, the deepest
  page of a chain before its parent, so a chain is never cut in the middle;
* **giving memory back** (budget cut, lease reclaim, sleep): first whole chunks whose pages
  are all cached, least recently used chunk first, since each such chunk unmaps at once; then
  pages in the pressure order; the memory controller's compaction then packs the surviving
  cached and live pages into fewer chunks;
* **expiry**: every page past its age, deepest first;
* **idle** (an idle shrink): the pages never reused, in the pressure order.

Idle, a server therefore keeps its cached prefixes until they expire and then returns to the
floor; everything here is undone by a miss, never by a wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Protocol

from .._util import is_int

__all__ = ["EvictionPolicy", "budget_victims", "expired_victims", "idle_victims", "pressure_victims"]


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
    """

    expiry_seconds: Optional[float] = 300.0
    cap_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        e = self.expiry_seconds
        if e is not None and (not isinstance(e, (int, float)) or isinstance(e, bool) or not e >= 0):
            raise ValueError(f"EvictionPolicy: expiry_seconds must be None or >= 0, got {e!r}")
        c = self.cap_bytes
        if c is not None and (not is_int(c) or c < 0):
            raise ValueError(f"EvictionPolicy: cap_bytes must be None or a non-negative int, got {c!r}")


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
