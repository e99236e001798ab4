"""The HTTP routes: OpenAI's completions and chat completions, models, health, metrics, admin.

Handlers parse and check the request (``protocol``), tokenize it off the event loop, submit
its choices to the engine thread (``EngineService``) and answer from the events it sends back:
as one JSON body, or as server-sent events ending in ``data: [DONE]``. A client that goes away
cancels its request (a stream notices at once; a plain request is watched for the disconnect
while it waits). Every error is OpenAI's JSON shape (``errors``).

Keys: with ``api_key``, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (401 otherwise);
``/admin/*`` answers 404 unless an ``admin_key`` is set, and then needs that key (401).
``/health`` and ``/metrics`` are open, as in vLLM. Both keys are compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import protocol as P
from .engine_thread import ChoiceEvent, ChoiceSpec, Submission
from .errors import APIError, bad_request, error_body, not_found, unauthorized
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .metrics import CONTENT_TYPE

_log = logging.getLogger(__name__)

__all__ = ["Service", "ServerState", "create_app", "health_response", "model_card"]

MAX_CHOICES = 256  # prompts x n in one request
# json.loads keeps an unpaired \uD800-\uDFFF escape as a lone surrogate, which no tokenizer
# (and no UTF-8 response) can take; a valid pair decodes to one character and passes.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Service(Protocol):
    """The engine as the routes see it: an ``EngineService`` in this process, or, with the HTTP
    front in its own process, ``front_link.EngineLink`` to the one in the engine's process."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def down(self) -> Optional[str]: ...
    @property
    def draining(self) -> bool: ...
    def begin_drain(self, seconds: float) -> None: ...
    def cancel(self, sub: Submission) -> None: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def submit_request(self, specs: Sequence[ChoiceSpec], prompt_tokens: int) -> Submission: ...
    async def command(self, name: str, arg: Any = None) -> Any: ...
    async def stats_now(self) -> dict[str, Any]: ...
    async def metrics_text(self) -> bytes: ...
    async def room_for(self, prompt_tokens: int) -> Optional[int]: ...
    async def refusal_for(self, prompt_tokens: int, max_tokens: int, label: str) -> Optional[str]: ...


@dataclass
class ServerState:
    """What the routes need: the engine service, the tokenizer and the server's settings."""

    service: Service
    tokenizer: Any
    model_name: str
    max_positions: int
    eos_token_ids: tuple[int, ...]
    api_key: Optional[str] = None
    admin_key: Optional[str] = None
    max_body_bytes: int = 4 << 20
    body_timeout: float = 30.0  # seconds for a request body to arrive once its head is in
    default_max_tokens: int = 16  # completions without max_tokens, as OpenAI
    model_card: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=P.now_seconds)
    model_aliases: tuple[str, ...] = ()  # more names requests may send (--served-model-name a b)

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every model name requests may send; responses report the first."""
        return (self.model_name, *self.model_aliases)


def model_card(state: ServerState, name: str) -> dict[str, Any]:
    """OpenAI's model object for one of the served names."""
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "torch_elastic_kv",
        "max_model_len": state.max_positions,
        **state.model_card,
    }


def health_response(state: ServerState) -> JSONResponse:
    """``/health``'s answer: 200 ok, or 503 while draining or once the engine is down."""
    if state.service.down is not None:
        return JSONResponse({"status": "down"}, status_code=503)
    if state.service.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


def _bearer_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


def _require_api_key(state: ServerState, request: Request) -> None:
    if state.api_key is not None and not _bearer_ok(request, state.api_key):
        raise unauthorized()


def _require_admin(state: ServerState, request: Request) -> None:
    if state.admin_key is None:
        raise not_found(f"no route {request.url.path}", "not_found")
    if not _bearer_ok(request, state.admin_key):
        raise unauthorized()


