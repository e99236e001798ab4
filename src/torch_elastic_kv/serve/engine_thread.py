"""The engine thread: the one thread that calls ``Engine.step()``, and the door to it.

HTTP handlers run on the asyncio loop and never step. They ``submit`` a request (its choices
are checked and queued in the Engine at once, so bad input is a 400 before anything runs) and
read its events from an ``asyncio.Queue``; cancels, budget changes, sleep and wake go to the
thread as commands. After each step the thread turns each new token into text (incremental
detokenization, stop strings, EOS, ``max_tokens``) and hands every request's events to its
submission's sink, one call per sink and step: a ``LoopSink`` (one ``loop.call_soon_threadsafe``
onto the loop of this process's HTTP front) or the link to a front process (``engine_host``).

With nothing to do the thread waits on a condition: no polling, no CPU. Idle memory still goes
back on time: the Engine's own background thread runs the policy's idle ticks while nobody
steps. A request whose pages do not fit the current budget makes ``step()`` run nothing
(``Engine.stalled``); the thread then waits for a command (a larger budget, a cancel) instead
of spinning.

Nothing waits silently or forever. A request that cannot start under the current budget
(``Engine.blocked_requests``) is counted, and unless the server sleeps on purpose it ends with
a 503 after ``budget_wait_seconds`` (``broker_wait_seconds`` when only the broker's lease is too
small: a grant that does not come); so does one whose pages cannot be mapped (the host or the
device short of memory) for ``budget_wait_seconds``. A step that raises leaves the Engine's
requests where they were: the thread tries again (at the stall poll or the next command), ends
only the requests the Engine really lost, and ends the rest with a 500 once steps have failed
for ``budget_wait_seconds`` in a row.

An Engine that can never step again (a tensor-parallel rank died) is ``fail_all``: every
request in flight ends with a 503 at once, whatever the engine thread is doing, and new ones
get 503.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from .._util import is_int
from ..engine.request import RequestRejected
from .detokenize import IncrementalDetokenizer, StopStrings
from .errors import APIError, bad_request, overloaded
from .metrics import ServerMetrics
from .settings import MIN_KV_BYTES
from .token_bytes import TokenBytes

_log = logging.getLogger(__name__)

# A UTF-8 character is at most 4 bytes: a stream waits on at most 3 tokens for its first one.
MAX_EXPEDITES = 3

__all__ = ["DOWN_CODE", "ChoiceEvent", "ChoiceSpec", "EngineService", "EventSink", "LoopSink", "Submission"]

# While stalled (requests wait for a budget that does not come), look again this often even
# without a command: the Engine's pressure hook, if any, may have lifted its cap.
_STALL_POLL_SECONDS = 0.5
_RETRY_AFTER_SECONDS = 5  # what a request ended for want of memory tells its client
DOWN_CODE = "engine_down"  # OpenAI error code of requests ``fail_all`` ended or refused


@dataclass(frozen=True)
class ChoiceSpec:
    """One Engine request of an HTTP request: a prompt, its limit, sampling and stops."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    eos_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChoiceEvent:
    """What happened to one choice since the last event: text to send, the token ids that
    produced it, and, on the last event, ``finish_reason`` ("stop", "length", "abort") or
    ``error`` (the request failed inside the server: answered with HTTP ``status``, OpenAI's
    error ``code`` and, if set, ``Retry-After: retry_after``). When its sampling asked for them:
    ``logprobs``, one ``TokenLogprob`` per token id, and on the first event with a token,
    ``prompt_logprobs`` (one per prompt token, the first None)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    status: int = 500
    code: str = "internal_error"
    retry_after: Optional[int] = None
    logprobs: tuple[Any, ...] = ()
    prompt_logprobs: Optional[tuple[Any, ...]] = None


@dataclass(eq=False)
class _Choice:
    index: int
    spec: ChoiceSpec
    sub: Submission
    detok: IncrementalDetokenizer
    stops: StopStrings
    arrival: float
    rid: int = -1
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: Optional[tuple[Any, ...]] = None  # until the first event carries them
    sent_chars: int = 0
    expedited: int = 0  # Engine.expedite calls made for it (at most MAX_EXPEDITES)
    sent_tokens: int = 0
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finish_reason: Optional[str] = None
    blocked_since: Optional[float] = None  # since when the Engine cannot start it (blocked_requests)


class EventSink(Protocol):
    """Where the engine thread hands a round's events: ``deliver`` gets ``(submission, events)``
    pairs, called on the engine thread (or ``fail_all``'s caller) and must not block for long."""

    def deliver(self, items: list[tuple[Submission, list[ChoiceEvent]]]) -> None: ...


class LoopSink:
    """Events for submissions made on ``loop``: one ``call_soon_threadsafe`` per round puts each
    submission's events on its queue. Equal for equal loops, so a round groups by loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoopSink) and other.loop is self.loop

    def __hash__(self) -> int:
        return hash(self.loop)

    def deliver(self, items: list[tuple[Submission, list[ChoiceEvent]]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Submission:
    """One HTTP request's choices in the Engine; its events go to ``sink`` (a ``LoopSink``: on
    ``queue``, lists of ``ChoiceEvent``, on the loop that submitted it). ``tag``: the
    submitter's own name for it (the front process's id, across the link)."""

    def __init__(self, sink: EventSink | asyncio.AbstractEventLoop | None, n_choices: int, tag: Any = None) -> None:
        self.sink = LoopSink(sink) if isinstance(sink, asyncio.AbstractEventLoop) else sink
        self.tag = tag
        self.queue: asyncio.Queue[list[ChoiceEvent]] = asyncio.Queue()
        self.n_choices = n_choices
        self.finished = 0  # choices whose last event was delivered (where the sink delivers)
        self.choices: list[_Choice] = []
        self.failed = False

    @property
    def done(self) -> bool:
        return self.finished >= self.n_choices

    async def next_events(self) -> list[ChoiceEvent]:
        """The next events (waits for them); counts finished choices."""
        events = await self.queue.get()
        self.finished += sum(1 for e in events if e.finish_reason is not None or e.error is not None)
        return events


def _deliver(batch: list[tuple[Submission, list[ChoiceEvent]]]) -> None:
    for sub, events in batch:
        sub.queue.put_nowait(events)


def _hand_over(batch: list[tuple[Submission, list[ChoiceEvent]]]) -> None:
    """Each submission's events to its sink: one ``deliver`` per sink."""
    by_sink: dict[Any, list[tuple[Submission, list[ChoiceEvent]]]] = {}
    for sub, events in batch:
        by_sink.setdefault(sub.sink, []).append((sub, events))
    for sink, items in by_sink.items():
        try:
            sink.deliver(items)
        except Exception:  # one sink failing must not keep the others' events
            _log.exception("delivering %d request(s)' events failed", len(items))


