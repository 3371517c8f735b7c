"""The device slot table: which adapter sits in which slot, and its weights inside every adapted layer.

Slot 0 is reserved for "no adapter". Layers are wrapped lazily, the first time any adapter targets
them, so a base serving only q/v adapters pays nothing on its MLPs.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex_adapters.peft_folder import LoraAdapter, LoraModuleWeights
from loraplex_server.cpu_ops import cpu_ops
from loraplex_server.lora.base_shapes import BaseShapes
from loraplex_server.lora.layers import BatchedLoraLinear, BatchState, SharedShrink
from loraplex_server.lora.triton_lora import triton_lora

INITIAL_SLOTS = 16  # the tables start this big and double as adapters arrive
# Projections that read the same input inside one parent module (Llama/Qwen/Mistral attention and
# MLP, BERT self-attention): their shrinks are fused into one matmul.
SIBLING_SETS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"})


def _transposed_storage(matrix: torch.Tensor) -> torch.Tensor:
    """The same [out, r] values laid out as a contiguous [r, out]: `.t()` of it is what a slot holds."""
    return matrix.t().contiguous().t()


class SlotsFullError(RuntimeError):
    """Every slot holds an adapter; unload one first."""


class HeadTable:
    """Per-slot classification heads, each kept at its own label count: a head with thousands of labels
    costs its own rows, not every other classifier's (a padded [slots, labels, hidden] table would)."""

    def __init__(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.weights: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * num_slots
        self.dtype, self.device = dtype, device

    def grow_slots(self, num_slots: int) -> None:
        self.weights += [None] * (num_slots - len(self.weights))

    def write(self, slot: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self.weights[slot] = None if weight is None else (
            weight.to(self.device, self.dtype).contiguous(), None if bias is None else bias.to(self.device, self.dtype))

    def logits(self, hidden: torch.Tensor, slots: list[int]) -> list[torch.Tensor]:
        """hidden [B, H] -> one fp32 logits vector per row; rows of one adapter share one matmul."""
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            rows_of.setdefault(slot, []).append(row)
        out: list[torch.Tensor | None] = [None] * len(slots)
        for slot, rows in rows_of.items():
            weight, bias = self.weights[slot]
            h = hidden[rows[0]:rows[0] + 1] if len(rows) == 1 else hidden[torch.tensor(rows, device=hidden.device)]
            logits = (torch.nn.functional.linear(h.to(weight.dtype), weight, bias)).float()
            for i, row in enumerate(rows):
                out[row] = logits[i]
        return out


class SlotTable:
    def __init__(self, model: nn.Module, num_slots: int, dtype: torch.dtype, device: torch.device,
                 hidden_size: int, head_module: str) -> None:
        if num_slots < 2:
            raise ValueError("need at least 2 slots (slot 0 means no adapter)")
        self.model = model
        self.num_slots = num_slots  # the most the tables may grow to
        self.capacity = min(num_slots, INITIAL_SLOTS)  # slots the tables hold now
        self.dtype, self.device = dtype, device
        self.state = BatchState()
        self.layers: dict[str, BatchedLoraLinear] = {}
        self.heads = HeadTable(self.capacity, dtype, device)
        self._free = list(range(self.capacity - 1, 0, -1))
        # Taken before any layer is wrapped; upload validation reads it from other threads.
        self.shapes = BaseShapes.capture(model, head_module, hidden_size)
        # Compiled (or loaded from torch's build cache) now, so the first adapter request does not wait for it.
        # On CUDA the Triton kernel only when LORAPLEX_TRITON_LORA=1 (not yet timed against the torch path).
        self.kernel = None
        if dtype == torch.bfloat16:
            self.kernel = cpu_ops() if device.type == "cpu" else triton_lora() if device.type == "cuda" else None

    @property
    def free_slots(self) -> int:
        return len(self._free) + self.num_slots - self.capacity

    def _grow(self) -> None:
        """Double the tables (up to num_slots): memory follows the adapters loaded, not the limit."""
        new = min(self.num_slots, 2 * self.capacity)
        for layer in self.layers.values():
            layer.grow_slots(new)
        self.heads.grow_slots(new)
        self._free = list(range(new - 1, self.capacity - 1, -1)) + self._free
        self.capacity = new
        self.state.invalidate()

    def _module_path(self, name: str) -> str:
        return self.shapes.path(name)

    def validate(self, adapter: LoraAdapter) -> None:
        """Raise AdapterFormatError if the adapter does not fit this base; changes nothing."""
        self.shapes.validate(adapter)

    def _wrapped(self, name: str) -> BatchedLoraLinear:
        path = self._module_path(name)
        layer = self.layers.get(path)
        if layer is None:
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = BatchedLoraLinear(getattr(parent, attr), self.state, self.capacity, self.dtype, self.device)
            layer.kernel = self.kernel
            setattr(parent, attr, layer)
            self.layers[path] = layer
            self._group_siblings(parent_path, attr)
        return layer

    def _group_siblings(self, parent_path: str, attr: str) -> None:
        for names in SIBLING_SETS:
            if attr in names:
                prefix = f"{parent_path}." if parent_path else ""
                members = [self.layers[prefix + n] for n in sorted(names) if prefix + n in self.layers]
                shared = SharedShrink(members) if len(members) > 1 else None
                for member in members:
                    member.shared_shrink = shared

    def prepare(self, adapter: LoraAdapter) -> LoraAdapter:
        """The same adapter in the table's dtype with the scaling folded into B (in fp32, as a slot write
        would), so writing it into a slot is plain copies: what the host tier keeps."""
        modules = {name: LoraModuleWeights(w.A.to(self.dtype).contiguous(), _transposed_storage(
            (w.B.to(torch.float32) * w.scaling).to(self.dtype)), 1.0) for name, w in adapter.modules.items()}
        return LoraAdapter(modules, adapter.head, adapter.config)

    def allocate(self, adapter: LoraAdapter, validate: bool = True) -> int:
        """Validate (unless done before), take a free slot and write the adapter into every layer;
        returns the slot."""
        if validate:
            self.validate(adapter)
        if not self._free and self.capacity < self.num_slots:
            self._grow()
        if not self._free:
            raise SlotsFullError(f"all {self.num_slots - 1} adapter slots are in use")
        slot = self._free.pop()
        self._write(slot, adapter)
        return slot

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        destinations, sources, zero, touched = [], [], [], set()
        with torch.no_grad():
            for name, w in adapter.modules.items():
                layer = self._wrapped(name)
                writes = layer.slot_writes(slot, w.A.to(self.device), w.B.to(self.device), w.scaling)
                destinations += writes[0]
                sources += writes[1]
                zero += writes[2]
                touched.add(id(layer))
            for layer in self.layers.values():
                if id(layer) not in touched and layer.slot_ranks[slot]:
                    zero += layer.slot_writes(slot, None, None, 0.0)[2]
            # One batched call each instead of a copy per tensor: a swap touches hundreds of them.
            if destinations:
                torch._foreach_copy_(destinations, sources)
            if zero:
                torch._foreach_zero_(zero)
            head = adapter.head
            self.heads.write(slot, None if head is None else head.weight, None if head is None else head.bias)
        self.state.invalidate()

    def release(self, slot: int) -> None:
        """Free a slot. Its weights stay until the next write, which overwrites or clears every layer
        the slot has a rank in: no row points at a free slot, so they are never read."""
        if slot <= 0 or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self.state.invalidate()
