// Block formats of the GGUF weights and the int8 activation rounding shared by the quantized CPU kernels
// (quant_linear.cpp: qlinear; quant_sparse_ffn.cpp: qsparse_ffn). The arithmetic is described at the top of
// quant_linear.cpp. Everything here is internal to each kernel file (an unnamed namespace per translation unit).
#pragma once
#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

#include "simd.h"
#include "threadpool.h"

namespace sparsedge::cpu {
namespace {


constexpr int64_t QK = 32;
constexpr int64_t kDecodeRows = 4;
constexpr int64_t kChunkRows = 16;
constexpr int64_t kMaxFloatTokens = 8;   // float formats: beyond this, at::linear on the widened weights
constexpr int64_t kMinBytes = 16 * 1024; // weight bytes per thread below which fewer threads are used
// Software prefetch distance along each weight row (clamped to the thread's own rows). Decode streams every
// weight from DRAM once per token; with the hardware prefetchers alone a 62 MB Q8_0 matrix ran at ~17 GB/s
// on 2 threads of this CPU (Zen 5), prefetching 1-4 KiB ahead of each row stream at ~30-33 GB/s.
// The one-token tile prefetches its R rows (one contiguous run) as a single stream instead, non-temporally
// (stream_prefetch): see tile.
constexpr int64_t kPrefetch = 4096;

enum class QType { F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, TQ2_0 };
struct QInfo { const char* name; QType type; int64_t block, size; };
constexpr QInfo kTypes[] = {
    {"f32", QType::F32, 1, 4},      {"f16", QType::F16, 1, 2},      {"bf16", QType::BF16, 1, 2},
    {"q8_0", QType::Q8_0, 32, 34},  {"q4_0", QType::Q4_0, 32, 18},  {"q4_1", QType::Q4_1, 32, 20},
    {"q4_k", QType::Q4_K, 256, 144}, {"q6_k", QType::Q6_K, 256, 210}, {"tq2_0", QType::TQ2_0, 256, 66},
};

const QInfo& qinfo(const std::string& qtype) {
  std::string names, low;
  for (char c : qtype) low += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& t : kTypes) {
    if (low == t.name) return t;
    names += (names.empty() ? "" : ", ") + std::string(t.name);
  }
  TORCH_CHECK_VALUE(false, "unsupported quantization type '", qtype, "'; supported: ", names);
  return kTypes[0];  // unreachable
}

// prefetch the cache lines of [p, p + n) below `end` (the end of this thread's rows)
inline void prefetch(const uint8_t* p, int64_t n, const uint8_t* end) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t o = 0; o < n && p + o < end; o += 64) __builtin_prefetch(p + o, 0, 3);
#else
  (void)p, (void)n, (void)end;
#endif
}
// Advance a linear prefetch cursor to `target` (below `end`), one non-temporal prefetch per cache line: each
// line once, in address order, and (NTA) without displacing what the caches hold for reuse, since a decode
// token reads each weight exactly once.
inline void stream_prefetch(const uint8_t*& pf, const uint8_t* target, const uint8_t* end) {
  target = std::min(target, end);
#if defined(__GNUC__) || defined(__clang__)
  for (; pf < target; pf += 64) __builtin_prefetch(pf, 0, 0);
#else
  pf = std::max(pf, target);
#endif
}
// the whole of [p, p + n): a scattered row (a gathered neuron's) the hardware prefetchers cannot predict; into L2
// (T1) as the float sparse rows' (simd.h accumulate_rows): L2 tracks more outstanding misses than L1
inline void prefetch(const uint8_t* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, 2);
#else
  (void)p, (void)n;
#endif
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// ---- activations: int8 per block of 32 -------------------------------------------------------------
struct QAct {
  const int8_t* q;  // [T, K]
  const float* d;   // [T, K / 32]
  const float* s;   // [T, K / 32]  d * sum(q)
  int64_t K, nb;
};

