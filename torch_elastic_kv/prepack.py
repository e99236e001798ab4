"""Prepacked linear weights: a model's ``nn.Linear`` layers through oneDNN on CPU (float32).

Why: a stock ``nn.Linear`` on CPU calls MKL's sgemm. On the AMD EPYC machine this project
benchmarks on, oneDNN's matmul on a weight packed once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the op PyTorch's own inductor uses when it
freezes a CPU model, then ``torch.ops.mkldnn._linear_pointwise``) runs most shapes of a
continuous-batching step faster (1.1-4.4x from 5 rows up, most of all the few-row steps of
a decode tail; the small 512x256 K/V projections at 5-10 rows are 0.8-0.95x):
a 512x1376 projection takes 96 us instead of 204 us at 5 rows and 3.9 ms instead of 6.0 ms
at 512 rows, the 512x8192 lm_head 3.1 ms instead of 7.1 ms at 64 rows
(``python benchmarks/bench_prepack.py``; table in benchmarks/RESULTS.md). One row through a
layer of 1 MiB or less is the exception: there the call's fixed cost (~25 us) makes it slower
than MKL's matrix-vector path (56 vs 28 us for 512x256). Other CPUs may differ: measure with
that script, and turn it off with ``Engine(prepack_weights=False)``.

What changes: results agree with ``F.linear`` to float32 rounding (max abs difference 1e-6
to 3e-6 on the benchmark shapes; MKL's own matrix-vector and matrix-matrix paths differ from
each other by as much), not bit for bit. The packed
copy costs one more copy of every packed weight's bytes while installed.

Safety: a layer falls back to its own forward whenever the packed copy may not apply — the
weight was replaced or changed in place since packing (it is packed again), the input is not a
float32 CPU tensor, or autograd needs gradients. ``restore()`` puts every layer back and drops
the packed copies.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["PackedLinears", "eligible_linears", "prepack_available"]


def _ops_present() -> bool:
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(mk, "_reorder_linear_weight") and hasattr(mk, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def prepack_available() -> bool:
    """True when this torch build can prepack float32 CPU linear weights (oneDNN present and
    its packed result agrees with ``F.linear`` on a probe; probed once per process)."""
    if not _ops_present():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g)
        b = torch.randn(48, generator=g)
        x = torch.randn(3, 5, 40, generator=g)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            return bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-5))
    except RuntimeError:
        return False


@dataclass
class _Packed:
    """One layer's packed weight and what it was packed from."""

    weight: torch.Tensor      # the parameter the copy was packed from (identity checked)
    version: int              # its in-place version counter at packing time
    packed: torch.Tensor      # oneDNN blocked layout


def _eligible(layer: torch.nn.Linear) -> bool:
    w = layer.weight
    # a subclass with a forward of its own (quantized, scaled, hooked) computes something the
    # packed op does not: only the plain nn.Linear forward is replaced
    return (type(layer).forward is torch.nn.Linear.forward and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.dim() == 2 and w.numel() > 0 and not w.is_meta
            and (layer.bias is None or layer.bias.dtype == torch.float32))


def eligible_linears(model: torch.nn.Module) -> int:
    """How many of ``model``'s ``nn.Linear`` layers ``PackedLinears`` would pack."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and _eligible(m))


def _version(t: torch.Tensor) -> int:
    return t._version


class PackedLinears:
    """Every eligible ``nn.Linear`` of ``model`` runs on a prepacked weight until ``restore()``.

    Eligible: a layer whose forward is ``nn.Linear``'s own, with a float32 weight on CPU (and
    float32 bias, if any). Other layers are left as they
    are; ``count`` says how many were packed. Layers another ``PackedLinears`` already packed
    are left to it (two Engines on one model: the second packs nothing, and once the first
    restores, the layers run their own forward again; results are the same either way).

    Raises ``RuntimeError`` when this torch build cannot prepack (``prepack_available()``).
    """

    _ATTR = "_ekv_packed_linear"

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PackedLinears: model must be a torch.nn.Module, got {type(model).__name__}")
        if not prepack_available():
            raise RuntimeError("PackedLinears: this torch build has no usable oneDNN linear "
                               "(torch.backends.mkldnn is unavailable or disagrees with F.linear)")
        self._layers: list[torch.nn.Linear] = []
        try:
            for m in model.modules():
                if (isinstance(m, torch.nn.Linear) and _eligible(m)
                        and getattr(m, self._ATTR, None) is None and "forward" not in m.__dict__):
                    self._install(m)
        except BaseException:
            self.restore()
            raise

    @property
    def count(self) -> int:
        """Layers running on a packed weight."""
        return len(self._layers)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the weights held in packed copies (about what the copies take)."""
        total = 0
        for m in self._layers:
            state: Optional[_Packed] = getattr(m, self._ATTR, None)
            if state is not None:
                total += state.weight.numel() * state.weight.element_size()
        return total

    @staticmethod
    def _pack(weight: torch.Tensor) -> _Packed:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        return _Packed(weight=weight, version=_version(weight), packed=packed)

    def _install(self, layer: torch.nn.Linear) -> None:
        setattr(layer, self._ATTR, self._pack(layer.weight))
        attr = self._ATTR
        pack = self._pack
        own_forward = type(layer).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            state: Optional[_Packed] = getattr(layer, attr, None)
            w = layer.weight
            if (state is None or x.dtype != torch.float32 or x.device.type != "cpu"
                    or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
                return own_forward(layer, x)
            if state.weight is not w or state.version != _version(w):
                if not _eligible(layer):
                    return own_forward(layer, x)
                state = pack(w)      # new or changed weights: pack them again
                setattr(layer, attr, state)
            return torch.ops.mkldnn._linear_pointwise(x, state.packed, layer.bias, "none", [], "")

        layer.forward = forward      # instance attribute: shadows the class's forward
        self._layers.append(layer)

    def restore(self) -> None:
        """Put every packed layer back on its own forward and drop the packed copies."""
        for m in self._layers:
            m.__dict__.pop("forward", None)
            if hasattr(m, self._ATTR):
                delattr(m, self._ATTR)
        self._layers = []

    def __enter__(self) -> "PackedLinears":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
