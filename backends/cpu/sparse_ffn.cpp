// Fused CPU kernels for the sparse FFN ops (sdk/sparsedge/ops/ffn.py has the schema and the composite reference):
//   ffn_predict      p = P2 (P1 x) + b, compaction of {i : p_i > 0} into an ascending index list
//   ffn_predict_q4   the 4-bit gate x up predictor: int8 x against 4-bit W_gate/W_up rows (exact integer
//                    group dots, AVX2 maddubs, 4 groups reduced at once), |act(g^) u^| > thresh_i, the same
//                    compaction
//   sparse_ffn_rows  gate/up dot products for the listed rows only, activation (+ tau zeros), and the
//                    down accumulation over the surviving rows of W_down^T, read in place
//   sparse_ffn       both, per token, without materialising the index list outside the kernel
//
// Parallelism (ATen's parallel_for = OpenMP in this build):
//   - T >= threads: tokens are split over threads, every token runs serially (nested parallel_for
//     calls degrade to inline loops), so prefill-per-token keeps all cores busy;
//   - otherwise (decode, T = 1): each phase is split: predictor rows, gate/up over the active rows,
//     and the down accumulation over blocks of output columns (no partial sums to reduce).
// The per-element arithmetic order never depends on the split, so results are identical for any
// thread count. Inner loops are AVX2/FMA (8 lanes, bf16 via a 16-bit shift, fp16 via F16C) with a
// scalar tail doing the same fused multiply-adds; without AVX2 the scalar path is used.
// Workspaces are O(I) floats per thread (thread_local, grown once); no weight-sized buffers.
#include "cpu_common.h"
#include "threadpool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "simd.h"
#include "act.h"

namespace sparsedge::cpu {
namespace {

// both gate and up rows against the same x (x is loaded once)
template <typename T>
inline void dot2(const T* a, const T* b, const float* x, int64_t n, float* oa, float* ob,
                 const T* next_a = nullptr, const T* next_b = nullptr) {
  int64_t i = 0;
  float sa = 0.f, sb = 0.f;
#ifdef SPARSEDGE_AVX2
  if constexpr (kSimd<T>) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    const T* pa = next_a ? next_a : a;  // the next rows, prefetched in step into L2 (see accumulate_rows)
    const T* pb = next_b ? next_b : b;
    for (; i + 16 <= n; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(pa + i), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pb + i), _MM_HINT_T1);
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      a0 = _mm256_fmadd_ps(load8(a + i), x0, a0);
      b0 = _mm256_fmadd_ps(load8(b + i), x0, b0);
      a1 = _mm256_fmadd_ps(load8(a + i + 8), x1, a1);
      b1 = _mm256_fmadd_ps(load8(b + i + 8), x1, b1);
    }
    for (; i + 8 <= n; i += 8) {
      const __m256 x0 = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(load8(a + i), x0, a0);
      b0 = _mm256_fmadd_ps(load8(b + i), x0, b0);
    }
    sa = hsum(_mm256_add_ps(a0, a1));
    sb = hsum(_mm256_add_ps(b0, b1));
  }
#endif
  for (; i < n; ++i) {
    sa = std::fma(ld(a, i), x[i], sa);
    sb = std::fma(ld(b, i), x[i], sb);
  }
  *oa = sa;
  *ob = sb;
}

// ---- per-thread workspace (grown, never shrunk; O(I + d + r) floats) ----------------------------
struct Workspace {
  std::vector<float> xf, z, hv, h2, yf, xs;
  std::vector<int32_t> idx, rows2, chunk_count, xsum8;
  std::vector<int8_t> xq;
};
Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}
template <typename V> inline auto* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

constexpr int64_t kPredChunk = 256;  // neurons per compaction chunk (fixed: independent of threads)

template <typename X>
void load_x(const X* x, int64_t d, float* xf) {
  for (int64_t i = 0; i < d; ++i) xf[i] = to_f32(x[i]);
}

