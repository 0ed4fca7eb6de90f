// Fused CPU kernels for the delta-attention ops of sdk/sparsedge/ops/delta.py (DeltaLLM, docs/methods.md §2).
//
// delta_encode: per KV head (threads over heads), tokens in order: d = k_t - ref, keep |d| > theta,
//   append (value in the cache dtype, uint8 channel) to the packed buffer, ref += stored value.
//   Capacity is checked per token before anything of that token is written; overflow raises.
// delta_attention: one task per (KV head, block of queries). For the task's R = rows (queries x G
//   query heads of the group) it
//   1. walks the packed deltas of its KV head once, keeping R running sums q_r . k_hat_j (the prefix
//      sum q.k_hat_j = q.k_hat_{j-1} + q.d_j); every delta entry is one R-wide FMA against a
//      transposed copy of the queries (qT[channel] is a contiguous R-vector), so the G query heads of
//      a GQA group share one pass over the pattern;
//   2. overwrites the exact region (sinks, local window) with exact q.k;
//   3. softmax in fp32 (two passes: max, then exp + sum) and P.V over the dense V, fp32 accumulation.
// Cache dtypes: fp32, bf16, fp16 (values, sink_k, window_k, v_cache share one dtype); q/k any float.
#include "cpu_common.h"
#include "threadpool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEDGE_DELTA_AVX2 1
#endif

namespace sparsedge::cpu {
namespace {

constexpr int64_t kLanes = 8;  // rows are padded to a multiple of one AVX2 register

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Thread-local scratch that only grows (avoids an mmap/munmap pair per call for large buffers).
inline float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

#ifdef SPARSEDGE_DELTA_AVX2
// exp(x) for x <= 0 (scores minus their max): Cody-Waite range reduction + degree-6 polynomial,
// relative error ~2e-7; inputs below -87 are clamped (their weight, < 2e-38, is then zeroed by the caller
// only where masked; elsewhere it is numerically irrelevant next to the max term of weight 1).
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  x = _mm256_max_ps(x, lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif


#ifdef SPARSEDGE_DELTA_AVX2
// 16 consecutive cache-dtype values -> two fp32 registers
inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
inline void load16(const c10::BFloat16* p, __m256& a, __m256& b) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16));
}
inline void load16(const c10::Half* p, __m256& a, __m256& b) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_cvtph_ps(_mm256_castsi256_si128(w));
  b = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
}

// acc[r][c0:c0+16] += sum_j P[j][r] * v[j][c0:c0+16] for rows r0..r0+NR-1, accumulators in registers.
// Each pass streams one 64-byte column block of V (one cache line per fp32 row).
template <int NR, typename T>
inline void pv_pass(const T* v, int64_t D, const float* P, int64_t Rp, int64_t nk, int64_t r0, int64_t c0,
                    float* acc) {
  __m256 lo[NR], hi[NR];
  for (int r = 0; r < NR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m256 va, vb;
    load16(v + j * D + c0, va, vb);
    const float* pj = P + j * Rp + r0;
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(pj + r);
      lo[r] = _mm256_fmadd_ps(w, va, lo[r]);
      hi[r] = _mm256_fmadd_ps(w, vb, hi[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm256_storeu_ps(acc + (r0 + r) * D + c0, lo[r]);
    _mm256_storeu_ps(acc + (r0 + r) * D + c0 + 8, hi[r]);
  }
}

template <typename T>
void pv_blocked(const T* v, int64_t D, const float* P, int64_t Rp, int64_t R, int64_t nk, float* acc) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, R - r0);
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
      switch (nr) {
        case 1: pv_pass<1, T>(v, D, P, Rp, nk, r0, c0, acc); break;
        case 2: pv_pass<2, T>(v, D, P, Rp, nk, r0, c0, acc); break;
        case 3: pv_pass<3, T>(v, D, P, Rp, nk, r0, c0, acc); break;
        default: pv_pass<4, T>(v, D, P, Rp, nk, r0, c0, acc); break;
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// delta_encode
// Head h of keys k [T_, H, D] (fp32) at positions start..: returns its nonzero count, or -(entries needed) when the
// packed buffer would overflow (nothing of that token is written).
template <typename T>
int64_t encode_head(const float* k, float* ref, const float* theta, T* values, uint8_t* chan, int32_t* offsets,
                    int64_t T_, int64_t H, int64_t D, int64_t cap, int64_t off_stride, int64_t start, int64_t h) {
  float* rf = ref + h * D;
  T* vals = values + h * cap;
  uint8_t* ch = chan + h * cap;
  int32_t* off = offsets + h * off_stride;
  const float th = theta[h];
  int64_t pos = off[start];
  int64_t count_h = 0;
  for (int64_t t = 0; t < T_; ++t) {
    const float* kt = k + (t * H + h) * D;
    int64_t cnt = 0;
    for (int64_t c = 0; c < D; ++c) cnt += std::fabs(kt[c] - rf[c]) > th;
    if (pos + cnt > cap) return -(pos + cnt);
    for (int64_t c = 0; c < D; ++c) {
      const float d = kt[c] - rf[c];
      if (std::fabs(d) > th) {
        const T stored = from_f32<T>(d);
        vals[pos] = stored;
        ch[pos] = static_cast<uint8_t>(c);
        rf[c] += to_f32(stored);
        ++pos;
      }
    }
    off[start + t + 1] = static_cast<int32_t>(pos);
    count_h += cnt;
  }
  return count_h;
}

template <typename T>
void encode_heads(const float* k, float* ref, const float* theta, T* values, uint8_t* chan, int32_t* offsets,
                  int64_t T_, int64_t H, int64_t D, int64_t cap, int64_t off_stride, int64_t start,
                  int64_t* nnz, std::vector<int64_t>& overflow) {
  sparsedge::cpu::parallel_for(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t r = encode_head(k, ref, theta, values, chan, offsets, T_, H, D, cap, off_stride, start, h);
      if (r < 0) overflow[h] = -r;
      nnz[h] = std::max<int64_t>(r, 0);
    }
  });
}

