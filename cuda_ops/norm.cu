// Fused RMSNorm (optionally with the residual add) and rotate-half RoPE for the decode path.
//
// rms_norm: one block (256 threads) per row; pass 1 sums squares in fp32 (block reduction), pass 2
//   writes y. The add variant writes residual += x (rounded to the residual dtype) in pass 1 and
//   normalises the rounded sum, exactly as the composite reference does.
// rope: one thread per (token, head, pair i < D/2), grid-stride.
#include "common.cuh"

namespace sparsedge::cuda {
namespace {

template <typename T, typename W>
__global__ void rms_norm_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                                T* __restrict__ residual, int64_t d, float eps) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  T* rr = residual ? residual + row * d : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v;
    if (rr) {
      const T s = from_f<T>(to_f<T>(rr[i]) + to_f<T>(xr[i]));
      rr[i] = s;
      v = to_f<T>(s);
    } else {
      v = to_f<T>(xr[i]);
    }
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(d) + eps);
  const T* src = rr ? rr : xr;  // each thread re-reads only the elements it wrote itself
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = from_f<T>(to_f<T>(src[i]) * inv * to_f<W>(w[i]));
}

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cs, const float* __restrict__ sn,
                            T* __restrict__ y, int64_t T_, int64_t H, int64_t D) {
  const int64_t half = D / 2, total = T_ * H * half;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, r = e / half, t = r / H;
    const T* xr = x + r * D;
    T* yr = y + r * D;
    const float a = to_f<T>(xr[i]), b = to_f<T>(xr[i + half]);
    const float c = cs[t * half + i], s = sn[t * half + i];
    yr[i] = from_f<T>(a * c - b * s);
    yr[i + half] = from_f<T>(b * c + a * s);
  }
}

}  // namespace

cudaError_t rms_norm(const void* x, const void* w, void* y, void* residual, int64_t rows, int64_t d, float eps,
                     DType xt, DType wt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (wt != xt && wt != DType::F32) return cudaErrorInvalidValue;  // binding converts other weight dtypes
  return dispatch_dtype(xt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = d >= 2048 ? 512 : 256;
    if (wt == DType::F32 && xt != DType::F32) {
      rms_norm_kernel<T, float><<<rows, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<const float*>(w),
                                                              static_cast<T*>(y), static_cast<T*>(residual), d, eps);
    } else {
      rms_norm_kernel<T, T><<<rows, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                          static_cast<T*>(y), static_cast<T*>(residual), d, eps);
    }
    return cudaGetLastError();
  });
}

cudaError_t rope(const void* x, const float* cos, const float* sin, void* y, int64_t T, int64_t H, int64_t D,
                 DType xt, cudaStream_t stream) {
  const int64_t total = T * H * (D / 2);
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(xt, [&](auto tag) {
    using E = typename decltype(tag)::type;
    const int threads = 256;
    const int64_t blocks = ceil_div(total, threads) < 4096 ? ceil_div(total, threads) : 4096;
    rope_kernel<E><<<blocks, threads, 0, stream>>>(static_cast<const E*>(x), cos, sin, static_cast<E*>(y), T, H, D);
    return cudaGetLastError();
  });
}

}  // namespace sparsedge::cuda
