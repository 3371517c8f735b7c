"""Gathered LoRA for CUDA decode in Triton (issue 14), with the CPU kernel's call:
`bgmv_add_(out, x, A, B_t, row_slots, rank)` adds B[slot n] @ (A[slot n] @ x[n]) to out[n] for every
row in two launches per layer (shrink, expand), reading the slot tables in place: no gathered copy of
the rows' weights, whatever the mix of adapters.

Off unless LORAPLEX_TRITON_LORA=1: it has passed its parity tests only in Triton's interpreter on the
CPU (tests/test_triton_lora.py), not yet been timed on a GPU against the torch path, which stays the
default there. Triton is imported only when it is turned on.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)
BLOCK_K = 128  # input features per shrink step
BLOCK_N = 128  # output features per expand program
MIN_BLOCK_R = 16  # tl.dot-free reductions still want a power of two of at least this many ranks


@cache
def _kernels():
    from loraplex_server.lora import triton_lora_kernels  # imports triton

    return triton_lora_kernels


def bgmv_add_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, row_slots: torch.Tensor,
              rank: int) -> None:
    """out [N, out_features] += per row: (x[n] @ a[slot n, :rank].T) @ b_t[slot n, :rank]; in place."""
    k = _kernels()
    rows, in_features = x.shape
    max_rank, out_features = a.shape[1], b_t.shape[2]
    if not (a.is_contiguous() and b_t.is_contiguous() and x.stride(1) == 1 and out.stride(1) == 1):
        raise ValueError("slot tables must be contiguous and rows dense")
    block_r = max(MIN_BLOCK_R, k.triton.next_power_of_2(rank))
    # Enough programs to fill the device when there are few rows: split the input features.
    split_k = max(1, min(8, k.triton.cdiv(in_features, BLOCK_K) // 4))
    h = torch.zeros(rows, block_r, dtype=torch.float32, device=x.device)
    k.shrink[(rows, split_k)](x, a, row_slots, h, in_features, max_rank, rank, x.stride(0),
                              BLOCK_R=block_r, BLOCK_K=BLOCK_K, SPLIT_K=split_k)
    k.expand[(rows, k.triton.cdiv(out_features, BLOCK_N))](h, b_t, row_slots, out, out_features, max_rank, rank,
                                                           out.stride(0), BLOCK_R=block_r, BLOCK_N=BLOCK_N)


@cache
def triton_lora() -> SimpleNamespace | None:
    """The kernel (an object with `bgmv_add_`) when LORAPLEX_TRITON_LORA=1 and Triton imports, else None."""
    if os.environ.get("LORAPLEX_TRITON_LORA", "0") != "1":
        return None
    try:
        _kernels()
    except ImportError as exc:
        log.warning("LORAPLEX_TRITON_LORA=1 but Triton is unavailable (%s): using the torch path", exc)
        return None
    log.info("LoRA decode on the Triton kernels (LORAPLEX_TRITON_LORA=1)")
    return SimpleNamespace(bgmv_add_=bgmv_add_)
