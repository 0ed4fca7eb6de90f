// qsparse_ffn (sdk/sparsedge/ops/qffn.py): one FFN step over GGUF block weights that skips the down rows of
// neurons whose exact |h| is below their threshold; W_down in the neuron-row layout of sparsedge.quant.down_t.
// qsparse_ffn_rows: the same for a predicted list of neurons (sparsedge::ffn_predict's), whose gate/up rows
// alone are read (the relu family's SVD predictor on quantized weights).
//
// One parallel region per token. Each thread takes a contiguous run of 32-neuron blocks and does everything
// for them: gate and up rows (quant_blocks.h's tiles: x rounded to int8 once per call, integer dot products, the
// same arithmetic as qlinear), h = act(g) u, the threshold, and the down rows of its kept neurons into its own
// partial y; the caller then sums the threads' partial ys (d floats each). So a layer costs one fork/join.
//
// Down arithmetic (llama.cpp's for a dense W_down, restricted to kept neurons): the kept h of a block is
// rounded to int8 (quantize_block: dh, qh, sh = dh sum qh; skipped neurons are 0); per output r the block
// contributes  scale[b, r] dh sum_i code[i, r] qh_i + min[b, r] sh,  the integer sum exact in int32. With
// AVX2 two kept neurons are taken at once: their codes interleaved byte by byte against (qh_i, qh_j), one
// maddubs gives code_i qh_i + code_j qh_j per output in int16 (at most 2 * 128 * 127, no saturation), widened
// into 32 int32 accumulators per 32 outputs; with 4-bit codes (down_block_four) up to 8 pairs are summed in int16
// first (at most 8 * 3810 < 2^15), per 32 outputs in registers. The next neurons' code rows are
// software-prefetched: they are scattered rows the hardware prefetchers cannot predict.
#include <ATen/cpu/vec/vec.h>

#include "act.h"
#include "quant_blocks.h"

namespace sparsedge::cpu {
namespace {

constexpr int64_t kPrefetchRows = 16;  // kept neurons whose code rows are prefetched ahead

// acc[r] += code_i[r] qh_i + code_j[r] qh_j for r < d. FOUR: 4-bit codes (d/2 bytes, groups of 32 outputs, byte k
// = output k low nibble, k + 16 high nibble); else int8 codes (d bytes).
template <bool FOUR>
inline void accumulate_pair(const uint8_t* ci, const uint8_t* cj, int8_t hi, int8_t hj, int64_t d, int32_t* acc) {
#ifdef SPARSEDGE_AVX2
  const __m256i m = _mm256_set1_epi16(static_cast<int16_t>((static_cast<uint16_t>(static_cast<uint8_t>(hj)) << 8) |
                                                           static_cast<uint8_t>(hi)));
  for (int64_t r = 0; r < d; r += 32) {
    __m256i a, b;
    if constexpr (FOUR) {
      a = unpack16(ci + r / 2);  // outputs r .. r + 31 as bytes
      b = unpack16(cj + r / 2);
    } else {
      a = load32(ci + r);
      b = load32(cj + r);
    }
    const __m256i lo = _mm256_unpacklo_epi8(a, b);  // outputs r+0..7 | r+16..23, (i, j) byte pairs
    const __m256i hi8 = _mm256_unpackhi_epi8(a, b);  // outputs r+8..15 | r+24..31
    __m256i plo, phi;
    if constexpr (FOUR) {
      plo = _mm256_maddubs_epi16(lo, m);
      phi = _mm256_maddubs_epi16(hi8, m);
    } else {  // signed codes: |code| against qh carrying the code's sign
      plo = _mm256_maddubs_epi16(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(m, lo));
      phi = _mm256_maddubs_epi16(_mm256_sign_epi8(hi8, hi8), _mm256_sign_epi8(m, hi8));
    }
    auto add8 = [&](int64_t o, __m128i v16) {
      __m256i* p = reinterpret_cast<__m256i*>(acc + r + o);
      _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), _mm256_cvtepi16_epi32(v16)));
    };
    add8(0, _mm256_castsi256_si128(plo));
    add8(16, _mm256_extracti128_si256(plo, 1));
    add8(8, _mm256_castsi256_si128(phi));
    add8(24, _mm256_extracti128_si256(phi, 1));
  }
