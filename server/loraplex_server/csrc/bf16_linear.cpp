// y = x @ W (+ bias) with fp32 activations and W stored in bf16, for the few rows of a decode step.
//
// A decode step reads every weight once for a handful of rows: it is bound by memory bandwidth, and
// fp32 weights are twice the bytes of the bf16 most checkpoints ship (SmolLM2, Llama, Qwen2). Where the
// weights are exactly bf16 values, storing them as bf16 loses nothing: each is widened to fp32 in a
// register and everything accumulates in fp32, so the results are the fp32 model's. torch has no such
// mixed GEMM on CPUs without native bf16 (its bf16 path converts whole matrices), hence this kernel.
//
// Layout ("packed"): W [in, out] cut into panels of 64 output columns, each panel contiguous,
// [out / 64][in][64] (the last panel zero-padded), so a row of panels is one sequential stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace {

using c10::detail::f32_from_bits;  // bf16 bits -> fp32

constexpr int64_t PANEL = 64;  // output columns per panel: four 16-lane fp32 registers
constexpr int64_t TILE_ROWS = 4;  // rows per register tile: 16 accumulators
constexpr int64_t PREFETCH = 64;  // panel rows (8 KiB) ahead: the hardware prefetcher alone leaves bandwidth unused

#ifdef __AVX512F__
inline __m512 widen16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// R rows of x times one full panel -> y[R][64].
template <int R>
void tile(const float* x, int64_t ldx, const uint16_t* panel, int64_t in_f, float* y, int64_t ldy,
          const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
  for (int64_t k = 0; k < in_f; ++k) {
    const uint16_t* w = panel + k * PANEL;
    _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PANEL), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH * PANEL + 32), _MM_HINT_T0);
    const __m512 w0 = widen16(w), w1 = widen16(w + 16), w2 = widen16(w + 32), w3 = widen16(w + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(y + r * ldy + 16 * c, acc[r][c]);
}
#endif

// Any rows and the first `cols` columns of a panel: the portable path (and the last, narrower panel).
void any_tile(const float* x, int64_t ldx, int64_t rows, const uint16_t* panel, int64_t in_f, int64_t cols, float* y,
              int64_t ldy, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[PANEL];
    for (int64_t c = 0; c < PANEL; ++c) acc[c] = bias && c < cols ? bias[c] : 0.f;
    for (int64_t k = 0; k < in_f; ++k) {
      const float xv = x[r * ldx + k];
      const uint16_t* w = panel + k * PANEL;
#pragma omp simd
      for (int64_t c = 0; c < PANEL; ++c) acc[c] += xv * f32_from_bits(w[c]);
    }
    std::memcpy(y + r * ldy, acc, cols * sizeof(float));
  }
}

void panel_rows(const float* x, int64_t ldx, int64_t rows, const uint16_t* panel, int64_t in_f, int64_t cols,
                float* y, int64_t ldy, const float* bias) {
  int64_t r = 0;
#ifdef __AVX512F__
  if (cols == PANEL) {
    for (; r + TILE_ROWS <= rows; r += TILE_ROWS) tile<TILE_ROWS>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias);
    const int64_t left = rows - r;
    if (left == 3) tile<3>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias);
    if (left == 2) tile<2>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias);
    if (left == 1) tile<1>(x + r * ldx, ldx, panel, in_f, y + r * ldy, ldy, bias);
    r = rows;
  }
#endif
  if (r < rows) any_tile(x + r * ldx, ldx, rows - r, panel, in_f, cols, y + r * ldy, ldy, bias);
}

}  // namespace

// x [rows, in] fp32 (dense rows), packed [out / 64 rounded up, in, 64] bf16, bias [out] fp32 or none
// -> [rows, out] fp32.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "x: fp32 [rows, in]");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 && packed.is_contiguous() &&
              packed.size(2) == PANEL && packed.size(1) == x.size(1), "packed: bf16 [panels, in, 64]");
  TORCH_CHECK(out_features > 0 && (out_features + PANEL - 1) / PANEL == packed.size(0), "out_features and panels");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features),
              "bias: fp32 [out]");
  const int64_t rows = x.size(0), in_f = x.size(1), ldx = x.stride(0);
  auto y = at::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t j = p * PANEL;
      panel_rows(xp, ldx, rows, wp + p * in_f * PANEL, in_f, std::min(PANEL, out_features - j), yp + j,
                 out_features, bp ? bp + j : nullptr);
    }
  });
  return y;
}

// Whether this build has the AVX-512 register tiles. The portable path is correct everywhere, but on an AVX2
// CPU it was 1.7x slower than MKL's fp32 GEMM at 16 rows and 3x at 64: there the weights stay fp32.
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
