"""One access call per run of granules (Backend::map_range): driver call counts on the fake
driver, all-or-nothing rollback of a multi-run map, the fake driver's own check that an
access range is wholly mapped, and the host backend's identical behaviour."""

from __future__ import annotations

import ctypes

import pytest
import torch

import torch_elastic_kv as ekv
from torch_elastic_kv import Arena
from torch_elastic_kv.testing import FakeCuda

MiB = 1 << 20


def _calls(fake: FakeCuda) -> dict[str, int]:
    return {fn: fake.calls(fn) for fn in ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease")}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_one_set_access_per_contiguous_map(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        before = _calls(fake_cuda)
        a.map(0, 8 * g)
        assert _delta(_calls(fake_cuda), before) == {
            "cuMemCreate": 8,
            "cuMemMap": 8,
            "cuMemSetAccess": 1,
            "cuMemUnmap": 0,
            "cuMemRelease": 0,
        }
        view = a.host_view(torch.uint8, (8 * g,))
        view.fill_(7)  # every granule of the run is readable and writable
        assert int(view[::g].sum()) == 7 * 8
        assert a.stats()["maps"] == 8 and a.stats()["mapped_bytes"] == 8 * g


def test_a_mapped_granule_splits_the_run(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=0) as a:
        g = a.granularity
        a.map(3 * g, g)
        before = _calls(fake_cuda)
        assert a.ensure_mapped(0, 8 * g) == 7 * g
        d = _delta(_calls(fake_cuda), before)
        assert (d["cuMemMap"], d["cuMemSetAccess"]) == (7, 2)  # runs [0, 3) and [4, 8)
        assert a.is_mapped(0, 8 * g)


def test_reused_handles_map_as_one_run(fake_cuda: FakeCuda) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=8 * MiB) as a:
        g = a.granularity
        a.map(0, 4 * g)
        a.unmap(0, 4 * g)
        assert a.poll() == 4 * g and a.stats()["cached_bytes"] == 4 * g
        before = _calls(fake_cuda)
        a.map(8 * g, 6 * g)  # 4 handles from the cache, 2 created
        d = _delta(_calls(fake_cuda), before)
        assert (d["cuMemCreate"], d["cuMemMap"], d["cuMemSetAccess"]) == (2, 6, 1)
        assert a.stats()["reuses"] == 4 and a.stats()["cached_bytes"] == 0


@pytest.mark.parametrize(
    ("function", "nth"),
    [
        ("cuMemSetAccess", 1),  # the first run's access
        ("cuMemSetAccess", 2),  # the second run's, after the first run is mapped
        ("cuMemMap", 2),  # inside the first run
        ("cuMemMap", 5),  # inside the second run
        ("cuMemCreate", 4),  # before any map
    ],
)
def test_a_failure_in_any_run_undoes_every_run(fake_cuda: FakeCuda, function: str, nth: int) -> None:
    with Arena(64 * MiB, device="cuda", reuse_bytes=4 * MiB) as a:
        g = a.granularity
        a.map(0, 4 * g)
        a.unmap(0, 2 * g)
        assert a.poll() == 2 * g  # 2 cached handles, so the map draws from cache and create
        a.map(11 * g, g)  # splits [8, 14) into runs [8, 11) and [12, 14)
        before = (a.stats(), ekv.memory_stats("cuda"), fake_cuda.counts())
        fake_cuda.fail_nth(function, nth, code=0 if function == "cuMemCreate" else 999)
        expected = torch.OutOfMemoryError if function == "cuMemCreate" else RuntimeError
        with pytest.raises(expected, match=f"Arena.ensure_mapped\\(offset={8 * g}, nbytes={6 * g}\\).*{function}"):
            a.ensure_mapped(8 * g, 6 * g)
        after = (a.stats(), ekv.memory_stats("cuda"), fake_cuda.counts())
        created = after[0]["creates"] - before[0]["creates"]
        assert after[0]["releases"] - before[0]["releases"] == created  # created, then released again
        for key in ("creates", "releases"):
            after[0][key] = before[0][key]
        assert after == before
        assert not a.is_mapped(8 * g, g) and not a.is_mapped(12 * g, g) and a.is_mapped(11 * g, g)
        assert a.ensure_mapped(8 * g, 6 * g) == 5 * g  # usable afterwards
        assert fake_cuda.live_mappings() == 2 + 6
    assert fake_cuda.counts() == {"handles": 0, "mappings": 0, "reservations": 0, "events": 0, "used_bytes": 0}


