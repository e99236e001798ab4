"""PageTable: the one owner of which pages each request holds, over a real pool."""

from __future__ import annotations

import pytest
import torch

from torch_elastic_kv.kv.page_table import PageTable
from torch_elastic_kv.kv.pool import KVPagePool


def _pool() -> KVPagePool:
    return KVPagePool(2, 2, 16, torch.float32, "cpu", page_tokens=4, max_bytes=4 << 20)


def test_ensure_free_detach_attach_keep_the_count_and_the_pool_in_step() -> None:
    with _pool() as pool:
        table = PageTable(4, pool)
        table.ensure(1, 9)  # 3 pages
        table.ensure(1, 12)  # still 3
        table.ensure(2, 1)
        assert table.page_count(1) == 3 and table.page_count(2) == 1 and table.page_count(7) == 0
        assert table.live_pages == pool.live_pages == 4
        pages, tokens = table.detach(1)
        assert len(pages) == 3 and tokens == 0 and table.live_pages == 1 and pool.live_pages == 4
        table.attach(3, pages, 10)
        assert table.get(3).tokens == 10 and table.live_pages == 4
        with pytest.raises(ValueError, match=r"pages \[.*\] are not live, duplicated or held by another request"):
            table.attach(4, pages[:1], 1)
        with pytest.raises(ValueError, match="cannot hold 13 tokens"):
            table.attach(4, [], 13)
        table.free(3)
        assert table.ids() == [2] and pool.live_pages == 1
        with pytest.raises(KeyError, match="free_request: unknown request 3"):
            table.free(3, "free_request")
        table.remap({table.get(2).pages[0]: 99})
        assert table.get(2).pages == [99]


def test_a_refused_alloc_leaves_the_table_as_it_was() -> None:
    with _pool() as pool:
        table = PageTable(4, pool)
        table.ensure(1, 4)
        with pytest.raises(MemoryError):
            table.ensure(2, 4 * (pool.max_pages + 1))
        assert table.ids() == [1] and table.live_pages == pool.live_pages == 1
        with pytest.raises(ValueError, match="total_tokens must be an int >= 0, got -1"):
            table.ensure(1, -1)
        table.release_all()
        assert len(table) == 0 and table.live_pages == pool.live_pages == 0


def test_no_pool_yet_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="PageTable: no pool yet"):
        PageTable(4).ensure(1, 1)
    with pytest.raises(ValueError, match="page_tokens must be a positive int"):
        PageTable(0)
