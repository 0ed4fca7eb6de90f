// Fused RMSNorm (optionally with the residual add) and rotate-half RoPE for the decode path.
// One pass over each row instead of the 5-6 tensor ops of the composite reference; rows are
// split over threads with ATen's OpenMP parallel_for.
#include "cpu_common.h"
#include "threadpool.h"

namespace sparsedge::cpu {
namespace {

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, T* residual, int64_t rows, int64_t d, double eps) {
  sparsedge::cpu::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      T* yr = y + r * d;
      T* res = residual ? residual + r * d : nullptr;
      float ss = 0.f;
      if (res) {
        for (int64_t i = 0; i < d; ++i) {
          float v = to_f32(res[i]) + to_f32(xr[i]);
          res[i] = from_f32<T>(v);
          float vr = to_f32(res[i]);  // normalise the stored (rounded) residual, as the reference does
          ss += vr * vr;
        }
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) {
          float v = to_f32(xr[i]);
          ss += v * v;
        }
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
      const T* src = res ? res : xr;
      for (int64_t i = 0; i < d; ++i) yr[i] = from_f32<T>(to_f32(src[i]) * inv * to_f32(w[i]));
    }
  });
}

at::Tensor rms_norm_impl(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  auto x = x_in.contiguous();
  auto w = as_plain(weight, x.scalar_type());
  auto y = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nullptr,
                            rows, d, eps);
  });
  return y;
}

at::Tensor add_rms_norm_impl(at::Tensor& residual, const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  SPARSEDGE_CHECK_CPU_CONTIG(residual);
  TORCH_CHECK(residual.sizes() == x_in.sizes(), "add_rms_norm: residual and x shapes differ");
  auto x = as_plain(x_in, residual.scalar_type());
  auto w = as_plain(weight, residual.scalar_type());
  auto y = at::empty_like(residual);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            residual.data_ptr<scalar_t>(), rows, d, eps);
  });
  return y;
}

at::Tensor rope_impl(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x_in.dim() == 3, "rope: x must be [T, H, D]");
  auto x = x_in.contiguous();
  auto c = as_plain(cos_in, at::kFloat);
  auto s = as_plain(sin_in, at::kFloat);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(c.size(0) == T && c.size(1) == half, "rope: cos/sin must be [T, D/2]");
  auto y = at::empty_like(x);
  SPARSEDGE_DISPATCH_FLOATS(x.scalar_type(), "rope", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* cp = c.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    sparsedge::cpu::parallel_for(T * H, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / H;
        const scalar_t* xr = xp + r * D;
        scalar_t* yr = yp + r * D;
        const float* ct = cp + t * half;
        const float* st = sp + t * half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_f32(xr[i]), b = to_f32(xr[i + half]);
          yr[i] = from_f32<scalar_t>(a * ct[i] - b * st[i]);
          yr[i + half] = from_f32<scalar_t>(b * ct[i] + a * st[i]);
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("rms_norm", &rms_norm_impl);
  m.impl("add_rms_norm", &add_rms_norm_impl);
  m.impl("rope", &rope_impl);
}

}  // namespace sparsedge::cpu
