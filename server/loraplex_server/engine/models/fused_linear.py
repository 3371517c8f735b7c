"""Sibling projections that read one input (q/k/v, gate/up) as one matmul, each with its LoRA deltas.

The members' weights are concatenated once, and each Hugging Face member module then holds a view of
its rows of the fused weight: the weights exist once in memory, and the HF modules (the slot table's
shapes, the reference path) keep working. Each member's adapter delta comes from the slot table's own
layer for that member (`BatchedLoraLinear.add_delta_`, the same stacked tables and batched paths as
the HF path) and lands in the member's column range of the fused output.

On CPU in fp32 the fused weight is stored transposed, [in, out] contiguous, and multiplied as x @ W: MKL's
sgemm runs that 2-10x faster than F.linear's x @ W^T over an [out, in] weight for 4 to 32 rows, and as
fast for one row (`python -m bench.decode_step`; RESULTS.md, "Weight layout"). The members' views are then
column slices, transposed back.

Where every weight is a bf16 value and our CPU ops are built, the weights go into csrc/bf16_linear.cpp's
bf16 panels instead:
- an fp32 model whose checkpoint shipped bf16 (SmolLM2's, Llama's and Qwen2's do): half the bytes a decode
  step streams, the same fp32 results. Against MKL's fp32 GEMM over a SmolLM2-sized set of weights the kernel
  is 1.8x faster at 1 row, 2.1x at 8, 1.1-1.3x at 64 and 0.7-0.85x at 512 (a long prefill, compute-bound;
  `bench.decode_step --parts gemm`); widening the panels for MKL instead was slower still (RESULTS.md);
- a bf16 model (the default where the CPU has native bf16): against torch's bf16 linear (oneDNN, on a weight
  it does not keep prepacked) the kernel's AVX512-BF16 dot products were 3.2x faster at 1 row, 2x at 16, 1.4x
  at 64 and level at 256 rows (`bench.decode_step --parts gemm` at bf16; RESULTS.md).
Only builds with the kernel's AVX-512 tiles use the panels: its portable path lost to MKL beyond a few rows.
The Hugging Face members then hold shape-only (meta) placeholders and refuse to run (torch multiplies a meta
weight silently into garbage): the weights exist once, in the panels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loraplex_server.cpu_ops import cpu_ops
from loraplex_server.lora.layers import BatchedLoraLinear

PANEL = 64  # output columns per panel of csrc/bf16_linear.cpp


def stores_transposed(weight: torch.Tensor) -> bool:
    """Whether weights multiply faster stored [in, out] (fp32 on CPU, measured) than as nn.Linear keeps them."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_bf16(weight_t: torch.Tensor) -> torch.Tensor:
    """[in, out] (in even) -> bf16 panels [ceil(out / 64), in / 2, 64, 2], rows in pairs (the last panel
    zero-padded): weight (k, c) of panel p at [p, k // 2, c, k % 2]."""
    in_f, out_f = weight_t.shape
    panels = -(-out_f // PANEL)
    padded = F.pad(weight_t, (0, panels * PANEL - out_f))
    return padded.view(in_f // 2, 2, panels, PANEL).permute(2, 0, 3, 1).to(torch.bfloat16).contiguous()


def panel_columns(packed: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Columns of the packed weight [in, out] as rows [len(columns), in] (a tied head's embeddings)."""
    return packed[columns // PANEL, :, columns % PANEL].flatten(1)


def packs(weights: list[torch.Tensor], ops) -> bool:
    """Whether these weights go into bf16 panels: our AVX-512 kernel is built, the input width is even, and every
    weight is a bf16 value (a bf16 model, or fp32 weights of a checkpoint that shipped bf16)."""
    return (ops is not None and ops.bf16_linear_tiled() and weights[0].shape[1] % 2 == 0
            and all(w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and exact_in_bf16(w)) for w in weights))


def _moved(path: str):
    def forward(*args, **kwargs):
        raise RuntimeError(f"{path}: its weights moved into our forward's bf16 panels (FusedLinear); "
                           "run the model through LlamaForward")
    return forward


def exact_in_bf16(weight: torch.Tensor) -> bool:
    return bool(torch.equal(weight.bfloat16().float(), weight))


class FusedLinear:
    """y = x @ [W_1 | W_2 | ...]^T (+ bias), then each member's adapter delta into its columns."""

    def __init__(self, modules: list[nn.Linear], paths: list[str]) -> None:
        self.paths = paths
        sizes = [int(m.weight.shape[0]) for m in modules]
        weights = [m.weight.detach() for m in modules]
        self.transposed = stores_transposed(weights[0])
        on_cpu = weights[0].device.type == "cpu" and weights[0].dtype in (torch.float32, torch.bfloat16)
        self.ops = cpu_ops() if on_cpu else None
        self.packed = None
        self.out_features = sum(sizes)
        if packs(weights, self.ops):
            self.packed = pack_bf16(torch.cat(weights).t())
            self.weight = None
            parts = [torch.empty(w.shape, dtype=w.dtype, device="meta") for w in weights]
            for module, path in zip(modules, paths, strict=True):
                module.forward = _moved(path)
        elif self.transposed:  # one new [in, out] tensor; the members' old weights are freed
            self.weight = torch.cat(weights).t().contiguous()
            parts = [part.t() for part in self.weight.split(sizes, dim=1)]
        else:
            self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            parts = list(self.weight.split(sizes))
        for module, part in zip(modules, parts, strict=True):
            module.weight = nn.Parameter(part, requires_grad=False)  # a view: the HF module shares it
        self.bias = None
        if any(m.bias is not None for m in modules):
            parts = [m.bias.detach() if m.bias is not None else weights[0].new_zeros(n)
                     for m, n in zip(modules, sizes, strict=True)]
            self.bias = parts[0] if len(parts) == 1 else torch.cat(parts)
            if self.packed is not None:  # the kernel adds it in fp32, before each output's one rounding
                self.bias = self.bias.float()
            elif len(parts) > 1:
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

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] -> the base projection [tokens, sum of the members' outputs], no adapters."""
        if self.packed is not None:
            return self.ops.bf16_linear(x, self.packed, self.bias, self.out_features)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)

    def __call__(self, x: torch.Tensor, adapters_active: bool) -> torch.Tensor:
        """x [tokens, in] -> [tokens, sum of the members' outputs]."""
        y = self.base(x)
        if adapters_active:
            for layer, start, end in self.adapters:
                layer.add_delta_(x, y[:, start:end])
        return y
