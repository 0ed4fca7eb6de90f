// TEST HARNESS — host emulation of the kernel launches (see kernel_operator.h in this folder).
// Implements include/sparsedge_launch.h by running the *same* kernel sources over a loop of block indices,
// records every launch (kernel name, blockDim, arguments in kernel order) for the dispatch tests, and exposes
// a small C API (sd_emu_*) for the ctypes-based numerics tests.  Never part of an NPU build.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "kernel_operator.h"
#include "../include/sparsedge_launch.h"
#include "../include/sparsedge_tiling.h"
#include "../kernels/delta_attention.cpp"
#include "../kernels/qffn.cpp"
#include "../kernels/sparse_ffn.cpp"
#include "sparsedge/activations.h"

// the kernels' activation ids are the ids every binding parses names into (backends/include/sparsedge/activations.h)
namespace sd_act_check {
using A = sparsedge::Activation;
static_assert(sparsedge::ACT_SILU == int(A::silu) && sparsedge::ACT_GELU == int(A::gelu) &&
                  sparsedge::ACT_GELU_TANH == int(A::gelu_tanh) && sparsedge::ACT_RELU == int(A::relu) &&
                  sparsedge::ACT_FATRELU == int(A::fatrelu) && sparsedge::ACT_DRELU == int(A::drelu) &&
                  sparsedge::ACT_RELU2 == int(A::relu2) && sparsedge::kNumActivations == 7,
              "ascendc_ops/kernels/sparse_ffn.cpp activation ids differ from sparsedge/activations.h");
}  // namespace sd_act_check

namespace {
std::string g_log, g_err;
uint64_t g_last_ub = 0;

template <typename A>
void put(std::ostringstream& o, const A& a) {
    if constexpr (std::is_pointer_v<A>) o << ' ' << "ptr:" << (const void*)a;
    else if constexpr (std::is_floating_point_v<A>) o << ' ' << "f:" << a;
    else o << ' ' << "u:" << (unsigned long long)a;
}
template <typename... A>
void record(const char* kernel, uint32_t blockDim, const A&... a) {
    std::ostringstream o;
    o << kernel << " blockDim=" << blockDim;
    (put(o, a), ...);
    g_log += o.str() + "\n";
}
void chip_from_env() {
    const char* s = std::getenv("SPARSEDGE_FAKE_SOC");
    if (s && std::string(s).find("910") != std::string::npos) emu::g_chip = &emu::CHIP_910B;
    else if (s) emu::g_chip = &emu::CHIP_310B;
}
template <typename F>
void run(uint32_t blockDim, F&& f) {
    emu::g_ub_high_water = 0;
    emu::launch(blockDim, f);
    g_last_ub = emu::g_ub_high_water;
}
#define GM(p) reinterpret_cast<GM_ADDR>(p)
}  // namespace