// Writes the ascending ids i in [0, I) with active(i) to `idx`; returns how many. Chunks of kPredChunk
// neurons are tested in parallel (each compacts into its own slice of idx), then slid together.
template <typename Active>
int64_t compact_active(int64_t I, int64_t grain, int32_t* idx, int32_t* chunk_count, const Active& active) {
  const int64_t nchunks = (I + kPredChunk - 1) / kPredChunk;
  sparsedge::cpu::parallel_for(nchunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kPredChunk, i1 = std::min(I, i0 + kPredChunk);
      int32_t m = 0;
      for (int64_t i = i0; i < i1; ++i)
        if (active(i)) idx[i0 + m++] = static_cast<int32_t>(i);
      chunk_count[c] = m;
    }
  });
  int64_t off = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t m = chunk_count[c];
    if (m && off != c * kPredChunk) std::memmove(idx + off, idx + c * kPredChunk, m * sizeof(int32_t));
    off += m;
  }
  return off;
}

// One token: predictor scores -> ascending active ids in `idx`; returns the count.
template <typename P>
int64_t predict_token(const float* xf, const P* p1, const P* p2, const float* bias, int64_t d, int64_t r,
                      int64_t I, int32_t* idx, float* z, int32_t* chunk_count) {
  sparsedge::cpu::parallel_for(r, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) z[j] = dot(p1 + j * d, xf, d);
  });
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(kPredChunk * r, 1));
  return compact_active(I, grain, idx, chunk_count,
                        [&](int64_t i) { return dot(p2 + i * r, z, r) + bias[i] > 0.f; });
}

// ---- 4-bit gate x up predictor (layout and arithmetic: ffn_predict_q4 in sdk/sparsedge/ops/ffn.py) -----------
// x -> int8 per group of G (xs = max|x| / 127, round half to even like torch.round); xsum8[g] = 8 * sum xq
// over the group, so a group dot can run on the stored nibbles q = w + 8: sum (q - 8) xq = sum q xq - xsum8.
void quantize_x(const float* xf, int64_t d, int64_t G, int8_t* xq, float* xs, int32_t* xsum8) {
  for (int64_t g0 = 0, gi = 0; g0 < d; g0 += G, ++gi) {
    float amax = 0.f;
    for (int64_t k = 0; k < G; ++k) amax = std::max(amax, std::fabs(xf[g0 + k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    xs[gi] = amax / 127.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < G; ++k) {
      xq[g0 + k] = static_cast<int8_t>(std::nearbyint(xf[g0 + k] * inv));
      sum += xq[g0 + k];
    }
    xsum8[gi] = 8 * sum;
  }
}

// sum_k q_k * xq_k over one group (q = stored nibble in [0, 15]): byte j holds input j (low), j + G/2 (high)
inline int32_t q4_group_dot_scalar(const uint8_t* qb, const int8_t* xb, int64_t G) {
  const int64_t half = G / 2;
  int32_t s = 0;
  for (int64_t j = 0; j < half; ++j) s += (qb[j] & 15) * xb[j] + (qb[j] >> 4) * xb[half + j];
  return s;
}

#ifdef SPARSEDGE_AVX2
// 8 int32 lanes whose sum is the group's sum q * xq (G a multiple of 64). maddubs takes the unsigned
// nibbles against signed xq; its pair sums stay below 2 * 15 * 127, far from int16 saturation.
inline __m256i q4_group_lanes(const uint8_t* qb, const int8_t* xb, int64_t G) {
  const int64_t half = G / 2;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  for (int64_t j = 0; j < half; j += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + j));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j));
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + half + j));
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, nib), xl),
                                       _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), xh));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
  }
  return acc;
}
#endif