void quantize_block(const float* x, int8_t* q, float* d, float* s) {
#ifdef SPARSEDGE_AVX2
  const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  auto cvt = [&](__m256 v) {
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, inv), kRound)), lo), hi);
  };
  const __m256i i0 = cvt(v0), i1 = cvt(v1), i2 = cvt(v2), i3 = cvt(v3);
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d = amax / 127.f;
  *s = *d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
  float amax = 0.f;
  for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  for (int i = 0; i < QK; ++i) {
    const float r = std::nearbyint(x[i] * inv);
    const int v = static_cast<int>(std::min(127.f, std::max(-127.f, r)));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *d = amax / 127.f;
  *s = *d * static_cast<float>(sum);
#endif
}

// ---- integer dot products and accumulators -----------------------------------------------------------
#ifdef SPARSEDGE_AVX2
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc a) { return hsum(a); }
inline void acc_fma(Acc& a, __m256i i, float scale) {
  a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(scale), a);
}
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
// 8 int32 lanes summing u[i] * s[i] over 32 bytes (u unsigned, s signed)
inline __m256i dot_us(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// signed w x signed x: |w| against x with w's sign
inline __m256i dot_ss(__m256i w, __m256i x) { return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }
inline __m256i nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
// 16 packed bytes -> 32 nibbles (low nibbles first), as unsigned bytes: the bytes broadcast to both halves, the high
// half shifted by 4 (3 ops, where shift + insert of the shifted copy took 4)
inline __m256i unpack16(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}
// the 32-bit words at p, p + S, ..., p + 7 S (a block's fp16 scale and the 2 bytes after it)
template <int S> inline __m256i words8(const uint8_t* p) {
  int32_t v[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&v[i], p + i * S, 4);
  return _mm256_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
}
// fp16 in the low / high halves of 8 words -> 8 floats
inline __m256 f16_lo(__m256i w) {
  const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi32(0xFFFF));
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
}
inline __m256 f16_hi(__m256i w) {
  const __m256i hi = _mm256_srli_epi32(w, 16);
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}
// 8 block scales of C tokens: s[c][i] = d[i] * xd[c][i], kept in memory for broadcast loads
template <int C> inline void scales8(__m256 d, const float* const* xd, float (*s)[8]) {
  for (int c = 0; c < C; ++c) _mm256_store_ps(s[c], _mm256_mul_ps(d, _mm256_loadu_ps(xd[c])));
}
inline void acc_fma_bcast(Acc& a, __m256i i, const float* s) {
  a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_broadcast_ss(s), a);
}
#else
using Acc = float;
inline Acc acc_zero() { return 0.f; }
inline float acc_sum(Acc a) { return a; }
inline void acc_fma(Acc& a, int32_t i, float scale) { a = std::fma(static_cast<float>(i), scale, a); }
template <typename W> inline int32_t dot32(const W* w, const int8_t* x) {
  int32_t s = 0;
  for (int i = 0; i < QK; ++i) s += static_cast<int32_t>(w[i]) * x[i];
  return s;
}
inline void unpack16(const uint8_t* p, uint8_t* q) {
  for (int i = 0; i < 16; ++i) { q[i] = p[i] & 0x0F; q[i + 16] = p[i] >> 4; }
}
#endif

// ---- one weight unit (a block, or a super-block) against C tokens ----------------------------------------
// xq[c] / xd[c] / xs[c] point at the token's first x block of this unit; acc[c] += the block products,
// ms[c] += the scalar (offset / min) terms. With AVX2 the 32-block formats also give the pieces with which
// group8 and the decode tile (below) take 8 consecutive blocks at once: d8 (the 8 fp16 scales, and the offset
// coefficient of each x block's sum where kOffset), quants (block i's 32 weight bytes) and dot.
struct Q8_0 {
  static constexpr int64_t kBlock = 32, kBytes = 34;
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const*, Acc* acc, float*) {
    const float dw = f16(b);
#ifdef SPARSEDGE_AVX2
    const __m256i w = quants(b, 0);
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot(w, load32(xq[c])), dw * xd[c][0]);
#else
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot32(reinterpret_cast<const int8_t*>(b + 2), xq[c]), dw * xd[c][0]);
#endif
  }
#ifdef SPARSEDGE_AVX2
  // signed weight bytes, no offset term
  static constexpr bool kOffset = false;
  static inline __m256 d8(const uint8_t* b, __m256&) { return f16_lo(words8<34>(b)); }
  static inline __m256i quants(const uint8_t* b, int i) { return load32(b + 34 * i + 2); }
  static inline __m256i dot(__m256i w, __m256i x) { return dot_ss(w, x); }