void check_encode_buffers(const at::Tensor& ref, const at::Tensor& values, const at::Tensor& chan,
                          const at::Tensor& offsets, int64_t H, int64_t D) {
  SPARSEDGE_CHECK_CPU_CONTIG(ref);
  SPARSEDGE_CHECK_CPU_CONTIG(values);
  SPARSEDGE_CHECK_CPU_CONTIG(chan);
  SPARSEDGE_CHECK_CPU_CONTIG(offsets);
  TORCH_CHECK(ref.scalar_type() == at::kFloat, "delta_encode: ref must be float32");
  TORCH_CHECK(chan.scalar_type() == at::kByte, "delta_encode: chan must be uint8");
  TORCH_CHECK(offsets.scalar_type() == at::kInt, "delta_encode: offsets must be int32");
  TORCH_CHECK(D <= 256, "delta_encode: head_dim must be <= 256 (uint8 channel indices)");
  TORCH_CHECK(ref.size(0) == H && ref.size(1) == D, "delta_encode: ref must be [H, D]");
  TORCH_CHECK(values.size(0) == H && chan.sizes() == values.sizes(), "delta_encode: values/chan must be [H, cap]");
}

at::Tensor delta_encode_impl(const at::Tensor& k_in, at::Tensor& ref, const at::Tensor& theta_in, at::Tensor& values,
                             at::Tensor& chan, at::Tensor& offsets, int64_t start) {
  TORCH_CHECK(k_in.dim() == 3, "delta_encode: k must be [T, H, D]");
  const int64_t T = k_in.size(0), H = k_in.size(1), D = k_in.size(2);
  check_encode_buffers(ref, values, chan, offsets, H, D);
  TORCH_CHECK(offsets.size(0) == H && start >= 0 && start + T < offsets.size(1),
              "delta_encode: positions ", start, "..", start + T - 1, " exceed the offsets table [H, ",
              offsets.size(1), "]");
  const int64_t cap = values.size(1);
  auto k = k_in.to(at::kFloat).contiguous();
  auto theta = theta_in.to(at::kFloat).contiguous();
  TORCH_CHECK(theta.numel() == H, "delta_encode: theta must have one entry per KV head");
  auto nnz = at::zeros({H}, at::kLong);
  std::vector<int64_t> overflow(H, -1);
  SPARSEDGE_DISPATCH_FLOATS(values.scalar_type(), "delta_encode", [&] {
    encode_heads<scalar_t>(k.data_ptr<float>(), ref.data_ptr<float>(), theta.data_ptr<float>(),
                           values.data_ptr<scalar_t>(), chan.data_ptr<uint8_t>(), offsets.data_ptr<int32_t>(), T,
                           H, D, cap, offsets.size(1), start, nnz.data_ptr<int64_t>(), overflow);
  });
  for (int64_t h = 0; h < H; ++h)
    TORCH_CHECK(overflow[h] < 0, "delta buffer capacity exceeded: head ", h, " needs ", overflow[h], " > ", cap,
                " entries");
  return nnz;
}

