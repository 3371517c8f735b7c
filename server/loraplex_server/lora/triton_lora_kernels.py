"""The Triton kernels of triton_lora.py, in a module of their own: it imports triton at the top, which
the interpreter (TRITON_INTERPRET=1) needs to find `tl` in the kernels' globals, and which only a machine
with Triton can do."""

import triton
import triton.language as tl


@triton.jit
def shrink(x_ptr, a_ptr, slots_ptr, h_ptr, in_features, max_rank, rank, x_stride,
           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """h[row, :rank] += A[slot] @ x[row] over this program's share of the input features."""
    row, split = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    live = tl.where(slot == 0, 0, rank)  # slot 0 is "no adapter": every load masked off
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_row = a_ptr + slot * max_rank * in_features
    for k0 in range(split * BLOCK_K, in_features, SPLIT_K * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + row * x_stride + k, mask=k < in_features, other=0.0).to(tl.float32)
        a = tl.load(a_row + r[:, None] * in_features + k[None, :],
                    mask=(r[:, None] < live) & (k[None, :] < in_features), other=0.0).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    tl.atomic_add(h_ptr + row * BLOCK_R + r, acc, mask=r < live)

@triton.jit
def expand(h_ptr, bt_ptr, slots_ptr, out_ptr, out_features, max_rank, rank, out_stride,
           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[row, n-block] += h[row] @ B_t[slot][:, n-block], accumulated in fp32."""
    row, block = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    live = tl.where(slot == 0, 0, rank)
    r = tl.arange(0, BLOCK_R)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.load(h_ptr + row * BLOCK_R + r, mask=r < live, other=0.0)
    b = tl.load(bt_ptr + slot * max_rank * out_features + r[:, None] * out_features + n[None, :],
                mask=(r[:, None] < live) & (n[None, :] < out_features), other=0.0).to(tl.float32)
    delta = tl.sum(h[:, None] * b, axis=0)
    keep = n < tl.where(slot == 0, 0, out_features)  # a row without an adapter is not written
    current = tl.load(out_ptr + row * out_stride + n, mask=keep, other=0.0)
    tl.store(out_ptr + row * out_stride + n, (current.to(tl.float32) + delta).to(current.dtype), mask=keep)
