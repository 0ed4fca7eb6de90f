// Device side shared by qlinear (quant.cu) and qsparse_ffn / qsparse_ffn_rows (qffn.cu): the int8 activation
// rounding per block of 32 (x per block of 32; the kept h per block of 32 neurons), so they round bit for bit alike
// (and like the CPU kernels' quantize_block and quant.quantize_activations), and the decoding of one 32-weight
// sub-block of a GGUF block row with its integer dot product against int8 x (qlinear's rows and qsparse_ffn_rows'
// listed gate/up rows: one copy of the block layouts). No torch headers.
#pragma once
#include <cuda_fp16.h>

#include "common.cuh"
#include "quant.h"

namespace sparsedge::cuda {

// One block of 32 values, one per lane of a full warp (every lane must call it): returns this lane's
// q = round-half-even(v * (127 / amax)) clamped to [-127, 127]; every lane gets d = amax / 127 and
// s = d * sum q. Every float op is the IEEE one (__fdiv_rn, __fmul_rn, __float2int_rn) so --use_fast_math
// cannot change the rounding. amax == 0 gives q = 0, d = s = 0.
__device__ __forceinline__ int round_int8_32(float v, float& d, float& s) {
  const float amax = warp_max(fabsf(v));
  const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
  const int q = max(-127, min(127, __float2int_rn(__fmul_rn(v, inv))));
  const int sum = warp_sum(q);
  d = __fdiv_rn(amax, 127.f);
  s = __fmul_rn(d, static_cast<float>(sum));
  return q;
}

// ---- GGUF block rows (layouts: sdk/sparsedge/quant/formats.py). Rows need 2-byte alignment only (block sizes are
// even), so everything is read as 16-bit words.
__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ float ld_half(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(ld_u16(p))));
}
// 32 bytes at a 2-byte aligned address as 8 little-endian words
__device__ __forceinline__ void ld_words(const uint8_t* p, uint32_t (&w)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = ld_u16(p + 4 * j) | (ld_u16(p + 4 * j + 2) << 16);
}
__device__ __forceinline__ void ld_words4(const uint8_t* p, uint32_t (&w)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = ld_u16(p + 4 * j) | (ld_u16(p + 4 * j + 2) << 16);
}

// One 32-weight sub-block of a row: 8 packed int8x4 words of integer weights q, weight = scale * q (+ offset, a
// per-sub-block constant taken on the x side as offset * d_x * sum q_x); q6_k: the int8 scales of its two 16-halves.
struct SubBlock {
  uint32_t w[8];
  float scale = 0.f, offset = 0.f;
  int sc_a = 1, sc_b = 1;
};

// formats whose sub-block carries an offset (q4_0's -8 d, q4_1's m, q4_k's -d_min m, tq2_0's -d)
template <QType Q> constexpr bool kHasOffset =
    Q == QType::Q4_0 || Q == QType::Q4_1 || Q == QType::Q4_K || Q == QType::TQ2_0;

