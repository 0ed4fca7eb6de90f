// Host-side launchers of the sparsedge AscendC kernels, in kernel argument order.
//
// Two implementations of the same declarations:
//   ascendc_ops/binding/launch_npu.cpp      real: ACLRT_LAUNCH_KERNEL(kernel)(blockDim, stream, ...) from the
//                                           aclrtlaunch_<kernel>.h headers that CANN's ascendc_library() generates
//   ascendc_ops/emulation/launch_emu.cpp    TEST HARNESS: records the call and runs the same kernel sources on the
//                                           host through emulation/kernel_operator.h (a loop over block indices)
// The torch_npu binding (binding/torch_binding.cpp) calls only these, inside OpCommand::SetCustomHandler.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SdDtype { SD_F16 = 0, SD_BF16 = 1 };

void sd_launch_ffn(int dtype, uint32_t blockDim, void* stream, void* x, void* p1, void* p2, void* bias, void* wGate,
                   void* wUp, void* wDownT, void* idx, void* count, void* workspace, uint32_t T, uint32_t d, uint32_t r,
                   uint32_t I, uint32_t mode, uint32_t act, float actParam, float tau, uint32_t dPad, uint32_t rPad,
                   uint32_t nPerCore, uint32_t nTile, uint32_t p2Rows);
void sd_launch_ffn_reduce(int dtype, uint32_t blockDim, void* stream, void* workspace, void* y, void* count,
                          void* downCount, uint32_t T, uint32_t d, uint32_t dPad, uint32_t mainBlocks, uint32_t cols);
void sd_launch_ffn_concat(uint32_t blockDim, void* stream, void* workspace, void* idx, void* count, uint32_t T,
                          uint32_t I, uint32_t dPad, uint32_t mainBlocks, uint32_t nPerCore);
void sd_launch_ffn_q4(int dtype, uint32_t blockDim, void* stream, void* x, void* q, void* scale, void* thresh,
                      void* workspace, uint32_t T, uint32_t d, uint32_t G, uint32_t I, uint32_t act, float actParam,
                      uint32_t hPad, uint32_t ngPad, uint32_t nPerCore, uint32_t nTile, uint32_t qRows);
// qsparse_ffn_rows, W8 (kernels/qffn.cpp): x fp32, q8_0 gate/up rows, q8_0 W_down by neuron; no dtype variants
void sd_launch_qffn_rows_q8(uint32_t blockDim, void* stream, void* x, void* idx, void* count, void* wGateUp,
                            void* downCodes, void* downScale, void* workspace, uint32_t T, uint32_t d, uint32_t I,
                            uint32_t act, float actParam, uint32_t bPerCore, uint32_t nbxPad, uint32_t nTile,
                            uint32_t nList);
void sd_launch_qffn_reduce(uint32_t blockDim, void* stream, void* workspace, void* y, void* downCount, uint32_t T,
                           uint32_t d, uint32_t mainBlocks, uint32_t cols);
void sd_launch_delta_encode(int dtype, uint32_t blockDim, void* stream, void* k, void* ref, void* theta, void* values,
                            void* chan, void* offsets, void* status, uint32_t T, uint32_t H, uint32_t D, uint32_t cap,
                            uint32_t offStride, uint32_t start, uint32_t dPad, uint32_t maxTokens);
void sd_launch_delta_attention(int dtype, uint32_t blockDim, void* stream, void* q, void* k, void* vCache,
                               void* values, void* chan, void* offsets, void* sinkK, void* windowK, void* out,
                               void* workspace, uint32_t H, uint32_t G, uint32_t D, uint32_t Tmax, uint32_t cap,
                               uint32_t S, uint32_t W, uint32_t start, uint32_t nSink, uint32_t window, float scale,
                               uint32_t dPad, uint32_t chunk, uint32_t entTile, uint32_t nPad);

#ifdef __cplusplus
}
#endif
