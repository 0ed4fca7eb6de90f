// qsparse_ffn (sdk/sparsedge/ops/qffn.py): one FFN step over GGUF block weights that skips the down rows of the
// neurons whose exact |h| is at or below their threshold; W_down in sparsedge.quant.down_t's neuron-row layout.
// qsparse_ffn_rows, the same step over a predicted list of neurons, is at the end of this comment. The CPU kernel
// both mirror is backends/cpu/quant_sparse_ffn.cpp. qsparse_ffn: 4 launches, no host sync:
//
//   1-2. qlinear (quant.cu) over all 2I gate and up rows into gu [T, 2I] fp32. Gate and up are dense, so this is
//        exactly qlinear's problem: reusing its launcher keeps one copy of the block decoding and of the x rounding
//        (bit-identical to qlinear's), and its row read serves 8 tokens at once. The activation is not fused there
//        because the down kernel needs h as a 32-lane block anyway (ballot, rounding); an extra 8 T I bytes of gu
//        (in L2 at decode) is all it costs.
//   3.   down_kernel: grid (ceil(d / 256), S, T), 4 warps. Block (c, s, t) owns a 256-output slice and the s-th of
//        S contiguous runs of 32-neuron blocks; warp w takes every 4th block of the run. Per block, lane = neuron:
//        h = act(g) u, keep = |h| > thresh (one ballot -> the kept count), the kept h rounded to int8 exactly as
//        qlinear rounds x (round_int8_32: dh, qh, sh). Only rows with qh != 0 are read: a kept neuron rounded to 0
//        adds nothing to the integer sums (and sh already counts it), so skipping it is exact and saves its bytes.
//        Rows are taken 8 at a time, their loads issued together (rows are scattered, so latency, not bandwidth,
//        limits a single warp). A lane owns 8 outputs: 4 code bytes at 4 bits (outputs k..k+3 in the low nibbles,
//        k+16..k+19 in the high ones), 8 at 8 bits; the 4x4 bytes of 4 rows are transposed with __byte_perm so one
//        __dp4a adds code_i qh_i over 4 neurons (exact int32: |sum| <= 32 * 128 * 127). Per block and output then
//        y += acc * (scale dh) + min sh in fp32, the CPU kernel's order. The 4 warps reduce in shared memory and
//        write one fp32 partial [S, T, d]; the slice-0 blocks also write their kept counts [S, T].
//        Why the row split S: at decode one token has d / 256 slices only; S = min(32, 8 SMs / (slices T), I / 128)
//        puts enough blocks (and rows in flight) on the GPU to cover HBM latency.
//   4.   finalize_kernel: y[t, c] = sum_s partial[s, t, c] in a fixed order, cast to x's dtype; count[t] likewise.
//        Partials instead of atomics: deterministic results run to run and no memset launch (as ffn.cu's down path).
//
// qsparse_ffn_rows (the listed-neuron variant: sparsedge::ffn_predict's idx / count pick the neurons; 4 launches, no
// host sync) differs in the gate/up steps and the keep rule only:
//   1.   qlinear's x rounding alone (quantize_x, quant.cu).
//   2.   gateup_rows_kernel<Q>: the gate and up rows of the listed neurons only, a warp per listed neuron (persistent
//        warps over the positions of the token's list), the sub-block decoding and dot products of qlinear
//        (load_sub_block / sub_block_dot, quant.cuh) -> gu, with every unlisted neuron's g = u = 0 written by the
//        same walk (each warp zeroes the gap before its position), so gu is complete without a memset.
//   3-4. down_kernel and finalize_kernel as above with thresh = null: keep = h != 0 (an unlisted neuron has
//        h = act(0) 0 = 0; a listed one whose h is exactly 0 costs no down row); count = the nonzero h per token.
//
// Prefill (T > 1) reads each token's kept down rows separately (mostly from L2 when tokens share neurons); gate/up
// rows are read once per 8 tokens by qlinear (by qsparse_ffn_rows once per token listing them: each token has its
// own list; rows shared between tokens are re-read, mostly from L2). The h rounding is repeated by every output slice
// of a block (32 activations, cheap next to its rows); all slices compute it identically, so they agree on kept / qh.
#include <algorithm>
#include <cuda_fp16.h>

#include "common.cuh"
#include "quant.cuh"
#include "quant.h"

