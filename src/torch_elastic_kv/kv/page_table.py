"""Which pages each request holds: the one place that knows.

A ``PageTable`` maps a request id to its ``PageList`` (page ids in token order, and how many
tokens of K/V they store) over one page pool. The cache's packed mode plans its steps from it
and the Engine's scheduler asks it how many pages a request holds; nothing else keeps a copy,
so a compaction's page moves (``remap``) have one table to fix.

With a ``PrefixIndex`` (prefix caching), full pages are shared: the table counts each page's
holders, ``share`` gives a request pages another request computed, ``publish`` indexes a
request's newly full pages, and a page whose last holder lets go becomes *cached* (indexed,
still allocated, reclaimable) instead of free; ``evict`` frees cached pages. Without an index
every page has one holder and frees go straight back to the pool, as before.

Not thread-safe by itself: its users (the Engine, a cache driven from one thread) serialise
their calls, as they do for the forward that reads the pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .._util import ceil_div, is_int
from .prefix_index import ROOT, PrefixIndex

__all__ = ["PageList", "PageTable"]


class _Pages(Protocol):
    """What a page table needs from a pool."""

    def alloc(self, n: int) -> list[int]: ...
    def free(self, ids: list[int]) -> None: ...
    def is_live(self, page: int) -> bool: ...


@dataclass
class PageList:
    """One request's pages, in token order, how many tokens of K/V they hold, and the chained
    hashes of its leading full pages computed so far (prefix caching)."""

    pages: list[int] = field(default_factory=list)
    tokens: int = 0
    hashes: list[bytes] = field(default_factory=list)


class PageTable:
    """Request id -> ``PageList`` over ``pool``, with the total of pages held kept as it changes.

    ``pool`` may be set later (a cache creates its pool at its first forward); every call that
    needs pages then raises RuntimeError until it is.
    """

    def __init__(self, page_tokens: int, pool: _Pages | None = None, prefix: Optional[PrefixIndex] = None) -> None:
        if not is_int(page_tokens) or page_tokens <= 0:
            raise ValueError(f"PageTable: page_tokens must be a positive int, got {page_tokens!r}")
        if prefix is not None and prefix.page_tokens != page_tokens:
            raise ValueError(f"PageTable: the prefix index has {prefix.page_tokens}-token pages, not {page_tokens}")
        self.page_tokens = page_tokens
        self.pool = pool
        self.prefix = prefix
        self._lists: dict[int, PageList] = {}
        self._refs: dict[int, int] = {}  # page -> requests holding it

    # -- reading -------------------------------------------------------------------------------
    def __contains__(self, request_id: object) -> bool:
        return request_id in self._lists

    def __len__(self) -> int:
        return len(self._lists)

    def ids(self) -> list[int]:
        """Request ids that hold an entry, in the order they got it."""
        return list(self._lists)

    def get(self, request_id: int, what: str = "PageTable.get") -> PageList:
        """The live entry of ``request_id`` (not a copy); KeyError naming ``what`` if none."""
        entry = self._lists.get(request_id)
        if entry is None:
            raise KeyError(f"{what}: unknown request {request_id}")
        return entry

    def page_count(self, request_id: int) -> int:
        """Pages ``request_id`` holds (0 without an entry)."""
        entry = self._lists.get(request_id)
        return len(entry.pages) if entry is not None else 0

    @property
    def live_pages(self) -> int:
        """Pages held by the requests (a shared page counts once)."""
        return len(self._refs)

    @property
    def cached_pages(self) -> int:
        """Pages no request holds that the prefix index keeps (allocated, reclaimable)."""
        return 0 if self.prefix is None else self.prefix.cached_pages

    def holders(self, page: int) -> int:
        """How many requests hold ``page``."""
        return self._refs.get(page, 0)

    @property
    def stored_tokens(self) -> int:
        return sum(e.tokens for e in self._lists.values())

    # -- changing ------------------------------------------------------------------------------
    def _require_pool(self) -> _Pages:
        if self.pool is None:
            raise RuntimeError("PageTable: no pool yet")
        return self.pool

    def ensure(self, request_id: int, total_tokens: int) -> None:
        """Give ``request_id`` (an entry is created if new) pages for ``total_tokens`` tokens.

        All or nothing: MemoryError / torch.OutOfMemoryError from the pool leaves the table as
        it was (no entry is created for a new request).
        """
        if not is_int(total_tokens) or total_tokens < 0:
            raise ValueError(f"ensure_capacity: total_tokens must be an int >= 0, got {total_tokens!r}")
        entry = self._lists.get(request_id)
        have = len(entry.pages) if entry is not None else 0
        need = ceil_div(total_tokens, self.page_tokens) - have
        fresh = self._require_pool().alloc(need) if need > 0 else []
        if entry is None:
            entry = self._lists[request_id] = PageList()
        entry.pages.extend(fresh)
        for p in fresh:
            self._refs[p] = 1

    def free(self, request_id: int, what: str = "PageTable.free") -> None:
        """Let go of every page of ``request_id`` and drop its entry: a page nobody else holds
        goes back to the pool, or, when the prefix index keeps it, becomes cached."""
        entry = self.get(request_id, what)
        del self._lists[request_id]
        self._unref(entry.pages)

    def _unref(self, pages: Sequence[int]) -> None:
        unheld = []
        for p in pages:
            n = self._refs[p] - 1
            if n:
                self._refs[p] = n
            else:
                del self._refs[p]
                unheld.append(p)
        loose = self.prefix.park(unheld) if self.prefix is not None else unheld
        if loose:
            self._require_pool().free(loose)

    def detach(self, request_id: int, what: str = "PageTable.detach") -> tuple[list[int], int]:
        """Drop the entry but keep its pages live: ``(pages, tokens)``, owned by the caller now.

        Only for a request whose pages nobody else holds (ValueError otherwise, nothing
        changed); its pages leave the prefix index, since their new owner may free them."""
        entry = self.get(request_id, what)
        shared = [p for p in entry.pages if self._refs[p] > 1]
        if shared:
            raise ValueError(f"{what}: request {request_id} shares pages {shared[:8]} with other requests")
        del self._lists[request_id]
        for p in entry.pages:
            del self._refs[p]
            if self.prefix is not None:
                self.prefix.forget(p)
        return entry.pages, entry.tokens

    def attach(self, request_id: int, pages: list[int], tokens: int, what: str = "PageTable.attach") -> None:
        """Adopt live ``pages`` holding ``tokens`` tokens as ``request_id``'s entry."""
        pool = self._require_pool()
        if request_id in self._lists:
            raise ValueError(f"{what}: request {request_id} already holds pages")
        pages = [int(p) for p in pages]
        if not is_int(tokens) or not 0 <= tokens <= len(pages) * self.page_tokens:
            raise ValueError(f"{what}: {len(pages)} pages of {self.page_tokens} tokens cannot hold {tokens!r} tokens")
        cached = self.prefix is not None and any(self.prefix.is_indexed(p) for p in pages)
        bad = [p for p in pages if not pool.is_live(p) or p in self._refs]
        if bad or cached or len(set(pages)) != len(pages):
            raise ValueError(
                f"{what}: pages {bad[:8] or pages} are not live, duplicated or held by another request (or cached)"
            )
        self._lists[request_id] = PageList(pages, tokens)
        for p in pages:
            self._refs[p] = 1

    # -- sharing (prefix caching) --------------------------------------------------------------
    def enable_prefix(self, prefix: PrefixIndex) -> None:
        """Turn prefix caching on for an empty table (an Engine does this once)."""
        if self._lists or self._refs:
            raise RuntimeError("PageTable.enable_prefix: the table already holds pages")
        if prefix.page_tokens != self.page_tokens:
            raise ValueError(
                f"PageTable: the prefix index has {prefix.page_tokens}-token pages, not {self.page_tokens}"
            )
        self.prefix = prefix

    def share(self, request_id: int, pages: list[int], hashes: list[bytes], what: str = "PageTable.share") -> None:
        """Give a new ``request_id`` the indexed full ``pages`` (a prefix hit; ``hashes`` are
        theirs): it holds them with whoever else does, and they stop being reclaimable."""
        prefix = self._require_prefix(what)
        if request_id in self._lists:
            raise ValueError(f"{what}: request {request_id} already holds pages")
        if len(pages) != len(hashes) or any(
            not prefix.is_indexed(p) or prefix.hash_of(p) != h for p, h in zip(pages, hashes)
        ):
            raise ValueError(f"{what}: pages {pages[:8]} are not the indexed pages of those hashes")
        for p in pages:
            n = self._refs.get(p, 0)
            if n == 0:
                prefix.unpark(p)
            self._refs[p] = n + 1
        self._lists[request_id] = PageList(list(pages), len(pages) * self.page_tokens, list(hashes))

    def publish(self, request_id: int, token_ids: Sequence[int], computed: int) -> int:
        """Index the full pages of ``request_id`` whose ``computed`` leading tokens are
        ``token_ids[:computed]``, from the first not indexed yet; returns how many were new."""
        prefix = self.prefix
        if prefix is None:
            return 0
        entry = self.get(request_id, "PageTable.publish")
        done = len(entry.hashes)
        full = min(computed // self.page_tokens, len(entry.pages))
        if full <= done:
            return 0
        parent = entry.hashes[-1] if entry.hashes else ROOT
        new = prefix.hashes(token_ids[: full * self.page_tokens], parent, done)
        added = 0
        for i, h in enumerate(new, start=done):
            added += prefix.insert(entry.pages[i], h, parent)
            parent = h
        entry.hashes.extend(new)
        return added

    def fill(self, request_id: int, tokens: int) -> None:
        """Record that ``request_id``'s pages now hold ``tokens`` tokens of K/V written by
        someone other than a forward (a prefix promoted from the host tier)."""
        entry = self.get(request_id, "PageTable.fill")
        if not is_int(tokens) or not entry.tokens <= tokens <= len(entry.pages) * self.page_tokens:
            raise ValueError(
                f"PageTable.fill: request {request_id} holds {entry.tokens} tokens in {len(entry.pages)} pages; "
                f"cannot hold {tokens!r}"
            )
        entry.tokens = tokens

    def evict(self, pages: Sequence[int]) -> None:
        """Free cached ``pages``, in an order ``PrefixIndex.remove`` takes (leaves first: ``engine/eviction.py``)."""
        prefix = self._require_prefix("PageTable.evict")
        for p in pages:
            prefix.remove(p)
        if pages:
            self._require_pool().free(list(pages))

    def _require_prefix(self, what: str) -> PrefixIndex:
        if self.prefix is None:
            raise RuntimeError(f"{what}: prefix caching is off (no prefix index)")
        return self.prefix

    def remap(self, moves: dict[int, int]) -> None:
        """Apply a compaction's ``{old page: new page}`` to every entry (and the index)."""
        if not moves:
            return
        for entry in self._lists.values():
            entry.pages = [moves.get(p, p) for p in entry.pages]
        self._refs = {moves.get(p, p): n for p, n in self._refs.items()}
        if self.prefix is not None:
            self.prefix.remap(moves)

    def release_all(self) -> None:
        """Return every page to the pool, cached ones too, and forget every entry."""
        pages = list(self._refs)
        if self.prefix is not None:
            pages += self.prefix.clear()
        if pages:
            self._require_pool().free(pages)
        self._lists.clear()
        self._refs.clear()
