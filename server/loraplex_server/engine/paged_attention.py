"""Attention for one engine step over packed rows and the paged KV cache.

The model runs on one packed sequence of tokens (rows back to back). `attend` (called by our own
Llama-family forward, and through transformers' AttentionInterface by the Hugging Face path) first
stores the step's new keys and values in the rows' cache blocks. Then rows of similar shape are
attended together, one SDPA call per bucket: each row's queries see only its own context (its
cached tokens plus the new ones, or for a row without cache its own tokens), causally. A bucket pads
its rows only up to its own longest, and buckets are cut so that padding stays a small fraction of
their rows' own work: a short row never pays for a long one. Grouped-query heads are folded into the
query length ([kv_heads, group * tokens, dim]) so keys and values are never repeated per head.
Without step metadata the HF path is transformers' SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loraplex_server.engine.kv_cache import PagedKVCache

ATTENTION = "loraplex_paged"
BUCKET_SLACK = 1.25  # a bucket's padded work is at most this times its rows' own (plus one block)


@dataclass
class RowShape:
    start: int  # the row's query tokens in the packed step: [start, start + tokens)
    tokens: int
    context: torch.Tensor | None  # flat cache positions of its whole context; None: its own new tokens
    run_start: int | None = None  # set when that context is one run of the cache, starting there


@dataclass
class AttentionBucket:
    """Rows attended in one SDPA call, padded to [rows, queries] and [rows, context]."""

    from_cache: bool
    rows: int
    queries: int
    context: int
    kv_index: torch.Tensor | None  # [rows * context] positions in the cache (or the step's tokens)
    kv_run: int | None  # a single row whose context is one run: read as a slice from here, no gather
    q_index: torch.Tensor  # [rows * queries] positions in the step (padding repeats a real one)
    q_run: int | None  # rows back to back in the step, none padded: queries and outputs are one slice
    keep: torch.Tensor | None  # which of the rows * queries outputs are real; None = all
    out_index: torch.Tensor  # step positions of the real outputs
    mask: torch.Tensor | None  # [rows, 1, group * queries, context] bool; None = attend everything
    # Decode rows (one query each, from the cache), for a kernel that reads the cache in place: each row's
    # context positions [rows, context] and their counts [rows].
    decode_index: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None


@dataclass
class StepAttention:
    cache: PagedKVCache | None
    write_index: torch.Tensor | None  # cache positions of tokens [0, len) of the step (rows that keep KV)
    buckets: list[AttentionBucket]


def plan_buckets(rows: list[RowShape], group: int, device: torch.device) -> list[AttentionBucket]:
    """Group rows of similar query and context lengths; built once per step, used by every layer."""
    buckets, current = [], []

    def width(row: RowShape) -> int:
        return row.tokens if row.context is None else int(row.context.shape[0])

    for row in sorted(rows, key=lambda r: (r.context is not None, r.tokens, width(r))):
        if current and not _fits(current, row, width):
            buckets.append(_bucket(current, width, group, device))
            current = []
        current.append(row)
    if current:
        buckets.append(_bucket(current, width, group, device))
    return buckets


def _fits(rows: list[RowShape], row: RowShape, width) -> bool:
    if (rows[0].context is None) != (row.context is None):
        return False
    members = [*rows, row]
    queries, context = max(r.tokens for r in members), max(width(r) for r in members)
    own = sum(r.tokens * width(r) for r in members)
    return len(members) * queries * context <= BUCKET_SLACK * own + 16 * queries * len(members)


def _bucket(rows: list[RowShape], width, group: int, device: torch.device) -> AttentionBucket:
    queries, context = max(r.tokens for r in rows), max(width(r) for r in rows)
    kv, q, keep, mask = [], [], [], torch.zeros(len(rows), queries, context, dtype=torch.bool)
    for i, row in enumerate(rows):
        n, length = row.tokens, width(row)
        source = torch.arange(row.start, row.start + n) if row.context is None else row.context
        kv.append(torch.cat([source, source[:1].expand(context - length)]))
        positions = torch.arange(row.start, row.start + n)
        q.append(torch.cat([positions, positions[:1].expand(queries - n)]))
        keep += [i * queries + j for j in range(n)]
        # Query j is token (length - n + j) of its row: it sees keys 0 .. length - n + j; padding
        # queries see key 0 only (their output is dropped), so no softmax row is empty.
        mask[i, :n, :length] = torch.ones(n, length, dtype=torch.bool).tril(length - n)
        mask[i, n:, 0] = True
    q_index = torch.cat(q)
    needs_mask = bool((~mask).any())
    keep_index = torch.tensor(keep)
    all_real = len(keep) == len(rows) * queries
    first = rows[0].start
    kv_run = rows[0].run_start if len(rows) == 1 else None
    in_place = all_real and torch.equal(q_index, torch.arange(first, first + len(q_index)))
    decode = rows[0].context is not None and queries == 1
    kv_index = torch.stack(kv).to(device)  # [rows, context]; flat for the gather, as it is for a decode kernel
    return AttentionBucket(
        from_cache=rows[0].context is not None, rows=len(rows), queries=queries, context=context,
        kv_index=None if kv_run is not None else kv_index.view(-1), kv_run=kv_run,
        q_index=q_index.to(device), q_run=first if in_place else None,
        keep=None if all_real else keep_index.to(device),
        out_index=(q_index if all_real else q_index[keep_index]).to(device),
        mask=mask.repeat(1, group, 1).unsqueeze(1).to(device) if needs_mask else None,
        decode_index=kv_index if decode else None,
        decode_lengths=torch.tensor([width(r) for r in rows], device=device) if decode else None)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, step: StepAttention, layer: int,
           scaling: float | None, ops=None) -> torch.Tensor:
    """One layer's attention over the step: query [tokens, heads, dim], the step's new (rotated) keys and
    values [tokens, kv_heads, dim] -> [tokens, heads, dim]. Stores the new keys and values in the cache
    first (rows that keep KV), then attends bucket by bucket. With our CPU ops (cpu_ops.py), decode buckets
    read the cache in place."""
    tokens, heads, dim = query.shape
    group = heads // key.shape[1]
    if step.write_index is not None:
        written = step.write_index.shape[0]
        step.cache.keys[layer].index_copy_(0, step.write_index, key[:written])
        step.cache.values[layer].index_copy_(0, step.write_index, value[:written])
    # One bucket over every token in order (a lone decode row, one prompt): its output is the whole output.
    first = step.buckets[0]
    whole = len(step.buckets) == 1 and first.q_run == 0 and first.rows * first.queries == tokens
    out = None if whole else query.new_empty(tokens, heads, dim)
    for b in step.buckets:
        keys, values = (step.cache.keys[layer], step.cache.values[layer]) if b.from_cache else (key, value)
        if b.q_run is not None:
            q = query[b.q_run:b.q_run + b.rows * b.queries]
        else:
            q = query.index_select(0, b.q_index)
        if ops is not None and b.decode_index is not None:
            o = ops.decode_attention(q, keys, values, b.decode_index, b.decode_lengths,
                                     dim ** -0.5 if scaling is None else scaling)
        else:
            o = _sdpa(q, keys, values, b, group, scaling)
        if whole:
            return o
        if b.q_run is not None:
            out[b.q_run:b.q_run + b.rows * b.queries] = o
        else:
            out.index_copy_(0, b.out_index, o if b.keep is None else o.index_select(0, b.keep))
    return out


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, b: AttentionBucket, group: int,
          scaling: float | None) -> torch.Tensor:
    """One bucket through SDPA: its queries [rows * queries, heads, dim] over its context, gathered from keys
    and values [positions, kv_heads, dim] (or sliced, for one row whose context is a run)."""
    _, heads, dim = q.shape
    kv_heads = heads // group
    if b.kv_run is not None:
        k, v = (t[b.kv_run:b.kv_run + b.context].transpose(0, 1).unsqueeze(0) for t in (keys, values))
    else:
        k = keys.index_select(0, b.kv_index).view(b.rows, b.context, kv_heads, dim).transpose(1, 2)
        v = values.index_select(0, b.kv_index).view(b.rows, b.context, kv_heads, dim).transpose(1, 2)
    q = q.reshape(b.rows, b.queries, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b.rows, kv_heads, group * b.queries, dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, scale=scaling)
    return o.view(b.rows, kv_heads, group, b.queries, dim).permute(0, 3, 1, 2, 4).reshape(-1, heads, dim)


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    step: StepAttention | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The Hugging Face attention interface ([1, heads, tokens, dim] tensors) over `attend`."""
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = attend(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), step,
                 module.layer_idx, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, paged_attention)