def test_host_backend_maps_runs_alike() -> None:
    with Arena(64 * MiB, device="cpu", reuse_bytes=0) as a:
        g = a.granularity
        a.map(3 * g, g)
        a.host_view(torch.uint8, (16 * g,))[3 * g : 4 * g].fill_(5)
        assert a.ensure_mapped(0, 8 * g) == 7 * g
        s = a.stats()
        assert (s["maps"], s["mapped_bytes"], s["creates"]) == (8, 8 * g, 8)
        view = a.host_view(torch.uint8, (8 * g,))
        assert int(view[3 * g]) == 5  # the granule mapped before kept its bytes
        view.fill_(1)
        assert int(view.sum()) == 8 * g


# -- the fake driver's own model of cuMemSetAccess -------------------------------------------


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Prop(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", ctypes.c_ubyte * 8),
    ]


class _Access(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


def test_fake_set_access_needs_every_byte_mapped(fake_cuda: FakeCuda) -> None:
    lib = ctypes.CDLL(fake_cuda.path)
    ull, size_t = ctypes.c_ulonglong, ctypes.c_size_t
    lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(ull), size_t, size_t, ull, ull]
    lib.cuMemAddressFree.argtypes = [ull, size_t]
    lib.cuMemCreate.argtypes = [ctypes.POINTER(ull), size_t, ctypes.POINTER(_Prop), ull]
    lib.cuMemRelease.argtypes = [ull]
    lib.cuMemMap.argtypes = [ull, size_t, size_t, ull, ull]
    lib.cuMemUnmap.argtypes = [ull, size_t]
    lib.cuMemSetAccess.argtypes = [ull, size_t, ctypes.POINTER(_Access), size_t]
    with Arena(2 * MiB, device="cuda"):  # initialises the driver and retains the primary context
        ctx = ctypes.c_void_p()
        assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        previous = fake_cuda.current_context()
        fake_cuda.set_current_context(ctx.value)
        try:
            g = 2 * MiB
            base = ull()
            assert lib.cuMemAddressReserve(ctypes.byref(base), 4 * g, 0, 0, 0) == 0
            prop = _Prop(type=1, requestedHandleTypes=0, location=_Location(1, 0))
            handles = [ull() for _ in range(3)]
            for h in handles:
                assert lib.cuMemCreate(ctypes.byref(h), g, ctypes.byref(prop), 0) == 0
            access = _Access(location=_Location(1, 0), flags=3)
            before = fake_cuda.calls("cuMemSetAccess")
            assert lib.cuMemMap(base.value, g, 0, handles[0].value, 0) == 0
            assert lib.cuMemMap(base.value + 2 * g, g, 0, handles[2].value, 0) == 0
            # A hole at [g, 2g): the range is refused, whole or in part.
            assert lib.cuMemSetAccess(base.value, 3 * g, ctypes.byref(access), 1) == 1
            assert lib.cuMemSetAccess(base.value, 2 * g, ctypes.byref(access), 1) == 1
            # Past the last mapping, or starting inside one, neither.
            assert lib.cuMemSetAccess(base.value + 2 * g, 2 * g, ctypes.byref(access), 1) == 1
            assert lib.cuMemSetAccess(base.value + g // 2, g // 2, ctypes.byref(access), 1) == 1
            # Once the hole is mapped, one call covers three mappings.
            assert lib.cuMemMap(base.value + g, g, 0, handles[1].value, 0) == 0
            assert lib.cuMemSetAccess(base.value, 3 * g, ctypes.byref(access), 1) == 0
            assert fake_cuda.calls("cuMemSetAccess") - before == 5
            ctypes.memmove(base.value + g - 1, b"ab", 2)  # across a mapping boundary: accessible
            for k in range(3):
                assert lib.cuMemUnmap(base.value + k * g, g) == 0
            for h in handles:
                assert lib.cuMemRelease(h.value) == 0
            assert lib.cuMemAddressFree(base.value, 4 * g) == 0
        finally:
            fake_cuda.set_current_context(previous)
            lib.cuDevicePrimaryCtxRelease_v2(0)


def test_gpu_check_map_range_step_in_a_dry_run(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch_elastic_kv.testing import fake_cuda_path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EKV_LIBCUDA": fake_cuda_path(), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run", "--quick"]
    proc = subprocess.run(
        [*cmd, "--no-build", "--steps", "map_range"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_results.json").read_text())["steps"]["map_range"]
    assert r["status"] == "ok"
    n = r["reused_per_granule"]["granules"]
    assert n == 8  # the dry run's 16 MiB arena
    for h in ("created", "reused"):
        # counted by the fake driver: one call per granule before, one per run after
        assert (r[f"{h}_per_granule"]["set_access_calls"], r[f"{h}_per_run"]["set_access_calls"]) == (n, 1)
        assert r[f"{h}_per_run"]["set_access_counted"] is True
        assert r[f"{h}_per_run"]["us_per_granule"]["n"] == 5
    assert r["verified_bytes"] == 16 << 20
    assert "map 8 granules, reused handles: set-access per granule / per run" in proc.stdout
