// qlinear over GGUF block weights, executed in their own blocks (sdk/sparsedge/ops/quant.py,
// layouts in sdk/sparsedge/quant/formats.py): y [T, N] = x [T, K] W^T, W given as raw block bytes [N, row_bytes].
//
// Arithmetic (llama.cpp's): x is rounded once per call to int8 per block of 32 (d = amax / 127,
// q = round-half-even(x * 127 / amax), s = d * sum(q); quant.quantize_activations is the same rounding),
// then every weight block is an exact integer dot product with the matching x block(s):
//   q8_0   sum_32 w x                            (|w| and sign-transferred x: u8 x s8 products)
//   q4_0   sum_32 q x, with the -8 offset folded into the block's x sum: d_w (d_x sum q x - 8 s_x)
//   q4_1   sum_32 q x, the min term from the x sum:  d_w d_x sum q x + m_w s_x
//   q4_k   per 32-sub-block as q4_1 with scale d sc_j and min dmin mn_j
//   q6_k   per 16 elements (q - 32) x weighted by the int8 sub-scale in int16/int32 lanes, then d d_x
//   tq2_0  per 32-sub-block sum_32 q x of the 2-bit codes, the -1 offset folded as q4_0's: d (d_x sum q x - s_x)
// Integer sums use AVX2 maddubs/madd (u8 x s8 -> s16 pairs -> s32; no pair can saturate: |u| <= 128 and
// |x| <= 127, or u <= 63) or, where the build has AVX-VNNI / AVX512-VNNI, vpdpbusd; the float part of each
// block is one fma of the int32 lanes with d_w d_x into 8 fp32 accumulators. Without AVX2 a scalar path
// does the same integer sums and the same per-block fp32 operations.
// f32 / f16 / bf16 rows take fp32 dot products of the widened row with x (no rounding of x).
//
// With AVX2, 8 consecutive 32-blocks are taken at once (group8): their fp16 scales converted with one
// vcvtph2ps, d_w d_x and the offset / min terms computed as 8-lane vectors; q4_k decodes its 6-bit scales
// and mins the same way. Weight rows are software-prefetched kPrefetch bytes ahead.
//
// Work split (threadpool.h's pool: a decode step runs hundreds of these short regions): T = 1 (decode): rows
// in tiles of kDecodeRows (independent accumulator chains), tiles split evenly over threads (each thread one
// contiguous run of rows, >= kMinBytes of weights per thread). T > 1: rows in chunks of kChunkRows, chunks
// split over threads; inside a chunk every pass of up to 4 tokens x 2 rows walks the chunk's rows, which stay
#include "quant_blocks.h"

