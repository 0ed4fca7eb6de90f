// Dense causal GQA attention over the preallocated KV cache: the CUDA baseline the delta kernel is
// measured against (decode and prefill chunks), and its sliding-window form (window > 0: the query at position p
// attends to keys max(0, p - window + 1)..p). One block per (token, query head):
//   1. scores: one warp per key, lanes split the head dim, written to an fp32 workspace row;
//   2. block max, exp, block sum (fp32 softmax);
//   3. P.V: warps split the keys, lanes the head dim, partial sums reduced through shared memory.
#include "common.cuh"

namespace sparsedge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDPerLane = 8;  // head dim <= 256

template <typename T>
__global__ void __launch_bounds__(kThreads)
dense_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                       float* __restrict__ scores, int64_t T_, int64_t Hq, int64_t H, int64_t D, int64_t Tmax,
                       int64_t start, float scale, int64_t window) {
  __shared__ float qs[256];
  __shared__ float red[33];
  __shared__ float part[kWarps][256];
  const int64_t r = blockIdx.x;
  const int64_t t = r / Hq, hq = r % Hq, h = hq / (Hq / H);
  const int64_t lo = window > 0 ? max(int64_t(0), start + t + 1 - window) : 0;  // first key of the window
  const int64_t n_keys = start + t + 1 - lo;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) qs[i] = to_f<T>(q[r * D + i]);
  __syncthreads();
  const T* kb = k + (h * Tmax + lo) * D;
  const T* vb = v + (h * Tmax + lo) * D;
  float* sc = scores + r * (start + T_);

  float m = -INFINITY;
  for (int64_t j = warp; j < n_keys; j += kWarps) {
    float s = 0.f;
    for (int64_t i = lane; i < D; i += 32) s += qs[i] * to_f<T>(kb[j * D + i]);
    s = warp_sum(s) * scale;
    if (lane == 0) sc[j] = s;
    m = fmaxf(m, s);
  }
  m = block_max(m, red);  // its __syncthreads also publishes the score row to the whole block
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < n_keys; j += kThreads) {
    const float e = __expf(sc[j] - m);
    sc[j] = e;
    sum += e;
  }
  sum = block_sum(sum, red);

  float acc[kMaxDPerLane];
#pragma unroll
  for (int c = 0; c < kMaxDPerLane; ++c) acc[c] = 0.f;
  for (int64_t j = warp; j < n_keys; j += kWarps) {
    const float p = sc[j];
#pragma unroll
    for (int c = 0; c < kMaxDPerLane; ++c) {
      const int64_t i = lane + 32 * c;
      if (i < D) acc[c] += p * to_f<T>(vb[j * D + i]);
    }
  }
#pragma unroll
  for (int c = 0; c < kMaxDPerLane; ++c) {
    const int64_t i = lane + 32 * c;
    if (i < D) part[warp][i] = acc[c];
  }
  __syncthreads();
  const float inv = 1.f / sum;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += part[w][i];
    out[r * D + i] = from_f<T>(s * inv);
  }
}

}  // namespace

int64_t dense_attention_workspace_bytes(int64_t T, int64_t Hq, int64_t start) {
  return T * Hq * (start + T) * int64_t(sizeof(float));
}

cudaError_t dense_attention(const void* q, const void* k_cache, const void* v_cache, void* out, float* scores,
                            int64_t T, int64_t Hq, int64_t H, int64_t D, int64_t Tmax, int64_t start, float scale,
                            DType dt, cudaStream_t stream, int64_t window) {
  if (D > 256 || H <= 0 || Hq % H != 0 || window < 0) return cudaErrorInvalidValue;
  if (T * Hq == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    dense_attention_kernel<S><<<static_cast<unsigned>(T * Hq), kThreads, 0, stream>>>(
        static_cast<const S*>(q), static_cast<const S*>(k_cache), static_cast<const S*>(v_cache), static_cast<S*>(out),
        scores, T, Hq, H, D, Tmax, start, scale, window);
    return cudaGetLastError();
  });
}

}  // namespace sparsedge::cuda
