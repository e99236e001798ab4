"""On a GPU: the Engine registers the stream its forward runs on with the pool, so the memory
thread's unmaps wait for the kernels queued there (torch side streams do not order with the
default stream)."""

from __future__ import annotations

import pytest
import torch

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.testing.models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_side_stream_is_registered_with_every_arena_of_the_pool() -> None:
    model = tiny_llama().to("cuda")
    with Engine(model, policy=ElasticPolicy(max_bytes=64 << 20)) as eng:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            out = eng.generate([[1, 2, 3, 4]], max_new_tokens=4)
        assert len(out[0]) == 4
        arenas = [plane.arena for plane in eng.pool._planes]
        assert arenas and all(side.cuda_stream in a.streams for a in arenas)
