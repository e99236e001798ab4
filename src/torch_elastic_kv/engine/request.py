"""One request's state as the scheduler sees it: tokens, how many are in the KV cache, status.

Plain Python, no torch. A sequence's tokens are its prompt followed by what it generated;
``num_computed`` counts the leading tokens whose K/V are stored. Every step feeds the next
uncomputed tokens; a step whose chunk reaches the last token samples one new token. Decode is
a chunk of one, a prefill a longer one, and a request resumed after recompute-preemption is
simply a sequence whose ``num_computed`` went back to 0 — the same rule covers all three.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from .._util import is_int

__all__ = [
    "FINISH_REASONS",
    "Request",
    "RequestRejected",
    "RequestStatus",
    "SamplingParams",
    "StepOutput",
    "TokenLogprob",
]


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the token there, its log-probability, and the
    ``top`` most likely tokens as ``(token_id, logprob)``, most likely first. (Here, not beside
    the log-softmax in ``logits``, so a server's HTTP process reads it without torch.)"""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# How a request ends, in OpenAI's words, decided once (here and in the scheduler) and carried
# by ``StepOutput``: "stop" (an end-of-sequence token), "length" (max_new_tokens reached),
# "abort" (cancelled), "error" (its sampling failed; the other requests go on).
FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestRejected(ValueError):
    """A request the Engine refuses: ``field`` names the argument at fault ("prompt",
    "max_new_tokens", "eos_token_id", "sampling") and ``reason`` says why, in the caller's
    words (``check_request(max_tokens_label=...)`` names the length field as the caller does),
    so a server never rewrites the Engine's text. ``str()`` is ``"<where>: <reason>"``."""

    def __init__(self, where: str, field: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.field = field
        self.reason = reason


class StepOutput(NamedTuple):
    """What one step produced for one request: the sampled ``token`` (None when the request
    ended without one: its sampling failed) and, on its last output, ``finish_reason``."""

    request_id: int
    token: Optional[int]
    finish_reason: Optional[str] = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not started, or preempted by recompute (no KV held)
    RUNNING = "running"  # holds KV pages in the pool
    SWAPPED = "swapped"  # preempted; its KV is parked in host swap space
    FINISHED = "finished"
    CANCELLED = "cancelled"


# Below this, logits / temperature overflows float32 for ordinary logits (1e-45 gave inf and NaN
# probabilities); 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-4


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` is greedy (the default).

    ``seed`` makes sampling reproducible per request, independent of batching. The logits
    processing fields (``min_tokens``, ``logit_bias`` as ``(token_id, bias)`` pairs or a dict,
    ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``) and ``min_p`` are
    applied in the order ``engine.logits`` gives; their neutral values cost nothing.
    ``logprobs``: record each generated token's log-probability and that many top ones (None:
    none); ``prompt_logprobs``: the same for every prompt token but the first.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t):
            raise ValueError(
                f"SamplingParams: temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t!r}"
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be an int >= 0, got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")
        seed = self.seed
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2**64):
            raise ValueError(f"SamplingParams: seed must be None or an int in [0, 2**64), got {seed!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams: min_p must be in [0, 1], got {self.min_p!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"SamplingParams: min_tokens must be an int >= 0, got {self.min_tokens!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"SamplingParams: repetition_penalty must be a finite number > 0, got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"SamplingParams: {name} must be in [-2, 2], got {v!r}")
        if isinstance(self.logit_bias, dict):  # {token_id: bias}, as clients write it
            try:
                pairs = tuple(sorted(self.logit_bias.items()))
            except TypeError:
                raise ValueError(
                    f"SamplingParams: logit_bias keys must be token ids, got {self.logit_bias!r}"
                ) from None
            object.__setattr__(self, "logit_bias", pairs)
        if not isinstance(self.logit_bias, tuple):
            raise ValueError(f"SamplingParams: logit_bias must be a tuple of (token_id, bias), got {self.logit_bias!r}")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2 and is_int(pair[0]) and pair[0] >= 0):
                raise ValueError(f"SamplingParams: logit_bias entries must be (token_id >= 0, bias), got {pair!r}")
            if not _is_real(pair[1]) or not -100.0 <= pair[1] <= 100.0:
                raise ValueError(
                    f"SamplingParams: logit_bias for token {pair[0]} must be in [-100, 100], got {pair[1]!r}"
                )
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("SamplingParams: logit_bias names a token twice")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"SamplingParams: {name} must be None or an int >= 0, got {v!r}")

    def generator_seed(self, position: int) -> int:
        """Seed of the generator that samples the token at ``position`` (fits torch's 64 bits)."""
        assert self.seed is not None
        return (self.seed * 1_000_003 + position) % (2**63)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @functools.cached_property
    def processes_logits(self) -> bool:
        """True when the raw logits row changes before temperature (``engine.logits``); asked
        per request per step, so computed once."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )

    @classmethod
    def coerce(cls, value: Any) -> SamplingParams:
        """Accept None (greedy), a SamplingParams, or a dict of its fields."""
        if value is None:
            return GREEDY
        if isinstance(value, SamplingParams):
            return value
        if isinstance(value, dict):
            unknown = set(value) - _FIELDS
            if unknown:
                raise ValueError(f"sampling: unknown keys {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"sampling must be None, a dict or SamplingParams, got {type(value).__name__}")


GREEDY = SamplingParams()
_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


@dataclass(eq=False)
class Request:
    """A request in flight. Identity is ``request_id``; order of arrival is ``arrival_index``."""

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_index: int
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    sampling: SamplingParams = GREEDY
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    preemptions: int = 0
    swap_preemptions: int = 0
    recompute_preemptions: int = 0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    finish_reason: Optional[str] = None  # one of FINISH_REASONS once it has ended
    swap_handle: Any = None  # set by the swap space while SWAPPED
    # engine.logits.TokenLogprob per generated token / per prompt token (the first: None),
    # when sampling.logprobs / sampling.prompt_logprobs asks for them
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    # ---- derived counts ----------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed before the next token can be sampled (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1 and self.num_generated > 0

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    @property
    def max_stored_tokens(self) -> int:
        """Most tokens whose K/V this request can ever store (its last token is never fed)."""
        return len(self.prompt_ids) + self.max_new_tokens - 1

    # ---- state changes -----------------------------------------------------------------
    def append_token(self, token_id: int, now: float) -> bool:
        """Record a sampled token; returns True when the request is finished by it."""
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        if token_id in self.eos_token_ids:
            self.finish(now, "stop")
            return True
        if self.num_generated >= self.max_new_tokens:
            self.finish(now, "length")
            return True
        return False

    def finish(self, now: float, reason: str) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"Request.finish: reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.status = RequestStatus.CANCELLED if reason == "abort" else RequestStatus.FINISHED
        self.finish_time = now
        self.finish_reason = reason

    def info(self) -> dict:
        """Per-request timing and counts, as plain values (for stats and the bench CLI)."""
        return {
            "request_id": self.request_id,
            "status": self.status.value,
            "prompt_tokens": self.prompt_len,
            "output_tokens": self.num_generated,
            "max_new_tokens": self.max_new_tokens,
            "arrival_time": self.arrival_time,
            "first_token_time": self.first_token_time,
            "finish_time": self.finish_time,
            "finish_reason": self.finish_reason,
            "preemptions": self.preemptions,
            "swap_preemptions": self.swap_preemptions,
            "recompute_preemptions": self.recompute_preemptions,
        }
