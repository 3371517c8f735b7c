"""Batched multi-adapter LoRA on top of frozen base layers (the BGMV idea of Punica / S-LoRA).

Every adapted layer keeps stacked tables `A[S, R, in]` and `B^T[S, R, out]` (scaling folded into B,
smaller ranks zero-padded, slot 0 all zeros = no adapter). One `BatchState` is shared by all layers:
the engine sets each row's slot once per forward, and the per-batch work (which path to take, the
row slots on the right device) is done once there instead of in every layer.

Paths: all tokens on one adapter, or a segment of tokens that share one (a prefill chunk, a classify
text) -> two plain matmuls on views of the slot; equal-length rows on mixed adapters -> per-row weights
gathered and two bmm; single-token rows on mixed adapters (decode) -> the same, with the gathered
weights kept while the rows stay, or on CPU in bf16 the fused kernel of csrc/bgmv_cpu.cpp (cpu_ops.py), which reads
the tables in place. The expand is fused into the base output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BatchState:
    """What the current forward pass needs to know about adapters; set by the engine per forward.

    Two layouts. Padded: x is [rows, len, in], every row takes the gathered path. Packed (one step
    of the engine): x is [1, tokens, in] holding rows back to back, single-token rows (decode) first.
    Those take the gathered path, one "row" per token. Longer rows (prefill chunks, classify texts)
    come sorted by length, in groups: consecutive rows on one adapter are a segment that multiplies
    its matrices in place (a 512-token prefill never copies its adapter 512 times); consecutive rows
    of equal length on mixed adapters are a [rows, len, in] view with per-row gathered weights (one
    bmm for a burst of short texts instead of a matmul pair per text).
    """

    row_slots: torch.Tensor | None = None  # [G] long on the device: the gathered rows' slots; None if all 0
    single_slot: int | None = None  # set when every token uses this one (non-zero) slot
    composition: int = 0  # bumps whenever the gathered rows change, so layers can reuse gathered weights
    slots: tuple[int, ...] = ()  # the gathered rows' slots
    groups: tuple[RowGroup, ...] = ()  # the longer rows
    active: bool = False  # some token has an adapter
    packed: bool = False  # the packed layout (one token per gathered row) rather than the padded one

    def set_rows(self, slots: list[int], device: torch.device, lengths: list[int] | None = None) -> None:
        """Each row's slot; `lengths` (tokens per row) means the packed layout, None the padded one."""
        gathered, groups = list(slots), ()
        self.packed = lengths is not None
        if lengths is not None:
            count = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
            gathered, groups = gathered[:count], _groups(slots[count:], lengths[count:], count, device)
        self.groups = groups
        self.active = any(slots)
        distinct = set(slots)
        self.single_slot = slots[0] if len(distinct) == 1 and self.active else None
        if tuple(gathered) == self.slots:
            return
        self.slots = tuple(gathered)
        self.row_slots = torch.tensor(gathered, dtype=torch.long, device=device) if any(gathered) else None
        self.composition += 1

    def invalidate(self) -> None:
        """Slot contents changed: gathered copies must be rebuilt even for the same rows."""
        self.slots = ()
        self.composition += 1


@dataclass(frozen=True)
class RowGroup:
    """Consecutive packed rows sharing one path: one adapter (`slot`), or equal lengths (`slots`)."""

    start: int  # first token
    rows: int
    length: int  # tokens per row (a segment counts as one row of all its tokens)
    slot: int = 0  # the segment's adapter; 0 for a gathered group
    slots: tuple[int, ...] = ()  # a gathered group's per-row adapters
    index: torch.Tensor | None = None  # those slots on the device

    @property
    def end(self) -> int:
        return self.start + self.rows * self.length