class EngineService:
    """Owns the Engine while the server runs: the engine thread plus the calls handlers make.

    ``engine``: an ``Engine`` (the service closes it in ``stop``); ``tokenizer``: decodes
    output ids; ``max_waiting``: most choices queued without a first token before new
    requests get 503; ``metrics``: where token counts and latencies go;
    ``budget_wait_seconds``: how long a request may wait for KV memory it cannot get (a budget
    below its need, pages that cannot be mapped, failing steps) before it ends with an error;
    ``broker_wait_seconds``: the same while only the memory broker's lease is too small.
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        metrics: ServerMetrics,
        max_waiting: int,
        clock: Callable[[], float] = time.monotonic,
        budget_wait_seconds: float = 30.0,
        broker_wait_seconds: float = 10.0,
    ) -> None:
        for what, v in (("budget_wait_seconds", budget_wait_seconds), ("broker_wait_seconds", broker_wait_seconds)):
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"EngineService: {what} must be a number >= 0, got {v!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self._token_bytes = TokenBytes.for_tokenizer(tokenizer)  # shared by every request's detokenizer
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.clock = clock
        self.budget_wait_seconds = float(budget_wait_seconds)
        self.broker_wait_seconds = float(broker_wait_seconds)
        self._blocked: dict[str, int] = {}  # choices the Engine cannot start now, by why
        self._failing_since: Optional[float] = None  # first of the steps failing in a row
        self._lock = threading.Lock()  # the tables below: submit (loop) vs the engine thread
        self._active: dict[int, _Choice] = {}  # engine request id -> choice
        self._queued = 0  # choices without a first token yet
        self._cv = threading.Condition()
        self._commands: collections.deque[tuple[str, Any, concurrent.futures.Future]] = collections.deque()
        self._wakeups = 0  # bumped by every notify: a stalled wait ends on the next one
        self._stopping = False
        self._down: Optional[str] = None  # fail_all's message: the Engine will not step again
        self._drain_deadline: Optional[float] = None
        self._pending: list[tuple[Submission, list[ChoiceEvent]]] = []
        self._thread = threading.Thread(target=self._run, name="ekv-engine", daemon=True)

    # ------------------------------------------------------------------ lifetime -------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End every request still running with ``finish_reason`` "abort", stop the thread and
        close the Engine (its KV memory goes back)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.engine.close()
        _log.info("engine closed: KV memory given back")

    def begin_drain(self, seconds: float) -> None:
        """Refuse new requests from now on; abort what still runs after ``seconds``."""
        with self._cv:
            if self._drain_deadline is None:
                self._drain_deadline = self.clock() + seconds
            self._notify_locked()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def down(self) -> Optional[str]:
        """Why the Engine will never step again (``fail_all``), or None."""
        return self._down

    @property
    def sleeping(self) -> bool:
        """Whether the Engine's budget is asleep (``/admin/sleep``): the server keeps no copy."""
        return self.engine.asleep

    @property
    def queued(self) -> int:
        return self._queued

    # ------------------------------------------------------------------ handler side ---------
    def submit(
        self,
        specs: Sequence[ChoiceSpec],
        sink: EventSink | asyncio.AbstractEventLoop,
        tag: Any = None,
    ) -> Submission:
        """Check and queue one HTTP request's choices (all or none); APIError 400 for input the
        Engine refuses (naming its numbers), 503 while draining or past ``max_waiting``. Their
        events go to ``sink`` (an event loop: its ``LoopSink``); ``tag`` names the submission
        there."""
        sub = Submission(sink, len(specs), tag)
        with self._lock:
            if self._down is not None:
                raise APIError(503, f"the request could not be served: {self._down}", code=DOWN_CODE)
            if self._drain_deadline is not None or self._stopping:
                raise overloaded("the server is shutting down", retry_after=5)
            if self._queued + len(specs) > self.max_waiting:
                raise overloaded(
                    f"too many requests waiting: {self._queued} queued, {len(specs)} more would pass "
                    f"--max-waiting {self.max_waiting}; retry later"
                )
            for spec in specs:
                try:
                    self.engine.check_request(
                        spec.prompt_ids,
                        spec.max_tokens,
                        spec.eos_token_ids,
                        spec.sampling,
                        max_tokens_label="max_tokens",
                    )
                except RequestRejected as exc:
                    raise bad_request(exc.reason, None, "invalid_request") from None
            now = self.clock()
            for i, spec in enumerate(specs):
                choice = _Choice(
                    index=i,
                    spec=spec,
                    sub=sub,
                    detok=IncrementalDetokenizer(self.tokenizer, spec.prompt_ids, token_bytes=self._token_bytes),
                    stops=StopStrings(spec.stop),
                    arrival=now,
                )
                choice.rid = self.engine.add_request(
                    spec.prompt_ids, spec.max_tokens, list(spec.eos_token_ids), spec.sampling
                )
                sub.choices.append(choice)
                self._active[choice.rid] = choice
            self._queued += len(specs)
        self._notify()
        return sub

    def cancel(self, sub: Submission) -> None:
        """The client went away: cancel its choices still running (their pages are freed
        before the next step)."""
        if sub.done:
            return
        self._command("cancel", sub)

    def fail_all(self, message: str) -> int:
        """The Engine will never step again (a tensor-parallel rank died): every choice in
        flight ends now with a 503 error event carrying ``message`` (OpenAI's error code
        ``DOWN_CODE``), queued commands fail with the same, and later ``submit`` calls are
        refused with it. Any thread: the engine thread may be stuck in a collective, so the
        events go straight to the loops, not through the thread's queue. Returns the number of
        choices ended; a second call ends nothing more."""
        with self._lock:
            if self._down is None:
                self._down = message
            choices = [c for c in self._active.values() if c.finish_reason is None]
            self._active.clear()
        with self._cv:
            commands = list(self._commands)
            self._commands.clear()
        for _, _, fut in commands:
            fut.set_exception(APIError(503, f"the command could not run: {message}", code=DOWN_CODE))
        by_sub: dict[Submission, list[ChoiceEvent]] = {}
        for c in choices:
            # finish_reason first: a step still running on the engine thread emits nothing more for it
            c.finish_reason = "error"
            by_sub.setdefault(c.sub, []).append(ChoiceEvent(c.index, "", (), None, message, 503, DOWN_CODE))
        _hand_over(list(by_sub.items()))
        if choices:  # debug: the caller logs the one line that says why
            _log.debug("%d request(s) in flight ended with 503: %s", len(choices), message)
        return len(choices)

    def call(self, name: str, arg: Any = None) -> concurrent.futures.Future:
        """Run a command on the engine thread: "budget" (bytes or None), "sleep", "wake",
        "reset_prefix_cache".
        The future's result is the Engine's stats after it; APIError for a bad argument."""
        return self._command(name, arg)

    def stats(self) -> dict[str, Any]:
        """The Engine's stats plus the server's state (any thread)."""
        out = dict(self.engine.stats())
        blocked = self._blocked
        out.update(
            sleeping=self.engine.asleep,
            draining=self.draining,
            queued=self._queued,
            blocked_by_budget=blocked.get("budget", 0),
            waiting_for_lease=blocked.get("lease", 0),
            waiting_for_memory=blocked.get("memory", 0),
        )
        broker = getattr(self.engine, "broker", None)
        if broker is not None:
            b = broker.stats()
            out.update(broker_connected=b["connected"], broker_seconds_since_message=b["seconds_since_message"])
        return out

    def room(self, prompt_tokens: int) -> Optional[int]:
        """``Engine.max_new_tokens_for``: the most tokens a prompt of ``prompt_tokens`` tokens
        leaves room for; None once the Engine is closed (the server is stopping: ``submit``
        says so)."""
        try:
            return self.engine.max_new_tokens_for(prompt_tokens)
        except RuntimeError:
            return None

    def refusal(self, prompt_tokens: int, max_tokens: int, label: str) -> Optional[str]:
        """The Engine's reason to refuse ``max_tokens`` (called ``label``) after a prompt of
        ``prompt_tokens`` tokens, or None."""
        try:
            self.engine.check_request([0] * prompt_tokens, max_tokens, max_tokens_label=label)
        except RequestRejected as exc:
            return exc.reason
        return None

    # ------------------------------------------------------------------ the app's calls ------
    # What the HTTP app awaits (``app.Service``); the front process's link has the same.
    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    async def open(self) -> None:
        """Start the engine thread (the app's lifespan)."""
        self.start()

    async def close(self) -> None:
        """``stop``, off the loop."""
        await asyncio.to_thread(self.stop)

    async def submit_request(self, specs: Sequence[ChoiceSpec], prompt_tokens: int) -> Submission:
        """``submit`` on the running loop, counting the request's ``prompt_tokens``."""
        sub = self.submit(specs, asyncio.get_running_loop())
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return sub

    async def command(self, name: str, arg: Any = None) -> Any:
        """``call``'s result."""
        return await asyncio.wrap_future(self.call(name, arg))

    async def stats_now(self) -> dict[str, Any]:
        """``stats``, off the loop (the Engine's stats wait for its pool lock)."""
        return await asyncio.to_thread(self.stats)

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition (rendered off the loop)."""
        return await asyncio.to_thread(self.metrics.render)

    async def room_for(self, prompt_tokens: int) -> Optional[int]:
        return self.room(prompt_tokens)

    async def refusal_for(self, prompt_tokens: int, max_tokens: int, label: str) -> Optional[str]:
        return self.refusal(prompt_tokens, max_tokens, label)

    # ------------------------------------------------------------------ commands -------------
    def _command(self, name: str, arg: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                fut.set_exception(overloaded("the server is shutting down", retry_after=5))
                return fut
            self._commands.append((name, arg, fut))
            self._notify_locked()
        return fut

    def _notify(self) -> None:
        with self._cv:
            self._notify_locked()

    def wake(self) -> None:
        """Have the engine thread look again now (any thread): e.g. the memory broker raised
        the lease, so requests held back for want of budget may run."""
        self._notify()

    def _notify_locked(self) -> None:
        self._wakeups += 1
        self._cv.notify()

    # ------------------------------------------------------------------ engine thread --------
    def _run(self) -> None:
        stalled = False
        while True:
            with self._cv:
                seen = self._wakeups
                while True:
                    if self._commands or self._stopping or self._drain_due():
                        break
                    runnable = bool(self._active) and not self.engine.asleep
                    if runnable and not (stalled and self._wakeups == seen):
                        break
                    timeout = _STALL_POLL_SECONDS if runnable else None
                    if self._drain_deadline is not None and self._active:
                        left = max(0.0, self._drain_deadline - self.clock())
                        timeout = left if timeout is None else min(timeout, left)
                    if not self._cv.wait(timeout) and stalled:
                        break  # the stall poll
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            stalled = False
            for name, arg, fut in commands:
                self._execute(name, arg, fut)
            if stopping or self._drain_due():
                self._abort_all()
                self._flush()
                if stopping:
                    return
                continue
            if self._active and not self.engine.asleep:
                stalled = self._step()
            self._flush()

    def _drain_due(self) -> bool:
        return self._drain_deadline is not None and bool(self._active) and self.clock() >= self._drain_deadline

    def _step(self) -> bool:
        """One Engine step and its tokens; returns True when the Engine is stalled (or the
        step failed: the next try waits for the stall poll or a command)."""
        try:
            produced = self.engine.step()
        except Exception as exc:
            self._step_failed(exc)
            return True
        if self._failing_since is not None:
            _log.info("engine steps run again")
            self._failing_since = None
        now = self.clock()
        for rid, token, reason in produced:  # the Engine says how each request ended
            choice = self._active.get(rid)
            if choice is None:
                continue  # cancelled while the step ran
            if token is None:  # the Engine ended it without a token: its sampling failed
                self._fail(choice, "sampling failed (non-finite probabilities)")
                continue
            try:
                self._on_token(choice, token, now, reason)
            except Exception as exc:  # detokenizing this request failed: it alone ends
                _log.exception("request %d failed while processing token %d", rid, token)
                self._fail(choice, f"{type(exc).__name__}: {exc}")
        self._check_blocked()
        return not produced and self.engine.stalled

    def _step_failed(self, exc: Exception) -> None:
        """A step raised. The Engine keeps its requests where they were (a forward that fails
        advances nothing), so each goes on at the next try: tokens the Engine recorded before
        the failure are delivered from its outputs, and only a request the Engine ended
        meanwhile is lost. After ``budget_wait_seconds`` of failing steps the rest end too."""
        now = self.clock()
        error = f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = now
            _log.exception("engine step failed; %d request(s) wait for the next step", len(self._active))
        else:
            _log.debug("engine step failed again: %s", error)
        for choice in list(self._active.values()):
            try:
                ended = self.engine.request_info(choice.rid)["finish_reason"]
                outputs = self.engine.output_ids(choice.rid)
            except ValueError:  # forgotten by the Engine
                self._fail(choice, f"the engine failed: {error}")
                continue
            try:
                new = outputs[len(choice.token_ids) :]
                for i, token in enumerate(new):
                    if choice.finish_reason is None:
                        self._on_token(choice, token, now, ended if i == len(new) - 1 else None)
            except Exception as tok_exc:
                _log.exception("request %d failed while processing its tokens", choice.rid)
                self._fail(choice, f"{type(tok_exc).__name__}: {tok_exc}")
                continue
            if choice.finish_reason is None and ended is not None:
                self._fail(choice, f"the engine failed: {error}")
        if self._active and now - self._failing_since >= self.budget_wait_seconds:
            waited = now - self._failing_since
            for choice in list(self._active.values()):
                self._fail(choice, f"the engine failed: every step for {waited:.0f}s (--budget-wait-seconds): {error}")

    def _check_blocked(self) -> None:
        """Count the requests the Engine cannot start now, and end those that have waited past
        their bound (none while the server sleeps on purpose)."""
        if self.engine.asleep or not self._active:
            for choice in self._active.values():
                choice.blocked_since = None
            self._blocked = {}
            return
        blocked = self.engine.blocked_requests()
        now = self.clock()
        counts: dict[str, int] = {}
        for rid, choice in list(self._active.items()):
            if choice.finish_reason is not None:
                continue  # ended above with another choice of its request
            if rid not in blocked:
                choice.blocked_since = None
                continue
            why, need = blocked[rid]
            if choice.blocked_since is None:
                choice.blocked_since = now
            limit = self.broker_wait_seconds if why == "lease" else self.budget_wait_seconds
            if now - choice.blocked_since >= limit:
                self._fail(choice, self._blocked_message(why, need, limit), status=503, code="insufficient_kv_memory")
            else:
                counts[why] = counts.get(why, 0) + 1
        self._blocked = counts

    def _blocked_message(self, why: str, need: int, limit: float) -> str:
        budget = self.engine.budget
        if why == "budget":
            own = budget.requested_bytes if budget.requested_bytes is not None else budget.ceiling_bytes
            return (
                f"the KV budget ({own} bytes) is below what this request needs to run ({need} "
                f"bytes); it waited {limit:g}s (--budget-wait-seconds) for the budget to rise"
            )
        if why == "lease":
            return (
                f"the memory broker's lease ({budget.effective_bytes()} bytes) is below what this request needs to "
                f"run ({need} bytes) and no grant came within {limit:g}s (--broker-wait-seconds)"
            )
        return (
            f"KV memory for this request ({need} bytes) could not be mapped for {limit:g}s "
            "(--budget-wait-seconds): the host or device is short of memory"
        )

    def _on_token(self, c: _Choice, token: int, now: float, reason: Optional[str]) -> None:
        """One token of ``c``; ``reason`` is the Engine's finish reason when it ended the request
        with this token ("stop" for EOS, "length"); a stop string is the server's own end."""
        c.token_ids.append(token)
        if c.spec.sampling.get("logprobs") is not None or (
            c.spec.sampling.get("prompt_logprobs") is not None and len(c.token_ids) == 1
        ):
            generated, prompt = self.engine.logprobs(c.rid)
            if c.spec.sampling.get("logprobs") is not None:
                c.logprobs.append(generated[len(c.token_ids) - 1])
            if len(c.token_ids) == 1 and c.spec.sampling.get("prompt_logprobs") is not None:
                c.prompt_logprobs = tuple(prompt)
        self.metrics.generation_tokens.inc()
        if c.first_token_time is None:
            c.first_token_time = now
            self.metrics.ttft.observe(now - c.arrival)
            with self._lock:
                self._queued -= 1
        elif c.last_token_time is not None:
            self.metrics.token_gap(now - c.last_token_time)
        c.last_token_time = now
        delta = c.detok.add(token)
        if reason is not None:
            delta += c.detok.flush()
        if c.stops.feed(delta, check=len(c.token_ids) >= c.spec.sampling.get("min_tokens", 0)) and reason is None:
            reason = "stop"
            self.engine.cancel(c.rid)  # the Engine would go on to max_tokens: free its pages now
        self._emit(c, reason)
        if reason is None and not c.stops.text and c.detok.holding and c.expedited < MAX_EXPEDITES:
            # no character is decided yet because the first one is split over tokens: the
            # stream's first text waits on its next token, which should not wait behind a
            # prefill-heavy step (text held back for a stop string is not helped by this)
            c.expedited += 1
            self.engine.expedite(c.rid)

    def _emit(
        self,
        c: _Choice,
        reason: Optional[str],
        error: Optional[str] = None,
        status: int = 500,
        code: str = "internal_error",
        retry_after: Optional[int] = None,
    ) -> None:
        """Queue the choice's unsent text (all of it when it ends) and its new token ids."""
        final = reason is not None or error is not None
        upto = c.stops.sendable(final)
        text = c.stops.text[c.sent_chars : upto]
        ids = tuple(c.token_ids[c.sent_tokens :])
        if not (text or ids or final):
            return
        logprobs = tuple(c.logprobs[c.sent_tokens :])
        prompt_logprobs, c.prompt_logprobs = c.prompt_logprobs, None
        c.sent_chars = max(c.sent_chars, upto)
        c.sent_tokens = len(c.token_ids)
        event = ChoiceEvent(c.index, text, ids, reason, error, status, code, retry_after, logprobs, prompt_logprobs)
        if final:
            self._finished(c, reason or "error")
        if self._pending and self._pending[-1][0] is c.sub:
            self._pending[-1][1].append(event)
        else:
            self._pending.append((c.sub, [event]))

    def _finished(self, c: _Choice, reason: str) -> None:
        c.finish_reason = reason
        with self._lock:
            self._active.pop(c.rid, None)
            if c.first_token_time is None:
                self._queued -= 1
        self.metrics.requests.labels(reason).inc()
        self.metrics.request_done(self.clock() - c.arrival)
        if c.first_token_time is not None and c.last_token_time is not None and len(c.token_ids) > 1:
            self.metrics.tpot.observe((c.last_token_time - c.first_token_time) / (len(c.token_ids) - 1))

    def _fail(self, c: _Choice, message: str, status: int = 500, code: str = "internal_error") -> None:
        """End a choice with an error (HTTP ``status``; 503s say when to retry), and the rest of
        its HTTP request with it."""
        retry_after = _RETRY_AFTER_SECONDS if status == 503 else None
        for other in c.sub.choices:
            if other.finish_reason is not None:
                continue
            self._cancel_engine(other)
            text = message if other is c else "another choice of this request failed"
            self._emit(other, None, text, status, code, retry_after)
        c.sub.failed = True

    def _cancel_engine(self, c: _Choice) -> None:
        try:
            self.engine.cancel(c.rid)
        except ValueError:
            pass  # finished and forgotten already
        except Exception:
            _log.exception("cancelling request %d failed", c.rid)

    def _abort_all(self) -> None:
        for c in list(self._active.values()):
            self._cancel_engine(c)
            c.stops.feed(c.detok.flush())
            self._emit(c, "abort")

    def _flush(self) -> None:
        """Hand this round's events to the loop: one call for all requests."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        _hand_over(batch)

    def _execute(self, name: str, arg: Any, fut: concurrent.futures.Future) -> None:
        try:
            if name == "cancel":
                for c in arg.choices:
                    if c.finish_reason is None:
                        self._cancel_engine(c)
                        self._finished(c, "cancelled")
                self._check_blocked()  # the counts must not keep a request that is gone
                result: Any = None
            elif name == "budget":
                self._set_budget(arg)
                result = self.stats()
            elif name == "sleep":
                if not self.engine.asleep:
                    self.engine.sleep()  # preempts everything running: swap or recompute
                    _log.info("sleeping: KV memory given back, requests queue until wake")
                result = self.stats()
            elif name == "reset_prefix_cache":
                freed = self.engine.reset_prefix_cache()
                _log.info("prefix cache reset: %d bytes of cached pages given up", freed)
                result = {**self.stats(), "freed_bytes": freed}
            elif name == "wake":
                if self.engine.asleep:
                    self.engine.wake()
                    _log.info("awake: KV budget %d bytes", self.engine.budget.effective_bytes())
                result = self.stats()
            else:
                raise ValueError(f"unknown command {name!r}")
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def _set_budget(self, nbytes: Any) -> None:
        """``/admin/kv-budget``: the Engine's budget validates the number; the API only keeps 0
        (and anything that buys no page) for ``/admin/sleep``, whose intent it states."""
        floor = max(MIN_KV_BYTES, self.engine.min_budget_bytes)
        if is_int(nbytes) and 0 <= nbytes < floor:
            raise bad_request(
                f"bytes ({nbytes}) is below the smallest KV budget, {floor} bytes (one KV chunk, as for "
                "--max-kv-bytes); POST /admin/sleep gives all KV memory back",
                "bytes",
            )
        try:
            self.engine.set_budget(nbytes)
        except ValueError as exc:
            raise bad_request(str(exc), "bytes") from None
