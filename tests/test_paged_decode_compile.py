"""The Triton decode kernels compile for a GPU without one: ``triton.compile`` of their AST for
sm_90 down to a cubin (the wheel's ptxas), at the shapes a launch would use. The interpreter
tests (test_paged_decode_triton.py) check the numbers; this checks that the installed Triton
accepts the code for a device, which the interpreter never does."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.backends import backends as _backends
except ImportError:  # pragma: no cover - older layouts
    _backends = {}
if "nvidia" not in _backends:
    pytest.skip("this Triton has no NVIDIA backend to compile for", allow_module_level=True)

from torch_elastic_kv.hf.triton_offline import compile_offline  # noqa: E402


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # Triton 3.9's notice
@pytest.mark.parametrize(
    "dtype,n_rep,page_tokens,head_dim,splits",
    [
        (torch.bfloat16, 4, 16, 128, 1),  # Llama-3-8B decode
        (torch.bfloat16, 4, 16, 128, 16),  # the same split over the SMs, with the merge kernel
        (torch.float16, 1, 128, 256, 1),  # pages larger than a tile
        (torch.float32, 3, 5, 20, 4),  # odd page and head sizes, float32 (IEEE dots)
    ],
)
def test_kernels_compile_for_sm90(dtype, n_rep, page_tokens, head_dim, splits):
    out = compile_offline(dtype, n_rep, page_tokens, head_dim, splits)
    assert ".target sm_90" in out["ptx"]
    # The query heads of one KV head fill the MMA's M side (>= 16), the tile's K side >= 16.
    assert out["g_block"] >= max(16, n_rep) and out["d_pad"] >= max(16, head_dim)
