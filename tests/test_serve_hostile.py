"""The server against hostile and careless clients (issue 21): a real server subprocess on a
free loopback port, driven by httpx and the official ``openai`` client.

Bodies a tokenizer or the JSON parser cannot take are 400s in OpenAI's shape, never 500s; a
request without ``max_tokens`` is served under a small KV ceiling; the admin routes do not
reveal themselves when admin is off; a token-id prompt that ends inside a character does not
take a byte from the output's text.
"""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import ServerProcess
from torch_elastic_kv.serve.default_model import DEFAULT_MODEL_NAME, build_default_tokenizer

MODEL = DEFAULT_MODEL_NAME
KV_TOKENS = (12 << 20) // (8 << 10)  # --max-kv-bytes 12M at the default model's 8 KiB per token
TIMEOUT = 120


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(["--max-kv-bytes", "12M", "--max-waiting", "64", "--drain-seconds", "2"])
    try:
        yield s
    finally:
        status = s.stop()
        assert status == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def _post(server, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        kw["content"] = body
        kw.setdefault("headers", {"content-type": "application/json"})
    else:
        kw["json"] = body
    return httpx.post(server.url + path, timeout=TIMEOUT, **kw)


def _assert_openai_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------- item 12 -------
@pytest.mark.parametrize("path", ["/admin/kv-budget", "/admin/sleep", "/admin/wake", "/admin/stats"])
def test_admin_routes_are_404_for_every_method_when_admin_is_off(server, path):
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        r = httpx.request(method, server.url + path, timeout=TIMEOUT, json=None)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "allow" not in r.headers, (method, r.headers)
        if method != "HEAD":
            _assert_openai_error(r, 404)