// sub-block g (elements 32 g .. 32 g + 31) of `row`: nibbles masked, q6_k's high bits merged and -32 applied per
// byte with __vsub4
template <QType Q>
__device__ __forceinline__ SubBlock load_sub_block(const uint8_t* row, int64_t g) {
  SubBlock s;
  uint32_t(&w)[8] = s.w;
  if constexpr (Q == QType::Q8_0) {
    const uint8_t* b = row + g * 34;
    s.scale = ld_half(b);
    ld_words(b + 2, w);
  } else if constexpr (Q == QType::Q4_0 || Q == QType::Q4_1) {
    const uint8_t* b = row + g * (Q == QType::Q4_0 ? 18 : 20);
    s.scale = ld_half(b);
    s.offset = Q == QType::Q4_0 ? -8.f * s.scale : ld_half(b + 2);
    uint32_t p[4];
    ld_words4(b + (Q == QType::Q4_0 ? 2 : 4), p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = p[j] & 0x0F0F0F0Fu;
      w[j + 4] = (p[j] >> 4) & 0x0F0F0F0Fu;
    }
  } else if constexpr (Q == QType::Q4_K) {
    const uint8_t* b = row + (g >> 3) * 144;
    const int j = static_cast<int>(g & 7);
    const uint8_t* sc6 = b + 4;
    int sc, mn;
    if (j < 4) {
      sc = __ldg(sc6 + j) & 63;
      mn = __ldg(sc6 + j + 4) & 63;
    } else {
      sc = (__ldg(sc6 + j + 4) & 0x0F) | ((__ldg(sc6 + j - 4) >> 6) << 4);
      mn = (__ldg(sc6 + j + 4) >> 4) | ((__ldg(sc6 + j) >> 6) << 4);
    }
    s.scale = ld_half(b) * static_cast<float>(sc);
    s.offset = -(ld_half(b + 2) * static_cast<float>(mn));
    ld_words(b + 16 + 32 * (j >> 1), w);
    const int sh = 4 * (j & 1);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = (w[i] >> sh) & 0x0F0F0F0Fu;
  } else if constexpr (Q == QType::Q6_K) {
    const uint8_t* b = row + (g >> 3) * 210;
    const int gg = static_cast<int>(g & 7), h = gg >> 2, k = gg & 3;
    uint32_t hi[8];
    ld_words(b + 64 * h + 32 * (k & 1), w);
    ld_words(b + 128 + 32 * h, hi);
    const int sl = 4 * (k >> 1), shh = 2 * k;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      w[i] = __vsub4(((w[i] >> sl) & 0x0F0F0F0Fu) | (((hi[i] >> shh) & 0x03030303u) << 4), 0x20202020u);
    s.sc_a = static_cast<int8_t>(__ldg(b + 192 + 2 * gg));
    s.sc_b = static_cast<int8_t>(__ldg(b + 192 + 2 * gg + 1));
    s.scale = ld_half(b + 208);
  } else if constexpr (Q == QType::TQ2_0) {  // 2-bit codes q, weight d (q - 1): bits 2 (j % 4) of 32 bytes
    const uint8_t* b = row + (g >> 3) * 66;
    const int j = static_cast<int>(g & 7);
    ld_words(b + 32 * (j >> 2), w);
    const int sh = 2 * (j & 3);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = (w[i] >> sh) & 0x03030303u;
    s.scale = ld_half(b + 64);
    s.offset = -s.scale;
  }
  return s;
}

// sum of the sub-block's 32 integer weights x the token's 32 int8 x (xv: 16-byte aligned), exact in int32 (8 __dp4a;
// q6_k: each 16-half times its int8 scale)
template <QType Q>
__device__ __forceinline__ int sub_block_dot(const SubBlock& s, const int4* xv) {
  const int4 a = xv[0], c = xv[1];
  int da = __dp4a(static_cast<int>(s.w[0]), a.x, 0);
  da = __dp4a(static_cast<int>(s.w[1]), a.y, da);
  da = __dp4a(static_cast<int>(s.w[2]), a.z, da);
  da = __dp4a(static_cast<int>(s.w[3]), a.w, da);
  if constexpr (Q == QType::Q6_K) {
    int db = __dp4a(static_cast<int>(s.w[4]), c.x, 0);
    db = __dp4a(static_cast<int>(s.w[5]), c.y, db);
    db = __dp4a(static_cast<int>(s.w[6]), c.z, db);
    db = __dp4a(static_cast<int>(s.w[7]), c.w, db);
    return da * s.sc_a + db * s.sc_b;
  } else {
    da = __dp4a(static_cast<int>(s.w[4]), c.x, da);
    da = __dp4a(static_cast<int>(s.w[5]), c.y, da);
    da = __dp4a(static_cast<int>(s.w[6]), c.z, da);
    return __dp4a(static_cast<int>(s.w[7]), c.w, da);
  }
}

}  // namespace sparsedge::cuda