// ---------------------------------------------------------------------------------------------
// delta_attention
template <typename T>
struct DeltaArgs {
  const float* q;        // [T, Hq, D] fp32
  const float* k;        // [T, H, D] fp32 (keys of this chunk)
  const T* v;            // [H, Tmax, D]
  const T* vals;         // [H, cap]
  const uint8_t* chan;   // [H, cap]
  const int32_t* off;    // [H, Tmax + 1]
  const T* sink;         // [H, S_alloc, D]
  const T* win;          // [H, W_alloc, D]
  float* out;            // [T, Hq, D] fp32
  int64_t T_, Hq, H, G, D, Tmax, cap, s_alloc, w_alloc, start, n_sink, window;
  float scale;
};

// Prefix sums of the delta scores over keys j0..j1 (inclusive), starting from zero: acc[0:Rp] +=
// v * qT[c*Rp : c*Rp+Rp] for every delta entry, stored into S row j - j0 after each token j >= n_sink; the
// final sum goes to `total` when given (decode items add their offsets later). Four accumulators keep
// four FMA chains in flight: one chain would make the walk FMA-latency bound (~4 cycles per entry).
template <typename T>
void delta_walk(const DeltaArgs<T>& a, int64_t h, int64_t j0, int64_t j1, int64_t Rp, const float* qT, float* S,
                float* total = nullptr) {
  const T* vals = a.vals + h * a.cap;
  const uint8_t* ch = a.chan + h * a.cap;
  const int32_t* off = a.off + h * (a.Tmax + 1);
#ifdef SPARSEDGE_DELTA_AVX2
  if (Rp == 8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = j0; j <= j1; ++j) {
      int64_t e = off[j];
      const int64_t e1 = off[j + 1];
      for (; e + 4 <= e1; e += 4) {
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[e])), _mm256_loadu_ps(qT + ch[e] * 8), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[e + 1])), _mm256_loadu_ps(qT + ch[e + 1] * 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[e + 2])), _mm256_loadu_ps(qT + ch[e + 2] * 8), a2);
        a3 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[e + 3])), _mm256_loadu_ps(qT + ch[e + 3] * 8), a3);
      }
      for (; e < e1; ++e)
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[e])), _mm256_loadu_ps(qT + ch[e] * 8), a0);
      if (j >= a.n_sink)
        _mm256_storeu_ps(S + (j - j0) * 8, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    if (total) _mm256_storeu_ps(total, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return;
  }
#endif
  std::vector<float> acc_buf(Rp, 0.f);
  float* acc = acc_buf.data();
  for (int64_t j = j0; j <= j1; ++j) {
    for (int64_t e = off[j]; e < off[j + 1]; ++e) {
      const float v = to_f32(vals[e]);
      const float* qr = qT + ch[e] * Rp;
#pragma omp simd
      for (int64_t r = 0; r < Rp; ++r) acc[r] += v * qr[r];
    }
    if (j >= a.n_sink) std::memcpy(S + (j - j0) * Rp, acc, Rp * sizeof(float));
  }
  if (total) std::memcpy(total, acc, Rp * sizeof(float));
}

// Key j of head h for an exact score, in fp32: a key of this call (positions start..), or else a sink or a
// window slot of the cache, converted into kbuf.
template <typename T>
const float* exact_key(const DeltaArgs<T>& a, int64_t h, int64_t j, float* kbuf) {
  if (j >= a.n_sink && j >= a.start) return a.k + ((j - a.start) * a.H + h) * a.D;
  const T* src = j < a.n_sink ? a.sink + (h * a.s_alloc + j) * a.D : a.win + (h * a.w_alloc + j % a.window) * a.D;
  for (int64_t c = 0; c < a.D; ++c) kbuf[c] = to_f32(src[c]);
  return kbuf;
}

