"""ElasticPagedCache: a transformers ``Cache`` whose K/V live in a KVPagePool.

Two ways to drive it:

* **generate mode** — ``model.generate(**inputs, past_key_values=ElasticPagedCache(model.config))``:
  one sequence per batch row (left padding included, as in ``DynamicCache``), pages allocated
  as rows grow, a second ``generate`` continues the same rows, ``release()`` gives every
  page back and the cache can be used again.
* **packed mode** — the Engine's continuous batching: ``ensure_capacity`` / ``set_packed_batch``
  then ``model(input_ids=[1, T], past_key_values=cache, **extra)`` with the tokens of many sequences
  packed without padding (prefill chunks and decode tokens mixed); see docs/INTERFACES.md.

Attention reads the pages one of two ways, chosen by ``attention=``:

* ``"gather"``: ``update`` returns each row's K/V gathered into ``[batch, kv_heads, tokens,
  head_dim]``, so any attention implementation works and results match ``DynamicCache``
  bit for bit.
* ``"paged"``: the model must use ``attention.PAGED_ATTENTION``; ``update`` only writes and
  the attention reads pages through the page table (see ``attention.py``).
* ``"auto"`` (default): ``"paged"`` when the config's attention implementation is
  ``PAGED_ATTENTION``, else ``"gather"``.

Unsupported use fails loudly at the first call: sliding-window, chunked or linear-attention
layers (constructor), a pool whose shape differs from the config (constructor), K/V whose
shape or dtype differ from the pool (first forward), beam search (first reorder), and a model
whose attention ignored the paged plan (next layer).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from torch_elastic_kv.hf.attention import PAGED_ATTENTION, PagePlan, attach_plan
from torch_elastic_kv.hf.compat import kv_geometry
from torch_elastic_kv.hf.planner import Step, plan_generate_step, plan_packed_step
from torch_elastic_kv.kv.page_table import PageList, PageTable
from torch_elastic_kv.kv.pool import KVPagePool

from .._util import ceil_div

ATTENTION_MODES = ("auto", "gather", "paged")


def _open_only(method):
    """Refuse a call on a closed cache (``close()`` is final; ``release()`` is not)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._closed:
            raise RuntimeError(f"ElasticPagedCache.{method.__name__}: the cache is closed")
        return method(self, *args, **kwargs)

    return wrapper


