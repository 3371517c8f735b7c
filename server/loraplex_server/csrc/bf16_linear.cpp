// y = x @ W (+ bias) with W stored in bf16 and x in fp32 or bf16, for the rows of a step.
//
// A decode step reads every weight once for a handful of rows: it is bound by memory bandwidth. Two cases:
// - fp32 activations (the default on CPUs without native bf16). Most checkpoints ship bf16 (SmolLM2, Llama,
//   Qwen2), so their fp32 weights are exact bf16 values: stored as bf16 they lose nothing and stream half the
//   bytes. Each weight is widened to fp32 in a register and everything accumulates in fp32, so the results
//   are the fp32 model's. torch has no such mixed GEMM.
// - bf16 activations (the default on CPUs with AVX512-BF16 or AMX). torch's bf16 linear (oneDNN, on a weight
//   it does not keep prepacked) was 2.5-3x slower than this kernel for 1 to 4 rows. Here pairs of bf16
//   multiply-accumulate into fp32 with AVX512-BF16's dot product (vdpbf16ps), and each output is rounded to
//   bf16 once, as torch does.
//
// Layout ("packed"): W [in, out] cut into panels of 64 output columns, each panel contiguous and its rows
// taken in pairs, [out / 64][in / 2][64][2] (the last panel zero-padded): element (k, c) of a panel sits at
// (k / 2) * 128 + c * 2 + k % 2. A panel is one sequential stream; a 32-bit lane holds the pair of weights
// that vdpbf16ps multiplies with a pair of x, and the fp32 path splits a lane into its two weights with a
// shift and a mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace {

using at::BFloat16;
using c10::detail::f32_from_bits;  // bf16 bits -> fp32

constexpr int64_t PANEL = 64;  // output columns per panel: four 16-lane fp32 registers
constexpr int64_t PAIR_ROW = 2 * PANEL;  // bf16 values per pair of panel rows
constexpr int64_t TILE_ROWS = 4;  // rows per register tile: 16 accumulators
constexpr int64_t PREFETCH = 32;  // pairs of panel rows (8 KiB) ahead: the hardware prefetcher alone leaves bandwidth

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) { return static_cast<float>(v); }

#ifdef __AVX512F__
inline void prefetch(const uint16_t* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PAIR_ROW), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PAIR_ROW + 32), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PAIR_ROW + 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PAIR_ROW + 96), _MM_HINT_T0);
}

inline void init(__m512 acc[4], const float* bias) {
  for (int c = 0; c < 4; ++c) acc[c] = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
}

template <typename Out>
inline void store(Out* y, const __m512 acc[4]) {
  if constexpr (std::is_same_v<Out, float>) {
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(y + 16 * c, acc[c]);
  } else {
    alignas(64) float out[PANEL];
    for (int c = 0; c < 4; ++c) _mm512_store_ps(out + 16 * c, acc[c]);
    for (int64_t c = 0; c < PANEL; ++c) y[c] = BFloat16(out[c]);  // round to nearest even, as torch does
  }
}

// R rows of fp32 x times one full panel -> y[R][64]: each 32-bit lane of a load is a pair (k, k + 1) of one
// column; shifted left it is the first weight as fp32, masked the second.
template <int R, typename Out>
void tile(const float* x, int64_t ldx, const uint16_t* panel, int64_t in_f, Out* y, int64_t ldy,
          const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) init(acc[r], bias);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < in_f; k += 2) {
    const uint16_t* w = panel + (k / 2) * PAIR_ROW;
    prefetch(w);
    __m512 even[4], odd[4];
    for (int c = 0; c < 4; ++c) {
      const __m512i pairs = _mm512_loadu_si512(w + 32 * c);
      even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      odd[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
    }
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_set1_ps(x[r * ldx + k]), x1 = _mm512_set1_ps(x[r * ldx + k + 1]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(x1, odd[c], _mm512_fmadd_ps(x0, even[c], acc[r][c]));
    }
  }
  for (int r = 0; r < R; ++r) store(y + r * ldy, acc[r]);
}
#endif

#ifdef __AVX512BF16__
// R rows of bf16 x times one full panel -> y[R][64] bf16: one vdpbf16ps per 16 columns and pair of k.
template <int R>
void tile_bf16(const BFloat16* x, int64_t ldx, const uint16_t* panel, int64_t in_f, BFloat16* y, int64_t ldy,
               const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) init(acc[r], bias);
  for (int64_t k = 0; k < in_f; k += 2) {
    const uint16_t* w = panel + (k / 2) * PAIR_ROW;
    prefetch(w);
    __m512bh pairs[4];
    for (int c = 0; c < 4; ++c) pairs[c] = (__m512bh)_mm512_loadu_si512(w + 32 * c);
    for (int r = 0; r < R; ++r) {
      int32_t xpair;
      std::memcpy(&xpair, x + r * ldx + k, sizeof xpair);  // x[k] and x[k + 1], in the weights' lane order
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xpair);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, pairs[c]);
    }
  }
  for (int r = 0; r < R; ++r) store(y + r * ldy, acc[r]);
}
#endif

