// The small ops of a step of our Llama-family forward on CPU, each one pass over its data in one call.
//
// Eager torch spends more time dispatching a step's ~40 small ops per layer (RMSNorm alone is six) than
// computing them: about a third of a one-row decode step of SmolLM2. Each op here rounds where the torch
// ops it replaces round (nothing in fp32; after every op in bf16), so both paths give the same values up
// to summation order. Attention reads each decode row's keys and values where they lie in the paged
// cache, instead of gathering a padded copy of every row's context first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// A value as torch's op of dtype T would store it: itself in fp32, rounded to nearest even in bf16.
template <typename T>
inline float stored(float v) {
  return static_cast<float>(static_cast<T>(v));
}

#ifdef __AVX512F__
// e^x of 16 lanes: 2^n * p(r) with n = round(x / ln 2), |r| <= ln 2 / 2 and p the degree-6 Taylor polynomial;
// relative error below 2e-7 (libm's expf is the scalar path's), x clamped to [-87, 88] where fp32 ends.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), x);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 lanes_left(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORAPLEX_VECTOR_BF16 1
template <typename T>  // the dtypes with 16-lane paths (dispatch also instantiates double, refused at run time)
constexpr bool kLanes = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
// 16 values (the first lanes of mask m) of fp32 or bf16 memory as fp32 lanes, and back. bf16 is rounded to
// nearest even with NaN made canonical, bit for bit as c10's round_to_nearest_even (AVX512-BF16's own
// conversion would flush subnormals).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i half = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m256i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, bf16_bits(v)); }
// What storing v as T and reading it back gives: v in fp32, v rounded in bf16 (vector `stored<T>`).
template <typename T>
inline __m512 stored16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
  }
}
#endif

template <typename T>
void rms_norm_row(const T* x, const T* weight, T* out, int64_t hidden, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < hidden; ++i) squares += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i)
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * stored<T>(static_cast<float>(x[i]) * inv));
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [rows, hidden] with dense rows");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight: [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight of one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fp32 or bf16");
}

#ifdef LORAPLEX_VECTOR_BF16
// x += delta (when given), then out = weight * stored(x / rms(x)): two passes of 16 lanes over the row.
template <typename T>
void norm_row16(T* x, const T* delta, const T* weight, T* out, int64_t hidden, float eps) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += 16) {
    const __mmask16 m = lanes_left(hidden - i);
    __m512 v = load16(x + i, m);
    if (delta != nullptr) {
      v = stored16<T>(_mm512_add_ps(v, load16(delta + i, m)));
      store16(x + i, v, m);
    }
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(hidden) + eps));
  for (int64_t i = 0; i < hidden; i += 16) {
    const __mmask16 m = lanes_left(hidden - i);
    store16(out + i, _mm512_mul_ps(load16(weight + i, m), stored16<T>(_mm512_mul_ps(load16(x + i, m), inv))), m);
  }
}
#endif

template <typename T>
void norm_rows(T* x, int64_t ldx, const T* delta, int64_t ldd, const T* weight, T* out, int64_t rows,
               int64_t hidden, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      T* xr = x + r * ldx;
#ifdef LORAPLEX_VECTOR_BF16
      if constexpr (kLanes<T>) {
        norm_row16(xr, delta != nullptr ? delta + r * ldd : nullptr, weight, out + r * hidden, hidden, eps);
        continue;
      }
#endif
      if (delta != nullptr) {
        const T* dr = delta + r * ldd;
        for (int64_t i = 0; i < hidden; ++i)
          xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(dr[i]));
      }
      rms_norm_row(xr, weight, out + r * hidden, hidden, eps);
    }
  });
}