namespace sparsedge::cuda {
namespace {

constexpr int kQK = 32;
constexpr int kWarps = 4;               // warps per down block
constexpr int kUnit = 8;                // outputs per lane
constexpr int kSlice = 32 * kUnit;      // outputs per down block
constexpr int kBatch = 8;               // code rows loaded together per warp step
constexpr int kMaxSplits = 32;
constexpr int kFinalizeThreads = 256;
constexpr int kRowsThreads = 256;       // qsparse_ffn_rows' gate/up kernel: 8 warps, a listed neuron per warp
constexpr int64_t kMaxGridZ = 65535;
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float half_lo(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w)));
}
__device__ __forceinline__ float half_hi(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
// 4 fp16 at an 8-byte aligned address
__device__ __forceinline__ void ld_half4(const __half* p, float* out) {
  const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
  out[0] = half_lo(r.x);
  out[1] = half_hi(r.x);
  out[2] = half_lo(r.y);
  out[3] = half_hi(r.y);
}

// the 4x4 bytes of words a, b, c, e (one per neuron; byte j = output j) -> o[j] = bytes (a_j, b_j, c_j, e_j)
__device__ __forceinline__ void transpose4(uint32_t a, uint32_t b, uint32_t c, uint32_t e, uint32_t (&o)[4]) {
  const uint32_t ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);  // a0 b0 a1 b1 | a2 b2 a3 b3
  const uint32_t ce_lo = __byte_perm(c, e, 0x5140), ce_hi = __byte_perm(c, e, 0x7362);
  o[0] = __byte_perm(ab_lo, ce_lo, 0x5410);
  o[1] = __byte_perm(ab_lo, ce_lo, 0x7632);
  o[2] = __byte_perm(ab_hi, ce_hi, 0x5410);
  o[3] = __byte_perm(ab_hi, ce_hi, 0x7632);
}

// acc[j] += sum over the 4 neurons of word n's byte j * qh_n (qpack: the 4 int8 qh as bytes)
__device__ __forceinline__ void dot4x4(uint32_t a, uint32_t b, uint32_t c, uint32_t e, int qpack, int* acc) {
  uint32_t o[4];
  transpose4(a, b, c, e, o);
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j] = __dp4a(static_cast<int>(o[j]), qpack, acc[j]);
}

__device__ __forceinline__ int pack4(const int* q) {
  return static_cast<int>((static_cast<uint32_t>(q[0]) & 0xFFu) | ((static_cast<uint32_t>(q[1]) & 0xFFu) << 8) |
                          ((static_cast<uint32_t>(q[2]) & 0xFFu) << 16) | (static_cast<uint32_t>(q[3]) << 24));
}

// first output of the lane's two runs of 4: c0 .. c0 + 3 and c0 + off .. c0 + off + 3
template <bool FOUR>
__device__ __forceinline__ int64_t unit_col(int64_t unit) {
  return FOUR ? (unit >> 2) * kQK + (unit & 3) * 4 : unit * kUnit;
}
template <bool FOUR> constexpr int64_t kHiOff = FOUR ? 16 : 4;