template <typename T>
void attend_block(const DeltaArgs<T>& a, int64_t h, int64_t t0, int64_t t1) {
  thread_local std::vector<float> buf_q, buf_s, buf_o, buf_k;
  const int64_t G = a.G, D = a.D;
  const int64_t R = (t1 - t0) * G, Rp = round_up(R, kLanes);
  const int64_t p_last = a.start + t1 - 1;
  const int64_t nk = p_last + 1;  // keys 0..p_last
  float* qT = scratch(buf_q, D * Rp);
  float* S = scratch(buf_s, nk * Rp);
  float* acc = scratch(buf_o, Rp * D + Rp * 3);
  float* mx = acc + Rp * D;
  float* sum = mx + Rp;
  float* kbuf = scratch(buf_k, D);
  // queries, transposed: qT[c][r], r = (t - t0) * G + g; padded rows are zero
  std::fill(qT, qT + D * Rp, 0.f);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = a.q + (t * a.Hq + h * G + g) * D;
      const int64_t r = (t - t0) * G + g;
      for (int64_t c = 0; c < D; ++c) qT[c * Rp + r] = qr[c];
    }
  // 1. delta scores: keys n_sink .. p_last - window (for the block's last query; earlier rows overwrite
  //    or mask what is not theirs below)
  const int64_t jd_max = p_last - a.window;
  if (jd_max >= a.n_sink) delta_walk<T>(a, h, 0, jd_max, Rp, qT, S);
  // 2. exact scores, 3. causal mask (rows of a prefill block end at different positions)
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p = a.start + t;
    const int64_t r0 = (t - t0) * G;
    auto exact = [&](int64_t j, const float* key) {
      for (int64_t g = 0; g < G; ++g) {
        const float* qr = a.q + (t * a.Hq + h * G + g) * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < D; ++c) s += qr[c] * key[c];
        S[j * Rp + r0 + g] = s;
      }
    };
    const int64_t s_end = std::min(a.n_sink, p + 1);
    for (int64_t j = 0; j < s_end; ++j) exact(j, exact_key(a, h, j, kbuf));
    for (int64_t j = std::max(a.n_sink, p - a.window + 1); j <= p; ++j) exact(j, exact_key(a, h, j, kbuf));
    for (int64_t j = p + 1; j < nk; ++j)
      for (int64_t g = 0; g < G; ++g) S[j * Rp + r0 + g] = -std::numeric_limits<float>::infinity();
  }
  // 4. softmax(scale * s) over each row, in fp32: pass 1 max, pass 2 exp + sum (in place)
  const float sc = a.scale;
  std::fill(mx, mx + Rp, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + Rp, 0.f);
  for (int64_t j = 0; j < nk; ++j) {
    const float* sj = S + j * Rp;
#pragma omp simd
    for (int64_t r = 0; r < Rp; ++r) mx[r] = std::max(mx[r], sj[r]);
  }
  for (int64_t r = 0; r < Rp; ++r)
    if (!std::isfinite(mx[r])) mx[r] = 0.f;  // padded rows
#ifdef SPARSEDGE_DELTA_AVX2
  for (int64_t r = 0; r < Rp; r += 8) {
    const __m256 m = _mm256_mul_ps(_mm256_loadu_ps(mx + r), _mm256_set1_ps(sc));
    const __m256 scv = _mm256_set1_ps(sc);
    __m256 sv = _mm256_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      float* sj = S + j * Rp + r;
      const __m256 raw = _mm256_loadu_ps(sj);
      const __m256 valid = _mm256_cmp_ps(raw, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(exp256(_mm256_fmsub_ps(raw, scv, m)), valid);
      _mm256_storeu_ps(sj, e);
      sv = _mm256_add_ps(sv, e);
    }
    _mm256_storeu_ps(sum + r, sv);
  }
#else
  for (int64_t j = 0; j < nk; ++j) {
    float* sj = S + j * Rp;
    for (int64_t r = 0; r < Rp; ++r) {
      const float e = std::isinf(sj[r]) ? 0.f : std::exp(sj[r] * sc - mx[r] * sc);
      sj[r] = e;
      sum[r] += e;
    }
  }
#endif
  // 5. P.V: each V row is read once for all R rows of the block
