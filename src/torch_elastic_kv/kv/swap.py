"""Host swap space: where preempted requests park the K/V of their pages.

A byte-bounded map from a key (a request id; the prefix cache's host tier parks pages under
``("prefix", hash)``) to a host tensor (pinned when the pool lives on CUDA, so
that the copies back are asynchronous-capable). The bound is the policy's ``swap_bytes``;
a request whose pages do not fit is preempted by recompute instead.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .._util import is_int

__all__ = ["SwapSpace"]


@dataclass
class _Parked:
    data: torch.Tensor
    num_tokens: int
    num_pages: int


class SwapSpace:
    """Byte-bounded host storage for swapped-out KV pages, keyed by request id."""

    def __init__(self, capacity_bytes: int, pin_memory: bool = False) -> None:
        if not is_int(capacity_bytes) or capacity_bytes < 0:
            raise ValueError(f"SwapSpace: capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.pin_memory = pin_memory
        self._parked: dict[Hashable, _Parked] = {}
        self.used_bytes = 0
        self.peak_bytes = 0
        self.swap_outs = 0
        self.swap_ins = 0

    def can_store(self, nbytes: int) -> bool:
        return nbytes > 0 and self.used_bytes + nbytes <= self.capacity_bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._parked

    def put(self, key: Hashable, data: torch.Tensor, num_tokens: int, num_pages: int) -> None:
        """Park ``data`` (any device) on the host under ``key``."""
        if key in self._parked:
            raise ValueError(f"SwapSpace.put: request {key} is already swapped out")
        nbytes = data.numel() * data.element_size()
        if not self.can_store(nbytes):
            raise MemoryError(
                f"SwapSpace.put: {nbytes} bytes do not fit ({self.used_bytes} of {self.capacity_bytes} used)"
            )
        if data.device.type != "cpu":
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=self.pin_memory)
            host.copy_(data)
            data = host
        self._parked[key] = _Parked(data, num_tokens, num_pages)
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        if isinstance(key, int):  # swap_outs / swap_ins count requests, not demoted prefix pages
            self.swap_outs += 1

    def peek(self, key: Hashable) -> tuple[torch.Tensor, int, int]:
        """(data, num_tokens, num_pages) of a parked request, left in place."""
        p = self._parked.get(key)
        if p is None:
            raise KeyError(f"SwapSpace: request {key} is not swapped out")
        return p.data, p.num_tokens, p.num_pages

    def drop(self, key: Hashable, swapped_in: bool = False) -> None:
        p = self._parked.pop(key, None)
        if p is None:
            raise KeyError(f"SwapSpace: request {key} is not swapped out")
        self.used_bytes -= p.data.numel() * p.data.element_size()
        if swapped_in:
            self.swap_ins += 1

    def stats(self) -> dict:
        return {
            "swap_capacity_bytes": self.capacity_bytes,
            "swap_used_bytes": self.used_bytes,
            "swap_peak_bytes": self.peak_bytes,
            "swap_outs": self.swap_outs,
            "swap_ins": self.swap_ins,
            "swapped_requests": sum(1 for k in self._parked if isinstance(k, int)),
        }
