// sparsedge host tiling for the AscendC kernels: pure functions, no CANN types.
//
// Shared by the launch code of the torch_npu binding (ascendc_ops/binding) and by the host-emulation
// test library (ascendc_ops/emulation), so CI checks the very numbers the NPU build would launch with.
// Every function computes: the core split (blockDim), the tile sizes, the exact Unified Buffer bytes
// the kernel's TPipe::InitBuffer calls will reserve (same 32-byte rounding, double buffers counted
// twice), and the GM workspace size. `ub_bytes` is checked against the chip's UB.
//
// The kernels (ascendc_ops/kernels/*.cpp) allocate their buffers from the same tiling fields, in the
// same order; tests assert that the emulated TPipe's high-water mark equals `ub_bytes`.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SdChip { SD_CHIP_310B = 0, SD_CHIP_910B = 1 };
enum SdStatus {
    SD_OK = 0,
    SD_ERR_ARG = 1,        // invalid shape / parameter
    SD_ERR_UB = 2,         // does not fit in the chip's Unified Buffer even at the smallest tile
};

// Unified Buffer per AI core (vector side), from the CANN platform files:
//   Ascend310B (Atlas 200I DK A2 / Orange Pi AIpro = 310B4): 248 KB = 253,952 B
//   Ascend910B (A2):                                           192 KB = 196,608 B
#define SD_UB_310B 253952u
#define SD_UB_910B 196608u
#define SD_BUFFER_NUM 2u        // double buffering for the weight-row / key-row input queues
#define SD_BLOCK 32u            // DataCopy granularity and UB address alignment
#define SD_REPEAT 256u          // one vector repeat
#define SD_WS_ROW_INTS 8u       // per-(token, core) counter record in the workspace: 8 int32 = 32 B

typedef struct {
    uint32_t blockDim;      // cores launched
    uint32_t dPad;          // d rounded up to 16 elements (32 B of fp16/bf16)
    uint32_t rPad;          // r rounded up to 16 elements
    uint32_t nPerCore;      // neurons owned by one core (fused / predict modes), multiple of 64
    uint32_t nTile;         // neurons / active rows per compaction + activation tile, multiple of 64
    uint32_t p2Rows;        // P2 rows fetched per DataCopyPad
    uint32_t ubBytes;       // UB reserved by the kernel's InitBuffer calls
    uint32_t ubLimit;       // the chip's UB
    uint64_t wsBytes;       // GM workspace: partial y [T, blockDim, dPad] fp32 + counters [T, blockDim, 8] int32
                            // (+ index lists [T, blockDim, nPerCore] int32 in predict mode)
    uint32_t redBlockDim;   // cores of the reduce kernel
    uint32_t redCols;       // columns of y per reduce core (multiple of 16)
    uint32_t redUbBytes;
} SdFfnTiling;

typedef struct {
    uint32_t blockDim;      // cores (heads are split across them)
    uint32_t dPad;          // D rounded up to 64 (CompareScalar needs whole 256-B fp32 repeats)
    uint32_t maxTokens;     // tokens per launch (the offsets staging buffer is sized by it)
    uint32_t ubBytes;
    uint32_t ubLimit;
} SdDeltaEncodeTiling;

typedef struct {
    uint32_t blockDim;      // cores (KV heads are split across them)
    uint32_t dPad;          // D rounded up to 16
    uint32_t G;             // query heads per KV head
    uint32_t chunk;         // positions per score / softmax chunk (multiple of 64)
    uint32_t entTile;       // packed delta entries per tile (multiple of 32)
    uint32_t ubBytes;
    uint32_t ubLimit;
    uint64_t wsBytes;       // scores [Hq, nPad] fp32
    uint32_t nPad;
} SdDeltaAttnTiling;

typedef struct {
    uint32_t blockDim;      // cores launched (neurons split like ffn_predict: nPerCore each)
    uint32_t dPad;          // d rounded up to 16 elements (x row in UB)
    uint32_t hPad;          // bytes of one half-row (gate or up, d/2 bytes) in UB, rounded up to 32
    uint32_t ngPad;         // groups per half-row (d/G) rounded up to 8 (32 B of fp32)
    uint32_t nPerCore;      // neurons owned by one core, multiple of 64
    uint32_t nTile;         // neurons per activation + compaction tile, multiple of 64
    uint32_t qRows;         // neurons (q + scale rows) fetched per DataCopyPad
    uint32_t ubBytes;
    uint32_t ubLimit;
    uint64_t wsBytes;       // counters [T, blockDim, 8] int32 + index lists [T, blockDim, nPerCore] int32
    uint32_t concatBlockDim;  // cores of sparsedge_ffn_concat (launched with dPad = 0)
    uint32_t concatUbBytes;
} SdFfnQ4Tiling;

