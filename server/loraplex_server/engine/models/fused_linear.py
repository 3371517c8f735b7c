"""Sibling projections that read one input (q/k/v, gate/up) as one matmul, each with its LoRA deltas.

The members' weights are concatenated once, and each Hugging Face member module then holds a view of
its rows of the fused weight: the weights exist once in memory, and the HF modules (the slot table's
shapes, the reference path) keep working. Each member's adapter delta comes from the slot table's own
layer for that member (`BatchedLoraLinear.add_delta_`, the same stacked tables and batched paths as
the HF path) and lands in the member's column range of the fused output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loraplex_server.lora.layers import BatchedLoraLinear


class FusedLinear:
    """y = x @ [W_1 | W_2 | ...]^T (+ bias), then each member's adapter delta into its columns."""

    def __init__(self, modules: list[nn.Linear], paths: list[str]) -> None:
        self.paths = paths
        sizes = [int(m.weight.shape[0]) for m in modules]
        if len(modules) == 1:
            self.weight = modules[0].weight.detach()
        else:
            self.weight = torch.cat([m.weight.detach() for m in modules])
            for module, part in zip(modules, self.weight.split(sizes), strict=True):
                module.weight = nn.Parameter(part, requires_grad=False)  # a view: the HF module shares it
        self.bias = None
        if any(m.bias is not None for m in modules):
            parts = [m.bias.detach() if m.bias is not None else self.weight.new_zeros(n)
                     for m, n in zip(modules, sizes, strict=True)]
            self.bias = parts[0] if len(parts) == 1 else torch.cat(parts)
            if len(parts) > 1:
                for module, part in zip(modules, self.bias.split(sizes), strict=True):
                    if module.bias is not None:
                        module.bias = nn.Parameter(part, requires_grad=False)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self.spans = [(end - n, end) for n, end in zip(sizes, ends, strict=True)]
        self.sizes = sizes
        self.adapters: list[tuple[BatchedLoraLinear, int, int]] = []

    def bind(self, lora_layers: dict[str, BatchedLoraLinear]) -> None:
        """Pick up the slot table's layers for our members (they are wrapped lazily, as adapters arrive)."""
        self.adapters = [(lora_layers[path], start, end) for path, (start, end) in zip(self.paths, self.spans,
                                                                                        strict=True)
                         if path in lora_layers]

    def __call__(self, x: torch.Tensor, adapters_active: bool) -> torch.Tensor:
        """x [tokens, in] -> [tokens, sum of the members' outputs]."""
        y = F.linear(x, self.weight, self.bias)
        if adapters_active:
            for layer, start, end in self.adapters:
                layer.add_delta_(x, y[:, start:end])
        return y
