"""Batched multi-adapter LoRA on top of frozen base layers (the BGMV idea of Punica / S-LoRA).

Every adapted layer keeps stacked tables `A[S, R, in]` and `B[S, out, R]` (scaling folded into B,
smaller ranks zero-padded, slot 0 all zeros = no adapter). One `BatchState` is shared by all layers:
the engine sets each row's slot once per forward, and the per-batch work (which path to take, the
row slots on the right device) is done once there instead of in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BatchState:
    """What the current forward pass needs to know about adapters; set by the engine per forward."""

    row_slots: torch.Tensor | None = None  # [B] long, on the model device
    single_slot: int | None = None  # every row uses this one (non-zero) slot
    composition: int = 0  # bumps whenever row_slots change, so layers can reuse gathered weights
    _slots: tuple[int, ...] = ()

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        if tuple(slots) == self._slots:
            return
        self._slots = tuple(slots)
        distinct = set(slots)
        if distinct == {0}:
            self.row_slots, self.single_slot = None, None
        elif len(distinct) == 1:
            self.row_slots, self.single_slot = None, slots[0]
        else:
            self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
            self.single_slot = None
        self.composition += 1

    def invalidate(self) -> None:
        """Slot contents changed: gathered copies must be rebuilt even for the same rows."""
        self._slots = ()
        self.composition += 1


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like base layer, or None if it is not one."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


class BatchedLoraLinear(nn.Module):
    """A frozen base layer plus each row's own adapter delta, all rows in one pass."""

    def __init__(self, base: nn.Module, state: BatchState, num_slots: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(f"{type(base).__name__} is not a linear layer")
        self.base_layer = base
        self.in_features, self.out_features = shape
        self.state = state
        self.register_buffer("lora_A", torch.zeros(num_slots, 0, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(num_slots, self.out_features, 0, dtype=dtype, device=device),
                             persistent=False)
        self.slot_ranks = [0] * num_slots
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def max_rank(self) -> int:
        return int(self.lora_A.shape[1])

    def _grow_rank(self, rank: int) -> None:
        pad = rank - self.max_rank
        self.lora_A = torch.nn.functional.pad(self.lora_A, (0, 0, 0, pad))
        self.lora_B = torch.nn.functional.pad(self.lora_B, (0, pad))

    def write_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Put an adapter's matrices into a slot (None clears it)."""
        if A is None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.slot_ranks[slot] = 0
            return
        rank = int(A.shape[0])
        if rank > self.max_rank:
            self._grow_rank(rank)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank].copy_(A)
        self.lora_B[slot, :, :rank].copy_(B.to(torch.float32) * scaling)
        self.slot_ranks[slot] = rank
        self._gathered = None

    def _gather(self, row_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row A^T [B, in, r] and B^T [B, r, out], cut to the batch's max rank; reused while
        the batch composition is unchanged (decode steps of the same rows)."""
        key = self.state.composition
        if self._gathered is None or self._gathered[0] != key:
            rank = max(self.slot_ranks[s] for s in row_slots.tolist())
            a_t = self.lora_A[:, :rank].index_select(0, row_slots).transpose(1, 2).contiguous()
            b_t = self.lora_B[:, :, :rank].index_select(0, row_slots).transpose(1, 2).contiguous()
            self._gathered = (key, a_t, b_t)
        return self._gathered[1], self._gathered[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        state = self.state
        if state.single_slot is not None:
            slot = state.single_slot
            rank = self.slot_ranks[slot]
            if rank == 0:
                return result
            h = x.to(self.lora_A.dtype) @ self.lora_A[slot, :rank].t()
            return result + (h @ self.lora_B[slot, :, :rank].t()).to(result.dtype)
        if state.row_slots is None:
            return result
        a_t, b_t = self._gather(state.row_slots)
        if a_t.shape[2] == 0:
            return result
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, self.in_features).to(a_t.dtype)
        delta = torch.bmm(torch.bmm(x3, a_t), b_t)
        return result + delta.reshape(result.shape).to(result.dtype)