#else
  for (int64_t r = 0; r < d; ++r) {
    int32_t a, b;
    if constexpr (FOUR) {
      const int64_t g = r / 32, k = r % 32;
      const int64_t byte = g * 16 + (k & 15);
      a = k < 16 ? (ci[byte] & 15) : (ci[byte] >> 4);
      b = k < 16 ? (cj[byte] & 15) : (cj[byte] >> 4);
    } else {
      a = static_cast<int8_t>(ci[r]);
      b = static_cast<int8_t>(cj[r]);
    }
    acc[r] += a * hi + b * hj;
  }
#endif
}

// y[r] += acc[r] * scale[r] * dh + minv[r] * sh  (scale, minv: fp16 rows of the block; minv may be null)
inline void finish_block(const int32_t* acc, const c10::Half* scale, const c10::Half* minv, float dh, float sh,
                         int64_t d, float* y) {
  int64_t r = 0;
#ifdef SPARSEDGE_AVX2
  const __m256 vdh = _mm256_set1_ps(dh), vsh = _mm256_set1_ps(sh);
  for (; r + 8 <= d; r += 8) {
    __m256 v = _mm256_loadu_ps(y + r);
    if (minv) v = _mm256_fmadd_ps(load8(minv + r), vsh, v);
    const __m256 s = _mm256_mul_ps(load8(scale + r), vdh);
    _mm256_storeu_ps(y + r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(
                                                reinterpret_cast<const __m256i*>(acc + r))), s, v));
  }
#endif
  for (; r < d; ++r) {
    float v = y[r];
    if (minv) v = std::fma(static_cast<float>(minv[r]), sh, v);
    y[r] = std::fma(static_cast<float>(acc[r]), static_cast<float>(scale[r]) * dh, v);
  }
}

struct Down {
  const uint8_t* codes;  // [I, row]
  int64_t row;           // code bytes per neuron
  const c10::Half* scale;  // [I/32, d]
  const c10::Half* minv;   // [I/32, d] or null
  bool four;
};

#ifdef SPARSEDGE_AVX2
// One 32-neuron block's kept neurons (kept[0..k), their rounded h in q, indexed by neuron - 32 b) into y, for 4-bit
// codes: per 32 outputs, pair after pair of neurons, the maddubs products summed in int16 for up to kPairs16 pairs
// (a pair's products are at most 2 * 15 * 127 = 3810, so 8 pairs stay below 2^15) before they are widened to
// int32; then y += acc * scale dh + min sh. The int32 sums are the same as accumulate_pair's (exact integers), so
// the result is bit-identical to it; widening every pair into an int32 array in memory cost about twice the
// instructions per neuron of the dense down rows, so skipping 40% of them saved nothing.
// pf[0..npf): the next block's kept neurons, whose code rows are prefetched a few per 32 outputs, spread over the
// block's work: issued at once they arrived later (the misses queued behind each other; end to end the down-skip
// session ran 1-7% slower than the dense one that way, 3-8% faster spread).
constexpr int kPairs16 = 8;
inline void down_block_four(const Down& D, const int32_t* kept, int64_t k, const int8_t* q, int64_t b, float dh,
                            float sh, int64_t d, float* y, const int32_t* pf, int64_t npf) {
  const int64_t np = (k + 1) / 2;
  alignas(32) int16_t mh[16][16];  // per pair, (h_i, h_j) bytes repeated: maddubs' signed operand
  const uint8_t* ci[16];
  const uint8_t* cj[16];
  for (int64_t p = 0; p < np; ++p) {
    const int64_t i = kept[2 * p], j = 2 * p + 1 < k ? kept[2 * p + 1] : i;
    const uint8_t hi = static_cast<uint8_t>(q[i - b * QK]);
    const uint8_t hj = 2 * p + 1 < k ? static_cast<uint8_t>(q[j - b * QK]) : 0;
    const int16_t m = static_cast<int16_t>((static_cast<uint16_t>(hj) << 8) | hi);
    for (int e = 0; e < 16; ++e) mh[p][e] = m;
    ci[p] = D.codes + i * D.row, cj[p] = D.codes + j * D.row;
  }
  const c10::Half* sc = D.scale + b * d;
  const c10::Half* mn = D.minv + b * d;  // 4-bit codes always have mins (checked in qffn)
  const __m256 vdh = _mm256_set1_ps(dh), vsh = _mm256_set1_ps(sh);
  const int64_t chunks = d / 32, pf_per = (npf + chunks - 1) / chunks;
  for (int64_t r = 0; r < d; r += 32) {
    for (int64_t a = r / 32 * pf_per; a < std::min(npf, (r / 32 + 1) * pf_per); ++a)
      prefetch(D.codes + pf[a] * D.row, D.row);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;  // outputs r+0..7, +8..15, +16..23, +24..31
    for (int64_t p0 = 0; p0 < np; p0 += kPairs16) {
      __m256i slo = _mm256_setzero_si256(), shi = slo;  // int16: outputs r+0..7 | r+16..23, r+8..15 | r+24..31
      for (int64_t p = p0; p < std::min<int64_t>(np, p0 + kPairs16); ++p) {
        const __m256i a = unpack16(ci[p] + r / 2), c = unpack16(cj[p] + r / 2);
        const __m256i m = _mm256_load_si256(reinterpret_cast<const __m256i*>(mh[p]));
        slo = _mm256_add_epi16(slo, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a, c), m));
        shi = _mm256_add_epi16(shi, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a, c), m));
      }
      a0 = _mm256_add_epi32(a0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(slo)));
      a2 = _mm256_add_epi32(a2, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(slo, 1)));
      a1 = _mm256_add_epi32(a1, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(shi)));
      a3 = _mm256_add_epi32(a3, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(shi, 1)));
    }
    const __m256i acc[4] = {a0, a1, a2, a3};
    for (int o = 0; o < 4; ++o) {
      float* yo = y + r + 8 * o;
      const __m256 v = _mm256_fmadd_ps(load8(mn + r + 8 * o), vsh, _mm256_loadu_ps(yo));
      _mm256_storeu_ps(yo, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[o]), _mm256_mul_ps(load8(sc + r + 8 * o), vdh), v));
    }
  }
}
#endif

