// Sparse FFN kernels (METHODS.md section 1): SVD predictor + compaction, and the conditional FFN.
//
// All dot products are warp-per-row: a lane reads 16 consecutive bytes of the row per step (8 fp16/bf16
// or 4 fp32 weights), so a warp reads 512 contiguous bytes of one row per step, fully coalesced, and
// the activations x (<= 48 KiB per token chunk) are staged in shared memory as fp32. Everything
// accumulates in fp32. Weights are always read in place: no gathered copies.
//
// ffn_predict   (3 launches, no host sync)
//   1. gemv_kernel       z[t] = P1 x[t]           grid (ceil(r/8), token chunks), 8 warps, 1 row per warp
//   2. p2_mask_kernel    s = P2 z + b; bit i of mask[t] = s_i > 0
//                        grid (ceil(I/32), token chunks), 8 warps: a block owns 32 consecutive rows
//                        (4 per warp, loads of the 4 rows interleaved), then one __ballot_sync per token
//                        turns the 32 results into one 32-bit mask word.
//   3. compact_kernel    one 1024-thread block per token: each thread popcounts a contiguous run of mask
//                        words, a block exclusive scan gives its output offset, then it writes the set bit
//                        positions in ascending order -> idx[t, :count[t]], count[t].
// sparse_ffn_rows (3 launches, no host sync; count[] stays on the device)
//   1. gateup_kernel     grid (min(ceil(I/16), 8*SMs), T), 8 warps, persistent: warp w walks positions
//                        k = w, w + nwarps, ... < count[t] (read on the device); for each it dots rows
//                        idx[t,k] of W_gate and W_up with x[t] (the two row streams interleaved), applies the
//                        activation (+ tau) and stores h[t, k] (fp32 workspace, compact order).
//   2. down_kernel       output-column split with a row split: grid (ceil(d / (32*N)), S, T), 4 warps.
//                        Block (c, s, t) owns a 32*N-column slice (N = 16 B / element size) and the s-th
//                        of S equal chunks of the token's active list; its warps take every 4th position,
//                        skip h == 0 (warp-uniform branch, no row read), and process 4 rows per step with
//                        the 4 loads issued together. The 4 warps reduce in shared memory and write one
//                        fp32 partial [S, T, d]. S is chosen from the SM count so a decode step has enough
//                        rows in flight to saturate HBM (a single block per column slice cannot).
//   3. finalize_kernel   y[t, c] = sum_s partial[s, t, c] in a fixed order (deterministic, unlike fp32
//                        atomics), cast to x's dtype; block 0 of each token also counts h != 0 -> down_count.
// Partials instead of atomics: deterministic results run to run, no memset launch, and the partial
// buffer (<= 32 x T x d fp32, 512 KiB at d=4096) stays in L2.
#include <algorithm>
#include <mutex>

#include "common.cuh"

namespace sparsedge::cuda {

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 108;
    }
    cache[device] = n;
  }
  return cache[device];
}

namespace {

constexpr int kMaxT = 8;          // tokens per chunk in the predictor GEMVs
constexpr int kGemvWarps = 8;     // warps per block (predictor, gate/up)
constexpr int kDownWarps = 4;     // warps per block (down projection)
constexpr int kMaxSplits = 32;    // row splits of the down projection
constexpr int kCompactThreads = 1024;

// Tokens whose fp32 copy of a `len`-long vector fits the shared-memory staging area together.
inline int tokens_per_chunk(int64_t len) {
  const int64_t fit = kMaxStagedFloats / std::max<int64_t>(len, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxT, fit)));
}

// Stage src[t0..t0+tc) rows (length len, dtype S) as fp32 into shared memory.
template <typename S>
__device__ __forceinline__ void stage(float* dst, const S* src, int64_t len, int tc) {
  const int64_t n = len * tc;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = to_f<S>(src[e]);
}

