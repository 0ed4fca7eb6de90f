// Host-side launcher API of qlinear over GGUF block weights (sdk/sparsedge/ops/quant.py; layouts in
// sdk/sparsedge/quant/formats.py). Plain C++, no torch headers: quant_binding.cpp does the torch glue.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "launchers.h"

namespace sparsedge::cuda {

enum class QType : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5, Q4_K = 6, Q6_K = 7, TQ2_0 = 8 };

struct QTypeInfo {
  const char* name;
  QType type;
  int64_t block;  // elements per block
  int64_t size;   // bytes per block
};
constexpr QTypeInfo kQTypes[] = {
    {"f32", QType::F32, 1, 4},      {"f16", QType::F16, 1, 2},      {"bf16", QType::BF16, 1, 2},
    {"q8_0", QType::Q8_0, 32, 34},  {"q4_0", QType::Q4_0, 32, 18},  {"q4_1", QType::Q4_1, 32, 20},
    {"q4_k", QType::Q4_K, 256, 144}, {"q6_k", QType::Q6_K, 256, 210}, {"tq2_0", QType::TQ2_0, 256, 66},
};

// Bytes of one row of K elements in format qt; 0 when K is not a positive multiple of its block.
inline int64_t qtype_row_bytes(QType qt, int64_t K) {
  for (const auto& t : kQTypes)
    if (t.type == qt) return K > 0 && K % t.block == 0 ? K / t.block * t.size : 0;
  return 0;
}

// Bytes of workspace qlinear needs for T tokens of length K (int8 x and its per-32 scales / sums).
int64_t qlinear_workspace_bytes(int64_t T, int64_t K);

// y [T, N] fp32 = x [T, K] (dtype xt) W^T, W = w [N, K / block * size] raw block bytes (2-byte aligned rows).
// Quantized types round x to int8 per block of 32 exactly as the CPU kernel does (d = amax / 127,
// q = round-half-even(x * (127 / amax)), s = d * sum q, IEEE ops under --use_fast_math) and take __dp4a sums.
cudaError_t qlinear(const void* x, const uint8_t* w, float* y, int64_t T, int64_t N, int64_t K, QType qt, DType xt,
                    void* workspace, cudaStream_t stream);

// qlinear's first step alone, for kernels that dot rows of their own choosing with the same int8 x (qsparse_ffn_rows):
// x [T, K] (dtype xt, K a multiple of 32) rounded into a qlinear workspace (qlinear_workspace_bytes(T, K), 256-byte
// aligned) exactly as qlinear rounds it; qlinear_x_views gives q int8 [T, K] (each 32-block 16-byte aligned) and
// d, s fp32 [T, K / 32] (amax / 127 and d * sum q per block).
struct QuantizedX {
  int8_t* q;
  float* d;
  float* s;
};
QuantizedX qlinear_x_views(void* workspace, int64_t T, int64_t K);
cudaError_t quantize_x(const void* x, int64_t T, int64_t K, DType xt, void* workspace, cudaStream_t stream);

// qsparse_ffn (sdk/sparsedge/ops/qffn.py; qffn.cu): y [T, d] (dtype xt) and count [T] from x [T, d] (xt), w_gate_up
// [2I, d / block * size] (qt, a block format; 2-byte aligned), W_down in sparsedge.quant.down_t's neuron-row layout:
// codes uint8 [I, d / 2] (four_bit) or int8 [I, d], 16-byte aligned; scale / minv fp16 [I / 32, d], 8-byte aligned
// (minv null for int8 codes), thresh [I] fp32. d and I multiples of 32. Workspace: qsparse_ffn_workspace_bytes()
// for the same T, d, I and device (256-byte aligned).
int64_t qsparse_ffn_workspace_bytes(int64_t T, int64_t d, int64_t I, int device);
cudaError_t qsparse_ffn(const void* x, const uint8_t* w_gate_up, QType qt, const uint8_t* codes, bool four_bit,
                        const void* scale, const void* minv, const float* thresh, void* y, int32_t* count, int64_t T,
                        int64_t d, int64_t I, Act act, float act_param, DType xt, void* workspace, int device,
                        cudaStream_t stream);

// qsparse_ffn_rows (the same file and op module; qffn.cu): the neurons idx[t, :count[t]] (int32 [T, I], ascending;
// count int32 [T], clamped to [0, I] on the device) have their gate row i and up row I + i dotted with x (rounded as
// qlinear rounds it), every other h is 0, and every nonzero h is kept (no threshold); the down step and y are
// qsparse_ffn's, down_count [T] = the nonzero h per token. Same operands and alignment as qsparse_ffn otherwise, and
// the same workspace (qsparse_ffn_workspace_bytes).
cudaError_t qsparse_ffn_rows(const void* x, const int32_t* idx, const int32_t* count, const uint8_t* w_gate_up,
                             QType qt, const uint8_t* codes, bool four_bit, const void* scale, const void* minv,
                             void* y, int32_t* down_count, int64_t T, int64_t d, int64_t I, Act act, float act_param,
                             DType xt, void* workspace, int device, cudaStream_t stream);

}  // namespace sparsedge::cuda
