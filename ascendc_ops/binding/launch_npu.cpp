// Real launchers (NPU build only): include/sparsedge_launch.h implemented with the ACLRT_LAUNCH_KERNEL stubs that
// CANN's ascendc_library() generates for each `extern "C" __global__ __aicore__` kernel (aclrtlaunch_<name>.h).
// Called from the OpCommand custom handlers in torch_binding.cpp, on torch_npu's current stream.
#include <stdexcept>
#include <string>

#include "acl/acl.h"
#include "sparsedge_launch.h"

#include "aclrtlaunch_sparsedge_delta_attention_decode_f16.h"
#include "aclrtlaunch_sparsedge_delta_encode_f16.h"
#include "aclrtlaunch_sparsedge_ffn_concat.h"
#include "aclrtlaunch_sparsedge_ffn_f16.h"
#include "aclrtlaunch_sparsedge_ffn_q4_f16.h"
#include "aclrtlaunch_sparsedge_ffn_reduce_f16.h"
#include "aclrtlaunch_sparsedge_qffn_reduce.h"
#include "aclrtlaunch_sparsedge_qffn_rows_q8.h"
#ifdef SPARSEDGE_HAS_BF16  // 910B builds only (see CMakeLists.txt)
#include "aclrtlaunch_sparsedge_delta_attention_decode_bf16.h"
#include "aclrtlaunch_sparsedge_delta_encode_bf16.h"
#include "aclrtlaunch_sparsedge_ffn_bf16.h"
#include "aclrtlaunch_sparsedge_ffn_q4_bf16.h"
#include "aclrtlaunch_sparsedge_ffn_reduce_bf16.h"
#endif

namespace {
void check(uint32_t rc, const char* kernel) {
    if (rc != 0) throw std::runtime_error(std::string("sparsedge (npu): launching ") + kernel + " failed with " + std::to_string(rc));
}
[[noreturn]] void no_bf16() {
    throw std::runtime_error("sparsedge (npu): bf16 kernels are not built for this SOC_VERSION (910B only)");
}
}  // namespace

#ifdef SPARSEDGE_HAS_BF16
#define SD_DISPATCH(dtype, NAME, ...)                                                             \
    ((dtype) == SD_BF16 ? check(ACLRT_LAUNCH_KERNEL(NAME##_bf16)(__VA_ARGS__), #NAME "_bf16")      \
                        : check(ACLRT_LAUNCH_KERNEL(NAME##_f16)(__VA_ARGS__), #NAME "_f16"))
#else
#define SD_DISPATCH(dtype, NAME, ...) \
    ((dtype) == SD_BF16 ? no_bf16() : check(ACLRT_LAUNCH_KERNEL(NAME##_f16)(__VA_ARGS__), #NAME "_f16"))
#endif

extern "C" {
void sd_launch_ffn(int dtype, uint32_t blockDim, void* stream, void* x, void* p1, void* p2, void* bias, void* wGate,
                   void* wUp, void* wDownT, void* idx, void* count, void* ws, uint32_t T, uint32_t d, uint32_t r,
                   uint32_t I, uint32_t mode, uint32_t act, float actParam, float tau, uint32_t dPad, uint32_t rPad,
                   uint32_t nPerCore, uint32_t nTile, uint32_t p2Rows) {
    SD_DISPATCH(dtype, sparsedge_ffn, blockDim, stream, x, p1, p2, bias, wGate, wUp, wDownT, idx, count, ws, T, d, r,
                I, mode, act, actParam, tau, dPad, rPad, nPerCore, nTile, p2Rows);
}
void sd_launch_ffn_reduce(int dtype, uint32_t blockDim, void* stream, void* ws, void* y, void* count, void* downCount,
                          uint32_t T, uint32_t d, uint32_t dPad, uint32_t mainBlocks, uint32_t cols) {
    SD_DISPATCH(dtype, sparsedge_ffn_reduce, blockDim, stream, ws, y, count, downCount, T, d, dPad, mainBlocks, cols);
}
void sd_launch_ffn_concat(uint32_t blockDim, void* stream, void* ws, void* idx, void* count, uint32_t T, uint32_t I,
                          uint32_t dPad, uint32_t mainBlocks, uint32_t nPerCore) {
    check(ACLRT_LAUNCH_KERNEL(sparsedge_ffn_concat)(blockDim, stream, ws, idx, count, T, I, dPad, mainBlocks, nPerCore),
          "sparsedge_ffn_concat");
}
void sd_launch_ffn_q4(int dtype, uint32_t blockDim, void* stream, void* x, void* q, void* scale, void* thresh,
                      void* ws, uint32_t T, uint32_t d, uint32_t G, uint32_t I, uint32_t act, float actParam,
                      uint32_t hPad, uint32_t ngPad, uint32_t nPerCore, uint32_t nTile, uint32_t qRows) {
    SD_DISPATCH(dtype, sparsedge_ffn_q4, blockDim, stream, x, q, scale, thresh, ws, T, d, G, I, act, actParam, hPad,
                ngPad, nPerCore, nTile, qRows);
}
void sd_launch_qffn_rows_q8(uint32_t blockDim, void* stream, void* x, void* idx, void* count, void* wGateUp,
                            void* downCodes, void* downScale, void* ws, uint32_t T, uint32_t d, uint32_t I,
                            uint32_t act, float actParam, uint32_t bPerCore, uint32_t nbxPad, uint32_t nTile,
                            uint32_t nList) {
    check(ACLRT_LAUNCH_KERNEL(sparsedge_qffn_rows_q8)(blockDim, stream, x, idx, count, wGateUp, downCodes, downScale,
                                                      ws, T, d, I, act, actParam, bPerCore, nbxPad, nTile, nList),
          "sparsedge_qffn_rows_q8");
}
void sd_launch_qffn_reduce(uint32_t blockDim, void* stream, void* ws, void* y, void* downCount, uint32_t T, uint32_t d,
                           uint32_t mainBlocks, uint32_t cols) {
    check(ACLRT_LAUNCH_KERNEL(sparsedge_qffn_reduce)(blockDim, stream, ws, y, downCount, T, d, mainBlocks, cols),
          "sparsedge_qffn_reduce");
}
void sd_launch_delta_encode(int dtype, uint32_t blockDim, void* stream, void* k, void* ref, void* theta, void* values,
                            void* chan, void* offsets, void* status, uint32_t T, uint32_t H, uint32_t D, uint32_t cap,
                            uint32_t offStride, uint32_t start, uint32_t dPad, uint32_t maxTokens) {
    SD_DISPATCH(dtype, sparsedge_delta_encode, blockDim, stream, k, ref, theta, values, chan, offsets, status, T, H, D,
                cap, offStride, start, dPad, maxTokens);
}
void sd_launch_delta_attention(int dtype, uint32_t blockDim, void* stream, void* q, void* k, void* vCache,
                               void* values, void* chan, void* offsets, void* sinkK, void* windowK, void* out, void* ws,
                               uint32_t H, uint32_t G, uint32_t D, uint32_t Tmax, uint32_t cap, uint32_t S, uint32_t W,
                               uint32_t start, uint32_t nSink, uint32_t window, float scale, uint32_t dPad,
                               uint32_t chunk, uint32_t entTile, uint32_t nPad) {
    SD_DISPATCH(dtype, sparsedge_delta_attention_decode, blockDim, stream, q, k, vCache, values, chan, offsets, sinkK,
                windowK, out, ws, H, G, D, Tmax, cap, S, W, start, nSink, window, scale, dPad, chunk, entTile, nPad);
}
}
