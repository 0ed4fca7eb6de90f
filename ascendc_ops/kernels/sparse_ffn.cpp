/*
 * sparsedge sparse FFN for decode (AscendC, direct kernel launch).
 *
 * Semantics: sparsedge.ops.ffn (ffn_predict / sparse_ffn_rows / sparse_ffn).  Layouts, all row-major:
 *   x [T, d]   p1 [r, d]   p2 [I, r]   bias [I] fp32 (the binding converts)   w_gate, w_up, w_down_t [I, d]
 *   idx [T, I] int32 (first count[t] valid)   count [T] int32   y [T, d]   down_count [T] int32
 *
 * One kernel class, three modes (SD_FFN_* in sparsedge_tiling.h):
 *   FUSED   : core b owns neurons [b*nPerCore, (b+1)*nPerCore): scores p = P2 (P1 x) + b for its neurons,
 *             CompareScalar(p > 0) + GatherMask over an index ramp -> its active list (ascending), then the
 *             gate/up rows of that list (one DataCopy per row, double-buffered queue), fp32 dot products,
 *             fused activation, GatherMask of h != 0, down accumulation over the surviving rows of W_down^T
 *             into an fp32 UB accumulator; the partial y goes to GM workspace.
 *   ROWS    : same, but the active list is the caller's idx/count; core b takes a contiguous segment.
 *   PREDICT : the compaction only; each core writes its list to the workspace.
 * Plus FfnPredictQ4Kernel (sparsedge_ffn_q4_*, op ffn_predict_q4): the 4-bit gate x up predictor, PREDICT-mode
 * workspace output, fp32 estimates from exact integer group dots (precision note at the class).
 * A second launch does the cross-core reduction through the GM workspace: sparsedge_ffn_reduce_* sums the
 * per-core partials column-slice by column-slice (and the counters), sparsedge_ffn_concat concatenates the
 * per-core index lists in core order (so ids stay ascending).  Two launches instead of SyncAll() keep the
 * kernel portable between 310B (coupled) and 910B (AIV-only launch), with no soft-sync workspace.
 *
 * Precision: weights/activations fp16 (310B, 910B) or bf16 (910B only); every dot product and the y
 * accumulator are fp32 in UB; y is rounded once, at the end.  ffn_predict_q4: x quantized to int8 per group as
 * the reference does, integer group dots exact in fp32, sum_g dot_g * fp32(scale_g * xs_g) in fp32 where the
 * reference uses fp64, so decisions can differ only for neurons within a few fp32 ulps of their threshold.
 */
#include "sparsedge_kernel_common.h"

namespace sparsedge {
enum { MODE_FUSED = 0, MODE_ROWS = 1, MODE_PREDICT = 2 };

struct FfnParams {
    uint32_t T, d, r, I, mode, act;
    float actParam, tau;
    uint32_t dPad, rPad, nPerCore, nTile, p2Rows;
};

template <typename T>
class SparseFfnKernel {
public:
    __aicore__ inline SparseFfnKernel() {}

