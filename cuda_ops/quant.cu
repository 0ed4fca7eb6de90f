// qlinear over GGUF block weights (sdk/sparsedge/ops/quant.py): y [T, N] = x [T, K] W^T, W in its raw blocks.
//
//   1. quantize_x_kernel   a warp per 32-block of x: amax (warp max), d = amax / 127, inv = 127 / amax,
//                          q = round-half-even(x * inv), s = d * sum q -> int8 q [T, K], d / s [T, K / 32] in the
//                          workspace; every float op is the IEEE one (__fdiv_rn, __fmul_rn) so the rounding is the
//                          CPU kernel's and quant.quantize_activations', bit for bit, under --use_fast_math
//                          (round_int8_32 in quant.cuh, which qsparse_ffn's h rounding shares).
//   2. qlinear_kernel<Q>   grid (ceil(N / 8), ceil(T / 8)), 8 warps, a warp per weight row and up to 8 tokens per
//                          block (each row read once per 8 tokens). Lanes take the row's 32-element sub-blocks
//                          g = lane, lane + 32, ...; a sub-block's weights become 8 packed int8x4 words (nibbles
//                          masked, q6_k's high bits merged and -32 applied per byte with __vsub4, tq2_0's 2-bit
//                          codes shifted and masked), each dotted with the token's int8 x by 8 __dp4a
//                          (load_sub_block / sub_block_dot in quant.cuh, shared with qsparse_ffn_rows' listed
//                          gate/up rows); the block's float part (d_w d_x, and the q4_0 / q4_1 / q4_k / tq2_0
//                          offset / min term from the x sum s) is accumulated in fp32, then a warp sum per token.
//      float formats: float_linear_kernel, the same grid, fp32 dot products of the widened row with x.
// Weight rows only need 2-byte alignment (GGUF block sizes are even; reads are 16-bit).
#include <cuda_fp16.h>

#include "common.cuh"
#include "quant.cuh"
#include "quant.h"

namespace sparsedge::cuda {
namespace {

constexpr int kWarps = 8;   // rows per block
constexpr int kTok = 8;     // tokens per block
constexpr int64_t kQK = 32;

template <typename TX>
__global__ void quantize_x_kernel(const TX* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ d,
                                  float* __restrict__ s, int64_t blocks) {
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (b >= blocks) return;
  const int lane = threadIdx.x & 31;
  float db, sb;
  q[b * kQK + lane] = static_cast<int8_t>(round_int8_32(to_f<TX>(x[b * kQK + lane]), db, sb));
  if (lane == 0) {
    d[b] = db;
    s[b] = sb;
  }
}

template <QType Q>
__global__ void qlinear_kernel(const uint8_t* __restrict__ W, const int8_t* __restrict__ xq,
                               const float* __restrict__ xd, const float* __restrict__ xs, float* __restrict__ y,
                               int64_t T, int64_t N, int64_t K, int64_t row_bytes) {
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int lane = threadIdx.x & 31;
  const int64_t t0 = int64_t(blockIdx.y) * kTok;
  const int tn = static_cast<int>(min64(kTok, T - t0));
  const int64_t nsb = K / kQK;  // 32-element sub-blocks per row
  const uint8_t* row = W + n * row_bytes;
  float acc[kTok], ms[kTok];
#pragma unroll
  for (int t = 0; t < kTok; ++t) acc[t] = ms[t] = 0.f;
  for (int64_t g = lane; g < nsb; g += 32) {
    const SubBlock b = load_sub_block<Q>(row, g);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t < tn) {
        const int64_t xi = (t0 + t) * nsb + g;
        const int4* xv = reinterpret_cast<const int4*>(xq + xi * kQK);
        const int dot = sub_block_dot<Q>(b, xv);
        acc[t] = fmaf(b.scale * __ldg(xd + xi), static_cast<float>(dot), acc[t]);
        if constexpr (kHasOffset<Q>) ms[t] = fmaf(b.offset, __ldg(xs + xi), ms[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
    if (t < tn) {
      const float v = warp_sum(acc[t] + ms[t]);
      if (lane == 0) y[(t0 + t) * N + n] = v;
    }
  }
}

template <typename TW> __device__ __forceinline__ float ld_w(const TW* p);
template <> __device__ __forceinline__ float ld_w<float>(const float* p) { return __ldg(p); }
template <> __device__ __forceinline__ float ld_w<__half>(const __half* p) {
  return ld_half(reinterpret_cast<const uint8_t*>(p));
}
template <> __device__ __forceinline__ float ld_w<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __uint_as_float(ld_u16(reinterpret_cast<const uint8_t*>(p)) << 16);
}

template <typename TW, typename TX>
__global__ void float_linear_kernel(const TW* __restrict__ W, const TX* __restrict__ x, float* __restrict__ y,
                                    int64_t T, int64_t N, int64_t K) {
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int lane = threadIdx.x & 31;
  const int64_t t0 = int64_t(blockIdx.y) * kTok;
  const int tn = static_cast<int>(min64(kTok, T - t0));
  const TW* row = W + n * K;
  float acc[kTok];
#pragma unroll
  for (int t = 0; t < kTok; ++t) acc[t] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float wv = ld_w<TW>(row + k);
#pragma unroll
    for (int t = 0; t < kTok; ++t)
      if (t < tn) acc[t] = fmaf(wv, to_f<TX>(x[(t0 + t) * K + k]), acc[t]);
  }
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
    if (t < tn) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) y[(t0 + t) * N + n] = v;
    }
  }
}

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

}  // namespace