#ifdef SPARSEDGE_DELTA_AVX2
  const bool blocked = !std::is_same_v<T, double> && D % 16 == 0 && R <= 8;  // decode: register-blocked V passes
#else
  const bool blocked = false;
#endif
  std::fill(acc, acc + Rp * D, 0.f);
#ifdef SPARSEDGE_DELTA_AVX2
  if constexpr (!std::is_same_v<T, double>) {
    if (blocked) pv_blocked<T>(a.v + h * a.Tmax * D, D, S, Rp, R, nk, acc);
  }
#endif
  for (int64_t j = 0; j < (blocked ? 0 : nk); ++j) {
    const T* vsrc = a.v + (h * a.Tmax + j) * D;
    const float* vr;
    if constexpr (std::is_same_v<T, float>) {
      vr = vsrc;
    } else {
      for (int64_t c = 0; c < D; ++c) kbuf[c] = to_f32(vsrc[c]);
      vr = kbuf;
    }
    const float* pj = S + j * Rp;
    for (int64_t r = 0; r < R; ++r) {
      const float w = pj[r];
      if (w == 0.f) continue;
      float* o = acc + r * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) o[c] += w * vr[c];
    }
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (t - t0) * G + g;
      const float inv = 1.f / sum[r];
      float* dst = a.out + (t * a.Hq + h * G + g) * D;
      for (int64_t c = 0; c < D; ++c) dst[c] = acc[r * D + c] * inv;
    }
}

#ifdef SPARSEDGE_DELTA_AVX2
constexpr int64_t kDecodeChunk = 256;  // keys per decode item: its scores ([keys][8] fp32, 8 KB) stay in L1

// Softmax partial of one decode item over the score rows S[0..n) ([n][8], lanes = query heads of the group):
// m = lane max, l = sum of exp(scale (s - m)), S overwritten by those exps, acc[g] = sum_j S[j][g] v[j]
// (g < G; stored, not added).
template <typename T>
void softmax_pv(float* S, int64_t n, const T* v, int64_t D, int64_t G, float scale, float* m, float* l,
                float* acc) {
  constexpr int64_t Rp = kLanes;
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; ++j) mv = _mm256_max_ps(mv, _mm256_loadu_ps(S + j * Rp));
  const __m256 scv = _mm256_set1_ps(scale), ms = _mm256_mul_ps(mv, scv);
  __m256 sv = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 e = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(S + j * Rp), scv, ms));
    _mm256_storeu_ps(S + j * Rp, e);
    sv = _mm256_add_ps(sv, e);
  }
  _mm256_storeu_ps(m, mv);
  _mm256_storeu_ps(l, sv);
  if (D % 16 == 0) {
    pv_blocked<T>(v, D, S, Rp, G, n, acc);
    return;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < G; ++g) {
      const float w = S[j * Rp + g];
      for (int64_t c = 0; c < D; ++c) acc[g * D + c] += w * to_f32(v[j * D + c]);
    }
}

