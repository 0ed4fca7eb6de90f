// qsparse_ffn (sdk/sparsedge/ops/qffn.py): one FFN step over GGUF block weights that skips the down rows of the
// neurons whose exact |h| is at or below their threshold; W_down in sparsedge.quant.down_t's neuron-row layout.
// The CPU kernel it mirrors is backends/cpu/quant_sparse_ffn.cpp. 4 launches, no host sync:
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
// Prefill (T > 1) reads each token's kept down rows separately (mostly from L2 when tokens share neurons); gate/up
// rows are read once per 8 tokens by qlinear. The h rounding is repeated by every output slice of a block (32
// activations, cheap next to its rows); all slices compute it identically, so they agree on kept / qh.
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
constexpr int64_t kMaxGridZ = 65535;

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
// else int8 [I, d]. gu [T, 2I] fp32 (gate then up), partial [S, T, d], kept [S, T].
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
      const bool keep = fabsf(h) > __ldg(thresh + i);
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
  if (T <= 0) return cudaSuccess;
  if (d <= 0 || d % kQK || I <= 0 || I % kQK) return cudaErrorInvalidValue;
  if (qt == QType::F32 || qt == QType::F16 || qt == QType::BF16) return cudaErrorInvalidValue;
  if (four_bit && minv == nullptr) return cudaErrorInvalidValue;
  int64_t S = 1, per = 1;
  down_splits(T, d, I, device, &S, &per);
  const Workspace ws = layout(workspace, T, d, I, S);

  cudaError_t e = qlinear(x, w_gate_up, ws.gu, T, 2 * I, d, qt, xt, ws.q, stream);  // gu = [W_gate; W_up] x
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
    finalize_kernel<TX><<<fgrid, kFinalizeThreads, 0, stream>>>(ws.partial, ws.kept, static_cast<TX*>(y), count, T, d,
                                                                static_cast<int>(S));
    return cudaGetLastError();
  });
}

}  // namespace sparsedge::cuda