// FOUR: codes uint8 [I, d / 2] (4-bit, groups of 32 outputs: byte k = output k low nibble, k + 16 high nibble);
// else int8 [I, d]. gu [T, 2I] fp32 (gate then up), thresh [I] or null (keep every nonzero h), partial [S, T, d],
// kept [S, T].
template <bool FOUR>
__global__ void __launch_bounds__(kWarps * 32)
    down_kernel(const float* __restrict__ gu, const float* __restrict__ thresh, const uint8_t* __restrict__ codes,
                const __half* __restrict__ scale, const __half* __restrict__ minv, float* __restrict__ partial,
                int32_t* __restrict__ kept_part, int64_t T, int64_t d, int64_t I, int64_t blocks_per_split,
                Act act, float act_param) {
  __shared__ float red[kWarps][kSlice];
  __shared__ int kept_warp[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t units = d / kUnit;
  const int64_t unit = int64_t(blockIdx.x) * 32 + lane;
  const bool active = unit < units;  // lanes past d still take part in the warp collectives
  const int64_t c0 = unit_col<FOUR>(active ? unit : 0);
  const int64_t row_bytes = FOUR ? d / 2 : d;
  const int64_t lane_byte = active ? unit * (FOUR ? 4 : 8) : 0;
  const int64_t nb = I / kQK;
  const int64_t s = blockIdx.y;
  const int64_t b0 = s * blocks_per_split, b1 = min64(nb, b0 + blocks_per_split);

  for (int64_t t = blockIdx.z; t < T; t += gridDim.z) {
    const float* g = gu + t * 2 * I;
    const float* u = g + I;
    float y[kUnit];
#pragma unroll
    for (int k = 0; k < kUnit; ++k) y[k] = 0.f;
    int kept_total = 0;

    for (int64_t b = b0 + warp; b < b1; b += kWarps) {
      const int64_t i = b * kQK + lane;
      const float h = activate(__ldg(g + i), __ldg(u + i), act, act_param, 0.f);
      // qsparse_ffn: |h| above the neuron's threshold; qsparse_ffn_rows (thresh null): every nonzero h (the unlisted
      // neurons have g = u = 0, so h = act(0) 0 = 0 for every activation)
      const bool keep = thresh != nullptr ? fabsf(h) > __ldg(thresh + i) : h != 0.f;
      const unsigned kept = __ballot_sync(kFullMask, keep);
      if (kept == 0u) continue;  // warp-uniform
      kept_total += __popc(kept);
      float dh, sh;
      const int q = round_int8_32(keep ? h : 0.f, dh, sh);
      unsigned rows = __ballot_sync(kFullMask, q != 0);
      if (rows == 0u) continue;  // every kept qh is 0: sh = 0 too, the block adds exactly nothing

      int acc[kUnit];
#pragma unroll
      for (int k = 0; k < kUnit; ++k) acc[k] = 0;
      const uint8_t* base = codes + b * kQK * row_bytes + lane_byte;
      while (rows) {  // warp-uniform
        int nrow[kBatch], qv[kBatch];
        const int n = min(kBatch, __popc(rows));
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          if (j < n) {
            nrow[j] = __ffs(rows) - 1;
            rows &= rows - 1;
          } else {
            nrow[j] = nrow[0];  // padding: a row already being read, weighted by 0
          }
          const int qj = __shfl_sync(kFullMask, q, nrow[j]);
          qv[j] = j < n ? qj : 0;
        }
        if constexpr (FOUR) {
          uint32_t w[kBatch];
#pragma unroll
          for (int j = 0; j < kBatch; ++j)
            w[j] = active && j < n ? __ldg(reinterpret_cast<const unsigned int*>(base + nrow[j] * row_bytes)) : 0u;
#pragma unroll
          for (int j = 0; j < kBatch; j += 4) {
            if (j < n) {
              const int qp = pack4(qv + j);
              constexpr uint32_t kLo = 0x0F0F0F0Fu;
              dot4x4(w[j] & kLo, w[j + 1] & kLo, w[j + 2] & kLo, w[j + 3] & kLo, qp, acc);
              dot4x4((w[j] >> 4) & kLo, (w[j + 1] >> 4) & kLo, (w[j + 2] >> 4) & kLo, (w[j + 3] >> 4) & kLo, qp,
                     acc + 4);
            }
          }
        } else {
          uint2 w[kBatch];
#pragma unroll
          for (int j = 0; j < kBatch; ++j)
            w[j] = active && j < n ? __ldg(reinterpret_cast<const uint2*>(base + nrow[j] * row_bytes))
                                   : make_uint2(0u, 0u);
#pragma unroll
          for (int j = 0; j < kBatch; j += 4) {
            if (j < n) {
              const int qp = pack4(qv + j);
              dot4x4(w[j].x, w[j + 1].x, w[j + 2].x, w[j + 3].x, qp, acc);
              dot4x4(w[j].y, w[j + 1].y, w[j + 2].y, w[j + 3].y, qp, acc + 4);
            }
          }
        }
      }
      if (active) {  // y += acc * (scale dh) + min sh, per output
        float sc[kUnit], mn[kUnit];
        const __half* srow = scale + b * d + c0;
        ld_half4(srow, sc);
        ld_half4(srow + kHiOff<FOUR>, sc + 4);
        if (minv != nullptr) {
          const __half* mrow = minv + b * d + c0;
          ld_half4(mrow, mn);
          ld_half4(mrow + kHiOff<FOUR>, mn + 4);
        }
#pragma unroll
        for (int k = 0; k < kUnit; ++k) {
          const float v = minv != nullptr ? fmaf(mn[k], sh, y[k]) : y[k];
          y[k] = fmaf(static_cast<float>(acc[k]), sc[k] * dh, v);
        }
      }
    }

#pragma unroll
    for (int k = 0; k < kUnit; ++k) red[warp][lane * kUnit + k] = y[k];
    if (lane == 0) kept_warp[warp] = kept_total;
    __syncthreads();
    float* out = partial + (s * T + t) * d;
    for (int p = threadIdx.x; p < kSlice; p += blockDim.x) {
      const int64_t pu = int64_t(blockIdx.x) * 32 + p / kUnit;
      if (pu < units) {
        const int k = p % kUnit;
        float v = red[0][p];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) v += red[w][p];
        out[unit_col<FOUR>(pu) + (k < 4 ? k : kHiOff<FOUR> + k - 4)] = v;
      }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      int c = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) c += kept_warp[w];
      kept_part[s * T + t] = c;
    }
    __syncthreads();  // red / kept_warp are rewritten by the next token
  }
}