#endif
};

struct Q4_0 {
  static constexpr int64_t kBlock = 32, kBytes = 18;
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const* xs, Acc* acc, float* ms) {
    const float dw = f16(b);
#ifdef SPARSEDGE_AVX2
    const __m256i q = quants(b, 0);
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot(q, load32(xq[c])), dw * xd[c][0]);
#else
    uint8_t q[32];
    unpack16(b + 2, q);
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot32(q, xq[c]), dw * xd[c][0]);
#endif
    for (int c = 0; c < C; ++c) ms[c] = std::fma(-8.f * dw, xs[c][0], ms[c]);
  }
#ifdef SPARSEDGE_AVX2
  // the offset -8 d_w multiplies each x block's sum
  static constexpr bool kOffset = true;
  static inline __m256 d8(const uint8_t* b, __m256& off) {
    const __m256 d = f16_lo(words8<18>(b));
    off = _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
    return d;
  }
  static inline __m256i quants(const uint8_t* b, int i) { return unpack16(b + 18 * i + 2); }
  static inline __m256i dot(__m256i q, __m256i x) { return dot_us(q, x); }
#endif
};

struct Q4_1 {
  static constexpr int64_t kBlock = 32, kBytes = 20;
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const* xs, Acc* acc, float* ms) {
    const float dw = f16(b), mw = f16(b + 2);
#ifdef SPARSEDGE_AVX2
    const __m256i q = quants(b, 0);
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot(q, load32(xq[c])), dw * xd[c][0]);
#else
    uint8_t q[32];
    unpack16(b + 4, q);
    for (int c = 0; c < C; ++c) acc_fma(acc[c], dot32(q, xq[c]), dw * xd[c][0]);
#endif
    for (int c = 0; c < C; ++c) ms[c] = std::fma(mw, xs[c][0], ms[c]);
  }
#ifdef SPARSEDGE_AVX2
  // the min m_w multiplies each x block's sum
  static constexpr bool kOffset = true;
  static inline __m256 d8(const uint8_t* b, __m256& off) {
    const __m256i dm = words8<20>(b);
    off = f16_hi(dm);
    return f16_lo(dm);
  }
  static inline __m256i quants(const uint8_t* b, int i) { return unpack16(b + 20 * i + 4); }
  static inline __m256i dot(__m256i q, __m256i x) { return dot_us(q, x); }
#endif
};

struct Q4_K {
  static constexpr int64_t kBlock = 256, kBytes = 144;
  // the 12 scale bytes -> sc[0..7] (bytes 0..7) and mn[0..7] (bytes 8..15), 6 bits each
  static inline void scale_min(const uint8_t* s, uint32_t (&u)[4]) {
    std::memcpy(u, s, 12);
    constexpr uint32_t k6 = 0x3f3f3f3f, k4 = 0x0f0f0f0f, k2 = 0x03030303;
    u[3] = ((u[2] >> 4) & k4) | (((u[1] >> 6) & k2) << 4);  // mn[4..7]
    const uint32_t mn03 = u[1] & k6;                       // mn[0..3]
    u[1] = (u[2] & k4) | (((u[0] >> 6) & k2) << 4);        // sc[4..7]
    u[2] = mn03;
    u[0] &= k6;                                            // sc[0..3]
  }
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const* xs, Acc* acc, float* ms) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* qs = b + 16;
    uint32_t u[4];
    scale_min(b + 4, u);
#ifdef SPARSEDGE_AVX2
    (void)ms;  // the mins fold into acc
    const __m128i sm = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
    const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
    const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
    alignas(32) float s[C][8];
    scales8<C>(sc, xd, s);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fnmadd_ps(mn, _mm256_loadu_ps(xs[c]), acc[c]);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(qs + 32 * j);
      const __m256i lo = nib_lo(v), hi = nib_hi(v);
      for (int c = 0; c < C; ++c) {
        acc_fma_bcast(acc[c], dot_us(lo, load32(xq[c] + 64 * j)), &s[c][2 * j]);
        acc_fma_bcast(acc[c], dot_us(hi, load32(xq[c] + 64 * j + 32)), &s[c][2 * j + 1]);
      }
    }