// an ascending list of neurons to compute (sparsedge::ffn_predict's output for one token), or none
struct Rows {
  const int32_t* idx = nullptr;
  int64_t n = 0;
};

// gate rows [n0, n1) and up rows [I + n0, I + n1) of w into gu
template <class F>
void gate_up_rows(const uint8_t* w, int64_t rb, const QAct& X, int64_t I, int64_t n0, int64_t n1, float* gu) {
  for (int64_t base : {int64_t{0}, I}) {
    const uint8_t* end = w + (base + n1) * rb;
    int64_t n = base + n0;
    for (; n + kDecodeRows <= base + n1; n += kDecodeRows) tile<F, kDecodeRows, 1>(w, rb, X, n, 0, gu, 2 * I, end);
    for (; n < base + n1; ++n) tile<F, 1, 1>(w, rb, X, n, 0, gu, 2 * I, end);
  }
}

// blocks [b0, b1) of one token: gate/up, h, threshold, down rows of the kept neurons into y (d floats).
// h and the kept lists of all the thread's blocks come first, so the down loop can prefetch code rows
// kPrefetchRows kept neurons ahead across block boundaries (a kept row is 4.5 cache lines at SmolLM2's width;
// DRAM latency, not arithmetic, bounds a loop that waits for each).
template <class F>
int64_t ffn_blocks(const uint8_t* w, int64_t rb, const QAct& X, int64_t I, int64_t d, const Down& D,
                   const float* thresh, const Rows& list, Act act, float param, int64_t b0, int64_t b1, float* gu,
                   float* y) {
  if (list.idx == nullptr) {
    gate_up_rows<F>(w, rb, X, I, b0 * QK, b1 * QK, gu);
  } else {  // the listed neurons of these blocks only; the others are 0 (their gate and up are never read)
    const int32_t* lo = std::lower_bound(list.idx, list.idx + list.n, static_cast<int32_t>(b0 * QK));
    const int32_t* hi = std::lower_bound(lo, list.idx + list.n, static_cast<int32_t>(b1 * QK));
    std::fill(gu + b0 * QK, gu + b1 * QK, 0.f);
    std::fill(gu + I + b0 * QK, gu + I + b1 * QK, 0.f);
    for (const int32_t* p = lo; p < hi; ++p) {
      if (p + 1 < hi) {  // the next listed rows: scattered, so prefetched by hand
        prefetch(w + p[1] * rb, rb);
        prefetch(w + (I + p[1]) * rb, rb);
      }
      tile<F, 1, 1>(w, rb, X, *p, 0, gu, 2 * I, w + (*p + 1) * rb);
      tile<F, 1, 1>(w, rb, X, I + *p, 0, gu, 2 * I, w + (I + *p + 1) * rb);
    }
  }
  const int64_t nb = b1 - b0;
  static thread_local std::vector<int32_t> acc_buf, kept_buf, start_buf;
  static thread_local std::vector<int8_t> qh_buf;
  static thread_local std::vector<float> dh_buf;
  if (static_cast<int64_t>(acc_buf.size()) < d) acc_buf.resize(d);
  if (static_cast<int64_t>(kept_buf.size()) < nb * QK) kept_buf.resize(nb * QK), qh_buf.resize(nb * QK);
  if (static_cast<int64_t>(start_buf.size()) < nb + 1) start_buf.resize(nb + 1), dh_buf.resize(2 * nb);
  int32_t* acc = acc_buf.data();
  int32_t* kept = kept_buf.data();  // neuron ids (absolute), block after block
  int32_t* start = start_buf.data();
  int8_t* qh = qh_buf.data();  // per block, 32 rounded h
  float* dhs = dh_buf.data();
  int64_t n = 0;
  for (int64_t b = b0; b < b1; ++b) {
    alignas(32) float h[QK];
    start[b - b0] = static_cast<int32_t>(n);
    if (act == Act::silu) {  // vectorised: 1536 scalar expf per layer cost as much as the gate/up rows' arithmetic
      using Vec = at::vec::Vectorized<float>;
      for (int k = 0; k < QK; k += Vec::size()) {
        const Vec g = Vec::loadu(gu + b * QK + k), u = Vec::loadu(gu + I + b * QK + k);
        (g / (Vec(1.f) + g.neg().exp()) * u).store(h + k);
      }
    } else {
      for (int k = 0; k < QK; ++k) h[k] = activate(act, gu[b * QK + k], gu[I + b * QK + k], param, 0.f);
    }
    for (int k = 0; k < QK; ++k) {
      const int64_t i = b * QK + k;
      const bool keep = list.idx ? h[k] != 0.f : std::fabs(h[k]) > thresh[i];  // listed: every nonzero h
      if (!keep) h[k] = 0.f;
      else kept[n++] = static_cast<int32_t>(i);
    }
    if (static_cast<int64_t>(start[b - b0]) < n) quantize_block(h, qh + (b - b0) * QK, dhs + 2 * (b - b0), dhs + 2 * (b - b0) + 1);
  }
  start[nb] = static_cast<int32_t>(n);
  for (int64_t a = 0; a < std::min<int64_t>(n, kPrefetchRows); ++a) prefetch(D.codes + kept[a] * D.row, D.row);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p0 = start[b - b0], p1 = start[b - b0 + 1];
    if (p0 == p1) continue;
    const int8_t* q = qh + (b - b0) * QK;
#ifdef SPARSEDGE_AVX2
    if (D.four) {
      // this block's code rows were prefetched during the previous block (the first block's: here); the next
      // block's during this one
      if (b == b0)
        for (int64_t a = std::min<int64_t>(p1, kPrefetchRows); a < p1; ++a) prefetch(D.codes + kept[a] * D.row, D.row);
      const int64_t next = b + 1 < b1 ? start[b - b0 + 2] : p1;
      down_block_four(D, kept + p0, p1 - p0, q, b, dhs[2 * (b - b0)], dhs[2 * (b - b0) + 1], d, y, kept + p1, next - p1);
      continue;
    }
#endif
    std::fill(acc, acc + d, 0);
    for (int64_t p = p0; p < p1; p += 2) {
      for (int64_t a = p + kPrefetchRows; a < std::min<int64_t>(n, p + kPrefetchRows + 2); ++a)
        prefetch(D.codes + kept[a] * D.row, D.row);
      const int64_t i = kept[p], j = p + 1 < p1 ? kept[p + 1] : kept[p];
      const int8_t hj = p + 1 < p1 ? q[j - b * QK] : int8_t{0};
      if (D.four) accumulate_pair<true>(D.codes + i * D.row, D.codes + j * D.row, q[i - b * QK], hj, d, acc);
      else accumulate_pair<false>(D.codes + i * D.row, D.codes + j * D.row, q[i - b * QK], hj, d, acc);
    }
    finish_block(acc, D.scale + b * d, D.minv ? D.minv + b * d : nullptr, dhs[2 * (b - b0)], dhs[2 * (b - b0) + 1], d, y);
  }
  return n;
}

