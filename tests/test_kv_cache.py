"""The paged KV cache's block bookkeeping, under random traffic (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from loraplex_server.engine.kv_cache import PagedKVCache, block_hash, bytes_per_token

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


# Prefix caching: rows of a few adapters whose tokens share prefixes, growing, registering their full
# blocks and leaving at random.
prefix_operations = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 3),
                                       st.one_of(st.none(), st.integers(1, 24))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(prefix_operations)
def test_shared_prefix_blocks_are_refcounted_found_only_by_their_adapter_and_never_lost(ops):
    kv, rows = cache(), {}  # row -> (table, identity, tokens, keys of its registered blocks)
    for row, adapter, prefix, tokens in ops:
        if row in rows and tokens is None:
            kv.release(rows.pop(row)[0])
        elif row not in rows and tokens is not None:
            identity, ids = f"a{adapter}", [prefix] * 8 + list(range(100 * row, 100 * row + 16))
            keys, parent = [], b""
            for start in range(0, len(ids) - 4 + 1, 4):
                parent = block_hash(parent, ids[start:start + 4], identity)
                keys.append(parent)
            table = kv.match(keys[:(tokens - 1) // 4])
            for found, key in zip(table, keys, strict=False):
                assert kv._key_of[found] == (key, identity), "found a block of other tokens or another adapter"
            if kv.grow(table, max(tokens, len(table) * 4)):
                for index in range(len(table), tokens // 4):
                    kv.register(table[index], keys[index], identity)
                rows[row] = (table, identity, ids, keys)
            else:
                kv.release(table)
        owned = [b for t, *_ in rows.values() for b in t]
        assert all(kv._refs[b] == owned.count(b) for b in set(owned)), "a shared block's count is wrong"
        assert len(set(owned)) + kv.free_blocks == BLOCKS, "a block was lost"
        assert not set(owned) & (kv._free | set(kv._reusable)), "a block in use is also free"
    for table, *_ in rows.values():
        kv.release(table)
    assert kv.free_blocks == BLOCKS


def test_freed_blocks_stay_findable_until_their_room_is_needed_least_recently_freed_first():
    kv = cache(4)
    keys = [block_hash(b"", [i] * 4, "a") for i in range(4)]
    first, second = [], []
    assert kv.grow(first, 4) and kv.grow(second, 4)
    kv.register(first[0], keys[0], "a")
    kv.register(second[0], keys[1], "a")
    kv.release(first)
    kv.release(second)
    assert kv.free_blocks == 4 and kv.match([keys[0]]) != []  # still there, and shared again
    taker = []
    assert kv.grow(taker, 12)  # needs three blocks: the two never used and the least recently freed
    assert kv.match([keys[1]]) == [] and kv._hashed.get(keys[0]) is not None
    kv.forget("a")  # the adapter was deleted: nobody finds its blocks any more
    assert kv.match([keys[0]]) == []
