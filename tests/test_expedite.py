"""Engine.expedite: a request whose next token a client awaits gets a short step.

The server marks a stream that has shown no text yet (its first character split over tokens);
the next step that decodes it takes at most ``expedite_prefill_tokens`` prompt tokens beside
the decoders. Marks change which step a prompt chunk runs in, never a token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve.default_model import build_default_model, build_default_tokenizer
from torch_elastic_kv.serve.engine_thread import ChoiceSpec, EngineService
from torch_elastic_kv.serve.metrics import ServerMetrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BYTE0 = 8  # the default tokenizer's id of byte 0x00


@pytest.fixture(scope="module")
def model():
    return build_default_model()


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def _engine(model, **kw) -> Engine:
    return Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False, max_batch_tokens=256, **kw)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(BYTE0 + 32, BYTE0 + 127, (n,), generator=g).tolist()


def _last_step_tokens(engine: Engine) -> int:
    return engine.timeline[-1]["num_tokens"]


@pytest.mark.parametrize("cap", [0, 32])
def test_a_marked_decoder_gets_a_short_step_and_the_same_tokens(model, cap) -> None:
    short, long = _prompt(20, 1), _prompt(200, 2)
    with _engine(model) as ref:
        want = ref.generate([short, long], 6)
    with _engine(model, expedite_prefill_tokens=cap) as eng:
        a = eng.add_request(short, 6)
        eng.step()  # a's prefill: it decodes from now on
        b = eng.add_request(long, 6)
        assert eng.expedite(a) is True
        eng.step()  # a's token, and at most `cap` of b's prompt
        assert _last_step_tokens(eng) == 1 + cap
        eng.step()  # the mark lasted one step: the rest of b's prompt runs now
        assert _last_step_tokens(eng) == 1 + (200 - cap)
        while eng.has_unfinished():
            eng.step()
        assert [eng.output_ids(a), eng.output_ids(b)] == want
        assert eng.stats()["expedited_steps"] == 1


def test_without_a_cap_or_a_mark_the_step_takes_the_whole_prompt(model) -> None:
    short, long = _prompt(20, 3), _prompt(200, 4)
    for kw, mark in (({"expedite_prefill_tokens": None}, True), ({}, False)):
        with _engine(model, **kw) as eng:
            a = eng.add_request(short, 4)
            eng.step()
            eng.add_request(long, 4)
            if mark:
                assert eng.expedite(a) is True  # accepted, but changes nothing
            eng.step()
            assert _last_step_tokens(eng) == 1 + 200 and eng.stats()["expedited_steps"] == 0


def test_expedite_answers_for_requests_not_running_and_refuses_bad_input(model) -> None:
    with _engine(model) as eng:
        a = eng.add_request(_prompt(10, 5), 1)
        assert eng.expedite(a) is False  # still queued
        while eng.has_unfinished():
            eng.step()
        assert eng.expedite(a) is False  # finished
        with pytest.raises(ValueError, match="expedite: unknown request id 999"):
            eng.expedite(999)
        with pytest.raises(ValueError, match="unknown request id 'x'"):
            eng.expedite("x")
    for bad in (-1, 2.5, "8"):
        with pytest.raises(ValueError, match="expedite_prefill_tokens must be None or an int >= 0"):
            _engine(model, expedite_prefill_tokens=bad)


def _first_tokens(model, prompts: list[list[int]]) -> list[int]:
    with _engine(model) as ref:
        return [out[0] for out in ref.generate(prompts, 1)]


def test_the_server_expedites_a_stream_until_it_shows_text(model, tokenizer) -> None:
    # find, among fixed prompts, one whose first token starts a multi-byte character (no text
    # yet) and one whose first token is printable ASCII (text at once)
    prompts = [_prompt(40, 100 + i) for i in range(200)]
    firsts = _first_tokens(model, prompts)
    pending = next(p for p, t in zip(prompts, firsts) if 0xC2 <= t - BYTE0 <= 0xF4)
    plain = next(p for p, t in zip(prompts, firsts) if 0x21 <= t - BYTE0 <= 0x7E)
    with _engine(model) as ref:
        want = ref.generate([pending, plain], 8)
    engine = _engine(model)
    marked: list[int] = []
    real = engine.expedite

    def spy(rid: int) -> bool:
        marked.append(rid)
        return real(rid)

    engine.expedite = spy
    service = EngineService(engine, tokenizer, ServerMetrics(), max_waiting=8)
    service.start()

    # the plain prompt again, under a stop string that holds its text back for 9 characters: it
    # has sent nothing for several tokens, but its characters are decided, so it is not marked
    specs = [
        ChoiceSpec(pending, 8, {"temperature": 0.0}),
        ChoiceSpec(plain, 8, {"temperature": 0.0}),
        ChoiceSpec(plain, 8, {"temperature": 0.0}, stop=("\x00" * 10,)),
    ]

    async def run():
        loop = asyncio.get_running_loop()
        subs = [service.submit([spec], loop) for spec in specs]
        out = []
        for sub in subs:
            events = []
            while not sub.done:
                events += await sub.next_events()
            out.append(events)
        return subs, out

    try:
        subs, events = asyncio.run(run())
    finally:
        service.stop()
    got = [[t for e in ev for t in e.token_ids] for ev in events]
    assert got == want + want[1:]
    rids = [sub.choices[0].rid for sub in subs]
    assert rids[0] in marked and rids[1] not in marked and rids[2] not in marked
    # marked only while nothing was sent: the text's first character needs at most 4 tokens
    assert 1 <= marked.count(rids[0]) <= 3


def test_the_serve_flag_reaches_the_engine(model) -> None:
    from torch_elastic_kv.serve import cli
    from torch_elastic_kv.serve.server import engine_options

    for argv, want in (
        ([], 256),
        (["--expedite-prefill-tokens", "0"], 0),
        (["--expedite-prefill-tokens", "off"], None),
    ):
        settings = cli.resolve(argv)
        assert settings.expedite_prefill_tokens == want
        _, engine_kw = engine_options(settings, model)
        assert engine_kw["expedite_prefill_tokens"] == want
        with Engine(model, policy=ElasticPolicy(max_bytes=16 << 20), background=False, **engine_kw) as eng:
            assert eng.scheduler.expedite_prefill_tokens == want