// acc[q][t] += W_q[c..] . xs[t][c..] over the row; warp-reduced on return (every lane holds the sums).
template <typename TW, bool V, int R, int MT>
__device__ __forceinline__ void warp_dot(const TW* const (&w)[R], const bool (&live)[R], const float* xs,
                                         int64_t len, int tc, float (&acc)[R][MT]) {
  constexpr int N = Lanes<TW, V>::N;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int q = 0; q < R; ++q)
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[q][t] = 0.f;
#pragma unroll 2
  for (int64_t c = int64_t(lane) * N; c < len; c += 32 * N) {
    float wv[R][N];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      if (live[q]) {
        load_row<TW, V>(w[q] + c, wv[q]);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) wv[q][j] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      if (t < tc) {
        float xv[N];
        load_smem<N>(xs + t * len + c, xv);
#pragma unroll
        for (int q = 0; q < R; ++q)
#pragma unroll
          for (int j = 0; j < N; ++j) acc[q][t] = fmaf(wv[q][j], xv[j], acc[q][t]);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < R; ++q)
#pragma unroll
    for (int t = 0; t < MT; ++t)
      if (t < tc) acc[q][t] = warp_sum(acc[q][t]);
}

// y[t, row] = W[row] . x[t]  (fp32 out), tokens [blockIdx.y*tc, +tc).
template <typename TW, typename TX, bool V>
__global__ void gemv_kernel(const TW* __restrict__ W, const TX* __restrict__ x, float* __restrict__ y,
                            int64_t rows, int64_t len, int64_t T, int tc) {
  extern __shared__ __align__(16) float xs[];
  const int64_t t0 = int64_t(blockIdx.y) * tc;
  const int tn = static_cast<int>(min64(tc, T - t0));
  stage<TX>(xs, x + t0 * len, len, tn);
  __syncthreads();
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const TW* w[1] = {W + row * len};
  const bool live[1] = {true};
  float acc[1][kMaxT];
  warp_dot<TW, V, 1, kMaxT>(w, live, xs, len, tn, acc);
  if ((threadIdx.x & 31) == 0)
    for (int t = 0; t < tn; ++t) y[(t0 + t) * rows + row] = acc[0][t];
}

// s = P2 z + b over a block's 32 rows; mask word per token.  z fp32 [T, r].
template <typename TW, bool V>
__global__ void p2_mask_kernel(const TW* __restrict__ P2, const float* __restrict__ z, const TW* __restrict__ bias,
                               uint32_t* __restrict__ mask, int64_t I, int64_t r, int64_t T, int tc) {
  extern __shared__ __align__(16) float smem[];
  float* zs = smem;                 // [tc][r]
  float* res = smem + tc * r;       // [kMaxT][32]
  const int64_t t0 = int64_t(blockIdx.y) * tc;
  const int tn = static_cast<int>(min64(tc, T - t0));
  for (int64_t e = threadIdx.x; e < r * tn; e += blockDim.x) zs[e] = z[t0 * r + e];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t base = int64_t(blockIdx.x) * 32;
  constexpr int R = 32 / kGemvWarps;  // rows per warp
  const TW* w[R];
  bool live[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const int64_t row = base + warp + q * kGemvWarps;
    live[q] = row < I;
    w[q] = P2 + (live[q] ? row : 0) * r;
  }
  float acc[R][kMaxT];
  warp_dot<TW, V, R, kMaxT>(w, live, zs, r, tn, acc);
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const int64_t row = base + warp + q * kGemvWarps;
      const float b = live[q] ? to_f<TW>(bias[row]) : 0.f;
      for (int t = 0; t < tn; ++t) res[t * 32 + warp + q * kGemvWarps] = acc[q][t] + b;
    }
  }
  __syncthreads();
  if (warp == 0) {
    const int64_t W = (I + 31) / 32;
    for (int t = 0; t < tn; ++t) {
      const bool on = (base + lane < I) && res[t * 32 + lane] > 0.f;
      const uint32_t word = __ballot_sync(kFullMask, on);
      if (lane == 0) mask[(t0 + t) * W + blockIdx.x] = word;
    }
  }
}