// One 4-bit row estimate: sum over groups of dot_g * fp32(scale_g * xs_g) in fp64, where every term is
// exact; the fp32 result does not depend on the order of that sum (the kernel adds 4 groups at a time).
inline float q4_row(const uint8_t* q, const float* scale, const int8_t* xq, const float* xs, const int32_t* xsum8,
                    int64_t ng, int64_t G) {
  int64_t g = 0;
  double acc = 0.0;
#ifdef SPARSEDGE_AVX2
  if (G % 64 == 0) {
    __m256d vacc = _mm256_setzero_pd();
    for (; g + 4 <= ng; g += 4) {
      const int64_t step = G / 2;
      const __m256i a = _mm256_hadd_epi32(q4_group_lanes(q + g * step, xq + g * G, G),
                                          q4_group_lanes(q + (g + 1) * step, xq + (g + 1) * G, G));
      const __m256i b = _mm256_hadd_epi32(q4_group_lanes(q + (g + 2) * step, xq + (g + 2) * G, G),
                                          q4_group_lanes(q + (g + 3) * step, xq + (g + 3) * G, G));
      const __m256i h = _mm256_hadd_epi32(a, b);  // lanes: g, g+1, g+2, g+3 (low half) | same (high half)
      __m128i dots = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      dots = _mm_sub_epi32(dots, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xsum8 + g)));
      const __m128 c = _mm_mul_ps(_mm_loadu_ps(scale + g), _mm_loadu_ps(xs + g));
      vacc = _mm256_fmadd_pd(_mm256_cvtepi32_pd(dots), _mm256_cvtps_pd(c), vacc);
    }
    __m128d v2 = _mm_add_pd(_mm256_castpd256_pd128(vacc), _mm256_extractf128_pd(vacc, 1));
    acc = _mm_cvtsd_f64(_mm_add_sd(v2, _mm_unpackhi_pd(v2, v2)));
  }
#endif
  for (; g < ng; ++g)
    acc += static_cast<double>(q4_group_dot_scalar(q + g * (G / 2), xq + g * G, G) - xsum8[g]) *
           static_cast<double>(scale[g] * xs[g]);
  return static_cast<float>(acc);
}

int64_t predict_q4_token(const float* xf, const uint8_t* q, const float* scale, const float* thresh, int64_t d,
                         int64_t G, int64_t I, Act act, float param, int32_t* idx, int8_t* xq, float* xs,
                         int32_t* xsum8, int32_t* chunk_count) {
  const int64_t ng = d / G;
  quantize_x(xf, d, G, xq, xs, xsum8);
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(kPredChunk * d, 1));
  return compact_active(I, grain, idx, chunk_count, [&](int64_t i) {
    const uint8_t* qi = q + i * d;  // gate row, then the up row (d/2 bytes each)
    const float* si = scale + i * 2 * ng;
    const float g = q4_row(qi, si, xq, xs, xsum8, ng, G);
    const float u = q4_row(qi + d / 2, si + ng, xq, xs, xsum8, ng, G);
    return std::fabs(activate(act, g, u, param, 0.f)) > thresh[i];
  });
}

// One token: y (fp32, length d) = sum over listed rows of h_i * w_down_t[i]; returns rows accumulated.
template <typename W>
int64_t rows_token(const float* xf, const int32_t* idx, int64_t n, const W* wg, const W* wu, const W* wd,
                   int64_t d, Act act, float param, float tau, float* hv, int32_t* rows2, float* h2, float* y) {
  sparsedge::cpu::parallel_for(n, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = idx[k], nx = k + 1 < k1 ? idx[k + 1] : i;
      float g, u;
      dot2(wg + i * d, wu + i * d, xf, d, &g, &u, wg + nx * d, wu + nx * d);
      hv[k] = activate(act, g, u, param, tau);
    }
  });
  int64_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (hv[k] != 0.f) {
      rows2[m] = idx[k];
      h2[m++] = hv[k];
    }
  }
  const int64_t units = (d + 7) / 8;  // column blocks are multiples of 8 so SIMD/tail splits never move
  const int64_t grain = std::max<int64_t>(8, 4096 / std::max<int64_t>(m, 1));
  sparsedge::cpu::parallel_for(units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t c0 = u0 * 8, c1 = std::min(d, u1 * 8);
    std::fill(y + c0, y + c1, 0.f);
    accumulate_rows(wd, d, [rows2](int64_t k) { return static_cast<int64_t>(rows2[k]); }, h2, m, c0, c1, y + c0);
  });
  return m;
}

