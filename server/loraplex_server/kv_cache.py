"""The KV cache: allocated once from a byte budget, in fixed-size blocks (vLLM's PagedAttention idea).

Every attention layer has one key and one value tensor of [blocks * block_size, kv_heads, head_dim].
A row owns a list of blocks (its block table); token t of the row lives at
`table[t // block_size] * block_size + t % block_size`. A row joins or leaves by taking or returning
its own blocks: nothing else is copied, and no row ever sees another row's tokens or any padding.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZE = 16


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
            raise ValueError(f"a KV cache of {memory_bytes} bytes holds no block of {block_size} tokens; "
                             "raise --kv-cache-memory")
        slots = self.num_blocks * block_size
        # Uninitialized: only written positions are ever read, and on the host untouched pages cost no RSS.
        self.keys = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.device = device

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
        for _ in range(max(need, 0)):
            table.append(self._free.pop())
        return True

    def release(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()

    def slot_index(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache positions of tokens [start, end) of a row (on the host: the step batches the copy)."""
        tokens = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[tokens // self.block_size]
        return blocks * self.block_size + tokens % self.block_size
