"""Which pages each request holds: the one place that knows.

A ``PageTable`` maps a request id to its ``PageList`` (page ids in token order, and how many
tokens of K/V they store) over one page pool. The cache's packed mode plans its steps from it
and the Engine's scheduler asks it how many pages a request holds; nothing else keeps a copy,
so a compaction's page moves (``remap``) have one table to fix.

Not thread-safe by itself: its users (the Engine, a cache driven from one thread) serialise
their calls, as they do for the forward that reads the pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .._util import ceil_div, is_int

__all__ = ["PageList", "PageTable"]


class _Pages(Protocol):
    """What a page table needs from a pool."""

    def alloc(self, n: int) -> list[int]: ...
    def free(self, ids: list[int]) -> None: ...
    def is_live(self, page: int) -> bool: ...


@dataclass
class PageList:
    """One request's pages, in token order, and how many tokens of K/V they hold."""

    pages: list[int] = field(default_factory=list)
    tokens: int = 0


class PageTable:
    """Request id -> ``PageList`` over ``pool``, with the total of pages held kept as it changes.

    ``pool`` may be set later (a cache creates its pool at its first forward); every call that
    needs pages then raises RuntimeError until it is.
    """

    def __init__(self, page_tokens: int, pool: _Pages | None = None) -> None:
        if not is_int(page_tokens) or page_tokens <= 0:
            raise ValueError(f"PageTable: page_tokens must be a positive int, got {page_tokens!r}")
        self.page_tokens = page_tokens
        self.pool = pool
        self._lists: dict[int, PageList] = {}
        self._live = 0

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
        """Pages held by every request together."""
        return self._live

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
        self._live += len(fresh)

    def free(self, request_id: int, what: str = "PageTable.free") -> None:
        """Return every page of ``request_id`` to the pool and drop its entry."""
        pages, _ = self.detach(request_id, what)
        if pages:
            self._require_pool().free(pages)

    def detach(self, request_id: int, what: str = "PageTable.detach") -> tuple[list[int], int]:
        """Drop the entry but keep its pages live: ``(pages, tokens)``, owned by the caller now."""
        entry = self.get(request_id, what)
        del self._lists[request_id]
        self._live -= len(entry.pages)
        return entry.pages, entry.tokens

    def attach(self, request_id: int, pages: list[int], tokens: int, what: str = "PageTable.attach") -> None:
        """Adopt live ``pages`` holding ``tokens`` tokens as ``request_id``'s entry."""
        pool = self._require_pool()
        if request_id in self._lists:
            raise ValueError(f"{what}: request {request_id} already holds pages")
        pages = [int(p) for p in pages]
        if not is_int(tokens) or not 0 <= tokens <= len(pages) * self.page_tokens:
            raise ValueError(f"{what}: {len(pages)} pages of {self.page_tokens} tokens cannot hold {tokens!r} tokens")
        owned = {p for e in self._lists.values() for p in e.pages}
        bad = [p for p in pages if not pool.is_live(p) or p in owned]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"{what}: pages {bad[:8] or pages} are not live, duplicated or held by another request")
        self._lists[request_id] = PageList(pages, tokens)
        self._live += len(pages)

    def remap(self, moves: dict[int, int]) -> None:
        """Apply a compaction's ``{old page: new page}`` to every entry."""
        for entry in self._lists.values():
            entry.pages = [moves.get(p, p) for p in entry.pages]

    def release_all(self) -> None:
        """Return every request's pages to the pool and forget every entry."""
        pages = [p for e in self._lists.values() for p in e.pages]
        if pages:
            self._require_pool().free(pages)
        self._lists.clear()
        self._live = 0