template <class F>
void run(const uint8_t* w, int64_t rb, const QAct& X, int64_t T, int64_t I, int64_t d, const Down& D,
         const float* thresh, const int32_t* idx, const int32_t* idx_count, Act act, float param, float* y,
         int32_t* count) {
  const int64_t nblk = I / QK;
  const int64_t grain = even_grain(nblk, 3 * QK * rb);  // one contiguous run of blocks per thread
  const int64_t parts = (nblk + grain - 1) / grain;
  // scratch reused across calls (one call per layer and token). The workers write into the calling thread's
  // buffers: a thread_local named inside the lambda would be the worker's own, so these are plain references.
  static thread_local std::vector<float> tl_gu, tl_partial;
  static thread_local std::vector<int64_t> tl_kept;
  std::vector<float>&gu = tl_gu, &partial = tl_partial;
  std::vector<int64_t>& kept = tl_kept;
  gu.resize(2 * I), partial.resize(parts * d), kept.resize(parts);
  for (int64_t t = 0; t < T; ++t) {
    const QAct Xt{X.q + t * X.K, X.d + t * X.nb, X.s + t * X.nb, X.K, X.nb};
    std::fill(partial.begin(), partial.end(), 0.f);
    parallel_for(nblk, grain, [&](int64_t b0, int64_t b1) {
      const int64_t part = b0 / grain;
      const Rows list = idx ? Rows{idx + t * I, idx_count[t]} : Rows{};
      kept[part] = ffn_blocks<F>(w, rb, Xt, I, d, D, thresh, list, act, param, b0, b1, gu.data(), partial.data() + part * d);
    });
    float* yt = y + t * d;
    std::copy(partial.begin(), partial.begin() + d, yt);
    int64_t c = kept[0];
    for (int64_t p = 1; p < parts; ++p) {
      c += kept[p];
      for (int64_t r = 0; r < d; ++r) yt[r] += partial[p * d + r];
    }
    count[t] = static_cast<int32_t>(c);
  }
}

