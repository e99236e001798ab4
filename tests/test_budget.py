"""Per-device byte budget: shared by every arena of a device, changeable while they live."""

from __future__ import annotations

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv import Arena

MiB = 1 << 20


def test_budget_is_shared_and_changeable_live(arena_device: str) -> None:
    oom = torch.OutOfMemoryError if arena_device == "cuda" else MemoryError
    with (
        Arena(32 * MiB, device=arena_device, reuse_bytes=0) as a,
        Arena(32 * MiB, device=arena_device, reuse_bytes=0) as b,
    ):
        g = a.granularity
        ekv.set_budget(5 * g, arena_device)
        assert ekv.memory_stats(arena_device)["budget_bytes"] == 5 * g
        a.map(0, 3 * g)
        b.map(0, 2 * g)
        before = (a.stats(), b.stats(), ekv.memory_stats(arena_device))
        with pytest.raises(
            oom,
            match=rf"Arena.map\(offset={4 * g}, nbytes={g}\): needs {g} more bytes"
            rf".*budget is {5 * g} bytes with {5 * g} held",
        ):
            b.map(4 * g, g)
        assert (a.stats(), b.stats(), ekv.memory_stats(arena_device)) == before
        # Raised while both arenas live: the same map now succeeds.
        ekv.set_budget(6 * g, arena_device)
        b.map(4 * g, g)
        ekv.set_budget(None, arena_device)
        a.map(8 * g, 4 * g)
        d = ekv.memory_stats(arena_device)
        assert d["budget_bytes"] is None and d["mapped_bytes"] == 10 * g and d["arenas"] == 2


def test_budget_below_in_use_is_refused(arena_device: str) -> None:
    with Arena(32 * MiB, device=arena_device) as a:
        g = a.granularity
        a.map(0, 3 * g)
        ekv.set_budget(8 * g, arena_device)
        with pytest.raises(
            ValueError, match=rf"set_budget\({2 * g}, device='(cpu|cuda:0)'\): below the {3 * g} bytes in use"
        ):
            ekv.set_budget(2 * g, arena_device)
        assert ekv.memory_stats(arena_device)["budget_bytes"] == 8 * g
        ekv.set_budget(3 * g, arena_device)  # exactly what is in use is fine


def test_lowering_budget_below_held_trims_reuse_caches(arena_device: str) -> None:
    with Arena(32 * MiB, device=arena_device, reuse_bytes=8 * MiB) as a:
        g = a.granularity
        a.map(0, 4 * g)
        a.unmap(0, 3 * g)
        a.poll()
        assert a.stats()["cached_bytes"] == 3 * g
        ekv.set_budget(2 * g, arena_device)
        s = a.stats()
        assert s["cached_bytes"] == 0 and s["held_bytes"] == g
        assert ekv.memory_stats(arena_device)["held_bytes"] == g


def test_cached_handles_serve_maps_without_new_budget(arena_device: str) -> None:
    with Arena(32 * MiB, device=arena_device, reuse_bytes=8 * MiB) as a:
        g = a.granularity
        a.map(0, 2 * g)
        a.unmap(0, 2 * g)
        a.poll()
        ekv.set_budget(2 * g, arena_device)  # held (cached) == budget
        a.map(4 * g, 2 * g)  # served from the cache: no new charge
        assert a.stats()["creates"] == 2
        with pytest.raises(MemoryError if arena_device == "cpu" else torch.OutOfMemoryError):
            a.map(8 * g, g)


@pytest.mark.parametrize(
    "bad, exc, text",
    [
        (-1, ValueError, "set_budget\\(nbytes=-1\\)"),
        (1 << 64, ValueError, f"nbytes={1 << 64} is larger"),
        (1.5, TypeError, "nbytes must be an int"),
        ("1", TypeError, "nbytes must be an int"),
    ],
)
def test_bad_budget_values(bad: object, exc: type, text: str) -> None:
    with pytest.raises(exc, match=text):
        ekv.set_budget(bad)  # type: ignore[arg-type]
    assert ekv.memory_stats()["budget_bytes"] is None


def test_bad_device_names() -> None:
    with pytest.raises(ValueError, match="not supported"):
        ekv.memory_stats("meta")
    with pytest.raises(ValueError, match="not a valid device"):
        ekv.set_budget(1, "gpu7")


def test_map_reclaims_other_arenas_caches_before_failing(arena_device: str) -> None:
    with (
        Arena(32 * MiB, device=arena_device, reuse_bytes=8 * MiB) as a,
        Arena(32 * MiB, device=arena_device, reuse_bytes=0) as b,
    ):
        g = a.granularity
        a.map(0, 4 * g)
        a.unmap(0, 4 * g)
        a.poll()
        assert a.stats()["cached_bytes"] == 4 * g
        ekv.set_budget(5 * g, arena_device)
        b.map(0, 3 * g)  # 4 cached + 3 new > 5: two of a's cached handles make room
        assert a.stats()["cached_bytes"] == 2 * g
        d = ekv.memory_stats(arena_device)
        assert d["held_bytes"] == 5 * g and d["mapped_bytes"] == 3 * g
        with pytest.raises(MemoryError if arena_device == "cpu" else torch.OutOfMemoryError):
            b.map(4 * g, 3 * g)  # only 2 more can be reclaimed
        # Reclaiming could not have made room: nothing anywhere changed.
        assert a.stats()["cached_bytes"] == 2 * g
        assert b.stats()["mapped_bytes"] == 3 * g and ekv.memory_stats(arena_device)["held_bytes"] == 5 * g
