"""Per-request logits processing and log-probabilities (engine/logits.py, engine/runner.py).

The batched processing must equal transformers' own processors on the same logits, row by row,
bit for bit; the Engine's log-probabilities must equal ``log_softmax`` of a plain forward over
the same tokens; greedy decoding with penalties must pick the tokens a plain transformers loop
with the processors picks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper

from logits_helpers import hf_greedy, hf_processors, plain_logits, request
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.engine.logits import min_p_filter, process_logits
from torch_elastic_kv.engine.request import SamplingParams
from torch_elastic_kv.engine.runner import ModelRunner
from torch_elastic_kv.serve.default_model import EOS_ID, build_default_model, build_default_tokenizer

VOCAB = 40


def test_batched_processing_equals_transformers_processors_row_by_row():
    rows = [
        request([3, 4, 5], [6, 6, 7]),  # nothing: untouched
        request([3, 4, 5, 4], [9, 3], repetition_penalty=1.7),
        request([3, 4], [9], eos=(2, 11), min_tokens=3),
        request([3, 4], [9, 9, 9], eos=(2, 11), min_tokens=3),  # has its min_tokens: EOS free
        request([3], [8], logit_bias=((1, 5.0), (12, -100.0), (39, 0.25))),
        request([3, 5], [8, 8, 8, 10], presence_penalty=0.5, frequency_penalty=-0.75),
        request(
            [3, 5, 7],
            [8, 8, 13],
            eos=(2,),
            min_tokens=9,
            logit_bias=((8, 3.0), (13, -2.0)),
            repetition_penalty=0.8,
            presence_penalty=-1.5,
            frequency_penalty=2.0,
        ),
    ]
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(3)) * 4
    got = process_logits(logits, rows)
    assert not torch.equal(got, logits)  # something did change
    for i, r in enumerate(rows):
        want = hf_processors(r)(torch.tensor([r.token_ids]), logits[i : i + 1].clone())[0]
        assert torch.equal(got[i], want), (i, (got[i] - want).abs().max())
    assert got[2, 2] == float("-inf") and got[2, 11] == float("-inf") and torch.isfinite(got[3]).all()


def test_min_p_filter_equals_transformers_min_p_warper():
    x = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    min_p = [0.0, 0.05, 0.3, 1.0]
    got = min_p_filter(x, torch.tensor(min_p))
    for i, m in enumerate(min_p):
        want = x[i : i + 1] if m == 0 else MinPLogitsWarper(m)(None, x[i : i + 1].clone())
        assert torch.equal(got[i], want[0]), i
    assert torch.isfinite(got[3]).sum() == 1  # min_p 1: the most likely token alone


def test_a_processed_row_changes_only_its_own_greedy_token():
    logits = torch.zeros(2, VOCAB)
    logits[:, 6] = 1.0
    rows = [request([3], [6]), request([3], [6], repetition_penalty=4.0, logit_bias=((20, 0.5),))]
    assert ModelRunner.sample_batch(logits, rows) == [6, 20]  # 1/4 < 0.5


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"min_tokens": -1}, "min_tokens must be an int >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"logit_bias": {5: 101.0}}, "logit_bias for token 5 must be in [-100, 100]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias entries must be (token_id >= 0, bias)"),
        ({"logprobs": -1}, "logprobs must be None or an int >= 0"),
    ],
)
def test_sampling_params_refuse_bad_values(fields, message):
    with pytest.raises(ValueError) as exc:
        SamplingParams.coerce(fields)
    assert message in str(exc.value)


# ---------------------------------------------------------------------- with the model -------
@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_default_model()


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def test_engine_refuses_bad_bias_and_min_tokens_unchanged(model):
    with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False) as e:
        with pytest.raises(ValueError, match=r"logit_bias token id 264 is outside the vocabulary \[0, 264\)"):
            e.add_request([5, 6], 4, sampling={"logit_bias": {264: 1.0}})
        with pytest.raises(ValueError, match=r"min_tokens \(5\) is more than max_new_tokens \(4\)"):
            e.add_request([5, 6], 4, sampling={"min_tokens": 5})
        assert e.stats()["waiting"] == 0


def test_logprobs_equal_log_softmax_of_a_plain_forward(model, tokenizer):
    """Generated and prompt log-probabilities, with the prompt's prefill split in chunks and
    batched beside requests that ask for nothing."""
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox jumps over", "hello there", "a b c d e f g h i")]
    sampling = [{"logprobs": 5, "prompt_logprobs": 3}, None, {"logprobs": 0, "prompt_logprobs": 0}]
    with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), max_batch_tokens=8, background=False) as e:
        rids = [e.add_request(p, 10, EOS_ID, s) for p, s in zip(prompts, sampling)]
        while e.has_unfinished():
            e.step()
        outs = [e.output_ids(r) for r in rids]
        got = [e.logprobs(r) for r in rids]
        plain = Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False)
        assert plain.generate(prompts, 10, EOS_ID) == outs  # asking for log-probabilities changes no token
        plain.close()
    assert got[1] == ([], [])
    for (gen, prompt_lp), p, out, s in zip(got, prompts, outs, sampling):
        if s is None:
            continue
        ls = torch.log_softmax(plain_logits(model, p + out), -1)
        assert [g.token_id for g in gen] == out and len(prompt_lp) == len(p) and prompt_lp[0] is None
        for i, g in enumerate(gen):
            row = ls[len(p) - 1 + i]
            assert abs(g.logprob - row[g.token_id].item()) < 1e-5
            assert [t for t, _ in g.top] == row.topk(s["logprobs"]).indices.tolist() if s["logprobs"] else g.top == ()
            assert all(abs(lp - row[t].item()) < 1e-5 for t, lp in g.top)
        for k in range(1, len(p)):
            g, row = prompt_lp[k], ls[k - 1]
            assert g.token_id == p[k] and abs(g.logprob - row[p[k]].item()) < 1e-5
            assert len(g.top) == s["prompt_logprobs"]
            assert all(abs(lp - row[t].item()) < 1e-5 for t, lp in g.top)


@pytest.mark.parametrize(
    "sampling",
    [
        {"repetition_penalty": 1.8},
        {"presence_penalty": 1.5, "frequency_penalty": 1.0},
        {"min_tokens": 12, "logit_bias": {EOS_ID: 30.0}},
        {"logit_bias": {ord("z") + 8: 8.0, ord(" ") + 8: -100.0}},
    ],
    ids=["repetition", "presence-frequency", "min-tokens", "logit-bias"],
)
def test_greedy_with_processing_equals_a_plain_transformers_loop(model, tokenizer, sampling):
    prompt = tokenizer.encode("the the the cat sat on the mat")
    want = hf_greedy(model, prompt, 16, sampling, EOS_ID)
    with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False) as e:
        plain, processed = e.generate([prompt, prompt], 16, EOS_ID, None)[0], None
        rid_plain = e.add_request(prompt, 16, EOS_ID)
        rid = e.add_request(prompt, 16, EOS_ID, sampling)  # batched beside a request without
        while e.has_unfinished():
            e.step()
        processed = e.output_ids(rid)
        assert e.output_ids(rid_plain) == plain
    assert processed == want
    assert processed != plain  # the fields did change the tokens
    if "min_tokens" in sampling:
        assert len(processed) >= 12 and EOS_ID not in processed[:12] and processed[12] == EOS_ID