def _groups(slots: list[int], lengths: list[int], start: int, device: torch.device) -> tuple[RowGroup, ...]:
    """Split the longer rows into runs of equal length; a run on one adapter (or rows on one adapter)
    becomes a segment, a run of several rows on mixed adapters a gathered group. Rows without an
    adapter are skipped."""
    out: list[RowGroup] = []
    i = 0
    while i < len(slots):
        j = i
        while j < len(slots) and lengths[j] == lengths[i]:
            j += 1
        if j - i > 1 and len(set(slots[i:j])) > 1:
            run = tuple(slots[i:j])
            out.append(RowGroup(start, j - i, lengths[i], slots=run,
                                index=torch.tensor(run, dtype=torch.long, device=device)))
            start += (j - i) * lengths[i]
        else:
            for slot, length in zip(slots[i:j], lengths[i:j], strict=True):
                if slot and out and out[-1].slot == slot and out[-1].end == start:
                    out[-1] = RowGroup(out[-1].start, 1, out[-1].length + length, slot)
                elif slot:
                    out.append(RowGroup(start, 1, length, slot))
                start += length
        i = j
    return tuple(out)


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
        self.kernel = None  # the CPU kernels (cpu_ops.py), set by the slot table when usable

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
        """Per gathered row A^T [G, in, r] and B^T [G, r, out], cut to their max rank. Rebuilt only when
        the gathered rows change, so decode steps of the same rows reuse them."""
        state = self.state
        if self._gathered is None or self._gathered[0] != state.composition:
            rank = self._batch_rank()
            a_t = self.lora_A[:, :rank].index_select(0, state.row_slots).transpose(1, 2)
            b_t = self.lora_B_t[:, :rank].index_select(0, state.row_slots)
            self._gathered = (state.composition, a_t.contiguous(), b_t.contiguous())
        return self._gathered[1], self._gathered[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.state.active:
            return result
        # The expand is fused with the add into the base output (addmm_/baddbmm_): a separate add of two
        # [tokens, out] tensors costs twice the expand itself on CPU. An output of another dtype (an int8
        # base gives float16) or layout gets the delta added afterwards.
        fused = result.dtype == self.lora_B_t.dtype and result.is_contiguous()
        out = result if fused else torch.zeros(result.shape, dtype=self.lora_B_t.dtype, device=result.device)
        self.add_delta_(x, out.view(-1, self.out_features))
        if not fused:
            result += out.to(result.dtype)
        return result

    def add_delta_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add each row's adapter delta of input `x` [..., in] into `out` [tokens, out_features], which
        may be a column range of a wider output (a fused q/k/v or gate/up projection)."""
        state = self.state
        if not state.active:
            return
        x2 = x.reshape(-1, self.in_features)
        if state.single_slot is not None and not self._decode_gathered(x2):
            self._add_segment(x2, out, state.single_slot)
            return
        if state.row_slots is not None:
            self._add_gathered(x, x2, out)
        for group in state.groups:
            if group.slot:
                self._add_segment(x2[group.start:group.end], out[group.start:group.end], group.slot)
            else:
                self._add_group(x2, out, group)

    def _decode_gathered(self, x2: torch.Tensor) -> bool:
        """Single-token rows in bf16 on CPU take the gathered path even on one adapter: the CPU kernel
        (or the bmm over gathered weights, kept across steps) beats two small bf16 matmuls on CPUs
        without native bf16, 3x at 16 rows, so one adapter is never slower than many."""
        state = self.state
        return (state.packed and not state.groups and state.row_slots is not None
                and x2.dtype == torch.bfloat16 and x2.device.type == "cpu")

    def _add_segment(self, x: torch.Tensor, out: torch.Tensor, slot: int) -> None:
        """Tokens that share one adapter: two plain matmuls on views of its slot."""
        rank = self.slot_ranks[slot]
        if rank:
            out.addmm_(x.to(self.lora_A.dtype) @ self.lora_A[slot, :rank].t(), self.lora_B_t[slot, :rank])

    def _add_group(self, x2: torch.Tensor, out2: torch.Tensor, group: RowGroup) -> None:
        """Rows of equal length on mixed adapters: per-row weights gathered, two bmm."""
        rank = max(self.slot_ranks[s] for s in group.slots)
        if not rank:
            return
        a_t = self.lora_A[:, :rank].index_select(0, group.index).transpose(1, 2)
        b_t = self.lora_B_t[:, :rank].index_select(0, group.index)
        x3 = x2[group.start:group.end].view(group.rows, group.length, self.in_features)
        out3 = out2[group.start:group.end].view(group.rows, group.length, self.out_features)
        out3.baddbmm_(project(x3, a_t), b_t)

    def _add_gathered(self, x: torch.Tensor, x2: torch.Tensor, out2: torch.Tensor) -> None:
        """Rows on different adapters: each row's weights gathered (or read in place by the CPU kernel)."""
        state = self.state
        rows = len(state.slots)
        per_row = 1 if state.packed else x2.shape[0] // rows
        xg, og = x2[:rows * per_row], out2[:rows * per_row]
        rank = self._batch_rank()
        if not rank:  # no gathered row's adapter touches this layer
            return
        if self.kernel is not None and per_row == 1 and xg.dtype == og.dtype == torch.bfloat16:
            self.kernel.bgmv_add_(og, xg.contiguous(), self.lora_A, self.lora_B_t, state.row_slots, rank)
            return
        a_t, b_t = self._gathered_weights()
        x3 = xg.view(rows, per_row, self.in_features)
        h = self.shared_shrink.shrink(self, x, x3) if self.shared_shrink else project(x3, a_t)
        og.view(rows, per_row, self.out_features).baddbmm_(h.to(b_t.dtype), b_t)


def project(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """Row by row: x [G, tokens, in] @ per-row weights [G, in, out]."""
    return torch.bmm(x.to(weight_t.dtype), weight_t)


class SharedShrink:
    """Sibling projections that read the same input (q/k/v, gate/up) shrink it in one matmul:
    x @ [A_q | A_k | A_v]^T once, each sibling then takes its own columns."""

    def __init__(self, members: list[BatchedLoraLinear]) -> None:
        self.members = members
        self._weights: tuple[int, torch.Tensor, dict[int, tuple[int, int]]] | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._output_key = -1

    def shrink(self, layer: BatchedLoraLinear, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`rows` are the gathered rows of the layer input `x` ([G, tokens, in])."""
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
            self._output = project(rows, self._weights[1])
            self._input, self._output_key = x, composition
        start, end = self._weights[2][id(layer)]
        return self._output[..., start:end]