__global__ void compact_kernel(const uint32_t* __restrict__ mask, int64_t W, int64_t I, int32_t* __restrict__ idx,
                               int32_t* __restrict__ count) {
  __shared__ int scratch[33];
  const int64_t t = blockIdx.x;
  const uint32_t* m = mask + t * W;
  const int64_t per = (W + blockDim.x - 1) / blockDim.x;
  const int64_t w0 = min64(W, threadIdx.x * per), w1 = min64(W, w0 + per);
  int c = 0;
  for (int64_t w = w0; w < w1; ++w) c += __popc(m[w]);
  int total = 0;
  int pos = block_exclusive_scan<int>(c, scratch, &total);
  int32_t* out = idx + t * I;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t bits = m[w];
    while (bits) {
      const int b = __ffs(bits) - 1;
      out[pos++] = static_cast<int32_t>(w * 32 + b);
      bits &= bits - 1;
    }
  }
  if (threadIdx.x == 0) count[t] = total;
}

__device__ __forceinline__ float activate(float g, float u, Act act, float act_param, float tau) {
  float a;
  switch (act) {
    case Act::SiLU: a = g / (1.f + __expf(-g)); break;
    case Act::GELU: a = 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); break;
    case Act::GELU_Tanh: {
      const float k = 0.79788456080286536f * (g + 0.044715f * g * g * g);
      a = 0.5f * g * (1.f + tanhf(k));
      break;
    }
    case Act::ReLU: case Act::DReLU: a = fmaxf(g, 0.f); break;
    case Act::FATReLU: a = g > act_param ? g : 0.f; break;
    case Act::ReLU2: { const float rg = fmaxf(g, 0.f); a = rg * rg; break; }
    default: a = 0.f;
  }
  if (act == Act::DReLU) u = fmaxf(u, 0.f);
  float h = a * u;
  if (tau > 0.f && fabsf(a) < tau) h = 0.f;
  return h;
}

template <typename TW, typename TX, bool V>
__global__ void gateup_kernel(const TX* __restrict__ x, const int32_t* __restrict__ idx,
                              const int32_t* __restrict__ count, const TW* __restrict__ Wg,
                              const TW* __restrict__ Wu, float* __restrict__ h, int64_t d, int64_t I, Act act,
                              float act_param, float tau) {
  extern __shared__ __align__(16) float xs[];
  const int64_t t = blockIdx.y;
  stage<TX>(xs, x + t * d, d, 1);
  __syncthreads();
  const int64_t cnt = count[t];
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const int32_t* it = idx + t * I;
  float* ht = h + t * I;
  for (int64_t k = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); k < cnt; k += nwarps) {
    const int64_t row = it[k];
    const TW* w[2] = {Wg + row * d, Wu + row * d};
    const bool live[2] = {true, true};
    float acc[2][1];
    warp_dot<TW, V, 2, 1>(w, live, xs, d, 1, acc);
    if ((threadIdx.x & 31) == 0) ht[k] = activate(acc[0][0], acc[1][0], act, act_param, tau);
  }
}

template <typename TW, bool V>
__global__ void down_kernel(const TW* __restrict__ Wd, const int32_t* __restrict__ idx,
                            const int32_t* __restrict__ count, const float* __restrict__ h,
                            float* __restrict__ partial, int64_t d, int64_t I, int64_t T) {
  constexpr int N = Lanes<TW, V>::N;
  constexpr int U = 4;  // rows in flight per warp step
  __shared__ __align__(16) float red[kDownWarps][32 * N];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.z, s = blockIdx.y, S = gridDim.y;
  const int64_t cnt = count[t];
  const int64_t chunk = (cnt + S - 1) / S;
  const int64_t k0 = min64(cnt, s * chunk), k1 = min64(cnt, k0 + chunk);
  const int64_t col = int64_t(blockIdx.x) * 32 * N + int64_t(lane) * N;
  const bool valid = col < d;
  const int32_t* it = idx + t * I;
  const float* ht = h + t * I;
  float acc[N];
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = 0.f;
  for (int64_t k = k0 + warp; k < k1; k += kDownWarps * U) {
    float hv[U];
    int64_t row[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t kk = k + int64_t(u) * kDownWarps;
      hv[u] = kk < k1 ? ht[kk] : 0.f;
      row[u] = hv[u] != 0.f ? it[kk] : 0;
    }
    float wv[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (hv[u] != 0.f && valid) {
        load_row<TW, V>(Wd + row[u] * d + col, wv[u]);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) wv[u][j] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] = fmaf(hv[u], wv[u][j], acc[j]);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) red[warp][lane * N + j] = acc[j];
  __syncthreads();
  for (int e = threadIdx.x; e < 32 * N; e += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kDownWarps; ++w) v += red[w][e];
    const int64_t c = int64_t(blockIdx.x) * 32 * N + e;
    if (c < d) partial[(s * T + t) * d + c] = v;
  }
}