void check_weights(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd) {
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must be [T, d], got ", x.sizes());
  const int64_t d = x.size(1);
  for (const at::Tensor* t : {&wg, &wu, &wd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(1) == d, "sparse_ffn: weights must be [I, d] with d = ", d, ", got ",
                t->sizes());
    SPARSEDGE_CHECK_CPU_CONTIG(*t);
  }
  TORCH_CHECK(wg.size(0) == wu.size(0) && wu.size(0) == wd.size(0), "sparse_ffn: w_gate, w_up, w_down_t row counts differ");
  TORCH_CHECK(wg.scalar_type() == wu.scalar_type() && wu.scalar_type() == wd.scalar_type(),
              "sparse_ffn: w_gate, w_up and w_down_t must share one dtype");
}

// Runs `body(t)` for every token: across threads when there are enough tokens, else serially (and
// each token's phases parallelise inside).
template <typename F>
void for_tokens(int64_t T, const F& body) {
  if (T >= at::get_num_threads() && T > 1) {
    sparsedge::cpu::parallel_for(T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) body(t);
    });
  } else {
    for (int64_t t = 0; t < T; ++t) body(t);
  }
}

// ---- ops ---------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> ffn_predict_impl(const at::Tensor& x_in, const at::Tensor& p1_in,
                                                    const at::Tensor& p2_in, const at::Tensor& bias_in) {
  TORCH_CHECK(x_in.dim() == 2, "ffn_predict: x must be [T, d]");
  auto x = x_in.contiguous();
  auto p1 = p1_in.contiguous();
  auto p2 = p2_in.to(p1.scalar_type()).contiguous();
  auto bias = bias_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), d = x.size(1), r = p1.size(0), I = p2.size(0);
  TORCH_CHECK(p1.dim() == 2 && p1.size(1) == d, "ffn_predict: p1 must be [r, d]");
  TORCH_CHECK(p2.dim() == 2 && p2.size(1) == r, "ffn_predict: p2 must be [I, r]");
  TORCH_CHECK(bias.numel() == I, "ffn_predict: bias must be [I]");
  auto idx = at::empty({T, I}, x.options().dtype(at::kInt));
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* cp = count.data_ptr<int32_t>();
  const float* bp = bias.data_ptr<float>();
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "ffn_predict_x", [&] {
    using X = scalar_t;
    const X* xp = x.data_ptr<X>();
    SPARSEDGE_DISPATCH_FLOATS(p1.scalar_type(), "ffn_predict_p", [&] {
      using P = scalar_t;
      const P* p1p = p1.data_ptr<P>();
      const P* p2p = p2.data_ptr<P>();
      for_tokens(T, [&](int64_t t) {
        Workspace& ws = workspace();
        float* xf = grow(ws.xf, d);
        load_x(xp + t * d, d, xf);
        cp[t] = static_cast<int32_t>(predict_token(xf, p1p, p2p, bp, d, r, I, ip + t * I, grow(ws.z, r),
                                                   grow(ws.chunk_count, (I + kPredChunk - 1) / kPredChunk)));
      });
    });
  });
  return {idx, count};
}