typedef struct {
    uint32_t blockDim;      // cores launched: the I/32 neuron blocks split bPerCore per core
    uint32_t bPerCore;      // 32-neuron blocks owned by one core (its listed neurons' h are rounded per block)
    uint32_t nbxPad;        // x blocks (d/32) rounded up to 8 (32 B of fp32)
    uint32_t nTile;         // neurons per activation / rounding tile, multiple of 64, at most 256
    uint32_t nList;         // idx entries per DataCopyPad, multiple of 8
    uint32_t ubBytes;
    uint32_t ubLimit;
    uint64_t wsBytes;       // partial y [T, blockDim, d] fp32 + counters [T, blockDim, 8] int32
    uint32_t redBlockDim;   // cores of sparsedge_qffn_reduce
    uint32_t redCols;       // columns of y per reduce core (multiple of 8: 32 B of fp32)
    uint32_t redUbBytes;
} SdQffnTiling;

// modes of the FFN kernel
enum SdFfnMode { SD_FFN_FUSED = 0, SD_FFN_ROWS = 1, SD_FFN_PREDICT = 2 };

uint32_t sd_chip_ub_bytes(int chip);
int sd_ffn_tiling(int chip, int mode, uint32_t T, uint32_t d, uint32_t r, uint32_t I, uint32_t elemBytes,
                  uint32_t coreNum, SdFfnTiling* out);
// ffn_predict_q4: G = d / scale.shape[2] must be a multiple of 16 and at most 128 (one WholeReduceSum repeat of
// G/2 fp32 lanes per group); elemBytes is x's (2: fp16 / bf16).
int sd_ffn_q4_tiling(int chip, uint32_t T, uint32_t d, uint32_t G, uint32_t I, uint32_t elemBytes, uint32_t coreNum,
                     SdFfnQ4Tiling* out);
// qsparse_ffn_rows with q8_0 gate/up rows and a q8_0 W_down by neuron (kernels/qffn.cpp); x is fp32 (the binding
// converts). d and I multiples of 32; SD_ERR_UB when the rows of width d do not fit (d above ~4400 on 910B).
int sd_qffn_rows_q8_tiling(int chip, uint32_t T, uint32_t d, uint32_t I, uint32_t coreNum, SdQffnTiling* out);
int sd_delta_encode_tiling(int chip, uint32_t T, uint32_t H, uint32_t D, uint32_t elemBytes, uint32_t coreNum,
                           SdDeltaEncodeTiling* out);
int sd_delta_attn_tiling(int chip, uint32_t H, uint32_t Hq, uint32_t D, uint32_t n, uint32_t elemBytes,
                         uint32_t coreNum, SdDeltaAttnTiling* out);

#ifdef __cplusplus
}  // extern "C"
#endif

// ---------------------------------------------------------------------------------------- inline
#ifdef SPARSEDGE_TILING_IMPL
static inline uint32_t sd_ceil_div(uint32_t a, uint32_t b) { return (a + b - 1u) / b; }
static inline uint32_t sd_align(uint32_t a, uint32_t b) { return sd_ceil_div(a, b) * b; }
static inline uint32_t sd_ub32(uint32_t bytes) { return sd_align(bytes, SD_BLOCK); }
// ReduceSum / ReduceMax shared tmp: one partial per 256-B repeat of fp32 (64 elements), 32-B rounded
static inline uint32_t sd_reduce_tmp_bytes(uint32_t n) { return sd_ub32(sd_ceil_div(n, 64u) * 4u); }

uint32_t sd_chip_ub_bytes(int chip) { return chip == SD_CHIP_910B ? SD_UB_910B : SD_UB_310B; }

