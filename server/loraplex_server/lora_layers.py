"""Batched multi-adapter LoRA on top of frozen base layers (the BGMV idea of Punica / S-LoRA).

Every adapted layer keeps stacked tables `A[S, R, in]` and `B^T[S, R, out]` (scaling folded into B,
smaller ranks zero-padded, slot 0 all zeros = no adapter). One `BatchState` is shared by all layers:
the engine sets each row's slot once per forward, and the per-batch work (which path to take, the
row slots on the right device) is done once there instead of in every layer.

Paths: all rows on one adapter -> two plain matmuls; mixed rows -> per-row weights gathered once per
batch composition and two bmm; in both, the expand is fused into the base output. Decode (one token
per row) on CPU in bf16 -> the fused kernel of cpu_kernel.py, which reads the tables in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BatchState:
    """What the current forward pass needs to know about adapters; set by the engine per forward."""

    row_slots: torch.Tensor | None = None  # [B] long, on the model device; None when no row has an adapter
    single_slot: int | None = None  # set when every row uses this one (non-zero) slot
    composition: int = 0  # bumps whenever row_slots change, so layers can reuse gathered weights
    slots: tuple[int, ...] = ()

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        if tuple(slots) == self.slots:
            return
        self.slots = tuple(slots)
        distinct = set(slots)
        self.row_slots = None if distinct == {0} else torch.tensor(slots, dtype=torch.long, device=device)
        self.single_slot = slots[0] if len(distinct) == 1 and self.row_slots is not None else None
        self.composition += 1

    def invalidate(self) -> None:
        """Slot contents changed: gathered copies must be rebuilt even for the same rows."""
        self.slots = ()
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
        self.register_buffer("lora_B_t", torch.zeros(num_slots, 0, self.out_features, dtype=dtype, device=device),
                             persistent=False)
        self.slot_ranks = [0] * num_slots
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.shared_shrink: SharedShrink | None = None
        self._rank_cache = (-1, 0)
        self.kernel = None  # the CPU decode kernel (cpu_kernel.py), set by the slot table when usable

    @property
    def max_rank(self) -> int:
        return int(self.lora_A.shape[1])

    def grow_slots(self, num_slots: int) -> None:
        pad = num_slots - self.lora_A.shape[0]
        self.lora_A = torch.nn.functional.pad(self.lora_A, (0, 0, 0, 0, 0, pad))
        self.lora_B_t = torch.nn.functional.pad(self.lora_B_t, (0, 0, 0, 0, 0, pad))
        self.slot_ranks += [0] * pad

    def _grow_rank(self, rank: int) -> None:
        pad = rank - self.max_rank
        self.lora_A = torch.nn.functional.pad(self.lora_A, (0, 0, 0, pad))
        self.lora_B_t = torch.nn.functional.pad(self.lora_B_t, (0, 0, 0, pad))

    def slot_writes(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Put an adapter's matrices into a slot (None clears it), as (destinations, sources, regions to
        zero), so the slot table can do all layers' copies in one batched call. Ranks past the
        adapter's are zeroed. The caller invalidates the batch state afterwards."""
        if A is None:
            self.slot_ranks[slot] = 0
            return [], [], [self.lora_A[slot], self.lora_B_t[slot]]
        rank = int(A.shape[0])
        if rank > self.max_rank:
            self._grow_rank(rank)
        self.slot_ranks[slot] = rank
        lora_A, lora_B_t = self.lora_A, self.lora_B_t  # buffers: each attribute read costs a module lookup
        # A prepared adapter (SlotTable.prepare) has the scaling folded in already: a plain copy.
        b_t = B.t() if scaling == 1.0 else B.to(torch.float32).t() * scaling
        zero = [lora_A[slot, rank:], lora_B_t[slot, rank:]] if rank < lora_A.shape[1] else []
        return [lora_A[slot, :rank], lora_B_t[slot, :rank]], [A, b_t], zero

    def _batch_rank(self) -> int:
        state = self.state
        if self._rank_cache[0] != state.composition:
            self._rank_cache = (state.composition, max(self.slot_ranks[s] for s in state.slots))
        return self._rank_cache[1]

    def _gathered_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T and B^T for the current rows, cut to their max rank:
        [in, r] / [r, out] when all rows share one slot, else per row [B, in, r] / [B, r, out].
        Rebuilt only when the batch composition changes, so decode steps of the same rows reuse them."""
        state = self.state
        if self._gathered is None or self._gathered[0] != state.composition:
            rank = self._batch_rank()
            if state.single_slot is not None:
                a_t = self.lora_A[state.single_slot, :rank].t()
                b_t = self.lora_B_t[state.single_slot, :rank]
            else:
                a_t = self.lora_A[:, :rank].index_select(0, state.row_slots).transpose(1, 2)
                b_t = self.lora_B_t[:, :rank].index_select(0, state.row_slots)
            self._gathered = (state.composition, a_t.contiguous(), b_t.contiguous())
        return self._gathered[1], self._gathered[2]

    def _kernel_applies(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """The CPU kernel covers decode: one token per row, bf16 in and out."""
        return (self.kernel is not None and self.state.row_slots is not None
                and x.numel() == x.shape[0] * self.in_features and x.dtype == result.dtype == torch.bfloat16
                and result.is_contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        state = self.state
        if state.row_slots is None:
            return result
        if self._kernel_applies(x, result):
            rank = self._batch_rank()
            if rank:
                self.kernel.bgmv_add_(result.view(x.shape[0], self.out_features),
                                      x.reshape(x.shape[0], self.in_features).contiguous(),
                                      self.lora_A, self.lora_B_t, state.row_slots, rank)
            return result
        a_t, b_t = self._gathered_weights()
        if a_t.shape[-1] == 0:  # no row's adapter touches this layer
            return result
        h = self.shared_shrink.shrink(self, x) if self.shared_shrink else project(x, a_t)
        if result.dtype != b_t.dtype or not result.is_contiguous():  # e.g. an int8 base's float16 output
            result += project(h, b_t).reshape(result.shape)
            return result
        # The expand fused with the add into the base output (addmm_/baddbmm_): a separate add of
        # two [tokens, out] tensors costs twice the expand itself on CPU.
        if b_t.dim() == 2:
            result.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), b_t)
        else:
            rows = b_t.shape[0]
            result.view(rows, -1, self.out_features).baddbmm_(h.reshape(rows, -1, h.shape[-1]), b_t)
        return result


def project(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x @ W^T for one shared [in, out] matrix, or row by row for per-row [B, in, out] matrices."""
    if weight_t.dim() == 2:
        return x.to(weight_t.dtype) @ weight_t
    return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(weight_t.dtype), weight_t)


class SharedShrink:
    """Sibling projections that read the same input (q/k/v, gate/up) shrink it in one matmul:
    x @ [A_q | A_k | A_v]^T once, each sibling then takes its own columns."""

    def __init__(self, members: list[BatchedLoraLinear]) -> None:
        self.members = members
        self._weights: tuple[int, torch.Tensor, dict[int, tuple[int, int]]] | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._output_key = -1

    def shrink(self, layer: BatchedLoraLinear, x: torch.Tensor) -> torch.Tensor:
        composition = layer.state.composition
        if self._weights is None or self._weights[0] != composition:
            parts = [m._gathered_weights()[0] for m in self.members]
            spans, offset = {}, 0
            for member, part in zip(self.members, parts, strict=True):
                spans[id(member)] = (offset, offset + part.shape[-1])
                offset += part.shape[-1]
            self._weights = (composition, torch.cat(parts, dim=-1), spans)
        # Identity, not equality: the siblings are called with the very same tensor object.
        if self._input is not x or self._output_key != composition:
            self._output = project(x, self._weights[1])
            self._input, self._output_key = x, composition
        start, end = self._weights[2][id(layer)]
        return self._output[..., start:end]