std::tuple<at::Tensor, at::Tensor> ffn_predict_q4_impl(const at::Tensor& x_in, const at::Tensor& q_in,
                                                       const at::Tensor& scale_in, const at::Tensor& thresh_in,
                                                       c10::string_view activation, double act_param) {
  TORCH_CHECK(x_in.dim() == 2, "ffn_predict_q4: x must be [T, d]");
  auto x = x_in.contiguous();
  auto q = q_in.contiguous();
  auto scale = scale_in.to(at::kFloat).contiguous();
  auto thresh = thresh_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), d = x.size(1), I = q.size(0);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 3 && q.size(1) == 2 && q.size(2) * 2 == d,
              "ffn_predict_q4: q must be uint8 [I, 2, d/2] with d = ", d, ", got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == I && scale.size(1) == 2 && scale.size(2) > 0 &&
                  d % scale.size(2) == 0 && (d / scale.size(2)) % 2 == 0,
              "ffn_predict_q4: scale must be [I, 2, d/G] with an even group size G, got ", scale.sizes());
  TORCH_CHECK(thresh.numel() == I, "ffn_predict_q4: thresh must be [I]");
  const int64_t G = d / scale.size(2);
  const Act act = parse_act(activation);
  auto idx = at::empty({T, I}, x.options().dtype(at::kInt));
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* cp = count.data_ptr<int32_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* tp = thresh.data_ptr<float>();
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "ffn_predict_q4", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for_tokens(T, [&](int64_t t) {
      Workspace& ws = workspace();
      float* xf = grow(ws.xf, d);
      load_x(xp + t * d, d, xf);
      cp[t] = static_cast<int32_t>(predict_q4_token(xf, qp, sp, tp, d, G, I, act, static_cast<float>(act_param),
                                                    ip + t * I, grow(ws.xq, d), grow(ws.xs, d / G),
                                                    grow(ws.xsum8, d / G),
                                                    grow(ws.chunk_count, (I + kPredChunk - 1) / kPredChunk)));
    });
  });
  return {idx, count};
}

