"""The routes tools written for vLLM and OpenAI expect beyond completions and chat.

- ``POST /tokenize``, ``POST /detokenize``: vLLM's shapes. ``/tokenize`` takes ``prompt`` (with
  ``add_special_tokens``, default true) or chat ``messages`` (the chat template, with
  ``add_generation_prompt``, default true; ``add_special_tokens`` only false), and answers
  ``{"count", "max_model_len", "tokens", "token_strs"}``; ``/detokenize`` takes ``tokens`` and
  answers ``{"prompt"}``. Both need the API key when one is set (vLLM leaves them open): they
  run the tokenizer, so an open server would lend its CPU to anyone.
- ``GET /version``; ``GET /v1/models/{id}`` (OpenAI's model card, 404 in OpenAI's error shape for
  an id this server does not serve); ``HEAD /health``; ``GET``/``POST /ping`` (SageMaker's and
  vLLM's health alias).
- vLLM's ``POST /sleep?level=N``, ``POST /wake_up``, ``GET /is_sleeping``, ``POST /reset_prefix_cache``,
  behind the admin key
  (404 without ``--admin-key``, as every ``/admin/*`` route), mapped onto the admin sleep and
  wake. Both of vLLM's levels do the same here: the KV memory goes back and the weights stay
  (level 1 would offload them, level 2 drop them); requests queue until ``/wake_up``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from .. import __version__
from . import protocol as P
from .app import (
    ServerState,
    _chat_prompt,
    _check_model,
    _encode,
    _read_json,
    _require_admin,
    _require_api_key,
    health_response,
    model_card,
)
from .errors import bad_request, not_found

__all__ = ["add_compat_routes"]

SLEEP_LEVELS = ("1", "2")
WAKE_TAGS = ("weights", "kv_cache")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self) -> None:
        """Checks beyond the types (none by default)."""


class TokenizePrompt(_Strict):
    """``POST /tokenize`` with a prompt."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(_Strict):
    """``POST /tokenize`` with chat messages."""

    model: Optional[str] = None
    messages: list[P.ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False

    def check(self) -> None:
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.add_special_tokens:
            # the template writes the special tokens itself, and the chat route never adds more
            raise bad_request(
                "add_special_tokens is not supported with messages (the chat template adds them)",
                "add_special_tokens",
                "unsupported_parameter",
            )


class Detokenize(_Strict):
    """``POST /detokenize``."""

    model: Optional[str] = None
    tokens: list[int]


def _tokenize(state: ServerState, data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and "messages" in data:
        chat = P.parse_request(TokenizeChat, data)  # type: ignore[arg-type]
        _check_model(state, chat.model)
        # the same text as /v1/chat/completions builds from these messages
        req = P.ChatRequest.model_construct(messages=chat.messages, add_generation_prompt=chat.add_generation_prompt)
        ids = _chat_prompt(state, req)
        want_strs = chat.return_token_strs
    else:
        req_p = P.parse_request(TokenizePrompt, data)  # type: ignore[arg-type]
        _check_model(state, req_p.model)
        ids = _encode(state.tokenizer, req_p.prompt, req_p.add_special_tokens)
        want_strs = req_p.return_token_strs
    strs = state.tokenizer.convert_ids_to_tokens(ids) if want_strs else None
    return {"count": len(ids), "max_model_len": state.max_positions, "tokens": ids, "token_strs": strs}


def _detokenize(state: ServerState, data: Any) -> dict[str, Any]:
    req = P.parse_request(Detokenize, data)  # type: ignore[arg-type]
    _check_model(state, req.model)
    vocab = len(state.tokenizer)
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise bad_request(f"tokens[{i}] = {t} is not a token id (the vocabulary has {vocab})", "tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}


def add_compat_routes(app: FastAPI, state: ServerState) -> None:
    """Add the routes above to ``app``."""

    @app.head("/health")
    async def health_head() -> Response:
        status = health_response(state).status_code
        return Response(status_code=status)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> JSONResponse:
        return health_response(state)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        _require_api_key(state, request)
        if model_id not in state.served_names:
            raise not_found(f"The model '{model_id}' does not exist", "model_not_found")
        return JSONResponse(model_card(state, model_id))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        _require_api_key(state, request)
        data = await _read_json(request, state.max_body_bytes)
        return JSONResponse(await asyncio.to_thread(_tokenize, state, data))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        _require_api_key(state, request)
        data = await _read_json(request, state.max_body_bytes)
        return JSONResponse(await asyncio.to_thread(_detokenize, state, data))

    @app.post("/sleep")
    async def sleep(request: Request) -> Response:
        _require_admin(state, request)
        level = request.query_params.get("level", "1")
        if level not in SLEEP_LEVELS:
            raise bad_request(f"level must be 1 or 2, got {level!r}", "level")
        await state.service.command("sleep")
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(request: Request) -> Response:
        _require_admin(state, request)
        tags = request.query_params.getlist("tags")
        for tag in tags:
            if tag not in WAKE_TAGS:
                raise bad_request(f"tags: {tag!r} is not one of {', '.join(WAKE_TAGS)}", "tags")
        if not tags or "kv_cache" in tags:  # the weights never left: waking them alone is a no-op
            await state.service.command("wake")
        return Response(status_code=200)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        _require_admin(state, request)
        await state.service.command("reset_prefix_cache")
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping(request: Request) -> JSONResponse:
        _require_admin(state, request)
        return JSONResponse({"is_sleeping": (await state.service.stats_now())["sleeping"]})
