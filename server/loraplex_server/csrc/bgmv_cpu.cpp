// Batched gather mat-vec LoRA for CPU decode: out[b] += B[slot_b] @ (A[slot_b] @ x[b]), all in one call.
//
// Reads each row's adapter straight from the bf16 slot tables (no gathered copy), accumulates in fp32
// and adds into the bf16 base output in place. Decode is memory-bound on the adapters' bytes: with
// 32 distinct adapters they outweigh a small base layer, so bf16 reads and one pass matter.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

// bf16 bits <-> fp32, rounding to nearest even (NaN to the canonical NaN) as torch does.
using c10::detail::f32_from_bits;
using c10::detail::round_to_nearest_even;

// out: [N, out_features] bf16 (updated in place, rows may be strided); x: [N, in_features] bf16; row_slots: [N] int64
// a: [S, R, in_features] bf16; b_t: [S, R, out_features] bf16 (B transposed, so both loops run over
// contiguous memory); rank <= R (rows beyond are zero).
void bgmv_add_(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b_t, const at::Tensor& row_slots,
               int64_t rank) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b_t.scalar_type() == at::kBFloat16, "bf16 tables only");
  // out may be a column range of a wider output (a fused q/k/v projection): rows dense, any row stride.
  TORCH_CHECK(out.stride(1) == 1 && x.is_contiguous() && a.is_contiguous() && b_t.is_contiguous(), "dense rows");
  const int64_t rows = x.size(0), in_f = x.size(1), out_f = out.size(1), max_r = a.size(1);
  const int64_t out_stride = out.stride(0);
  TORCH_CHECK(rank <= max_r && rank <= 1024, "rank out of range");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  const auto* bp = reinterpret_cast<const uint16_t*>(b_t.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* sp = row_slots.data_ptr<int64_t>();

  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> xf(in_f), acc(out_f);
    float h[1024];
    for (int64_t n = first; n < last; ++n) {
      const int64_t slot = sp[n];
      if (slot == 0) continue;
      const uint16_t* xrow = xp + n * in_f;
      for (int64_t i = 0; i < in_f; ++i) xf[i] = f32_from_bits(xrow[i]);
      const uint16_t* arow = ap + slot * max_r * in_f;
      for (int64_t k = 0; k < rank; ++k) {
        const uint16_t* ak = arow + k * in_f;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < in_f; ++i) sum += f32_from_bits(ak[i]) * xf[i];
        h[k] = sum;
      }
      const uint16_t* brow = bp + slot * max_r * out_f;
      uint16_t* orow = op + n * out_stride;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < rank; ++k) {
        const uint16_t* bk = brow + k * out_f;
        const float hk = h[k];
#pragma omp simd
        for (int64_t j = 0; j < out_f; ++j) acc[j] += f32_from_bits(bk[j]) * hk;
      }
      for (int64_t j = 0; j < out_f; ++j) orow[j] = round_to_nearest_even(f32_from_bits(orow[j]) + acc[j]);
    }
  });
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("bgmv_add_(Tensor(a!) out, Tensor x, Tensor a, Tensor b_t, Tensor row_slots, int rank) -> ()");
  m.impl("bgmv_add_", c10::DispatchKey::CPU, &bgmv_add_);
}