// UB bytes of the FFN kernel for given tile sizes; the order mirrors SparseFfnKernel::Init.
static uint32_t sd_ffn_ub(int mode, uint32_t dPad, uint32_t rPad, uint32_t nTile, uint32_t p2Rows, uint32_t e) {
    uint32_t ub = 0;
    ub += sd_ub32(dPad * e);                          // xQue (1 buffer)
    ub += SD_BUFFER_NUM * sd_ub32(dPad * e);          // rowQue (gate/up/down/P1 rows, double buffered)
    ub += sd_ub32(dPad * 4u);                         // xF
    ub += sd_ub32(dPad * 4u);                         // rowF
    ub += sd_ub32(dPad * 4u);                         // yAcc
    ub += sd_reduce_tmp_bytes(dPad > rPad ? dPad : rPad) + SD_BLOCK;  // redTmp + redDst
    ub += SD_BLOCK;                                   // cntQue (1 buffer, 8 int32)
    ub += 6u * sd_ub32(nTile * 4u);                   // score/bias/ramp/active (4) + g/u (2)
    ub += 2u * sd_ub32(nTile * 4u);                   // h, tmp
    ub += sd_ub32(nTile / 8u);                        // compare mask bits
    if (mode != SD_FFN_ROWS) {
        ub += sd_ub32(rPad * 4u);                     // z = P1 x
        ub += SD_BUFFER_NUM * sd_ub32(p2Rows * rPad * e);  // p2Que
        ub += sd_ub32(rPad * 4u);                     // p2F
    }
    return ub;
}

int sd_ffn_tiling(int chip, int mode, uint32_t T, uint32_t d, uint32_t r, uint32_t I, uint32_t e,
                  uint32_t coreNum, SdFfnTiling* out) {
    if (!out || T == 0 || d == 0 || I == 0 || (e != 2u) || coreNum == 0) return SD_ERR_ARG;
    if (mode != SD_FFN_ROWS && r == 0) return SD_ERR_ARG;
    if (mode < 0 || mode > 2) return SD_ERR_ARG;
    SdFfnTiling t = {0};
    t.ubLimit = sd_chip_ub_bytes(chip);
    t.dPad = sd_align(d, 16u);
    t.rPad = mode == SD_FFN_ROWS ? 16u : sd_align(r, 16u);
    if (mode == SD_FFN_ROWS) {
        // the active list is split across cores inside the kernel (counts live on the device)
        t.blockDim = coreNum;
        t.nPerCore = 0;
    } else {
        uint32_t per = sd_align(sd_ceil_div(I, coreNum), 64u);
        t.nPerCore = per;
        t.blockDim = sd_ceil_div(I, per);
    }
    // choose the largest tile that fits: nTile (<= 2048, <= the per-core share) and p2Rows (<= 16)
    uint32_t nMax = mode == SD_FFN_ROWS ? 2048u : (t.nPerCore < 2048u ? t.nPerCore : 2048u);
    uint32_t p2Rows = 16u;
    uint32_t nTile = nMax;
    for (;;) {
        uint32_t ub = sd_ffn_ub(mode, t.dPad, t.rPad, nTile, p2Rows, e);
        if (ub <= t.ubLimit) { t.ubBytes = ub; break; }
        if (p2Rows > 1u) { p2Rows /= 2u; continue; }
        if (nTile > 64u) { nTile -= 64u; continue; }
        return SD_ERR_UB;
    }
    t.nTile = nTile;
    t.p2Rows = p2Rows;
    uint64_t ws = (uint64_t)T * t.blockDim * t.dPad * 4u + (uint64_t)T * t.blockDim * SD_WS_ROW_INTS * 4u;
    if (mode == SD_FFN_PREDICT) ws += (uint64_t)T * t.blockDim * t.nPerCore * 4u;
    t.wsBytes = ws;
    // reduce / concat kernel: columns of y split across cores, multiple of 16 elements (32 B of fp16)
    t.redCols = sd_align(sd_ceil_div(t.dPad, coreNum), 16u);
    t.redBlockDim = sd_ceil_div(t.dPad, t.redCols);
    if (mode == SD_FFN_PREDICT) t.redBlockDim = T < coreNum ? T : coreNum;  // concat: tokens across cores
    // reduce UB: partial queue (double buffered) + acc + out queue + counter rows
    t.redUbBytes = SD_BUFFER_NUM * sd_ub32(t.redCols * 4u) + sd_ub32(t.redCols * 4u) + sd_ub32(t.redCols * e) +
                   sd_ub32(t.blockDim * SD_WS_ROW_INTS * 4u) + sd_ub32(sd_align(T, 8u) * 4u) * 2u;
    if (mode == SD_FFN_PREDICT)
        t.redUbBytes = sd_ub32(t.blockDim * SD_WS_ROW_INTS * 4u) + sd_ub32(t.nPerCore * 4u);
    if (t.redUbBytes > t.ubLimit) return SD_ERR_UB;
    *out = t;
    return SD_OK;
}