template <typename TX>
__global__ void finalize_kernel(const float* __restrict__ partial, int64_t S, const float* __restrict__ h,
                                const int32_t* __restrict__ count, TX* __restrict__ y, int32_t* __restrict__ down_count,
                                int64_t d, int64_t I, int64_t T) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < d) {
    float v = 0.f;
    for (int64_t s = 0; s < S; ++s) v += partial[(s * T + t) * d + c];
    y[t * d + c] = from_f<TX>(v);
  }
  if (blockIdx.x == 0) {
    const int64_t cnt = count[t];
    float nz = 0.f;  // exact for counts < 2^24
    for (int64_t k = threadIdx.x; k < cnt; k += blockDim.x) nz += h[t * I + k] != 0.f ? 1.f : 0.f;
    nz = block_sum(nz, scratch);
    if (threadIdx.x == 0) down_count[t] = static_cast<int32_t>(nz);
  }
}

inline int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

int down_splits(int64_t T, int64_t d, int64_t I, int device, int N) {
  const int64_t slices = ceil_div(d, 32 * N);
  const int64_t want = ceil_div(int64_t(sm_count(device)) * 8, slices * std::max<int64_t>(T, 1));
  const int64_t by_rows = std::max<int64_t>(1, ceil_div(I, 64));  // >= ~16 rows per warp at full density
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, int64_t(kMaxSplits), by_rows})));
}

}  // namespace

int64_t ffn_predict_workspace_bytes(int64_t T, int64_t r, int64_t I) {
  return align256(T * r * 4) + align256(T * ceil_div(I, 32) * 4);
}

int64_t ffn_rows_workspace_bytes(int64_t T, int64_t d, int64_t I, int device) {
  // h [T, I] fp32 + partials [S, T, d] fp32, S for the narrowest lane width (fp32: N = 4)
  (void)device;
  return align256(T * I * 4) + align256(int64_t(kMaxSplits) * T * d * 4);
}

