// Fused dense causal attention over the preallocated KV cache (GQA), the decode baseline, and its sliding-window
// form (dense_attention_window: the query at position p attends to keys max(0, p - window + 1)..p only).
// One pass per (token, KV head) for its whole GQA group: scores with SIMD dot products, fp32 softmax with a
// vectorised exp, then P.V, each K/V row read once for the group. Small problems run on the calling thread
// because a fork/join costs more than a 9-head x 64-key decode step.
//
// Decode (one query token, SIMD dtypes) takes split_decode instead: the keys of each KV head are cut into chunks,
// one work item per (KV head, chunk) with the whole GQA group, partial softmaxes merged at the end (flash-decoding).
// Every K/V row is read once, and a few KV heads still spread over the threads: SmolLM2's 3 KV heads on 2 threads
// used to be split into single query heads, which read each K/V row 3 times (5 GB/s at 512 keys, Zen 3).
#include <cmath>
#include <vector>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_common.h"
#include "simd.h"
#include "threadpool.h"

namespace sparsedge::cpu {
namespace {

// row[j] = exp(row[j] - m) for j < n (vectorised exp); returns their sum
inline float exp_shifted(float* row, int64_t n, float m) {
  using Vec = at::vec::Vectorized<float>;
  const Vec mv(m);
  Vec sum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(row + j) - mv).exp();
    e.store(row + j);
    sum = sum + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, sum);
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - m);
    total += row[j];
  }
  return total;
}

// The G query heads of one KV head, for one query position: every K and V row is read once for the whole group
// (GQA shares it), scores of the group kept side by side, softmax with a vectorised exp.
template <typename T>
void attend_group(const T* q, const T* k, const T* v, T* out, int64_t G, int64_t n_keys, int64_t D,
                  float scale, std::vector<float>& p) {
  constexpr int64_t kMaxG = 16;
  float qf[kMaxG][512];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) qf[g][i] = to_f32(q[g * D + i]) * scale;
  float* sc = p.data();  // [G][n_keys]
  float m[kMaxG];
  for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY;
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* kj = k + j * D;
    float kf[512];
    for (int64_t i = 0; i < D; ++i) kf[i] = to_f32(kj[i]);
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < D; ++i) s += qf[g][i] * kf[i];
      sc[g * n_keys + j] = s;
      m[g] = std::max(m[g], s);
    }
  }
  float inv[kMaxG];
  for (int64_t g = 0; g < G; ++g) inv[g] = 1.f / exp_shifted(sc + g * n_keys, n_keys, m[g]);
  float acc[kMaxG][512];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) acc[g][i] = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* vj = v + j * D;
    float vf[512];
    for (int64_t i = 0; i < D; ++i) vf[i] = to_f32(vj[i]);
    for (int64_t g = 0; g < G; ++g) {
      const float w = sc[g * n_keys + j];
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) acc[g][i] += w * vf[i];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = from_f32<T>(acc[g][i] * inv[g]);
}

#ifdef SPARSEDGE_AVX2
constexpr int64_t kChunkKeys = 128;  // keys per decode work item at most (its scores stay in L1)

