"""The running batch's key/value cache: rows of different lengths, left-padded to one length.

Rows join (merge) and leave (select) between decode steps. Padding columns are masked out and,
once every row has padding in the same leading columns, cut away (trim).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import DynamicCache


def pad_rows(token_ids: list[list[int]], pad_id: int, device: torch.device, left: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one [B, L] id tensor and its mask (1 = real token)."""
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("empty input")
    length = max(len(ids) for ids in token_ids)
    ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        cols = slice(length - len(seq), length) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position in its own row, whatever padding precedes it."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class BatchKVCache:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [B, L] long, 1 = a real token

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def _left_pad(self, columns: int) -> None:
        if columns <= 0:
            return
        for layer in self._layers():
            layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
            layer.values = F.pad(layer.values, (0, 0, columns, 0))
        self.mask = F.pad(self.mask, (columns, 0))

    def merge(self, other: BatchKVCache) -> None:
        """Append other's rows after ours."""
        length = max(self.length, other.length)
        self._left_pad(length - self.length)
        other._left_pad(length - other.length)
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def trim(self) -> None:
        if self.rows == 0:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first == 0:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.mask = self.mask[:, first:]

    def extend_mask(self) -> torch.Tensor:
        """The attention mask for one more token per row (what the next decode step attends to)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask
