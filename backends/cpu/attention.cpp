// Fused dense causal attention over the preallocated KV cache (GQA), the decode baseline, and its sliding-window
// form (dense_attention_window: the query at position p attends to keys max(0, p - window + 1)..p only).
// One pass per (token, query head): scores with a SIMD dot product, fp32 softmax, then P.V.
// Work is split over (token, head) pairs; small problems run on the calling thread because an
// OpenMP fork/join costs more than a 9-head x 64-key decode step.
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "threadpool.h"

namespace sparsedge::cpu {
namespace {

template <typename T>
void attend_one(const T* q, const T* k, const T* v, T* out, int64_t n_keys, int64_t D, int64_t row_stride,
                float scale, std::vector<float>& p) {
  float qf[512];
  for (int64_t i = 0; i < D; ++i) qf[i] = to_f32(q[i]);
  float m = -INFINITY;
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* kj = k + j * row_stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += qf[i] * to_f32(kj[i]);
    s *= scale;
    p[j] = s;
    m = std::max(m, s);
  }
  float denom = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) {
    p[j] = std::exp(p[j] - m);
    denom += p[j];
  }
  float acc[512];
  for (int64_t i = 0; i < D; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* vj = v + j * row_stride;
    const float w = p[j];
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] += w * to_f32(vj[i]);
  }
  const float inv = 1.f / denom;
  for (int64_t i = 0; i < D; ++i) out[i] = from_f32<T>(acc[i] * inv);
}

at::Tensor attention_impl(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          int64_t start, double scale, int64_t window) {
  TORCH_CHECK(window >= 0, "dense_attention_window: window must be >= 0 (0: no window), got ", window);
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "dense_attention: q must be [T, Hq, D] and the caches [Hkv, Tmax, D]");
  SPARSEDGE_CHECK_CPU_CONTIG(k_cache);
  SPARSEDGE_CHECK_CPU_CONTIG(v_cache);
  auto q = q_in.to(k_cache.scalar_type()).contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), H = k_cache.size(0), Tmax = k_cache.size(1);
  TORCH_CHECK(D <= 512 && k_cache.size(2) == D && v_cache.sizes() == k_cache.sizes(),
              "dense_attention: head_dim mismatch or > 512");
  TORCH_CHECK(Hq % H == 0, "dense_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(start >= 0 && start + T <= Tmax, "dense_attention: positions exceed the cache capacity");
  const int64_t G = Hq / H;
  auto out = at::empty_like(q);
  const int64_t keys = window > 0 ? std::min<int64_t>(start + T, window) : start + T;  // per query, at most
  const int64_t work = keys * D * T * Hq;
  const int64_t grain = work < (1 << 16) ? T * Hq : 1;  // small: stay on this thread
  SPARSEDGE_DISPATCH_FLOATS(q.scalar_type(), "dense_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    sparsedge::cpu::parallel_for(T * Hq, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> p(keys);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / Hq, hq = r % Hq, h = hq / G;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, start + t + 1 - window) : 0;  // first key
        const int64_t base = h * Tmax * D + lo * D;
        attend_one<scalar_t>(qp + r * D, kp + base, vp + base, op + r * D, start + t + 1 - lo, D, D,
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