// One (KV head, key chunk) item of a decode step for GB query heads (qf: [GB][D], pre-scaled): its softmax max m,
// sum l of exp(s - m) and unnormalised acc = sum_j exp(s_j - m) v_j. D is a multiple of 8.
template <typename T, int GB>
void decode_chunk(const float* qf, const T* k, const T* v, int64_t n, int64_t D, float* m, float* l, float* acc) {
  alignas(32) float sc[GB][kChunkKeys];
  for (int g = 0; g < GB; ++g) m[g] = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * D;
    __m256 s[GB];
    for (int g = 0; g < GB; ++g) s[g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 kv = load8(kj + i);
      for (int g = 0; g < GB; ++g) s[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + i), kv, s[g]);
    }
    for (int g = 0; g < GB; ++g) {
      sc[g][j] = hsum(s[g]);
      m[g] = std::max(m[g], sc[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g) l[g] = exp_shifted(sc[g], n, m[g]);
  // P.V, 32 (or 8) columns at a time so the group's accumulators stay in registers; V read once
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    __m256 a[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v + j * D + i;
      const __m256 v0 = load8(vj), v1 = load8(vj + 8), v2 = load8(vj + 16), v3 = load8(vj + 24);
      for (int g = 0; g < GB; ++g) {
        const __m256 p = _mm256_set1_ps(sc[g][j]);
        a[g][0] = _mm256_fmadd_ps(p, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(p, v1, a[g][1]);
        a[g][2] = _mm256_fmadd_ps(p, v2, a[g][2]);
        a[g][3] = _mm256_fmadd_ps(p, v3, a[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + g * D + i + 8 * c, a[g][c]);
  }
  for (; i < D; i += 8) {
    __m256 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 vv = load8(v + j * D + i);
      for (int g = 0; g < GB; ++g) a[g] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g][j]), vv, a[g]);
    }
    for (int g = 0; g < GB; ++g) _mm256_storeu_ps(acc + g * D + i, a[g]);
  }
}

template <typename T>
void decode_chunk_heads(int64_t gb, const float* qf, const T* k, const T* v, int64_t n, int64_t D, float* m,
                        float* l, float* acc) {
  switch (gb) {
    case 1: return decode_chunk<T, 1>(qf, k, v, n, D, m, l, acc);
    case 2: return decode_chunk<T, 2>(qf, k, v, n, D, m, l, acc);
    case 3: return decode_chunk<T, 3>(qf, k, v, n, D, m, l, acc);
    default: return decode_chunk<T, 4>(qf, k, v, n, D, m, l, acc);
  }
}

// one query token at position `pos`, keys lo..pos of each KV head: q [Hq, D], caches [H, Tmax, D], out [Hq, D]
template <typename T>
void split_decode(const T* q, const T* kc, const T* vc, T* out, int64_t Hq, int64_t H, int64_t Tmax, int64_t D,
                  int64_t lo, int64_t pos, float scale) {
  const int64_t G = Hq / H, keys = pos + 1 - lo;
  const int64_t chunks = (keys + kChunkKeys - 1) / kChunkKeys;
  // scratch reused across calls (a decode token makes one call per layer). The lambda below must see the calling
  // thread's buffers: a thread_local named inside it would be the worker's own, so these are plain references.
  static thread_local std::vector<float> tl_qf, tl_m, tl_l, tl_acc;
  std::vector<float>&qf = tl_qf, &m = tl_m, &l = tl_l, &acc = tl_acc;
  qf.resize(Hq * D), m.resize(chunks * Hq), l.resize(chunks * Hq), acc.resize(chunks * Hq * D);
  for (int64_t i = 0; i < Hq * D; ++i) qf[i] = to_f32(q[i]) * scale;
  // item = (KV head, chunk, group of <= 4 of its query heads); a grain of 1 unless the step is tiny
  const int64_t groups = (G + 3) / 4, items = H * chunks * groups;
  const int64_t grain = keys * D * Hq < (1 << 16) ? items : 1;
  sparsedge::cpu::parallel_for(items, grain, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const int64_t h = it / (chunks * groups), c = (it / groups) % chunks, g0 = (it % groups) * 4;
      const int64_t gb = std::min<int64_t>(4, G - g0), hq = h * G + g0;  // first query head of the item
      const int64_t k0 = lo + c * kChunkKeys, n = std::min<int64_t>(kChunkKeys, pos + 1 - k0);
      const int64_t base = (h * Tmax + k0) * D;
      decode_chunk_heads<T>(gb, qf.data() + hq * D, kc + base, vc + base, n, D, m.data() + c * Hq + hq,
                            l.data() + c * Hq + hq, acc.data() + (c * Hq + hq) * D);
    }
  });
  // merge the chunks of each query head: rescale to the overall max
  for (int64_t hq = 0; hq < Hq; ++hq) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, m[c * Hq + hq]);
    float denom = 0.f;
    float o[512] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = std::exp(m[c * Hq + hq] - mx);
      denom += w * l[c * Hq + hq];
      const float* a = acc.data() + (c * Hq + hq) * D;
      for (int64_t i = 0; i < D; ++i) o[i] += w * a[i];
    }
    const float inv = 1.f / denom;
    for (int64_t i = 0; i < D; ++i) out[hq * D + i] = from_f32<T>(o[i] * inv);
  }
}
#endif