    __aicore__ inline void Init(GM_ADDR x, GM_ADDR p1, GM_ADDR p2, GM_ADDR bias, GM_ADDR wGate, GM_ADDR wUp,
                                GM_ADDR wDownT, GM_ADDR idx, GM_ADDR count, GM_ADDR ws, const FfnParams& p)
    {
        p_ = p;
        blk_ = GetBlockIdx();
        nBlk_ = GetBlockNum();
        xGm_.SetGlobalBuffer((__gm__ T*)x, (uint64_t)p.T * p.d);
        gateGm_.SetGlobalBuffer((__gm__ T*)wGate, (uint64_t)p.I * p.d);
        upGm_.SetGlobalBuffer((__gm__ T*)wUp, (uint64_t)p.I * p.d);
        downGm_.SetGlobalBuffer((__gm__ T*)wDownT, (uint64_t)p.I * p.d);
        if (p.mode != MODE_ROWS) {
            p1Gm_.SetGlobalBuffer((__gm__ T*)p1, (uint64_t)p.r * p.d);
            p2Gm_.SetGlobalBuffer((__gm__ T*)p2, (uint64_t)p.I * p.r);
            biasGm_.SetGlobalBuffer((__gm__ float*)bias, p.I);
        } else {
            idxGm_.SetGlobalBuffer((__gm__ int32_t*)idx, (uint64_t)p.T * p.I);
            countGm_.SetGlobalBuffer((__gm__ int32_t*)count, p.T);
        }
        uint64_t yWs = (uint64_t)p.T * nBlk_ * p.dPad;
        uint64_t cWs = (uint64_t)p.T * nBlk_ * WS_ROW_INTS;
        wsY_.SetGlobalBuffer((__gm__ float*)ws, yWs);
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float)), cWs);
        if (p.mode == MODE_PREDICT)
            wsIdx_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float) + cWs * sizeof(int32_t)),
                                   (uint64_t)p.T * nBlk_ * p.nPerCore);

        // UB plan: must match sd_ffn_ub() in sparsedge_tiling.h
        uint32_t maxRed = p.dPad > p.rPad ? p.dPad : p.rPad;
        pipe_.InitBuffer(xQue_, 1, p.dPad * sizeof(T));
        pipe_.InitBuffer(rowQue_, BUFFER_NUM, p.dPad * sizeof(T));
        pipe_.InitBuffer(xFBuf_, p.dPad * sizeof(float));
        pipe_.InitBuffer(rowFBuf_, p.dPad * sizeof(float));
        pipe_.InitBuffer(yAccBuf_, p.dPad * sizeof(float));
        pipe_.InitBuffer(redTmpBuf_, (maxRed + 63) / 64 * sizeof(float));
        pipe_.InitBuffer(redDstBuf_, 32);
        pipe_.InitBuffer(cntQue_, 1, WS_ROW_INTS * sizeof(int32_t));
        pipe_.InitBuffer(scoreBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(biasBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(rampBuf_, p.nTile * sizeof(int32_t));
        pipe_.InitBuffer(activeBuf_, p.nTile * sizeof(int32_t));
        pipe_.InitBuffer(gBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(uBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(hBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(tmpBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(maskBuf_, p.nTile / 8);
        if (p.mode != MODE_ROWS) {
            pipe_.InitBuffer(zBuf_, p.rPad * sizeof(float));
            pipe_.InitBuffer(p2Que_, BUFFER_NUM, p.p2Rows * p.rPad * sizeof(T));
            pipe_.InitBuffer(p2FBuf_, p.rPad * sizeof(float));
        }
    }

    __aicore__ inline void Process()
    {
        for (uint32_t t = 0; t < p_.T; ++t) {
            nAct_ = 0;
            nDown_ = 0;
            LoadX(t);
            LocalTensor<float> yAcc = yAccBuf_.Get<float>();
            Duplicate(yAcc, 0.0f, (int32_t)p_.dPad);
            if (p_.mode == MODE_ROWS) {
                ProcessGivenList(t);
            } else {
                ComputeZ();
                uint32_t n0 = blk_ * p_.nPerCore;
                uint32_t n1 = Min(p_.I, n0 + p_.nPerCore);
                for (uint32_t s0 = n0; s0 < n1; s0 += p_.nTile) {
                    uint32_t len = Min(p_.nTile, n1 - s0);
                    uint32_t nAct = PredictTile(s0, len);
                    if (p_.mode == MODE_PREDICT) {
                        if (nAct > 0) {
                            LocalTensor<int32_t> active = activeBuf_.Get<int32_t>();
                            uint64_t off = ((uint64_t)t * nBlk_ + blk_) * p_.nPerCore + nAct_;
                            DataCopyPad(wsIdx_[off], active, DataCopyExtParams(1, nAct * sizeof(int32_t), 0, 0, 0));
                        }
                        nAct_ += nAct;
                    } else {
                        nAct_ += nAct;
                        if (nAct > 0) ProcessActive(nAct);
                    }
                }
            }
            StoreTokenResult(t);
        }
    }

private:
    // ---- token input: x row -> fp32
    __aicore__ inline void LoadX(uint32_t t)
    {
        LocalTensor<T> xIn = xQue_.AllocTensor<T>();
        DataCopyPad(xIn, xGm_[(uint64_t)t * p_.d], DataCopyExtParams(1, p_.d * sizeof(T), 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        xQue_.EnQue(xIn);
        xIn = xQue_.DeQue<T>();
        LocalTensor<float> xF = xFBuf_.Get<float>();
        Cast(xF, xIn, RoundMode::CAST_NONE, p_.d);
        xQue_.FreeTensor(xIn);
    }

    // ---- one weight row GM -> UB through the double-buffered queue
    __aicore__ inline void CopyInRow(const GlobalTensor<T>& w, uint32_t row)
    {
        LocalTensor<T> r = rowQue_.AllocTensor<T>();
        if ((p_.d * sizeof(T)) % 32 == 0) {
            DataCopy(r, w[(uint64_t)row * p_.d], p_.d);
        } else {
            DataCopyPad(r, w[(uint64_t)row * p_.d], DataCopyExtParams(1, p_.d * sizeof(T), 0, 0, 0),
                        DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        }
        rowQue_.EnQue(r);
    }

    // dequeue the next row, fp32 dot with vecF over n lanes
    __aicore__ inline float DotNextRow(const LocalTensor<float>& vecF, uint32_t n)
    {
        LocalTensor<T> r = rowQue_.DeQue<T>();
        LocalTensor<float> rowF = rowFBuf_.Get<float>();
        Cast(rowF, r, RoundMode::CAST_NONE, n);
        rowQue_.FreeTensor(r);
        return DotF(rowF, vecF, n);
    }

    __aicore__ inline float DotF(const LocalTensor<float>& a, const LocalTensor<float>& b, uint32_t n)
    {
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> tmp = redTmpBuf_.Get<float>();
        Mul(a, a, b, n);
        PipeBarrier<PIPE_V>();
        ReduceSum(red, a, tmp, (int32_t)n);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        return red.GetValue(0);
    }

    // ---- predictor: z = P1 x (r rows of length d)
    __aicore__ inline void ComputeZ()
    {
        LocalTensor<float> z = zBuf_.Get<float>();
        LocalTensor<float> xF = xFBuf_.Get<float>();
        Duplicate(z, 0.0f, (int32_t)p_.rPad);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        if (p_.r > 0) CopyInRow(p1Gm_, 0);
        for (uint32_t j = 0; j < p_.r; ++j) {
            if (j + 1 < p_.r) CopyInRow(p1Gm_, j + 1);  // prefetch: two rows in flight
            z.SetValue(j, DotNextRow(xF, p_.d));
        }
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
    }

    // ---- scores of neurons [s0, s0+len), compaction of p > 0 into activeBuf_ (ascending ids)
    __aicore__ inline uint32_t PredictTile(uint32_t s0, uint32_t len)
    {
        LocalTensor<float> score = scoreBuf_.Get<float>();
        LocalTensor<float> z = zBuf_.Get<float>();
        LocalTensor<float> p2F = p2FBuf_.Get<float>();
        Duplicate(score, -1.0f, (int32_t)p_.nTile);  // pad lanes stay inactive
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        const uint32_t rowBytes = p_.r * sizeof(T);  // each row lands 32-B aligned: stride rPad elements
        uint32_t nGroups = (len + p_.p2Rows - 1) / p_.p2Rows;
        if (nGroups > 0) CopyInP2(s0, Min(p_.p2Rows, len), rowBytes);
        for (uint32_t gi = 0; gi < nGroups; ++gi) {
            uint32_t g0 = gi * p_.p2Rows;
            uint32_t rows = Min(p_.p2Rows, len - g0);
            if (gi + 1 < nGroups) {
                uint32_t n0 = g0 + p_.p2Rows;
                CopyInP2(s0 + n0, Min(p_.p2Rows, len - n0), rowBytes);
            }
            LocalTensor<T> blk = p2Que_.DeQue<T>();
            for (uint32_t i = 0; i < rows; ++i) {
                Cast(p2F, blk[i * p_.rPad], RoundMode::CAST_NONE, p_.r);
                PipeBarrier<PIPE_V>();
                score.SetValue(g0 + i, DotF(p2F, z, p_.r));
            }
            p2Que_.FreeTensor(blk);
        }
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        LocalTensor<float> bias = biasBuf_.Get<float>();
        DataCopyPad(bias, biasGm_[s0], DataCopyExtParams(1, len * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        SetFlag<HardEvent::MTE2_V>(0);
        WaitFlag<HardEvent::MTE2_V>(0);
        Add(score, score, bias, len);
        PipeBarrier<PIPE_V>();
        return Compact(score, (int32_t)s0);
    }

    __aicore__ inline void CopyInP2(uint32_t row0, uint32_t rows, uint32_t rowBytes)
    {
        LocalTensor<T> blk = p2Que_.AllocTensor<T>();
        DataCopyPad(blk, p2Gm_[(uint64_t)row0 * p_.r], DataCopyExtParams((uint16_t)rows, rowBytes, 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        p2Que_.EnQue(blk);
    }

    // active = { s0 + i : score[i] > 0 } over the nTile lanes
    __aicore__ inline uint32_t Compact(const LocalTensor<float>& score, int32_t s0)
    {
        LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
        LocalTensor<int32_t> ramp = rampBuf_.Get<int32_t>();
        LocalTensor<int32_t> active = activeBuf_.Get<int32_t>();
        CompareScalar(mask, score, 0.0f, CMPMODE::GT, p_.nTile);
        CreateVecIndex(ramp, s0, p_.nTile);
        PipeBarrier<PIPE_V>();
        uint64_t cnt = 0;
        GatherMask(active, ramp, mask.ReinterpretCast<uint32_t>(), true, p_.nTile, GatherMaskParams(1, 1, 8, 8), cnt);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        return (uint32_t)cnt;
    }

    // ---- ROWS mode: this core's contiguous segment of idx[t, :count[t]]
    __aicore__ inline void ProcessGivenList(uint32_t t)
    {
        uint32_t cnt = (uint32_t)countGm_.GetValue(t);
        nAct_ = 0;  // counted once, by core 0, below
        if (blk_ == 0) nAct_ = cnt;
        uint32_t seg = (cnt + nBlk_ - 1) / nBlk_;
        uint32_t k0 = blk_ * seg;
        uint32_t k1 = Min(cnt, k0 + seg);
        LocalTensor<int32_t> active = activeBuf_.Get<int32_t>();
        for (uint32_t k = k0; k < k1; k += p_.nTile) {
            uint32_t len = Min(p_.nTile, k1 - k);
            DataCopyPad(active, idxGm_[(uint64_t)t * p_.I + k], DataCopyExtParams(1, len * sizeof(int32_t), 0, 0, 0),
                        DataCopyPadExtParams<int32_t>(false, 0, 0, 0));
            SetFlag<HardEvent::MTE2_S>(0);
            WaitFlag<HardEvent::MTE2_S>(0);
            ProcessActive(len);
        }
    }

    // ---- gate/up rows of the n active neurons, activation, down accumulation over h != 0
    __aicore__ inline void ProcessActive(uint32_t n)
    {
        LocalTensor<int32_t> active = activeBuf_.Get<int32_t>();
        LocalTensor<float> g = gBuf_.Get<float>();
        LocalTensor<float> u = uBuf_.Get<float>();
        LocalTensor<float> h = hBuf_.Get<float>();
        LocalTensor<float> xF = xFBuf_.Get<float>();
        Duplicate(g, 0.0f, (int32_t)p_.nTile);
        Duplicate(u, 0.0f, (int32_t)p_.nTile);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        // row stream: gate(a0), up(a0), gate(a1), up(a1), ... with one row prefetched
        uint32_t nRows = 2 * n;
        CopyInRow(gateGm_, (uint32_t)active.GetValue(0));
        for (uint32_t k = 0; k < nRows; ++k) {
            uint32_t nk = k + 1;
            if (nk < nRows) CopyInRow((nk & 1) ? upGm_ : gateGm_, (uint32_t)active.GetValue(nk >> 1));
            float v = DotNextRow(xF, p_.d);
            if (k & 1) u.SetValue(k >> 1, v); else g.SetValue(k >> 1, v);
        }
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        Activate(g, u, h);
        // survivors: h != 0  ->  (ids, h) packed with GatherMask
        LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
        LocalTensor<int32_t> nzIdx = rampBuf_.Get<int32_t>();
        LocalTensor<float> nzH = scoreBuf_.Get<float>();
        CompareScalar(mask, h, 0.0f, CMPMODE::NE, p_.nTile);
        PipeBarrier<PIPE_V>();
        uint64_t nNz = 0;
        GatherMask(nzH, h, mask.ReinterpretCast<uint32_t>(), true, n, GatherMaskParams(1, 1, 8, 8), nNz);
        GatherMask(nzIdx, active, mask.ReinterpretCast<uint32_t>(), true, n, GatherMaskParams(1, 1, 8, 8), nNz);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        nDown_ += (uint32_t)nNz;
        if (nNz == 0) return;
        LocalTensor<float> yAcc = yAccBuf_.Get<float>();
        LocalTensor<float> rowF = rowFBuf_.Get<float>();
        CopyInRow(downGm_, (uint32_t)nzIdx.GetValue(0));
        for (uint32_t k = 0; k < (uint32_t)nNz; ++k) {
            if (k + 1 < (uint32_t)nNz) CopyInRow(downGm_, (uint32_t)nzIdx.GetValue(k + 1));
            float hk = nzH.GetValue(k);
            LocalTensor<T> r = rowQue_.DeQue<T>();
            Cast(rowF, r, RoundMode::CAST_NONE, p_.d);
            rowQue_.FreeTensor(r);
            PipeBarrier<PIPE_V>();
            Axpy(yAcc, rowF, hk, p_.d);  // y += h_k * W_down^T[id_k, :]  (fp32)
            PipeBarrier<PIPE_V>();
        }
    }

    // ---- h = act(g) * u over the nTile lanes (pad lanes are g = u = 0 -> h = 0)
    __aicore__ inline void Activate(const LocalTensor<float>& g, const LocalTensor<float>& u, const LocalTensor<float>& h)
    {
        ActivateLanes(g, u, h, tmpBuf_.Get<float>(), maskBuf_.Get<uint8_t>(), p_.nTile, p_.act, p_.actParam, p_.tau);
    }

    __aicore__ inline void StoreTokenResult(uint32_t t)
    {
        uint64_t rec = (uint64_t)t * nBlk_ + blk_;
        if (p_.mode != MODE_PREDICT) {
            LocalTensor<float> yAcc = yAccBuf_.Get<float>();
            SetFlag<HardEvent::V_MTE3>(0);
            WaitFlag<HardEvent::V_MTE3>(0);
            DataCopy(wsY_[rec * p_.dPad], yAcc, p_.dPad);
        }
        StoreCounts(cntQue_, wsCnt_, rec, (int32_t)nAct_, (int32_t)nDown_);
    }

    FfnParams p_;
    uint32_t blk_ = 0, nBlk_ = 1, nAct_ = 0, nDown_ = 0;
    TPipe pipe_;
    TQue<QuePosition::VECIN, 1> xQue_;
    TQue<QuePosition::VECIN, BUFFER_NUM> rowQue_;
    TQue<QuePosition::VECIN, BUFFER_NUM> p2Que_;
    TQue<QuePosition::VECOUT, 1> cntQue_;
    TBuf<QuePosition::VECCALC> xFBuf_, rowFBuf_, yAccBuf_, redTmpBuf_, redDstBuf_, scoreBuf_, biasBuf_, rampBuf_,
        activeBuf_, gBuf_, uBuf_, hBuf_, tmpBuf_, maskBuf_, zBuf_, p2FBuf_;
    GlobalTensor<T> xGm_, p1Gm_, p2Gm_, gateGm_, upGm_, downGm_;
    GlobalTensor<float> biasGm_, wsY_;
    GlobalTensor<int32_t> idxGm_, countGm_, wsCnt_, wsIdx_;
};

// ---- cross-core reduction: y[t, cols] = sum_b partial[t, b, cols]; counters summed by core 0
template <typename T>
class FfnReduceKernel {
public:
    __aicore__ inline void Init(GM_ADDR ws, GM_ADDR y, GM_ADDR count, GM_ADDR downCount, uint32_t T_, uint32_t d,
                                uint32_t dPad, uint32_t mainBlocks, uint32_t cols)
    {
        T_n = T_; d_ = d; dPad_ = dPad; B_ = mainBlocks; cols_ = cols;
        uint64_t yWs = (uint64_t)T_ * mainBlocks * dPad;
        wsY_.SetGlobalBuffer((__gm__ float*)ws, yWs);
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float)), (uint64_t)T_ * mainBlocks * WS_ROW_INTS);
        yGm_.SetGlobalBuffer((__gm__ T*)y, (uint64_t)T_ * d);
        countGm_.SetGlobalBuffer((__gm__ int32_t*)count, T_);
        downGm_.SetGlobalBuffer((__gm__ int32_t*)downCount, T_);
        pipe_.InitBuffer(partQue_, BUFFER_NUM, cols * sizeof(float));
        pipe_.InitBuffer(accBuf_, cols * sizeof(float));
        pipe_.InitBuffer(outQue_, 1, cols * sizeof(T));
        pipe_.InitBuffer(cntBuf_, mainBlocks * WS_ROW_INTS * sizeof(int32_t));
        pipe_.InitBuffer(countBuf_, Align(T_, 8) * sizeof(int32_t));
        pipe_.InitBuffer(downBuf_, Align(T_, 8) * sizeof(int32_t));
    }

    __aicore__ inline void Process()
    {
        uint32_t c0 = GetBlockIdx() * cols_;
        if (c0 < dPad_) {
            uint32_t n = Min(cols_, dPad_ - c0);  // multiple of 16
            LocalTensor<float> acc = accBuf_.Get<float>();
            for (uint32_t t = 0; t < T_n; ++t) {
                SumParts(acc, partQue_, wsY_, t, B_, dPad_, c0, n);
                LocalTensor<T> out = outQue_.AllocTensor<T>();
                Cast(out, acc, RoundMode::CAST_RINT, n);
                outQue_.EnQue(out);
                out = outQue_.DeQue<T>();
                if (c0 < d_) {
                    uint32_t m = Min(n, d_ - c0);
                    DataCopyPad(yGm_[(uint64_t)t * d_ + c0], out, DataCopyExtParams(1, m * sizeof(T), 0, 0, 0));
                }
                outQue_.FreeTensor(out);
            }
        }
        if (GetBlockIdx() == 0) {
            LocalTensor<int32_t> cnt = cntBuf_.Get<int32_t>();
            LocalTensor<int32_t> cOut = countBuf_.Get<int32_t>();
            LocalTensor<int32_t> dOut = downBuf_.Get<int32_t>();
            for (uint32_t t = 0; t < T_n; ++t) {
                int32_t a = 0, dn = 0;
                SumCounts(cnt, wsCnt_, t, B_, a, dn);
                cOut.SetValue(t, a);
                dOut.SetValue(t, dn);
            }
            SetFlag<HardEvent::S_MTE3>(0);
            WaitFlag<HardEvent::S_MTE3>(0);
            DataCopyPad(countGm_, cOut, DataCopyExtParams(1, T_n * sizeof(int32_t), 0, 0, 0));
            DataCopyPad(downGm_, dOut, DataCopyExtParams(1, T_n * sizeof(int32_t), 0, 0, 0));
        }
    }

private:
    uint32_t T_n, d_, dPad_, B_, cols_;
    TPipe pipe_;
    TQue<QuePosition::VECIN, BUFFER_NUM> partQue_;
    TQue<QuePosition::VECOUT, 1> outQue_;
    TBuf<QuePosition::VECCALC> accBuf_, cntBuf_, countBuf_, downBuf_;
    GlobalTensor<float> wsY_;
    GlobalTensor<int32_t> wsCnt_, countGm_, downGm_;
    GlobalTensor<T> yGm_;
};

// ---- PREDICT mode: concatenate the per-core lists of token t (core order = ascending ids)
class FfnConcatKernel {
public:
    __aicore__ inline void Init(GM_ADDR ws, GM_ADDR idx, GM_ADDR count, uint32_t T_, uint32_t I, uint32_t dPad,
                                uint32_t mainBlocks, uint32_t nPerCore)
    {
        T_n = T_; I_ = I; B_ = mainBlocks; nPer_ = nPerCore;
        uint64_t yWs = (uint64_t)T_ * mainBlocks * dPad;
        uint64_t cWs = (uint64_t)T_ * mainBlocks * WS_ROW_INTS;
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float)), cWs);
        wsIdx_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float) + cWs * sizeof(int32_t)),
                               (uint64_t)T_ * mainBlocks * nPerCore);
        idxGm_.SetGlobalBuffer((__gm__ int32_t*)idx, (uint64_t)T_ * I);
        countGm_.SetGlobalBuffer((__gm__ int32_t*)count, T_);
        pipe_.InitBuffer(cntBuf_, mainBlocks * WS_ROW_INTS * sizeof(int32_t));
        pipe_.InitBuffer(listBuf_, nPerCore * sizeof(int32_t));
    }
    __aicore__ inline void Process()
    {
        LocalTensor<int32_t> cnt = cntBuf_.Get<int32_t>();
        LocalTensor<int32_t> list = listBuf_.Get<int32_t>();
        for (uint32_t t = GetBlockIdx(); t < T_n; t += GetBlockNum()) {
            DataCopy(cnt, wsCnt_[(uint64_t)t * B_ * WS_ROW_INTS], B_ * WS_ROW_INTS);
            SetFlag<HardEvent::MTE2_S>(0);
            WaitFlag<HardEvent::MTE2_S>(0);
            uint32_t off = 0;
            for (uint32_t b = 0; b < B_; ++b) {
                uint32_t n = (uint32_t)cnt.GetValue(b * WS_ROW_INTS);
                if (n == 0) continue;
                DataCopyPad(list, wsIdx_[((uint64_t)t * B_ + b) * nPer_], DataCopyExtParams(1, n * sizeof(int32_t), 0, 0, 0),
                            DataCopyPadExtParams<int32_t>(false, 0, 0, 0));
                SetFlag<HardEvent::MTE2_MTE3>(0);
                WaitFlag<HardEvent::MTE2_MTE3>(0);
                DataCopyPad(idxGm_[(uint64_t)t * I_ + off], list, DataCopyExtParams(1, n * sizeof(int32_t), 0, 0, 0));
                SetFlag<HardEvent::MTE3_MTE2>(0);
                WaitFlag<HardEvent::MTE3_MTE2>(0);
                off += n;
            }
            SetFlag<HardEvent::MTE3_S>(0);
            WaitFlag<HardEvent::MTE3_S>(0);
            cnt.SetValue(0, (int32_t)off);
            SetFlag<HardEvent::S_MTE3>(0);
            WaitFlag<HardEvent::S_MTE3>(0);
            DataCopyPad(countGm_[t], cnt, DataCopyExtParams(1, sizeof(int32_t), 0, 0, 0));
            SetFlag<HardEvent::MTE3_MTE2>(0);
            WaitFlag<HardEvent::MTE3_MTE2>(0);
        }
    }

private:
    uint32_t T_n, I_, B_, nPer_;
    TPipe pipe_;
    TBuf<QuePosition::VECCALC> cntBuf_, listBuf_;
    GlobalTensor<int32_t> wsCnt_, wsIdx_, idxGm_, countGm_;
};

// ---- ffn_predict_q4: 4-bit gate x up predictor (sparsedge.ops.ffn.ffn_predict_q4 / q4_estimates).
// Core b owns neurons [b*nPerCore, (b+1)*nPerCore) like PREDICT mode and writes its ascending active list and count
// to the same GM workspace records, so sparsedge_ffn_concat (launched with dPad = 0) assembles idx / count.
// Per token: x -> fp32, per group of G: amax (ReduceMax), inv = 127 / amax and xs = amax / 127 (scalar, IEEE
// division), xq = rint(x * inv) (Muls, Cast f32->s32 CAST_RINT, Cast s32->f32), rearranged into nibble order
// [x_lo | x_hi] (byte j of a group holds input j in its low nibble and j + G/2 in its high nibble).
// Per neuron and half (gate, up): And / ShiftRight / And on the uint16 view split the d/2 bytes into the low and the
// high nibbles, Cast u8->half, Adds -8, Cast half->fp32, Mul by xq, lo + hi, WholeReduceSum per group (G/2 lanes a
// repeat) -> the integer group dots, exact in fp32 (|dot| <= 8 * 127 * G < 2^24); then est = sum_g dot_g * c_g with
// c_g = fp32(scale_g * xs_g) exactly as the reference, but the products and the sum in fp32 (ReduceSum) where the
// reference uses fp64: the NPU has no fp64. score = |act(g^) * u^| (ActivateLanes), active iff score - thresh > 0.
// Decisions can therefore differ from the reference only where |score - thresh| is within a few fp32 ulps of the
// estimates' magnitude (the emulation test checks exactly that).
struct Q4Params {
    uint32_t T, d, G, I, act;
    float actParam;
    uint32_t hPad, ngPad, nPerCore, nTile, qRows;
};

__aicore__ inline uint32_t CompactLanes(const LocalTensor<float>& score, const LocalTensor<uint8_t>& mask,
                                        const LocalTensor<int32_t>& ramp, const LocalTensor<int32_t>& active,
                                        int32_t s0, uint32_t n)
{
    CompareScalar(mask, score, 0.0f, CMPMODE::GT, n);
    CreateVecIndex(ramp, s0, n);
    PipeBarrier<PIPE_V>();
    uint64_t cnt = 0;
    GatherMask(active, ramp, mask.ReinterpretCast<uint32_t>(), true, n, GatherMaskParams(1, 1, 8, 8), cnt);
    SetFlag<HardEvent::V_S>(0);
    WaitFlag<HardEvent::V_S>(0);
    return (uint32_t)cnt;
}

template <typename T>
class FfnPredictQ4Kernel {
public:
    __aicore__ inline FfnPredictQ4Kernel() {}

    __aicore__ inline void Init(GM_ADDR x, GM_ADDR q, GM_ADDR scale, GM_ADDR thresh, GM_ADDR ws, const Q4Params& p)
    {
        p_ = p;
        blk_ = GetBlockIdx();
        nBlk_ = GetBlockNum();
        ng_ = p.d / p.G;
        S_ = p.G / 2;
        dPad_ = Align(p.d, 16);
        xGm_.SetGlobalBuffer((__gm__ T*)x, (uint64_t)p.T * p.d);
        qGm_.SetGlobalBuffer((__gm__ uint8_t*)q, (uint64_t)p.I * p.d);
        sGm_.SetGlobalBuffer((__gm__ float*)scale, (uint64_t)p.I * 2 * ng_);
        thrGm_.SetGlobalBuffer((__gm__ float*)thresh, p.I);
        uint64_t cWs = (uint64_t)p.T * nBlk_ * WS_ROW_INTS;
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)ws, cWs);
        wsIdx_.SetGlobalBuffer((__gm__ int32_t*)(ws + cWs * sizeof(int32_t)), (uint64_t)p.T * nBlk_ * p.nPerCore);

        // UB plan: must match sd_ffn_q4_ub() in sparsedge_tiling.h
        const uint32_t h2 = 2 * p.hPad, redN = p.G > p.ngPad ? p.G : p.ngPad;
        pipe_.InitBuffer(xQue_, 1, dPad_ * sizeof(T));
        pipe_.InitBuffer(xFBuf_, dPad_ * sizeof(float));
        pipe_.InitBuffer(xqBuf_, h2 * sizeof(float));
        pipe_.InitBuffer(nibBuf_, h2);
        pipe_.InitBuffer(nibHBuf_, h2 * sizeof(half));
        pipe_.InitBuffer(nibFBuf_, h2 * sizeof(float));
        pipe_.InitBuffer(m16Buf_, p.hPad);
        pipe_.InitBuffer(xsBuf_, 2 * p.ngPad * sizeof(float));
        pipe_.InitBuffer(cBuf_, 2 * p.ngPad * sizeof(float));
        pipe_.InitBuffer(dotBuf_, 2 * p.ngPad * sizeof(float));
        pipe_.InitBuffer(redTmpBuf_, (redN + 63) / 64 * sizeof(float));
        pipe_.InitBuffer(redDstBuf_, 32);
        pipe_.InitBuffer(cntQue_, 1, WS_ROW_INTS * sizeof(int32_t));
        pipe_.InitBuffer(scoreBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(thrBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(rampBuf_, p.nTile * sizeof(int32_t));
        pipe_.InitBuffer(activeBuf_, p.nTile * sizeof(int32_t));
        pipe_.InitBuffer(gBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(uBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(hBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(tmpBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(maskBuf_, p.nTile / 8);
        pipe_.InitBuffer(qQue_, BUFFER_NUM, p.qRows * h2);
        pipe_.InitBuffer(sQue_, BUFFER_NUM, p.qRows * 2 * p.ngPad * sizeof(float));

        Duplicate(m16Buf_.Get<uint16_t>(), (uint16_t)0x0F0F, (int32_t)(p.hPad / 2));
        Duplicate(dotBuf_.Get<float>(), 0.0f, (int32_t)(2 * p.ngPad));
        PipeBarrier<PIPE_V>();
    }

    __aicore__ inline void Process()
    {
        const uint32_t n0 = blk_ * p_.nPerCore;
        const uint32_t n1 = Min(p_.I, n0 + p_.nPerCore);
        for (uint32_t t = 0; t < p_.T; ++t) {
            QuantizeX(t);
            uint32_t nAct = 0;
            for (uint32_t s0 = n0; s0 < n1; s0 += p_.nTile) {
                uint32_t len = Min(p_.nTile, n1 - s0);
                uint32_t k = PredictTile(s0, len);
                if (k > 0) {
                    LocalTensor<int32_t> active = activeBuf_.Get<int32_t>();
                    uint64_t off = ((uint64_t)t * nBlk_ + blk_) * p_.nPerCore + nAct;
                    DataCopyPad(wsIdx_[off], active, DataCopyExtParams(1, k * sizeof(int32_t), 0, 0, 0));
                    SetFlag<HardEvent::MTE3_V>(0);
                    WaitFlag<HardEvent::MTE3_V>(0);
                }
                nAct += k;
            }
            LocalTensor<int32_t> c = cntQue_.AllocTensor<int32_t>();
            for (uint32_t i = 0; i < WS_ROW_INTS; ++i) c.SetValue(i, 0);
            c.SetValue(0, (int32_t)nAct);
            cntQue_.EnQue(c);
            c = cntQue_.DeQue<int32_t>();
            DataCopy(wsCnt_[((uint64_t)t * nBlk_ + blk_) * WS_ROW_INTS], c, WS_ROW_INTS);
            cntQue_.FreeTensor(c);
            SetFlag<HardEvent::MTE3_V>(0);
            WaitFlag<HardEvent::MTE3_V>(0);
        }
    }

private:
    // x row -> per-group int8 values (held exactly in fp32) in nibble order, and xs per group (gate and up copies)
    __aicore__ inline void QuantizeX(uint32_t t)
    {
        LocalTensor<T> xIn = xQue_.AllocTensor<T>();
        DataCopyPad(xIn, xGm_[(uint64_t)t * p_.d], DataCopyExtParams(1, p_.d * sizeof(T), 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        xQue_.EnQue(xIn);
        xIn = xQue_.DeQue<T>();
        LocalTensor<float> xF = xFBuf_.Get<float>();
        LocalTensor<float> absX = nibFBuf_.Get<float>();  // scratch: |x|, then the int32 cast
        LocalTensor<float> xs = xsBuf_.Get<float>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> tmp = redTmpBuf_.Get<float>();
        Cast(xF, xIn, RoundMode::CAST_NONE, p_.d);
        xQue_.FreeTensor(xIn);
        PipeBarrier<PIPE_V>();
        Duplicate(xs, 0.0f, (int32_t)(2 * p_.ngPad));
        QuantizeGroups(xF, absX, nibFBuf_.Get<int32_t>(), xs, red, tmp, p_.d, ng_, p_.G, p_.ngPad);
        LocalTensor<float> xq = xqBuf_.Get<float>();
        Duplicate(xq, 0.0f, (int32_t)(2 * p_.hPad));  // pad lanes multiply the pad nibbles by 0
        PipeBarrier<PIPE_V>();
        for (uint32_t g = 0; g < ng_; ++g) {
            DataCopy(xq[g * S_], xF[g * p_.G], S_);                 // inputs j      (low nibbles)
            DataCopy(xq[p_.hPad + g * S_], xF[g * p_.G + S_], S_);  // inputs j + G/2 (high nibbles)
        }
        PipeBarrier<PIPE_V>();
    }

    __aicore__ inline void CopyInRows(uint32_t row0, uint32_t rows)
    {
        LocalTensor<uint8_t> qb = qQue_.AllocTensor<uint8_t>();
        // 2*rows half-rows of d/2 bytes (gate, up, gate, ...), each landing 32-B aligned (stride hPad)
        DataCopyPad(qb, qGm_[(uint64_t)row0 * p_.d], DataCopyExtParams((uint16_t)(2 * rows), p_.d / 2, 0, 0, 0),
                    DataCopyPadExtParams<uint8_t>(false, 0, 0, 0));
        qQue_.EnQue(qb);
        LocalTensor<float> sb = sQue_.AllocTensor<float>();
        DataCopyPad(sb, sGm_[(uint64_t)row0 * 2 * ng_], DataCopyExtParams((uint16_t)(2 * rows), ng_ * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        sQue_.EnQue(sb);
    }

    __aicore__ inline uint32_t PredictTile(uint32_t s0, uint32_t len)
    {
        LocalTensor<float> g = gBuf_.Get<float>();
        LocalTensor<float> u = uBuf_.Get<float>();
        Duplicate(g, 0.0f, (int32_t)p_.nTile);  // pad lanes: g = u = 0 -> score 0
        Duplicate(u, 0.0f, (int32_t)p_.nTile);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        uint32_t nBlocks = (len + p_.qRows - 1) / p_.qRows;
        CopyInRows(s0, Min(p_.qRows, len));
        for (uint32_t bi = 0; bi < nBlocks; ++bi) {
            uint32_t b0 = bi * p_.qRows;
            uint32_t rows = Min(p_.qRows, len - b0);
            if (bi + 1 < nBlocks) CopyInRows(s0 + b0 + p_.qRows, Min(p_.qRows, len - b0 - p_.qRows));
            LocalTensor<uint8_t> qb = qQue_.DeQue<uint8_t>();
            LocalTensor<float> sb = sQue_.DeQue<float>();
            for (uint32_t i = 0; i < rows; ++i) {
                float gv, uv;
                RowEstimates(qb, sb, i, gv, uv);
                g.SetValue(b0 + i, gv);
                u.SetValue(b0 + i, uv);
            }
            qQue_.FreeTensor(qb);
            sQue_.FreeTensor(sb);
        }
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        LocalTensor<float> h = hBuf_.Get<float>();
        LocalTensor<float> score = scoreBuf_.Get<float>();
        LocalTensor<float> thr = thrBuf_.Get<float>();
        ActivateLanes(g, u, h, tmpBuf_.Get<float>(), maskBuf_.Get<uint8_t>(), p_.nTile, p_.act, p_.actParam, 0.0f);
        Abs(score, h, p_.nTile);
        Duplicate(thr, 0.0f, (int32_t)p_.nTile);
        SetFlag<HardEvent::V_MTE2>(0);
        WaitFlag<HardEvent::V_MTE2>(0);
        uint8_t rpad = (uint8_t)(Align(len, 8) - len);
        DataCopyPad(thr, thrGm_[s0], DataCopyExtParams(1, len * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(rpad > 0, 0, rpad, 0.0f));
        SetFlag<HardEvent::MTE2_V>(0);
        WaitFlag<HardEvent::MTE2_V>(0);
        Sub(score, score, thr, p_.nTile);  // > 0 exactly where |h| > thresh
        PipeBarrier<PIPE_V>();
        return CompactLanes(score, maskBuf_.Get<uint8_t>(), rampBuf_.Get<int32_t>(), activeBuf_.Get<int32_t>(),
                            (int32_t)s0, p_.nTile);
    }

    // g^ and u^ of row i of the current block
    __aicore__ inline void RowEstimates(const LocalTensor<uint8_t>& qb, const LocalTensor<float>& sb, uint32_t i,
                                        float& gv, float& uv)
    {
        const uint32_t hp = p_.hPad, w = p_.hPad / 2;
        LocalTensor<uint16_t> m16 = m16Buf_.Get<uint16_t>();
        LocalTensor<uint16_t> nib16 = nibBuf_.Get<uint16_t>();
        LocalTensor<uint8_t> nib8 = nibBuf_.Get<uint8_t>();
        LocalTensor<half> nibH = nibHBuf_.Get<half>();
        LocalTensor<float> nibF = nibFBuf_.Get<float>();
        LocalTensor<float> xq = xqBuf_.Get<float>();
        LocalTensor<float> dot = dotBuf_.Get<float>();
        for (uint32_t c = 0; c < 2; ++c) {
            LocalTensor<uint16_t> row16 = qb[(2 * i + c) * hp].template ReinterpretCast<uint16_t>();
            And(nib16, row16, m16, w);               // low nibbles  -> bytes [0, hp)
            ShiftRight(nib16[w], row16, (uint16_t)4, w);
            PipeBarrier<PIPE_V>();
            And(nib16[w], nib16[w], m16, w);         // high nibbles -> bytes [hp, 2 hp)
            PipeBarrier<PIPE_V>();
            Cast(nibH, nib8, RoundMode::CAST_NONE, 2 * hp);
            PipeBarrier<PIPE_V>();
            Adds(nibH, nibH, half(-8.0f), 2 * hp);  // stored nibble - 8, exact in half
            PipeBarrier<PIPE_V>();
            Cast(nibF, nibH, RoundMode::CAST_NONE, 2 * hp);
            PipeBarrier<PIPE_V>();
            Mul(nibF, nibF, xq, 2 * hp);             // integer products, exact
            PipeBarrier<PIPE_V>();
            Add(nibF, nibF, nibF[hp], hp);           // lo + hi of each byte, exact
            PipeBarrier<PIPE_V>();
            for (uint32_t g0 = 0; g0 < ng_; g0 += 248) {  // <= 255 repeats; dst offset stays 32-B aligned
                uint32_t reps = Min(248, ng_ - g0);
                WholeReduceSum(dot[c * p_.ngPad + g0], nibF[g0 * S_], (int32_t)S_, (int32_t)reps, 1, 1, (int32_t)(S_ / 8));
            }
            PipeBarrier<PIPE_V>();
        }
        LocalTensor<float> cc = cBuf_.Get<float>();
        Mul(cc, sb[2 * i * p_.ngPad], xsBuf_.Get<float>(), 2 * p_.ngPad);  // c_g = fp32(scale_g * xs_g)
        PipeBarrier<PIPE_V>();
        Mul(dot, dot, cc, 2 * p_.ngPad);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> tmp = redTmpBuf_.Get<float>();
        ReduceSum(red, dot, tmp, (int32_t)ng_);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        gv = red.GetValue(0);
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        ReduceSum(red, dot[p_.ngPad], tmp, (int32_t)ng_);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        uv = red.GetValue(0);
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
    }

    Q4Params p_;
    uint32_t blk_ = 0, nBlk_ = 1, ng_ = 1, S_ = 1, dPad_ = 16;
    TPipe pipe_;
    TQue<QuePosition::VECIN, 1> xQue_;
    TQue<QuePosition::VECIN, BUFFER_NUM> qQue_, sQue_;
    TQue<QuePosition::VECOUT, 1> cntQue_;
    TBuf<QuePosition::VECCALC> xFBuf_, xqBuf_, nibBuf_, nibHBuf_, nibFBuf_, m16Buf_, xsBuf_, cBuf_, dotBuf_, redTmpBuf_,
        redDstBuf_, scoreBuf_, thrBuf_, rampBuf_, activeBuf_, gBuf_, uBuf_, hBuf_, tmpBuf_, maskBuf_;
    GlobalTensor<T> xGm_;
    GlobalTensor<uint8_t> qGm_;
    GlobalTensor<float> sGm_, thrGm_;
    GlobalTensor<int32_t> wsCnt_, wsIdx_;
};
}  // namespace sparsedge

// ------------------------------------------------------------------------------------ entry points
#define SPARSEDGE_FFN_KERNELS(SUFFIX, TYPE)                                                                          \
    extern "C" __global__ __aicore__ void sparsedge_ffn_##SUFFIX(                                                    \
        GM_ADDR x, GM_ADDR p1, GM_ADDR p2, GM_ADDR bias, GM_ADDR wGate, GM_ADDR wUp, GM_ADDR wDownT, GM_ADDR idx,    \
        GM_ADDR count, GM_ADDR workspace, uint32_t T, uint32_t d, uint32_t r, uint32_t I, uint32_t mode,             \
        uint32_t act, float actParam, float tau, uint32_t dPad, uint32_t rPad, uint32_t nPerCore, uint32_t nTile,    \
        uint32_t p2Rows)                                                                                             \
    {                                                                                                                \
        sparsedge::FfnParams p{T, d, r, I, mode, act, actParam, tau, dPad, rPad, nPerCore, nTile, p2Rows};           \
        sparsedge::SparseFfnKernel<TYPE> op;                                                                         \
        op.Init(x, p1, p2, bias, wGate, wUp, wDownT, idx, count, workspace, p);                                      \
        op.Process();                                                                                                \
    }                                                                                                                \
    extern "C" __global__ __aicore__ void sparsedge_ffn_reduce_##SUFFIX(                                             \
        GM_ADDR workspace, GM_ADDR y, GM_ADDR count, GM_ADDR downCount, uint32_t T, uint32_t d, uint32_t dPad,       \
        uint32_t mainBlocks, uint32_t cols)                                                                          \
    {                                                                                                                \
        sparsedge::FfnReduceKernel<TYPE> op;                                                                         \
        op.Init(workspace, y, count, downCount, T, d, dPad, mainBlocks, cols);                                       \
        op.Process();                                                                                                \
    }

#define SPARSEDGE_FFN_Q4_KERNEL(SUFFIX, TYPE)                                                                        \
    extern "C" __global__ __aicore__ void sparsedge_ffn_q4_##SUFFIX(                                                 \
        GM_ADDR x, GM_ADDR q, GM_ADDR scale, GM_ADDR thresh, GM_ADDR workspace, uint32_t T, uint32_t d, uint32_t G, \
        uint32_t I, uint32_t act, float actParam, uint32_t hPad, uint32_t ngPad, uint32_t nPerCore, uint32_t nTile,  \
        uint32_t qRows)                                                                                              \
    {                                                                                                                \
        sparsedge::Q4Params p{T, d, G, I, act, actParam, hPad, ngPad, nPerCore, nTile, qRows};                       \
        sparsedge::FfnPredictQ4Kernel<TYPE> op;                                                                      \
        op.Init(x, q, scale, thresh, workspace, p);                                                                  \
        op.Process();                                                                                                \
    }

SPARSEDGE_FFN_KERNELS(f16, half)
SPARSEDGE_FFN_Q4_KERNEL(f16, half)
// bf16: 910B (dav-c220) only; 310B (dav-m300, __CCE_AICORE__ == 300) lacks bf16 Gather/GatherMask/Cast paths.
#if !defined(__CCE_AICORE__) || (__CCE_AICORE__ == 220)
SPARSEDGE_FFN_KERNELS(bf16, bfloat16_t)
SPARSEDGE_FFN_Q4_KERNEL(bf16, bfloat16_t)
#endif

extern "C" __global__ __aicore__ void sparsedge_ffn_concat(GM_ADDR workspace, GM_ADDR idx, GM_ADDR count, uint32_t T,
                                                           uint32_t I, uint32_t dPad, uint32_t mainBlocks,
                                                           uint32_t nPerCore)
{
    sparsedge::FfnConcatKernel op;
    op.Init(workspace, idx, count, T, I, dPad, mainBlocks, nPerCore);
    op.Process();
}