#else
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(u);
    for (int j = 0; j < 4; ++j) {
      uint8_t lo[32], hi[32];
      for (int i = 0; i < 32; ++i) { lo[i] = qs[32 * j + i] & 0x0F; hi[i] = qs[32 * j + i] >> 4; }
      for (int c = 0; c < C; ++c) {
        acc_fma(acc[c], dot32(lo, xq[c] + 64 * j), d * static_cast<float>(sb[2 * j]) * xd[c][2 * j]);
        acc_fma(acc[c], dot32(hi, xq[c] + 64 * j + 32), d * static_cast<float>(sb[2 * j + 1]) * xd[c][2 * j + 1]);
      }
    }
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < 8; ++j) ms[c] = std::fma(-(dmin * static_cast<float>(sb[8 + j])), xs[c][j], ms[c]);
#endif
  }
};

struct Q6_K {
  static constexpr int64_t kBlock = 256, kBytes = 210;
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const*, Acc* acc, float*) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    for (int h = 0; h < 2; ++h) {
#ifdef SPARSEDGE_AVX2
      const __m256i L0 = load32(ql + 64 * h), L1 = load32(ql + 64 * h + 32), H = load32(qh + 32 * h);
      const __m256i m30 = _mm256_set1_epi8(0x30), m32 = _mm256_set1_epi8(32);
      __m256i q[4] = {
          _mm256_or_si256(nib_lo(L0), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30)),
          _mm256_or_si256(nib_lo(L1), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30)),
          _mm256_or_si256(nib_hi(L0), _mm256_and_si256(H, m30)),
          _mm256_or_si256(nib_hi(L1), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30)),
      };
      for (int k = 0; k < 4; ++k) {
        const int g = 4 * h + k;  // 32-element sub-block of the super-block
        const __m256i w = _mm256_sub_epi8(q[k], m32);
        const __m256i aw = _mm256_sign_epi8(w, w);
        const __m256i S = _mm256_set_m128i(_mm_set1_epi16(sc[2 * g + 1]), _mm_set1_epi16(sc[2 * g]));
        for (int c = 0; c < C; ++c) {
          const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(load32(xq[c] + 32 * g), w));
          acc_fma(acc[c], _mm256_madd_epi16(p, S), d * xd[c][g]);
        }
      }
#else
      for (int k = 0; k < 4; ++k) {
        const int g = 4 * h + k;
        int8_t w[32];
        for (int i = 0; i < 32; ++i) {
          const int r = 32 * k + i;  // element of this half
          const int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
          const int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
          w[i] = static_cast<int8_t>((lo | (hi << 4)) - 32);
        }
        for (int c = 0; c < C; ++c) {
          int32_t a = 0, bsum = 0;
          for (int i = 0; i < 16; ++i) a += w[i] * xq[c][32 * g + i];
          for (int i = 16; i < 32; ++i) bsum += w[i] * xq[c][32 * g + i];
          acc_fma(acc[c], a * sc[2 * g] + bsum * sc[2 * g + 1], d * xd[c][g]);
        }
      }
#endif
    }
  }
};

// tq2_0 (BitNet b1.58's ternary weights): 2-bit codes q, weight d (q - 1). Sub-block j (elements 32 j .. 32 j + 31)
// is bits 2 (j % 4) of bytes 32 (j / 4) .. + 31; the -1 offset is folded into the x sums as q4_0's -8:
// per sub-block d (d_x sum q x - s_x)
struct TQ2_0 {
  static constexpr int64_t kBlock = 256, kBytes = 66;
  template <int C> static inline void unit(const uint8_t* b, const int8_t* const* xq, const float* const* xd,
                                           const float* const* xs, Acc* acc, float* ms) {
    const float d = f16(b + 64);
#ifdef SPARSEDGE_AVX2
    (void)ms;  // the offsets fold into acc
    const __m256 dv = _mm256_set1_ps(d);
    alignas(32) float s[C][8];
    scales8<C>(dv, xd, s);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fnmadd_ps(dv, _mm256_loadu_ps(xs[c]), acc[c]);
    const __m256i m3 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; ++h) {
      __m256i v = load32(b + 32 * h);
      for (int l = 0; l < 4; ++l, v = _mm256_srli_epi16(v, 2)) {
        const __m256i q = _mm256_and_si256(v, m3);  // codes 0..3: u8 x s8 pairs cannot saturate
        const int j = 4 * h + l;
        for (int c = 0; c < C; ++c) acc_fma_bcast(acc[c], dot_us(q, load32(xq[c] + 32 * j)), &s[c][j]);
      }
    }
#else
    for (int j = 0; j < 8; ++j) {
      uint8_t q[32];
      const uint8_t* qs = b + 32 * (j / 4);
      for (int i = 0; i < 32; ++i) q[i] = (qs[i] >> (2 * (j % 4))) & 3;
      for (int c = 0; c < C; ++c) acc_fma(acc[c], dot32(q, xq[c] + 32 * j), d * xd[c][j]);
    }
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < 8; ++j) ms[c] = std::fma(-d, xs[c][j], ms[c]);
#endif
  }
};

