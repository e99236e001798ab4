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

Safety: a layer falls back to ``nn.Linear.forward`` whenever the packed copy may not apply —
the input is not a float32 CPU tensor, or autograd needs gradients — and a weight replaced,
changed in place or given new data (``weight.data = ...``) since packing is packed again
before use. A deepcopy or pickle of a packed
model carries no packed copy (oneDNN tensors have no storage to copy): the copy packs its own
weights on first use. ``restore()`` puts every layer back and drops the packed copies.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["PackedLinears", "eligible_linears", "is_packed", "prepack_available"]

_ATTR = "_ekv_packed_linear"   # the packed state, on each packed layer


def _ops_present() -> bool:
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(mk, "_reorder_linear_weight") and hasattr(mk, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
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
    data_ptr: int             # where its data was: ``weight.data = ...`` moves it, version kept
    packed: Optional[torch.Tensor]   # oneDNN blocked layout; None: pack again before use

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether the packed copy still holds ``weight``'s values."""
        return (self.packed is not None and self.weight is weight
                and self.version == _version(weight) and self.data_ptr == weight.data_ptr())

    # oneDNN tensors have no storage to copy or pickle: copies carry "pack again" instead
    def __deepcopy__(self, memo: dict) -> _Packed:
        return _Packed(weight=copy.deepcopy(self.weight, memo), version=-1, data_ptr=0, packed=None)

    def __getstate__(self) -> dict:
        return {"weight": self.weight, "version": -1, "data_ptr": 0, "packed": None}


def _packable(layer: torch.nn.Linear) -> bool:
    """Whether the layer's weight and bias are what the packed op takes: float32 on CPU."""
    w = layer.weight
    return (isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.dim() == 2 and w.numel() > 0 and not w.is_meta
            and (layer.bias is None or layer.bias.dtype == torch.float32))


def _eligible(layer: torch.nn.Module) -> bool:
    # a subclass (quantized, scaled, ...) may compute something the packed op does not: only
    # plain nn.Linear layers whose forward nobody replaced are packed
    return type(layer) is torch.nn.Linear and "forward" not in layer.__dict__ and _packable(layer)


def eligible_linears(model: torch.nn.Module) -> int:
    """How many of ``model``'s ``nn.Linear`` layers ``PackedLinears`` would pack."""
    return sum(1 for m in model.modules() if _eligible(m))


def _version(t: torch.Tensor) -> int:
    return t._version


def _pack(weight: torch.Tensor) -> _Packed:
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    return _Packed(weight=weight, version=_version(weight), data_ptr=weight.data_ptr(), packed=packed)


def _packed_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A packed layer's forward: the oneDNN op when it applies, else ``nn.Linear``'s own."""
    state: Optional[_Packed] = getattr(layer, _ATTR, None)
    w = layer.weight
    if (state is None or x.dtype != torch.float32 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.nn.Linear.forward(layer, x)
    if not state.is_current(w):
        if not _packable(layer):
            return torch.nn.Linear.forward(layer, x)
        state = _pack(w)      # new, changed or copied weights: pack them again
        setattr(layer, _ATTR, state)
    return torch.ops.mkldnn._linear_pointwise(x, state.packed, layer.bias, "none", [], "")


class _PackedLinear(torch.nn.Linear):
    """What a plain ``nn.Linear`` becomes while packed (``PackedLinears`` swaps the class, and
    back on ``restore``). A class rather than a patched instance forward so that a deepcopy or
    a pickle of the model stays a working model: the copy repacks its own weights on first use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_forward(self, x)


def is_packed(layer: torch.nn.Module) -> bool:
    """True while ``layer`` runs on a packed weight (installed by ``PackedLinears``)."""
    return type(layer) is _PackedLinear


class PackedLinears:
    """Every eligible ``nn.Linear`` of ``model`` runs on a prepacked weight until ``restore()``.

    Eligible: a plain ``nn.Linear`` (not a subclass, forward not replaced) with a float32
    weight on CPU (and float32 bias, if any); it becomes a ``_PackedLinear`` (still an
    ``nn.Linear``) until ``restore()``. Other layers are left as they are; ``count`` says how
    many were packed. Layers another ``PackedLinears`` already packed are left to it (two
    Engines on one model: the second packs nothing, and once the first restores, the layers
    run their own forward again; results are the same either way).

    Raises ``RuntimeError`` when this torch build cannot prepack (``prepack_available()``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PackedLinears: model must be a torch.nn.Module, got {type(model).__name__}")
        if not prepack_available():
            raise RuntimeError("PackedLinears: this torch build has no usable oneDNN linear "
                               "(torch.backends.mkldnn is unavailable or disagrees with F.linear)")
        self._layers: list[torch.nn.Linear] = []
        try:
            for m in model.modules():
                if _eligible(m):      # layers packed already are _PackedLinear: not eligible
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
            state: Optional[_Packed] = getattr(m, _ATTR, None)
            if state is not None:
                total += state.weight.numel() * state.weight.element_size()
        return total

    def _install(self, layer: torch.nn.Linear) -> None:
        setattr(layer, _ATTR, _pack(layer.weight))
        layer.__class__ = _PackedLinear
        self._layers.append(layer)

    def restore(self) -> None:
        """Put every packed layer back on its own forward and drop the packed copies."""
        for m in self._layers:
            if type(m) is _PackedLinear:
                m.__class__ = torch.nn.Linear
            m.__dict__.pop(_ATTR, None)
        self._layers = []

    def __enter__(self) -> PackedLinears:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