// Decode (one query position) in one parallel pass over (KV head, item) work items, flash-decoding style. Item c
// of a head walks the deltas of keys [c K, (c + 1) K) from zero: its delta scores are the true ones minus a
// constant per query head, the walk total of the keys before it (the prefix-sum offset). Softmax is invariant to
// that constant inside the item, so each item finishes on its own: local max, exp, sum and P.V, with its
// scores in L1. Two more items per head take the exact keys: the sinks, and the local window. The merge adds
// each item's offset to its max and rescales. Every K delta and V row is read once; the earlier three-pass split kept all
// scores in a [keys][8] array that was written and re-read three times (at 8K as many bytes as V itself).
template <typename T>
void attend_decode_items(const DeltaArgs<T>& a) {
  const int64_t H = a.H, G = a.G, D = a.D, Rp = kLanes;
  const int64_t p = a.start, jd_max = p - a.window;  // delta-scored keys: n_sink .. jd_max
  const int64_t walked = jd_max >= a.n_sink ? jd_max + 1 : 0;  // the walk covers keys 0 .. jd_max
  const int64_t chunks = (walked + kDecodeChunk - 1) / kDecodeChunk, per_head = chunks + 2;
  const int64_t items = H * per_head;
  // an item without keys keeps l = 0, and the merge skips it
  std::vector<float> qT(H * D * Rp, 0.f), tot(items * Rp, 0.f), m(items * Rp), l(items * Rp, 0.f),
      acc(items * G * D);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < D; ++c) qT[(h * D + c) * Rp + g] = a.q[(h * G + g) * D + c];
  const int64_t grain = (p + 1) * D * a.Hq < (1 << 16) ? items : 1;  // a short context: no fork/join
  sparsedge::cpu::parallel_for(items, grain, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> buf_s, buf_k;
    float* S = scratch(buf_s, std::max(kDecodeChunk, std::max(a.n_sink, a.window + 1)) * Rp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / per_head, c = i % per_head;
      float* mi = m.data() + i * Rp;
      float* li = l.data() + i * Rp;
      float* ai = acc.data() + i * G * D;
      const T* vh = a.v + h * a.Tmax * D;
      if (c < chunks) {
        const int64_t j0 = c * kDecodeChunk, j1 = std::min(walked, j0 + kDecodeChunk);
        delta_walk<T>(a, h, j0, j1 - 1, Rp, qT.data() + h * D * Rp, S, tot.data() + i * Rp);
        const int64_t js = std::max(j0, a.n_sink);  // sink keys are walked (their deltas count) but scored exactly
        if (js < j1) softmax_pv<T>(S + (js - j0) * Rp, j1 - js, vh + js * D, D, G, a.scale, mi, li, ai);
        continue;
      }
      // exact keys: the sinks 0 .. n_sink - 1 (item chunks), the window jd_max + 1 .. p (item chunks + 1)
      const int64_t j0 = c == chunks ? 0 : std::max(a.n_sink, jd_max + 1);
      const int64_t j1 = c == chunks ? std::min(a.n_sink, p + 1) : p + 1;
      float* kbuf = scratch(buf_k, D);
      for (int64_t j = j0; j < j1; ++j) {
        const float* key = exact_key(a, h, j, kbuf);
        for (int64_t g = 0; g < Rp; ++g) {
          float sdot = 0.f;
          if (g < G) {
            const float* qr = a.q + (h * G + g) * D;
#pragma omp simd reduction(+ : sdot)
            for (int64_t c2 = 0; c2 < D; ++c2) sdot += qr[c2] * key[c2];
          }
          S[(j - j0) * Rp + g] = sdot;
        }
      }
      if (j1 > j0) softmax_pv<T>(S, j1 - j0, vh + j0 * D, D, G, a.scale, mi, li, ai);
    }
  });
  // merge: item c's true max is its local max plus its offset (the walk totals of the items before it)
  std::vector<float> top(per_head);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t g = 0; g < G; ++g) {
      float offset = 0.f, mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < per_head; ++c) {
        const int64_t i = h * per_head + c;
        top[c] = l[i * Rp + g] > 0.f ? m[i * Rp + g] + (c < chunks ? offset : 0.f)
                                     : -std::numeric_limits<float>::infinity();
        if (c < chunks) offset += tot[i * Rp + g];
        mx = std::max(mx, top[c]);
      }
      float* dst = a.out + (h * G + g) * D;
      std::fill(dst, dst + D, 0.f);
      float denom = 0.f;
      for (int64_t c = 0; c < per_head; ++c) {
        const int64_t i = h * per_head + c;
        if (!(l[i * Rp + g] > 0.f)) continue;
        const float w = std::exp(a.scale * (top[c] - mx));
        denom += w * l[i * Rp + g];
        const float* ai = acc.data() + (i * G + g) * D;
        for (int64_t c2 = 0; c2 < D; ++c2) dst[c2] += w * ai[c2];
      }
      const float inv = 1.f / denom;
      for (int64_t c2 = 0; c2 < D; ++c2) dst[c2] *= inv;
    }
}
#endif

