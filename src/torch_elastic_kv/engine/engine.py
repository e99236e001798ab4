"""Continuous batching on elastic KV: the Engine.

``step()`` reads as three words: schedule, run, postprocess — then one policy tick.

* schedule: the ``Scheduler`` picks prefill chunks and decode tokens under
  ``max_batch_tokens``, takes pages through the cache (``ElasticPagedCache`` packed mode) and
  preempts latest-arrived first when pages run out or the budget was cut;
* run: one forward over all of the step's tokens packed in a single row, no padding; the cache
  writes each token's K/V into its request's pages and attends it over them;
* postprocess: sampled tokens are appended, finished requests free their pages;
* policy tick: demand (pages held + expected growth + waiting prefills) goes to the
  ``ElasticPolicy``; a grow maps granules ahead of need — on CUDA from a background thread
  while the next forward runs on the device; on CPU, where the forward itself occupies the
  cores and a second busy thread would slow it, at the end of the step, before the step that
  needs them — and a shrink gives back empty granules, compacts, gives back again.

Threads: ``add_request`` and ``cancel`` may be called from any thread. ``step`` holds the step
lock for its whole duration; pool bookkeeping is additionally guarded by the pool lock, which
the step does not hold during the forward so the grower thread can map meanwhile.

Timing fields (``stats()``, ``timeline``, ``request_info``) are in seconds of the policy's
clock, so tests with an injected clock see deterministic values.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import numbers
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from typing import Any, Optional

import torch

from .._util import ceil_div, is_int
from ..hf.compat import kv_geometry
from ..kv.prefix_index import PrefixIndex
from ..kv.swap import SwapSpace
from .budget import KVBudget
from .eviction import EvictionPolicy
from .logits import TokenLogprob
from .memory import MemoryController
from .policy import Decision, ElasticPolicy
from .prefix_cache import PrefixCache
from .protocols import EngineBroker, EngineCache, EnginePool
from .request import Request, RequestRejected, RequestStatus, SamplingParams, StepOutput
from .runner import STEP_PHASES, ModelRunner
from .scheduler import Batch, PrefixHit, Scheduler

_log = logging.getLogger(__name__)

__all__ = ["Engine"]


class _CacheBackend:
    """The scheduler's ``PageBackend`` over the cache's page table, the pool and swap space.

    How many pages a request holds is read from the cache's ``PageTable`` (a dict lookup),
    the one place that records it. With a ``PrefixCache``, cached pages count as free (an
    allocation that needs them evicts them first) and admission looks up cached prefixes.
    """

    def __init__(self, pool: Any, cache: Any, swap: SwapSpace, prefix: Optional[PrefixCache] = None) -> None:
        self.pool = pool
        self.cache = cache
        self.table = cache.page_table
        self.swap = swap
        self.prefix = prefix
        self.page_tokens = pool.page_tokens
        self.page_bytes = pool.page_bytes

    def free_pages(self) -> int:
        return self.pool.free_pages + self.table.cached_pages

    def live_pages(self) -> int:
        return self.table.live_pages

    def allocated_pages(self) -> int:
        """Pages taken from the pool: held by requests, or cached."""
        return self.table.live_pages + self.table.cached_pages

    def held_pages(self, request: Request) -> int:
        return self.table.page_count(request.request_id)

    def _make_room(self, n: int) -> None:
        """Evict cached pages so that ``n`` pages can be allocated (as far as they go): those
        the budget needs, then, while the traffic does not reuse its pages, those never reused
        that would otherwise make the pool map more memory (see ``eviction.py``)."""
        if self.prefix is None:
            return
        short = n - self.pool.free_pages
        if short > 0:
            self.prefix.evict_for_alloc(short)
        unmapped = n - self.pool.mapped_free_pages
        if unmapped > 0:
            self.prefix.evict_unused_for_alloc(unmapped)

    def ensure(self, request: Request, total_tokens: int) -> None:
        need = ceil_div(total_tokens, self.page_tokens) - self.table.page_count(request.request_id)
        if need <= 0:
            return
        self._make_room(need)
        try:
            self.cache.ensure_capacity(request.request_id, total_tokens)
        except torch.OutOfMemoryError as exc:  # the scheduler is torch-free: one exception type
            raise MemoryError(str(exc)) from exc

    def find_prefix(self, request: Request) -> Optional[PrefixHit]:
        return None if self.prefix is None else self.prefix.find(request)

    def admit_prefix(self, request: Request, hit: Optional[PrefixHit]) -> int:
        return 0 if self.prefix is None else self.prefix.admit(request, hit)

    def computed(self, request: Request) -> None:
        if self.prefix is not None:
            self.prefix.publish(request)

    def release(self, request: Request) -> None:
        if request.request_id in self.table:  # else it was never given pages
            self.cache.free_request(request.request_id)

    def can_swap_out(self, request: Request) -> bool:
        nbytes = self.held_pages(request) * self.page_bytes
        if self.swap.can_store(nbytes):
            return True
        # a preempted request comes before demoted prefix pages
        return self.prefix is not None and self.prefix.make_swap_room(nbytes)

    def swap_out(self, request: Request) -> None:
        entry = self.table.get(request.request_id, "swap_out")
        data = self.pool.read_pages(entry.pages)
        self.swap.put(request.request_id, data, entry.tokens, len(entry.pages))
        # shared pages stay with their other holders; its indexed pages stay cached
        self.cache.free_request(request.request_id)

    def swap_in(self, request: Request, total_tokens: int) -> None:
        data, ntokens, npages = self.swap.peek(request.request_id)
        want = max(npages, ceil_div(total_tokens, self.page_tokens))
        self._make_room(want)
        try:
            # its swapped pages and those it grows by, in one allocation: all or nothing
            pages = self.pool.alloc(want)
        except torch.OutOfMemoryError as exc:
            raise MemoryError(str(exc)) from exc
        try:
            self.pool.write_pages(pages[:npages], data)
            self.cache.attach_request(request.request_id, pages, ntokens)
        except BaseException:
            self.pool.free(pages)
            raise
        self.swap.drop(request.request_id, swapped_in=True)

    def drop_swap(self, request: Request) -> None:
        self.swap.drop(request.request_id)


class Engine:
    """Continuous batching over an elastic KV page pool.

    Args:
        model: a decoder-only transformers model (``...ForCausalLM``) the cache supports.
        pool: a ``KVPagePool``; built from the model's config and the policy's byte limits
            when omitted.
        cache: an ``ElasticPagedCache`` over ``pool`` (built when omitted); the Engine uses its
            packed mode.
        policy: an ``ElasticPolicy``; ``ElasticPolicy()`` when omitted.
        max_batch_tokens: most tokens (prefill chunks + decode tokens) in one forward.
        max_running: most requests holding KV pages at once (``None``: pages decide).
        page_tokens: tokens per page when the Engine builds the pool.
        paged_attention: switch the model to ``attention.PAGED_ATTENTION`` (attention reads
            the pages directly; with any other cache it is plain SDPA), else the cache
            gathers K/V for the model's own attention.
        background: run the background thread: it gives memory back when the engine sits
            idle and nobody calls ``step``, and maps granules ahead of need when
            ``grow_in_background``.
        grow_in_background: map ahead from the background thread (``None``: on CUDA only;
            on CPU the grow happens at the end of the step before the one that needs it).
        timeline: record one entry per step in ``self.timeline`` (see ``step``).
        starvation_limit: preemptions after which a request is preempted only last.
        keep_finished: finished requests whose outputs and timings stay queryable
            (``output_ids``, ``request_info``); older ones are forgotten, oldest first.
        prepack_weights: run the model's float32 CPU ``nn.Linear`` layers on oneDNN-prepacked
            weights while the Engine lives (``prepack.PackedLinears``; ``close()`` restores
            them). ``None``: on for a float32 model on CPU when torch can; ``True``: required
            (ValueError if it cannot be done); ``False``: off. It costs a packed copy of the
            weights and oneDNN's compiled kernels for each row bucket a weight shape meets (at
            most 40 up to 2048 rows, process-wide): bounded, whatever the batch sizes. Whether
            it is faster depends on the CPU (``prepack`` module docstring). Off with ``compile``.
        prefix_caching: keep full KV pages by the hash of their tokens and share them: a
            request reuses the longest cached prefix of its tokens and prefills only the rest;
            pages no request holds stay cached (reclaimable, never demand) until ``eviction``
            gives them up (``prefix_cache.py``, ``eviction.py``).
        eviction: the prefix cache's ``EvictionPolicy`` (expiry, cap); the default when omitted.
        broker: a ``torch_elastic_kv.broker.client.BrokerClient`` (anything with
            ``attach(budget, stats, chunk_bytes=)`` and ``close()``): the Engine becomes a
            tenant of the device's memory broker; the client sets its lease on the Engine's
            ``budget``, so a smaller lease preempts and shrinks like a budget cut, at the next
            step (or at once, from the background thread, when nothing steps). ``close()``
            leaves the broker.
        compile: run the decoder layers' MLPs and RMSNorms compiled by ``torch.compile``
            (inductor; ``hf/compile.py``), compiled here, before the first step, for every
            batch size (the token count is a dynamic shape: no step compiles again, whatever
            its batch, grows, shrinks, compactions or preemptions). Off by default: it costs
            seconds of start-up, and on CPU with small models it is not faster. With it,
            prepacking is off (``prepack_weights=True`` is refused). ``stats()`` reports
            ``compiled_modules`` and ``compile_seconds``. ValueError for anything but a bool.
        expedite_prefill_tokens: the most prompt tokens (prefill chunks, and a swapped request
            resumed) a step takes while one of its decoders was marked with ``expedite``; 0
            makes that step decode only. ``None``: ``expedite`` changes nothing. Default 256
            (RESULTS.md, "Burst TTFT", seventh session).

    How much KV memory the Engine may hold is ``self.budget`` (a ``KVBudget``): the policy's
    ``max_bytes`` (within the pool's reservation) is its ceiling and ``min_bytes`` its floor;
    ``set_budget``, ``sleep``/``wake`` and a broker's lease are its inputs.
    """

    def __init__(
        self,
        model: Any,
        pool: Optional[EnginePool] = None,
        policy: Optional[ElasticPolicy] = None,
        max_batch_tokens: int = 2048,
        max_running: Optional[int] = None,
        *,
        cache: Optional[EngineCache] = None,
        page_tokens: int = 16,
        paged_attention: bool = True,
        background: bool = True,
        grow_in_background: Optional[bool] = None,
        timeline: bool = True,
        starvation_limit: int = 3,
        keep_finished: int = 100_000,
        prepack_weights: Optional[bool] = None,
        prefix_caching: bool = True,
        eviction: Optional[EvictionPolicy] = None,
        broker: Optional[EngineBroker] = None,
        compile: bool = False,
        expedite_prefill_tokens: Optional[int] = 256,
    ) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"Engine: compile must be True or False, got {compile!r}")
        if expedite_prefill_tokens is not None and (not is_int(expedite_prefill_tokens) or expedite_prefill_tokens < 0):
            raise ValueError(
                f"Engine: expedite_prefill_tokens must be None or an int >= 0, got {expedite_prefill_tokens!r}"
            )
        if compile and prepack_weights:
            raise ValueError(
                "Engine: compile=True and prepack_weights=True exclude each other (the compiled modules "
                "run their own kernels); pass prepack_weights=None or False"
            )
        if not isinstance(prefix_caching, bool):
            raise ValueError(f"Engine: prefix_caching must be True or False, got {prefix_caching!r}")
        if eviction is not None and not isinstance(eviction, EvictionPolicy):
            raise ValueError(f"Engine: eviction must be an EvictionPolicy, got {type(eviction).__name__}")

        self.model = model
        self.config = model.config
        self.policy = policy if policy is not None else ElasticPolicy()
        self.clock: Callable[[], float] = self.policy.clock
        try:
            param = next(model.parameters())
            self.device, dtype = param.device, param.dtype
        except StopIteration:
            self.device, dtype = torch.device("cpu"), torch.float32
        text_cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        use_prepack = self._want_prepack(model, dtype, False if compile else prepack_weights)
        self.vocab_size: int = text_cfg.vocab_size
        self.max_positions: Optional[int] = getattr(text_cfg, "max_position_embeddings", None)

        self._owns_pool = pool is None
        if pool is None:
            from ..kv.pool import KVPagePool

            layers, kv_heads, head_dim = kv_geometry(self.config)
            pool = KVPagePool(
                layers,
                kv_heads,
                head_dim,
                dtype,
                device=self.device,
                page_tokens=page_tokens,
                max_bytes=self.policy.max_bytes,
                min_bytes=self.policy.min_bytes,
            )
        self.pool = pool
        reserved = int(pool.stats()["reserved_bytes"])
        ceiling = reserved if self.policy.max_bytes is None else min(self.policy.max_bytes, reserved)
        self.budget = KVBudget(ceiling, min(self.policy.min_bytes, ceiling), min_request_bytes=int(pool.chunk_bytes))
        self._restore_attn: Optional[str] = None
        if paged_attention and cache is None:
            from ..hf.attention import PAGED_ATTENTION, enable_paged_attention

            before = getattr(self.config, "_attn_implementation", None)
            if before != PAGED_ATTENTION:
                enable_paged_attention(model)
                self._restore_attn = before  # close() puts the model back as it was
        if cache is None:
            from ..hf.cache import ElasticPagedCache  # the one cache class users pass to generate

            cache = ElasticPagedCache(self.config, pool=pool)
        self.cache = cache
        self.runner = ModelRunner(model, cache, self.device, on_new_stream=pool.add_stream)
        self.swap = SwapSpace(self.policy.swap_bytes, pin_memory=self.device.type == "cuda")
        self.prefix: Optional[PrefixCache] = None
        if prefix_caching:
            eviction = eviction or EvictionPolicy()
            if eviction.cap_bytes is not None and eviction.cap_bytes > self.budget.ceiling_bytes:
                raise ValueError(
                    f"Engine: the prefix cache's cap_bytes ({eviction.cap_bytes}) exceeds the KV ceiling "
                    f"({self.budget.ceiling_bytes} bytes)"
                )
            table = self.cache.page_table
            table.enable_prefix(PrefixIndex(pool.page_tokens, _kv_salt(self.config, dtype), self.policy.clock))
            self.prefix = PrefixCache(
                table,
                eviction,
                page_bytes=pool.page_bytes,
                pages_per_chunk=int(pool.stats()["pages_per_chunk"]),
                clock=self.policy.clock,
                swap=self.swap,
            )
        self._backend = _CacheBackend(pool, self.cache, self.swap, self.prefix)
        self.scheduler = Scheduler(
            self._backend,
            max_batch_tokens=max_batch_tokens,
            max_running=max_running,
            headroom=self.policy.headroom,
            starvation_limit=starvation_limit,
            expedite_prefill_tokens=expedite_prefill_tokens,
        )
        self._step_lock = threading.RLock()  # one step (or budget change) at a time
        self._pool_lock = threading.RLock()  # pool bookkeeping: step vs the memory thread
        if grow_in_background is None:
            grow_in_background = self.device.type == "cuda"
        self.memory = MemoryController(
            pool,
            self.policy,
            self.scheduler,
            self._backend,
            self.budget,
            prefix=self.prefix,
            step_lock=self._step_lock,
            pool_lock=self._pool_lock,
            grow_in_background=bool(background and grow_in_background),
        )
        self._inbox_lock = threading.Lock()  # add_request / cancel from any thread
        self._inbox: list[Request] = []
        self._requests: dict[int, Request] = {}
        if not is_int(keep_finished) or keep_finished < 0:
            raise ValueError(f"Engine: keep_finished must be an int >= 0, got {keep_finished!r}")
        self._done: collections.deque[int] = collections.deque()  # finished ids, oldest first
        self._keep_finished = keep_finished
        self._n_finished = 0
        self._n_cancelled = 0
        self._next_id = 0
        self._arrivals = 0

        self.timeline: Optional[list[dict]] = [] if timeline else None
        self._steps = 0
        self._tokens_out = 0
        self._tokens_in = 0
        # perf_counter seconds of every step, by phase (STEP_PHASES): what a step costs, where
        self._phase_seconds: dict[str, float] = dict.fromkeys(STEP_PHASES, 0.0)
        self._stalled = False
        self._short: list[Request] = []  # the last step's requests whose pages could not be mapped
        self._memory_error: Optional[str] = None  # and why
        self._allocation_failures = 0
        self._pool_closed = False
        self._closed = False
        self._final_stats: Optional[dict] = None  # what stats() answers once closed
        self._unstreamed: collections.deque = collections.deque()  # stream()ed steps' tokens not yet yielded
        self._packed: Any = None
        if use_prepack:
            from ..hf.prepack import PackedLinears

            self._packed = PackedLinears(model)  # close() restores the layers
        self._compiled: Any = None
        self.broker: Optional[EngineBroker] = None  # attached below, after the compile
        if compile:
            from ..hf.compile import CompiledLayers

            try:
                self._compiled = CompiledLayers(model, text_cfg.hidden_size)  # close() restores them
                self._compiled.warm_up(dtype, self.device)
            except BaseException:
                self.close()
                raise
            _log.info("Engine: %d modules compiled in %.1f s", self._compiled.count, self._compiled.compile_seconds)
        self.broker = broker
        if broker is not None:
            try:
                broker.attach(self.budget, self.stats, chunk_bytes=int(self.pool.chunk_bytes))
            except BaseException:
                self.broker = None
                self.close()
                raise
        if background:
            self.memory.start()

    def _want_prepack(self, model: Any, dtype: torch.dtype, want: Optional[bool]) -> bool:
        """Whether to install ``PackedLinears``; ``prepack_weights=True`` that cannot be done
        raises ValueError here, before the Engine changes anything."""
        if want is not None and not isinstance(want, bool):
            raise ValueError(f"Engine: prepack_weights must be None, True or False, got {want!r}")
        if want is False:
            return False
        from ..hf.prepack import eligible_linears, prepack_available

        why = None
        if self.device.type != "cpu" or dtype != torch.float32:
            why = f"the model is {dtype} on {self.device}; prepacking is for float32 on CPU"
        elif not eligible_linears(model):
            why = "the model has no float32 nn.Linear layer on CPU"
        elif not prepack_available():
            why = "this torch build has no usable oneDNN linear"
        if why is not None and want:
            raise ValueError(f"Engine: prepack_weights=True but {why}")
        return why is None

    # ------------------------------------------------------------------ requests ----------
    def _validate(
        self,
        prompt_ids: Any,
        max_new_tokens: Any,
        eos_token_id: Any,
        sampling: Any,
        where: str = "add_request",
        label: str = "max_new_tokens",
    ) -> tuple[list[int], int, frozenset, SamplingParams]:
        """The request's arguments, checked once; ``RequestRejected`` (a ValueError) names the
        field at fault, ``label`` being how the caller names ``max_new_tokens``."""

        def reject(field: str, reason: str) -> RequestRejected:
            return RequestRejected(where, field, reason)

        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1:
                raise reject("prompt", f"prompt tensor must be 1-D, got shape {tuple(prompt_ids.shape)}")
            if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
                raise reject("prompt", f"prompt ids must be integers, got dtype {prompt_ids.dtype}")
            ids = [int(x) for x in prompt_ids.tolist()]
        elif isinstance(prompt_ids, (list, tuple)):
            ids = []
            for i, x in enumerate(prompt_ids):
                if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                    raise reject("prompt", f"prompt id at position {i} is {x!r} ({type(x).__name__}), not an int")
                ids.append(int(x))
        else:
            raise reject(
                "prompt", f"prompt_ids must be a list of ints or a 1-D tensor, got {type(prompt_ids).__name__}"
            )
        if not ids:
            raise reject("prompt", "the prompt is empty (0 tokens); at least one token is needed")
        bad = [(i, x) for i, x in enumerate(ids) if not 0 <= x < self.vocab_size]
        if bad:
            i, x = bad[0]
            raise reject("prompt", f"prompt id {x} at position {i} is outside the vocabulary [0, {self.vocab_size})")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise reject("max_new_tokens", f"{label} must be an int >= 1, got {max_new_tokens!r}")
        if self.max_positions is not None and len(ids) + max_new_tokens > self.max_positions:
            raise reject(
                "max_new_tokens",
                f"prompt ({len(ids)} tokens) + {label} ({max_new_tokens}) exceeds the "
                f"model's max_position_embeddings ({self.max_positions})",
            )
        if eos_token_id is None:
            eos: frozenset = frozenset()
        elif isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
            eos = frozenset([eos_token_id])
        elif isinstance(eos_token_id, (list, tuple, set, frozenset)) and all(
            isinstance(e, int) and not isinstance(e, bool) for e in eos_token_id
        ):
            eos = frozenset(eos_token_id)
        else:
            raise reject("eos_token_id", f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")
        try:
            params = SamplingParams.coerce(sampling)
        except ValueError as exc:
            raise reject("sampling", str(exc)) from None
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise reject(
                    "sampling", f"logit_bias token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
        if params.min_tokens > max_new_tokens:
            raise reject("sampling", f"min_tokens ({params.min_tokens}) is more than {label} ({max_new_tokens})")
        # never fits: its own KV at full length exceeds the budget's ceiling. A temporary cut
        # (set_budget, a lease, sleep) only delays it: such a request queues until it lifts.
        need = ceil_div((len(ids) + max_new_tokens - 1), self.pool.page_tokens)
        ceiling = self.budget.ceiling_bytes
        cap = self.policy.bytes_to_pages(ceiling)
        if need > cap:
            raise reject(
                "max_new_tokens",
                f"prompt ({len(ids)} tokens) + {label} ({max_new_tokens}) needs {need} "
                f"KV pages ({need * self.pool.page_bytes} bytes) but the ceiling (max_bytes {ceiling}) allows "
                f"{cap} pages ({cap * self.pool.page_bytes} bytes)",
            )
        return ids, max_new_tokens, eos, params

    def check_request(
        self,
        prompt_ids: Any,
        max_new_tokens: Any,
        eos_token_id: Any = None,
        sampling: Any = None,
        *,
        max_tokens_label: str = "max_new_tokens",
    ) -> None:
        """Raise the ``RequestRejected`` (a ValueError) that ``add_request`` would raise for these
        arguments, or return None; queues nothing. Lets a caller with several requests (a
        server's ``n`` choices, a batch of prompts) check them all before queuing any.
        ``max_tokens_label``: the caller's name for ``max_new_tokens`` in the reason (a server
        says ``max_tokens``), so the reason needs no rewriting."""
        self._require_open("check_request")
        self._validate(prompt_ids, max_new_tokens, eos_token_id, sampling, label=max_tokens_label)

    def max_new_tokens_for(self, prompt_tokens: int) -> int:
        """The largest ``max_new_tokens`` a prompt of ``prompt_tokens`` tokens may ask for: within
        the model's positions and what the budget's ceiling can ever hold (0: the prompt alone
        does not fit). What ``check_request`` enforces, as a number, for callers choosing a default.
        The same for the Engine's life, whatever its budget does now: callers may remember it."""
        if not is_int(prompt_tokens) or prompt_tokens < 1:
            raise ValueError(f"max_new_tokens_for: prompt_tokens must be an int >= 1, got {prompt_tokens!r}")
        cap_pages = self.policy.bytes_to_pages(self.budget.ceiling_bytes)
        fits = cap_pages * self.pool.page_tokens - prompt_tokens + 1  # its last token is never stored
        if self.max_positions is not None:
            fits = min(fits, self.max_positions - prompt_tokens)
        return max(0, fits)

    def add_request(self, prompt_ids: Any, max_new_tokens: int, eos_token_id: Any = None, sampling: Any = None) -> int:
        """Queue a request; returns its id. Thread-safe; may be called between or during steps.

        ``sampling``: ``None`` (greedy), a ``SamplingParams`` or a dict of its fields.
        Raises ``ValueError`` for bad input, leaving the engine unchanged.
        """
        self._require_open("add_request")
        ids, mnt, eos, params = self._validate(prompt_ids, max_new_tokens, eos_token_id, sampling)
        now = self.clock()
        with self._inbox_lock:
            rid = self._next_id
            self._next_id += 1
            request = Request(
                request_id=rid,
                prompt_ids=ids,
                max_new_tokens=mnt,
                arrival_index=self._arrivals,
                arrival_time=now,
                eos_token_ids=eos,
                sampling=params,
            )
            self._arrivals += 1
            self._requests[rid] = request
            self._inbox.append(request)
        self.memory.prompt_arrived(ceil_div(len(ids), self.pool.page_tokens))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Cancel a request; returns False if it had already finished. Unknown id: ValueError."""
        self._require_open("cancel")
        with self._inbox_lock:
            request = self._requests.get(request_id) if isinstance(request_id, int) else None
            if request is None:
                raise ValueError(f"cancel: unknown request id {request_id!r}")
            if request.is_finished:
                return False
            in_inbox = request in self._inbox
            if in_inbox:
                self._inbox.remove(request)
                request.finish(self.clock(), "abort")
        if not in_inbox:
            with self._step_lock, self._pool_lock:
                if request.is_finished:
                    return False
                self.scheduler.cancel(request, self.clock())
        self._retire([request], cancelled=True)
        return True

    def expedite(self, request_id: int) -> bool:
        """Say that a caller waits on this request's next token (a stream that has shown no
        text yet, its first character still incomplete): if the next step decodes it, that
        step takes at most ``expedite_prefill_tokens`` prompt tokens, so the token comes after
        a short step rather than a prefill-heavy one. The mark lasts for the next step only;
        the tokens are the same. Returns False when the request is not running (queued,
        preempted or finished). Unknown id: ValueError."""
        self._require_open("expedite")
        with self._inbox_lock:
            request = self._requests.get(request_id) if is_int(request_id) else None
            if request is None:
                raise ValueError(f"expedite: unknown request id {request_id!r}")
        with self._step_lock:
            if request.status is not RequestStatus.RUNNING:
                return False
            self.scheduler.expedite(request)
            return True

    def _retire(self, requests: list[Request], cancelled: bool) -> None:
        """Count finished requests; forget the oldest beyond ``keep_finished``."""
        if not requests:
            return
        with self._inbox_lock:
            if cancelled:
                self._n_cancelled += len(requests)
            else:
                self._n_finished += len(requests)
            self._done.extend(s.request_id for s in requests)
            while len(self._done) > self._keep_finished:
                self._requests.pop(self._done.popleft(), None)

    @property
    def stalled(self) -> bool:
        """True when the last step ran nothing although requests wait: the first of them needs
        more KV pages than the budget lets it have, and stepping again changes nothing until
        the budget rises (``set_budget``, ``wake``, a lease) or requests are cancelled; or the
        pages it needs could not be mapped (the host or device is short of memory), and
        stepping again helps once memory comes back."""
        return self._stalled

    def has_unfinished(self) -> bool:
        """True while any request is queued, running or swapped out."""
        with self._inbox_lock:
            if self._inbox:
                return True
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step ----------
    def step(self) -> list[StepOutput]:
        """One scheduling iteration; returns one ``StepOutput(request_id, token,
        finish_reason)`` per request that sampled: its token, and on its last output how it
        ended ("stop", "length", or "error" with token None when its sampling failed).
        Cancelled requests end outside the step (``cancel`` returns True; reason "abort").

        Appends to ``self.timeline`` (when enabled) one dict per step: ``t`` (clock),
        ``step``, ``num_tokens`` (tokens in the forward), ``num_seqs``, ``running``,
        ``waiting``, ``live_bytes``, ``resident_bytes``, ``budget_bytes``, ``preempted``,
        ``step_seconds`` (wall time of the step).
        """
        self._require_open("step")
        with self._step_lock:
            t0 = time.perf_counter()
            phases = self._phase_seconds
            self._drain_inbox()
            preempted = self.memory.before_step()
            t1 = time.perf_counter()
            with self._pool_lock:
                batch = self.scheduler.schedule()
            self._note_short(batch)
            produced: list[StepOutput] = []
            t2 = time.perf_counter()
            phases["memory"] += t1 - t0
            phases["schedule"] += t2 - t1
            if batch:
                sampled = self.runner.run(batch)
                for name, seconds in self.runner.last_phases.items():
                    phases[name] += seconds
                t2 = time.perf_counter()
                now = self.clock()
                with self._pool_lock:
                    produced, finished = self.scheduler.postprocess(batch, sampled, now)
                for request in finished:
                    self.policy.record_finished(request.num_generated)
                self._retire(finished, cancelled=False)
                self._steps += 1
                self._tokens_in += batch.num_tokens
                self._tokens_out += sum(1 for out in produced if out.token is not None)
            waits = bool(self.scheduler.waiting) and not self.scheduler.running
            self._stalled = not batch and (waits or bool(batch.short))
            t3 = time.perf_counter()
            phases["postprocess"] += t3 - t2
            self.memory.after_step()
            phases["memory"] += time.perf_counter() - t3
            if self.timeline is not None:
                self._record(batch, preempted + len(batch.preempted), time.perf_counter() - t0)
            return produced

    def _note_short(self, batch: Batch) -> None:
        """Remember which requests a failed map held back (they wait, unchanged); log the
        first failure of a run of them and the recovery, not every step."""
        if batch.short:
            self._allocation_failures += 1
            if not self._short:
                _log.warning(
                    "KV memory could not be mapped for %d request(s); they wait unchanged: %s",
                    len(batch.short),
                    batch.memory_error,
                )
            self._memory_error = batch.memory_error
        elif self._short:
            _log.info("KV memory can be mapped again; the requests held back go on")
        self._short = list(batch.short)

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            new, self._inbox = self._inbox, []
        if new:
            with self._pool_lock:  # the grower thread reads the scheduler's queues
                for request in new:
                    self.scheduler.add(request)

    # ------------------------------------------------------------------ budget -------------
    def set_budget(self, nbytes: Optional[int]) -> None:
        """Change the requested KV byte budget now; ``None`` restores the ceiling (the
        policy's ``max_bytes``).

        Below what is live, requests are preempted (latest-arrived first): swapped to host
        memory while ``swap_bytes`` allows, else dropped and recomputed later. ``0`` holds
        nothing (requests queue until the budget rises); a budget between 0 and
        ``min_budget_bytes`` buys no page and is refused. Bad input raises ``ValueError`` and
        changes nothing.
        """
        self._require_open("set_budget")
        self.budget.set_requested(nbytes)
        self._enforce_now()

    def sleep(self) -> None:
        """Give all KV memory back now: running requests are preempted (swapped or recomputed
        later) and new ones wait until ``wake``; the requested budget is kept."""
        self._require_open("sleep")
        self.budget.sleep()
        self._enforce_now()

    def wake(self) -> None:
        """Undo ``sleep``: the budget is what it was before."""
        self._require_open("wake")
        self.budget.wake()
        self._enforce_now()

    @property
    def asleep(self) -> bool:
        return self.budget.asleep

    def _enforce_now(self) -> None:
        with self._step_lock:
            preempted = self.memory.enforce()
            if self.timeline is not None:
                self._record(Batch(), preempted, 0.0)

    @property
    def min_budget_bytes(self) -> int:
        """The smallest budget other than 0 that ``set_budget`` accepts: one chunk of the pool
        (the policy counts the budget in whole chunks, so less holds no page)."""
        return int(self.pool.chunk_bytes)

    def blocked_requests(self) -> dict[int, tuple[str, int]]:
        """Waiting requests that cannot start now however long they wait for others:
        request id -> (why, the KV bytes it needs to start). Why: "budget" (the Engine's own
        budget, ``set_budget`` / ``max_bytes`` / sleep, is below that), "lease" (only a lease,
        e.g. a broker's, is), "memory" (it is within the budget but its pages could not be
        mapped at the last step: the host or device is short). Any thread."""
        with self._pool_lock:
            snap = self.budget.snapshot()
            max_pages = self.pool.max_pages
            page_bytes = self.pool.page_bytes

            def pages(nbytes: int) -> int:
                return min(max_pages, self.policy.bytes_to_pages(nbytes))

            requested = snap["requested_bytes"]
            own = pages(0 if snap["asleep"] else snap["ceiling_bytes"] if requested is None else requested)
            effective = pages(snap["effective_bytes"])
            out: dict[int, tuple[str, int]] = {}
            for request in self.scheduler.waiting:
                need = ceil_div(request.num_tokens, self.pool.page_tokens)
                if need > own:
                    out[request.request_id] = ("budget", need * page_bytes)
                elif need > effective:
                    out[request.request_id] = ("lease", need * page_bytes)
            for request in self._short:
                if not request.is_finished and request.request_id not in out:
                    need = ceil_div(request.num_tokens, self.pool.page_tokens)
                    out[request.request_id] = ("memory", need * page_bytes)
            return out

    def reset_prefix_cache(self) -> int:
        """Give up every cached prefix page now (pages requests hold stay); returns the bytes
        freed (0 with prefix caching off). The memory goes back at the next shrink."""
        self._require_open("reset_prefix_cache")
        if self.prefix is None:
            return 0
        with self._step_lock, self._pool_lock:
            return self.prefix.reset() * self.pool.page_bytes

    def maintain(self) -> Decision:
        """Run one policy tick without a step (what the background thread does when idle)."""
        self._require_open("maintain")
        with self._step_lock:
            return self.memory.maintain()

    # ------------------------------------------------------------------ driving ------------
    def stream(self) -> Iterator[StepOutput]:
        """Step until nothing is left, yielding each ``StepOutput`` as tokens come.

        A stream left early (``break``) loses nothing: the next ``stream()`` first yields the
        tokens its step produced that were not yielded yet.
        """
        self._require_open("stream")
        while True:
            while self._unstreamed:
                yield self._unstreamed.popleft()
            if not self.has_unfinished():
                return
            self._unstreamed.extend(self.step())
            self._raise_if_stalled()

    def generate(
        self, prompts: Seq[Any], max_new_tokens: Any, eos_token_id: Any = None, sampling: Any = None
    ) -> list[list[int]]:
        """Run ``prompts`` to completion; returns each one's generated ids, in order.

        ``max_new_tokens`` is an int or one per prompt. All prompts are validated before any
        is queued. Other requests in the engine keep running alongside.
        """
        self._require_open("generate")
        if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
            mnts = [max_new_tokens] * len(prompts)
        else:
            mnts = list(max_new_tokens)
            if len(mnts) != len(prompts):
                raise ValueError(f"generate: {len(mnts)} max_new_tokens for {len(prompts)} prompts")
        for p, m in zip(prompts, mnts):
            self._validate(p, m, eos_token_id, sampling)
        rids = [self.add_request(p, m, eos_token_id, sampling) for p, m in zip(prompts, mnts)]
        requests = [self._requests[r] for r in rids]
        while not all(s.is_finished for s in requests):
            self.step()
            self._raise_if_stalled()
        return [s.output_ids for s in requests]

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"Engine.{what}: the Engine is closed")

    def _raise_if_stalled(self) -> None:
        if not self._stalled:
            return
        if self._short:
            raise MemoryError(
                f"Engine stalled: KV memory for request {self._short[0].request_id} could not be mapped "
                f"({self._memory_error}); the requests stay queued, unchanged: step again once memory is back"
            )
        if self.budget.lease_bytes is not None:
            # a lease may rise: wait for the budget to change rather than fail
            self.budget.wait_for_change(self.budget.version, timeout=0.05)
            return
        request = self.scheduler.waiting[0]
        need = ceil_div(request.num_tokens, self.pool.page_tokens)
        raise RuntimeError(
            f"Engine stalled: request {request.request_id} needs {need} KV pages but only "
            f"{self._backend.free_pages()} can be had under the budget "
            f"({self.budget.effective_bytes()} bytes); raise it with set_budget"
        )

    # ------------------------------------------------------------------ observability ------
    def stats(self) -> dict:
        """Counters and byte figures as a plain dict.

        running / waiting / swapped: requests in each state (waiting includes swapped);
        live_bytes: pages held by requests; demand_bytes: what the policy sizes residency from
        (held + expected growth + waiting prompts); broker_lease_bytes: the memory broker's lease
        (None without a broker); resident_bytes: mapped (physical) KV memory;
        reserved_bytes: reserved address space; budget_bytes: the effective budget
        (``KVBudget.effective_bytes``), requested_budget_bytes: what ``set_budget`` asked
        (None: the ceiling), asleep: whether ``sleep`` holds it at 0; grows / shrinks / compactions: the pool's counters; shrink_events /
        grow_events / compact_events: policy actions that changed residency;
        preemptions (swap_preemptions + recompute_preemptions); steps (expedited_steps: those
        run under ``expedite_prefill_tokens`` because a marked request decoded in them),
        prompt/forward tokens
        (tokens_forwarded) and output tokens (tokens_generated); prepacked_layers (linear
        layers on prepacked weights); compiled_modules / compile_seconds (``compile``: modules
        running compiled, wall seconds their compilation took at start); policy_seconds (wall
        seconds, ``time.perf_counter``, the steps spent on budget checks, preemption, grows and shrinks: the price of elasticity
        in the step); background_errors / background_last_error (failures of the background
        memory thread, which keeps running); allocation_failures (steps in which KV pages within
        the budget could not be mapped: those requests waited, unchanged); step_phase_seconds
        (wall seconds, ``time.perf_counter``, of all steps by phase: ``schedule``, ``pack`` (tokens
        packed and pages planned), ``forward``, ``sample`` (on CUDA it also waits for the
        forward's kernels), ``postprocess``, ``memory`` (policy work before and after)); swap_*
        from the swap space. A closed Engine answers with the figures it had when it closed (memory it gave back counted as gone) and ``closed: True``.
        """
        if self._final_stats is not None:
            return dict(self._final_stats)
        with self._pool_lock:
            ps = self.pool.stats()
            demand = self.memory.demand()
        with self._inbox_lock:
            inbox = len(self._inbox)
            finished = self._n_finished
            cancelled = self._n_cancelled
        sch = self.scheduler
        out = {
            "running": len(sch.running),
            "waiting": len(sch.waiting) + inbox,
            "swapped": sch.num_swapped(),
            "finished": finished,
            "cancelled": cancelled,
            "live_bytes": self._backend.live_pages() * self.pool.page_bytes,
            "demand_bytes": demand * self.pool.page_bytes,
            "broker_lease_bytes": self.broker.lease_bytes if self.broker is not None else None,
            "resident_bytes": ps["resident_bytes"],
            "reserved_bytes": ps["reserved_bytes"],
            "budget_bytes": self.budget.effective_bytes(),
            "requested_budget_bytes": self.budget.requested_bytes,
            "asleep": self.budget.asleep,
            "max_bytes": self.policy.max_bytes,
            "min_bytes": self.policy.min_bytes,
            "page_bytes": self.pool.page_bytes,
            "grows": ps["grows"],
            "shrinks": ps["shrinks"],
            "compactions": ps["compactions"],
            **self.memory.stats(),
            "preemptions": sch.preemptions,
            "swap_preemptions": sch.swap_preemptions,
            "recompute_preemptions": sch.recompute_preemptions,
            "steps": self._steps,
            "expedited_steps": sch.expedited_steps,
            "tokens_forwarded": self._tokens_in,
            "tokens_generated": self._tokens_out,
            "prepacked_layers": 0 if self._packed is None else self._packed.count,
            "compiled_modules": 0 if self._compiled is None else self._compiled.count,
            "compile_seconds": 0.0 if self._compiled is None else self._compiled.compile_seconds,
            "allocation_failures": self._allocation_failures,
            "step_phase_seconds": dict(self._phase_seconds),
        }
        out.update(self.swap.stats())
        if self.prefix is not None:
            with self._pool_lock:
                out.update(self.prefix.stats())
        else:
            out.update(prefix_caching=False, cached_bytes=0)
        return out

    def request_info(self, request_id: int) -> dict:
        """Timing and counts of one request: arrival_time, first_token_time, finish_time, ..."""
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(
                f"request_info: unknown request id {request_id!r} (or finished "
                f"before the last {self._keep_finished} and forgotten)"
            )
        return request.info()

    def requests_info(self) -> list[dict]:
        """``request_info`` of every request the engine has seen, in arrival order."""
        with self._inbox_lock:
            requests = list(self._requests.values())
        return [s.info() for s in requests]

    def logprobs(self, request_id: int) -> tuple[list[TokenLogprob], list[Optional[TokenLogprob]]]:
        """The request's log-probabilities so far: one ``TokenLogprob`` per generated token (when
        its sampling asked ``logprobs``) and one per prompt token, the first None (when it asked
        ``prompt_logprobs``; filled as its prefill runs). Live lists: read them from the thread
        that steps."""
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"logprobs: unknown request id {request_id!r}")
        return request.logprobs, request.prompt_logprobs

    def output_ids(self, request_id: int) -> list[int]:
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"output_ids: unknown request id {request_id!r}")
        return request.output_ids

    def _record(self, batch: Batch, preempted: int, seconds: float) -> None:
        self.timeline.append(
            {
                "t": self.clock(),
                "step": self._steps,
                "num_tokens": batch.num_tokens,
                "num_seqs": len(batch.chunks),
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "live_bytes": self._backend.live_pages() * self.pool.page_bytes,
                "resident_bytes": self.memory.resident_bytes(),
                "budget_bytes": self.budget.effective_bytes(),
                "preempted": preempted,
                "step_seconds": seconds,
            }
        )

    # ------------------------------------------------------------------ lifetime -----------
    def close(self) -> None:
        """Stop the grower thread, give the model back its attention implementation and, if
        the Engine built the pool, close it (a pool passed in stays open: its owner closes it).
        The Engine cannot step after this."""
        self._closed = True
        self.memory.stop()
        if self._final_stats is None:
            final = {**self.stats(), "closed": True}
            if self._owns_pool:  # its pool closes below: that memory is given back
                final.update(live_bytes=0, resident_bytes=0, reserved_bytes=0)
            self._final_stats = final
        if self._restore_attn is not None:
            self.model.set_attn_implementation(self._restore_attn)
            self._restore_attn = None
        if self._packed is not None:
            self._packed.restore()
            self._packed = None
        if getattr(self, "_compiled", None) is not None:
            self._compiled.restore()
            self._compiled = None
        if self._owns_pool and not self._pool_closed:
            # the Engine made the pool, so its memory goes back with the Engine
            self._pool_closed = True
            with self._step_lock, self._pool_lock:
                self.cache.close()
                self.pool.close()
        if self.broker is not None:
            broker, self.broker = self.broker, None
            broker.close()  # after the pool: a tenant with nothing resident frees its lease

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _kv_salt(config: Any, dtype: torch.dtype) -> bytes:
    """What makes K/V of equal tokens differ between two Engines: the model's config and dtype."""
    try:
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    except Exception:  # a config that cannot be dumped salts by its identity: no sharing across models
        text = f"{type(config).__name__}:{id(config)}"
    return hashlib.sha256(f"{text}|{dtype}".encode()).digest()[:32]
