// Dense GEMV for decode (a few tokens against a weight matrix), the dense counterpart of the sparse
// FFN kernel: torch's GEMV reaches about 10 GB/s on 2 cores of this CPU while a plain row-streaming
// AVX2 loop runs closer to the memory's speed. Larger batches (prefill) go to at::linear / at::matmul,
// which are compute-bound there and better blocked.
//   linear(x, w, bias)   y = x w^T (+ bias), w [N, K]: one dot product per weight row, rows split over threads
//   linear_t(x, w_t)     y = x w_t,          w_t [K, N]: axpy of each row into column stripes, stripes split
//                        over threads (W_down is stored this way so the sparse kernel reads rows)
#include <vector>

#include "simd.h"
#include "threadpool.h"

namespace sparsedge::cpu {
namespace {

constexpr int64_t kMaxTokens = 8;  // beyond this a blocked GEMM wins

bool fast_path(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  const auto t = w.scalar_type();
  return w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() && x.device().is_cpu() &&
         (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && x.size(-1) == K && K > 0 &&
         x.numel() / K <= kMaxTokens;
}

at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t N = w.size(0), K = w.dim() == 2 ? w.size(1) : -1;
  if (!fast_path(x, w, K)) return at::linear(x, w, bias);
  const int64_t T = x.numel() / K;
  auto xf = x.reshape({T, K}).to(at::kFloat).contiguous();
  auto y = at::empty({T, N}, x.options().dtype(at::kFloat));
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  SPARSEDGE_DISPATCH_FLOATS(w.scalar_type(), "linear", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    sparsedge::cpu::parallel_for(N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* row = wp + n * K;
        const float b = bp ? bp[n] : 0.f;
        for (int64_t t = 0; t < T; ++t) yp[t * N + n] = dot(row, xp + t * K, K) + b;
      }
    });
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.to(x.scalar_type()).reshape(sizes);
}

at::Tensor linear_t_impl(const at::Tensor& x, const at::Tensor& w_t) {
  const int64_t K = w_t.dim() == 2 ? w_t.size(0) : -1, N = w_t.dim() == 2 ? w_t.size(1) : -1;
  if (!fast_path(x, w_t, K)) return at::matmul(x, w_t);
  const int64_t T = x.numel() / K;
  auto xf = x.reshape({T, K}).to(at::kFloat).contiguous();
  auto y = at::zeros({T, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // column stripes of >= 64 floats (256 B) so each row segment a thread reads is several cache lines
  const int64_t stripe = 64;
  const int64_t n_stripes = (N + stripe - 1) / stripe;
  SPARSEDGE_DISPATCH_FLOATS(w_t.scalar_type(), "linear_t", [&] {
    const scalar_t* wp = w_t.data_ptr<scalar_t>();
    sparsedge::cpu::parallel_for(n_stripes, 1, [&](int64_t s0, int64_t s1) {
      const int64_t c0 = s0 * stripe, len = std::min(N, s1 * stripe) - c0;
      for (int64_t t = 0; t < T; ++t)
        accumulate_rows(wp, N, [](int64_t k) { return k; }, xp + t * K, K, c0, c0 + len, yp + t * N + c0);
    });
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("linear", &linear_impl);
  m.impl("linear_t", &linear_t_impl);
}

}  // namespace sparsedge::cpu