// UB bytes of the q4 predictor kernel; the order mirrors FfnPredictQ4Kernel::Init.
static uint32_t sd_ffn_q4_ub(uint32_t dPad, uint32_t hPad, uint32_t ngPad, uint32_t G, uint32_t nTile, uint32_t qRows,
                             uint32_t e) {
    uint32_t ub = 0, h2 = 2u * hPad;
    ub += sd_ub32(dPad * e);                          // xQue (1 buffer)
    ub += sd_ub32(dPad * 4u);                         // xF
    ub += sd_ub32(h2 * 4u);                           // xq in nibble order [lo | hi]
    ub += sd_ub32(h2);                                // nibbles (uint8)
    ub += sd_ub32(h2 * 2u);                           // nibbles as half
    ub += sd_ub32(h2 * 4u);                           // nibbles as fp32 (also |x| / int32 scratch)
    ub += sd_ub32(hPad);                              // 0x0F0F mask (uint16)
    ub += 3u * sd_ub32(2u * ngPad * 4u);              // xs, c = scale * xs, group dots
    ub += sd_reduce_tmp_bytes(G > ngPad ? G : ngPad) + SD_BLOCK;  // redTmp + redDst
    ub += SD_BLOCK;                                   // cntQue
    ub += 8u * sd_ub32(nTile * 4u);                   // score, thresh, ramp, active, g, u, h, tmp
    ub += sd_ub32(nTile / 8u);                        // compare mask bits
    ub += SD_BUFFER_NUM * sd_ub32(qRows * h2);        // qQue (double buffered)
    ub += SD_BUFFER_NUM * sd_ub32(qRows * 2u * ngPad * 4u);  // sQue
    return ub;
}

int sd_ffn_q4_tiling(int chip, uint32_t T, uint32_t d, uint32_t G, uint32_t I, uint32_t e, uint32_t coreNum,
                     SdFfnQ4Tiling* out) {
    if (!out || T == 0 || d == 0 || I == 0 || e != 2u || coreNum == 0) return SD_ERR_ARG;
    if (G == 0 || G % 16u != 0 || G > 128u || d % G != 0) return SD_ERR_ARG;
    SdFfnQ4Tiling t = {0};
    t.ubLimit = sd_chip_ub_bytes(chip);
    t.dPad = sd_align(d, 16u);
    t.hPad = sd_align(d / 2u, SD_BLOCK);
    t.ngPad = sd_align(d / G, 8u);
    uint32_t per = sd_align(sd_ceil_div(I, coreNum), 64u);
    t.nPerCore = per;
    t.blockDim = sd_ceil_div(I, per);
    uint32_t nTile = per < 2048u ? per : 2048u, qRows = 16u;
    for (;;) {
        uint32_t ub = sd_ffn_q4_ub(t.dPad, t.hPad, t.ngPad, G, nTile, qRows, e);
        if (ub <= t.ubLimit) { t.ubBytes = ub; break; }
        if (qRows > 1u) { qRows /= 2u; continue; }
        if (nTile > 64u) { nTile -= 64u; continue; }
        return SD_ERR_UB;
    }
    t.nTile = nTile;
    t.qRows = qRows;
    t.wsBytes = (uint64_t)T * t.blockDim * SD_WS_ROW_INTS * 4u + (uint64_t)T * t.blockDim * t.nPerCore * 4u;
    t.concatBlockDim = T < coreNum ? T : coreNum;
    t.concatUbBytes = sd_ub32(t.blockDim * SD_WS_ROW_INTS * 4u) + sd_ub32(t.nPerCore * 4u);
    if (t.concatUbBytes > t.ubLimit) return SD_ERR_UB;
    *out = t;
    return SD_OK;
}