// Any rows and the first `cols` columns of a panel: the portable path (and the last, narrower panel).
template <typename In, typename Out>
void any_tile(const In* x, int64_t ldx, int64_t rows, const uint16_t* panel, int64_t in_f, int64_t cols, Out* y,
              int64_t ldy, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[PANEL];
    for (int64_t c = 0; c < PANEL; ++c) acc[c] = bias && c < cols ? bias[c] : 0.f;
    for (int64_t k = 0; k < in_f; ++k) {
      const float xv = to_float(x[r * ldx + k]);
      const uint16_t* w = panel + (k / 2) * PAIR_ROW + k % 2;
#pragma omp simd
      for (int64_t c = 0; c < PANEL; ++c) acc[c] += xv * f32_from_bits(w[2 * c]);
    }
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = static_cast<Out>(acc[c]);
  }
}

// Calls tile(R, r) over all rows in register tiles: R = TILE_ROWS rows from r, then one tile of what is left.
template <typename Tile>
void in_tiles(int64_t rows, Tile&& tile) {
  int64_t r = 0;
  for (; r + TILE_ROWS <= rows; r += TILE_ROWS) tile(std::integral_constant<int, TILE_ROWS>{}, r);
  if (rows - r == 3) tile(std::integral_constant<int, 3>{}, r);
  if (rows - r == 2) tile(std::integral_constant<int, 2>{}, r);
  if (rows - r == 1) tile(std::integral_constant<int, 1>{}, r);
}

// All rows times one panel, in register tiles where the build has them.
template <typename In, typename Out>
void panel_rows(const In* x, int64_t ldx, int64_t rows, const uint16_t* panel, int64_t in_f, int64_t cols, Out* y,
                int64_t ldy, const float* bias) {
  if (cols == PANEL) {
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<In, BFloat16>) {
      in_tiles(rows, [&](auto R, int64_t r) { tile_bf16<R()>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias); });
      return;
    }
#endif
#ifdef __AVX512F__
    if constexpr (std::is_same_v<In, float>) {
      in_tiles(rows, [&](auto R, int64_t r) { tile<R()>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias); });
      return;
    }
#endif
  }
  any_tile(x, ldx, rows, panel, in_f, cols, y, ldy, bias);
}

template <typename In, typename Out>
void run(const In* x, int64_t ldx, int64_t rows, const uint16_t* packed, int64_t panels, int64_t in_f,
         int64_t out_f, Out* y, const float* bias) {
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t j = p * PANEL;
      panel_rows(x, ldx, rows, packed + p * in_f * PANEL, in_f, std::min(PANEL, out_f - j), y + j, out_f,
                 bias ? bias + j : nullptr);
    }
  });
}

}  // namespace

// x [rows, in] fp32 or bf16 (dense rows), packed [out / 64 rounded up, in / 2, 64, 2] bf16, bias [out] fp32 or
// none -> [rows, out] in x's dtype.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2 &&
              x.stride(1) == 1, "x: fp32 or bf16 [rows, in]");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.is_contiguous() &&
              packed.size(2) == PANEL && packed.size(3) == 2 && packed.size(1) * 2 == x.size(1),
              "packed: bf16 [panels, in / 2, 64, 2]");
  TORCH_CHECK(out_features > 0 && (out_features + PANEL - 1) / PANEL == packed.size(0), "out_features and panels");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features),
              "bias: fp32 [out]");
  const int64_t rows = x.size(0), in_f = x.size(1), ldx = x.stride(0), panels = packed.size(0);
  auto y = at::empty({rows, out_features}, x.options());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<BFloat16>());
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), ldx, rows, wp, panels, in_f, out_features, y.data_ptr<float>(), bp);
  } else {
#ifdef __AVX512BF16__
    run(x.data_ptr<BFloat16>(), ldx, rows, wp, panels, in_f, out_features, y.data_ptr<BFloat16>(), bp);
#else  // widened once, then the fp32 tiles; each output rounded to bf16 once
    const auto xf = x.to(at::kFloat);
    run(xf.data_ptr<float>(), xf.stride(0), rows, wp, panels, in_f, out_features, y.data_ptr<BFloat16>(), bp);
#endif
  }
  return y;
}

// Whether this build has the AVX-512 register tiles. The portable path is correct everywhere, but on an AVX2
// CPU it was 1.7x slower than MKL's fp32 GEMM at 16 rows and 3x at 64: there the weights stay as they were.
bool bf16_linear_tiled() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("bf16_linear_tiled() -> bool");
  m.impl("bf16_linear_tiled", c10::DispatchKey::CatchAll, &bf16_linear_tiled);
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.impl("bf16_linear", c10::DispatchKey::CPU, &bf16_linear);
}
