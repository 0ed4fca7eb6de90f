// Sparse FFN kernels (docs/methods.md §1): SVD predictor + compaction, and the conditional FFN.
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
// ffn_predict_q4 (3 launches, no host sync; layout and arithmetic in sdk/sparsedge/ops/ffn.py)
//   1. q4_quantize_kernel  one block per token, a warp per group of G inputs: amax, xs = amax / 127,
//                        xq = rint(x * inv), inv = 127 / amax correctly rounded as the reference computes it
//                        (IEEE ops even under --use_fast_math), xsum8 = 8 sum xq;
//                        xq [T, d] int8, xs / xsum8 [T, d/G] to the workspace. When G is 32 x a power of two
//                        the int8 x is stored permuted per 4 nibble bytes: [x_j..x_j+3 | x_j+G/2..x_j+G/2+3],
//                        so the 16 packed bytes a lane loads pair with 32 contiguous bytes of x.
//   2. q4_mask_kernel    grid (ceil(I/32), token chunks), 8 warps: a block owns 32 consecutive neurons, a warp
//                        4 of them, one after the other. A neuron's gate row + up row (d contiguous bytes) is
//                        read 16 bytes per lane, 512 bytes per warp step, 4 steps in flight; each 16-byte
//                        chunk is 8 __dp4a (unsigned nibbles x int8 x, staged in shared memory). The G/32
//                        lanes (or steps) of one group reduce their partial sums (exact int), the group's
//                        first lane adds (dot - xsum8) * fp32(scale * xs) in fp64, a warp fp64 sum gives g^/u^
//                        (every term is exact, so the order does not matter), then |act(g^) u^| > thresh
//                        and the same __ballot_sync mask words as ffn_predict. Other even G: a lane per group
//                        with scalar nibble math (same sums, slower).
//   3. compact_kernel    as in ffn_predict.
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

// ---- ffn_predict_q4 ---------------------------------------------------------------------------
constexpr int kQ4RowsPerWarp = 32 / kGemvWarps;  // a block owns 32 neurons (one mask word)
constexpr int kQ4Steps = 4;                       // 512-byte warp steps of one row record in flight
constexpr uint32_t kLoNibbles = 0x0F0F0F0Fu;

// Byte position of input k (0 <= k < G) of a group in the staged int8 x. perm: the 4 nibble bytes
// j..j+3 of a row pair with x[j..j+3] (low nibbles) and x[j+G/2..j+G/2+3] (high), stored as 8 bytes.
__device__ __forceinline__ int64_t q4_x_pos(int64_t k, int64_t half, bool perm) {
  if (!perm) return k;
  const int64_t hi = k >= half ? 1 : 0;
  const int64_t j = k - hi * half;
  return (j >> 2) * 8 + hi * 4 + (j & 3);
}

// Per token (block): xq [d] int8 (layout above), xs [ng] = amax / 127, xsum8 [ng] = 8 * sum xq.
template <typename TX>
__global__ void q4_quantize_kernel(const TX* __restrict__ x, int8_t* __restrict__ xq, float* __restrict__ xs,
                                   int32_t* __restrict__ xsum8, int64_t d, int64_t G, bool perm) {
  const int64_t t = blockIdx.x, ng = d / G, half = G / 2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const TX* xt = x + t * d;
  int8_t* qt = xq + t * d;
  for (int64_t g = warp; g < ng; g += nw) {
    const TX* xg = xt + g * G;
    float amax = 0.f;
    for (int64_t k = lane; k < G; k += 32) amax = fmaxf(amax, fabsf(to_f<TX>(xg[k])));
    amax = warp_max(amax);
    // The reference's exact fp32 ops (IEEE, not the --use_fast_math approximations): one correctly rounded
    // division, as q4_estimates in sdk/sparsedge/ops/ffn.py and the CPU kernel compute it. An ulp off here flips
    // round-half-even ties of fp16/bf16 x.
    const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
    int sum = 0;
    for (int64_t k = lane; k < G; k += 32) {
      const int v = __float2int_rn(__fmul_rn(to_f<TX>(xg[k]), inv));  // round half to even, |v| <= 127
      sum += v;
      qt[g * G + q4_x_pos(k, half, perm)] = static_cast<int8_t>(v);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      xs[t * ng + g] = __fdiv_rn(amax, 127.f);
      xsum8[t * ng + g] = 8 * sum;
    }
  }
}