template <typename T>
void rotate_rows(T* qkv, int64_t ld, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = qkv + t * ld + h * dim;
        for (int64_t i = 0; i < half; ++i) {  // x * cos + cat(-x2, x1) * sin, rounded as those ops round
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          x[i] = static_cast<T>(stored<T>(x1 * static_cast<float>(c[i])) + stored<T>(-x2 * static_cast<float>(s[i])));
          x[i + half] = static_cast<T>(stored<T>(x2 * static_cast<float>(c[i + half])) +
                                       stored<T>(x1 * static_cast<float>(s[i + half])));
        }
      }
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, int64_t ld, T* out, int64_t tokens, int64_t inner) {
  at::parallel_for(0, tokens, 8, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const T* g = gate_up + t * ld;
      const T* u = g + inner;
      T* o = out + t * inner;
      int64_t i = 0;
#ifdef LORAPLEX_VECTOR_BF16
      if constexpr (kLanes<T>) {
        for (; i < inner; i += 16) {
          const __mmask16 m = lanes_left(inner - i);
          const __m512 x = load16(g + i, m);
          const __m512 one = _mm512_set1_ps(1.f);
          const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
          store16(o + i, _mm512_mul_ps(stored16<T>(silu), load16(u + i, m)), m);
        }
      }
#endif
      for (; i < inner; ++i) {
        const float x = static_cast<float>(g[i]);
        o[i] = static_cast<T>(stored<T>(x / (1.f + std::exp(-x))) * static_cast<float>(u[i]));
      }
    }
  });
}


// s[t] = e^(s[t] - top) over one head's scores; returns their sum.
inline float exponentiate(float* s, int64_t count, float top) {
  int64_t t = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 total = _mm512_setzero_ps();
  for (; t < count; t += 16) {
    const __mmask16 live = lanes_left(count - t);
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(s + t, live, p);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, p));
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; t < count; ++t) sum += (s[t] = std::exp(s[t] - top));
  return sum;
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// n values as fp32: fp32 ones where they lie, others converted into `buffer`.
inline const float* as_floats(const float* values, std::vector<float>&, int64_t) { return values; }
template <typename T>
const float* as_floats(const T* values, std::vector<float>& buffer, int64_t n) {
  int64_t i = 0;
#ifdef LORAPLEX_VECTOR_BF16
  if constexpr (kLanes<T>)
    for (; i < n; i += 16) store16(buffer.data() + i, load16(values + i, lanes_left(n - i)), lanes_left(n - i));
#endif
  for (; i < n; ++i) buffer[i] = static_cast<float>(values[i]);
  return buffer.data();
}

// The softmax state of one row's heads over a span of its context: per head the running max, the sum of
// e^(score - max) and the sum of those weights times the values.
struct Partial {
  std::vector<float> top, total, acc;  // [heads], [heads], [heads * dim]
};

// Attends all heads of one row over positions[0, count): each key and value row (every kv head, contiguous)
// is read once. Scores and values go through fp32 buffers so bf16 is converted once per element.
template <typename T>
void attend_span(const float* q, const T* keys, const T* values, const int64_t* positions, int64_t count,
                 int64_t heads, int64_t kv_heads, int64_t dim, Partial& part) {
  part.top.assign(heads, 0.f);
  part.total.assign(heads, 0.f);  // a total of 0 marks a span with nothing to attend
  part.acc.assign(heads * dim, 0.f);
  if (count == 0) return;
  const int64_t group = heads / kv_heads, width = kv_heads * dim;
  std::vector<float> scores(heads * count), row(width);
  for (int64_t t = 0; t < count; ++t) {
    const float* k = as_floats(keys + positions[t] * width, row, width);
    for (int64_t h = 0; h < heads; ++h) scores[h * count + t] = dot(q + h * dim, k + (h / group) * dim, dim);
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores.data() + h * count;
    const float top = *std::max_element(s, s + count);
    part.top[h] = top;
    part.total[h] = exponentiate(s, count, top);
  }
  for (int64_t t = 0; t < count; ++t) {
    const float* v = as_floats(values + positions[t] * width, row, width);
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * count + t];
      const float* vh = v + (h / group) * dim;
      float* a = part.acc.data() + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += p * vh[d];
    }
  }
}

