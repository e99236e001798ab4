"""The Triton decode kernels without a GPU: the interpreter for CPU tensors, the offline compile.

:mod:`torch_elastic_kv.hf.triton_decode` holds the kernels and their launcher, all the
attention path needs on a device. This module holds what runs them elsewhere:

* :func:`interpretable_stdlib`: the patching of ``triton.language`` that lets Triton's
  interpreter run the kernels on CPU tensors (the launcher enters it for a CPU call);
* :func:`compile_offline`: ``triton.compile`` of the kernels for an NVIDIA arch down to a cubin,
  with no device, and ``python -m torch_elastic_kv.hf.triton_offline``, a report of registers
  and spills per shape (ptxas -v).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import torch

from . import triton_decode as _td
from .triton_decode import DEFAULT_LAUNCH, SUPPORTED_DTYPES, LaunchConfig

__all__ = ["compile_offline", "interpretable_stdlib", "main", "ptxas_report"]

# Reductions the kernel calls from triton.language's standard library (themselves jit functions).
_STDLIB = ("sum", "max")
_INTERPRET_LOCK = threading.Lock()


@contextlib.contextmanager
def interpretable_stdlib() -> Iterator[None]:
    """Let the interpreter run the kernel even though triton was imported without
    ``TRITON_INTERPRET=1`` (torch._dynamo imports it early, so the variable rarely reaches the
    import): the standard-library reductions it calls are then compiled-only ``JITFunction``s;
    swap in interpreted twins of the same functions for the call, then put them back.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    tl = _td.tl
    with _INTERPRET_LOCK:
        saved = {n: getattr(tl, n) for n in _STDLIB if isinstance(getattr(tl, n), JITFunction)}
        try:
            for n, f in saved.items():
                setattr(tl, n, InterpretedFunction(f.fn))
            yield
        finally:
            for n, f in saved.items():
                setattr(tl, n, f)


def compile_offline(
    dtype: torch.dtype,
    n_rep: int,
    page_tokens: int,
    head_dim: int,
    splits: int = 1,
    arch: int = 90,
    config: LaunchConfig = DEFAULT_LAUNCH,
) -> dict[str, Any]:
    """Compile both kernels for NVIDIA ``sm_<arch>`` without a device (``triton.compile`` of the
    kernel's AST down to a cubin through the wheel's ptxas), as a launch with these shapes
    would: proof that the installed Triton accepts them. Returns the decode kernel's tile
    choices and ``ptx``; raises what Triton raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    g_block, g_split, pt_pad, block_n, d_pad = _td._tiles(
        n_rep, page_tokens, head_dim, dtype == torch.float32, config.tile_tokens
    )
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    target = GPUTarget("cuda", arch, 32)

    def build(fn: Any, pointers: dict[str, str], consts: dict[str, Any], options: dict[str, int]) -> Any:
        jit = triton.jit(fn)
        names = jit.arg_names
        sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
        src = ASTSource(jit, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=target, options=options)

    part = "*fp32" if splits > 1 else "*" + ty
    decode = build(
        _td._paged_decode_kernel,
        {n: "*" + ty for n in ("out_ptr", "q_ptr", "k_ptr", "v_ptr")}
        | {"part_acc_ptr": part, "part_ml_ptr": part, "scale_log2": "fp32"}
        | {n: "*i64" for n in ("table_ptr", "lens_ptr", "row_tok_ptr")},
        dict(
            N_REP=n_rep,
            G_SPLIT=g_split,
            G_BLOCK=g_block,
            PAGE_TOKENS=page_tokens,
            PT_PAD=pt_pad,
            BLOCK_N=block_n,
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            SPLITS=splits,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            DOT_F32=False,
        ),
        {"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    if splits > 1:
        build(
            _td._combine_kernel,
            {"out_ptr": "*" + ty, "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "row_tok_ptr": "*i64"},
            dict(SPLITS=splits, HEAD_DIM=head_dim, D_PAD=d_pad),
            {},
        )
    return {"g_block": g_block, "g_split": g_split, "block_n": block_n, "d_pad": d_pad, "ptx": decode.asm["ptx"]}


def ptxas_report(ptx: str, arch: int = 90) -> str:
    """ptxas -v's register and spill line for ``ptx`` (the wheel's own ptxas)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run(
            [ptxas, "--gpu-name", f"sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    return "; ".join(
        line.split("ptxas info    :")[-1].strip()
        for line in r.stderr.splitlines()
        if "registers" in line or "spill" in line
    )


# Shapes of the report: (query heads per KV head, page tokens, head_dim), each unsplit and split.
_REPORT_SHAPES = ((4, 16, 128), (1, 16, 128), (8, 16, 64), (32, 16, 128), (4, 128, 256), (2, 5, 20))


def main(config: LaunchConfig = DEFAULT_LAUNCH) -> None:
    """Print, per dtype and shape, the tiles a launch picks and ptxas' registers and spills."""
    import triton

    # A report for a terminal: print is its output, not a log.
    print(f"triton {triton.__version__}, sm_90, num_warps {config.num_warps}, num_stages {config.num_stages}")
    for dt in SUPPORTED_DTYPES:
        for rep, pt, hd in _REPORT_SHAPES:
            for sp in (1, 16):
                r = compile_offline(dt, rep, pt, hd, sp, config=config)
                tiles = f"G {r['g_block']}x{r['g_split']}, tile {r['block_n']}x{r['d_pad']}"
                print(
                    f"{str(dt)[6:]:9} heads/kv {rep:2} page {pt:3} head_dim {hd:3} splits {sp:2} | {tiles} | "
                    + ptxas_report(r["ptx"])
                )


if __name__ == "__main__":  # python -m torch_elastic_kv.hf.triton_offline: compile report, no device
    main()
