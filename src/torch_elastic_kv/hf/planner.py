"""Step planning: turn page tables into the index tensors one forward needs.

The cache calls these once per forward (at its first layer, or in ``set_packed_batch``); every
layer then writes its new K/V and reads through the same ``Step``. Generate mode plans rows of
equal length; packed mode plans a continuous batch of requests at different positions,
grouping decode rows so that padding stays small, and, for attention implementations other
than the paged one, a block-causal mask over every request's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torch_elastic_kv.hf.attention import PageGroup
from torch_elastic_kv.kv.page_table import PageList

__all__ = ["Step", "plan_generate_step", "plan_packed_step"]


@dataclass
class Step:
    """Everything one forward needs, computed once at its first layer."""

    write_pages: torch.Tensor  # [tokens] page of each new token (packed or row-major order)
    write_offsets: torch.Tensor  # [tokens] slot within that page
    groups: list[PageGroup]
    packed_tokens: int  # 0 in generate mode
    new_len: int = 0  # generate mode: tokens per row after this step
    read_table: torch.Tensor | None = None  # gather path, generate mode: [rows, pages]
    read_slots: torch.Tensor | None = None  # gather path, packed mode: [1, kv] flat slots
    commit: list[tuple[PageList, int]] = field(default_factory=list)  # packed: (seq, tokens after)
    fallback_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # packed: [1, tokens] position of each token


def plan_generate_step(
    rows: list[PageList], old_len: int, new_len: int, page_tokens: int, dev: torch.device, paged: bool
) -> Step:
    """Index tensors of one generate-mode forward: every row writes ``old_len..new_len`` and reads
    ``0..new_len`` of its own pages (already allocated)."""
    t = page_tokens
    batch = len(rows)
    table = torch.tensor([row.pages for row in rows], dtype=torch.long, device=dev)  # [rows, P]
    pos = torch.arange(old_len, new_len, device=dev)
    write_pages = table[:, torch.div(pos, t, rounding_mode="floor")].reshape(-1)
    write_offsets = (pos % t).repeat(batch)
    step = Step(write_pages, write_offsets, [], 0, new_len=new_len)
    if paged:
        step.groups = [PageGroup(table, torch.full((batch,), new_len, device=dev), pos.unsqueeze(0).expand(batch, -1))]
    else:
        step.read_table = table
    return step


def plan_packed_step(
    seqs: list[PageList], entries: list[tuple[int, int, int]], page_tokens: int, dev: torch.device, paged: bool
) -> Step:
    """Index tensors of one packed forward, built with a handful of tensor ops (no per-token loop).

    ``seqs[i]`` holds the pages of ``entries[i] = (request_id, start_pos, num_tokens)``.
    """
    t = page_tokens
    starts = torch.tensor([st for _, st, _ in entries], dtype=torch.long)
    counts = torch.tensor([n for _, _, n in entries], dtype=torch.long)
    ends = starts + counts
    used = (-(-ends // t)).tolist()  # pages each sequence reads after the write
    p_max = max(used)
    # Page table padded with each row's own first page: always mapped, and masked out.
    table = torch.tensor([q.pages[:k] + [q.pages[0]] * (p_max - k) for q, k in zip(seqs, used)], dtype=torch.long)
    # entry of each token (a list comprehension: torch's repeat_interleave goes parallel and
    # stalls for milliseconds when the cores are busy)
    row = torch.tensor([i for i, (_, _, n) in enumerate(entries) for _ in range(n)], dtype=torch.long)
    first = counts.cumsum(0) - counts  # first token of each entry
    pos = torch.arange(int(counts.sum())) - first[row] + starts[row]
    step = Step((table[row, pos // t]).to(dev), (pos % t).to(dev), [], int(counts.sum()))
    step.positions = pos.view(1, -1).to(dev)
    step.commit = [(q, e) for q, e in zip(seqs, ends.tolist())]
    if paged:
        step.groups = _packed_groups(table, entries, used, first.tolist(), dev)
    else:
        step.read_slots, step.fallback_mask = _fallback_reads(seqs, entries, t, dev)
    return step


# Decode rows padded to a group's longest page table cost a page gather and the attention
# over it; a separate group costs a few calls per layer. A row joins the group while the
# group's padding stays under this many pages plus this share of its useful pages, and
# while the group has fewer than _GROUP_ROWS rows: a small group's gathered K/V is still
# in cache when the attention reads it (decode attention is bound by memory traffic, so
# groups of 8 beat one large group; figures in benchmarks/RESULTS.md, "Figures that were in
# code comments").
_PAD_PAGES, _PAD_SHARE, _GROUP_ROWS = 16, 0.25, 8


def _packed_groups(
    table: torch.Tensor, entries: list[tuple[int, int, int]], used: list[int], first: list[int], dev: torch.device
) -> list[PageGroup]:
    """Attention groups of a packed step, each with little padding.

    Decode tokens: rows bucketed by page count (longest first), one batched call per bucket.
    Prefill chunks: one call each over a contiguous query slice; a chunk starting at position
    0 attends over its own new K/V (causal), a later chunk over its sequence's pages.
    """
    groups: list[PageGroup] = []
    decode = sorted((i for i, e in enumerate(entries) if e[2] == 1), key=lambda i: -used[i])
    bucket: list[int] = []
    p_max = total = 0
    for i in decode:
        p = used[i]
        if bucket and (
            len(bucket) == _GROUP_ROWS
            or p_max * (len(bucket) + 1) - (total + p) > _PAD_PAGES + _PAD_SHARE * (total + p)
        ):
            groups.append(_decode_group(table, entries, bucket, p_max, first, dev))
            bucket, total = [], 0
        if not bucket:
            p_max = p
        bucket.append(i)
        total += p
    if bucket:
        groups.append(_decode_group(table, entries, bucket, p_max, first, dev))
    for i, (_, start, n) in enumerate(entries):
        if n == 1:
            continue
        a = first[i]
        if start == 0:
            groups.append(PageGroup(table[:0], table[:0, 0], table[:0], q_slice=(a, a + n), fresh=True))
            continue
        groups.append(
            PageGroup(
                table[i : i + 1, : used[i]].to(dev),
                torch.tensor([start + n], device=dev),
                torch.arange(start, start + n, device=dev).view(1, -1),
                q_slice=(a, a + n),
            )
        )
    return groups


def _decode_group(
    table: torch.Tensor, entries, rows: list[int], p_max: int, first: list[int], dev: torch.device
) -> PageGroup:
    idx = torch.tensor(rows, dtype=torch.long)
    starts = torch.tensor([entries[i][1] for i in rows], dtype=torch.long)
    q_index = torch.tensor([first[i] for i in rows], dtype=torch.long)
    return PageGroup(
        table[idx, :p_max].to(dev), (starts + 1).to(dev), starts.view(-1, 1).to(dev), q_index.view(-1, 1).to(dev)
    )


def _fallback_reads(
    seqs: list[PageList], entries: list[tuple[int, int, int]], t: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For non-paged attention: all sequences' K/V side by side and a block-causal mask."""
    slots, owner_kv, pos_kv = [], [], []
    for i, (seq, (_, start, n)) in enumerate(zip(seqs, entries)):
        for pos in range(start + n):
            slots.append(seq.pages[pos // t] * t + pos % t)
            owner_kv.append(i)
            pos_kv.append(pos)
    owner_q = torch.cat([torch.full((n,), i) for i, (_, _, n) in enumerate(entries)])
    pos_q = torch.cat([torch.arange(s, s + n) for _, s, n in entries])
    owner_kv, pos_kv = torch.tensor(owner_kv), torch.tensor(pos_kv)
    mask = (owner_q[:, None] == owner_kv[None, :]) & (pos_kv[None, :] <= pos_q[:, None])
    return torch.tensor([slots], dtype=torch.long, device=dev), mask.view(1, 1, *mask.shape).to(dev)
