"""A server on a local model directory (``--model DIR``), static pool, no keys; SIGTERM last.

The directory is the default model written by ``write_default_model_dir`` with its chat
template removed: the same weights, so ``Engine.generate`` on the in-memory default model is
the reference, and chat must answer 400.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from serve_helpers import ServerProcess, metrics, wait_until
from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.serve.default_model import EOS_ID, build_default_model, build_default_tokenizer

STATIC = 8 << 20
DRAIN = 2.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from torch_elastic_kv.serve.default_model import write_default_model_dir

    path = write_default_model_dir(tmp_path_factory.mktemp("ekv-model") / "default-llama")
    # no chat template: chat completions must say so
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    s = ServerProcess(
        ["--model", str(model_dir), "--min-kv-bytes", "8M", "--max-kv-bytes", "8M", "--drain-seconds", str(DRAIN)]
    )
    try:
        yield s
    finally:
        s.stop()


def test_model_dir_loads_back_the_default_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model_dir))
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    built = build_default_model()
    a, b = loaded.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ref = build_default_tokenizer()
    text = "héllo, wörld € 😀 \x00\n"
    assert tok.encode(text) == ref.encode(text) and tok.encode(text)[0] == 1
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert len(tok) == loaded.config.vocab_size == 264
    assert tok.eos_token_id == EOS_ID


def test_serves_the_directory_and_matches_engine_generate(server, model_dir):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = c.models.list().data
    assert [m.id for m in models] == [str(model_dir)]
    assert models[0].model_extra["root"] == str(model_dir) and "random_weights" not in models[0].model_extra
    tok = build_default_tokenizer()
    prompts = ["from a directory", "second"]
    torch.set_num_threads(1)
    with Engine(build_default_model(), policy=ElasticPolicy(max_bytes=32 << 20)) as engine:
        want = engine.generate([tok.encode(p) for p in prompts], 12, eos_token_id=EOS_ID)
    r = c.completions.create(model=str(model_dir), prompt=prompts, max_tokens=12, temperature=0)
    assert [ch.text for ch in r.choices] == [tok.decode(w, skip_special_tokens=True) for w in want]
    # a static pool: mapped at start and kept
    assert metrics(server.url)["ekv_kv_resident_bytes"] == STATIC


def test_chat_without_a_template_is_400(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and "no chat template" in err["message"]


def test_admin_is_404_without_an_admin_key(server):
    for method, path in (
        ("GET", "/admin/stats"),
        ("POST", "/admin/sleep"),
        ("POST", "/admin/wake"),
        ("POST", "/admin/kv-budget"),
    ):
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = httpx.request(method, server.url + path, json={"bytes": None}, headers=headers, timeout=30)
            assert r.status_code == 404, (path, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_request_that_can_never_fit_is_400_naming_the_numbers(server):
    # 8 MiB static = 64 pages of 16 tokens; this one needs ceil((5 + 1100 - 1) / 16) = 69
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 8, 9, 10, 11], "max_tokens": 1100}, timeout=30)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("prompt (5 tokens) + max_tokens (1100) needs 69 KV pages")
    assert str(STATIC) in msg and "64 pages" in msg


def test_sigterm_under_load_drains_then_exits_0(server):
    """Last: it stops the server. In-flight requests get --drain-seconds, the rest "abort"."""
    results: dict = {}

    def stream(i: int) -> None:
        body = {"prompt": f"drain {i}", "max_tokens": 900, "ignore_eos": True, "stream": True}
        finish, done = None, False
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        finish = choices[0].get("finish_reason") or finish
            results[i] = (r.status_code, finish, done)
        except httpx.HTTPError as exc:
            results[i] = ("error", repr(exc), False)

    def plain() -> None:
        r = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "drain plain", "max_tokens": 900, "ignore_eos": True},
            timeout=60,
        )
        results["plain"] = (r.status_code, r.json()["choices"][0]["finish_reason"], True)

    # each needs 57 of the 64 pages: they run one at a time, far longer than the drain
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)] + [threading.Thread(target=plain)]
    for t in threads:
        t.start()

    def all_in_and_flowing() -> bool:  # all four accepted by the Engine before the signal
        m = metrics(server.url)
        return m["ekv_requests_running"] + m["ekv_requests_waiting"] >= 4 and m["ekv_generation_tokens_total"] >= 20

    wait_until(all_in_and_flowing, 60, what="four requests in and tokens flowing")
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    # it stops accepting connections at once
    wait_until(lambda: _refused(server.url), DRAIN, 0.05, "new connections refused")
    status = server.wait(DRAIN + 5)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert status == 0, server.log()[-3000:]
    assert elapsed <= DRAIN + 5
    assert set(results) == {0, 1, 2, "plain"}
    for code, finish, done in results.values():
        assert code == 200 and done and finish in ("length", "abort"), results
    assert any(finish == "abort" for _, finish, _ in results.values()), results
    assert "engine closed: KV memory given back" in server.log()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False