// One neuron's (g^, u^) for the staged tokens, G = 32 * 2^lg (perm layout, 16-byte aligned record).
// Lane l of step s holds chunk k = 32 s + l (16 bytes = 32 inputs) of the record [gate row | up row];
// group gi = k >> lg of the record (row r = gi >= ng, group g = gi - r ng) spans 2^lg chunks.
template <int MT>
__device__ __forceinline__ void q4_row_vec(const uint8_t* rec, const float* srec, const int8_t* xsm,
                                           const float* xss, const int32_t* xsums, int64_t d, int64_t ng, int lg,
                                           int tn, double (&ag)[MT], double (&au)[MT]) {
  const int lane = threadIdx.x & 31;
  const int64_t nch = d >> 4, row_ch = nch >> 1, nsteps = (nch + 31) >> 5;
  const int L = 1 << lg;
  const int Lw = L < 32 ? L : 32;                       // lanes of one group within a step
  const int64_t smask = L > 32 ? (L >> 5) - 1 : 0;      // steps of one group - 1 (G > 1024)
  // lanes 4-7 of each 8 read the second 16 bytes of their 32-byte x slice first: conflict-free LDS.128
  const int sw = (lane >> 2) & 1;
  const uint4* r4 = reinterpret_cast<const uint4*>(rec);
  int part[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) { ag[t] = 0.0; au[t] = 0.0; part[t] = 0; }
  for (int64_t s0 = 0; s0 < nsteps; s0 += kQ4Steps) {
    uint4 v[kQ4Steps];
    float sc[kQ4Steps];
#pragma unroll
    for (int b = 0; b < kQ4Steps; ++b) {
      const int64_t k = (s0 + b) * 32 + lane;
      if (k < nch) {
        v[b] = __ldg(r4 + k);
        sc[b] = __ldg(srec + (k >> lg));
      } else {
        v[b] = make_uint4(0u, 0u, 0u, 0u);
        sc[b] = 0.f;
      }
    }
#pragma unroll
    for (int b = 0; b < kQ4Steps; ++b) {
      const int64_t s = s0 + b;
      if (s >= nsteps) break;  // warp-uniform
      const int64_t k = s * 32 + lane;
      const bool in = k < nch;
      const int r = k >= row_ch ? 1 : 0;
      const int64_t xo = 32 * k - r * d;  // x slice: 2 x the chunk's byte offset within its row
      const uint32_t w0 = sw ? v[b].z : v[b].x, w1 = sw ? v[b].w : v[b].y;
      const uint32_t w2 = sw ? v[b].x : v[b].z, w3 = sw ? v[b].y : v[b].w;
      if (in) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          if (t < tn) {
            const int4* xp = reinterpret_cast<const int4*>(xsm + t * d + xo);
            const int4 a = xp[sw], c = xp[sw ^ 1];
            int p = part[t];
            p = __dp4a(static_cast<int>(w0 & kLoNibbles), a.x, p);
            p = __dp4a(static_cast<int>((w0 >> 4) & kLoNibbles), a.y, p);
            p = __dp4a(static_cast<int>(w1 & kLoNibbles), a.z, p);
            p = __dp4a(static_cast<int>((w1 >> 4) & kLoNibbles), a.w, p);
            p = __dp4a(static_cast<int>(w2 & kLoNibbles), c.x, p);
            p = __dp4a(static_cast<int>((w2 >> 4) & kLoNibbles), c.y, p);
            p = __dp4a(static_cast<int>(w3 & kLoNibbles), c.z, p);
            p = __dp4a(static_cast<int>((w3 >> 4) & kLoNibbles), c.w, p);
            part[t] = p;
          }
        }
      }
      if ((s & smask) == smask) {  // this step ends the lanes' groups: exact int sum, one fp64 term each
        const int64_t g = (k >> lg) - r * ng;
        const bool lead = in && (lane & (Lw - 1)) == 0;
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          if (t < tn) {
            int p = part[t];
            for (int o = Lw >> 1; o > 0; o >>= 1) p += __shfl_xor_sync(kFullMask, p, o);
            if (lead) {
              const float c = __fmul_rn(sc[b], xss[t * ng + g]);
              const double term = static_cast<double>(p - xsums[t * ng + g]) * static_cast<double>(c);
              if (r) au[t] += term;
              else ag[t] += term;
            }
            part[t] = 0;
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t < tn) {
      ag[t] = warp_sum(ag[t]);
      au[t] = warp_sum(au[t]);
    }
  }
}

