// Device side of the int8 activation rounding shared by qlinear (quant.cu: x per block of 32) and qsparse_ffn
// (qffn.cu: the kept h per block of 32 neurons), so the two round bit for bit alike (and like the CPU kernels'
// quantize_block and quant.quantize_activations). No torch headers.
#pragma once
#include "common.cuh"

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

}  // namespace sparsedge::cuda
