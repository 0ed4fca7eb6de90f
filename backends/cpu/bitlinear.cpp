// bitlinear: BitNet b1.58's BitLinear over 2-bit packed ternary weights (sdk/sparsedge/ops/bitlinear.py has the
// layout and the arithmetic): y [T, N] = (W q_t) / (scale * s_t), W read in its packing, never widened.
//
// Activations: per token s = (1 / max(amax, 1e-5)) * 127, q = clamp(round-half-even(x s), -128, 127), each an IEEE
// fp32 op (the composite reference's and transformers' ops, so q and s are bit-identical to theirs), into a
// per-thread buffer padded with zeros to a multiple of 32 columns, with sum(q).
// Weights: a byte row holds 4 output rows (row 4g + i in bits 2i), as codes c = w + 1 in {0, 1, 2}. A 32-byte load
// gives 32 columns of 4 rows; each row's codes are (b >> 2i) & 3, dotted with q as unsigned x signed bytes
// (vpdpbusd with AVX-VNNI / AVX512-VNNI, else maddubs + madd: |pair sum| <= 2 * 3 * 128, no saturation), so
// sum_k w q = sum_k c q - sum(q) exactly in int32 (|sum| <= 127 K). The scale is one fp32 division per output,
// int sum -> fp32 then / (scale[n] * s): the reference's ops. Without AVX2 a scalar loop does the same integer sums.
// A row tail shorter than 32 columns is copied into a zeroed 32-byte buffer (the padded q is zero there).
//
// Work split (threadpool.h's pool, as qlinear): T = 1: byte rows in pairs, split evenly over threads (>= kMinBytes of
// weights each), weights prefetched kPrefetch bytes ahead along the thread's contiguous run. T > 1: chunks of
// kChunk byte rows over threads; each chunk's rows (a few KiB) are walked for every pair of tokens while they stay
// in cache. Per-output arithmetic does not depend on the split.
#include "quant_blocks.h"

namespace sparsedge::cpu {
namespace {

constexpr int64_t kCols = 32;   // columns per SIMD step (and the q buffer's padding)
constexpr int64_t kChunk = 16;  // byte rows per chunk when T > 1

struct TAct {
  const int8_t* q;    // [T, Kp], zero past K
  const float* s;     // [T] 127 / max(amax, 1e-5)
  const int32_t* qs;  // [T] sum of q
  int64_t Kp;
};

void quantize_token(const float* x, int64_t K, int8_t* q, float* s_out, int32_t* sum_out) {
  float amax = 0.f;
  int64_t k = 0;
#ifdef SPARSEDGE_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  amax = _mm_cvtss_f32(h);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = (1.f / std::max(amax, 1e-5f)) * 127.f;  // torch's 127 / t: reciprocal, then a product
  int32_t sum = 0;
  k = 0;
#ifdef SPARSEDGE_AVX2
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  __m256i acc = _mm256_setzero_si256();
  for (; k + 8 <= K; k += 8) {
    const __m256i v = _mm256_min_epi32(
        _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), sv), kRound)), lo),
        hi);
    acc = _mm256_add_epi32(acc, v);
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    for (int i = 0; i < 8; ++i) q[k + i] = static_cast<int8_t>(lanes[i]);
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  sum = _mm_cvtsi128_si32(s4);
#endif
  for (; k < K; ++k) {
    const int v = static_cast<int>(std::min(127.f, std::max(-128.f, std::nearbyint(x[k] * s))));
    q[k] = static_cast<int8_t>(v);
    sum += v;
  }
  *s_out = s;
  *sum_out = sum;
}

// x [T, K] fp32 -> int8 rows padded to Kp, in per-thread scratch reused across calls (valid until this thread's
// next call)
TAct quantize_tokens(const float* x, int64_t T, int64_t K) {
  const int64_t Kp = (K + kCols - 1) / kCols * kCols;
  static thread_local std::vector<int8_t> q_buf;
  static thread_local std::vector<float> s_buf;
  static thread_local std::vector<int32_t> sum_buf;
  if (static_cast<int64_t>(q_buf.size()) < T * Kp) q_buf.resize(T * Kp);
  if (static_cast<int64_t>(s_buf.size()) < T) s_buf.resize(T), sum_buf.resize(T);
  int8_t* q = q_buf.data();
  float* s = s_buf.data();
  int32_t* sum = sum_buf.data();
  parallel_for(T, even_grain(T, 4 * K), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memset(q + t * Kp + K, 0, Kp - K);
      quantize_token(x + t * K, K, q + t * Kp, s + t, sum + t);
    }
  });
  return TAct{q, s, sum, Kp};
}