// Any even G (natural x layout): a lane per group of the record, scalar nibble math.
template <int MT>
__device__ __forceinline__ void q4_row_generic(const uint8_t* rec, const float* srec, const int8_t* xsm,
                                               const float* xss, const int32_t* xsums, int64_t d, int64_t ng,
                                               int64_t G, int tn, double (&ag)[MT], double (&au)[MT]) {
  const int lane = threadIdx.x & 31;
  const int64_t half = G >> 1;
#pragma unroll
  for (int t = 0; t < MT; ++t) { ag[t] = 0.0; au[t] = 0.0; }
  for (int64_t gi = lane; gi < 2 * ng; gi += 32) {
    const int r = gi >= ng ? 1 : 0;
    const int64_t g = gi - r * ng;
    const uint8_t* qb = rec + gi * half;
    const float sc = __ldg(srec + gi);
    int p[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) p[t] = 0;
    for (int64_t j = 0; j < half; ++j) {
      const int b = __ldg(qb + j);
      const int lo = b & 15, hi = b >> 4;
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if (t < tn) {
          const int8_t* xg = xsm + t * d + g * G;
          p[t] += lo * static_cast<int>(xg[j]) + hi * static_cast<int>(xg[half + j]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      if (t < tn) {
        const float c = __fmul_rn(sc, xss[t * ng + g]);
        const double term = static_cast<double>(p[t] - xsums[t * ng + g]) * static_cast<double>(c);
        if (r) au[t] += term;
        else ag[t] += term;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t < tn) {
      ag[t] = warp_sum(ag[t]);
      au[t] = warp_sum(au[t]);
    }
  }
}

// Shared-memory layout of q4_mask_kernel for a chunk of tc tokens.
struct Q4Smem {
  int64_t xs_off, sum_off, res_off, bytes;
};
__host__ __device__ inline Q4Smem q4_smem(int64_t tc, int64_t d, int64_t ng) {
  Q4Smem s;
  s.xs_off = (tc * d + 15) / 16 * 16;
  s.sum_off = s.xs_off + tc * ng * 4;
  s.res_off = s.sum_off + tc * ng * 4;
  s.bytes = s.res_off + tc * 32 * 4;
  return s;
}

// Mask words of a block's 32 neurons for the token chunk: bit i of mask[t] = |act(g^_i) u^_i| > thresh_i.
template <int MT, bool V>
__global__ void q4_mask_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                               const float* __restrict__ thresh, const int8_t* __restrict__ xq,
                               const float* __restrict__ xs, const int32_t* __restrict__ xsum8,
                               uint32_t* __restrict__ mask, int64_t I, int64_t d, int64_t G, int lg, int64_t T,
                               int tc, Act act, float act_param) {
  extern __shared__ __align__(16) unsigned char q4_smem_raw[];
  const int64_t ng = d / G;
  const Q4Smem lay = q4_smem(tc, d, ng);
  int8_t* xsm = reinterpret_cast<int8_t*>(q4_smem_raw);
  float* xss = reinterpret_cast<float*>(q4_smem_raw + lay.xs_off);
  int32_t* xsums = reinterpret_cast<int32_t*>(q4_smem_raw + lay.sum_off);
  int* res = reinterpret_cast<int*>(q4_smem_raw + lay.res_off);  // [tc][32]
  const int64_t t0 = int64_t(blockIdx.y) * tc;
  const int tn = static_cast<int>(min64(tc, T - t0));
  if constexpr (V) {  // d % 32 == 0 and the workspace is 256-byte aligned
    const int4* src = reinterpret_cast<const int4*>(xq + t0 * d);
    int4* dst = reinterpret_cast<int4*>(xsm);
    for (int64_t e = threadIdx.x; e < tn * d / 16; e += blockDim.x) dst[e] = src[e];
  } else {
    for (int64_t e = threadIdx.x; e < tn * d; e += blockDim.x) xsm[e] = xq[t0 * d + e];
  }
  for (int64_t e = threadIdx.x; e < tn * ng; e += blockDim.x) {
    xss[e] = xs[t0 * ng + e];
    xsums[e] = xsum8[t0 * ng + e];
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t base = int64_t(blockIdx.x) * 32;
  for (int rr = 0; rr < kQ4RowsPerWarp; ++rr) {
    const int local = warp + rr * kGemvWarps;
    const int64_t row = base + local;
    if (row >= I) break;  // warp-uniform; the ballot below masks rows >= I
    const uint8_t* rec = q + row * d;  // gate row (d/2 bytes) then up row
    const float* srec = scale + row * 2 * ng;
    double ag[MT], au[MT];
    if constexpr (V) q4_row_vec<MT>(rec, srec, xsm, xss, xsums, d, ng, lg, tn, ag, au);
    else q4_row_generic<MT>(rec, srec, xsm, xss, xsums, d, ng, G, tn, ag, au);
    if (lane == 0) {
      const float th = __ldg(thresh + row);
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if (t < tn) {
          const float h = activate(static_cast<float>(ag[t]), static_cast<float>(au[t]), act, act_param, 0.f);
          res[t * 32 + local] = fabsf(h) > th ? 1 : 0;
        }
      }
    }
  }
  __syncthreads();
  if (warp == 0) {
    const int64_t W = (I + 31) / 32;
    for (int t = 0; t < tn; ++t) {
      const bool on = (base + lane < I) && res[t * 32 + lane] != 0;
      const uint32_t word = __ballot_sync(kFullMask, on);
      if (lane == 0) mask[(t0 + t) * W + blockIdx.x] = word;
    }
  }
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

int64_t ffn_predict_q4_workspace_bytes(int64_t T, int64_t d, int64_t G, int64_t I) {
  // xq [T, d] int8, xs [T, d/G] fp32, xsum8 [T, d/G] int32, mask [T, ceil(I/32)] uint32
  const int64_t ng = G > 0 ? d / G : 0;
  return align256(T * d) + 2 * align256(T * ng * 4) + align256(T * ceil_div(I, 32) * 4);
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

cudaError_t ffn_predict_q4(const void* x, const uint8_t* q, const float* scale, const float* thresh, int32_t* idx,
                           int32_t* count, int64_t T, int64_t d, int64_t G, int64_t I, Act act, float act_param,
                           DType xt, void* workspace, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (G < 2 || G % 2 != 0 || d % G != 0) return cudaErrorInvalidValue;
  const int64_t ng = d / G;
  if (d + 8 * ng > kMaxQ4StagedBytes) return cudaErrorInvalidValue;
  const int64_t W = ceil_div(I, 32);
  char* ws = static_cast<char*>(workspace);
  int8_t* xq = reinterpret_cast<int8_t*>(ws);
  float* xs = reinterpret_cast<float*>(ws + align256(T * d));
  int32_t* xsum8 = reinterpret_cast<int32_t*>(ws + align256(T * d) + align256(T * ng * 4));
  uint32_t* mask = reinterpret_cast<uint32_t*>(ws + align256(T * d) + 2 * align256(T * ng * 4));
  if (I > 0) {
    // vector path: G = 32 * 2^lg (a 16-byte chunk never straddles a group) and 16-byte aligned records
    const int64_t L = G / 32;
    const bool vec = G % 32 == 0 && (L & (L - 1)) == 0 && aligned16(q);
    int lg = 0;
    while (vec && (int64_t(1) << lg) < L) ++lg;
    // 1. x -> int8 per group
    cudaError_t e = dispatch_dtype(xt, [&](auto xtag) {
      using TX = typename decltype(xtag)::type;
      q4_quantize_kernel<TX><<<static_cast<unsigned>(T), 256, 0, stream>>>(static_cast<const TX*>(x), xq, xs, xsum8,
                                                                          d, G, vec);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
    // 2. 4-bit gate/up estimates -> mask bits
    const int64_t per_token = d + 8 * ng + 32 * 4;  // int8 x, xs + xsum8, result tile row
    const int tc = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(kMaxT, (kMaxStagedFloats * 4 - 16) / per_token)));
    const size_t sm = static_cast<size_t>(q4_smem(tc, d, ng).bytes);
    const dim3 grid(static_cast<unsigned>(W), static_cast<unsigned>(ceil_div(T, tc)));
    const unsigned threads = 32 * kGemvWarps;
#define SD_Q4_LAUNCH(MT, V)                                                                                     \
  q4_mask_kernel<MT, V><<<grid, threads, sm, stream>>>(q, scale, thresh, xq, xs, xsum8, mask, I, d, G, lg, T, tc, \
                                                       act, act_param)
    if (tc == 1) {
      if (vec) SD_Q4_LAUNCH(1, true);
      else SD_Q4_LAUNCH(1, false);
    } else {
      if (vec) SD_Q4_LAUNCH(kMaxT, true);
      else SD_Q4_LAUNCH(kMaxT, false);
    }
#undef SD_Q4_LAUNCH
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  // 3. compaction (I == 0: no mask words, count = 0)
  compact_kernel<<<static_cast<unsigned>(T), kCompactThreads, 0, stream>>>(mask, W, I, idx, count);
  return cudaGetLastError();
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