class _PagedLayer(CacheLayerMixin):
    """Per-layer face of the cache for transformers' bookkeeping; storage is the shared pool."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: ElasticPagedCache, layer_idx: int):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass  # the cache crops all layers at once

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass


class ElasticPagedCache(Cache):
    """A ``transformers.Cache`` storing K/V in pages of an elastic :class:`KVPagePool`.

    Args:
        config: the model config (its text config is used).
        pool: a pool to draw pages from; by default one is created at the first forward with the
            K/V dtype and device (sized by ``max_bytes``) and owned by this cache.
        max_bytes: budget of the pool this cache creates (ignored with ``pool``).
        page_tokens: tokens per page of the pool this cache creates (a given pool's wins).
        attention: ``"auto"``, ``"gather"`` or ``"paged"`` (module docstring).
        layout: layout of the pool this cache creates.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        pool: KVPagePool | None = None,
        max_bytes: int | None = None,
        page_tokens: int = 16,
        attention: str = "auto",
        layout: str = "page-major",
    ):
        self._closed = False
        text = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        if isinstance(layer_kwargs, dict):  # up to 5.23: one dict of kwargs for every layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        bad = [(i, t, kw) for i, (t, kw) in enumerate(zip(layer_types, layer_kwargs)) if t != "full_attention"]
        if bad:
            i, t, kw = bad[0]
            raise ValueError(
                f"ElasticPagedCache supports full-attention layers only; layer {i} is {t!r}"
                f"{' ' + str(kw) if kw else ''} ({len(bad)} such layers). Disable the sliding window "
                f"(sliding_window=None / use_sliding_window=False) or use DynamicCache."
            )
        if attention not in ATTENTION_MODES:
            raise ValueError(f"ElasticPagedCache: attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.config = config
        self.num_layers = len(layer_types)
        _, self.num_kv_heads, self.head_dim = kv_geometry(config)
        if pool is not None:
            expect = (self.num_layers, self.num_kv_heads, self.head_dim)
            have = (pool.num_layers, pool.num_kv_heads, pool.head_dim)
            if expect != have:
                raise ValueError(
                    f"ElasticPagedCache: pool shape (layers, kv_heads, head_dim)={have} does not match the "
                    f"config's {expect}"
                )
            page_tokens = pool.page_tokens
        if not isinstance(page_tokens, int) or page_tokens <= 0:
            raise ValueError(f"ElasticPagedCache: page_tokens must be a positive int, got {page_tokens!r}")
        self.pool = pool
        self._owns_pool = pool is None
        # Compaction may move pages between any two calls (packed mode allocates before the
        # first forward), so a given pool reports moves to this cache from the start.
        self._listening = pool is not None
        if pool is not None:
            pool.add_move_listener(self._on_move)
        self._max_bytes, self._layout = max_bytes, layout
        self.page_tokens = page_tokens
        self.attention = attention
        self._rows: list[PageList] = []  # generate mode: one per batch row
        self._table = PageTable(page_tokens, pool)  # packed mode: one per request
        self._step: Step | None = None
        self._packed: Step | None = None  # set by set_packed_batch, consumed by a forward
        self._last_plan: PagePlan | None = None
        self._mode_checked = False
        self._warned_fallback = False
        super().__init__(layers=[_PagedLayer(self, i) for i in range(self.num_layers)])

    # -- pool --------------------------------------------------------------------------------
    def _ensure_pool(self, dtype: torch.dtype, device: torch.device) -> KVPagePool:
        if self.pool is None:
            self.pool = KVPagePool(
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                dtype,
                device,
                page_tokens=self.page_tokens,
                max_bytes=self._max_bytes,
                layout=self._layout,
            )
            self._table.pool = self.pool
            self.pool.add_move_listener(self._on_move)
            self._listening = True
        return self._require_pool()

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> KVPagePool:
        pool = self._ensure_pool(key_states.dtype, key_states.device)
        shape = (key_states.shape[1], key_states.shape[3])
        if shape != (pool.num_kv_heads, pool.head_dim) or value_states.shape != key_states.shape:
            raise ValueError(
                f"ElasticPagedCache: K/V of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} do not "
                f"match the pool's (kv_heads, head_dim)=({pool.num_kv_heads}, {pool.head_dim})"
            )
        if key_states.dtype != pool.dtype or key_states.device != pool.device:
            raise ValueError(
                f"ElasticPagedCache: K/V are {key_states.dtype} on {key_states.device}, the pool holds "
                f"{pool.dtype} on {pool.device}"
            )
        return pool

    def _on_move(self, moves: dict[int, int]) -> None:
        for row in self._rows:
            row.pages = [moves.get(p, p) for p in row.pages]
        self._table.remap(moves)
        if self._step is not None and self._step is not self._packed:
            self._step = None  # generate mode: replanned at the next layer 0
        if self._packed is not None:  # a batch set but not yet run: re-index its pages
            self._packed = self._build_packed_step(self.pool, self._packed_entries)
            self._step = None

    @property
    def page_table(self) -> PageTable:
        """The packed mode's ``PageTable``: which pages each request holds (read it, don't copy it)."""
        return self._table

    @property
    def uses_paged_attention(self) -> bool:
        if self.attention == "auto":
            return getattr(self.config, "_attn_implementation", None) == PAGED_ATTENTION
        return self.attention == "paged"

    def _check_attention_mode(self) -> None:
        if self.attention == "paged" and getattr(self.config, "_attn_implementation", None) != PAGED_ATTENTION:
            raise ValueError(
                f"ElasticPagedCache(attention='paged') needs the model to use the paged attention: call "
                f"torch_elastic_kv.hf.attention.enable_paged_attention(model) (config attention is "
                f"{getattr(self.config, '_attn_implementation', None)!r}), or use attention='gather'"
            )

    # -- transformers Cache API --------------------------------------------------------------
    @_open_only
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **extra
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V of ``layer_idx``; return what the model's attention reads."""
        stale, self._last_plan = self._last_plan, None
        # The previous layer's attention ran without reading its plan: a wrong attention
        # implementation. A plan left over from an interrupted forward (not the layer just
        # before this one) is simply dropped, so the cache stays usable.
        if stale is not None and not stale.used and layer_idx == (stale.layer + 1) % self.num_layers:
            raise RuntimeError(
                "ElasticPagedCache: the model's attention did not read the paged K/V (its attention "
                f"implementation is not {PAGED_ATTENTION!r}); call enable_paged_attention(model) or use "
                "ElasticPagedCache(..., attention='gather')"
            )
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"ElasticPagedCache: layer {layer_idx} out of range [0, {self.num_layers})")
        if layer_idx == 0 or self._step is None:
            pool = self._check_states(key_states, value_states)
            if not self._mode_checked:
                self._check_attention_mode()
                self._mode_checked = True
            self._step = (
                self._packed
                if self._packed is not None
                else self._start_generate_step(pool, key_states.shape[0], key_states.shape[2])
            )
        step = self._step
        pool = self.pool
        k_cache, v_cache = pool.key_cache(layer_idx), pool.value_cache(layer_idx)
        # [batch, kv_heads, q, d] -> [tokens, kv_heads, d] in the step's token order
        k_new = key_states.transpose(1, 2).reshape(-1, *key_states.shape[1::2])
        v_new = value_states.transpose(1, 2).reshape(-1, *value_states.shape[1::2])
        k_cache.index_put_((step.write_pages, step.write_offsets), k_new)
        v_cache.index_put_((step.write_pages, step.write_offsets), v_new)
        if layer_idx == self.num_layers - 1:
            self._finish_step(step)
        if self.uses_paged_attention:
            plan = PagePlan(layer_idx, k_cache, v_cache, step.groups, step.packed_tokens)
            if step.packed_tokens:
                plan.new_key, plan.new_value = k_new, v_new
            self._last_plan = plan
            # The plan rides on the K tensor the model hands its attention function: every 5.x
            # release passes update()'s result straight through, while only some pass their
            # attention kwargs to update().
            return attach_plan(k_cache, plan), v_cache
        return self._gather(k_cache, step), self._gather(v_cache, step)

    def _gather(self, cache: torch.Tensor, step: Step) -> torch.Tensor:
        """K or V of every row as ``[rows, kv_heads, tokens, head_dim]`` (contiguous)."""
        t = self.page_tokens
        if step.read_table is not None:  # whole pages, then trim the last page's tail
            rows, pages = step.read_table.shape
            out = cache.index_select(0, step.read_table.reshape(-1))
            out = out.view(rows, pages * t, *cache.shape[2:])[:, : step.new_len]
            return out.transpose(1, 2).contiguous()
        flat_pages = torch.div(step.read_slots, t, rounding_mode="floor")
        out = cache[flat_pages, step.read_slots - flat_pages * t]  # [rows, tokens, kv_heads, d]
        return out.transpose(1, 2).contiguous()

    @_open_only
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored per row (generate mode); 0 in packed mode (positions come from the batch)."""
        if self._packed is not None or len(self._table):
            return 0
        return self._rows[0].tokens if self._rows else 0

    @_open_only
    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    @_open_only
    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @_open_only
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.release()
        raise ValueError(
            "ElasticPagedCache does not support beam search (num_beams > 1); its pages were "
            "released. Use num_beams=1 or DynamicCache."
        )

    @_open_only
    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._rows and repeats != 1:
            raise ValueError(
                "ElasticPagedCache cannot repeat rows of a filled cache (num_return_sequences > 1 "
                "on a continuation); release() it first"
            )

    @_open_only
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("ElasticPagedCache does not support selecting batch rows (contrastive search)")

    @_open_only
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every row (generate mode)."""
        if tokens_to_remove > 0:
            raise ValueError(f"ElasticPagedCache.crop: pass a negative count, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self._rows:
            return
        new_len = max(self._rows[0].tokens + tokens_to_remove, 0)
        keep = ceil_div(new_len, self.page_tokens)
        for row in self._rows:
            self.pool.free(row.pages[keep:])
            row.pages, row.tokens = row.pages[:keep], new_len

    @_open_only
    def reset(self) -> None:
        """Same as ``release()``."""
        self.release()

    @property
    def is_compileable(self) -> bool:
        return False

    # -- generate mode -----------------------------------------------------------------------
    def _start_generate_step(self, pool: KVPagePool, batch: int, q_len: int) -> Step:
        if len(self._table):
            raise RuntimeError(
                f"ElasticPagedCache: {len(self._table)} packed requests are live; call "
                "set_packed_batch before each forward (or release() the cache)"
            )
        rows = self._rows
        if rows and len(rows) != batch:
            raise ValueError(
                f"ElasticPagedCache: batch of {batch} rows but the cache holds {len(rows)}; "
                "release() it before a new batch"
            )
        old_len = rows[0].tokens if rows else 0
        new_len = old_len + q_len
        have = len(rows[0].pages) if rows else 0
        need = ceil_div(new_len, self.page_tokens) - have
        fresh = pool.alloc(need * batch) if need > 0 else []  # all or nothing: OOM changes nothing
        if not rows:
            rows = self._rows = [PageList() for _ in range(batch)]
        for r, row in enumerate(rows):
            row.pages.extend(fresh[r * need : (r + 1) * need])
        return plan_generate_step(rows, old_len, new_len, self.page_tokens, pool.device, self.uses_paged_attention)

    def _finish_step(self, step: Step) -> None:
        if step.packed_tokens:
            for seq, tokens in step.commit:
                seq.tokens = tokens
            self._packed = None
        else:
            for row in self._rows:
                row.tokens = step.new_len
        self._step = None

    # -- packed mode (continuous batching) ----------------------------------------------------
    @_open_only
    def ensure_capacity(self, request_id: int, total_tokens: int) -> None:
        """Give ``request_id`` (created if new) pages for ``total_tokens`` tokens.

        Raises MemoryError / torch.OutOfMemoryError naming needed and free bytes; nothing changes.
        """
        if self._rows:
            raise RuntimeError("ElasticPagedCache: generate-mode rows are live; release() before packed use")
        self._require_pool()
        self._table.ensure(request_id, total_tokens)

    @_open_only
    def free_request(self, request_id: int) -> None:
        """Return every page of ``request_id`` to the pool."""
        self._table.free(request_id, "free_request")

    @_open_only
    def request_tokens(self, request_id: int) -> int:
        """Tokens of ``request_id`` whose K/V are stored."""
        return self._table.get(request_id, "request_tokens").tokens

    @_open_only
    def request_pages(self, request_id: int) -> list[int]:
        """Page ids of ``request_id`` in token order (a copy)."""
        return list(self._table.get(request_id, "request_pages").pages)

    @_open_only
    def request_ids(self) -> list[int]:
        return self._table.ids()

    @_open_only
    def detach_request(self, request_id: int) -> tuple[list[int], int]:
        """Forget ``request_id`` but keep its pages live; returns ``(pages, tokens)`` (caller owns them)."""
        return self._table.detach(request_id, "detach_request")

    @_open_only
    def attach_request(self, request_id: int, pages: list[int], ntokens: int) -> None:
        """Adopt live ``pages`` holding ``ntokens`` tokens as request ``request_id``."""
        self._require_pool()
        self._table.attach(request_id, pages, ntokens, "attach_request")

    @_open_only
    def set_packed_batch(self, entries: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Describe the next forward: ``(request_id, start_pos, num_tokens)`` in packed token order.

        Returns the extra model kwargs: ``position_ids`` ``[1, T]``, ``attention_mask`` (None with
        the paged attention; a ``[1, 1, T, kv]`` mask for other attention implementations) and
        ``logits_to_keep`` (index of each entry's last token, so logits come out ``[1, len(entries), V]``
        in entry order). The forward writes K/V of those tokens and attends each token causally
        over its own request. ``request_tokens`` advances when the forward completes.
        """
        pool = self._require_pool()
        if not entries:
            raise ValueError("set_packed_batch: no entries")
        seen: set[int] = set()
        for request_id, start, n in entries:
            if request_id not in self._table:
                raise KeyError(f"set_packed_batch: unknown request {request_id}; call ensure_capacity first")
            seq = self._table.get(request_id)
            if request_id in seen:
                raise ValueError(f"set_packed_batch: request {request_id} appears twice")
            seen.add(request_id)
            if n < 1 or not 0 <= start <= seq.tokens:
                raise ValueError(
                    f"set_packed_batch: request {request_id} has {seq.tokens} stored tokens; entry "
                    f"start_pos={start}, num_tokens={n} needs 0 <= start_pos <= stored and num_tokens >= 1"
                )
            if (start + n) > len(seq.pages) * self.page_tokens:
                raise ValueError(
                    f"set_packed_batch: request {request_id} needs {start + n} tokens of pages, has "
                    f"{len(seq.pages) * self.page_tokens}; call ensure_capacity first"
                )
        self._packed = self._build_packed_step(pool, entries)
        self._packed_entries = list(entries)
        self._step = None
        ends = torch.tensor([n for _, _, n in entries]).cumsum(0) - 1
        extra = {"position_ids": self._packed.positions, "attention_mask": None, "logits_to_keep": ends.to(pool.device)}
        if not self.uses_paged_attention:
            extra["attention_mask"] = self._packed.fallback_mask
            if not self._warned_fallback:
                warnings.warn(
                    "ElasticPagedCache packed mode with a stock attention implementation attends "
                    "every token over all sequences' K/V under a block mask (quadratic in the batch); "
                    "call torch_elastic_kv.hf.attention.enable_paged_attention(model) for the paged "
                    "attention",
                    stacklevel=2,
                )
                self._warned_fallback = True
        return extra

    @_open_only
    def clear_packed_batch(self) -> None:
        """Drop a packed batch whose forward did not complete (no-op after a completed forward).

        Tokens of an incomplete forward are not counted as stored; their slots are rewritten
        by the next forward that covers them.
        """
        self._packed = None
        self._step = None
        self._last_plan = None

    def _build_packed_step(self, pool: KVPagePool, entries: list[tuple[int, int, int]]) -> Step:
        lists = [self._table.get(s) for s, _, _ in entries]
        return plan_packed_step(lists, entries, self.page_tokens, pool.device, self.uses_paged_attention)

    # -- lifetime ------------------------------------------------------------------------------
    @_open_only
    def release(self) -> None:
        """Give every page back to the pool; the cache can be used again afterwards."""
        pages = [p for row in self._rows for p in row.pages]
        if pages:
            self.pool.free(pages)
        self._rows = []
        self._table.release_all()
        self._step = self._packed = self._last_plan = None

    def close(self) -> None:
        """Release the pages and, if this cache created its pool, close the pool.

        Final: every later call raises RuntimeError ("... the cache is closed"); closing
        again does nothing. ``release()`` is the call that keeps the cache usable.
        """
        if self._closed:
            return
        self.release()
        self._closed = True
        if self.pool is not None:
            if self._listening:
                self.pool.remove_move_listener(self._on_move)
                self._listening = False
            if self._owns_pool:
                self.pool.close()
                self.pool = self._table.pool = None

    @_open_only
    def stats(self) -> dict:
        """Pool stats plus this cache's sequences and tokens."""
        rows, table = self._rows, self._table
        out = dict(self.pool.stats()) if self.pool is not None else {}
        out.update(
            sequences=len(rows) + len(table),
            tokens=sum(r.tokens for r in rows) + table.stored_tokens,
            pages=sum(len(r.pages) for r in rows) + table.live_pages,
        )
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _require_pool(self) -> KVPagePool:
        if self.pool is None:
            raise RuntimeError("ElasticPagedCache: packed mode needs a pool; pass pool=KVPagePool(...)")
        if not self._listening:  # used again after close()
            self.pool.add_move_listener(self._on_move)
            self._listening = True
        return self.pool