namespace sparsedge::cpu {

// Where the CPU multiplies bf16 natively (AVX512-BF16), the prefill GEMMs run in bf16 with fp32 accumulation
// (oneDNN through at::mm): x and the widened weights are rounded to bf16 once, as llama.cpp does for BF16 files.
// For block formats that rounding (|x| 2^-9 per element, |w| 2^-9) stays inside the int8 activation bound the
// decode path already has; measured in docs/results/quant.md ("prefill").
// Compiled in where the build targets AVX512-BF16 (-march=native on such a CPU).
bool bf16_gemm() {
#if defined(__AVX512BF16__)
  static const bool yes = [] {
    const char* env = std::getenv("SPARSEDGE_BF16_GEMM");  // "0": fp32 GEMMs (benchmarks compare the two)
    return !(env && env[0] == '0');
  }();
  return yes;
#else
  return false;
#endif
}

namespace {


template <class F>
void run_quant(const uint8_t* w, int64_t N, int64_t rb, const QAct& X, int64_t T, float* y) {
  if (T == 1) {
    const int64_t tiles = (N + kDecodeRows - 1) / kDecodeRows;
    parallel_for(tiles, even_grain(tiles, kDecodeRows * rb), [&](int64_t a, int64_t b) {
      const int64_t n1 = std::min(N, b * kDecodeRows);
      int64_t n = a * kDecodeRows;
      const uint8_t* end = w + n1 * rb;
      for (; n + kDecodeRows <= n1; n += kDecodeRows) tile<F, kDecodeRows, 1>(w, rb, X, n, 0, y, N, end);
      for (; n < n1; ++n) tile<F, 1, 1>(w, rb, X, n, 0, y, N, end);
    });
    return;
  }
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  parallel_for(chunks, even_grain(chunks, kChunkRows * rb * T), [&](int64_t a, int64_t b) {
    const uint8_t* end = w + std::min(N, b * kChunkRows) * rb;
    for (int64_t ch = a; ch < b; ++ch) {
      const int64_t r0 = ch * kChunkRows, r1 = std::min(N, r0 + kChunkRows);
      for (int64_t t = 0; t < T; t += 4) {
        const int64_t C = std::min<int64_t>(4, T - t);
        int64_t n = r0;
        for (; n + 2 <= r1; n += 2) tile_c<F, 2>(C, w, rb, X, n, t, y, N, end);
        if (n < r1) tile_c<F, 1>(C, w, rb, X, n, t, y, N, end);
      }
    }
  });
}

// ---- prefill (T >= kGemmTokens): dequantize a chunk of rows to fp32, then at::linear (a GEMM) ----------------
// With many tokens the int8 tiles are compute bound (each block decoded once per 4 tokens); a GEMM on the
// widened rows reuses each row across all tokens and the decode cost is paid once per call. x is not rounded
// here: the result is the composite reference's (fp32 x against the exact block values).
constexpr int64_t kGemmTokens = 32;
constexpr int64_t kGemmRows = 1024;  // rows widened at once (a few MB of fp32: one GEMM call per chunk)

void dequant_row(QType t, const uint8_t* b, int64_t K, float* out) {
  switch (t) {
    case QType::Q8_0:
      for (int64_t u = 0; u < K / 32; ++u, b += 34) {
        const float d = f16(b);
        for (int i = 0; i < 32; ++i) out[32 * u + i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
      }
      break;
    case QType::Q4_0:
    case QType::Q4_1: {
      const bool q41 = t == QType::Q4_1;
      const int64_t sz = q41 ? 20 : 18;
      for (int64_t u = 0; u < K / 32; ++u, b += sz) {
        const float d = f16(b), m = q41 ? f16(b + 2) : 0.f;
        const uint8_t* qs = b + (q41 ? 4 : 2);
        for (int i = 0; i < 32; ++i) {
          const int q = i < 16 ? (qs[i] & 15) : (qs[i - 16] >> 4);
          out[32 * u + i] = q41 ? d * static_cast<float>(q) + m : d * static_cast<float>(q - 8);
        }
      }
      break;
    }
    case QType::Q4_K:
      for (int64_t u = 0; u < K / 256; ++u, b += 144) {
        const float d = f16(b), dmin = f16(b + 2);
        uint32_t w[4];
        Q4_K::scale_min(b + 4, w);
        const uint8_t* sm = reinterpret_cast<const uint8_t*>(w);  // sc[0..7], mn[0..7]
        const uint8_t* qs = b + 16;
        for (int j = 0; j < 8; ++j) {
          const float sc = d * static_cast<float>(sm[j]), mn = dmin * static_cast<float>(sm[8 + j]);
          for (int i = 0; i < 32; ++i) {
            const uint8_t byte = qs[32 * (j / 2) + i];
            out[256 * u + 32 * j + i] = sc * static_cast<float>(j % 2 ? byte >> 4 : byte & 15) - mn;
          }
        }
      }
      break;
    case QType::TQ2_0:
      for (int64_t u = 0; u < K / 256; ++u, b += 66) {
        const float d = f16(b + 64);
        for (int e = 0; e < 256; ++e) {
          const int q = (b[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
          out[256 * u + e] = d * static_cast<float>(q - 1);
        }
      }
      break;
    default:  // Q6_K
      for (int64_t u = 0; u < K / 256; ++u, b += 210) {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        const float d = f16(b + 208);
        for (int e = 0; e < 256; ++e) {
          const int h = e / 128, r = e % 128;
          const int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
          const int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
          out[256 * u + e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>((lo | (hi << 4)) - 32);
        }
      }
  }
}

// fp32 -> bf16, round to nearest even (vcvtneps2bf16), for rows widened in a worker thread
void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &h, sizeof(h));
  }
#endif
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

void run_gemm(QType t, const uint8_t* w, int64_t N, int64_t rb, int64_t K, const at::Tensor& xf, float* y, int64_t T) {
  const bool half = bf16_gemm();
  const at::Tensor xg = half ? xf.to(at::kBFloat16) : xf;
  at::Tensor wf = at::empty({kGemmRows, K}, xf.options());
  at::Tensor wh = half ? at::empty({kGemmRows, K}, xg.options()) : wf;
  at::Tensor yc = at::empty({T, kGemmRows}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += kGemmRows) {
    const int64_t n = std::min(kGemmRows, N - n0);
    float* wp = wf.data_ptr<float>();
    parallel_for(n, 16, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        dequant_row(t, w + (n0 + r) * rb, K, wp + r * K);
        if (half) to_bf16(wp + r * K, wh.data_ptr<c10::BFloat16>() + r * K, K);
      }
    });
    at::Tensor yv = yc.narrow(1, 0, n);
    if (half) yv.copy_(at::mm(xg, wh.narrow(0, 0, n).t()));
    else at::mm_out(yv, xf, wf.narrow(0, 0, n).t());
    const float* src = yc.data_ptr<float>();
    for (int64_t i = 0; i < T; ++i) std::memcpy(y + i * N + n0, src + i * kGemmRows, n * sizeof(float));
  }
}

template <typename W>
void run_float(const uint8_t* wb, int64_t N, int64_t K, const float* x, int64_t T, float* y) {
  const W* w = reinterpret_cast<const W*>(wb);
  parallel_for(N, even_grain(N, K * static_cast<int64_t>(sizeof(W)) * T), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t t = 0; t < T; ++t) y[t * N + n] = dot(w + n * K, x + t * K, K);
  });
}

