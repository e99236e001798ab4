"""Issue 24's request fields through a real server, with the ``openai`` client (sync and async):
log-probabilities (chat, completions, ``echo``), penalties, ``min_tokens``, ``logit_bias``,
``continuous_usage_stats``, ``chat_template_kwargs``, and their bad values.

The expected numbers come from the server's default model rebuilt here: log-probabilities are
``log_softmax`` of a plain forward over prompt + generated tokens, and penalised greedy tokens
those of a plain transformers loop with transformers' processors.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from logits_helpers import hf_greedy, plain_logits
from serve_helpers import ServerProcess
from torch_elastic_kv.serve.default_model import (
    DEFAULT_MODEL_NAME,
    EOS_ID,
    build_default_model,
    build_default_tokenizer,
)

MODEL = DEFAULT_MODEL_NAME
TOL = 1e-5
MSG = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(["--max-kv-bytes", "32M"])
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # the server has the other core
    return build_default_model()


@pytest.fixture(scope="module")
def tok():
    return build_default_tokenizer()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def chat_ids(tok, messages, **kwargs) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return tok.encode(text, add_special_tokens=False)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(plain_logits(model, ids), -1)


def token_str(tok, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


# ------------------------------------------------------------------------- logprobs ---------
def test_chat_logprobs_equal_log_softmax_of_the_model(server, model, tok):
    r = client(server).chat.completions.create(
        model=MODEL,
        messages=MSG,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"return_token_ids": True},
    )
    prompt, out = chat_ids(tok, MSG), r.choices[0].model_extra["token_ids"]
    ls = log_softmax(model, prompt + out)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out) == r.usage.completion_tokens
    for i, (t, entry) in enumerate(zip(out, content)):
        row = ls[len(prompt) - 1 + i]
        assert entry.token == token_str(tok, t) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - row[t].item()) < TOL
        top = row.topk(4)
        assert [e.token for e in entry.top_logprobs] == [token_str(tok, x) for x in top.indices.tolist()]
        assert all(abs(e.logprob - v) < TOL for e, v in zip(entry.top_logprobs, top.values.tolist()))
    plain = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    streamed = []
    for ch in client(server).chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4, stream=True
    ):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_completion_logprobs_async_plain_and_streamed(server, model, tok):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)

    async def run():
        c = aclient(server)
        plain = await c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=3, extra_body={"return_token_ids": True}
        )
        stream = await c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=3, stream=True
        )
        chunks = [ch async for ch in stream]
        await c.close()
        return plain, chunks

    plain, chunks = asyncio.run(run())
    out = plain.choices[0].model_extra["token_ids"]
    ls = log_softmax(model, ids + out)
    lp = plain.choices[0].logprobs
    assert lp.tokens == [token_str(tok, t) for t in out]
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(out))]
    for i, t in enumerate(out):
        row = ls[len(ids) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[t].item()) < TOL
        top = row.topk(3)
        want = {token_str(tok, x): v for x, v in zip(top.indices.tolist(), top.values.tolist())}
        want.setdefault(token_str(tok, t), row[t].item())  # the chosen token, always
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(abs(lp.top_logprobs[i][k] - v) < TOL for k, v in want.items())
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        if ch.choices and ch.choices[0].logprobs is not None:
            for key in streamed:
                streamed[key] += getattr(ch.choices[0].logprobs, key)
    # the streamed request shares the plain one's cached prompt pages (prefix caching), so its
    # prefill computes fewer rows: the same tokens, log-probabilities equal within float32 noise
    want = lp.model_dump()
    assert streamed["tokens"] == want["tokens"] and streamed["text_offset"] == want["text_offset"]
    assert all(abs(a - b) < TOL for a, b in zip(streamed["token_logprobs"], want["token_logprobs"]))
    for got, ref in zip(streamed["top_logprobs"], want["top_logprobs"]):
        assert got.keys() == ref.keys() and all(abs(got[k] - ref[k]) < TOL for k in ref)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text


def test_echo_returns_the_prompt_scored_as_a_direct_forward(server, model, tok):
    prompt = "Paris is the capital of"
    ids = tok.encode(prompt)
    c = client(server)
    # lm-eval's loglikelihood shape, then the prompt alone (max_tokens 0, as vLLM allows)
    r1 = c.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    r0 = c.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0, temperature=0)
    ls = log_softmax(model, ids)
    for r, n_gen in ((r1, 1), (r0, 0)):
        ch = r.choices[0]
        lp = ch.logprobs
        assert ch.text.startswith(prompt) and len(lp.tokens) == len(ids) + n_gen
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens[: len(ids)] == [token_str(tok, t) for t in ids]
        for k in range(1, len(ids)):
            assert abs(lp.token_logprobs[k] - ls[k - 1, ids[k]].item()) < TOL
            best = int(ls[k - 1].argmax())
            assert abs(lp.top_logprobs[k][token_str(tok, best)] - ls[k - 1, best].item()) < TOL
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_gen)
    assert r0.choices[0].text == prompt
    greedy = int(ls[-1].argmax())
    assert r1.choices[0].text == prompt + token_str(tok, greedy)
    assert abs(r1.choices[0].logprobs.token_logprobs[-1] - ls[-1, greedy].item()) < TOL
    # the raw body lm-eval posts
    body = {"model": MODEL, "prompt": [prompt, "x y"], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert [len(ch["logprobs"]["tokens"]) for ch in resp.json()["choices"]] == [
        len(ids) + 1,
        len(tok.encode("x y")) + 1,
    ]
    # echo without logprobs: the text alone; streamed: the prompt comes first
    r = c.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None and r.choices[0].text.startswith(prompt)
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3, temperature=0, stream=True)
    )
    assert text == r.choices[0].text


# ------------------------------------------------------------------------- penalties --------
@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 1.8},
        {"presence_penalty": 1.5, "frequency_penalty": 1.0},
        {"min_tokens": 12, "logit_bias": {str(EOS_ID): 30.0}},
        {"logit_bias": {str(ord("z") + 8): 8.0}, "min_p": 0.5},
    ],
    ids=["repetition", "presence-frequency", "min-tokens", "logit-bias"],
)
def test_penalties_change_tokens_as_transformers_processors(server, model, tok, fields):
    prompt = tok.encode("the the the cat sat on the mat")
    sampling = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in fields.items()}
    sampling.pop("min_p", None)  # greedy: min_p never removes the most likely token
    want = hf_greedy(model, prompt, 16, sampling, EOS_ID)
    extra = {k: v for k, v in fields.items() if k in ("repetition_penalty", "min_tokens", "min_p")}
    body = {k: v for k, v in fields.items() if k not in extra}
    r = client(server).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
        **body,
    )
    got = r.choices[0].model_extra["token_ids"]
    assert got == want
    plain = client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"return_token_ids": True}
    )
    assert plain.choices[0].model_extra["token_ids"] != got  # the field did change the tokens


def test_min_tokens_defers_stop_strings_as_vllm(server):
    c = client(server)
    prompt = "the cat sat on"
    plain = c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"return_token_ids": True}
    )
    ids = plain.choices[0].model_extra["token_ids"]
    text = plain.choices[0].text
    stop = text[1]  # a stop string the plain output meets at once
    cut = c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.usage.completion_tokens < 8
    held = c.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"min_tokens": 8, "return_token_ids": True},
    )
    got = held.choices[0].model_extra["token_ids"]
    assert held.usage.completion_tokens >= 8 and got == ids[: len(got)]  # EOS was not due before 8
    assert held.choices[0].text.startswith(text[: text.index(stop) + 1])


# ------------------------------------------------------------------------- usage ------------
def test_continuous_usage_stats_on_every_chunk_summing_right(server, tok):
    async def run():
        c = aclient(server)
        opts = {"include_usage": True, "continuous_usage_stats": True}
        ids = {"return_token_ids": True}
        chat = await c.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=12, temperature=0, stream=True, stream_options=opts, extra_body=ids
        )
        chat_chunks = [ch async for ch in chat]
        comp = await c.completions.create(
            model=MODEL,
            prompt="abc",
            max_tokens=12,
            temperature=0,
            n=2,
            stream=True,
            stream_options=opts,
            extra_body=ids,
        )
        comp_chunks = [ch async for ch in comp]
        only_continuous = await c.completions.create(
            model=MODEL, prompt="abc", max_tokens=3, stream=True, stream_options={"continuous_usage_stats": True}
        )
        bare = [ch async for ch in only_continuous]
        await c.close()
        return chat_chunks, comp_chunks, bare

    chat_chunks, comp_chunks, bare = asyncio.run(run())
    for chunks, prompt_tokens, n in ((chat_chunks, len(chat_ids(tok, MSG)), 1), (comp_chunks, 4, 2)):
        assert all(ch.usage is not None for ch in chunks), [ch.usage for ch in chunks]
        delivered = 0
        for ch in chunks[:-1]:
            delivered += len(ch.choices[0].model_extra.get("token_ids") or [])
            u = ch.usage
            assert u.completion_tokens == delivered  # the tokens sent so far, this chunk's included
            assert u.prompt_tokens == prompt_tokens and u.total_tokens == u.prompt_tokens + u.completion_tokens
        final = chunks[-1]
        assert final.choices == [] and final.usage.completion_tokens == delivered
        assert n <= delivered <= 12 * n
    plain = client(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, temperature=0)
    assert chat_chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(ch.usage is None for ch in bare)  # as vLLM: continuous usage needs include_usage


# ------------------------------------------------------------------------- chat template ----
def test_chat_template_kwargs_reach_the_template(server, tok):
    c = client(server)
    base = c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    r = c.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=1, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}}
    )
    text = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=False)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False)) == base.usage.prompt_tokens - 1


# ------------------------------------------------------------------------- bad values -------
C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [
    (C, {"min_tokens": -1}, "min_tokens", "min_tokens must be at least 0"),
    (C, {"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens (9) must not be more than max_tokens (4)"),
    (C, {"min_tokens": 20}, "min_tokens", "min_tokens (20) must not be more than max_tokens (16)"),
    (C, {"logprobs": 21}, "logprobs", "logprobs must be between 0 and 20"),
    (C, {"logprobs": -1}, "logprobs", "logprobs must be between 0 and 20"),
    (C, {"logit_bias": {"264": 1}}, "logit_bias", "'264' is not a token id of this model (0 to 263)"),
    (C, {"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
    (C, {"logit_bias": {"5": 100.5}}, "logit_bias", "the bias for token 5 must be in [-100, 100]"),
    (C, {"logit_bias": {"5": -101}}, "logit_bias", "must be in [-100, 100]"),
    (C, {"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be between -2 and 2"),
    (C, {"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be between -2 and 2"),
    (C, {"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be a finite number > 0"),
    (C, {"min_p": 1.5}, "min_p", "min_p must be between 0 and 1"),
    (C, {"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    (C, {"echo": True, "max_tokens": -1}, "max_tokens", "max_tokens must be at least 0"),
    (C, {"suffix": "y"}, "suffix", "suffix is not supported"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs set to true"),
    (CHAT, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "may not set tokenize"),
    (CHAT, {"chat_template_kwargs": "x"}, "chat_template_kwargs", None),
    (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": 1}}, None, None),
]


@pytest.mark.parametrize("path, fields, param, message", BAD, ids=range(len(BAD)))
def test_bad_values_are_400_naming_the_field(server, path, fields, param, message):
    base = {"prompt": "x"} if path == C else {"messages": MSG}
    resp = httpx.post(server.url + path, content=json.dumps({**base, **fields}), timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    if message is not None:
        assert message in err["message"], err
