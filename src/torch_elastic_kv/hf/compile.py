"""Compiled decoder layers: a model's MLPs and RMSNorms through ``torch.compile`` (inductor).

What is compiled: in every decoder layer the ``mlp`` module and the norm modules (children
whose class name ends in ``RMSNorm``: ``input_layernorm``, ``post_attention_layernorm``), and
the model's final norm. These are functions of the hidden states alone. The attention
(projections, rotary embedding, the paged cache and its plan) stays eager: the cache writes
into pool pages and the attention reads them through a page table that changes every step,
which is Python the compiler would stop at (a graph break) or guard on (a recompilation).

Shapes: each module is compiled with ``dynamic=True``, so the packed token count is a
symbol: one graph serves every batch size from 2 tokens up, and one more the single-token
step (torch specializes sizes 0 and 1). ``CompiledLayers.warm_up`` compiles both at once,
before the first request, so a step never waits on the compiler, and no later batch size,
grow, shrink, compaction or preemption (none of them changes a compiled module's input
shape beyond the token count) compiles again. Modules of one class share their graphs:
dynamo keys them by code, and with inbuilt modules inlined the weights are graph inputs.

Cost and worth: compiling takes seconds to tens of seconds on a small CPU (inductor
generates and builds C++; the on-disk cache makes a second start faster), and for small
models on CPU a compiled module call is not faster than the eager one (figures in
benchmarks/RESULTS.md, "Decode speed"), so the Engine leaves it off unless asked
(``Engine(compile=True)``, ``serve --compile``). Results agree with the eager modules to
float32 rounding (fused kernels sum in another order), not bit for bit.

``restore()`` puts every module back on its own forward.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

__all__ = ["CompiledLayers", "compile_targets"]

_log = logging.getLogger(__name__)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"compile: {type(model).__name__} has no decoder layers at model.model.layers "
            "(a Llama-style causal LM is needed)"
        )
    return list(layers)


def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def compile_targets(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``CompiledLayers`` compiles: each decoder layer's ``mlp`` and RMSNorm
    children, and the model's final RMSNorm. ValueError when the model has no decoder layers
    at ``model.model.layers``."""
    out: list[torch.nn.Module] = []
    for layer in _decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, torch.nn.Module):
            out.append(mlp)
        out.extend(child for child in layer.children() if _is_norm(child))
    final = getattr(getattr(model, "model", model), "norm", None)
    if isinstance(final, torch.nn.Module) and _is_norm(final):
        out.append(final)
    return out


class CompiledLayers:
    """``model``'s MLPs and RMSNorms run compiled (module docstring) until ``restore()``.

    Args:
        model: a Llama-style causal LM (``model.model.layers``; Llama, Mistral, Qwen2).
        hidden_size: the width of the hidden states (the config's ``hidden_size``).

    ``compile_seconds`` is the wall time ``warm_up`` spent compiling. Raises ValueError when
    the model has no such modules. Modules another ``CompiledLayers`` compiled are left to it.
    """

    def __init__(self, model: torch.nn.Module, hidden_size: int) -> None:
        targets = compile_targets(model)
        if not targets:
            raise ValueError(f"compile: {type(model).__name__} has no MLP or RMSNorm module to compile")
        # a module whose forward was replaced already (another Engine compiled this model) is
        # left to whoever replaced it: its restore() puts it back
        self._targets = [m for m in targets if "forward" not in m.__dict__]
        self.hidden_size = int(hidden_size)
        self.compile_seconds = 0.0
        for m in self._targets:
            # an instance attribute wins over the class's forward; restore() deletes it
            m.forward = torch.compile(m.forward, dynamic=True)

    @property
    def count(self) -> int:
        """Modules running compiled."""
        return len(self._targets)

    def warm_up(self, dtype: torch.dtype, device: torch.device) -> float:
        """Compile now, for one token and for many: every compiled module is called on
        ``[1, 1, hidden]`` and ``[1, 2, hidden]`` zeros (the Engine's packed layout). Returns
        the seconds it took (also kept in ``compile_seconds``)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for tokens in (1, 2):
                x = torch.zeros(1, tokens, self.hidden_size, dtype=dtype, device=device)
                for m in self._targets:
                    m(x)
        self.compile_seconds = time.perf_counter() - t0
        _log.info("compiled %d modules in %.1f s", len(self._targets), self.compile_seconds)
        return self.compile_seconds

    def restore(self) -> None:
        """Put every compiled module back on its own forward."""
        for m in self._targets:
            m.__dict__.pop("forward", None)
        self._targets = []

    def __enter__(self) -> CompiledLayers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