at::Tensor delta_attention_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_cache,
                                const at::Tensor& values, const at::Tensor& chan, const at::Tensor& offsets,
                                const at::Tensor& sink_k, const at::Tensor& window_k, int64_t start, int64_t n_sink,
                                int64_t window, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3, "delta_attention: q must be [T, Hq, D] and k [T, H, D]");
  const int64_t T = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), H = k_in.size(1);
  TORCH_CHECK(k_in.size(0) == T && k_in.size(2) == D, "delta_attention: q and k shapes disagree");
  TORCH_CHECK(H > 0 && Hq % H == 0, "delta_attention: Hq must be a multiple of H");
  TORCH_CHECK(D <= 256, "delta_attention: head_dim must be <= 256");
  for (const at::Tensor* t : {&v_cache, &values, &chan, &offsets, &sink_k, &window_k}) SPARSEDGE_CHECK_CPU_CONTIG(*t);
  const auto dt = values.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dt && sink_k.scalar_type() == dt && window_k.scalar_type() == dt,
              "delta_attention: values, v_cache, sink_k and window_k must share the cache dtype");
  TORCH_CHECK(chan.scalar_type() == at::kByte && offsets.scalar_type() == at::kInt,
              "delta_attention: chan must be uint8 and offsets int32");
  const int64_t Tmax = v_cache.size(1), n = start + T;
  TORCH_CHECK(v_cache.size(0) == H && v_cache.size(2) == D && start >= 0 && n <= Tmax,
              "delta_attention: v_cache must be [H, Tmax, D] with start + T <= Tmax");
  TORCH_CHECK(offsets.size(0) == H && offsets.size(1) == Tmax + 1, "delta_attention: offsets must be [H, Tmax + 1]");
  TORCH_CHECK(n_sink >= 0 && window >= 0, "delta_attention: n_sink and window must be >= 0");
  TORCH_CHECK(sink_k.size(0) == H && sink_k.size(1) >= std::min(n_sink, n) && sink_k.size(2) == D,
              "delta_attention: sink_k must be [H, >= n_sink, D]");
  TORCH_CHECK(window == 0 || (window_k.size(0) == H && window_k.size(1) == window && window_k.size(2) == D),
              "delta_attention: window_k must be [H, window, D]");
  // every entry the walk reads must lie inside the buffer
  const int64_t jd_last = n - 1 - window;
  if (jd_last >= n_sink) {
    const int32_t* off = offsets.data_ptr<int32_t>();
    for (int64_t h = 0; h < H; ++h) {
      const int32_t used = off[h * (Tmax + 1) + jd_last + 1];
      TORCH_CHECK(used >= 0 && used <= values.size(1), "delta_attention: offsets of head ", h,
                  " point outside the packed buffer (", used, " > ", values.size(1), ")");
    }
  }
  auto q = q_in.to(at::kFloat).contiguous();
  auto k = k_in.to(at::kFloat).contiguous();
  auto out = at::empty({T, Hq, D}, q.options());
  const int64_t G = Hq / H;
  const int64_t Tb = T == 1 ? 1 : std::max<int64_t>(1, 64 / G);  // rows per prefill task ~64
  const int64_t nblk = (T + Tb - 1) / Tb;
  SPARSEDGE_DISPATCH_FLOATS(dt, "delta_attention", [&] {
    DeltaArgs<scalar_t> a{q.data_ptr<float>(), k.data_ptr<float>(), v_cache.data_ptr<scalar_t>(),
                          values.data_ptr<scalar_t>(), chan.data_ptr<uint8_t>(), offsets.data_ptr<int32_t>(),
                          sink_k.data_ptr<scalar_t>(), window_k.data_ptr<scalar_t>(), out.data_ptr<float>(),
                          T, Hq, H, G, D, Tmax, values.size(1), sink_k.size(1), window_k.size(1), start, n_sink,
                          window, static_cast<float>(scale)};
#ifdef SPARSEDGE_DELTA_AVX2
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (T == 1 && G <= kLanes) {  // decode
        attend_decode_items<scalar_t>(a);
        return;
      }
    }
#endif
    sparsedge::cpu::parallel_for(H * nblk, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i % H, b = i / H;  // heads fastest: neighbouring tasks share no buffers
        attend_block<scalar_t>(a, h, b * Tb, std::min(T, (b + 1) * Tb));
      }
    });
  });
  return q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// delta_step: the decode step of sparsedge.delta.cache in one call (V write, encode of the key leaving the window,
