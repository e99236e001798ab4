"""One behaviour suite for every backend: host (memfd) and cuda on the fake driver."""

from __future__ import annotations

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv import Arena

MiB = 1 << 20


def test_map_unmap_accounting(arena_device: str) -> None:
    with Arena(32 * MiB, device=arena_device, reuse_bytes=0) as a:
        g = a.granularity
        assert g > 0 and a.capacity == 32 * MiB and a.capacity % g == 0
        s = a.stats()
        assert (s["reserved_bytes"], s["mapped_bytes"], s["cached_bytes"]) == (32 * MiB, 0, 0)
        a.map(g, 3 * g)
        assert a.is_mapped(g, 3 * g) and not a.is_mapped(0, 2 * g) and a.is_mapped(2 * g, g)
        s = a.stats()
        assert s["mapped_bytes"] == 3 * g and s["maps"] == 3 and s["creates"] == 3
        a.unmap(2 * g, g)
        a.trim(wait=True)  # host released at unmap (reuse_bytes=0); cuda once its event is done
        s = a.stats()
        assert s["mapped_bytes"] == 2 * g and s["held_bytes"] == 2 * g and s["releases"] == 1
        assert not a.is_mapped(g, 3 * g)
        d = ekv.memory_stats(arena_device)
        assert d["mapped_bytes"] == 2 * g and d["arenas"] == 1 and d["reserved_bytes"] == 32 * MiB
    d = ekv.memory_stats(arena_device)
    assert (d["mapped_bytes"], d["held_bytes"], d["arenas"], d["reserved_bytes"]) == (0, 0, 0, 0)


def test_capacity_rounds_up_to_granularity(arena_device: str) -> None:
    with Arena(1, device=arena_device) as a:
        assert a.capacity == a.granularity
        a.map(0, a.granularity)


def test_handle_reuse_within_allowance(arena_device: str) -> None:
    with Arena(32 * MiB, device=arena_device, reuse_bytes=4 * MiB) as a:
        g = a.granularity
        a.map(0, 2 * g)
        a.unmap(0, 2 * g)
        a.map(4 * g, 2 * g)
        s = a.stats()
        assert s["creates"] == 2 and s["reuses"] + s["revives"] == 2 and s["releases"] == 0
        # Past the allowance, handles are released instead of cached.
        a.map(0, 4 * g)
        a.unmap(0, 4 * g)
        a.unmap(4 * g, 2 * g)
        a.trim(wait=False)
        s = a.stats()
        assert s["cached_bytes"] == 0 and s["held_bytes"] == 0


def test_without_reuse_every_map_creates(arena_device: str) -> None:
    with Arena(8 * MiB, device=arena_device, reuse_bytes=0) as a:
        g = a.granularity
        for _ in range(3):
            a.map(0, g)
            a.unmap(0, g)
            a.trim(wait=True)
        assert a.stats()["creates"] == 3 and a.stats()["releases"] == 3


def _bad_calls(g: int, cap: int) -> list[tuple[str, tuple[int, int], str]]:
    return [
        ("map", (1, g), "multiples of the granularity"),
        ("map", (0, g + 1), "multiples of the granularity"),
        ("map", (0, 0), "nbytes must be positive"),
        ("map", (-g, g), "offset=-"),
        ("map", (0, -g), "nbytes=-"),
        ("map", (cap, g), "past the arena's capacity"),
        ("map", (cap - g, 2 * g), "past the arena's capacity"),
        ("map", (0, 1 << 62), "past the arena's capacity"),
        ("map", (0, 2 * g), "already mapped"),  # granule 0 is mapped below
        ("unmap", (2 * g, g), "is not mapped"),
        ("unmap", (0, 2 * g), "is not mapped"),  # partly mapped
        ("unmap", (g, 0), "nbytes must be positive"),
        ("unmap", (3, g), "multiples of the granularity"),
    ]