template <typename T>
void attend_rows(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& kv_index, const at::Tensor& lengths, double scale, at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = keys.size(1), context = kv_index.size(1);
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  // Fewer rows than threads: each row's context is split into spans attended apart and merged
  // (flash-decoding), so one long row still uses every core. A span is at least 128 positions.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = rows >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads / rows, context / 128));
  std::vector<Partial> parts(rows * splits);
  at::parallel_for(0, rows * splits, 1, [&](int64_t first, int64_t last) {
    std::vector<float> qf(heads * dim);
    for (int64_t job = first; job < last; ++job) {
      const int64_t r = job / splits, piece = job % splits;
      const int64_t span = (length[r] + splits - 1) / splits;
      const int64_t from = std::min(length[r], piece * span), to = std::min(length[r], from + span);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < dim; ++d)
          qf[h * dim + d] = static_cast<float>(q[r * query.stride(0) + h * query.stride(1) + d]) * static_cast<float>(scale);
      attend_span(qf.data(), k, v, index + r * context + from, to - from, heads, kv_heads, dim, parts[job]);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      float top = -INFINITY;
      for (int64_t piece = 0; piece < splits; ++piece) {
        const Partial& p = parts[r * splits + piece];
        if (p.total[h] > 0.f) top = std::max(top, p.top[h]);
      }
      float total = 0.f;
      std::vector<float> acc(dim, 0.f);
      for (int64_t piece = 0; piece < splits; ++piece) {
        const Partial& p = parts[r * splits + piece];
        if (p.total[h] == 0.f) continue;  // an empty span
        const float w = std::exp(p.top[h] - top);
        total += w * p.total[h];
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * p.acc[h * dim + d];
      }
      T* dst = o + (r * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[d] / total);
    }
  }
}

}  // namespace

// out = RMSNorm(x) * weight, as Hugging Face's LlamaRMSNorm computes it.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), nullptr, 0, weight.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

// x += delta (the residual, in place), then returns RMSNorm(x) * weight: the pair between two blocks.
at::Tensor add_rms_norm_(at::Tensor x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.stride(1) == 1 && delta.scalar_type() == x.scalar_type(),
              "delta: like x");
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_", [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), delta.data_ptr<scalar_t>(), delta.stride(0),
                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                        static_cast<float>(eps));
  });
  return out;
}

// Rotary embedding in place on the first `heads` heads of each row of qkv [tokens, >= heads * dim] (q and k
// side by side), with cos and sin [tokens, dim] (Hugging Face's rotate_half form).
void rotary_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= heads * dim && dim % 2 == 0, "qkv rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
              cos.size(0) == qkv.size(0) && cos.size(1) == dim, "cos, sin: [tokens, dim]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "one dtype");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rotary_", [&] {
    rotate_rows<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), cos.data_ptr<scalar_t>(),
                          sin.data_ptr<scalar_t>(), qkv.size(0), heads, dim);
  });
}

// silu(gate) * up of gate_up [tokens, 2 * inner] (gate columns first) -> [tokens, inner].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "gate_up rows");
  const int64_t inner = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), inner}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), gate_up.stride(0), out.data_ptr<scalar_t>(),
                            gate_up.size(0), inner);
  });
  return out;
}

// Decode attention: query [rows, heads, dim] (one token per row, any row and head strides), keys and
// values [positions, kv_heads, dim] (a layer of the paged cache), kv_index [rows, context] the cache
// positions of each row's context (the first lengths[row] of them count) -> [rows, heads, dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& kv_index, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query: [rows, heads, dim]");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "keys, values: [positions, kv_heads, dim]");
  TORCH_CHECK(keys.size(2) == query.size(2) && query.size(1) % keys.size(1) == 0, "heads and dims agree");
  TORCH_CHECK(keys.scalar_type() == query.scalar_type() && values.scalar_type() == query.scalar_type(), "one dtype");
  TORCH_CHECK(kv_index.dim() == 2 && kv_index.size(0) == query.size(0) && kv_index.is_contiguous() &&
              kv_index.scalar_type() == at::kLong, "kv_index: [rows, context] int64");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == query.size(0) && lengths.scalar_type() == at::kLong &&
              lengths.is_contiguous(), "lengths: [rows] int64");
  const int64_t context = kv_index.size(1), positions = keys.size(0);
  const int64_t* length = lengths.data_ptr<int64_t>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  for (int64_t r = 0; r < query.size(0); ++r) {
    TORCH_CHECK(length[r] > 0 && length[r] <= context, "a row's length is outside its context");
    for (int64_t t = 0; t < length[r]; ++t)
      TORCH_CHECK(index[r * context + t] >= 0 && index[r * context + t] < positions, "cache position out of range");
  }
  auto out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "decode_attention", [&] {
    attend_rows<scalar_t>(query, keys, values, kv_index, lengths, scale, out);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int dim) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor kv_index, Tensor lengths, float scale)"
        " -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, &add_rms_norm_);
  m.impl("rotary_", c10::DispatchKey::CPU, &rotary_);
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
  m.impl("decode_attention", c10::DispatchKey::CPU, &decode_attention);
}