#ifdef SPARSEDGE_AVX2
inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// byte rows g0..g0+R-1 (output rows 4 g0 .. 4 (g0 + R) - 1) against tokens t0..t0+C-1
template <int R, int C>
void ternary_tile(const uint8_t* w, int64_t K, const TAct& X, int64_t g0, int64_t t0, const float* scale, float* y,
                  int64_t N, const uint8_t* pf_end) {
  int32_t dots[R][4][C];
  const uint8_t* rows = w + g0 * K;
  const int8_t* xq[C];
  for (int c = 0; c < C; ++c) xq[c] = X.q + (t0 + c) * X.Kp;
#ifdef SPARSEDGE_AVX2
  __m256i acc[R][4][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < C; ++c) acc[r][i][c] = _mm256_setzero_si256();
  const __m256i m3 = _mm256_set1_epi8(3);
  auto step = [&](const __m256i* b, int64_t k) {
    __m256i xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load32(xq[c] + k);
    for (int r = 0; r < R; ++r) {
      const __m256i f[4] = {_mm256_and_si256(b[r], m3), _mm256_and_si256(_mm256_srli_epi16(b[r], 2), m3),
                            _mm256_and_si256(_mm256_srli_epi16(b[r], 4), m3),
                            _mm256_and_si256(_mm256_srli_epi16(b[r], 6), m3)};
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < C; ++c) acc[r][i][c] = dot_acc(acc[r][i][c], f[i], xv[c]);
    }
  };
  int64_t k = 0;
  for (; k + kCols <= K; k += kCols) {
    __m256i b[R];
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) prefetch(rows + r * K + k + kPrefetch, 64, pf_end);
      b[r] = load32(rows + r * K + k);
    }
    step(b, k);
  }
  if (k < K) {  // row tail: codes past K are zero, and so is the padded q there
    alignas(32) uint8_t tail[R][kCols] = {};
    __m256i b[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(tail[r], rows + r * K + k, K - k);
      b[r] = load32(tail[r]);
    }
    step(b, k);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < C; ++c) dots[r][i][c] = hsum_i32(acc[r][i][c]);
#else
  (void)pf_end;
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < C; ++c) dots[r][i][c] = 0;
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const int b = rows[r * K + k];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < C; ++c) dots[r][i][c] += ((b >> (2 * i)) & 3) * static_cast<int32_t>(xq[c][k]);
    }
#endif
  for (int c = 0; c < C; ++c) {
    const float s = X.s[t0 + c];
    float* yt = y + (t0 + c) * N;
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) {
        const int64_t n = 4 * (g0 + r) + i;
        yt[n] = static_cast<float>(dots[r][i][c] - X.qs[t0 + c]) / (scale[n] * s);
      }
  }
}

void run_ternary(const uint8_t* w, int64_t P, int64_t K, const TAct& X, int64_t T, const float* scale, float* y) {
  const int64_t N = 4 * P;
  if (T == 1) {
    const int64_t pairs = (P + 1) / 2;
    parallel_for(pairs, even_grain(pairs, 2 * K), [&](int64_t a, int64_t b) {
      const int64_t g1 = std::min(P, 2 * b);
      const uint8_t* end = w + g1 * K;
      int64_t g = 2 * a;
      for (; g + 2 <= g1; g += 2) ternary_tile<2, 1>(w, K, X, g, 0, scale, y, N, end);
      if (g < g1) ternary_tile<1, 1>(w, K, X, g, 0, scale, y, N, end);
    });
    return;
  }
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  parallel_for(chunks, even_grain(chunks, kChunk * K * T), [&](int64_t a, int64_t b) {
    for (int64_t ch = a; ch < b; ++ch) {
      const int64_t g0 = ch * kChunk, g1 = std::min(P, g0 + kChunk);
      const uint8_t* end = w + g1 * K;  // no prefetch past the chunk: its rows are re-read from cache
      int64_t t = 0;
      for (; t + 2 <= T; t += 2) {
        int64_t g = g0;
        for (; g + 2 <= g1; g += 2) ternary_tile<2, 2>(w, K, X, g, t, scale, y, N, end);
        if (g < g1) ternary_tile<1, 2>(w, K, X, g, t, scale, y, N, end);
      }
      if (t < T) {
        int64_t g = g0;
        for (; g + 2 <= g1; g += 2) ternary_tile<2, 1>(w, K, X, g, t, scale, y, N, end);
        if (g < g1) ternary_tile<1, 1>(w, K, X, g, t, scale, y, N, end);
      }
    }
  });
}

at::Tensor bitlinear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) > 0,
                    "bitlinear: w must be uint8 [N/4, K] (4 ternary rows per byte row), got ", w.scalar_type(), " ",
                    w.sizes());
  const int64_t P = w.size(0), K = w.size(1), N = 4 * P;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K && at::isFloatingType(x.scalar_type()),
                    "bitlinear: x must be a float tensor [..., K=", K, "], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat,
                    "bitlinear: scale must be float32 [N=", N, "] (one per output row), got ", scale.scalar_type(),
                    " ", scale.sizes());
  const int64_t T = x.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T == 0 || N == 0) return y.to(x.scalar_type()).reshape(sizes);
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  auto xf = x.reshape({T, K}).to(at::kFloat).contiguous();
  const TAct X = quantize_tokens(xf.data_ptr<float>(), T, K);
  run_ternary(wc.data_ptr<uint8_t>(), P, K, X, T, sc.data_ptr<float>(), y.data_ptr<float>());
  return y.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) { m.impl("bitlinear", &bitlinear_impl); }

}  // namespace sparsedge::cpu