int64_t qlinear_workspace_bytes(int64_t T, int64_t K) {
  return align256(T * K) + 2 * align256(T * (K / kQK) * int64_t(sizeof(float)));
}

QuantizedX qlinear_x_views(void* workspace, int64_t T, int64_t K) {
  auto* base = static_cast<uint8_t*>(workspace);
  const int64_t nb = K / kQK;
  return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + align256(T * K)),
          reinterpret_cast<float*>(base + align256(T * K) + align256(T * nb * int64_t(sizeof(float))))};
}

cudaError_t quantize_x(const void* x, int64_t T, int64_t K, DType xt, void* workspace, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (K <= 0 || K % kQK) return cudaErrorInvalidValue;
  const QuantizedX X = qlinear_x_views(workspace, T, K);
  const int64_t blocks = T * (K / kQK);
  return dispatch_dtype(xt, [&](auto xtag) {
    using TX = typename decltype(xtag)::type;
    quantize_x_kernel<TX><<<static_cast<unsigned>(ceil_div(blocks, 8)), 256, 0, stream>>>(
        static_cast<const TX*>(x), X.q, X.d, X.s, blocks);
    return cudaGetLastError();
  });
}

cudaError_t qlinear(const void* x, const uint8_t* w, float* y, int64_t T, int64_t N, int64_t K, QType qt, DType xt,
                    void* workspace, cudaStream_t stream) {
  if (T <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarps)), static_cast<unsigned>(ceil_div(T, kTok)));
  const dim3 block(32 * kWarps);
  if (qt == QType::F32 || qt == QType::F16 || qt == QType::BF16) {
    return dispatch_dtype(xt, [&](auto xtag) {
      using TX = typename decltype(xtag)::type;
      const TX* xp = static_cast<const TX*>(x);
      if (qt == QType::F32)
        float_linear_kernel<float, TX><<<grid, block, 0, stream>>>(reinterpret_cast<const float*>(w), xp, y, T, N, K);
      else if (qt == QType::F16)
        float_linear_kernel<__half, TX><<<grid, block, 0, stream>>>(reinterpret_cast<const __half*>(w), xp, y, T, N, K);
      else
        float_linear_kernel<__nv_bfloat16, TX><<<grid, block, 0, stream>>>(
            reinterpret_cast<const __nv_bfloat16*>(w), xp, y, T, N, K);
      return cudaGetLastError();
    });
  }
  const int64_t rb = qtype_row_bytes(qt, K);
  if (rb == 0) return cudaErrorInvalidValue;
  const cudaError_t e = quantize_x(x, T, K, xt, workspace, stream);
  if (e != cudaSuccess) return e;
  const QuantizedX X = qlinear_x_views(workspace, T, K);
  const int8_t* xq = X.q;
  const float* xd = X.d;
  const float* xs = X.s;
  switch (qt) {
    case QType::Q8_0: qlinear_kernel<QType::Q8_0><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    case QType::Q4_0: qlinear_kernel<QType::Q4_0><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    case QType::Q4_1: qlinear_kernel<QType::Q4_1><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    case QType::Q4_K: qlinear_kernel<QType::Q4_K><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    case QType::Q6_K: qlinear_kernel<QType::Q6_K><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    case QType::TQ2_0: qlinear_kernel<QType::TQ2_0><<<grid, block, 0, stream>>>(w, xq, xd, xs, y, T, N, K, rb); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace sparsedge::cuda