cudaError_t ffn_predict(const void* x, const void* p1, const void* p2, const void* bias, int32_t* idx,
                        int32_t* count, int64_t T, int64_t d, int64_t r, int64_t I, DType xt, DType pt,
                        void* workspace, cudaStream_t stream) {
  if (T == 0 || I == 0) return cudaSuccess;
  if (d > kMaxStagedFloats || r + 256 > kMaxStagedFloats) return cudaErrorInvalidValue;
  float* z = static_cast<float*>(workspace);
  uint32_t* mask = reinterpret_cast<uint32_t*>(static_cast<char*>(workspace) + align256(T * r * 4));
  const int64_t W = ceil_div(I, 32);
  return dispatch_dtype(pt, [&](auto ptag) {
    using TW = typename decltype(ptag)::type;
    constexpr int N = Lanes<TW, true>::N;
    // 1. z = P1 x
    if (r > 0) {
      const bool v1 = aligned16(p1) && d % N == 0;
      const int tc = tokens_per_chunk(d);
      const dim3 grid(static_cast<unsigned>(ceil_div(r, kGemvWarps)), static_cast<unsigned>(ceil_div(T, tc)));
      const size_t sm = size_t(tc) * d * sizeof(float);
      cudaError_t e = dispatch_dtype(xt, [&](auto xtag) {
        using TX = typename decltype(xtag)::type;
        if (v1) gemv_kernel<TW, TX, true><<<grid, 32 * kGemvWarps, sm, stream>>>(
            static_cast<const TW*>(p1), static_cast<const TX*>(x), z, r, d, T, tc);
        else gemv_kernel<TW, TX, false><<<grid, 32 * kGemvWarps, sm, stream>>>(
            static_cast<const TW*>(p1), static_cast<const TX*>(x), z, r, d, T, tc);
        return cudaGetLastError();
      });
      if (e != cudaSuccess) return e;
    }
    // 2. s = P2 z + b -> mask bits
    {
      const bool v2 = aligned16(p2) && r % N == 0;
      const int tc = tokens_per_chunk(r + 256);  // z rows + the [8][32] result tile fit in 48 KiB
      const dim3 grid(static_cast<unsigned>(W), static_cast<unsigned>(ceil_div(T, tc)));
      const size_t sm = (size_t(tc) * r + kMaxT * 32) * sizeof(float);
      if (v2) p2_mask_kernel<TW, true><<<grid, 32 * kGemvWarps, sm, stream>>>(
          static_cast<const TW*>(p2), z, static_cast<const TW*>(bias), mask, I, r, T, tc);
      else p2_mask_kernel<TW, false><<<grid, 32 * kGemvWarps, sm, stream>>>(
          static_cast<const TW*>(p2), z, static_cast<const TW*>(bias), mask, I, r, T, tc);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    // 3. compaction
    compact_kernel<<<static_cast<unsigned>(T), kCompactThreads, 0, stream>>>(mask, W, I, idx, count);
    return cudaGetLastError();
  });
}

cudaError_t sparse_ffn_rows(const void* x, const int32_t* idx, const int32_t* count, const void* w_gate,
                            const void* w_up, const void* w_down_t, void* y, int32_t* down_count, int64_t T,
                            int64_t d, int64_t I, Act act, float act_param, float tau, DType xt, DType wt,
                            void* workspace, int device, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (d > kMaxStagedFloats) return cudaErrorInvalidValue;
  float* h = static_cast<float*>(workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(T * I * 4));
  return dispatch_dtype(wt, [&](auto wtag) {
    using TW = typename decltype(wtag)::type;
    constexpr int N = Lanes<TW, true>::N;
    const bool vec = d % N == 0 && aligned16(w_gate) && aligned16(w_up) && aligned16(w_down_t);
    return dispatch_dtype(xt, [&](auto xtag) {
      using TX = typename decltype(xtag)::type;
      // 1. gate/up + activation -> h
      if (I > 0) {
        const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(I, 2 * kGemvWarps),
                                                                      int64_t(sm_count(device)) * 8));
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(T));
        const size_t sm = size_t(d) * sizeof(float);
        if (vec) gateup_kernel<TW, TX, true><<<grid, 32 * kGemvWarps, sm, stream>>>(
            static_cast<const TX*>(x), idx, count, static_cast<const TW*>(w_gate), static_cast<const TW*>(w_up), h,
            d, I, act, act_param, tau);
        else gateup_kernel<TW, TX, false><<<grid, 32 * kGemvWarps, sm, stream>>>(
            static_cast<const TX*>(x), idx, count, static_cast<const TW*>(w_gate), static_cast<const TW*>(w_up), h,
            d, I, act, act_param, tau);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
      }
      // 2. down projection partials
      const int n_lane = vec ? N : 1;
      const int S = down_splits(T, d, I, device, n_lane);
      {
        const dim3 grid(static_cast<unsigned>(ceil_div(d, 32 * n_lane)), static_cast<unsigned>(S),
                        static_cast<unsigned>(T));
        if (vec) down_kernel<TW, true><<<grid, 32 * kDownWarps, 0, stream>>>(
            static_cast<const TW*>(w_down_t), idx, count, h, partial, d, I, T);
        else down_kernel<TW, false><<<grid, 32 * kDownWarps, 0, stream>>>(
            static_cast<const TW*>(w_down_t), idx, count, h, partial, d, I, T);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
      }
      // 3. reduce partials -> y, down_count
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(d, 256))), static_cast<unsigned>(T));
      finalize_kernel<TX><<<grid, 256, 0, stream>>>(partial, S, h, count, static_cast<TX*>(y), down_count, d, I, T);
      return cudaGetLastError();
    });
  });
}

}  // namespace sparsedge::cuda
