"""KVBudget alone: each input validated once, the effective budget, sleep, versions, waking.

Runs without torch being imported by the module under test (checked in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from torch_elastic_kv.engine.budget import KVBudget

MiB = 1 << 20


def test_effective_is_the_smallest_of_ceiling_requested_and_lease() -> None:
    b = KVBudget(64 * MiB, floor_bytes=4 * MiB)
    assert b.effective_bytes() == 64 * MiB
    b.set_requested(32 * MiB)
    assert b.effective_bytes() == 32 * MiB
    b.set_lease(16 * MiB)
    assert b.effective_bytes() == 16 * MiB
    b.set_lease(48 * MiB)
    assert b.effective_bytes() == 32 * MiB  # the requested budget is smaller now
    b.set_requested(None)
    assert b.effective_bytes() == 48 * MiB
    b.set_lease(None)
    assert b.effective_bytes() == 64 * MiB


def test_a_lease_never_goes_below_the_floor_but_a_request_may() -> None:
    b = KVBudget(64 * MiB, floor_bytes=4 * MiB)
    b.set_lease(0)
    assert b.effective_bytes() == 4 * MiB
    b.set_requested(0)  # an explicit request of 0 gives everything back, floor included
    assert b.effective_bytes() == 0


def test_sleep_gives_everything_back_and_wake_restores_the_inputs() -> None:
    b = KVBudget(64 * MiB, floor_bytes=4 * MiB)
    b.set_requested(20 * MiB)
    b.set_lease(30 * MiB)
    b.sleep()
    assert b.asleep and b.effective_bytes() == 0
    b.set_requested(10 * MiB)  # accepted while asleep, applies at wake
    assert b.effective_bytes() == 0
    b.wake()
    assert not b.asleep and b.effective_bytes() == 10 * MiB


@pytest.mark.parametrize(
    ("call", "value", "match"),
    [
        ("set_requested", -1, "set_budget: nbytes must be a non-negative int or None, got -1"),
        ("set_requested", 1.5, "set_budget: nbytes must be a non-negative int or None, got 1.5"),
        ("set_requested", True, "set_budget: nbytes must be a non-negative int or None, got True"),
        ("set_requested", "1M", "set_budget: nbytes must be a non-negative int or None, got '1M'"),
        ("set_requested", 65 * MiB, r"set_budget: 68157440 bytes exceeds the ceiling \(67108864 bytes\)"),
        ("set_requested", MiB, r"set_budget: 1048576 bytes is below one KV chunk \(2097152 bytes\)"),
        ("set_lease", -5, "set_lease: nbytes must be a non-negative int or None, got -5"),
        ("set_lease", 2.0, "set_lease: nbytes must be a non-negative int or None, got 2.0"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call: str, value: object, match: str) -> None:
    b = KVBudget(64 * MiB, floor_bytes=0, min_request_bytes=2 * MiB)
    b.set_requested(40 * MiB)
    b.set_lease(50 * MiB)
    before = b.snapshot()
    with pytest.raises(ValueError, match=match):
        getattr(b, call)(value)
    assert b.snapshot() == before


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1,), {}, "KVBudget: ceiling_bytes must be a non-negative int"),
        ((10,), {"floor_bytes": 11}, r"KVBudget: floor_bytes \(11\) is larger than ceiling_bytes \(10\)"),
        ((10,), {"min_request_bytes": None}, "KVBudget: min_request_bytes must be a non-negative int"),
    ],
)
def test_bad_construction(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KVBudget(*args, **kwargs)


def test_version_bumps_only_on_a_real_change_and_listeners_hear_it() -> None:
    b = KVBudget(64 * MiB)
    heard: list[int] = []
    b.add_listener(lambda: heard.append(b.version))
    v0 = b.version
    b.set_requested(None)  # already the ceiling: no change
    b.wake()  # already awake
    assert b.version == v0 and heard == []
    b.set_lease(8 * MiB)
    b.sleep()
    b.wake()
    assert b.version == v0 + 3 and heard == [v0 + 1, v0 + 2, v0 + 3]
    with pytest.raises(ValueError, match="add_listener: expected a callable"):
        b.add_listener(42)  # type: ignore[arg-type]


def test_a_waiter_wakes_on_a_change_not_on_a_timer() -> None:
    b = KVBudget(64 * MiB)
    v = b.version
    got: list[int] = []

    def waiter() -> None:
        got.append(b.wait_for_change(v, timeout=30.0))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert got == []  # nothing changed yet: still waiting
    b.set_lease(MiB)
    t.join(timeout=10.0)
    assert got == [v + 1]
    # with nothing changing, the wait ends at its timeout with the same version
    assert b.wait_for_change(b.version, timeout=0.01) == v + 1


def test_the_budget_and_the_policy_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import torch_elastic_kv.engine.budget, torch_elastic_kv.engine.policy\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
