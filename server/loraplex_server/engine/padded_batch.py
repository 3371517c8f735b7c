"""Rows of different lengths as one padded [rows, length] batch: the encoder (BERT) path."""

from __future__ import annotations

import torch


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
