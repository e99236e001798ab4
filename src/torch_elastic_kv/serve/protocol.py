"""The OpenAI request bodies this server accepts, and the response bodies it writes.

Requests are pydantic models in strict mode with unknown fields forbidden: a field this server
does not know, or one it knows but cannot honour (``suffix``, tools, ...) set to anything but
its neutral value, is a 400 naming the field, never silently ignored. Extensions, as in vLLM:
``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``, ``ignore_eos``,
``return_token_ids`` (the prompt's and each choice's token ids in the response),
``stream_options.continuous_usage_stats``, and for chat ``add_generation_prompt`` and
``chat_template_kwargs``. Log-probabilities (chat ``logprobs``/``top_logprobs``, completions
``logprobs`` and ``echo``) are built in ``logprobs``.

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
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's chat limit, vLLM's default max)
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
# apply_chat_template arguments a request may not set: they change what it returns, or (the
# template itself) would run a client's Jinja in the server, which vLLM refuses by default too
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask", "chat_template"}
)
SEED_RANGE = (-(2**63), 2**64)  # any int64 or uint64, as clients send; used modulo 2**64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Model):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM's: usage on every chunk (with include_usage)


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
    repetition_penalty: Optional[float] = None
    min_p: Optional[float] = None
    min_tokens: Optional[int] = None
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

    def checked_logit_bias(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` as token id -> bias; 400 naming it for a key that is not a token id
        of this model's vocabulary or a bias outside [-100, 100]."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() else -1
            if not 0 <= token < vocab_size:
                raise bad_request(
                    f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})", "logit_bias"
                )
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise bad_request(
                    f"logit_bias: the bias for token {token} must be in [-100, 100], got {bias}", "logit_bias"
                )
            out[token] = float(bias)
        return out

    def check_common(self, min_max_tokens: int = 1) -> None:
        if self.max_tokens is not None and self.max_tokens < min_max_tokens:
            raise bad_request(f"max_tokens must be at least {min_max_tokens}, got {self.max_tokens}", "max_tokens")
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise bad_request(f"{name} must be between -2 and 2, got {value}", name)
        rp = self.repetition_penalty
        if rp is not None and not (math.isfinite(rp) and rp > 0):
            raise bad_request(f"repetition_penalty must be a finite number > 0, got {rp}", "repetition_penalty")
        if self.min_p is not None and not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise bad_request(f"min_p must be between 0 and 1, got {self.min_p}", "min_p")
        if self.min_tokens is not None:
            if self.min_tokens < 0:
                raise bad_request(f"min_tokens must be at least 0, got {self.min_tokens}", "min_tokens")
            if self.max_tokens is not None and self.min_tokens > self.max_tokens:
                raise bad_request(
                    f"min_tokens ({self.min_tokens}) must not be more than max_tokens ({self.max_tokens})", "min_tokens"
                )
        if self.logit_bias is not None and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}", "logit_bias")
        self.checked_stop()

    @property
    def max_tokens_param(self) -> str:
        """The field that carries ``max_tokens`` in this request, for error messages."""
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every streamed chunk: vLLM's ``continuous_usage_stats``, which, as there,
        needs ``include_usage`` too."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def logprobs_wanted(self) -> Optional[int]:
        """Top log-probabilities per generated token (0: the chosen one's only), None: none."""
        return None

    def prompt_logprobs_wanted(self) -> Optional[int]:
        """Top log-probabilities per prompt token, None: none."""
        return None


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
        # max_tokens 0 with echo scores the prompt alone (vLLM's "echo without generation")
        self.check_common(min_max_tokens=0 if self.echo else 1)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        if self.suffix:
            _unsupported("suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            _unsupported("best_of", "only best_of == n")

    def logprobs_wanted(self) -> Optional[int]:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> Optional[int]:
        return self.logprobs if self.echo else None

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
    chat_template_kwargs: Optional[dict[str, Any]] = None

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
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}", "top_logprobs"
                )
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {}))
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set {', '.join(reserved)}",
                "chat_template_kwargs",
                "unsupported_parameter",
            )
        if self.response_format is not None and self.response_format != {"type": "text"}:
            _unsupported("response_format", 'only {"type": "text"}')
        if self.tools:
            _unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            _unsupported("tool_choice")

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def logprobs_wanted(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

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


def to_sampling(
    req: _Common, n_index: int, eos_token_ids: Sequence[int], logit_bias: Optional[dict[int, float]] = None
) -> SamplingChoice:
    """Sampling for choice ``n_index`` of ``req``: temperature below the Engine's minimum is
    greedy; ``top_k`` -1 is no limit; a seed is taken modulo 2**64 and offset by the choice
    index, so the ``n`` choices of a seeded request differ and each is reproducible; fields at
    their neutral value are left out (the Engine's fast path). ``logit_bias``: the request's,
    checked against the vocabulary (``checked_logit_bias``)."""
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
    if req.min_p:
        sampling["min_p"] = float(req.min_p)
    if req.min_tokens:
        sampling["min_tokens"] = int(req.min_tokens)
    if req.repetition_penalty is not None and req.repetition_penalty != 1.0:
        sampling["repetition_penalty"] = float(req.repetition_penalty)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            sampling[name] = float(getattr(req, name))
    if logit_bias:
        sampling["logit_bias"] = dict(logit_bias)
    if req.logprobs_wanted() is not None:
        sampling["logprobs"] = req.logprobs_wanted()
    if req.prompt_logprobs_wanted() is not None:
        sampling["prompt_logprobs"] = req.prompt_logprobs_wanted()
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


def completion_choice(
    index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict[str, Any]] = None, **extra: Any
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **extra}


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


def chat_choice(
    index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict[str, Any]] = None, **extra: Any
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
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