extern "C" {
void sd_launch_ffn(int dtype, uint32_t blockDim, void* stream, void* x, void* p1, void* p2, void* bias, void* wGate,
                   void* wUp, void* wDownT, void* idx, void* count, void* ws, uint32_t T, uint32_t d, uint32_t r,
                   uint32_t I, uint32_t mode, uint32_t act, float actParam, float tau, uint32_t dPad, uint32_t rPad,
                   uint32_t nPerCore, uint32_t nTile, uint32_t p2Rows) {
    (void)stream;
    record(dtype == SD_BF16 ? "sparsedge_ffn_bf16" : "sparsedge_ffn_f16", blockDim, x, p1, p2, bias, wGate, wUp,
           wDownT, idx, count, ws, T, d, r, I, mode, act, actParam, tau, dPad, rPad, nPerCore, nTile, p2Rows);
    run(blockDim, [&] {
        if (dtype == SD_BF16)
            sparsedge_ffn_bf16(GM(x), GM(p1), GM(p2), GM(bias), GM(wGate), GM(wUp), GM(wDownT), GM(idx), GM(count),
                               GM(ws), T, d, r, I, mode, act, actParam, tau, dPad, rPad, nPerCore, nTile, p2Rows);
        else
            sparsedge_ffn_f16(GM(x), GM(p1), GM(p2), GM(bias), GM(wGate), GM(wUp), GM(wDownT), GM(idx), GM(count),
                              GM(ws), T, d, r, I, mode, act, actParam, tau, dPad, rPad, nPerCore, nTile, p2Rows);
    });
}
void sd_launch_ffn_reduce(int dtype, uint32_t blockDim, void* stream, void* ws, void* y, void* count, void* downCount,
                          uint32_t T, uint32_t d, uint32_t dPad, uint32_t mainBlocks, uint32_t cols) {
    (void)stream;
    record(dtype == SD_BF16 ? "sparsedge_ffn_reduce_bf16" : "sparsedge_ffn_reduce_f16", blockDim, ws, y, count,
           downCount, T, d, dPad, mainBlocks, cols);
    run(blockDim, [&] {
        if (dtype == SD_BF16) sparsedge_ffn_reduce_bf16(GM(ws), GM(y), GM(count), GM(downCount), T, d, dPad, mainBlocks, cols);
        else sparsedge_ffn_reduce_f16(GM(ws), GM(y), GM(count), GM(downCount), T, d, dPad, mainBlocks, cols);
    });
}
void sd_launch_ffn_concat(uint32_t blockDim, void* stream, void* ws, void* idx, void* count, uint32_t T, uint32_t I,
                          uint32_t dPad, uint32_t mainBlocks, uint32_t nPerCore) {
    (void)stream;
    record("sparsedge_ffn_concat", blockDim, ws, idx, count, T, I, dPad, mainBlocks, nPerCore);
    run(blockDim, [&] { sparsedge_ffn_concat(GM(ws), GM(idx), GM(count), T, I, dPad, mainBlocks, nPerCore); });
}
void sd_launch_ffn_q4(int dtype, uint32_t blockDim, void* stream, void* x, void* q, void* scale, void* thresh,
                      void* ws, uint32_t T, uint32_t d, uint32_t G, uint32_t I, uint32_t act, float actParam,
                      uint32_t hPad, uint32_t ngPad, uint32_t nPerCore, uint32_t nTile, uint32_t qRows) {
    (void)stream;
    record(dtype == SD_BF16 ? "sparsedge_ffn_q4_bf16" : "sparsedge_ffn_q4_f16", blockDim, x, q, scale, thresh, ws, T,
           d, G, I, act, actParam, hPad, ngPad, nPerCore, nTile, qRows);
    run(blockDim, [&] {
        if (dtype == SD_BF16)
            sparsedge_ffn_q4_bf16(GM(x), GM(q), GM(scale), GM(thresh), GM(ws), T, d, G, I, act, actParam, hPad, ngPad,
                                  nPerCore, nTile, qRows);
        else
            sparsedge_ffn_q4_f16(GM(x), GM(q), GM(scale), GM(thresh), GM(ws), T, d, G, I, act, actParam, hPad, ngPad,
                                 nPerCore, nTile, qRows);
    });
}
void sd_launch_qffn_rows_q8(uint32_t blockDim, void* stream, void* x, void* idx, void* count, void* wGateUp,
                            void* downCodes, void* downScale, void* ws, uint32_t T, uint32_t d, uint32_t I,
                            uint32_t act, float actParam, uint32_t bPerCore, uint32_t nbxPad, uint32_t nTile,
                            uint32_t nList) {
    (void)stream;
    record("sparsedge_qffn_rows_q8", blockDim, x, idx, count, wGateUp, downCodes, downScale, ws, T, d, I, act, actParam,
           bPerCore, nbxPad, nTile, nList);
    run(blockDim, [&] {
        sparsedge_qffn_rows_q8(GM(x), GM(idx), GM(count), GM(wGateUp), GM(downCodes), GM(downScale), GM(ws), T, d, I,
                               act, actParam, bPerCore, nbxPad, nTile, nList);
    });
}
void sd_launch_qffn_reduce(uint32_t blockDim, void* stream, void* ws, void* y, void* downCount, uint32_t T, uint32_t d,
                           uint32_t mainBlocks, uint32_t cols) {
    (void)stream;
    record("sparsedge_qffn_reduce", blockDim, ws, y, downCount, T, d, mainBlocks, cols);
    run(blockDim, [&] { sparsedge_qffn_reduce(GM(ws), GM(y), GM(downCount), T, d, mainBlocks, cols); });
}
void sd_launch_delta_encode(int dtype, uint32_t blockDim, void* stream, void* k, void* ref, void* theta, void* values,
                            void* chan, void* offsets, void* status, uint32_t T, uint32_t H, uint32_t D, uint32_t cap,
                            uint32_t offStride, uint32_t start, uint32_t dPad, uint32_t maxTokens) {
    (void)stream;
    record(dtype == SD_BF16 ? "sparsedge_delta_encode_bf16" : "sparsedge_delta_encode_f16", blockDim, k, ref, theta,
           values, chan, offsets, status, T, H, D, cap, offStride, start, dPad, maxTokens);
    run(blockDim, [&] {
        if (dtype == SD_BF16)
            sparsedge_delta_encode_bf16(GM(k), GM(ref), GM(theta), GM(values), GM(chan), GM(offsets), GM(status), T, H,
                                        D, cap, offStride, start, dPad, maxTokens);
        else
            sparsedge_delta_encode_f16(GM(k), GM(ref), GM(theta), GM(values), GM(chan), GM(offsets), GM(status), T, H,
                                       D, cap, offStride, start, dPad, maxTokens);
    });
}
void sd_launch_delta_attention(int dtype, uint32_t blockDim, void* stream, void* q, void* k, void* vCache,
                               void* values, void* chan, void* offsets, void* sinkK, void* windowK, void* out,
                               void* ws, uint32_t H, uint32_t G, uint32_t D, uint32_t Tmax, uint32_t cap, uint32_t S,
                               uint32_t W, uint32_t start, uint32_t nSink, uint32_t window, float scale, uint32_t dPad,
                               uint32_t chunk, uint32_t entTile, uint32_t nPad) {
    (void)stream;
    record(dtype == SD_BF16 ? "sparsedge_delta_attention_decode_bf16" : "sparsedge_delta_attention_decode_f16",
           blockDim, q, k, vCache, values, chan, offsets, sinkK, windowK, out, ws, H, G, D, Tmax, cap, S, W, start,
           nSink, window, scale, dPad, chunk, entTile, nPad);
    run(blockDim, [&] {
        if (dtype == SD_BF16)
            sparsedge_delta_attention_decode_bf16(GM(q), GM(k), GM(vCache), GM(values), GM(chan), GM(offsets),
                                                  GM(sinkK), GM(windowK), GM(out), GM(ws), H, G, D, Tmax, cap, S, W,
                                                  start, nSink, window, scale, dPad, chunk, entTile, nPad);
        else
            sparsedge_delta_attention_decode_f16(GM(q), GM(k), GM(vCache), GM(values), GM(chan), GM(offsets),
                                                 GM(sinkK), GM(windowK), GM(out), GM(ws), H, G, D, Tmax, cap, S, W,
                                                 start, nSink, window, scale, dPad, chunk, entTile, nPad);
    });
}

// ------------------------------------------------------------------ C API for the ctypes tests
const char* sd_emu_last_error() { return g_err.c_str(); }
const char* sd_emu_launch_log() { return g_log.c_str(); }
void sd_emu_clear_log() { g_log.clear(); }
uint64_t sd_emu_last_ub() { return g_last_ub; }
void sd_emu_set_chip(int chip) { emu::g_chip = chip == SD_CHIP_910B ? &emu::CHIP_910B : &emu::CHIP_310B; }
void sd_emu_chip_from_env() { chip_from_env(); }

#define EMU_TRY(body)                                  \
    try {                                              \
        body;                                          \
        return 0;                                      \
    } catch (const std::exception& e) {                \
        g_err = e.what();                              \
        return -1;                                     \
    }

// Full op sequences (tiling -> workspace -> launches), mirroring binding/torch_binding.cpp.
// ub[0] = UB high-water of the main kernel, ub[1] = of the reduce / concat kernel.
int sd_emu_ffn(int chip, int dtype, int mode, uint32_t coreNum, void* x, void* p1, void* p2, void* bias, void* wGate,
               void* wUp, void* wDownT, void* idxIn, void* countIn, uint32_t T, uint32_t d, uint32_t r, uint32_t I,
               uint32_t act, float actParam, float tau, void* y, void* idxOut, void* countOut, void* downOut,
               uint64_t* ub) {
    EMU_TRY({
        sd_emu_set_chip(chip);
        SdFfnTiling t;
        int rc = sd_ffn_tiling(chip, mode, T, d, r, I, 2, coreNum, &t);
        if (rc != SD_OK) throw std::runtime_error("sd_ffn_tiling failed with status " + std::to_string(rc));
        std::vector<uint8_t> ws(t.wsBytes + 64, 0xCD);
        sd_launch_ffn(dtype, t.blockDim, nullptr, x, p1, p2, bias, wGate, wUp, wDownT, idxIn, countIn, ws.data(), T, d,
                      r, I, mode, act, actParam, tau, t.dPad, t.rPad, t.nPerCore, t.nTile, t.p2Rows);
        ub[0] = g_last_ub;
        if (mode == SD_FFN_PREDICT) {
            sd_launch_ffn_concat(t.redBlockDim, nullptr, ws.data(), idxOut, countOut, T, I, t.dPad, t.blockDim, t.nPerCore);
        } else {
            std::vector<int32_t> scratch(T);
            sd_launch_ffn_reduce(dtype, t.redBlockDim, nullptr, ws.data(), y, countOut ? countOut : scratch.data(),
                                 downOut, T, d, t.dPad, t.blockDim, t.redCols);
        }
        ub[1] = g_last_ub;
    })
}

// ffn_predict_q4: main kernel, then sparsedge_ffn_concat over its workspace (dPad = 0: no partial-y region).
int sd_emu_ffn_q4(int chip, int dtype, uint32_t coreNum, void* x, void* q, void* scale, void* thresh, uint32_t T,
                  uint32_t d, uint32_t G, uint32_t I, uint32_t act, float actParam, void* idxOut, void* countOut,
                  uint64_t* ub) {
    EMU_TRY({
        sd_emu_set_chip(chip);
        SdFfnQ4Tiling t;
        int rc = sd_ffn_q4_tiling(chip, T, d, G, I, 2, coreNum, &t);
        if (rc != SD_OK) throw std::runtime_error("sd_ffn_q4_tiling failed with status " + std::to_string(rc));
        std::vector<uint8_t> ws(t.wsBytes + 64, 0xCD);
        sd_launch_ffn_q4(dtype, t.blockDim, nullptr, x, q, scale, thresh, ws.data(), T, d, G, I, act, actParam, t.hPad,
                         t.ngPad, t.nPerCore, t.nTile, t.qRows);
        ub[0] = g_last_ub;
        sd_launch_ffn_concat(t.concatBlockDim, nullptr, ws.data(), idxOut, countOut, T, I, 0, t.blockDim, t.nPerCore);
        ub[1] = g_last_ub;
    })
}

// qsparse_ffn_rows (W8): main kernel, then sparsedge_qffn_reduce. x fp32 [T, d], y fp32 [T, d].
int sd_emu_qffn_rows_q8(int chip, uint32_t coreNum, void* x, void* idx, void* count, void* wGateUp, void* downCodes,
                        void* downScale, uint32_t T, uint32_t d, uint32_t I, uint32_t act, float actParam, void* y,
                        void* downOut, uint64_t* ub) {
    EMU_TRY({
        sd_emu_set_chip(chip);
        SdQffnTiling t;
        int rc = sd_qffn_rows_q8_tiling(chip, T, d, I, coreNum, &t);
        if (rc != SD_OK) throw std::runtime_error("sd_qffn_rows_q8_tiling failed with status " + std::to_string(rc));
        std::vector<uint8_t> ws(t.wsBytes + 64, 0xCD);
        sd_launch_qffn_rows_q8(t.blockDim, nullptr, x, idx, count, wGateUp, downCodes, downScale, ws.data(), T, d, I,
                               act, actParam, t.bPerCore, t.nbxPad, t.nTile, t.nList);
        ub[0] = g_last_ub;
        sd_launch_qffn_reduce(t.redBlockDim, nullptr, ws.data(), y, downOut, T, d, t.blockDim, t.redCols);
        ub[1] = g_last_ub;
    })
}

int sd_emu_delta_encode(int chip, int dtype, uint32_t coreNum, void* k, void* ref, void* theta, void* values,
                        void* chan, void* offsets, uint32_t T, uint32_t H, uint32_t D, uint32_t cap, uint32_t offStride,
                        uint32_t start, int32_t* status, uint64_t* ub) {
    EMU_TRY({
        sd_emu_set_chip(chip);
        SdDeltaEncodeTiling t;
        int rc = sd_delta_encode_tiling(chip, T, H, D, 2, coreNum, &t);
        if (rc != SD_OK) throw std::runtime_error("sd_delta_encode_tiling failed with status " + std::to_string(rc));
        for (int i = 0; i < 8; ++i) status[i] = 0;
        for (uint32_t t0 = 0; t0 < T && status[0] == 0; t0 += t.maxTokens) {
            uint32_t n = std::min(t.maxTokens, T - t0);
            void* kt = static_cast<uint8_t*>(k) + (uint64_t)t0 * H * D * 2;
            sd_launch_delta_encode(dtype, t.blockDim, nullptr, kt, ref, theta, values, chan, offsets, status, n, H, D,
                                   cap, offStride, start + t0, t.dPad, t.maxTokens);
        }
        ub[0] = g_last_ub;
    })
}

int sd_emu_delta_attention(int chip, int dtype, uint32_t coreNum, void* q, void* k, void* vCache, void* values,
                           void* chan, void* offsets, void* sinkK, void* windowK, void* out, uint32_t H, uint32_t Hq,
                           uint32_t D, uint32_t Tmax, uint32_t cap, uint32_t S, uint32_t W, uint32_t start,
                           uint32_t nSink, uint32_t window, float scale, uint64_t* ub) {
    EMU_TRY({
        sd_emu_set_chip(chip);
        SdDeltaAttnTiling t;
        int rc = sd_delta_attn_tiling(chip, H, Hq, D, start + 1, 2, coreNum, &t);
        if (rc != SD_OK) throw std::runtime_error("sd_delta_attn_tiling failed with status " + std::to_string(rc));
        std::vector<uint8_t> ws(t.wsBytes + 64, 0xCD);
        sd_launch_delta_attention(dtype, t.blockDim, nullptr, q, k, vCache, values, chan, offsets, sinkK, windowK, out,
                                  ws.data(), H, t.G, D, Tmax, cap, S, W, start, nSink, window, scale, t.dPad, t.chunk,
                                  t.entTile, t.nPad);
        ub[0] = g_last_ub;
    })
}
}  // extern "C"
