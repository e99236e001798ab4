"""A forked child never changes its parent's KV memory (issue 12, item 1).

The host backend maps a memfd MAP_SHARED, so a child's release (fallocate PUNCH_HOLE) used to
zero the parent's pages. A child is now refused every arena call with a clear error, and its
close() (which the C++ destructor also runs at exit) lets go without touching the memory. Each child action runs in its own
fork; the parent then checks every byte and that its arena still works.
"""

from __future__ import annotations

import os

import pytest
import torch

from torch_elastic_kv import Arena, memory_stats

MiB = 1 << 20

CHILD_ACTIONS = ["unmap_and_trim", "close", "set_reuse_bytes_0", "leaves_a_with_block"]


def _child(arena: Arena, action: str) -> int:
    """Runs in the child; the exit code says what happened (0: as expected)."""
    try:
        if action == "unmap_and_trim":
            for call in (lambda: arena.unmap(0, 4 * MiB), arena.trim):
                try:
                    call()
                    return 3  # the child must be refused
                except RuntimeError as exc:
                    if "forked child" not in str(exc):
                        return 4
        elif action == "close":
            before = memory_stats(arena.device)["mapped_bytes"]  # device-wide: other tests' arenas too
            arena.close()
            if memory_stats(arena.device)["mapped_bytes"] != before - 4 * MiB:
                return 6  # the child's books must let go of what it no longer holds
        elif action == "leaves_a_with_block":
            with arena:
                pass
        elif action == "set_reuse_bytes_0":
            try:
                arena.set_reuse_bytes(0)
                return 3
            except RuntimeError as exc:
                if "forked child" not in str(exc):
                    return 4
        return 0
    except BaseException:  # anything else is a failure of the test
        return 5


@pytest.mark.parametrize("action", CHILD_ACTIONS)
def test_a_forked_child_cannot_change_the_parents_arena(action, arena_device):
    """Host memory, and the fake CUDA driver (a child gets an error, never the parent's context)."""
    arena = Arena(4 * MiB, device=arena_device, reuse_bytes=0)
    arena.map(0, 4 * MiB)
    data = arena.host_view(torch.int32, (MiB,))
    data.copy_(torch.arange(MiB, dtype=torch.int32))
    arena.unmap(2 * MiB, 2 * MiB)  # half given back: the child's trim used to punch the rest
    arena.map(2 * MiB, 2 * MiB)
    data[MiB // 2 :] = torch.arange(MiB // 2, MiB, dtype=torch.int32)
    pid = os.fork()
    if pid == 0:
        os._exit(_child(arena, action))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(data, torch.arange(MiB, dtype=torch.int32))  # every byte as before
    arena.unmap(0, 4 * MiB)  # the parent's arena still works
    assert arena.stats()["mapped_bytes"] == 0
    arena.map(0, 4 * MiB)
    assert arena.stats()["mapped_bytes"] == 4 * MiB
    arena.close()