def test_bad_input_raises_and_changes_nothing(arena_device: str) -> None:
    with Arena(16 * MiB, device=arena_device) as a:
        g, cap = a.granularity, a.capacity
        a.map(0, g)
        before = (a.stats(), ekv.memory_stats(arena_device))
        for call, args, text in _bad_calls(g, cap):
            with pytest.raises(ValueError, match=text) as err:
                getattr(a, call)(*args)
            assert f"Arena.{call}" in str(err.value)
            assert (a.stats(), ekv.memory_stats(arena_device)) == before, (call, args)
        for bad in (1.0, "0", None, True):
            with pytest.raises(TypeError):
                a.map(bad, g)  # type: ignore[arg-type]
        # Past the core's signed 64-bit numbers: a ValueError naming the number, not pybind11's TypeError.
        for call, args, huge in [
            ("map", (0, 1 << 64), 1 << 64),
            ("map", (1 << 63, g), 1 << 63),
            ("unmap", (0, 1 << 63), 1 << 63),
            ("ensure_mapped", (1 << 64, g), 1 << 64),
            ("is_mapped", (0, 1 << 70), 1 << 70),
            ("set_reuse_bytes", (1 << 64,), 1 << 64),
        ]:
            with pytest.raises(ValueError, match=f"Arena.{call}: .*={huge} is larger"):
                getattr(a, call)(*args)
        assert (a.stats(), ekv.memory_stats(arena_device)) == before
        assert a.is_mapped(0, g)


def test_bad_constructor_arguments(arena_device: str) -> None:
    with pytest.raises(ValueError, match="capacity must be positive"):
        Arena(0, device=arena_device)
    with pytest.raises(ValueError, match="capacity_bytes=-5"):
        Arena(-5, device=arena_device)
    with pytest.raises(ValueError, match="reuse_bytes=-1"):
        Arena(MiB, device=arena_device, reuse_bytes=-1)
    with pytest.raises(ValueError, match="not supported"):
        Arena(MiB, device="meta")
    with pytest.raises(ValueError, match=f"capacity_bytes={1 << 64} is larger"):
        Arena(1 << 64, device=arena_device)
    with pytest.raises(ValueError, match=f"reuse_bytes={1 << 63} is larger"):
        Arena(MiB, device=arena_device, reuse_bytes=1 << 63)
    assert ekv.memory_stats(arena_device)["arenas"] == 0


def test_view_bounds(arena_device: str) -> None:
    with Arena(4 * MiB, device=arena_device) as a:
        with pytest.raises(ValueError, match="end past the capacity"):
            a.host_view(torch.float32, (MiB + 1,))
        with pytest.raises(ValueError, match="multiple of 4"):
            a.host_view(torch.float32, (4,), offset=2)
        with pytest.raises(ValueError, match="negative dimension"):
            a.host_view(torch.float32, (-1,))
        a.map(0, a.granularity)
        t = a.host_view(torch.int64, (2, 8), offset=64)
        t.copy_(torch.arange(16).view(2, 8))
        assert torch.equal(a.host_view(torch.int64, (16,), offset=64), torch.arange(16))


def test_close_is_idempotent_and_final(arena_device: str) -> None:
    a = Arena(8 * MiB, device=arena_device)
    a.map(0, 2 * a.granularity)
    a.close()
    a.close()
    assert a.closed
    calls = {
        "map": lambda: a.map(0, a.granularity),
        "ensure_mapped": lambda: a.ensure_mapped(0, a.granularity),
        "unmap": lambda: a.unmap(0, a.granularity),
        "is_mapped": lambda: a.is_mapped(0, a.granularity),
        "trim": lambda: a.trim(),
        "poll": lambda: a.poll(),
        "set_reuse_bytes": lambda: a.set_reuse_bytes(0),
        "view": lambda: a.view(torch.uint8, (1,)),
    }
    if arena_device == "cpu":
        calls["host_view"] = lambda: a.host_view(torch.uint8, (1,))
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^Arena\.{name}: the arena is closed$"):
            call()
    assert a.stats()["mapped_bytes"] == 0  # stats still answer
    assert ekv.memory_stats(arena_device)["held_bytes"] == 0


def test_ensure_mapped_fills_only_the_gaps(arena_device: str) -> None:
    with Arena(16 * MiB, device=arena_device) as a:
        g = a.granularity
        a.map(g, g)
        a.map(3 * g, g)
        assert a.ensure_mapped(0, 5 * g) == 3 * g
        assert a.is_mapped(0, 5 * g)
        assert a.ensure_mapped(0, 5 * g) == 0
        s = a.stats()
        assert s["mapped_bytes"] == 5 * g and s["maps"] == 5
        with pytest.raises(ValueError, match=r"Arena.ensure_mapped\(offset=1, nbytes=.*multiples"):
            a.ensure_mapped(1, g)
        assert a.stats() == s
