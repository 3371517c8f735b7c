"""The KV cache: allocated once from a byte budget, in fixed-size blocks (vLLM's PagedAttention idea),
with prefix caching keyed by adapter.

Every attention layer has one key and one value tensor of [blocks * block_size, kv_heads, head_dim].
A row holds a list of blocks (its block table); token t of the row lives at
`table[t // block_size] * block_size + t % block_size`. A row joins or leaves by taking or returning
its blocks: nothing else is copied, and no row ever sees another row's tokens or any padding.

Prefix caching (vLLM's automatic prefix caching): once a row has computed a full block, the block is
registered under a hash chained over every token up to and including that block and the identity of
the adapter that computed it (`block_hash`), so only a row with the same adapter and the same tokens so
far can find it. A new row starts from the longest run of its leading blocks found here, shared
(refcounted, never written again), and computes only the rest. A released block keeps its hash and
stays findable, least recently released first to be reused, until its room is needed; `forget` drops
an adapter's blocks (the adapter was deleted). Hashes are SHA-256, so nobody can craft a prompt whose
blocks collide with another's.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

BLOCK_SIZE = 16


def block_hash(parent: bytes, tokens: Sequence[int], identity: str) -> bytes:
    """The key of a full block: its tokens, everything before it (through `parent`, the previous
    block's key) and the adapter that computed it."""
    digest = hashlib.sha256(parent)
    digest.update(identity.encode())
    digest.update(b"\0")
    digest.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return digest.digest()


class KVCacheTooSmall(ValueError):
    """The KV cache budget holds not even one block."""


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a causal LM config (Llama/Qwen/Mistral/GPT-2 families)."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return int(layers), int(kv_heads), int(head_dim)


def bytes_per_token(config, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    def __init__(self, config, dtype: torch.dtype, device: torch.device, memory_bytes: int,
                 block_size: int = BLOCK_SIZE) -> None:
        layers, kv_heads, head_dim = kv_shape(config)
        self.block_size = block_size
        self.num_blocks = memory_bytes // (bytes_per_token(config, dtype) * block_size)
        if self.num_blocks < 1:
            raise KVCacheTooSmall(f"a KV cache of {memory_bytes} bytes holds no block of {block_size} tokens "
                                  f"({block_size * bytes_per_token(config, dtype)} bytes); raise --kv-cache-memory")
        slots = self.num_blocks * block_size
        # Uninitialized: only written positions are ever read, and on the host untouched pages cost no RSS.
        self.keys = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        # Free blocks as a set plus a min-heap (lazily cleaned): a row takes the block right after its last
        # one when free, else the lowest free one, so rows tend to own runs of blocks that attention can
        # read as one slice instead of gathering them.
        self._free = set(range(self.num_blocks))
        self._heap = list(range(self.num_blocks))
        self._claimed: dict[int, int] = {}  # the block after a row's last one -> how many rows claim it
        self.block_bytes = bytes_per_token(config, dtype) * block_size
        # Blocks below this were handed out at least once: on the host, the part of the cache that is resident.
        self.touched_blocks = 0
        self._refs = [0] * self.num_blocks  # rows holding each block
        self._hashed: dict[bytes, int] = {}  # a full block's key -> the block that holds it
        self._key_of: dict[int, tuple[bytes, str]] = {}  # block -> its key and adapter identity
        self._by_identity: dict[str, set[int]] = {}  # adapter identity -> its hashed blocks
        self._reusable: OrderedDict[int, None] = OrderedDict()  # free hashed blocks, least recently freed first
        self.hit_tokens = 0  # tokens found here instead of computed (counters for metrics and benchmarks)
        self.queried_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks a row may take: never used, or free and only kept for their cached tokens."""
        return len(self._free) + len(self._reusable)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend a block table to hold `tokens`; False (and nothing taken) when the blocks are not free."""
        need = self.blocks_for(tokens) - len(table)
        if need > self.free_blocks:
            return False
        if need <= 0:
            return True
        while need > len(self._free):  # reuse the least recently freed cached blocks
            block, _ = self._reusable.popitem(last=False)
            self._unhash(block)
            self._free.add(block)
            heapq.heappush(self._heap, block)
        if table:
            self._unclaim(table[-1] + 1)
        had = len(table)
        if not table and need > 1:
            table += self._run(need)
            need = 0
        for _ in range(need):
            block = table[-1] + 1 if table and table[-1] + 1 in self._free else self._lowest_free()
            self._free.remove(block)
            table.append(block)
        for block in table[had:]:
            self._refs[block] = 1
        self.touched_blocks = max(self.touched_blocks, max(table[had:]) + 1)
        self._claimed[table[-1] + 1] = self._claimed.get(table[-1] + 1, 0) + 1
        return True

    def _unclaim(self, block: int) -> None:
        if self._claimed.get(block, 0) > 1:
            self._claimed[block] -= 1
        else:
            self._claimed.pop(block, None)

    def _run(self, count: int) -> list[int]:
        """`count` free blocks for a new row: the first run of consecutive ones if there is one, else
        the lowest free blocks."""
        ordered = sorted(self._free)
        start = 0
        for i in range(1, len(ordered) + 1):
            if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
                if i - start >= count:
                    chosen = ordered[start:start + count]
                    break
                start = i
        else:
            chosen = ordered[:count]
        self._free.difference_update(chosen)
        return chosen

    def _lowest_free(self) -> int:
        """The lowest free block that is not the next one of another row (so that row stays one run),
        or the lowest free one when only such blocks are left."""
        skipped, block = [], None
        while self._heap:
            candidate = heapq.heappop(self._heap)
            if candidate not in self._free:
                continue
            if candidate in self._claimed:
                skipped.append(candidate)
                continue
            block = candidate
            break
        for other in skipped:
            heapq.heappush(self._heap, other)
        return block if block is not None else min(skipped)

    def release(self, table: list[int]) -> None:
        """A row gives its blocks back: shared ones stay with their other rows; hashed ones stay findable
        (its last blocks, the least likely to be shared, first in line to be reused)."""
        if table:
            self._unclaim(table[-1] + 1)
        freed = []
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._reusable[block] = None
            else:
                freed.append(block)
        self._free.update(freed)
        if len(self._heap) + len(freed) > 2 * self.num_blocks:  # drop the stale entries now and then
            self._heap = sorted(self._free)
        else:
            for block in freed:
                heapq.heappush(self._heap, block)
        table.clear()

    def fork(self, table: list[int], tokens: int) -> list[int] | None:
        """A block table for another row continuing after the first `tokens` tokens of `table` (choices of
        one prompt): its full blocks are shared (refcounted, never written again), and a partly filled
        last block is copied into a fresh block, which the new row alone writes on (copy-on-write, done
        at once). None, with nothing taken, when no block is free for that copy."""
        full = tokens // self.block_size
        child = list(table[:full])
        for block in child:
            self._refs[block] += 1
        if tokens % self.block_size:
            if not self.grow(child, tokens):
                for block in child:
                    self._refs[block] -= 1
                return None
            source, target = table[full] * self.block_size, child[full] * self.block_size
            for cache in (*self.keys, *self.values):
                cache[target:target + self.block_size].copy_(cache[source:source + self.block_size])
        elif child:  # as grow does: the block after its last one is the row's to take next
            self._claimed[child[-1] + 1] = self._claimed.get(child[-1] + 1, 0) + 1
        return child

    # -- prefix caching -----------------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest run of these leading block keys, now shared by the caller
        (release them with its table)."""
        blocks = []
        for key in keys:
            block = self._hashed.get(key)
            if block is None:
                break
            if not self._refs[block]:
                del self._reusable[block]
            self._refs[block] += 1
            blocks.append(block)
        if blocks:  # as grow does: the block after its last one is the row's to take next
            self._claimed[blocks[-1] + 1] = self._claimed.get(blocks[-1] + 1, 0) + 1
        self.queried_tokens += len(keys) * self.block_size
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def register(self, block: int, key: bytes, identity: str) -> None:
        """A row has computed this full block: rows with the same adapter and tokens may now find it.
        A key already held by another block stays with that one."""
        if key in self._hashed or block in self._key_of:
            return
        self._hashed[key] = block
        self._key_of[block] = (key, identity)
        self._by_identity.setdefault(identity, set()).add(block)

    def forget(self, identity: str) -> None:
        """Nobody may find this adapter's blocks any more (it was deleted); free ones become plain free."""
        for block in self._by_identity.pop(identity, ()):
            key, _ = self._key_of.pop(block)
            del self._hashed[key]
            if block in self._reusable:
                del self._reusable[block]
                self._free.add(block)
                heapq.heappush(self._heap, block)

    def _unhash(self, block: int) -> None:
        key, identity = self._key_of.pop(block)
        del self._hashed[key]
        blocks = self._by_identity[identity]
        blocks.discard(block)
        if not blocks:
            del self._by_identity[identity]

    def contiguous(self, table: list[int], tokens: int) -> bool:
        """The row's first `tokens` tokens sit in consecutive blocks (one slice of the cache)."""
        used = self.blocks_for(tokens)
        return used == 0 or table[:used] == list(range(table[0], table[0] + used))

    def slot_index(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache positions of tokens [start, end) of a row (on the host: the step batches the copy)."""
        tokens = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[tokens // self.block_size]
        return blocks * self.block_size + tokens % self.block_size