// qsparse_ffn_rows' gate/up: gu [T, 2I] with gate row i and up row I + i of w dotted with token t's int8 x (qlinear's
// rounding and sub-block arithmetic, per lane in qlinear's order: the same fp32 operations) for the listed neurons
// idx[t, :n] and 0 for every other. Grid (X, T), 8 warps; the X * 8 warps of a token walk its positions
// k = w, w + X * 8, ... <= n (persistent, so the work balances however the list clusters). Position k < n computes
// neuron idx[t, k] (its two rows as two interleaved streams: the sub-blocks of both are loaded before either is
// dotted); every position k <= n also zeroes the unlisted gap before it (idx[t, k-1] + 1 .. idx[t, k] - 1; for k = n
// up to I). Each gu element is written once by exactly one warp: no memset launch and no ordering between warps.
// n = count[t] clamped to [0, I] here: the binding does not read count on the host (that would be a sync per call);
// the CPU kernel raises for a count outside [0, I] instead. Ids outside [0, I) are skipped (no row is read) and the
// gaps clamped, which is what the CPU kernel's per-block lower_bound does with them; an unsorted list is outside the
// contract (memory-safe, values unspecified).
template <QType Q>
__global__ void __launch_bounds__(kRowsThreads)
    gateup_rows_kernel(const uint8_t* __restrict__ w, int64_t row_bytes, const int8_t* __restrict__ xq,
                       const float* __restrict__ xd, const float* __restrict__ xs, const int32_t* __restrict__ idx,
                       const int32_t* __restrict__ count, float* __restrict__ gu, int64_t T, int64_t I, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = int64_t(gridDim.x) * (kRowsThreads / 32);
  const int64_t nsb = K / kQK;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const int64_t n = min64(max64(__ldg(count + t), 0), I);
    const int32_t* it = idx + t * I;
    float* gt = gu + t * 2 * I;
    float* ut = gt + I;
    const int8_t* xqt = xq + t * nsb * kQK;
    const float* xdt = xd + t * nsb;
    const float* xst = xs + t * nsb;
    for (int64_t k = int64_t(blockIdx.x) * (kRowsThreads / 32) + (threadIdx.x >> 5); k <= n; k += nwarps) {
      const int64_t id = k < n ? int64_t(__ldg(it + k)) : I;
      const int64_t lo = k > 0 ? min64(max64(int64_t(__ldg(it + k - 1)) + 1, 0), I) : 0;
      const int64_t hi = min64(max64(id, 0), I);
      for (int64_t i = lo + lane; i < hi; i += 32) {
        gt[i] = 0.f;
        ut[i] = 0.f;
      }
      if (k == n || id < 0 || id >= I) continue;  // warp-uniform
      const uint8_t* rg = w + id * row_bytes;
      const uint8_t* ru = w + (I + id) * row_bytes;
      float ag = 0.f, mg = 0.f, au = 0.f, mu = 0.f;
      for (int64_t g = lane; g < nsb; g += 32) {
        const SubBlock bg = load_sub_block<Q>(rg, g);
        const SubBlock bu = load_sub_block<Q>(ru, g);
        const int4* xv = reinterpret_cast<const int4*>(xqt + g * kQK);
        const float dx = __ldg(xdt + g);
        ag = fmaf(bg.scale * dx, static_cast<float>(sub_block_dot<Q>(bg, xv)), ag);
        au = fmaf(bu.scale * dx, static_cast<float>(sub_block_dot<Q>(bu, xv)), au);
        if constexpr (kHasOffset<Q>) {
          const float sx = __ldg(xst + g);
          mg = fmaf(bg.offset, sx, mg);
          mu = fmaf(bu.offset, sx, mu);
        }
      }
      const float gv = warp_sum(ag + mg), uv = warp_sum(au + mu);
      if (lane == 0) {
        gt[id] = gv;
        ut[id] = uv;
      }
    }
  }
}

