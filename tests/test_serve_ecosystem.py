"""What tools written for vLLM and OpenAI send and scrape, against a real server subprocess:
tokenize/detokenize, version, ping, HEAD /health, models by id, several served names, vLLM's
sleep/wake_up/is_sleeping, and vLLM's metric names read with prometheus_client's parser.

One server for the module, started with vLLM-style options (a positional model directory,
IEC sizes, ``--max-model-len``, ``--chat-template``, two served names).
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import ServerProcess, metrics, wait_until
from torch_elastic_kv import __version__
from torch_elastic_kv.serve.default_model import build_default_tokenizer, write_default_model_dir

API_KEY = "sk-eco-test"
ADMIN_KEY = "admin-eco-test"
NAMES = ("eco-a", "eco-b")
MAX_MODEL_LEN = 1024
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
)
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), written out: the test checks ours against theirs
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TTFT_BUCKETS += (80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
E2E_BUCKETS += (960.0, 1920.0, 7680.0)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    model_dir = write_default_model_dir(root / "model")
    template = root / "chat.jinja"
    template.write_text(TEMPLATE)
    args = [str(model_dir), "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    args += ["--served-model-name", *NAMES, "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--chat-template", str(template), "--max-kv-bytes", "64Mi", "--idle-seconds", "30"]
    s = ServerProcess(args)
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def _post(server, path, body, headers=AUTH) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def _error(resp: httpx.Response, status: int, code=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------------------- endpoints -----
def test_tokenize_and_detokenize_as_vllm(server, tokenizer):
    text = "Hello, elastic world"
    r = _post(server, "/tokenize", {"model": "eco-b", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert r.json() == {
        "count": len(ids),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    plain = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False) and plain["token_strs"] is None
    # chat messages go through --chat-template, as /v1/chat/completions does
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode("[user]hi>", add_special_tokens=False)
    back = _post(server, "/detokenize", {"tokens": ids[1:]})
    assert back.status_code == 200 and back.json() == {"prompt": text}

    _error(_post(server, "/detokenize", {"tokens": [0, len(tokenizer)]}), 400)
    _error(_post(server, "/detokenize", {"tokens": "abc"}), 400)
    _error(_post(server, "/tokenize", {"prompt": text, "model": "nope"}), 404, "model_not_found")
    _error(_post(server, "/tokenize", {"prompt": text, "extra": 1}), 400)
    _error(_post(server, "/tokenize", {"prompt": text}, headers={}), 401, "invalid_api_key")


def test_version_ping_and_head_health(server):
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/ping")
        assert r.status_code == 200 and r.json() == {"status": "ok"}, (method, r.text)
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""


def test_models_by_id_and_every_served_name(server):
    listed = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in listed["data"]] == list(NAMES)
    for name in NAMES:
        card = httpx.get(server.url + f"/v1/models/{name}", headers=AUTH)
        assert card.status_code == 200 and card.json()["id"] == name
        assert card.json()["max_model_len"] == MAX_MODEL_LEN
    err = _error(httpx.get(server.url + "/v1/models/org/other", headers=AUTH), 404, "model_not_found")
    assert "org/other" in err["message"]
    _error(httpx.get(server.url + "/v1/models/eco-a"), 401)
    # the second name is accepted in requests; responses report the first, as vLLM does
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = client.completions.create(model="eco-b", prompt="abc", max_tokens=2, temperature=0)
    assert r.model == "eco-a"
    # --max-model-len 1024 is the context limit, not the model's 2048
    with pytest.raises(openai.BadRequestError, match="1024"):
        client.completions.create(model="eco-a", prompt="abc", max_tokens=1100)


def test_vllm_sleep_wake_up_is_sleeping(server):
    url = server.url
    _error(httpx.post(url + "/sleep"), 401)
    _error(httpx.get(url + "/is_sleeping", headers=AUTH), 401)
    assert httpx.get(url + "/is_sleeping", headers=ADMIN).json() == {"is_sleeping": False}
    _error(httpx.post(url + "/sleep?level=3", headers=ADMIN), 400)
    assert httpx.get(url + "/is_sleeping", headers=ADMIN).json() == {"is_sleeping": False}
    r = httpx.post(url + "/sleep?level=2", headers=ADMIN)
    assert r.status_code == 200 and r.content == b""
    assert httpx.get(url + "/is_sleeping", headers=ADMIN).json() == {"is_sleeping": True}
    m = metrics(url)
    assert m["ekv_server_sleeping"] == 1 and m["ekv_kv_budget_bytes"] == 0
    wait_until(lambda: metrics(url)["ekv_kv_resident_bytes"] == 0, 30, 0.1, "KV memory given back")
    # the weights never leave: waking them alone changes nothing
    assert httpx.post(url + "/wake_up?tags=weights", headers=ADMIN).status_code == 200
    assert httpx.get(url + "/is_sleeping", headers=ADMIN).json() == {"is_sleeping": True}
    _error(httpx.post(url + "/wake_up?tags=everything", headers=ADMIN), 400)
    assert httpx.post(url + "/wake_up", headers=ADMIN).status_code == 200
    assert httpx.get(url + "/is_sleeping", headers=ADMIN).json() == {"is_sleeping": False}
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert client.completions.create(model="eco-a", prompt="awake", max_tokens=3, temperature=0).usage.completion_tokens


# ---------------------------------------------------------------------------- metrics -------
def _families(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    family = families[name]
    want = sample or name
    for s in family.samples:
        if s.name == want and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((want, labels))


def _buckets(families: dict, name: str) -> tuple[float, ...]:
    return tuple(
        float(s.labels["le"]) for s in families[name].samples if s.name == name + "_bucket" and s.labels["le"] != "+Inf"
    )


def test_vllm_metric_names_under_load(server):
    url = server.url
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    before = _families(url)
    labels = {"model_name": "eco-a", "engine": "0"}
    success_before = {
        r: _value(before, "vllm:request_success", "vllm:request_success_total", finished_reason=r, **labels)
        for r in ("stop", "length", "abort", "error")
    }
    n = 6  # 6 x 1000 tokens fit the 64 MiB ceiling: nobody is preempted while the test looks
    streams, started = [], threading.Barrier(n + 1, timeout=120)

    def run(i: int) -> None:
        stream = client.completions.create(
            model="eco-a",
            prompt=f"load {i}",
            max_tokens=1000,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        streams.append(stream)
        next(iter(stream))  # the first token: it runs
        started.wait()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started.wait()
    try:
        admin = lambda: httpx.get(url + "/admin/stats", headers=ADMIN).json()  # noqa: E731
        wait_until(lambda: admin()["running"] == n, 60, what=f"{n} running")
        low = admin()["running"]
        fams = _families(url)
        high = admin()["running"]
        assert low == high == n  # steady: the scrape saw the same Engine
        running = _value(fams, "vllm:num_requests_running", **labels)
        assert running == n == _value(fams, "ekv_requests_running")
        assert _value(fams, "vllm:num_requests_waiting", **labels) == _value(fams, "ekv_requests_waiting") == 0
        live, budget = _value(fams, "ekv_kv_live_bytes"), _value(fams, "ekv_kv_budget_bytes")
        assert live > 0 and budget == 64 << 20
        usage = _value(fams, "vllm:kv_cache_usage_perc", **labels)
        assert usage == pytest.approx(live / budget, rel=1e-12) and 0 < usage < 1
        assert _value(fams, "vllm:gpu_cache_usage_perc", **labels) == usage
        # an info-style gauge, as vLLM's: value 1, the facts in its labels
        assert fams["vllm:cache_config_info"].type == "gauge"
        info = fams["vllm:cache_config_info"].samples
        assert len(info) == 1 and info[0].value == 1
        page = int(info[0].labels["page_bytes"])
        assert info[0].labels["block_size"] == "16" and int(info[0].labels["num_gpu_blocks"]) == (64 << 20) // page
        assert info[0].labels["cache_dtype"] == "float32"
    finally:
        for s in streams:
            s.close()  # the clients go away: the server cancels them ("abort")
        for t in threads:
            t.join(60)
    wait_until(lambda: metrics(url)["ekv_requests_running"] == 0, 60, what="cancelled")
    after = _families(url)
    for ours, theirs in (
        ("ekv_prompt_tokens", "vllm:prompt_tokens"),
        ("ekv_generation_tokens", "vllm:generation_tokens"),
    ):
        assert _value(after, ours, ours + "_total") == _value(after, theirs, theirs + "_total", **labels) > 0
    aborted = _value(after, "vllm:request_success", "vllm:request_success_total", finished_reason="abort", **labels)
    assert aborted == success_before["abort"] + n
    done = sum(
        _value(after, "vllm:request_success", "vllm:request_success_total", finished_reason=r, **labels)
        for r in success_before
    )
    for name, buckets in (
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:e2e_request_latency_seconds", E2E_BUCKETS),
        ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
        ("vllm:time_per_output_token_seconds", ITL_BUCKETS),
        ("vllm:request_time_per_output_token_seconds", ITL_BUCKETS),
    ):
        assert after[name].type == "histogram" and _buckets(after, name) == buckets, name
    assert _value(after, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count", **labels) == done
    assert _value(
        after, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count", **labels
    ) == _value(after, "ekv_time_to_first_token_seconds", "ekv_time_to_first_token_seconds_count")
    gaps = _value(after, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count", **labels)
    assert gaps == _value(
        after, "vllm:time_per_output_token_seconds", "vllm:time_per_output_token_seconds_count", **labels
    )
    assert gaps >= n  # every stream had at least two tokens
