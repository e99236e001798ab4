"""The OpenAI request bodies this server accepts, and the response bodies it writes.

Requests are pydantic models in strict mode with unknown fields forbidden: a field this server
does not know, or one it knows but cannot honour (``logprobs``, ``echo``, penalties, tools,
...) set to anything but its neutral value, is a 400 naming the field, never silently ignored.
Extensions, as in vLLM: ``top_k``, ``ignore_eos``, ``return_token_ids`` (the prompt's and each
choice's token ids in the response), and for chat ``add_generation_prompt``.

``to_sampling`` turns the checked fields into what ``Engine.add_request`` takes; the
``*_response`` / ``*_chunk`` functions build the JSON bodies (plain dicts: they are written
once, on the hot path of streaming).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..engine.request import MIN_TEMPERATURE
from .errors import bad_request

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "SamplingChoice",
    "StreamOptions",
    "chat_choice",
    "chat_chunk",
    "chat_response",
    "completion_choice",
    "completion_chunk",
    "completion_response",
    "new_id",
    "now_seconds",
    "parse_request",
    "to_sampling",
    "usage",
]

MAX_N = 128  # choices per prompt (OpenAI's own limit)
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2**63), 2**64)  # any int64 or uint64, as clients send; used modulo 2**64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Model):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM's; only false is honoured


class _Common(_Model):
    """Fields completions and chat share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None  # None: 1.0, OpenAI's default
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Any] = None  # a string or a list of them; checked below for a clear message
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = None
    return_token_ids: Optional[bool] = None

    def checked_stop(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad_request("stop must be a string or a list of strings", "stop")
        if len(items) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} stop strings, got {len(items)}", "stop")
        for s in items:
            if not s:
                raise bad_request("stop: stop strings must not be empty", "stop")
            if len(s) > MAX_STOP_CHARS:
                raise bad_request(f"stop: a stop string is at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
        return list(dict.fromkeys(items))

    def check_common(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        t = self.temperature
        if t is not None and not (math.isfinite(t) and 0.0 <= t <= 2.0):
            raise bad_request(f"temperature must be between 0 and 2, got {t}", "temperature")
        p = self.top_p
        if p is not None and not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise bad_request(f"top_p must be in (0, 1], got {p}", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise bad_request(f"top_k must be -1 or 0 (no limit) or a positive int, got {self.top_k}", "top_k")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise bad_request(f"seed must fit in 64 bits, got {self.seed}", "seed")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            _unsupported("stream_options.continuous_usage_stats")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and value != 0:
                _unsupported(name, "only 0 is supported")
        if self.logit_bias:
            _unsupported("logit_bias")
        self.checked_stop()

    @property
    def max_tokens_param(self) -> str:
        """The field that carries ``max_tokens`` in this request, for error messages."""
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)


def _unsupported(field: str, detail: str = "") -> None:
    extra = f" ({detail})" if detail else ""
    raise bad_request(f"{field} is not supported by this server{extra}", field, "unsupported_parameter")


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]; checked in prompts()
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check(self) -> None:
        self.check_common()
        if self.echo:
            _unsupported("echo")
        if self.logprobs is not None:
            _unsupported("logprobs")
        if self.suffix:
            _unsupported("suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            _unsupported("best_of", "only best_of == n")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as strings or token-id lists, in order; 400 for any other shape."""
        p = self.prompt
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        if p is None:
            raise bad_request("prompt is required", "prompt")
        if isinstance(p, str):
            return [p]
        if not isinstance(p, list) or not p:
            raise bad_request(shape if not isinstance(p, list) else "prompt must not be an empty list", "prompt")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_token(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) for x in p):
            for i, ids in enumerate(p):
                if not ids:
                    raise bad_request(f"prompt[{i}] is an empty list of token ids", "prompt")
                if not all(_is_token(x) for x in ids):
                    raise bad_request(f"prompt[{i}] must be a list of integer token ids", "prompt")
            return [list(ids) for ids in p]
        raise bad_request(shape, "prompt")


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None

    def check(self) -> None:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad_request("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
            if self.max_completion_tokens < 1:
                raise bad_request(
                    f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}",
                    "max_completion_tokens",
                )
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.logprobs:
            _unsupported("logprobs")
        if self.top_logprobs:
            _unsupported("top_logprobs")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            _unsupported("response_format", 'only {"type": "text"}')
        if self.tools:
            _unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            _unsupported("tool_choice")

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as the chat template reads them: role and text content."""
        out = []
        for m in self.messages:
            entry: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                entry["name"] = m.name
            out.append(entry)
        return out


def parse_request(cls: type[_Common], data: Any) -> Any:
    """Validate a decoded JSON body as ``cls``; every problem is a 400 naming the field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unknown field {param!r}: this server does not support it", param) from None
        if err["type"] == "missing":
            raise bad_request(f"{param} is required", param) from None
        raise bad_request(f"{param}: {err['msg']}", param) from None
    req.check()
    return req


@dataclass(frozen=True)
class SamplingChoice:
    """What the Engine gets for one choice: ``sampling`` for ``add_request`` and the EOS ids."""

    sampling: dict[str, Any]
    eos_token_ids: tuple[int, ...]


def to_sampling(req: _Common, n_index: int, eos_token_ids: Sequence[int]) -> SamplingChoice:
    """Sampling for choice ``n_index`` of ``req``: temperature below the Engine's minimum is
    greedy; ``top_k`` -1 is no limit; a seed is taken modulo 2**64 and offset by the choice
    index, so the ``n`` choices of a seeded request differ and each is reproducible."""
    t = 1.0 if req.temperature is None else float(req.temperature)
    if t < MIN_TEMPERATURE:
        t = 0.0
    sampling: dict[str, Any] = {"temperature": t}
    if req.top_p is not None:
        sampling["top_p"] = float(req.top_p)
    if req.top_k is not None and req.top_k > 0:
        sampling["top_k"] = int(req.top_k)
    if req.seed is not None:
        sampling["seed"] = (req.seed + n_index) % 2**64
    eos = () if req.ignore_eos else tuple(eos_token_ids)
    return SamplingChoice(sampling, eos)


# ---------------------------------------------------------------------------- responses ----
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def completion_choice(index: int, text: str, finish_reason: Optional[str], **extra: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}


def completion_chunk(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: Optional[dict[str, int]] = None
) -> dict[str, Any]:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def chat_response(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def chat_choice(index: int, text: str, finish_reason: Optional[str], **extra: Any) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
        **extra,
    }


def chat_chunk(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: Optional[dict[str, int]] = None
) -> dict[str, Any]:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def now_seconds() -> int:
    return int(time.time())
