"""Our GEMM over bf16 panels (csrc/bf16_linear.cpp): fp32 activations give fp32 results of the bf16 weights;
bf16 activations give each output rounded once to bf16, as torch's bf16 linear; every malformed input is refused."""

from __future__ import annotations

import pytest
import torch
from test_decode_ops import assert_same_to_bf16, bf16_engine, first_tokens
from torch.nn import functional as F

from loraplex_server.engine.models.fused_linear import PANEL, pack_bf16, panel_columns

SHAPES = [(64, 64), (96, 150), (2, 1), (576, 960)]  # [in, out]: one panel, a padded last panel, the least, SmolLM2's
ROWS = [1, 2, 3, 4, 5, 7, 16, 40]  # register tiles of 1-4 rows, and many


@pytest.fixture
def tiled(ops):
    if ops is None or not ops.bf16_linear_tiled():
        pytest.skip("the bf16 panels need our CPU ops built with AVX-512 (CPU, a C++ toolchain)")
    return ops


@pytest.mark.parametrize(("in_f", "out_f"), SHAPES)
def test_packing_keeps_every_weight_where_the_kernel_reads_it(in_f, out_f):
    weight = torch.randn(out_f, in_f).bfloat16()
    packed = pack_bf16(weight.float().t())
    panels = -(-out_f // PANEL)
    assert packed.shape == (panels, in_f // 2, PANEL, 2) and packed.dtype == torch.bfloat16
    assert torch.equal(panel_columns(packed, torch.arange(out_f)), weight)
    flat = packed.flatten()
    for k, c in [(0, 0), (1, 0), (in_f - 1, out_f - 1), (in_f // 2, out_f // 2)]:  # csrc's address of (k, c)
        panel, column = divmod(c, PANEL)
        assert flat[panel * in_f * PANEL + (k // 2) * 2 * PANEL + column * 2 + k % 2] == weight[c, k]
    assert not packed[-1, :, out_f - (panels - 1) * PANEL:].any(), "the padding columns are zero"


@pytest.mark.parametrize(("in_f", "out_f"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_rows_get_the_fp32_product(tiled, in_f, out_f, bias):
    weight = torch.randn(out_f, in_f).bfloat16().float()
    b = torch.randn(out_f) if bias else None
    packed = pack_bf16(weight.t())
    for rows in ROWS:
        x = torch.randn(rows, in_f)
        y = tiled.bf16_linear(x, packed, b, out_f)
        assert y.dtype == torch.float32 and y.shape == (rows, out_f)
        torch.testing.assert_close(y, F.linear(x, weight, b), atol=2e-5 * in_f ** 0.5, rtol=1e-5)


@pytest.mark.parametrize(("in_f", "out_f"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_rows_are_the_exact_product_rounded_once(tiled, in_f, out_f, bias):
    """Within one bf16 step of the exactly rounded product: fp32 accumulation, one rounding per output."""
    weight = torch.randn(out_f, in_f).bfloat16()
    b = torch.randn(out_f) if bias else None
    packed = pack_bf16(weight.float().t())
    for rows in ROWS:
        x = torch.randn(rows, in_f).bfloat16()
        y = tiled.bf16_linear(x, packed, b, out_f)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        step = exact.abs().float().bfloat16().double() * 2 ** -7  # one unit in the last place, or less
        assert ((y.double() - exact).abs() <= step + 1e-6 * in_f).all(), rows
        torch.testing.assert_close(y.float(), F.linear(x, weight, None if b is None else b.bfloat16()).float(),
                                   atol=1e-2 * in_f ** 0.5, rtol=1e-2)


def test_strided_rows_are_read_in_place(tiled):
    packed = pack_bf16(torch.randn(96, 128).bfloat16().float().t())
    wide = torch.randn(5, 300)
    for dtype in (torch.float32, torch.bfloat16):
        x = wide.to(dtype)[:, 10:138]  # rows 300 apart
        assert x.stride() == (300, 1)
        torch.testing.assert_close(tiled.bf16_linear(x, packed, None, 96),
                                   tiled.bf16_linear(x.contiguous(), packed, None, 96), atol=0, rtol=0)


def test_malformed_inputs_are_refused(tiled):
    packed = pack_bf16(torch.randn(64, 100).bfloat16().float())  # in 64, out 100: two panels
    x = torch.randn(3, 64)
    good = tiled.bf16_linear(x, packed, torch.randn(100), 100)
    assert good.shape == (3, 100)
    refusals = [
        ((x.half(), packed, None, 100), "x: fp32 or bf16"),
        ((x.double(), packed, None, 100), "x: fp32 or bf16"),
        ((x[0], packed, None, 100), "x: fp32 or bf16"),
        ((x.t().contiguous().t(), packed, None, 100), "x: fp32 or bf16"),  # columns not contiguous
        ((torch.randn(3, 62), packed, None, 100), "packed"),  # another input width
        ((torch.randn(3, 63), packed, None, 100), "packed"),  # an odd one
        ((x, packed.float(), None, 100), "packed"),
        ((x, packed.flatten(2), None, 100), "packed"),
        ((x, packed.transpose(1, 2).contiguous(), None, 100), "packed"),
        ((x, packed.transpose(0, 1), None, 100), "packed"),  # not contiguous
        ((x, packed, None, 129), "out_features"),  # three panels' worth
        ((x, packed, None, 64), "out_features"),
        ((x, packed, None, 0), "out_features"),
        ((x, packed, None, -5), "out_features"),
        ((x, packed, torch.randn(99), 100), "bias"),
        ((x, packed, torch.randn(100).bfloat16(), 100), "bias"),
        ((x, packed, torch.randn(200)[::2], 100), "bias"),
    ]
    for args, message in refusals:
        with pytest.raises(RuntimeError, match=message):
            tiled.bf16_linear(*args)


def test_a_bf16_engine_packs_its_weights_and_matches_torchs_linear(tiny, tiled, monkeypatch):
    """A bf16 model's projections go into the panels too, and its first tokens and logprobs are those of the
    same model on torch's bf16 linear (LORAPLEX_CPU_KERNEL=0), to bf16 precision."""
    ours, names = bf16_engine(tiny)
    layer = ours.runner.forward.layers[0]
    assert all(p.packed is not None and p.weight is None for p in layer.projections)
    down = ours.base.model.model.layers[0].mlp.down_proj
    assert getattr(down, "base_layer", down).weight.is_meta  # (the slot table wraps a module an adapter targets)
    rows = [*names[:3], None]
    with_panels = first_tokens(ours, rows, new_tokens=3)
    monkeypatch.setenv("LORAPLEX_CPU_KERNEL", "0")
    torch_path, _ = bf16_engine(tiny)
    assert torch_path.runner.forward.layers[0].qkv.packed is None
    assert_same_to_bf16(with_panels, first_tokens(torch_path, rows, new_tokens=3))