// empty delta ranges for the window's positions, attention, ring update), in the reference's order, with the
// encode and attention code above, so buffers and outputs are bit-identical to the op sequence it replaces. Why:
// that sequence was five op calls and their Python per layer and token, about as long as the attention itself
// at 2K tokens on a 576-wide model.
template <typename T>
void put_rows(T* dst, int64_t dst_stride, const at::Tensor& src, int64_t H, int64_t D) {  // dst[h * stride + c] = src[h, c]
  const at::Tensor s = src.to(at::kFloat).contiguous();
  const float* p = s.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < D; ++c) dst[h * dst_stride + c] = from_f32<T>(p[h * D + c]);
}

at::Tensor delta_step_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& ref,
                           const at::Tensor& theta_in, at::Tensor& values, at::Tensor& chan, at::Tensor& offsets,
                           const at::Tensor& sink_k, at::Tensor& window_k, at::Tensor& v_cache, int64_t pos,
                           int64_t n_sink, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
              "delta_step: one token per call (q [1, Hq, D], k and v [1, H, D])");
  const int64_t H = k.size(1), D = k.size(2);
  TORCH_CHECK(v.size(1) == H && v.size(2) == D, "delta_step: k and v must both be [1, H, D]");
  SPARSEDGE_CHECK_CPU_CONTIG(v_cache);
  SPARSEDGE_CHECK_CPU_CONTIG(window_k);
  const int64_t Tmax = v_cache.size(1);
  TORCH_CHECK(pos >= n_sink && pos >= window && pos < Tmax, "delta_step: position ", pos, " needs n_sink (", n_sink,
              ") <= pos, window (", window, ") <= pos and pos < ", Tmax, " (the cache's tokens)");
  TORCH_CHECK(v_cache.size(0) == H && v_cache.size(2) == D, "delta_step: v_cache must be [H, Tmax, D]");
  TORCH_CHECK(window == 0 || (window_k.size(0) == H && window_k.size(1) == window && window_k.size(2) == D),
              "delta_step: window_k must be [H, window, D]");
  check_encode_buffers(ref, values, chan, offsets, H, D);
  TORCH_CHECK(offsets.size(0) == H && offsets.size(1) == Tmax + 1, "delta_step: offsets must be [H, Tmax + 1]");
  TORCH_CHECK(window_k.scalar_type() == values.scalar_type() && v_cache.scalar_type() == values.scalar_type(),
              "delta_step: values, window_k and v_cache must share the cache dtype");
  const auto theta = theta_in.to(at::kFloat).contiguous();
  TORCH_CHECK(theta.numel() == H, "delta_step: theta must have one entry per KV head");
  const int64_t e = pos - window, slot = window ? pos % window : 0, cap = values.size(1);
  SPARSEDGE_DISPATCH_FLOATS(values.scalar_type(), "delta_step", [&] {
    using T = scalar_t;
    put_rows<T>(v_cache.data_ptr<T>() + pos * D, Tmax * D, v[0], H, D);
    // the key that leaves the window, in fp32: from its ring slot (which k takes after the attention), or k itself
    const at::Tensor key = (window ? window_k.select(1, slot) : k[0]).to(at::kFloat).contiguous();  // [H, D]
    int32_t* off = offsets.data_ptr<int32_t>();
    for (int64_t h = 0; h < H; ++h) {  // sequential: D compares per head are far below a parallel region's cost
      const int64_t r = encode_head(key.data_ptr<float>(), ref.data_ptr<float>(), theta.data_ptr<float>(),
                                    values.data_ptr<T>(), chan.data_ptr<uint8_t>(), off, 1, H, D, cap, Tmax + 1, e, h);
      TORCH_CHECK(r >= 0, "delta buffer capacity exceeded: head ", h, " needs ", -r, " > ", cap, " entries");
    }
    for (int64_t h = 0; h < H; ++h) {  // positions e + 1..pos are in the window: empty delta ranges
      int32_t* o = off + h * (Tmax + 1);
      std::fill(o + e + 2, o + pos + 2, o[e + 1]);
    }
  });
  at::Tensor out = delta_attention_impl(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window,
                                        scale);
  if (window) {
    SPARSEDGE_DISPATCH_FLOATS(values.scalar_type(), "delta_step", [&] {
      put_rows<scalar_t>(window_k.data_ptr<scalar_t>() + slot * D, window * D, k[0], H, D);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("delta_encode", &delta_encode_impl);
  m.impl("delta_attention", &delta_attention_impl);
  m.impl("delta_step", &delta_step_impl);
}

}  // namespace sparsedge::cpu
