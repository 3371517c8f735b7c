"""The fused CPU LoRA decode kernel (csrc/bgmv_cpu.cpp) must agree with the plain torch path it replaces."""

from __future__ import annotations

import torch

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine


def test_kernel_matches_fp32_reference(ops):
    torch.manual_seed(0)
    slots, rank, in_f, out_f = 6, 16, 96, 40
    a = torch.randn(slots, rank, in_f).bfloat16()
    b_t = torch.randn(slots, rank, out_f).bfloat16()
    a[0], b_t[0] = 0, 0
    x = torch.randn(9, in_f).bfloat16()
    out = torch.randn(9, out_f).bfloat16()
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 1, 0, 3])
    used = 12  # only the first 12 rank rows matter for this batch
    expected = out.float() + torch.einsum("nr,nro->no", torch.einsum("ni,nri->nr", x.float(), a[rows, :used].float()),
                                          b_t[rows, :used].float())
    before = out.clone()
    ops.bgmv_add_(out, x, a, b_t, rows, used)
    torch.testing.assert_close(out.float(), expected, atol=0.5, rtol=1 / 128)
    assert torch.equal(out[[0, 7]], before[[0, 7]]), "slot 0 rows must stay untouched"


def test_bf16_one_token_rows_with_kernel_match_torch_path(tiny, ops):
    """One token per row of mixed adapters (a decode step's shape) in bf16: the kernel path and the
    torch path agree to bf16 precision, and both differ from the base."""
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="bfloat16", device="cpu"), max_adapters=8)
    names = [n for n, (_, spec) in adapters.items() if not spec.num_labels]
    for name in names:
        engine.load_adapter(name, adapters[name][0])
    layers = list(engine.slots.layers.values())
    assert all(layer.kernel is ops for layer in layers)
    tokens = [[5], [10], [20], [30]]
    rows = names + [None]
    with_kernel = torch.stack(engine.logits(tokens, rows))
    for layer in layers:
        layer.kernel = None
    without = torch.stack(engine.logits(tokens, rows))
    base = torch.stack(engine.logits(tokens, [None] * len(tokens)))
    scale = without.abs().max()
    torch.testing.assert_close(with_kernel, without, atol=0.02 * scale, rtol=0)
    assert (with_kernel[:3] - base[:3]).abs().max() > 0.1 * scale
    torch.testing.assert_close(with_kernel[3], base[3])
