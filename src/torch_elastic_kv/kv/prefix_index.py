"""Prefix caching's bookkeeping: full KV pages found by the tokens they hold.

Plain Python, no torch and no memory. Levels, as everywhere in kv/: a request's tokens ->
its full pages, each named by a **chained hash** (the parent page's hash + this page's token
ids + a salt for the model and anything else that changes K/V) -> a page id in the pool.
Because the chain starts at the first token, equal hashes mean equal tokens at equal
positions, so equal K/V.

An indexed page is either **referenced** (some request holds it; ``PageTable`` counts the
holders) or **cached**: no request holds it, it stays allocated in the pool, and it is
*reclaimable*: any allocation, budget cut or give-back may take it. Cached pages sit in one
ordered structure whose order is the eviction order: least recently released first, and,
among pages released together, the deepest page of a chain first (a request releases its
pages last-to-first). ``remove`` takes cached leaves only (no cached child left), so a chain
of cached pages is never cut in the middle. A held page may hang below a cached one (a request
computed a page again that another request had cached, then went on past it); such a child
does not keep its cached parent alive: it loses the link, and is found again only if its own
chain is.

Which pages to evict, and when, is the engine's eviction policy (``engine/eviction.py``);
this module only keeps the order and the index.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .._util import is_int

__all__ = ["PrefixIndex", "chain_hashes"]

ROOT = b""  # the parent hash of a chain's first page


def chain_hashes(
    token_ids: Sequence[int], page_tokens: int, salt: bytes, parent: bytes = ROOT, start_page: int = 0
) -> list[bytes]:
    """Hashes of the full pages of ``token_ids`` from page ``start_page`` on, chained from
    ``parent`` (the hash of page ``start_page - 1``; ``ROOT`` for the first page)."""
    out: list[bytes] = []
    h = parent
    full = len(token_ids) // page_tokens
    for i in range(start_page, full):
        tokens = array("q", token_ids[i * page_tokens : (i + 1) * page_tokens]).tobytes()
        h = hashlib.blake2b(h + tokens, digest_size=16, key=salt[:64]).digest()
        out.append(h)
    return out


@dataclass
class _Entry:
    hash: bytes
    parent: Optional[int]  # the page holding the previous page of the chain, if indexed
    children: set[int] = field(default_factory=set)  # indexed pages whose parent this is
    released_at: float = 0.0  # when it last became cached
    reused: bool = False  # its tokens came back: a hit, or a recompute of an evicted page


class PrefixIndex:
    """Chained hash -> page for full pages, and the cached (unreferenced) ones in eviction order.

    Args:
        page_tokens: tokens per page.
        salt: bytes that make K/V of equal tokens differ between caches (model, dtype, ...).
        clock: seconds, for when a page became cached (expiry).
    """

    def __init__(self, page_tokens: int, salt: bytes = b"", clock: Optional[Callable[[], float]] = None) -> None:
        if not is_int(page_tokens) or page_tokens <= 0:
            raise ValueError(f"PrefixIndex: page_tokens must be a positive int, got {page_tokens!r}")
        if not isinstance(salt, bytes):
            raise ValueError(f"PrefixIndex: salt must be bytes, got {type(salt).__name__}")
        self.page_tokens = page_tokens
        self.salt = salt
        self.clock = clock or time.monotonic
        self._page_of: dict[bytes, int] = {}
        self._entry: dict[int, _Entry] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # eviction order, oldest first

    # -- reading -------------------------------------------------------------------------------
    def hashes(self, token_ids: Sequence[int], parent: bytes = ROOT, start_page: int = 0) -> list[bytes]:
        """Chained hashes of the full pages of ``token_ids`` (see ``chain_hashes``)."""
        return chain_hashes(token_ids, self.page_tokens, self.salt, parent, start_page)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages of the longest indexed prefix of ``hashes`` (referenced or cached)."""
        out: list[int] = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def page_of(self, h: bytes) -> Optional[int]:
        """The page indexed under hash ``h``, or None."""
        return self._page_of.get(h)

    def is_indexed(self, page: int) -> bool:
        return page in self._entry

    def is_cached(self, page: int) -> bool:
        return page in self._cached

    def hash_of(self, page: int) -> bytes:
        return self._entry[page].hash

    @property
    def indexed_pages(self) -> int:
        return len(self._entry)

    @property
    def cached_pages(self) -> int:
        """Indexed pages no request holds: allocated, reclaimable."""
        return len(self._cached)

    def cached(self) -> list[int]:
        """Cached pages in eviction order (first = evicted first, leaves before parents aside)."""
        return list(self._cached)

    def iter_cached(self) -> Iterable[int]:
        """The cached pages in eviction order without a copy: also oldest release first (the
        queue is kept in release order), so an age scan stops at the first young page. Do not
        change the index while iterating."""
        return iter(self._cached)

    def is_reused(self, page: int) -> bool:
        return self._entry[page].reused

    def mark_reused(self, page: int) -> bool:
        """The page's tokens came back (a hit, or its hash was evicted before and computed again):
        keeping it is worth memory an idle shrink could give back. Returns whether this is the
        first time."""
        entry = self._entry[page]
        first = not entry.reused
        entry.reused = True
        return first

    def released_at(self, page: int) -> float:
        return self._entry[page].released_at

    def children(self, page: int) -> set[int]:
        """Cached pages whose parent ``page`` is (held children do not count: see above)."""
        return {c for c in self._entry[page].children if c in self._cached}

    def subtree(self, page: int) -> list[int]:
        """``page`` and every cached page below it, deepest first (an order ``remove`` takes)."""
        out: list[int] = []
        stack = [(page, False)]
        while stack:
            p, expanded = stack.pop()
            if expanded:
                out.append(p)
                continue
            stack.append((p, True))
            stack.extend((c, False) for c in self.children(p))
        return out

    # -- changing ------------------------------------------------------------------------------
    def insert(self, page: int, h: bytes, parent_hash: bytes) -> bool:
        """Index ``page`` (held by a request) under ``h``, the child of the page indexed under
        ``parent_hash`` (``ROOT`` for a first page); False when ``h`` is indexed already
        (another page holds the same tokens: ``page`` stays private)."""
        if h in self._page_of or page in self._entry:
            return False
        self._page_of[h] = page
        parent = self._page_of.get(parent_hash) if parent_hash != ROOT else None
        self._entry[page] = _Entry(h, parent)
        if parent is not None:
            self._entry[parent].children.add(page)
        return True

    def park(self, pages: Iterable[int]) -> list[int]:
        """Pages no request holds any more: the indexed ones become cached (given in chain
        order, they are queued deepest first); returns the others, for the caller to free."""
        now = self.clock()
        loose: list[int] = []
        for page in reversed(list(pages)):
            entry = self._entry.get(page)
            if entry is None:
                loose.append(page)
                continue
            entry.released_at = now
            self._cached[page] = None
            self._cached.move_to_end(page)
        loose.reverse()
        return loose

    def unpark(self, page: int) -> None:
        """A cached page is held by a request again (a prefix hit)."""
        self._cached.pop(page, None)

    def remove(self, page: int) -> None:
        """Forget a cached leaf (evicted: the caller frees it). Its parent may become a leaf."""
        if page not in self._cached:
            raise ValueError(f"PrefixIndex.remove: page {page} is not cached")
        entry = self._entry[page]
        cached = self.children(page)
        if cached:
            raise ValueError(f"PrefixIndex.remove: page {page} still has {len(cached)} cached children")
        del self._cached[page]
        self._drop(page, entry)

    def forget(self, page: int) -> None:
        """Drop a referenced page from the index (its holder frees it later as a private page)."""
        entry = self._entry.get(page)
        if entry is None:
            return
        self._cached.pop(page, None)
        self._drop(page, entry)

    def _drop(self, page: int, entry: _Entry) -> None:
        del self._entry[page]
        del self._page_of[entry.hash]
        if entry.parent is not None and entry.parent in self._entry:
            self._entry[entry.parent].children.discard(page)
        for child in entry.children:  # unreachable from the root now; evicted in their turn
            self._entry[child].parent = None

    def remap(self, moves: dict[int, int]) -> None:
        """Apply a compaction's ``{old page: new page}``: moved pages keep their hashes."""
        if not moves:
            return
        entries = {moves.get(p, p): e for p, e in self._entry.items()}
        for e in entries.values():
            if e.parent is not None:
                e.parent = moves.get(e.parent, e.parent)
            e.children = {moves.get(c, c) for c in e.children}
        self._entry = entries
        self._page_of = {e.hash: p for p, e in entries.items()}
        self._cached = OrderedDict((moves.get(p, p), None) for p in self._cached)

    def clear(self) -> list[int]:
        """Forget everything; returns the cached pages (the caller frees them)."""
        cached = list(self._cached)
        self._page_of.clear()
        self._entry.clear()
        self._cached.clear()
        return cached
