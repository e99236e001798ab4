"""The Engine's batched sampler (engine/runner.py): filters and draws row by row, in one batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from torch_elastic_kv.engine.request import SamplingParams
from torch_elastic_kv.engine.runner import ModelRunner


def req(rid: int = 0, position: int = 10, **sampling):
    return SimpleNamespace(request_id=rid, num_tokens=position, sampling=SamplingParams(**sampling))


def logits_for(probs: list[float], vocab: int = 8) -> torch.Tensor:
    """A logits row whose softmax is ``probs`` on the first tokens and ~0 on the rest."""
    row = torch.full((vocab,), -1e4)
    row[: len(probs)] = torch.log(torch.tensor(probs))
    return row


def draws(row: torch.Tensor, n: int, **sampling) -> list[int]:
    requests = [req(rid=i, position=i, seed=i, **sampling) for i in range(n)]
    return ModelRunner.sample_batch(row.expand(n, -1).clone(), requests)


def test_greedy_rows_take_the_argmax_and_sampled_rows_stay_in_their_filters():
    logits = torch.stack([logits_for([0.1, 0.7, 0.2]), logits_for([0.5, 0.3, 0.2]), logits_for([0.2, 0.2, 0.6])])
    requests = [req(0), req(1, temperature=1.0, top_k=1, seed=3), req(2, temperature=1.0, top_p=0.1, seed=4)]
    assert ModelRunner.sample_batch(logits, requests) == [1, 0, 2]  # top_k=1 and a tiny top_p are greedy


def test_top_k_keeps_exactly_the_k_largest():
    row = logits_for([0.3, 0.25, 0.2, 0.15, 0.1])
    got = draws(row, 400, temperature=1.0, top_k=3)
    assert set(got) == {0, 1, 2}


def test_top_p_keeps_the_token_that_crosses_it():
    row = logits_for([0.5, 0.3, 0.2])
    assert set(draws(row, 400, temperature=1.0, top_p=0.6)) == {0, 1}  # 0.5 < 0.6: token 1 crosses it
    assert set(draws(row, 400, temperature=1.0, top_p=0.45)) == {0}


def test_draws_follow_the_tempered_distribution():
    row = logits_for([0.6, 0.3, 0.1])
    n = 3000
    got = draws(row, n, temperature=2.0)
    tempered = torch.softmax(row / 2.0, -1)
    for token in range(3):
        p = float(tempered[token])
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(got.count(token) / n - p) < 5 * sd, (token, got.count(token) / n, p)


def test_a_seeded_row_draws_the_same_token_in_any_batch_and_position_changes_it():
    row = torch.randn(32, generator=torch.Generator().manual_seed(0))
    mine = req(7, position=5, temperature=1.0, top_k=20, seed=99)
    alone = ModelRunner.sample_batch(row[None].clone(), [mine])
    others = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([others[:2], row[None], others[2:]])
    mixed = [req(1), req(2, temperature=0.7), mine, req(3, temperature=1.0, top_p=0.9)]
    assert ModelRunner.sample_batch(batch, mixed)[2] == alone[0]
    by_position = {
        ModelRunner.sample_batch(row[None].clone(), [req(7, position=p, temperature=5.0, seed=99)])[0]
        for p in range(40)
    }
    assert len(by_position) > 1  # (seed, position) seeds the draw, not the seed alone


def test_a_non_finite_row_fails_alone():
    logits = torch.stack([logits_for([0.5, 0.5]), logits_for([0.1, 0.9]), logits_for([0.9, 0.1])])
    logits[0, 3] = float("nan")
    requests = [req(0, temperature=1.0, seed=1), req(1, temperature=1.0, seed=2), req(2)]
    got = ModelRunner.sample_batch(logits, requests)
    assert got[0] is None and got[1] in (0, 1) and got[2] == 0
