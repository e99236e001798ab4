"""Prepacked linear weights: a model's ``nn.Linear`` layers through oneDNN on CPU (float32).

Why: a stock ``nn.Linear`` on CPU calls MKL's sgemm. oneDNN's matmul on a weight packed once
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the op PyTorch's own
inductor uses when it freezes a CPU model, then ``torch.ops.mkldnn._linear_pointwise``) runs
most shapes of a continuous-batching step faster on the AMD EPYC machine of the Engine
benchmarks, most of all the few-row steps of a decode tail. On an Intel Xeon it gains less:
the MLP and lm_head shapes are faster packed from a few rows up, the small attention
projections slower, and the Engine ends up from a little slower to faster depending on the
workload. One row through a small layer is slower packed on both (the op's fixed cost).
Figures: ``python benchmarks/bench_prepack.py`` and the prepack sections of
benchmarks/RESULTS.md. Measure on the CPU at hand; ``Engine(prepack_weights=False)`` turns
it off.

Row buckets: oneDNN builds (JIT-compiles) one primitive per input shape (and torch thread
count) and keeps it in process-wide caches (oneDNN's own and ideep's, 1024 entries each), so
a packed layer fed every row count a continuous-batching step has grew resident memory with
each new batch size, and once the caches were full every miss freed one primitive and built
another, fragmenting the heap: memory a server running for weeks never got back. So the
packed path pads the rows with zeros up to a bucket (``padded_rows``: as they are up to 8,
then 4 steps per power of two, at most 25 % more rows) and slices the padding off; a packed
weight shape then meets at most 40 row counts up to 2048 rows, and what the caches hold
stays bounded by the distinct weight shapes times the buckets seen. The caches belong to
the process and outlive ``restore()``; they stop growing once every bucket has been seen.

What changes: results agree with ``F.linear`` to float32 rounding (MKL's own matrix-vector
and matrix-matrix paths differ from each other by as much), not bit for bit; the padding
rows change nothing in the real ones. The packed copy costs one more copy of every packed
weight's bytes while installed.

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

__all__ = ["PackedLinears", "eligible_linears", "is_packed", "padded_rows", "prepack_available"]

_ATTR = "_ekv_packed_linear"  # the packed state, on each packed layer

# Row buckets: every row count up to _EXACT_ROWS as it is, then _STEPS_PER_OCTAVE evenly
# spaced buckets per power of two (10, 12, 14, 16, 20, 24, 28, 32, 40, ...).
_EXACT_ROWS = 8
_STEPS_PER_OCTAVE = 4


def padded_rows(rows: int) -> int:
    """The row count the packed op runs ``rows`` rows of input at: ``rows`` itself up to 8,
    then the next of 4 evenly spaced steps per power of two (10, 12, 14, 16, 20, 24, ...; at
    most 25 % more rows, 40 buckets up to 2048 rows). Zero stays zero.

    Why: oneDNN keeps one cached primitive per input shape (module docstring); the buckets
    bound the shapes a packed layer ever shows it.
    """
    if rows <= _EXACT_ROWS:
        return rows
    octave = 1 << ((rows - 1).bit_length() - 1)  # the largest power of two below rows
    step = octave // _STEPS_PER_OCTAVE
    return -(-rows // step) * step


def _ops_present() -> bool:
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mk, "_reorder_linear_weight")
            and hasattr(mk, "_linear_pointwise")
        )
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

    weight: torch.Tensor  # the parameter the copy was packed from (identity checked)
    version: int  # its in-place version counter at packing time
    data_ptr: int  # where its data was: ``weight.data = ...`` moves it, version kept
    packed: Optional[torch.Tensor]  # oneDNN blocked layout; None: pack again before use

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether the packed copy still holds ``weight``'s values."""
        return (
            self.packed is not None
            and self.weight is weight
            and self.version == _version(weight)
            and self.data_ptr == weight.data_ptr()
        )

    # oneDNN tensors have no storage to copy or pickle: copies carry "pack again" instead
    def __deepcopy__(self, memo: dict) -> _Packed:
        return _Packed(weight=copy.deepcopy(self.weight, memo), version=-1, data_ptr=0, packed=None)

    def __getstate__(self) -> dict:
        return {"weight": self.weight, "version": -1, "data_ptr": 0, "packed": None}


def _packable(layer: torch.nn.Linear) -> bool:
    """Whether the layer's weight and bias are what the packed op takes: float32 on CPU."""
    w = layer.weight
    return (
        isinstance(w, torch.Tensor)
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.numel() > 0
        and not w.is_meta
        and (layer.bias is None or layer.bias.dtype == torch.float32)
    )


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
    if (
        state is None
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return torch.nn.Linear.forward(layer, x)
    if not state.is_current(w):
        if not _packable(layer):
            return torch.nn.Linear.forward(layer, x)
        state = _pack(w)  # new, changed or copied weights: pack them again
        setattr(layer, _ATTR, state)
    return _packed_linear(x, state.packed, layer.bias)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` on a packed weight, the rows padded with zeros up to ``padded_rows``.

    Each output row depends on its own input row only, so the padding rows change nothing in
    the real ones; they are computed and sliced off (the result is a view of the first rows
    of the padded output, contiguous like ``F.linear``'s)."""
    k = x.shape[-1]
    rows = x.numel() // k
    padded = padded_rows(rows)
    if padded == rows:  # (the op flattens the leading dims: [1, n, k] is [n, k] to it)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise(
        F.pad(x.reshape(rows, k), (0, 0, 0, padded - rows)), packed, bias, "none", [], ""
    )
    return y[:rows].view(*x.shape[:-1], y.shape[-1])


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
            raise RuntimeError(
                "PackedLinears: this torch build has no usable oneDNN linear "
                "(torch.backends.mkldnn is unavailable or disagrees with F.linear)"
            )
        self._layers: list[torch.nn.Linear] = []
        try:
            for m in model.modules():
                if _eligible(m):  # layers packed already are _PackedLinear: not eligible
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
