// bitlinear: BitNet b1.58's BitLinear over 2-bit packed ternary weights (sdk/sparsedge/ops/bitlinear.py has the
// layout and the arithmetic; the CPU kernel is backends/cpu/bitlinear.cpp): y [T, N] = (W q_t) / (scale * s_t).
//
//   1. bitlinear_quant_kernel  a block per token: amax (block max), s = __frcp_rn(max(amax, 1e-5)) * 127,
//                              q = clamp(__float2int_rn(x * s), -128, 127) -> int8 [T, Kp] (Kp = K rounded up to 16,
//                              zero past K), s and sum(q) per token. Every float op is an explicit IEEE one
//                              (__frcp_rn, __fmul_rn), so --use_fast_math cannot change the rounding: q and s are the
//                              reference's (and transformers') bit for bit.
//   2. bitlinear_kernel        grid (ceil(P / 8), ceil(T / 8)), a warp per byte row g (output rows 4g..4g+3) and up to
//                              8 tokens per block (the byte row read once per 8 tokens). Lanes take 4-column words;
//                              row i's codes are (word >> 2i) & 0x03030303 (bytes 0..2, valid int8), dotted with the
//                              token's q by __dp4a; sum_k w q = sum_k c q - sum(q), exact in int32. Then one warp sum
//                              per (row, token) and y = __fdiv_rn(float(sum), __fmul_rn(scale[n], s)).
// Rows are read as 32-bit words when K is a multiple of 4 and the weights 4-byte aligned, else byte by byte.
#include "common.cuh"

namespace sparsedge::cuda {
namespace {

constexpr int kWarps = 8;  // byte rows per block
constexpr int kTok = 8;    // tokens per block
constexpr int64_t kPad = 16;

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }
int64_t padded(int64_t K) { return (K + kPad - 1) / kPad * kPad; }

template <typename TX>
__global__ void bitlinear_quant_kernel(const TX* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ s_out,
                                       int32_t* __restrict__ sum_out, int64_t K, int64_t Kp) {
  __shared__ float scratch[33];
  __shared__ int isum[32];
  const int64_t t = blockIdx.x;
  const TX* xt = x + t * K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_f<TX>(xt[k])));
  amax = block_max(amax, scratch);
  const float s = __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.f);  // torch's 127 / t: a reciprocal, then a product
  int sum = 0;
  for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) {
    int v = 0;
    if (k < K) v = max(-128, min(127, __float2int_rn(__fmul_rn(to_f<TX>(xt[k]), s))));
    q[t * Kp + k] = static_cast<int8_t>(v);
    sum += v;
  }
  sum = warp_sum(sum);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) isum[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < nw; ++i) total += isum[i];
    s_out[t] = s;
    sum_out[t] = total;
  }
}

// the 4 bytes of columns 4j..4j+3 of a row as a little-endian word (zero past K)
template <bool Words>
__device__ __forceinline__ uint32_t row_word(const uint8_t* row, int64_t j, int64_t K) {
  if constexpr (Words) {
    return __ldg(reinterpret_cast<const uint32_t*>(row) + j);
  } else {
    uint32_t v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (4 * j + b < K) v |= uint32_t(__ldg(row + 4 * j + b)) << (8 * b);
    return v;
  }
}

template <bool Words>
__global__ void bitlinear_kernel(const uint8_t* __restrict__ W, const int8_t* __restrict__ xq,
                                 const float* __restrict__ xs, const int32_t* __restrict__ xsum,
                                 const float* __restrict__ scale, float* __restrict__ y, int64_t T, int64_t P,
                                 int64_t K, int64_t Kp) {
  const int64_t g = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (g >= P) return;
  const int lane = threadIdx.x & 31;
  const int64_t t0 = int64_t(blockIdx.y) * kTok;
  const int tn = static_cast<int>(min64(kTok, T - t0));
  const int64_t N = 4 * P, words = (K + 3) / 4;
  const uint8_t* row = W + g * K;
  int acc[4][kTok];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int t = 0; t < kTok; ++t) acc[i][t] = 0;
  for (int64_t j = lane; j < words; j += 32) {
    const uint32_t b = row_word<Words>(row, j, K);
    int c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = static_cast<int>((b >> (2 * i)) & 0x03030303u);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t < tn) {
        const int xw = __ldg(reinterpret_cast<const int*>(xq + (t0 + t) * Kp) + j);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][t] = __dp4a(c[i], xw, acc[i][t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
    if (t < tn) {
      const float s = __ldg(xs + t0 + t);
      const int qs = __ldg(xsum + t0 + t);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int v = warp_sum(acc[i][t]);
        if (lane == 0) {
          const int64_t n = 4 * g + i;
          y[(t0 + t) * N + n] = __fdiv_rn(__int2float_rn(v - qs), __fmul_rn(__ldg(scale + n), s));
        }
      }
    }
  }
}

}  // namespace

int64_t bitlinear_workspace_bytes(int64_t T, int64_t K) {
  return align256(T * padded(K)) + 2 * align256(T * 4);
}

cudaError_t bitlinear(const void* x, const uint8_t* w, const float* scale, float* y, int64_t T, int64_t P, int64_t K,
                      DType xt, void* workspace, cudaStream_t stream) {
  if (T <= 0 || P <= 0) return cudaSuccess;
  if (K <= 0) return cudaErrorInvalidValue;
  const int64_t Kp = padded(K);
  auto* base = static_cast<uint8_t*>(workspace);
  auto* xq = reinterpret_cast<int8_t*>(base);
  auto* xs = reinterpret_cast<float*>(base + align256(T * Kp));
  auto* xsum = reinterpret_cast<int32_t*>(base + align256(T * Kp) + align256(T * 4));
  const cudaError_t e = dispatch_dtype(xt, [&](auto xtag) {
    using TX = typename decltype(xtag)::type;
    bitlinear_quant_kernel<TX><<<static_cast<unsigned>(T), 256, 0, stream>>>(static_cast<const TX*>(x), xq, xs, xsum,
                                                                             K, Kp);
    return cudaGetLastError();
  });
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(P, kWarps)), static_cast<unsigned>(ceil_div(T, kTok)));
  const dim3 block(32 * kWarps);
  if (K % 4 == 0 && (reinterpret_cast<uintptr_t>(w) & 3u) == 0)
    bitlinear_kernel<true><<<grid, block, 0, stream>>>(w, xq, xs, xsum, scale, y, T, P, K, Kp);
  else
    bitlinear_kernel<false><<<grid, block, 0, stream>>>(w, xq, xs, xsum, scale, y, T, P, K, Kp);
  return cudaGetLastError();
}

}  // namespace sparsedge::cuda
