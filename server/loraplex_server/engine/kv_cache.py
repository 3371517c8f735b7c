"""The KV cache: allocated once from a byte budget, in fixed-size blocks (vLLM's PagedAttention idea).

Every attention layer has one key and one value tensor of [blocks * block_size, kv_heads, head_dim].
A row owns a list of blocks (its block table); token t of the row lives at
`table[t // block_size] * block_size + t % block_size`. A row joins or leaves by taking or returning
its own blocks: nothing else is copied, and no row ever sees another row's tokens or any padding.
"""

from __future__ import annotations

import heapq
import math

import torch

BLOCK_SIZE = 16


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

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend a block table to hold `tokens`; False (and nothing taken) when the blocks are not free."""
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            return False
        if need <= 0:
            return True
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
        if table:
            self._unclaim(table[-1] + 1)
        self._free.update(table)
        if len(self._heap) + len(table) > 2 * self.num_blocks:  # drop the stale entries now and then
            self._heap = sorted(self._free)
        else:
            for block in table:
                heapq.heappush(self._heap, block)
        table.clear()

    def contiguous(self, table: list[int], tokens: int) -> bool:
        """The row's first `tokens` tokens sit in consecutive blocks (one slice of the cache)."""
        used = self.blocks_for(tokens)
        return used == 0 or table[:used] == list(range(table[0], table[0] + used))

    def slot_index(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache positions of tokens [start, end) of a row (on the host: the step batches the copy)."""
        tokens = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[tokens // self.block_size]
        return blocks * self.block_size + tokens % self.block_size