std::tuple<at::Tensor, at::Tensor> sparse_ffn_rows_impl(const at::Tensor& x_in, const at::Tensor& idx_in,
                                                        const at::Tensor& count_in, const at::Tensor& wg,
                                                        const at::Tensor& wu, const at::Tensor& wd,
                                                        c10::string_view activation, double act_param, double tau) {
  auto x = x_in.contiguous();
  check_weights(x, wg, wu, wd);
  auto idx = idx_in.to(at::kInt).contiguous();
  auto count = count_in.to(at::kInt).contiguous();
  const int64_t T = x.size(0), d = x.size(1), I = wg.size(0);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == T, "sparse_ffn_rows: idx must be [T, >= count]");
  TORCH_CHECK(count.numel() == T, "sparse_ffn_rows: count must be [T]");
  const int64_t stride = idx.size(1);
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {  // validate once, outside the parallel regions
    TORCH_CHECK(cp[t] >= 0 && cp[t] <= std::min(stride, I), "sparse_ffn_rows: count[", t, "] = ", cp[t],
                " out of range");
    for (int64_t k = 0; k < cp[t]; ++k)
      TORCH_CHECK(ip[t * stride + k] >= 0 && ip[t * stride + k] < I, "sparse_ffn_rows: idx[", t, ", ", k,
                  "] = ", ip[t * stride + k], " out of range [0, ", I, ")");
  }
  const Act act = parse_act(activation);
  auto y = at::empty({T, d}, x.options());
  auto down_count = at::empty({T}, x.options().dtype(at::kInt));
  int32_t* dp = down_count.data_ptr<int32_t>();
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "sparse_ffn_rows_x", [&] {
    using X = scalar_t;
    const X* xp = x.data_ptr<X>();
    X* yp = y.data_ptr<X>();
    SPARSEDGE_DISPATCH_FLOATS(wg.scalar_type(), "sparse_ffn_rows_w", [&] {
      using W = scalar_t;
      for_tokens(T, [&](int64_t t) {
        Workspace& ws = workspace();
        float* xf = grow(ws.xf, d);
        load_x(xp + t * d, d, xf);
        float* yf = std::is_same_v<X, float> ? reinterpret_cast<float*>(yp + t * d) : grow(ws.yf, d);
        const int64_t n = cp[t];
        dp[t] = static_cast<int32_t>(rows_token(xf, ip + t * stride, n, wg.data_ptr<W>(), wu.data_ptr<W>(),
                                                wd.data_ptr<W>(), d, act, static_cast<float>(act_param),
                                                static_cast<float>(tau), grow(ws.hv, std::max<int64_t>(n, 1)),
                                                grow(ws.rows2, std::max<int64_t>(n, 1)),
                                                grow(ws.h2, std::max<int64_t>(n, 1)), yf));
        if constexpr (!std::is_same_v<X, float>)
          for (int64_t c = 0; c < d; ++c) yp[t * d + c] = from_f32<X>(yf[c]);
      });
    });
  });
  return {y, down_count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_impl(
    const at::Tensor& x_in, const at::Tensor& p1_in, const at::Tensor& p2_in, const at::Tensor& bias_in,
    const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd, c10::string_view activation,
    double act_param, double tau) {
  auto x = x_in.contiguous();
  check_weights(x, wg, wu, wd);
  auto p1 = p1_in.contiguous();
  auto p2 = p2_in.to(p1.scalar_type()).contiguous();
  auto bias = bias_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), d = x.size(1), r = p1.size(0), I = wg.size(0);
  TORCH_CHECK(p1.dim() == 2 && p1.size(1) == d, "sparse_ffn: p1 must be [r, d]");
  TORCH_CHECK(p2.dim() == 2 && p2.size(0) == I && p2.size(1) == r, "sparse_ffn: p2 must be [I, r]");
  TORCH_CHECK(bias.numel() == I, "sparse_ffn: bias must be [I]");
  const Act act = parse_act(activation);
  auto y = at::empty({T, d}, x.options());
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  auto down_count = at::empty({T}, x.options().dtype(at::kInt));
  int32_t* cp = count.data_ptr<int32_t>();
  int32_t* dp = down_count.data_ptr<int32_t>();
  const float* bp = bias.data_ptr<float>();
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "sparse_ffn_x", [&] {
    using X = scalar_t;
    const X* xp = x.data_ptr<X>();
    X* yp = y.data_ptr<X>();
    SPARSEDGE_DISPATCH_FLOATS(wg.scalar_type(), "sparse_ffn_w", [&] {
      using W = scalar_t;
      const W* wgp = wg.data_ptr<W>();
      const W* wup = wu.data_ptr<W>();
      const W* wdp = wd.data_ptr<W>();
      TORCH_CHECK(p1.scalar_type() == wg.scalar_type() || p1.scalar_type() == at::kFloat,
                  "sparse_ffn: predictors must be fp32 or the weights' dtype");
      auto run = [&](auto p1p, auto p2p) {
        for_tokens(T, [&](int64_t t) {
          Workspace& ws = workspace();
          float* xf = grow(ws.xf, d);
          load_x(xp + t * d, d, xf);
          int32_t* idx = grow(ws.idx, I);
          const int64_t n = predict_token(xf, p1p, p2p, bp, d, r, I, idx, grow(ws.z, r),
                                          grow(ws.chunk_count, (I + kPredChunk - 1) / kPredChunk));
          cp[t] = static_cast<int32_t>(n);
          float* yf = std::is_same_v<X, float> ? reinterpret_cast<float*>(yp + t * d) : grow(ws.yf, d);
          dp[t] = static_cast<int32_t>(rows_token(xf, idx, n, wgp, wup, wdp, d, act,
                                                  static_cast<float>(act_param), static_cast<float>(tau),
                                                  grow(ws.hv, std::max<int64_t>(n, 1)),
                                                  grow(ws.rows2, std::max<int64_t>(n, 1)),
                                                  grow(ws.h2, std::max<int64_t>(n, 1)), yf));
          if constexpr (!std::is_same_v<X, float>)
            for (int64_t c = 0; c < d; ++c) yp[t * d + c] = from_f32<X>(yf[c]);
        });
      };
      if (p1.scalar_type() == at::kFloat) run(p1.data_ptr<float>(), p2.data_ptr<float>());
      else run(p1.data_ptr<W>(), p2.data_ptr<W>());
    });
  });
  return {y, count, down_count};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("ffn_predict", &ffn_predict_impl);
  m.impl("ffn_predict_q4", &ffn_predict_q4_impl);
  m.impl("sparse_ffn_rows", &sparse_ffn_rows_impl);
  m.impl("sparse_ffn", &sparse_ffn_impl);
}

}  // namespace sparsedge::cpu