template <typename TX>
__global__ void finalize_kernel(const float* __restrict__ partial, const int32_t* __restrict__ kept_part,
                                TX* __restrict__ y, int32_t* __restrict__ count, int64_t T, int64_t d, int S) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    if (c < d) {
      float v = partial[t * d + c];
      for (int s = 1; s < S; ++s) v += partial[(s * T + t) * d + c];
      y[t * d + c] = from_f<TX>(v);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      int32_t n = 0;
      for (int s = 0; s < S; ++s) n += kept_part[s * T + t];
      count[t] = n;
    }
  }
}

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

// row splits S and 32-neuron blocks per split (every split non-empty)
void down_splits(int64_t T, int64_t d, int64_t I, int device, int64_t* S, int64_t* per_split) {
  const int64_t nb = I / kQK;
  const int64_t slices = ceil_div(d, kSlice);
  const int64_t want = ceil_div(int64_t(sm_count(device)) * 8, slices * std::max<int64_t>(T, 1));
  const int64_t s = std::max<int64_t>(1, std::min<int64_t>({want, int64_t(kMaxSplits), ceil_div(nb, kWarps)}));
  *per_split = ceil_div(nb, s);
  *S = ceil_div(nb, *per_split);
}

struct Workspace {
  void* q;          // qlinear's int8 x
  float* gu;        // [T, 2I]
  float* partial;   // [S, T, d]
  int32_t* kept;    // [S, T]
  int64_t bytes;
};

Workspace layout(void* base, int64_t T, int64_t d, int64_t I, int64_t S) {
  auto* p = static_cast<uint8_t*>(base);
  Workspace w{};
  int64_t off = 0;
  w.q = p ? p + off : nullptr;
  off += align256(qlinear_workspace_bytes(T, d));
  w.gu = p ? reinterpret_cast<float*>(p + off) : nullptr;
  off += align256(T * 2 * I * int64_t(sizeof(float)));
  w.partial = p ? reinterpret_cast<float*>(p + off) : nullptr;
  off += align256(S * T * d * int64_t(sizeof(float)));
  w.kept = p ? reinterpret_cast<int32_t*>(p + off) : nullptr;
  off += align256(S * T * int64_t(sizeof(int32_t)));
  w.bytes = off;
  return w;
}

