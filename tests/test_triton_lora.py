"""The Triton gathered-LoRA kernel (triton_lora.py) against the plain torch computation: every row on its
own adapter (or none), mixed and padded ranks, sizes that are not multiples of the blocks. On CUDA it runs
compiled (LORAPLEX_TEST_DEVICE=cuda); otherwise in Triton's interpreter on the CPU (conftest.py sets
TRITON_INTERPRET; the `test` extra installs Triton, so CI runs them). Skipped only where Triton is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (GPU machines have it)")

from loraplex_server.lora.triton_lora import bgmv_add_  # noqa: E402
from tiny_models import TEST_DEVICE as DEVICE  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the reference's norm


def tables(slots: int, max_rank: int, ranks: list[int], in_features: int, out_features: int, dtype, gen):
    """Slot tables as the slot table holds them: slot 0 and ranks past each adapter's are zero."""
    a = torch.zeros(slots, max_rank, in_features, dtype=dtype)
    b_t = torch.zeros(slots, max_rank, out_features, dtype=dtype)
    for slot, rank in enumerate(ranks, start=1):
        a[slot, :rank] = torch.randn(rank, in_features, generator=gen).to(dtype)
        b_t[slot, :rank] = (torch.randn(rank, out_features, generator=gen) * 0.1).to(dtype)
    return a.to(DEVICE), b_t.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_torch_computation_row_by_row(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    in_features, out_features, max_rank = 200 + seed * 37, 130 + seed * 61, 16
    ranks = [16, 4, 9, 1]  # mixed ranks, zero-padded to the table's 16
    a, b_t = tables(len(ranks) + 1, max_rank, ranks, in_features, out_features, dtype, gen)
    rows = 9
    row_slots = torch.randint(0, len(ranks) + 1, (rows,), generator=gen)
    row_slots[0] = 0  # a row without an adapter must stay exactly as it was
    x = torch.randn(rows, in_features, generator=gen).to(dtype).to(DEVICE)
    out = torch.randn(rows, out_features, generator=gen).to(dtype).to(DEVICE)
    before = out.clone()
    reference = before.double().cpu()
    for n, slot in enumerate(row_slots.tolist()):
        reference[n] += (x[n].double().cpu() @ a[slot].double().cpu().T) @ b_t[slot].double().cpu()

    bgmv_add_(out, x, a, b_t, row_slots.to(DEVICE), max(ranks))

    got = out.double().cpu()
    assert torch.isfinite(got).all()
    error = (got - reference).norm() / reference.norm()
    assert error < TOLERANCE[dtype], float(error)
    unadapted = (row_slots == 0).nonzero().flatten()
    assert torch.equal(out[unadapted].cpu(), before[unadapted].cpu())


def test_split_input_features_high_ranks_and_strided_rows_match_the_torch_computation():
    """Wide inputs split over several programs that add into one row (atomic_add), ranks past the smallest
    block, and rows that are views into wider buffers (the kernel takes their row strides)."""
    gen = torch.Generator().manual_seed(3)
    in_features, out_features, max_rank = 1100, 300, 64  # 9 input blocks -> 2 programs per row
    ranks = [64, 33, 16]
    a, b_t = tables(len(ranks) + 1, max_rank, ranks, in_features, out_features, torch.float32, gen)
    row_slots = torch.tensor([1, 2, 3, 0, 2])
    x = torch.randn(len(row_slots), in_features + 20, generator=gen).to(DEVICE)[:, 10:in_features + 10]
    out = torch.randn(len(row_slots), out_features + 8, generator=gen).to(DEVICE)[:, :out_features]
    reference = out.double().cpu().clone()
    for n, slot in enumerate(row_slots.tolist()):
        reference[n] += (x[n].double().cpu() @ a[slot].double().cpu().T) @ b_t[slot].double().cpu()

    bgmv_add_(out, x, a, b_t, row_slots.to(DEVICE), max(ranks))

    error = (out.double().cpu() - reference).norm() / reference.norm()
    assert error < TOLERANCE[torch.float32], float(error)


def test_refuses_tables_it_cannot_read_in_place():
    a = torch.zeros(2, 8, 32)[:, :, ::2]  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        bgmv_add_(torch.zeros(1, 8), torch.zeros(1, 16), a, torch.zeros(2, 8, 8), torch.zeros(1, dtype=torch.long), 8)


def test_a_lora_layer_decodes_the_same_through_the_kernel_and_the_torch_path():
    """The kernel where the engine calls it: single-token rows on mixed adapters, bf16, in a BatchedLoraLinear."""
    from types import SimpleNamespace

    from loraplex_server.lora.layers import BatchedLoraLinear, BatchState
    from loraplex_server.lora.triton_lora import bgmv_add_

    in_features, out_features, slots = 96, 72, 4
    base = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).to(DEVICE)
    row_slots = [1, 0, 2, 3, 1, 2]
    x = torch.randn(1, len(row_slots), in_features, generator=torch.Generator().manual_seed(5))
    x = x.to(torch.bfloat16).to(DEVICE)
    calls = []

    def counted(*args):
        calls.append(args[4].tolist())
        bgmv_add_(*args)

    outputs = []
    for kernel in (None, SimpleNamespace(bgmv_add_=counted)):
        state = BatchState()
        layer = BatchedLoraLinear(base, state, slots, torch.bfloat16, torch.device(DEVICE))
        layer.kernel = kernel
        weights = torch.Generator().manual_seed(6)
        for slot, rank in ((1, 8), (2, 3), (3, 8)):
            A = torch.randn(rank, in_features, generator=weights).to(torch.bfloat16)
            B = (torch.randn(out_features, rank, generator=weights) * 0.1).to(torch.bfloat16)
            targets, sources, zeros = layer.slot_writes(slot, A.to(DEVICE), B.to(DEVICE), 1.0)
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source)
            for region in zeros:
                region.zero_()
        state.set_rows(row_slots, torch.device(DEVICE), lengths=[1] * len(row_slots))
        outputs.append(layer(x).float().cpu())
    torch_path, kernel_path = outputs
    assert calls == [row_slots]  # the layer took the kernel, once, with every row's slot
    assert (kernel_path - torch_path).norm() / torch_path.norm() < 1e-2
    assert torch.equal(kernel_path[0, 1], torch_path[0, 1])  # the row without an adapter: the base alone
