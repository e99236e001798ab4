"""Stand-ins for the Engine's pool and cache, written from docs/INTERFACES.md.

``StandInPool`` counts pages and chunks like ``KVPagePool`` but holds K/V in plain tensors;
``StandInCache`` is the packed mode of ``ElasticPagedCache`` (a real ``PageTable``; attention
through a 4-D mask). Both implement the Engine's protocols (``engine.protocols``) in full, so
tests can pin the Engine's own behaviour independent of the real pool and kernels.
``PoolDemand`` is the other side: the scheduler and page backend as a ``MemoryController``
sees them, over a real pool, with a settable number of waiting pages.
"""

from __future__ import annotations

import torch

from ..kv.page_table import PageTable

__all__ = ["PAGES_PER_CHUNK", "PAGE_TOKENS", "PoolDemand", "StandInCache", "StandInPool"]

PAGE_TOKENS = 8  # tokens per page
PAGES_PER_CHUNK = 4  # pages per chunk
PT, GP = PAGE_TOKENS, PAGES_PER_CHUNK


class StandInPool:
    """Counts pages and granules like KVPagePool; K/V in plain tensors."""

    def __init__(self, layers, kv_heads, head_dim, max_pages, dtype=torch.float32):
        self.page_tokens = PT
        self.max_pages = max_pages
        self.page_bytes = 2 * layers * PT * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.k = [torch.zeros(max_pages, PT, kv_heads, head_dim, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(max_pages, PT, kv_heads, head_dim, dtype=dtype) for _ in range(layers)]
        self.budget_pages = max_pages
        self.live: set[int] = set()
        self.mapped: set[int] = set()  # granule indices
        self.counts = {"grows": 0, "shrinks": 0, "compactions": 0}
        self.listeners = []
        self.streams: list[object] = []  # add_stream() calls

    # budget / counts
    def set_max_bytes(self, nbytes):
        self.budget_pages = min(self.max_pages, nbytes // self.page_bytes) // GP * GP

    @property
    def free_pages(self):
        return self.budget_pages - len(self.live)

    @property
    def mapped_free_pages(self):
        return len(self.mapped) * GP - len(self.live)

    def can_alloc(self, n):
        return n <= self.free_pages

    def is_live(self, page):
        return page in self.live

    def _map(self, g):
        if g not in self.mapped:
            if len(self.mapped) * GP >= self.budget_pages:
                raise MemoryError("granule budget")
            self.mapped.add(g)
            self.counts["grows"] += 1

    def alloc(self, n):
        if n > self.free_pages:
            raise MemoryError(f"alloc {n} pages, {self.free_pages} free")
        out = []
        for p in range(self.max_pages):
            if len(out) == n:
                break
            if p not in self.live and (p // GP in self.mapped or len(self.mapped) * GP < self.budget_pages):
                self._map(p // GP)
                out.append(p)
        assert len(out) == n, "fragmented beyond the budget"
        self.live.update(out)
        return out

    def free(self, ids):
        for p in ids:
            if p not in self.live:
                raise ValueError(f"double free of page {p}")
        self.live.difference_update(ids)

    def reserve_pages(self, n):
        g = 0
        while sum(GP for _ in self.mapped) - len(self.live) < n and len(self.mapped) * GP < self.budget_pages:
            while g in self.mapped:
                g += 1
            self._map(g)

    def shrink(self, keep_pages):
        given = 0
        for g in sorted(self.mapped, reverse=True):
            if len(self.mapped) * GP <= keep_pages:
                break
            if not any(p // GP == g for p in self.live):
                self.mapped.discard(g)
                given += GP * self.page_bytes
        if given:
            self.counts["shrinks"] += 1
        return given

    def compact(self, on_move=None):
        order = sorted(self.live)
        moves = {}
        for new, old in enumerate(order):
            if new != old:
                moves[old] = new
        if moves:
            for L in range(len(self.k)):
                src = torch.tensor(list(moves)), torch.tensor(list(moves.values()))
                self.k[L][src[1]] = self.k[L][src[0]].clone()
                self.v[L][src[1]] = self.v[L][src[0]].clone()
            for fn in self.listeners + ([on_move] if on_move else []):
                fn(moves)
            self.live = set(range(len(order)))
            self.counts["compactions"] += 1
        return 0

    def add_move_listener(self, fn):
        self.listeners.append(fn)

    def read_pages(self, ids):
        idx = torch.tensor(ids)
        return torch.stack([torch.stack([k[idx] for k in self.k]), torch.stack([v[idx] for v in self.v])])

    def write_pages(self, ids, data):
        idx = torch.tensor(ids)
        for L in range(len(self.k)):
            self.k[L][idx] = data[0, L]
            self.v[L][idx] = data[1, L]

    @property
    def chunk_bytes(self):
        return GP * self.page_bytes

    @property
    def resident_bytes(self):
        return len(self.mapped) * self.chunk_bytes

    @property
    def live_pages(self):
        return len(self.live)

    def trim(self):
        return 0  # no reuse cache to give back

    def add_stream(self, stream):
        self.streams.append(stream)  # nothing to order on the host; recorded for tests

    def close(self):
        self.live.clear()
        self.mapped.clear()

    def stats(self):
        return {
            "resident_bytes": self.resident_bytes,
            "live_bytes": len(self.live) * self.page_bytes,
            "reserved_bytes": self.max_pages * self.page_bytes,
            "max_bytes": self.budget_pages * self.page_bytes,
            "pages_per_chunk": GP,
            "chunk_bytes": self.chunk_bytes,
            **self.counts,
        }


class StandInCache:
    """The packed mode of ElasticPagedCache: page tables per request, 4-D mask attention."""

    def __init__(self, pool: StandInPool):
        self.pool = pool
        self.page_table = PageTable(PT, pool)  # the real one: page ownership is not stood in for
        self.entries = None
        pool.add_move_listener(self.page_table.remap)

    def ensure_capacity(self, sid, total):
        self.page_table.ensure(sid, total)

    def free_request(self, sid):
        self.page_table.free(sid, "free_request")

    def request_pages(self, sid):
        return list(self.page_table.get(sid, "request_pages").pages)

    def request_tokens(self, sid):
        return self.page_table.get(sid, "request_tokens").tokens

    def detach_request(self, sid):
        return self.page_table.detach(sid, "detach_request")

    def attach_request(self, sid, pages, ntokens):
        self.page_table.attach(sid, pages, ntokens, "attach_request")

    def set_packed_batch(self, entries):
        self.entries = entries
        pos = torch.cat([torch.arange(s, s + n) for _, s, n in entries])[None]
        ctx = [s + n for _, s, n in entries]
        T, S = sum(n for *_, n in entries), sum(ctx)
        mask = torch.zeros(1, 1, T, S, dtype=torch.bool)
        t = c = 0
        for (_, s, n), L in zip(entries, ctx):
            for i in range(n):
                mask[0, 0, t + i, c : c + s + i + 1] = True
            t += n
            c += L
        return {"position_ids": pos, "attention_mask": mask}

    def close(self):
        self.page_table.release_all()

    def clear_packed_batch(self):
        self.entries = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        ks, vs, t = [], [], 0
        for sid, s, n in self.entries:
            pages = self.page_table.get(sid).pages
            for i in range(n):
                p, off = pages[(s + i) // PT], (s + i) % PT
                self.pool.k[layer_idx][p, off] = key[0, :, t + i]
                self.pool.v[layer_idx][p, off] = value[0, :, t + i]
            L = s + n
            idx = torch.tensor(pages[: -(-L // PT)])
            ks.append(self.pool.k[layer_idx][idx].flatten(0, 1)[:L])
            vs.append(self.pool.v[layer_idx][idx].flatten(0, 1)[:L])
            if layer_idx == len(self.pool.k) - 1:
                self.page_table.get(sid).tokens = L
            t += n
        K = torch.cat(ks).permute(1, 0, 2)[None]
        V = torch.cat(vs).permute(1, 0, 2)[None]
        return K, V


class PoolDemand:
    """The scheduler and page backend of a ``MemoryController`` over a real pool: demand is the
    pool's live pages plus ``waiting`` pages; nothing runs, nothing is ever preempted."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.waiting = 0
        self.running: list = []

    def demand_pages(self, growth) -> tuple[int, int, int]:
        return self.pool.live_pages, 0, self.waiting

    def preempt_until(self, max_live_pages: int) -> list:
        return []

    def live_pages(self) -> int:
        return self.pool.live_pages