at::Tensor qlinear_impl(const at::Tensor& x, const at::Tensor& w, c10::string_view qtype_sv, int64_t K) {
  const QInfo& qt = qinfo(std::string(qtype_sv));
  TORCH_CHECK_VALUE(K > 0 && K % qt.block == 0, qt.name, ": the row length K=", K,
                    " must be a positive multiple of its block size ", qt.block);
  const int64_t rb = K / qt.block * qt.size;
  TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == rb, "qlinear: w must be uint8 [N, ",
                    rb, "] (", qt.name, " rows of K=", K, "), got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K && at::isFloatingType(x.scalar_type()),
                    "qlinear: x must be a float tensor [..., ", K, "], got ", x.scalar_type(), " ", x.sizes());
  const int64_t N = w.size(0), T = x.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto wc = w.contiguous();
  // decode calls (one token, fp32, contiguous: the C++ layer loop's) skip the reshape / cast / copy-back ops: a
  // token makes ~120 of these calls, and the other thread waits through each one's serial part
  const bool plain = x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous();
  auto xf = plain ? x : x.reshape({T, K}).to(at::kFloat).contiguous();
  auto y = plain ? at::empty(sizes, x.options()) : at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T == 0 || N == 0) return plain ? y : y.to(x.scalar_type()).reshape(sizes);
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (qt.block == 1) {
    if (T > kMaxFloatTokens) {
      const auto dt = qt.type == QType::F32 ? at::kFloat : qt.type == QType::F16 ? at::kHalf : at::kBFloat16;
      if (dt == at::kBFloat16 && bf16_gemm())  // the file's bf16 rows as they are, no widened copy
        return at::mm(xf.to(at::kBFloat16), wc.view(dt).t()).to(x.scalar_type()).reshape(sizes);
      return at::linear(xf, wc.view(dt).to(at::kFloat)).to(x.scalar_type()).reshape(sizes);
    }
    const float* xp = xf.data_ptr<float>();
    if (qt.type == QType::F32) run_float<float>(wp, N, K, xp, T, yp);
    else if (qt.type == QType::F16) run_float<c10::Half>(wp, N, K, xp, T, yp);
    else run_float<c10::BFloat16>(wp, N, K, xp, T, yp);
    return y.to(x.scalar_type()).reshape(sizes);
  }
  if (T >= kGemmTokens) {
    run_gemm(qt.type, wp, N, rb, K, xf, yp, T);
    return y.to(x.scalar_type()).reshape(sizes);
  }
  const QAct X = quantize_acts(xf.data_ptr<float>(), T, K);
  switch (qt.type) {
    case QType::Q8_0: run_quant<Q8_0>(wp, N, rb, X, T, yp); break;
    case QType::Q4_0: run_quant<Q4_0>(wp, N, rb, X, T, yp); break;
    case QType::Q4_1: run_quant<Q4_1>(wp, N, rb, X, T, yp); break;
    case QType::Q4_K: run_quant<Q4_K>(wp, N, rb, X, T, yp); break;
    case QType::TQ2_0: run_quant<TQ2_0>(wp, N, rb, X, T, yp); break;
    default: run_quant<Q6_K>(wp, N, rb, X, T, yp); break;
  }
  return plain ? y : y.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

// Row `token` of a q8_0 / q4_0 embedding table, dequantized by dequant_row for the C++ decode step
// (decode_loop.cpp): one fp32 product of the fp16 scale and the integer code per value, the values of
// sparsedge.quant.formats.dequantize, which costs ~40 us a token in torch ops. Other formats return an undefined
// tensor and stay in Python: q4_1's d q + m takes two roundings there, which the compiler could fuse here.
at::Tensor embed_row(const at::Tensor& data, const std::string& qtype, int64_t K, int64_t token) {
  if ((qtype != "q8_0" && qtype != "q4_0") || K % QK || data.dim() != 2 || data.scalar_type() != at::kByte ||
      !data.is_contiguous())
    return at::Tensor();
  const QInfo& qt = qinfo(qtype);
  TORCH_CHECK(data.size(1) == K / qt.block * qt.size && token >= 0 && token < data.size(0), "embed_row: token ",
              token, " outside the ", data.size(0), "-row table (or a row that is not ", qt.name, " of K=", K, ")");
  at::Tensor out = at::empty({1, K}, data.options().dtype(at::kFloat));
  dequant_row(qt.type, data.data_ptr<uint8_t>() + token * data.size(1), K, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_IMPL(sparsedge, CPU, m) { m.impl("qlinear", &qlinear_impl); }

}  // namespace sparsedge::cpu