// qsparse_ffn (thresh: every neuron computed, |h| > thresh kept) and qsparse_ffn_rows (idx/count: the listed
// neurons computed, every nonzero h kept): one implementation
std::tuple<at::Tensor, at::Tensor> qffn(const char* op, const at::Tensor& x, const at::Tensor& w,
                                        c10::string_view qtype_sv, const at::Tensor& codes, const at::Tensor& scale,
                                        const at::Tensor& minv, const at::Tensor* thresh, const at::Tensor* idx,
                                        const at::Tensor* idx_count, c10::string_view activation, double act_param) {
  const QInfo& qt = qinfo(std::string(qtype_sv));
  const Act act = parse_act(activation);
  TORCH_CHECK_VALUE(qt.block > 1, op, ": gate/up format ", qt.name, " is not block-quantized");
  TORCH_CHECK_VALUE(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op, ": x must be a float [T, d] tensor");
  const int64_t T = x.size(0), d = x.size(1), I = thresh ? thresh->numel() : codes.size(0);
  TORCH_CHECK_VALUE(d > 0 && d % qt.block == 0 && d % QK == 0, op, ": d=", d, " must be a multiple of ", qt.block);
  if (thresh) {
    TORCH_CHECK_VALUE(thresh->dim() == 1 && thresh->scalar_type() == at::kFloat && I > 0 && I % QK == 0, op,
                      ": thresh must be float32 [I], I a positive multiple of 32");
  } else {
    TORCH_CHECK_VALUE(I > 0 && I % QK == 0 && idx->dim() == 2 && idx->size(0) == T && idx->size(1) == I &&
                          idx->scalar_type() == at::kInt && idx_count->numel() == T &&
                          idx_count->scalar_type() == at::kInt,
                      op, ": idx must be int32 [T, I] and count int32 [T] (sparsedge::ffn_predict's output), I a "
                      "positive multiple of 32");
  }
  const int64_t rb = d / qt.block * qt.size;
  TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(0) == 2 * I && w.size(1) == rb,
                    op, ": w_gate_up must be uint8 [", 2 * I, ", ", rb, "], got ", w.sizes());
  const bool four = codes.scalar_type() == at::kByte;
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) == I && codes.size(1) == (four ? d / 2 : d) &&
                        (four || codes.scalar_type() == at::kChar),
                    op, ": down codes must be uint8 [I, d/2] or int8 [I, d], got ", codes.scalar_type(), " ",
                    codes.sizes());
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == I / QK && scale.size(1) == d,
                    op, ": down scale must be float16 [I/32, d]");
  const bool has_min = minv.numel() > 0;
  TORCH_CHECK_VALUE(!has_min || (minv.scalar_type() == at::kHalf && minv.dim() == 2 && minv.size(0) == I / QK &&
                                 minv.size(1) == d),
                    op, ": down min must be empty or float16 [I/32, d]");
  TORCH_CHECK_VALUE(has_min || !four, op, ": 4-bit down codes need their mins");
  auto wc = w.contiguous(), cc = codes.contiguous(), sc = scale.contiguous(), mc = minv.contiguous();
  const at::Tensor tc = thresh ? thresh->contiguous() : at::Tensor();
  const at::Tensor ic = idx ? idx->contiguous() : at::Tensor(), nc = idx ? idx_count->contiguous() : at::Tensor();
  auto xf = as_plain(x, at::kFloat);
  auto y = at::empty({T, d}, x.options().dtype(at::kFloat));
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  if (T == 0) return {y.to(x.scalar_type()), count};
  if (idx) {
    const int32_t* n = nc.data_ptr<int32_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK_VALUE(0 <= n[t] && n[t] <= I, op, ": count[", t, "]=", n[t], " not in [0, I]");
  }
  const QAct X = quantize_acts(xf.data_ptr<float>(), T, d);
  const Down D{reinterpret_cast<const uint8_t*>(cc.data_ptr()), cc.size(1), sc.data_ptr<c10::Half>(),
               has_min ? mc.data_ptr<c10::Half>() : nullptr, four};
  const float* th = thresh ? tc.data_ptr<float>() : nullptr;
  const int32_t* ip = idx ? ic.data_ptr<int32_t>() : nullptr;
  const int32_t* np = idx ? nc.data_ptr<int32_t>() : nullptr;
  const float p = static_cast<float>(act_param);
  float* yp = y.data_ptr<float>();
  int32_t* cp = count.data_ptr<int32_t>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  switch (qt.type) {
    case QType::Q8_0: run<Q8_0>(wp, rb, X, T, I, d, D, th, ip, np, act, p, yp, cp); break;
    case QType::Q4_0: run<Q4_0>(wp, rb, X, T, I, d, D, th, ip, np, act, p, yp, cp); break;
    case QType::Q4_1: run<Q4_1>(wp, rb, X, T, I, d, D, th, ip, np, act, p, yp, cp); break;
    case QType::Q4_K: run<Q4_K>(wp, rb, X, T, I, d, D, th, ip, np, act, p, yp, cp); break;
    case QType::Q6_K: run<Q6_K>(wp, rb, X, T, I, d, D, th, ip, np, act, p, yp, cp); break;
    default: TORCH_CHECK_VALUE(false, op, ": gate/up format ", qt.name, " has no sparse FFN kernel (q8_0, q4_0, q4_1, "
                               "q4_k, q6_k do)");
  }
  return {x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()), count};
}

std::tuple<at::Tensor, at::Tensor> qsparse_ffn_impl(const at::Tensor& x, const at::Tensor& w, c10::string_view qtype,
                                                    const at::Tensor& codes, const at::Tensor& scale,
                                                    const at::Tensor& minv, const at::Tensor& thresh,
                                                    c10::string_view activation, double act_param) {
  return qffn("qsparse_ffn", x, w, qtype, codes, scale, minv, &thresh, nullptr, nullptr, activation, act_param);
}

std::tuple<at::Tensor, at::Tensor> qsparse_ffn_rows_impl(const at::Tensor& x, const at::Tensor& idx,
                                                         const at::Tensor& count, const at::Tensor& w,
                                                         c10::string_view qtype, const at::Tensor& codes,
                                                         const at::Tensor& scale, const at::Tensor& minv,
                                                         c10::string_view activation, double act_param) {
  return qffn("qsparse_ffn_rows", x, w, qtype, codes, scale, minv, nullptr, &idx, &count, activation, act_param);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) {
  m.impl("qsparse_ffn", &qsparse_ffn_impl);
  m.impl("qsparse_ffn_rows", &qsparse_ffn_rows_impl);
}

}  // namespace sparsedge::cpu
