// SIMD primitives shared by the CPU kernels: 8-lane fp32 loads of fp32/bf16/fp16 data and a dot
// product with an fp32 vector. AVX2 + FMA when the build targets them (-march=native on an AVX2
// machine), else a scalar path doing the same fused multiply-adds.
#pragma once
#include <cmath>
#include <type_traits>

#include "cpu_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEDGE_AVX2 1
#endif

namespace sparsedge::cpu {

// ---- SIMD loads: 8 consecutive elements as fp32 --------------------------------------------------
#ifdef SPARSEDGE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
template <typename T> constexpr bool kSimd = !std::is_same_v<T, double>;
#endif

template <typename T> inline float ld(const T* p, int64_t i) { return to_f32(p[i]); }

// sum_i a[i] * x[i] (x fp32)
template <typename T>
inline float dot(const T* a, const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef SPARSEDGE_AVX2
  if constexpr (kSimd<T>) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(x + i), s0);
      s1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(x + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(x + i), s0);
    s = hsum(_mm256_add_ps(s0, s1));
  }
#endif
  for (; i < n; ++i) s = std::fma(ld(a, i), x[i], s);
  return s;
}


}  // namespace sparsedge::cpu
