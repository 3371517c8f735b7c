"""The paged KV cache's block bookkeeping, under random traffic (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from loraplex_server.engine.kv_cache import PagedKVCache, bytes_per_token

CONFIG = LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
BLOCKS = 12


def cache(blocks: int = BLOCKS) -> PagedKVCache:
    return PagedKVCache(CONFIG, torch.float32, torch.device("cpu"), blocks * 4 * bytes_per_token(CONFIG, torch.float32),
                        block_size=4)


# (row, new length) grows a row to that many tokens; (row, None) releases it.
operations = st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(1, 40))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_blocks_are_never_shared_lost_or_taken_on_failure(ops):
    kv, tables, ever_used = cache(), {}, 0
    for row, tokens in ops:
        table = tables.setdefault(row, [])
        if tokens is None:
            kv.release(table)
            continue
        before = list(table)
        grown = kv.grow(table, tokens)
        needed = -(-tokens // kv.block_size)
        if grown:
            assert len(table) == max(needed, len(before)) and table[:len(before)] == before
        else:
            assert table == before and needed - len(before) > kv.free_blocks
        owned = [b for t in tables.values() for b in t]
        ever_used = max(ever_used, max(owned, default=-1) + 1)
        assert kv.touched_blocks == ever_used, "touched_blocks is the highest block ever handed out, plus one"
        assert len(owned) == len(set(owned)), "a block belongs to two rows"
        assert len(owned) + kv.free_blocks == BLOCKS, "a block was lost"
        for t in tables.values():
            tokens_held = len(t) * kv.block_size
            assert kv.contiguous(t, tokens_held) == (t == list(range(t[0], t[0] + len(t))) if t else True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=5), st.data())
def test_slot_index_maps_each_token_into_its_own_block(lengths, data):
    kv, tables = cache(64), []
    for length in lengths:
        table = []
        assert kv.grow(table, length)
        tables.append((table, length))
    seen = set()
    for table, length in tables:
        start = data.draw(st.integers(0, length - 1))
        index = kv.slot_index(table, start, length).tolist()
        assert index == [table[t // 4] * 4 + t % 4 for t in range(start, length)]
        full = set(kv.slot_index(table, 0, length).tolist())
        assert not full & seen
        seen |= full


def test_a_new_row_gets_one_run_and_growing_rows_keep_theirs():
    kv = cache(16)
    short = [[] for _ in range(3)]
    for table in short:
        assert kv.grow(table, 4)  # one block each: 0, 1, 2
    long = []
    assert kv.grow(long, 20)  # five blocks in a run, past the others' next blocks
    assert kv.contiguous(long, 20)
    for table in short:  # each takes a block of its own, never the long row's next one
        assert kv.grow(table, 8)
    assert kv.grow(long, 24)
    assert kv.contiguous(long, 24)


def test_a_budget_below_one_block_is_refused():
    with pytest.raises(ValueError, match="kv-cache-memory"):
        PagedKVCache(CONFIG, torch.float32, torch.device("cpu"), 10, block_size=4)


def test_rows_that_come_and_go_reuse_the_lowest_blocks():
    """Steady traffic keeps writing the same low blocks, so the resident part of a lazily allocated host
    cache stops growing: a join after a leave takes the blocks the leaver freed."""
    kv = cache()
    tables = [[] for _ in range(3)]
    for table in tables:
        assert kv.grow(table, 8)
    high = kv.touched_blocks
    for _ in range(20):
        for table in tables:
            kv.release(table)
            assert kv.grow(table, 8)
    assert kv.touched_blocks == high == 6
