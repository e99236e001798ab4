"""Tensor views are built from DLPack capsules that name their device (issue 14, item 2).

torch's __cuda_array_interface__ import asks cudaPointerGetAttributes where a pointer lives,
which fails on reserved but unmapped VMM addresses; a capsule with an explicit device id asks
nothing. CPU torch cannot make a CUDA tensor, so the CUDA capsule is checked field by field
here, and the very same capsule code builds every host view (all the host tests use it)."""

from __future__ import annotations

import ctypes
import gc
import weakref

import torch

from torch_elastic_kv import Arena
from torch_elastic_kv.memory import arena as arena_mod

MiB = 1 << 20


def _managed(capsule: object) -> arena_mod._DLManagedTensor:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return arena_mod._DLManagedTensor.from_address(get(capsule, b"dltensor"))


def test_a_cuda_view_is_a_capsule_with_its_device_and_no_pointer_query(monkeypatch) -> None:
    seen = []

    def fake_from_dlpack(capsule):  # what torch's import gets: nothing to ask the runtime about
        seen.append(capsule)
        return torch.empty(0, dtype=torch.uint8)

    monkeypatch.setattr(torch.utils.dlpack, "from_dlpack", fake_from_dlpack)
    owner = object()
    arena_mod._tensor_over(0x7F0000200000, 6 * MiB, torch.device("cuda", 3), owner)
    m = _managed(seen[0])
    t = m.dl_tensor
    assert (t.device.device_type, t.device.device_id) == (2, 3)  # kDLCUDA, cuda:3
    assert t.data == 0x7F0000200000 and t.ndim == 1 and t.shape[0] == 6 * MiB
    assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (1, 8, 1) and not t.strides and t.byte_offset == 0
    assert arena_mod._LIVE_CAPSULES[m.manager_ctx][2] is owner  # kept alive until the deleter
    m.deleter(ctypes.pointer(m))
    assert m.manager_ctx not in arena_mod._LIVE_CAPSULES


def test_a_view_keeps_its_arena_object_alive_and_lets_go_with_the_last_tensor() -> None:
    a = Arena(8 * MiB)
    a.map(0, 2 * MiB)
    before = set(arena_mod._LIVE_CAPSULES)
    t = a.view(torch.float32, (4, 8), offset=64)
    mine = set(arena_mod._LIVE_CAPSULES) - before
    assert len(mine) == 1
    assert t.data_ptr() == a.base_address + 64 and t.shape == (4, 8)
    t.fill_(2.5)
    assert torch.equal(a.host_view(torch.float32, (32,), offset=64), torch.full((32,), 2.5))
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is not None  # the view holds it
    del t
    gc.collect()
    assert ref() is None and not mine & set(arena_mod._LIVE_CAPSULES)