at::Tensor attention_impl(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          int64_t start, double scale, int64_t window) {
  TORCH_CHECK(window >= 0, "dense_attention_window: window must be >= 0 (0: no window), got ", window);
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "dense_attention: q must be [T, Hq, D] and the caches [Hkv, Tmax, D]");
  SPARSEDGE_CHECK_CPU_CONTIG(k_cache);
  SPARSEDGE_CHECK_CPU_CONTIG(v_cache);
  auto q = as_plain(q_in, k_cache.scalar_type());
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), H = k_cache.size(0), Tmax = k_cache.size(1);
  TORCH_CHECK(D <= 512 && k_cache.size(2) == D && v_cache.sizes() == k_cache.sizes(),
              "dense_attention: head_dim mismatch or > 512");
  TORCH_CHECK(Hq % H == 0 && Hq / H <= 16, "dense_attention: Hq must be a multiple of Hkv, at most 16 of them");
  TORCH_CHECK(start >= 0 && start + T <= Tmax, "dense_attention: positions exceed the cache capacity");
  const int64_t G = Hq / H;
  auto out = at::empty_like(q);
  const int64_t keys = window > 0 ? std::min<int64_t>(start + T, window) : start + T;  // per query, at most
  const int64_t work = keys * D * T * Hq;
  const int64_t grain = work < (1 << 16) ? T * H : 1;  // small: stay on this thread
  SPARSEDGE_DISPATCH_FLOATS(q.scalar_type(), "dense_attention", [&] {
#ifdef SPARSEDGE_AVX2
    if constexpr (kSimd<scalar_t>) {
      if (T == 1 && D % 8 == 0) {
        split_decode<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), Hq, H, Tmax, D, start + 1 - keys, start,
                               static_cast<float>(scale));
        return;
      }
    }
#endif
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // one work item per (token, KV head): its G query heads share every K/V row read. When that gives fewer
    // items than twice the threads (decode: 3 KV heads on 2 threads would split 2:1), items are single query
    // heads instead, so the threads stay balanced.
    const int64_t sub = (grain > 1 || T * H >= 2 * at::get_num_threads()) ? G : 1;  // query heads per item
    const int64_t per_t = Hq / sub;
    sparsedge::cpu::parallel_for(T * per_t, grain > 1 ? T * per_t : 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> p(sub * keys);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / per_t, hq = (r % per_t) * sub, h = hq / G;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, start + t + 1 - window) : 0;  // first key
        const int64_t base = h * Tmax * D + lo * D;
        const int64_t qrow = (t * Hq + hq) * D;
        attend_group<scalar_t>(qp + qrow, kp + base, vp + base, op + qrow, sub, start + t + 1 - lo, D,
                               static_cast<float>(scale), p);
      }
    });
  });
  return out;
}

at::Tensor dense_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                int64_t start, double scale) {
  return attention_impl(q, k_cache, v_cache, start, scale, 0);
}

at::Tensor dense_attention_window_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t start, double scale, int64_t window) {
  return attention_impl(q, k_cache, v_cache, start, scale, window);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("dense_attention", &dense_attention_impl);
  m.impl("dense_attention_window", &dense_attention_window_impl);
}

}  // namespace sparsedge::cpu