#ifdef SPARSEDGE_AVX2
// 8 consecutive 32-blocks of one row against C tokens: the 8 fp16 scales converted at once (d8), d_w d_x and the
// offset terms as 8-lane vectors (the offsets fold into acc: only acc's lane sum matters)
template <class F, int C>
inline void group8(const uint8_t* b, const int8_t* const* xq, const float* const* xd, const float* const* xs,
                   Acc* acc) {
  alignas(32) float s[C][8];
  __m256 off;
  scales8<C>(F::d8(b, off), xd, s);
  if constexpr (F::kOffset)
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs[c]), acc[c]);
  for (int i = 0; i < 8; ++i) {
    const __m256i w = F::quants(b, i);
    for (int c = 0; c < C; ++c) acc_fma_bcast(acc[c], F::dot(w, load32(xq[c] + 32 * i)), &s[c][i]);
  }
}
#endif

// R rows x C tokens: y[t0 + c, n0 + r] for rows n0.. of w, tokens t0..
template <class F, int R, int C>
void tile(const uint8_t* w, int64_t row_bytes, const QAct& X, int64_t n0, int64_t t0, float* y, int64_t N,
          const uint8_t* pf_end) {
  constexpr int64_t xb = F::kBlock / QK;  // x blocks per weight unit
  const int64_t units = X.K / F::kBlock;
  Acc acc[R][C];
  float ms[R][C];
  const int8_t* xq[C];
  const float* xd[C];
  const float* xs[C];
  for (int c = 0; c < C; ++c) {
    xq[c] = X.q + (t0 + c) * X.K;
    xd[c] = X.d + (t0 + c) * X.nb;
    xs[c] = X.s + (t0 + c) * X.nb;
    for (int r = 0; r < R; ++r) { acc[r][c] = acc_zero(); ms[r][c] = 0.f; }
  }
  const uint8_t* rows = w + n0 * row_bytes;
  int64_t u = 0;
#ifdef SPARSEDGE_AVX2
  if constexpr (F::kBlock == QK && C == 1) {
    // decode: block by block across the R rows, so R independent FMA chains advance together. Row after row
    // (group8), each row's 8 blocks were one dependent chain and the rows barely overlapped.
    // The tile's R rows are one contiguous run of R * row_bytes: one prefetch cursor walks it kPrefetch bytes
    // ahead, at the pace the blocks are consumed, non-temporally (stream_prefetch). A prefetch per row stream
    // (R streams 4 KiB ahead, lines requested several times) read the 30 MB Q8_0 LM head of SmolLM2 at 19-20 GB/s
    // on 2 threads of an AVX2 EPYC whose plain reads reach 35 GB/s; the single NTA stream reads it at 30-32 GB/s
    // (T0 hint: 23-28; docs/results/sparse_quant.md §4).
    Acc a[R];
    for (int r = 0; r < R; ++r) a[r] = acc[r][0];
    const uint8_t* pf = rows + kPrefetch;
    const int64_t run = R * row_bytes;
    for (; u + 8 <= units; u += 8) {
      const uint8_t* b = rows + u * F::kBytes;
      stream_prefetch(pf, rows + kPrefetch + run * (u + 8) / units, pf_end);
      alignas(32) float s[R][8];
      const __m256 xdv = _mm256_loadu_ps(xd[0]), xsv = _mm256_loadu_ps(xs[0]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m256 off;
        _mm256_store_ps(s[r], _mm256_mul_ps(F::d8(b + r * row_bytes, off), xdv));
        if constexpr (F::kOffset) a[r] = _mm256_fmadd_ps(off, xsv, a[r]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256i x = load32(xq[0] + 32 * i);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc_fma_bcast(a[r], F::dot(F::quants(b + r * row_bytes, i), x), &s[r][i]);
      }
      xq[0] += 8 * QK; xd[0] += 8; xs[0] += 8;
    }
    for (int r = 0; r < R; ++r) acc[r][0] = a[r];
    stream_prefetch(pf, rows + kPrefetch + run, pf_end);
  } else if constexpr (F::kBlock == QK) {
    for (; u + 8 <= units; u += 8) {
      for (int r = 0; r < R; ++r) prefetch(rows + r * row_bytes + u * F::kBytes + kPrefetch, 8 * F::kBytes, pf_end);
      for (int r = 0; r < R; ++r) group8<F, C>(rows + r * row_bytes + u * F::kBytes, xq, xd, xs, acc[r]);
      for (int c = 0; c < C; ++c) { xq[c] += 8 * QK; xd[c] += 8; xs[c] += 8; }
    }
  }
#endif
#ifdef SPARSEDGE_AVX2
  constexpr bool streamed = F::kBlock == QK && C == 1;  // the cursor above already covered the whole run
#else
  constexpr bool streamed = false;
#endif
  for (; u < units; ++u) {
    if (!streamed)
      for (int r = 0; r < R; ++r) prefetch(rows + r * row_bytes + u * F::kBytes + kPrefetch, F::kBytes, pf_end);
    for (int r = 0; r < R; ++r) F::template unit<C>(rows + r * row_bytes + u * F::kBytes, xq, xd, xs, acc[r], ms[r]);
    for (int c = 0; c < C; ++c) { xq[c] += F::kBlock; xd[c] += xb; xs[c] += xb; }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(t0 + c) * N + n0 + r] = acc_sum(acc[r][c]) + ms[r][c];
}

template <class F, int R>
void tile_c(int64_t C, const uint8_t* w, int64_t rb, const QAct& X, int64_t n0, int64_t t0, float* y, int64_t N,
            const uint8_t* pf_end) {
  switch (C) {
    case 1: return tile<F, R, 1>(w, rb, X, n0, t0, y, N, pf_end);
    case 2: return tile<F, R, 2>(w, rb, X, n0, t0, y, N, pf_end);
    case 3: return tile<F, R, 3>(w, rb, X, n0, t0, y, N, pf_end);
    default: return tile<F, R, 4>(w, rb, X, n0, t0, y, N, pf_end);
  }
}

// grain (in items of unit_bytes) that splits n items evenly over the threads, each getting >= kMinBytes
int64_t even_grain(int64_t n, int64_t unit_bytes) {
  const int64_t by_size = std::max<int64_t>(1, n * std::max<int64_t>(unit_bytes, 1) / kMinBytes);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
  return (n + nt - 1) / nt;
}

// x [T, K] rounded to int8 blocks (quantize_block) into per-thread scratch reused across calls (decode calls
// are a few us each); valid until the calling thread's next quantize_acts
inline QAct quantize_acts(const float* xp, int64_t T, int64_t K) {
  const int64_t nb = K / QK;
  static thread_local std::vector<int8_t> q_buf;
  static thread_local std::vector<float> ds_buf;
  if (static_cast<int64_t>(q_buf.size()) < T * K) q_buf.resize(T * K);
  if (static_cast<int64_t>(ds_buf.size()) < 2 * T * nb) ds_buf.resize(2 * T * nb);
  int8_t* qp = q_buf.data();
  float* dp = ds_buf.data();
  float* sp = dp + T * nb;
  parallel_for(T * nb, even_grain(T * nb, 4 * QK), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantize_block(xp + i * QK, qp + i * QK, dp + i, sp + i);
  });
  return QAct{qp, dp, sp, K, nb};
}

}  // namespace
}  // namespace sparsedge::cpu
