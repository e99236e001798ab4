"""Shared pytest fixtures.

``fake_cuda``: the cuda backend pointed at the fake driver (tests/fake_cuda/) for one test,
yielding a reset ``torch_elastic_kv.testing.FakeCuda``; device budgets are reset after it.
``arena_device``: parametrizes a test over "cpu" (host backend) and "cuda" on the fake driver,
so one conformance suite runs against both backends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

# Let tests import helpers that live next to them (tests/models.py, ...).
sys.path.insert(0, os.path.dirname(__file__))


def _reset_budgets() -> None:
    import torch_elastic_kv as ekv

    ekv.set_budget(None, "cpu")
    ekv.set_budget(None, "cuda:0")


@pytest.fixture
def fake_cuda() -> Iterator[object]:
    from torch_elastic_kv.testing import use_fake_cuda

    with use_fake_cuda() as fake:
        try:
            yield fake
        finally:
            _reset_budgets()


@pytest.fixture(params=["cpu", "cuda"])
def arena_device(request: pytest.FixtureRequest) -> Iterator[str]:
    """'cpu', or 'cuda' with EKV_LIBCUDA set to the fake driver for the test."""
    if request.param == "cpu":
        try:
            yield "cpu"
        finally:
            _reset_budgets()
        return
    from torch_elastic_kv.testing import use_fake_cuda

    with use_fake_cuda():
        try:
            yield "cuda"
        finally:
            _reset_budgets()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one torch thread avoids OpenMP spinning on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