// gate/up of the listed neurons into ws.gu (x rounded first, into qlinear's workspace layout)
cudaError_t gateup_rows(const void* x, const int32_t* idx, const int32_t* count, const uint8_t* w, QType qt,
                        int64_t T, int64_t d, int64_t I, DType xt, const Workspace& ws, int device,
                        cudaStream_t stream) {
  cudaError_t e = quantize_x(x, T, d, xt, ws.q, stream);
  if (e != cudaSuccess) return e;
  const QuantizedX X = qlinear_x_views(ws.q, T, d);
  const int64_t rb = qtype_row_bytes(qt, d);
  // up to I + 1 positions per token (the last one only zeroes the tail), at most ~8 blocks per SM in all
  const int64_t per_token = ceil_div(I + 1, kRowsThreads / 32);
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(per_token, ceil_div(int64_t(sm_count(device)) * 8, T)));
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(min64(T, kMaxGridY)));
  const int8_t* xq = X.q;
  const float* xd = X.d;
  const float* xs = X.s;
  float* gu = ws.gu;
  switch (qt) {
    case QType::Q8_0:
      gateup_rows_kernel<QType::Q8_0><<<grid, kRowsThreads, 0, stream>>>(w, rb, xq, xd, xs, idx, count, gu, T, I, d);
      break;
    case QType::Q4_0:
      gateup_rows_kernel<QType::Q4_0><<<grid, kRowsThreads, 0, stream>>>(w, rb, xq, xd, xs, idx, count, gu, T, I, d);
      break;
    case QType::Q4_1:
      gateup_rows_kernel<QType::Q4_1><<<grid, kRowsThreads, 0, stream>>>(w, rb, xq, xd, xs, idx, count, gu, T, I, d);
      break;
    case QType::Q4_K:
      gateup_rows_kernel<QType::Q4_K><<<grid, kRowsThreads, 0, stream>>>(w, rb, xq, xd, xs, idx, count, gu, T, I, d);
      break;
    case QType::Q6_K:
      gateup_rows_kernel<QType::Q6_K><<<grid, kRowsThreads, 0, stream>>>(w, rb, xq, xd, xs, idx, count, gu, T, I, d);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// qsparse_ffn (thresh set: all 2I gate/up rows through qlinear, |h| > thresh kept) and qsparse_ffn_rows (idx / count
// set, thresh null: the listed rows only, every nonzero h kept): one launcher, one down kernel, one finalize.
cudaError_t qffn(const void* x, const int32_t* idx, const int32_t* count, const uint8_t* w_gate_up, QType qt,
                 const uint8_t* codes, bool four_bit, const void* scale, const void* minv, const float* thresh,
                 void* y, int32_t* out_count, int64_t T, int64_t d, int64_t I, Act act, float act_param, DType xt,
                 void* workspace, int device, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (d <= 0 || d % kQK || I <= 0 || I % kQK) return cudaErrorInvalidValue;
  if (qt == QType::F32 || qt == QType::F16 || qt == QType::BF16 || qtype_row_bytes(qt, d) == 0)
    return cudaErrorInvalidValue;
  if (four_bit && minv == nullptr) return cudaErrorInvalidValue;
  if ((thresh == nullptr) == (idx == nullptr) || (idx != nullptr && count == nullptr)) return cudaErrorInvalidValue;
  int64_t S = 1, per = 1;
  down_splits(T, d, I, device, &S, &per);
  const Workspace ws = layout(workspace, T, d, I, S);

  cudaError_t e = idx == nullptr ? qlinear(x, w_gate_up, ws.gu, T, 2 * I, d, qt, xt, ws.q, stream)  // [W_gate; W_up] x
                                 : gateup_rows(x, idx, count, w_gate_up, qt, T, d, I, xt, ws, device, stream);
  if (e != cudaSuccess) return e;

  const unsigned tz = static_cast<unsigned>(min64(T, kMaxGridZ));
  const dim3 grid(static_cast<unsigned>(ceil_div(d / kUnit, 32)), static_cast<unsigned>(S), tz);
  const auto* sc = static_cast<const __half*>(scale);
  const auto* mn = static_cast<const __half*>(minv);
  if (four_bit)
    down_kernel<true><<<grid, kWarps * 32, 0, stream>>>(ws.gu, thresh, codes, sc, mn, ws.partial, ws.kept, T, d, I,
                                                        per, act, act_param);
  else
    down_kernel<false><<<grid, kWarps * 32, 0, stream>>>(ws.gu, thresh, codes, sc, mn, ws.partial, ws.kept, T, d, I,
                                                         per, act, act_param);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  const dim3 fgrid(static_cast<unsigned>(ceil_div(d, kFinalizeThreads)), tz);
  return dispatch_dtype(xt, [&](auto tag) {
    using TX = typename decltype(tag)::type;
    finalize_kernel<TX><<<fgrid, kFinalizeThreads, 0, stream>>>(ws.partial, ws.kept, static_cast<TX*>(y), out_count,
                                                                T, d, static_cast<int>(S));
    return cudaGetLastError();
  });
}

}  // namespace

int64_t qsparse_ffn_workspace_bytes(int64_t T, int64_t d, int64_t I, int device) {
  int64_t S = 1, per = 1;
  down_splits(T, d, I, device, &S, &per);
  return layout(nullptr, T, d, I, S).bytes;
}

cudaError_t qsparse_ffn(const void* x, const uint8_t* w_gate_up, QType qt, const uint8_t* codes, bool four_bit,
                        const void* scale, const void* minv, const float* thresh, void* y, int32_t* count, int64_t T,
                        int64_t d, int64_t I, Act act, float act_param, DType xt, void* workspace, int device,
                        cudaStream_t stream) {
  if (thresh == nullptr) return cudaErrorInvalidValue;
  return qffn(x, nullptr, nullptr, w_gate_up, qt, codes, four_bit, scale, minv, thresh, y, count, T, d, I, act,
              act_param, xt, workspace, device, stream);
}

cudaError_t qsparse_ffn_rows(const void* x, const int32_t* idx, const int32_t* count, const uint8_t* w_gate_up,
                             QType qt, const uint8_t* codes, bool four_bit, const void* scale, const void* minv,
                             void* y, int32_t* down_count, int64_t T, int64_t d, int64_t I, Act act, float act_param,
                             DType xt, void* workspace, int device, cudaStream_t stream) {
  if (idx == nullptr || count == nullptr) return cudaErrorInvalidValue;
  return qffn(x, idx, count, w_gate_up, qt, codes, four_bit, scale, minv, nullptr, y, down_count, T, d, I, act,
              act_param, xt, workspace, device, stream);
}

}  // namespace sparsedge::cuda