def _is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit ({limit} bytes)", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past ``limit`` bytes (read no further), 408 if it has not all
    arrived within the server's ``body_timeout`` (a client trickling it holds a connection and
    a task), 400 if it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body ({length} bytes) is over the limit ({limit} bytes)", code="too_large")
    timeout = request.app.state.server.body_timeout
    try:
        body = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        # the connection is closed after the answer: what is left of the body would be misread
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g}s (--body-timeout)",
            code="timeout",
            headers={"Connection": "close"},
        ) from None
    if not body:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        # decoded strictly here: json.loads(bytes) lets UTF-8-encoded surrogates through
        text = body.decode(json.detect_encoding(body))
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    # only a \uD800-\uDFFF escape can put a lone surrogate in a str: skip the walk without one
    if _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate(data)
        if where is not None:
            raise bad_request(
                f"the request body has a lone UTF-16 surrogate in a string at {where or 'the top level'}: "
                "it is not a Unicode character",
                where or None,
                "invalid_json",
            )
    return data


def _lone_surrogate(data: Any) -> Optional[str]:
    """The dotted path of a string (or object key) holding a lone surrogate, or None.
    Iterative: the body may be nested as deep as the JSON parser allows."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                safe = key.encode("utf-8", "backslashreplace").decode()  # the answer must encode too
                child = f"{path}.{safe}" if path else safe
                if _SURROGATE.search(key):
                    return child
                stack.append((item, child))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return None


def _check_model(state: ServerState, model: Optional[str]) -> None:
    if model is not None and model not in state.served_names:
        raise not_found(
            f"the model {model!r} does not exist; this server serves {state.model_name!r}", "model_not_found"
        )


async def _max_tokens(state: ServerState, req: Any, prompts: list[list[int]], default: Optional[int]) -> int:
    """``max_tokens`` for every prompt. Sent: checked against the context length (OpenAI's
    message) and the KV ceiling, naming the field the client used. Not sent: ``default`` (None:
    the rest of the context) cut to what the longest prompt leaves of the context and of the
    KV ceiling, so an error never names a field the client did not send."""
    for i, ids in enumerate(prompts):
        if not ids:
            raise bad_request(f"prompt {i} is empty (0 tokens)", "prompt")
    longest = max(len(p) for p in prompts)
    if longest >= state.max_positions:
        raise bad_request(
            f"This model's maximum context length is {state.max_positions} tokens; the prompt has {longest}",
            "prompt",
            "context_length_exceeded",
        )
    room = state.max_positions - longest
    mt, param = req.max_tokens, req.max_tokens_param
    if mt is not None and mt > room:
        raise bad_request(
            f"This model's maximum context length is {state.max_positions} tokens. However, you requested "
            f"{longest + mt} tokens ({longest} in the prompt, {mt} for the completion). Please reduce the "
            f"prompt or {param}.",
            param,
            "context_length_exceeded",
        )
    want = mt if mt is not None else room if default is None else min(default, room)
    fits = await state.service.room_for(longest)
    if fits is None:  # the Engine is closed: the server is stopping, and submit() says so
        return want
    # echo with max_tokens 0 still runs one token through the Engine (and drops it)
    if max(want, 1) <= fits:
        return want
    if fits == 0:
        raise bad_request(
            f"the prompt ({longest} tokens) leaves no room for a completion in this server's KV memory "
            "ceiling (--max-kv-bytes); send a shorter prompt",
            "prompt",
            "context_length_exceeded",
        )
    if mt is None:
        return fits
    # the Engine's own reason, in the words of the field the client sent
    reason = await state.service.refusal_for(longest, mt, param)
    if reason is not None:
        raise bad_request(f"{reason}; after this prompt at most {fits} tokens fit", param, "context_length_exceeded")
    return want


def _specs(state: ServerState, req: Any, prompts: list[list[int]], max_tokens: int) -> list[ChoiceSpec]:
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={n} is over {MAX_CHOICES} choices per request", "n")
    stop = tuple(req.checked_stop())
    if req.min_tokens and req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) must not be more than max_tokens ({max_tokens})", "min_tokens"
        )
    bias = req.checked_logit_bias(state.service.vocab_size) if req.logit_bias else None
    out = []
    for ids in prompts:
        for i in range(n):
            s = P.to_sampling(req, i, state.eos_token_ids, bias)
            out.append(ChoiceSpec(ids, max_tokens, s.sampling, s.eos_token_ids, stop))
    return out


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def _completion_prompts(state: ServerState, req: P.CompletionRequest) -> list[list[int]]:
    return [_encode(state.tokenizer, p, True) if isinstance(p, str) else p for p in req.prompts()]


def _chat_prompt(state: ServerState, req: P.ChatRequest) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(
            f"the model {state.model_name!r} has no chat template; send a prompt to /v1/completions instead",
            "messages",
            "no_chat_template",
        )
    gen = True if req.add_generation_prompt is None else req.add_generation_prompt
    kwargs = {"add_generation_prompt": gen, **(req.chat_template_kwargs or {})}  # vLLM lets them override
    try:
        text = tok.apply_chat_template(req.conversation(), tokenize=False, **kwargs)
    except Exception as exc:  # jinja's TemplateError, or raise_exception() in the template
        raise bad_request(f"the chat template refused the messages: {exc}", "messages") from None
    return _encode(tok, text, False)


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(sub: Submission) -> list[list[ChoiceEvent]]:
    per_choice: list[list[ChoiceEvent]] = [[] for _ in range(sub.n_choices)]
    while not sub.done:
        for e in await sub.next_events():
            per_choice[e.index].append(e)
    return per_choice


async def _wait_or_disconnect(request: Request, state: ServerState, sub: Submission) -> Optional[list]:
    """All events of ``sub``, or None if the client left first (its request is cancelled)."""
    collect = asyncio.ensure_future(_collect(sub))
    watch = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not collect.done():
            collect.cancel()
            state.service.cancel(sub)
        watch.cancel()
    return collect.result() if collect.done() and not collect.cancelled() else None


def _failure(e: ChoiceEvent) -> APIError:
    """The error a failed choice is answered with (a 503 for want of memory says when to retry)."""
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    prefix = "the request failed in the server" if e.status == 500 else "the request could not be served"
    return APIError(e.status, f"{prefix}: {e.error}", code=e.code, headers=headers)


def _raise_if_failed(per_choice: list[list[ChoiceEvent]]) -> None:
    for events in per_choice:
        for e in events:
            if e.error is not None:
                raise _failure(e)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts the engine thread and, at shutdown,
    stops it and closes the Engine (all KV memory given back)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.service.open()
        try:
            yield
        finally:
            await state.service.close()

    app = FastAPI(title="torch_elastic_kv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 405 and state.admin_key is None and _is_admin_path(request.url.path):
            # a 405 would tell a scanner the admin route exists; with admin off it does not
            exc = StarletteHTTPException(404)
        if exc.status_code == 404:
            message = f"no route {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(message, exc.status_code, None, code), exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
        # the client went away while sending its body: nobody reads an answer, and a traceback
        # per such connection would let anyone flood the log
        _log.debug("%s %s: the client left before its body was read", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("%s %s failed", request.method, request.url.path)
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", 500, None, "internal_error")
        return JSONResponse(body, status_code=500)

    # ---------------------------------------------------------------- open endpoints -------
    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(state)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.service.metrics_text(), media_type=CONTENT_TYPE)

    # ---------------------------------------------------------------- OpenAI ---------------
    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _require_api_key(state, request)
        return JSONResponse({"object": "list", "data": [model_card(state, name) for name in state.served_names]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _require_api_key(state, request)
        req = P.parse_request(P.CompletionRequest, await _read_json(request, state.max_body_bytes))
        _check_model(state, req.model)
        prompts = await asyncio.to_thread(_completion_prompts, state, req)
        max_tokens = await _max_tokens(state, req, prompts, state.default_max_tokens)
        # echo with max_tokens 0 scores the prompt: one token is generated and not returned (vLLM)
        hide = max_tokens == 0
        specs = _specs(state, req, prompts, max(1, max_tokens))
        prompt_tokens = sum(len(p) for p in prompts)
        sub = await state.service.submit_request(specs, prompt_tokens)
        rid, created = P.new_id("cmpl"), P.now_seconds()
        echo = _Echo(state, req, prompts, hide)
        if req.stream:
            return _stream(state, sub, req, rid, created, prompt_tokens, prompts, chat=False, echo=echo)
        per_choice = await _wait_or_disconnect(request, state, sub)
        if per_choice is None:
            return Response(status_code=499)
        _raise_if_failed(per_choice)
        n = req.n or 1
        choices, completion_tokens = [], 0
        for i, events in enumerate(per_choice):
            ids = [] if hide else [t for e in events for t in e.token_ids]
            completion_tokens += len(ids)
            extra = {"prompt_token_ids": prompts[i // n], "token_ids": ids} if req.return_token_ids else {}
            text = "" if hide else "".join(e.text for e in events)
            lps: Optional[list] = None
            if req.logprobs is not None:
                lps = [] if hide else [lp for e in events for lp in e.logprobs]
            text, logprobs, _ = echo.shape(i // n, text, ids, lps, _prompt_logprobs(events), 0, True)
            choices.append(P.completion_choice(i, text, events[-1].finish_reason, logprobs, **extra))
        body = P.completion_response(rid, state.model_name, created, choices, P.usage(prompt_tokens, completion_tokens))
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _require_api_key(state, request)
        req = P.parse_request(P.ChatRequest, await _read_json(request, state.max_body_bytes))
        _check_model(state, req.model)
        prompt = await asyncio.to_thread(_chat_prompt, state, req)
        max_tokens = await _max_tokens(state, req, [prompt], None)
        specs = _specs(state, req, [prompt], max_tokens)
        sub = await state.service.submit_request(specs, len(prompt))
        rid, created = P.new_id("chatcmpl"), P.now_seconds()
        if req.stream:
            return _stream(state, sub, req, rid, created, len(prompt), [prompt], chat=True)
        per_choice = await _wait_or_disconnect(request, state, sub)
        if per_choice is None:
            return Response(status_code=499)
        _raise_if_failed(per_choice)
        choices, completion_tokens = [], 0
        token_text = TokenText(state.tokenizer)
        for i, events in enumerate(per_choice):
            ids = [t for e in events for t in e.token_ids]
            completion_tokens += len(ids)
            extra = {"token_ids": ids} if req.return_token_ids else {}
            logprobs = chat_logprobs(token_text, [lp for e in events for lp in e.logprobs]) if req.logprobs else None
            text = "".join(e.text for e in events)
            choices.append(P.chat_choice(i, text, events[-1].finish_reason, logprobs, **extra))
        body = P.chat_response(rid, state.model_name, created, choices, P.usage(len(prompt), completion_tokens))
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt
        return JSONResponse(body)

    # ---------------------------------------------------------------- admin ----------------
    @app.post("/admin/kv-budget")
    async def admin_kv_budget(request: Request) -> JSONResponse:
        _require_admin(state, request)
        data = await _read_json(request, state.max_body_bytes)
        if not isinstance(data, dict) or set(data) != {"bytes"}:
            raise bad_request('the body must be {"bytes": N} or {"bytes": null}', "bytes")
        return JSONResponse(await state.service.command("budget", data["bytes"]))

    @app.post("/admin/sleep")
    async def admin_sleep(request: Request) -> JSONResponse:
        _require_admin(state, request)
        return JSONResponse(await state.service.command("sleep"))

    @app.post("/admin/wake")
    async def admin_wake(request: Request) -> JSONResponse:
        _require_admin(state, request)
        return JSONResponse(await state.service.command("wake"))

    @app.post("/admin/reset-prefix-cache")
    async def admin_reset_prefix_cache(request: Request) -> JSONResponse:
        _require_admin(state, request)
        return JSONResponse(await state.service.command("reset_prefix_cache"))

    @app.get("/admin/stats")
    async def admin_stats(request: Request) -> JSONResponse:
        _require_admin(state, request)
        return JSONResponse(await state.service.stats_now())

    from .compat_routes import add_compat_routes  # it builds on this module's helpers

    add_compat_routes(app, state)
    return app


def _prompt_logprobs(events: list[ChoiceEvent]) -> Optional[tuple[Any, ...]]:
    return next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)


class _Echo:
    """A completion's ``echo`` and ``logprobs``: the prompt's text (as sent, or decoded from
    its ids) before the first text of each choice, and the log-probabilities of the tokens a
    chunk or body shows. ``hide``: the request had ``max_tokens`` 0 (the prompt alone)."""

    def __init__(self, state: ServerState, req: P.CompletionRequest, prompts: list[list[int]], hide: bool) -> None:
        self.on = bool(req.echo)
        self.hide = hide
        self.logprobs = req.logprobs
        self.prompts = prompts
        self.texts: list[str] = []
        if self.on:
            raw = req.prompts()
            self.texts = [p if isinstance(p, str) else state.tokenizer.decode(p, skip_special_tokens=True) for p in raw]
        self.token_text = TokenText(state.tokenizer)

    def shape(
        self,
        prompt: int,
        text: str,
        ids: list[int],
        lps: Optional[list[Any]],
        prompt_lps: Optional[tuple[Any, ...]],
        offset: int,
        first: bool,
    ) -> tuple[str, Optional[dict[str, Any]], int]:
        """(text, logprobs, next text_offset) of a body or chunk showing tokens ``ids``."""
        if self.on and first:
            text = self.texts[prompt] + text
            if lps is not None:
                pids = self.prompts[prompt]
                scored = list(prompt_lps) if prompt_lps is not None else [None] * len(pids)
                ids, lps = pids + ids, scored + lps
        if lps is None:
            return text, None, offset
        out = completion_logprobs(self.token_text, ids, lps, offset)
        return text, out, offset + sum(len(t) for t in out["tokens"])


def _stream(
    state: ServerState,
    sub: Submission,
    req: Any,
    rid: str,
    created: int,
    prompt_tokens: int,
    prompts: list[list[int]],
    chat: bool,
    echo: Optional[_Echo] = None,
) -> StreamingResponse:
    """Server-sent events: one chunk per choice event, a usage chunk if asked, ``[DONE]``.
    With ``continuous_usage_stats`` every chunk carries the usage so far."""
    model = state.model_name
    n = req.n or 1
    with_ids = bool(req.return_token_ids)
    with_logprobs = req.logprobs_wanted() is not None
    token_text = TokenText(state.tokenizer)
    completion_tokens = 0

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        use = P.usage(prompt_tokens, completion_tokens) if req.continuous_usage else None
        return (P.chat_chunk if chat else P.completion_chunk)(rid, model, created, [choice], use)

    async def events() -> AsyncIterator[str]:
        nonlocal completion_tokens
        started: set[int] = set()  # choices whose first chunk went out (echo comes with it)
        offsets = [0] * sub.n_choices  # text_offset of each choice's next token
        try:
            if chat:
                for i in range(sub.n_choices):
                    yield _sse(
                        chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                    )
            while not sub.done:
                for e in await sub.next_events():
                    if e.error is not None:
                        yield _sse(_failure(e).body())
                        yield "data: [DONE]\n\n"
                        return
                    hidden = echo is not None and echo.hide
                    ids = () if hidden else e.token_ids
                    completion_tokens += len(ids)
                    first = e.index not in started
                    echoing = echo is not None and echo.on and first
                    if not (e.text or e.finish_reason or with_ids or (with_logprobs and ids) or echoing):
                        continue
                    started.add(e.index)
                    extra: dict[str, Any] = {}
                    if with_ids:
                        extra["token_ids"] = list(ids)
                        if not chat:
                            extra["prompt_token_ids"] = prompts[e.index // n]
                    if chat:
                        delta = {"content": e.text} if e.text else {}
                        logprobs = chat_logprobs(token_text, e.logprobs) if with_logprobs else None
                        choice = {
                            "index": e.index,
                            "delta": delta,
                            "logprobs": logprobs,
                            "finish_reason": e.finish_reason,
                        }
                        choice.update(extra)
                    else:
                        assert echo is not None
                        lps = list(e.logprobs) if with_logprobs and not hidden else ([] if with_logprobs else None)
                        text = "" if hidden else e.text
                        text, logprobs, offsets[e.index] = echo.shape(
                            e.index // n, text, list(ids), lps, e.prompt_logprobs, offsets[e.index], first
                        )
                        choice = P.completion_choice(e.index, text, e.finish_reason, logprobs, **extra)
                    yield _sse(chunk(choice))
            if req.include_usage:
                use = P.usage(prompt_tokens, completion_tokens)  # also when continuous: the final sums
                yield _sse((P.chat_chunk if chat else P.completion_chunk)(rid, model, created, [], use))
            yield "data: [DONE]\n\n"
        finally:
            if not sub.done:  # the client went away (or the server is stopping): free its pages
                state.service.cancel(sub)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
