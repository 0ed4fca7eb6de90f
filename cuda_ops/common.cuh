// Device helpers shared by the sparsedge CUDA kernels: dtype conversion, 16-byte vector loads,
// warp/block reductions and scans, and dtype dispatch for the launchers. No torch headers.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace sparsedge::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements one lane reads per step: a 16-byte vector when V (rows 16-byte aligned), else one element.
template <typename T, bool V> struct Lanes { static constexpr int N = V ? int(16 / sizeof(T)) : 1; };

// Load N = Lanes<T,V>::N consecutive elements of a weight row as fp32 (read-only path).
template <typename T, bool V>
__device__ __forceinline__ void load_row(const T* p, float (&out)[Lanes<T, V>::N]) {
  if constexpr (V) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < Lanes<T, V>::N; ++j) out[j] = to_f<T>(e[j]);
  } else {
    out[0] = to_f<T>(__ldg(reinterpret_cast<const T*>(p)));
  }
}
// __ldg has no overloads for __half/__nv_bfloat16 on every toolkit: read them as raw 16-bit words.
template <>
__device__ __forceinline__ void load_row<__half, false>(const __half* p, float (&out)[1]) {
  const unsigned short raw = __ldg(reinterpret_cast<const unsigned short*>(p));
  out[0] = __half2float(__ushort_as_half(raw));
}
template <>
__device__ __forceinline__ void load_row<__nv_bfloat16, false>(const __nv_bfloat16* p, float (&out)[1]) {
  const unsigned short raw = __ldg(reinterpret_cast<const unsigned short*>(p));
  out[0] = __bfloat162float(__ushort_as_bfloat16(raw));
}

// N consecutive fp32 values from shared memory (16-byte aligned when N % 4 == 0).
template <int N>
__device__ __forceinline__ void load_smem(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + j);
      out[j] = v.x; out[j + 1] = v.y; out[j + 2] = v.z; out[j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Warp-wide sum (every lane gets it): float for scores, int for exact q4 group sums, double for q4 estimates.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum / max (every thread gets the result). `scratch` holds >= 33 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < nw ? scratch[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) scratch[32] = s;
  }
  __syncthreads();
  return scratch[32];
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < nw ? scratch[lane] : -INFINITY;
    s = warp_max(s);
    if (lane == 0) scratch[32] = s;
  }
  __syncthreads();
  return scratch[32];
}

// Block-wide exclusive prefix sum of one value per thread (T = int or float); `total` gets the sum.
// `scratch` holds >= 33 elements of T.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nw ? scratch[lane] : T(0);
    T wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T n = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += n;
    }
    scratch[lane] = wi - w;  // exclusive prefix of the warp totals
    if (lane == 31) scratch[32] = wi;
  }
  __syncthreads();
  *total = scratch[32];
  return scratch[warp] + inc - v;
}

// FFN activation with the schema's conventions (sdk/sparsedge/activations.py; the CPU kernels' act.h):
// h = act(g) * u, zero where |act(g)| < tau (tau > 0). Shared by ffn.cu and qffn.cu.
__device__ __forceinline__ float activate(float g, float u, Act act, float act_param, float tau) {
  float a;
  switch (act) {
    case Act::silu: a = g / (1.f + __expf(-g)); break;
    case Act::gelu: a = 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); break;
    case Act::gelu_tanh: {
      const float k = 0.79788456080286536f * (g + 0.044715f * g * g * g);
      a = 0.5f * g * (1.f + tanhf(k));
      break;
    }
    case Act::relu: case Act::drelu: a = fmaxf(g, 0.f); break;
    case Act::fatrelu: a = g > act_param ? g : 0.f; break;
    case Act::relu2: { const float rg = fmaxf(g, 0.f); a = rg * rg; break; }
    default: a = 0.f;
  }
  if (act == Act::drelu) u = fmaxf(u, 0.f);
  float h = a * u;
  if (tau > 0.f && fabsf(a) < tau) h = 0.f;
  return h;
}

// ---- launcher-side dtype dispatch ----------------------------------------------------------
template <typename T> struct Tag { using type = T; };

template <typename F>
inline cudaError_t dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(Tag<float>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessor count of `device` (cached; used to size persistent / split grids).
int sm_count(int device);

}  // namespace sparsedge::cuda
