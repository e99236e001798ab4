"""Which device each rank of a tensor-parallel group runs on, and which backend carries its
model's all-reduces.

CPU: every rank on "cpu", everything over gloo. CUDA: one GPU per rank — ``cuda:LOCAL_RANK``
under torchrun, else ``cuda:RANK`` (the server starts every rank on this machine) — the model's
row-parallel all-reduces over an NCCL group on the device, and the plans, reports, status checks
and collective maps (small objects) over the gloo group, as on CPU. Pure: callers pass the GPU
count and torchrun's variables, so the rules are tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

__all__ = ["DeviceError", "model_backend", "rank_device", "torchrun_local"]


class DeviceError(ValueError):
    """The group cannot have one device per rank here; the message is one line for the user."""


def torchrun_local(env: Mapping[str, str]) -> tuple[Optional[int], Optional[int]]:
    """``(LOCAL_RANK, LOCAL_WORLD_SIZE)`` from torchrun's variables in ``env``; ``(None, None)``
    when not under torchrun. ``DeviceError`` for a value that is not a whole number >= 0."""
    out: list[Optional[int]] = []
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        text = env.get(name)
        if text is None:
            out.append(None)
            continue
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0 or (name == "LOCAL_WORLD_SIZE" and value == 0):
            raise DeviceError(
                f"${name} must be a whole number{' >= 1' if name == 'LOCAL_WORLD_SIZE' else ''}, got {text!r}"
            )
        out.append(value)
    return out[0], out[1]


def rank_device(
    device: str,
    rank: int,
    world: int,
    cuda_count: int,
    local_rank: Optional[int] = None,
    local_world: Optional[int] = None,
) -> str:
    """The device of ``rank`` of ``world`` when the server was asked for ``device`` ("cpu",
    "cuda"): "cpu" for every rank on CPU; on CUDA ``cuda:local_rank`` under torchrun (its
    ``LOCAL_RANK``), else ``cuda:rank``. ``DeviceError`` when ``device`` names one GPU
    (``cuda:N``: each rank takes its own), or when this machine has fewer GPUs than the ranks
    that run on it (``local_world`` under torchrun, else ``world``)."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise DeviceError(f"rank {rank!r} of {world!r}: the rank must be in 0..world-1")
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu"
    if kind != "cuda":
        raise DeviceError(f"--device {device}: tensor parallel runs on cpu or cuda")
    if index:
        raise DeviceError(
            f"--device {device} names one GPU, but --tensor-parallel-size {world} gives each rank its own "
            f"(rank r on cuda:r, or cuda:$LOCAL_RANK under torchrun): pass --device cuda"
        )
    here = world if local_world is None else local_world
    if cuda_count < here:
        raise DeviceError(
            f"--tensor-parallel-size {world} needs {here} GPUs on this machine (one per rank), it has {cuda_count}"
        )
    slot = rank if local_rank is None else local_rank
    if slot >= cuda_count:
        raise DeviceError(f"$LOCAL_RANK {slot} names a GPU this machine lacks (it has {cuda_count})")
    return f"cuda:{slot}"


def model_backend(device: str) -> str:
    """The backend of the model's all-reduces for a rank on ``device``: "nccl" on CUDA, "gloo"
    on CPU (the plans and reports are always on gloo)."""
    return "nccl" if device.startswith("cuda") else "gloo"
