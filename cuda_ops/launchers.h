// Host-side launcher API of the sparsedge CUDA kernels.
//
// Plain C++ (no torch headers): every launcher takes raw device pointers, sizes, dtype tags and a
// cudaStream_t, enqueues its kernel(s) and returns cudaGetLastError(). binding.cpp does the torch glue
// (argument checks, dtype mapping, workspace allocation from torch's caching allocator, current stream).
// All layouts are row-major and contiguous, exactly as documented in sdk/sparsedge/ops/{norm,ffn,delta}.py.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "sparsedge/activations.h"

namespace sparsedge::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// FFN activation codes: the names and ids shared by every device (backends/include/sparsedge/activations.h).
using Act = sparsedge::Activation;

// ---- norm.cu -------------------------------------------------------------------------------
// y = x * rsqrt(mean(x^2) + eps) * w over the last dim (rows x d). With residual != nullptr:
// residual += x first (stored in residual's dtype, which is x's dtype), and the rounded sum is normalised.
cudaError_t rms_norm(const void* x, const void* w, void* y, void* residual, int64_t rows, int64_t d, float eps,
                     DType xt, DType wt, cudaStream_t stream);
// Rotate-half RoPE: x [T, H, D], cos/sin [T, D/2] fp32 -> y [T, H, D].
cudaError_t rope(const void* x, const float* cos, const float* sin, void* y, int64_t T, int64_t H, int64_t D,
                 DType xt, cudaStream_t stream);

// ---- ffn.cu --------------------------------------------------------------------------------
// Bytes of fp32/int workspace the FFN launchers need (the caller allocates it, 256-byte aligned).
int64_t ffn_predict_workspace_bytes(int64_t T, int64_t r, int64_t I);
int64_t ffn_rows_workspace_bytes(int64_t T, int64_t d, int64_t I, int device);
// Largest feature size the kernels stage in shared memory (x of one token, fp32).
constexpr int64_t kMaxStagedFloats = 12288;  // 48 KiB

// Predictor: z = P1 x (fp32), s = P2 z + bias, active = s > 0, compacted into idx [T, I] (ascending,
// first count[t] entries valid) and count [T]. x [T, d] (dtype xt), p1 [r, d], p2 [I, r], bias [I] (dtype pt).
cudaError_t ffn_predict(const void* x, const void* p1, const void* p2, const void* bias, int32_t* idx,
                        int32_t* count, int64_t T, int64_t d, int64_t r, int64_t I, DType xt, DType pt,
                        void* workspace, cudaStream_t stream);
// 4-bit gate x up predictor (sdk/sparsedge/ops/ffn.py, ffn_predict_q4): x [T, d] (xt), q [I, 2, d/2] uint8 (contiguous),
// scale [I, 2, d/G] fp32, thresh [I] fp32, G even and dividing d; neuron i is active for token t when
// |act(g^, u^)| > thresh[i] (act_param as in sparse_ffn_rows, no tau). Same idx/count contract as ffn_predict.
// One token's int8 x and group scales are staged in shared memory: d + 8 * d / G <= kMaxQ4StagedBytes.
constexpr int64_t kMaxQ4StagedBytes = 4 * kMaxStagedFloats - 256;
int64_t ffn_predict_q4_workspace_bytes(int64_t T, int64_t d, int64_t G, int64_t I);
cudaError_t ffn_predict_q4(const void* x, const uint8_t* q, const float* scale, const float* thresh, int32_t* idx,
                           int32_t* count, int64_t T, int64_t d, int64_t G, int64_t I, Act act, float act_param,
                           DType xt, void* workspace, cudaStream_t stream);
// Conditional FFN over per-token active lists: y [T, d] (dtype xt), down_count [T].
// x [T, d] (xt); w_gate, w_up, w_down_t [I, d] (wt); idx [T, I] int32 (ascending not required); count [T].
cudaError_t sparse_ffn_rows(const void* x, const int32_t* idx, const int32_t* count, const void* w_gate,
                            const void* w_up, const void* w_down_t, void* y, int32_t* down_count, int64_t T,
                            int64_t d, int64_t I, Act act, float act_param, float tau, DType xt, DType wt,
                            void* workspace, int device, cudaStream_t stream);

// ---- delta.cu ------------------------------------------------------------------------------
// Encodes k [T, H, D] (kt) at positions start.. into values/chan/offsets (values dtype vt), updating
// ref [H, D] fp32 and writing nnz [H] int64. overflow [H] int32 gets the needed entry count of a head whose
// packed buffer (cap entries) would overflow (0 otherwise); that head stops encoding at that token.
cudaError_t delta_encode(const void* k, float* ref, const float* theta, void* values, uint8_t* chan,
                         int32_t* offsets, int64_t* nnz, int32_t* overflow, int64_t T, int64_t H, int64_t D,
                         int64_t cap, int64_t offsets_stride, int64_t start, DType kt, DType vt,
                         cudaStream_t stream);

struct DeltaAttnArgs {
  const void* q;         // [T, Hq, D]  (dtype qt; also the output dtype)
  const void* k;         // [T, H, D]   (dtype qt: the binding converts it to q's dtype)
  const void* v_cache;   // [H, Tmax, D] (ct)
  const void* values;    // [H, cap]    (ct)
  const uint8_t* chan;   // [H, cap]
  const int32_t* offsets;// [H, offsets_stride]
  const void* sink_k;    // [H, S, D]   (ct)
  const void* window_k;  // [H, W, D]   (ct)
  void* out;             // [T, Hq, D]  (qt)
  int64_t T, Hq, H, D, Tmax, cap, offsets_stride, S, W_slots;
  int64_t start, n_sink, window;
  float scale;
};
// Workspace for scoring `tokens` queries at once (the launcher chunks T to fit `workspace_bytes`).
int64_t delta_attention_workspace_bytes(int64_t tokens, int64_t Hq, int64_t n);
cudaError_t delta_attention(const DeltaAttnArgs& a, DType qt, DType ct, void* workspace, int64_t workspace_bytes,
                            cudaStream_t stream);

// ---- attention.cu --------------------------------------------------------------------------
// Dense causal GQA attention: q [T, Hq, D] at positions start.. over k_cache/v_cache [H, Tmax, D] (all
// dtype dt) -> out [T, Hq, D]. `scores` is an fp32 workspace of dense_attention_workspace_bytes().
// window > 0: sliding window, the query at position p attends to keys max(0, p - window + 1)..p only.
int64_t dense_attention_workspace_bytes(int64_t T, int64_t Hq, int64_t start);
cudaError_t dense_attention(const void* q, const void* k_cache, const void* v_cache, void* out, float* scores,
                            int64_t T, int64_t Hq, int64_t H, int64_t D, int64_t Tmax, int64_t start, float scale,
                            DType dt, cudaStream_t stream, int64_t window = 0);

// ---- bitlinear.cu ---------------------------------------------------------------------------
// BitNet's BitLinear (sdk/sparsedge/ops/bitlinear.py): y [T, 4P] fp32 = (W q_t) / (scale * s_t), x [T, K] (dtype xt)
// rounded to int8 per token, w [P, K] uint8 (byte row g holds output rows 4g + i in bits 2i), scale [4P] fp32.
// Workspace: bitlinear_workspace_bytes(T, K), 256-byte aligned.
int64_t bitlinear_workspace_bytes(int64_t T, int64_t K);
cudaError_t bitlinear(const void* x, const uint8_t* w, const float* scale, float* y, int64_t T, int64_t P, int64_t K,
                      DType xt, void* workspace, cudaStream_t stream);

}  // namespace sparsedge::cuda