// UB of the W8 quantized rows kernel; the order mirrors QffnRowsQ8Kernel::Init.
static uint32_t sd_qffn_ub(uint32_t d, uint32_t nbxPad, uint32_t nTile, uint32_t nList) {
    uint32_t ub = 0, red = nbxPad > 64u ? nbxPad : 64u;
    ub += sd_ub32(d * 4u);                            // xq: x rounded to int8 values, held in fp32
    ub += sd_ub32(2u * nbxPad * 4u);                  // dx (gate copy | up copy)
    ub += SD_BUFFER_NUM * sd_ub32(4u * d);            // guQue: gate codes | up codes (d B each) | 2 x d/32 scales (32 B each)
    ub += sd_ub32(2u * d * 2u);                       // codes as half
    ub += sd_ub32(2u * d * 4u);                       // codes as fp32 (also scales, |x|, down rows)
    ub += 2u * sd_ub32(2u * nbxPad * 4u);             // dw -> c = dw * dx, group dots
    ub += sd_reduce_tmp_bytes(red) + SD_BLOCK;        // redTmp + redDst
    ub += 4u * sd_ub32(nTile * 4u);                   // g, u, h, tmp
    ub += sd_ub32(nTile / 8u);                        // mask bits
    ub += sd_ub32(nTile * 4u);                        // the tile's listed neurons
    ub += sd_ub32(nList * 4u);                        // idx chunk
    ub += SD_BUFFER_NUM * sd_ub32(d);                 // downQue: int8 code rows
    ub += sd_ub32(d * 2u);                            // scaleQue: the fp16 scale row of a block of 32 neurons
    ub += sd_ub32(d * 4u);                            // block accumulator (exact integer sums)
    ub += sd_ub32(d * 4u);                            // y accumulator
    ub += SD_BLOCK;                                   // cntQue
    return ub;
}

int sd_qffn_rows_q8_tiling(int chip, uint32_t T, uint32_t d, uint32_t I, uint32_t coreNum, SdQffnTiling* out) {
    if (!out || T == 0 || d == 0 || I == 0 || d % 32u != 0 || I % 32u != 0 || coreNum == 0) return SD_ERR_ARG;
    if (d > 65504u) return SD_ERR_ARG;  // keeps every byte count of a row and of a DataCopyPad block in range
    SdQffnTiling t = {0};
    t.ubLimit = sd_chip_ub_bytes(chip);
    uint32_t nb = I / 32u;
    t.bPerCore = sd_ceil_div(nb, coreNum);
    t.blockDim = sd_ceil_div(nb, t.bPerCore);
    t.nbxPad = sd_align(d / 32u, 8u);
    t.nList = 256u;
    uint32_t nTile = sd_align(t.bPerCore * 32u, 64u);
    if (nTile > 256u) nTile = 256u;
    for (;;) {
        uint32_t ub = sd_qffn_ub(d, t.nbxPad, nTile, t.nList);
        if (ub <= t.ubLimit) { t.ubBytes = ub; break; }
        if (nTile > 64u) { nTile -= 64u; continue; }
        if (t.nList > 8u) { t.nList /= 2u; continue; }
        return SD_ERR_UB;
    }
    t.nTile = nTile;
    t.wsBytes = (uint64_t)T * t.blockDim * d * 4u + (uint64_t)T * t.blockDim * SD_WS_ROW_INTS * 4u;
    t.redCols = sd_align(sd_ceil_div(d, coreNum), 8u);
    t.redBlockDim = sd_ceil_div(d, t.redCols);
    t.redUbBytes = SD_BUFFER_NUM * sd_ub32(t.redCols * 4u) + sd_ub32(t.redCols * 4u) +
                   sd_ub32(t.blockDim * SD_WS_ROW_INTS * 4u) + sd_ub32(sd_align(T, 8u) * 4u);
    if (t.redUbBytes > t.ubLimit) return SD_ERR_UB;
    *out = t;
    return SD_OK;
}

// UB of the delta-encode kernel, mirrors DeltaEncodeKernel::Init
static uint32_t sd_enc_ub(uint32_t dPad, uint32_t maxTokens, uint32_t e) {
    uint32_t ub = 0;
    ub += SD_BUFFER_NUM * sd_ub32(dPad * e);  // kQue
    ub += 5u * sd_ub32(dPad * 4u);            // ref, kF, delta, absd, upd
    ub += sd_ub32(dPad / 8u);                 // mask bits
    ub += 3u * sd_ub32(dPad * 2u);            // dh (stored values, dense), ramp (half), packed values
    ub += sd_ub32(dPad * 2u);                 // packed channels (half)
    ub += sd_ub32(dPad);                      // packed channels (uint8)
    ub += sd_ub32((maxTokens + 1u) * 4u);     // offsets staging
    ub += SD_BLOCK;                           // status record
    return ub;
}

