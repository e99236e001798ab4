"""Checks the native CPU attention kernels' Python wrappers share: dtypes, devices, the
output tensor and contiguous rows, each a ValueError naming the call and the argument."""

from __future__ import annotations

import torch

# The dtypes the kernels read page ids and lengths in.
INDEX_DTYPES = (torch.int32, torch.int64)


def check_cpu_float32(name: str, **tensors: torch.Tensor) -> None:
    """ValueError unless every tensor is float32 on the CPU."""
    for what, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name}: {what} must be float32 on CPU, got {t.dtype} on {t.device}")


def output_like(name: str, out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``out`` when it is a float32 CPU tensor of ``query``'s shape, a new one when None."""
    if out is None:
        return torch.empty(query.shape, dtype=torch.float32)
    if out.shape != query.shape or out.dtype != torch.float32 or out.device.type != "cpu":
        raise ValueError(f"{name}: out {tuple(out.shape)} {out.dtype} must be float32 {tuple(query.shape)}")
    return out


def check_rows_contiguous(name: str, **tensors: torch.Tensor) -> None:
    """ValueError unless each tensor's last dimension is contiguous (the kernels read rows)."""
    for what, t in tensors.items():
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: {what}'s last dimension must be contiguous (stride {t.stride(-1)})")
