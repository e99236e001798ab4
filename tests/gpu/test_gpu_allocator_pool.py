"""mem_pool(tag): some allocations routed to this allocator through torch.cuda.MemPool, on a
real GPU: tags, a model forward inside a pool, pause/resume of a pool's memory, and
torch.OutOfMemoryError at the allocator's limit. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MiB = 1 << 20


@pytest.fixture
def A():
    from torch_elastic_kv.memory import allocator

    allocator.last_error(clear=True)
    yield allocator
    allocator.set_limit(None, 0)


def test_allocations_inside_a_pool_are_ours_and_tagged(A):
    with A.mem_pool("gpu-acts"):
        t = torch.ones(10 * MiB, dtype=torch.uint8, device="cuda")
    outside = torch.ones(MiB, dtype=torch.uint8, device="cuda")
    tag = A.stats(0)["tags"]["gpu-acts"]
    assert tag["allocated_bytes"] >= t.numel() and tag["mapped_bytes"] >= t.numel()
    spans = [(b["address"], b["address"] + b["block_size"]) for b in A.snapshot(0) if b["tag"] == "gpu-acts"]
    assert any(lo <= t.data_ptr() < hi for lo, hi in spans)
    assert not any(
        lo <= outside.data_ptr() < hi
        for lo, hi in [(b["address"], b["address"] + b["block_size"]) for b in A.snapshot(0)]
    )
    assert int(t.sum()) == t.numel()


def test_model_forward_inside_a_pool_matches_and_survives_pause(A):
    from torch_elastic_kv.testing.models import tiny_llama

    ids = torch.randint(3, 256, (2, 24), device="cuda")
    ref_model = tiny_llama(seed=5).cuda()
    with torch.no_grad():
        ref = ref_model(ids).logits
    with A.mem_pool("gpu-model"):
        model = tiny_llama(seed=5).cuda()
        with torch.no_grad():
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = [p.data_ptr() for p in model.parameters()]
    assert A.stats(0)["tags"]["gpu-model"]["allocated_bytes"] > 0
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    released = A.pause("gpu-model", backup=True, device=0)
    assert released > 0 and torch.cuda.mem_get_info()[0] - free0 >= released - 4 * MiB
    assert A.stats(0)["tags"]["gpu-model"]["paused"]
    with torch.no_grad():
        again_ref = ref_model(ids).logits  # other memory keeps working while the tag is paused
    torch.testing.assert_close(again_ref, ref, rtol=1e-5, atol=1e-5)
    A.resume("gpu-model", device=0)
    assert [p.data_ptr() for p in model.parameters()] == weights
    with A.mem_pool("gpu-model"), torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, out, rtol=1e-5, atol=1e-5)


def test_limit_raises_torch_out_of_memory_and_raising_it_recovers(A):
    A.set_limit(A.stats(0)["mapped_bytes"] + 64 * MiB, 0)
    with A.mem_pool("gpu-big"):
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    assert "allocator limit" in A.last_error(clear=True)
    A.set_limit(None, 0)
    with A.mem_pool("gpu-big"):
        t = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    t.fill_(3)
    assert int(t[-1]) == 3
    del t