int sd_delta_encode_tiling(int chip, uint32_t T, uint32_t H, uint32_t D, uint32_t e, uint32_t coreNum,
                           SdDeltaEncodeTiling* out) {
    if (!out || T == 0 || H == 0 || D == 0 || D > 256u || e != 2u || coreNum == 0) return SD_ERR_ARG;
    SdDeltaEncodeTiling t = {0};
    t.ubLimit = sd_chip_ub_bytes(chip);
    t.dPad = sd_align(D, 64u);
    t.blockDim = H < coreNum ? H : coreNum;
    uint32_t mt = T < 4096u ? T : 4096u;
    while (sd_enc_ub(t.dPad, mt, e) > t.ubLimit) {
        if (mt <= 8u) return SD_ERR_UB;
        mt /= 2u;
    }
    t.maxTokens = mt;
    t.ubBytes = sd_enc_ub(t.dPad, mt, e);
    *out = t;
    return SD_OK;
}

// UB of the delta-attention decode kernel, mirrors DeltaAttnKernel::Init
static uint32_t sd_attn_ub(uint32_t dPad, uint32_t G, uint32_t chunk, uint32_t ent, uint32_t e) {
    uint32_t ub = 0;
    ub += SD_BUFFER_NUM * sd_ub32(dPad * e);  // rowQue (q, k, v rows)
    ub += sd_ub32(G * dPad * 4u);             // qF (G query heads)
    ub += sd_ub32(dPad * 4u);                 // rowF
    ub += sd_ub32(dPad * 4u);                 // tmp
    ub += sd_ub32(G * dPad * 4u);             // acc (G outputs)
    ub += sd_reduce_tmp_bytes(chunk > dPad ? chunk : dPad) + SD_BLOCK;  // redTmp + redDst
    ub += sd_ub32(G * chunk * 4u);            // score chunk (G rows)
    ub += sd_ub32((chunk + 8u) * 4u);         // offsets chunk (chunk + 1 values)
    ub += SD_BUFFER_NUM * sd_ub32(ent * e);   // entQue values
    ub += SD_BUFFER_NUM * sd_ub32(ent);       // chanQue (uint8)
    ub += sd_ub32(ent * 2u);                  // chan as half
    ub += sd_ub32(ent * 4u);                  // byte offsets (int32 / uint32)
    ub += sd_ub32(ent * 4u);                  // values fp32
    ub += sd_ub32(ent * 4u);                  // gathered q
    ub += sd_ub32(G * ent * 4u);              // products for G heads
    ub += sd_ub32(dPad * e);                  // out row
    return ub;
}

int sd_delta_attn_tiling(int chip, uint32_t H, uint32_t Hq, uint32_t D, uint32_t n, uint32_t e, uint32_t coreNum,
                         SdDeltaAttnTiling* out) {
    if (!out || H == 0 || Hq == 0 || Hq % H != 0 || D == 0 || D > 256u || n == 0 || e != 2u || coreNum == 0)
        return SD_ERR_ARG;
    SdDeltaAttnTiling t = {0};
    t.ubLimit = sd_chip_ub_bytes(chip);
    t.dPad = sd_align(D, 16u);
    t.G = Hq / H;
    t.blockDim = H < coreNum ? H : coreNum;
    uint32_t chunk = 1024u, ent = 4096u;
    while (sd_attn_ub(t.dPad, t.G, chunk, ent, e) > t.ubLimit) {
        if (ent > 256u) { ent /= 2u; continue; }
        if (chunk > 64u) { chunk /= 2u; continue; }
        return SD_ERR_UB;
    }
    t.chunk = chunk;
    t.entTile = ent;
    t.ubBytes = sd_attn_ub(t.dPad, t.G, chunk, ent, e);
    t.nPad = sd_align(n, 64u);
    t.wsBytes = (uint64_t)Hq * t.nPad * 4u;
    *out = t;
    return SD_OK;
}
#endif  // SPARSEDGE_TILING_IMPL
