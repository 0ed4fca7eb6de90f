/*
 * sparsedge quantized sparse FFN over listed neurons, W8 weights (AscendC, direct kernel launch).
 *
 * Semantics: sparsedge::qsparse_ffn_rows (sdk/sparsedge/ops/qffn.py) restricted to q8_0 gate/up rows and a q8_0
 * W_down in the neuron-row layout of sparsedge.quant.down_t.  Layouts, all row-major:
 *   x [T, d] fp32 (the binding converts)   idx [T, I] int32 (first count[t] valid, ascending)   count [T] int32
 *   wGateUp [2I, d/32 * 34] bytes: gate rows then up rows, GGUF q8_0 blocks (fp16 scale, then 32 int8 codes)
 *   downCodes [I, d] int8   downScale [I/32, d] fp16:  W_down[r, i] = downScale[i / 32, r] * downCodes[i, r]
 *   y [T, d] fp32 (the binding converts back to x's dtype)   downCount [T] int32 (h != 0 per token)
 *
 * Core split: core b owns the 32-neuron blocks [b * bPerCore, (b + 1) * bPerCore) and runs the listed neurons that
 * fall in them (two binary searches over the ascending list, scalar GM reads), so the int8 rounding of h, which is
 * per block of 32 neurons, never straddles cores.  Per token:
 *   1. x -> int8 per block of 32 exactly as sparsedge.quant.formats.quantize_activations (the reference's rounding):
 *      ReduceMax of |x|, inv = 127 / amax and dx = amax / 127 as IEEE fp32 divisions, Muls, Cast f32->s32 CAST_RINT
 *      (round half to even, as torch.round), Cast back: xq holds the int8 values exactly in fp32.
 *   2. Per listed neuron (double-buffered queue, the next neuron's rows in flight): DataCopyPad with a 2-byte source
 *      stride lifts the 32 codes of each q8_0 block out of its 34 bytes, so the d codes of the gate row and of the up
 *      row land contiguously in UB; a second DataCopyPad (2-byte blocks, 32-byte source stride) puts each block's
 *      fp16 scale at the head of its own 32-byte UB block, and a 1-lane WholeReduceSum packs them.  Codes:
 *      Cast s8->half->fp32, Mul by xq, WholeReduceSum per 32 lanes: the integer block dots, exact in fp32
 *      (|dot| <= 32 * 127 * 127 < 2^24).  g = sum_b dot_b * c_b with c_b = fp32(dw_b * dx_b) (llama.cpp's and the
 *      CPU kernel's arithmetic), the products and the sum in fp32 (ReduceSum).
 *   3. Per tile of nTile neurons: h = act(g) u (ActivateLanes, the float kernels' code: all seven activations),
 *      down count += (h != 0) over the listed neurons; h rounded to int8 per block of 32 neurons as in step 1
 *      (ReduceMax, inv, Muls, CAST_RINT): qh, dh.
 *   4. Per block with a nonzero qh: its code rows (one DataCopy each, double buffered), Cast s8->half->fp32,
 *      Axpy(acc, row, qh_i): exact integer sums in fp32 (at most 32 terms of |code * qh| <= 127^2); then
 *      y += acc * fp32(scale[b, :] * dh) (Muls, Mul, Add), in fp32 in UB.
 * Each core writes its partial y and its down count to the GM workspace (the sparse_ffn layout, d-wide rows); a
 * second launch, sparsedge_qffn_reduce, sums them column slice by column slice, in core order, into fp32 y.
 *
 * Precision (what tests/test_ops.py checks against the composite reference): x and h are rounded to int8 exactly
 * as the reference rounds them, the block dots are exact, and only the fp32 sums over blocks (g, u), the fp32
 * activation, and the fp32 y accumulation differ from the reference's fp64.  A value of h that lies on an int8
 * rounding boundary may round the other way than the reference's fp64 h (the check allows one int8 step of h per
 * element), and a relu-family h whose g is within fp32 noise of 0 may be counted differently (the op-table inputs
 * never put g there).  Same contract as the CPU kernel (backends/cpu/quant_sparse_ffn.cpp).
 */
#include "sparsedge_kernel_common.h"

namespace sparsedge {
constexpr uint32_t QK8 = 32;        // q8_0 block: 32 codes
constexpr uint32_t Q8_BYTES = 34;   // fp16 scale + 32 int8 codes
constexpr uint32_t QFFN_MAX_TILE_BLOCKS = 8;  // nTile <= 256 (the tiling's bound)

struct QffnParams {
    uint32_t T, d, I, act;
    float actParam;
    uint32_t bPerCore, nbxPad, nTile, nList;
};

class QffnRowsQ8Kernel {
public:
    __aicore__ inline QffnRowsQ8Kernel() {}

    __aicore__ inline void Init(GM_ADDR x, GM_ADDR idx, GM_ADDR count, GM_ADDR wGateUp, GM_ADDR downCodes,
                                GM_ADDR downScale, GM_ADDR ws, const QffnParams& p)
    {
        p_ = p;
        blk_ = GetBlockIdx();
        nBlk_ = GetBlockNum();
        nbx_ = p.d / QK8;
        rowBytes_ = nbx_ * Q8_BYTES;
        n0_ = blk_ * p.bPerCore * QK8;
        n1_ = Min(p.I, n0_ + p.bPerCore * QK8);
        xGm_.SetGlobalBuffer((__gm__ float*)x, (uint64_t)p.T * p.d);
        idxGm_.SetGlobalBuffer((__gm__ int32_t*)idx, (uint64_t)p.T * p.I);
        countGm_.SetGlobalBuffer((__gm__ int32_t*)count, p.T);
        wqGm_.SetGlobalBuffer((__gm__ int8_t*)wGateUp, (uint64_t)2 * p.I * rowBytes_);
        wsGm_.SetGlobalBuffer((__gm__ half*)wGateUp, (uint64_t)p.I * rowBytes_);  // the same bytes as fp16 words
        codeGm_.SetGlobalBuffer((__gm__ int8_t*)downCodes, (uint64_t)p.I * p.d);
        scaleGm_.SetGlobalBuffer((__gm__ half*)downScale, (uint64_t)(p.I / QK8) * p.d);
        uint64_t yWs = (uint64_t)p.T * nBlk_ * p.d;
        wsY_.SetGlobalBuffer((__gm__ float*)ws, yWs);
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float)), (uint64_t)p.T * nBlk_ * WS_ROW_INTS);

        // UB plan: must match sd_qffn_ub() in sparsedge_tiling.h
        const uint32_t d = p.d, red = p.nbxPad > 64 ? p.nbxPad : 64;
        pipe_.InitBuffer(xqBuf_, d * sizeof(float));
        pipe_.InitBuffer(dxBuf_, 2 * p.nbxPad * sizeof(float));
        pipe_.InitBuffer(guQue_, BUFFER_NUM, 4 * d);
        pipe_.InitBuffer(codesHBuf_, 2 * d * sizeof(half));
        pipe_.InitBuffer(codesFBuf_, 2 * d * sizeof(float));
        pipe_.InitBuffer(dwBuf_, 2 * p.nbxPad * sizeof(float));
        pipe_.InitBuffer(dotBuf_, 2 * p.nbxPad * sizeof(float));
        pipe_.InitBuffer(redTmpBuf_, (red + 63) / 64 * sizeof(float));
        pipe_.InitBuffer(redDstBuf_, 32);
        pipe_.InitBuffer(gBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(uBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(hBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(tmpBuf_, p.nTile * sizeof(float));
        pipe_.InitBuffer(maskBuf_, p.nTile / 8);
        pipe_.InitBuffer(tileIdsBuf_, p.nTile * sizeof(int32_t));
        pipe_.InitBuffer(listBuf_, p.nList * sizeof(int32_t));
        pipe_.InitBuffer(downQue_, BUFFER_NUM, d);
        pipe_.InitBuffer(scaleQue_, 1, d * sizeof(half));
        pipe_.InitBuffer(accBuf_, d * sizeof(float));
        pipe_.InitBuffer(yAccBuf_, d * sizeof(float));
        pipe_.InitBuffer(cntQue_, 1, WS_ROW_INTS * sizeof(int32_t));

        // pad lanes of the per-block vectors stay 0 (WholeReduceSum / SetValue write the first nbx lanes only)
        Duplicate(dxBuf_.Get<float>(), 0.0f, (int32_t)(2 * p.nbxPad));
        Duplicate(dwBuf_.Get<float>(), 0.0f, (int32_t)(2 * p.nbxPad));
        Duplicate(dotBuf_.Get<float>(), 0.0f, (int32_t)(2 * p.nbxPad));
        PipeBarrier<PIPE_V>();
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
    }

    __aicore__ inline void Process()
    {
        for (uint32_t t = 0; t < p_.T; ++t) {
            nDown_ = 0;
            QuantizeX(t);
            Duplicate(yAccBuf_.Get<float>(), 0.0f, (int32_t)p_.d);
            PipeBarrier<PIPE_V>();
            SetFlag<HardEvent::V_S>(0);
            WaitFlag<HardEvent::V_S>(0);
            int32_t c = countGm_.GetValue(t);
            uint32_t cnt = c < 0 ? 0u : Min((uint32_t)c, p_.I);  // the binding does not read count back
            uint32_t k0 = LowerBound(t, cnt, n0_);
            uint32_t k1 = LowerBound(t, cnt, n1_);
            nInTile_ = 0;
            LocalTensor<int32_t> list = listBuf_.Get<int32_t>();
            for (uint32_t kc = k0; kc < k1; kc += p_.nList) {
                uint32_t len = Min(p_.nList, k1 - kc);
                SetFlag<HardEvent::S_MTE2>(0);
                WaitFlag<HardEvent::S_MTE2>(0);
                DataCopyPad(list, idxGm_[(uint64_t)t * p_.I + kc], DataCopyExtParams(1, len * sizeof(int32_t), 0, 0, 0),
                            DataCopyPadExtParams<int32_t>(false, 0, 0, 0));
                SetFlag<HardEvent::MTE2_S>(0);
                WaitFlag<HardEvent::MTE2_S>(0);
                CopyInGateUp(Neuron(list.GetValue(0)));
                for (uint32_t k = 0; k < len; ++k) {
                    uint32_t i = Neuron(list.GetValue(k));
                    if (k + 1 < len) CopyInGateUp(Neuron(list.GetValue(k + 1)));  // in flight while this one runs
                    uint32_t s0 = n0_ + (i - n0_) / p_.nTile * p_.nTile;
                    if (nInTile_ > 0 && s0 != tileStart_) FinishTile();
                    if (nInTile_ == 0) StartTile(s0);
                    float gv, uv;
                    GateUpDots(gv, uv);
                    gBuf_.Get<float>().SetValue(i - tileStart_, gv);
                    uBuf_.Get<float>().SetValue(i - tileStart_, uv);
                    tileIdsBuf_.Get<int32_t>().SetValue(nInTile_++, (int32_t)i);
                }
            }
            if (nInTile_ > 0) FinishTile();
            StoreTokenResult(t);
        }
    }

private:
    // a listed id, clamped into this core's range (an ascending list never needs it; it keeps GM reads in bounds)
    __aicore__ inline uint32_t Neuron(int32_t v)
    {
        uint32_t i = v < (int32_t)n0_ ? n0_ : (uint32_t)v;
        return i >= n1_ ? n1_ - 1 : i;
    }

    // first k in [0, cnt) with idx[t, k] >= v (the list is ascending)
    __aicore__ inline uint32_t LowerBound(uint32_t t, uint32_t cnt, uint32_t v)
    {
        uint32_t lo = 0, hi = cnt;
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (idxGm_.GetValue((uint64_t)t * p_.I + mid) < (int32_t)v) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    }

    // ---- x row -> int8 values per block of 32 (in fp32) and dx per block (gate and up copies)
    __aicore__ inline void QuantizeX(uint32_t t)
    {
        LocalTensor<float> xq = xqBuf_.Get<float>();
        LocalTensor<float> absX = codesFBuf_.Get<float>();  // scratch: |x|, then the int32 cast
        LocalTensor<float> dx = dxBuf_.Get<float>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> tmp = redTmpBuf_.Get<float>();
        SetFlag<HardEvent::V_MTE2>(0);  // the previous token's vector reads of xq are done
        WaitFlag<HardEvent::V_MTE2>(0);
        DataCopy(xq, xGm_[(uint64_t)t * p_.d], p_.d);
        SetFlag<HardEvent::MTE2_V>(0);
        WaitFlag<HardEvent::MTE2_V>(0);
        QuantizeGroups(xq, absX, codesFBuf_.Get<int32_t>(), dx, red, tmp, p_.d, nbx_, QK8, p_.nbxPad);
        PipeBarrier<PIPE_V>();
    }

    // ---- neuron i's gate and up rows GM -> UB: [gate codes (d B) | up codes (d B) | gate scales | up scales], each
    // scale at the head of its own 32-B block (d/32 blocks per row)
    __aicore__ inline void CopyInGateUp(uint32_t i)
    {
        LocalTensor<int8_t> rb = guQue_.AllocTensor<int8_t>();
        const uint32_t d = p_.d;
        const uint64_t g = (uint64_t)i * rowBytes_, u = (uint64_t)(p_.I + i) * rowBytes_;
        DataCopyExtParams codes((uint16_t)nbx_, QK8, Q8_BYTES - QK8, 0, 0);          // 32 B of each 34, packed
        DataCopyExtParams scales((uint16_t)nbx_, sizeof(half), QK8, 0, 0);           // 2 B of each 34, 32-B apart
        DataCopyPad(rb, wqGm_[g + 2], codes, DataCopyPadExtParams<int8_t>(false, 0, 0, 0));
        DataCopyPad(rb[d], wqGm_[u + 2], codes, DataCopyPadExtParams<int8_t>(false, 0, 0, 0));
        DataCopyPad(rb[2 * d].template ReinterpretCast<half>(), wsGm_[g / 2], scales,
                    DataCopyPadExtParams<half>(false, 0, 0, half(0.0f)));
        DataCopyPad(rb[3 * d].template ReinterpretCast<half>(), wsGm_[u / 2], scales,
                    DataCopyPadExtParams<half>(false, 0, 0, half(0.0f)));
        guQue_.EnQue(rb);
    }

    // ---- the next queued neuron: g and u (fp32)
    __aicore__ inline void GateUpDots(float& gv, float& uv)
    {
        const uint32_t d = p_.d, np = p_.nbxPad;
        LocalTensor<int8_t> rb = guQue_.DeQue<int8_t>();
        LocalTensor<half> codesH = codesHBuf_.Get<half>();
        LocalTensor<float> codesF = codesFBuf_.Get<float>();
        LocalTensor<float> dw = dwBuf_.Get<float>();
        LocalTensor<float> dot = dotBuf_.Get<float>();
        LocalTensor<float> xq = xqBuf_.Get<float>();
        // scales: 2 * nbx blocks of 16 half lanes, the scale in lane 0 -> fp32 -> one lane per repeat packed
        Cast(codesF, rb[2 * d].template ReinterpretCast<half>(), RoundMode::CAST_NONE, d);
        Cast(codesH, rb, RoundMode::CAST_NONE, 2 * d);  // int8 codes -> half, exact
        PipeBarrier<PIPE_V>();
        guQue_.FreeTensor(rb);
        for (uint32_t b0 = 0; b0 < nbx_; b0 += 248) {  // <= 255 repeats; dst offsets stay 32-B aligned
            int32_t reps = (int32_t)Min(248, nbx_ - b0);
            WholeReduceSum(dw[b0], codesF[b0 * 16], 1, reps, 1, 1, 2);
            WholeReduceSum(dw[np + b0], codesF[d / 2 + b0 * 16], 1, reps, 1, 1, 2);
        }
        PipeBarrier<PIPE_V>();
        Cast(codesF, codesH, RoundMode::CAST_NONE, 2 * d);
        PipeBarrier<PIPE_V>();
        Mul(codesF, codesF, xq, d);        // integer products, exact
        Mul(codesF[d], codesF[d], xq, d);
        Mul(dw, dw, dxBuf_.Get<float>(), 2 * np);  // c_b = fp32(dw_b * dx_b)
        PipeBarrier<PIPE_V>();
        for (uint32_t b0 = 0; b0 < nbx_; b0 += 248) {
            int32_t reps = (int32_t)Min(248, nbx_ - b0);
            WholeReduceSum(dot[b0], codesF[b0 * QK8], (int32_t)QK8, reps, 1, 1, 4);  // integer block dots, exact
            WholeReduceSum(dot[np + b0], codesF[d + b0 * QK8], (int32_t)QK8, reps, 1, 1, 4);
        }
        PipeBarrier<PIPE_V>();
        Mul(dot, dot, dw, 2 * np);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> tmp = redTmpBuf_.Get<float>();
        ReduceSum(red, dot, tmp, (int32_t)nbx_);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        gv = red.GetValue(0);
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        ReduceSum(red, dot[np], tmp, (int32_t)nbx_);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        uv = red.GetValue(0);
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
    }

    __aicore__ inline void StartTile(uint32_t s0)
    {
        tileStart_ = s0;
        Duplicate(gBuf_.Get<float>(), 0.0f, (int32_t)p_.nTile);  // unlisted lanes: g = u = 0 -> h = 0
        Duplicate(uBuf_.Get<float>(), 0.0f, (int32_t)p_.nTile);
        PipeBarrier<PIPE_V>();
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
    }

    // ---- h over the tile, its count, int8 rounding per block of 32 neurons, down rows of every nonzero qh
    __aicore__ inline void FinishTile()
    {
        LocalTensor<float> g = gBuf_.Get<float>();
        LocalTensor<float> u = uBuf_.Get<float>();
        LocalTensor<float> h = hBuf_.Get<float>();
        LocalTensor<float> tmp = tmpBuf_.Get<float>();
        LocalTensor<int32_t> ids = tileIdsBuf_.Get<int32_t>();
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        ActivateLanes(g, u, h, tmp, maskBuf_.Get<uint8_t>(), p_.nTile, p_.act, p_.actParam, 0.0f);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        for (uint32_t j = 0; j < nInTile_; ++j)
            if (h.GetValue((uint32_t)ids.GetValue(j) - tileStart_) != 0.0f) ++nDown_;
        // qh = rint(h * 127 / amax) per block of 32 neurons, dh = amax / 127 (quantize_activations on h)
        Abs(tmp, h, p_.nTile);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> rtmp = redTmpBuf_.Get<float>();
        float dh[QFFN_MAX_TILE_BLOCKS];
        const uint32_t nb = p_.nTile / QK8;
        for (uint32_t b = 0; b < nb; ++b) {
            ReduceMax(red, tmp[b * QK8], rtmp, (int32_t)QK8);
            SetFlag<HardEvent::V_S>(0);
            WaitFlag<HardEvent::V_S>(0);
            float amax = red.GetValue(0);
            dh[b] = amax / 127.0f;
            float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            SetFlag<HardEvent::S_V>(0);
            WaitFlag<HardEvent::S_V>(0);
            Muls(h[b * QK8], h[b * QK8], inv, QK8);
        }
        PipeBarrier<PIPE_V>();
        LocalTensor<int32_t> hi = tmp.template ReinterpretCast<int32_t>();
        Cast(hi, h, RoundMode::CAST_RINT, p_.nTile);
        PipeBarrier<PIPE_V>();
        Cast(h, hi, RoundMode::CAST_NONE, p_.nTile);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        // keep the neurons with qh != 0 (ids stays ascending), then run them block by block
        uint32_t n = 0;
        for (uint32_t j = 0; j < nInTile_; ++j) {
            int32_t i = ids.GetValue(j);
            if (h.GetValue((uint32_t)i - tileStart_) != 0.0f) ids.SetValue(n++, i);
        }
        for (uint32_t j = 0; j < n;) {
            uint32_t b = (uint32_t)ids.GetValue(j) / QK8;
            uint32_t j1 = j + 1;
            while (j1 < n && (uint32_t)ids.GetValue(j1) / QK8 == b) ++j1;
            DownBlock(b, j, j1, dh[(b * QK8 - tileStart_) / QK8]);
            j = j1;
        }
        nInTile_ = 0;
    }

    // y += fp32(scale[b, :] * dh) * sum_{j in [j0, j1)} code[id_j, :] * qh_j
    __aicore__ inline void DownBlock(uint32_t b, uint32_t j0, uint32_t j1, float dh)
    {
        const uint32_t d = p_.d;
        LocalTensor<int32_t> ids = tileIdsBuf_.Get<int32_t>();
        LocalTensor<float> h = hBuf_.Get<float>();
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<half> rowH = codesHBuf_.Get<half>();
        LocalTensor<float> rowF = codesFBuf_.Get<float>();
        Duplicate(acc, 0.0f, (int32_t)d);
        CopyInCodeRow((uint32_t)ids.GetValue(j0));
        for (uint32_t j = j0; j < j1; ++j) {
            if (j + 1 < j1) CopyInCodeRow((uint32_t)ids.GetValue(j + 1));
            float q = h.GetValue((uint32_t)ids.GetValue(j) - tileStart_);
            LocalTensor<int8_t> r = downQue_.DeQue<int8_t>();
            Cast(rowH, r, RoundMode::CAST_NONE, d);
            PipeBarrier<PIPE_V>();
            downQue_.FreeTensor(r);
            Cast(rowF, rowH, RoundMode::CAST_NONE, d);
            PipeBarrier<PIPE_V>();
            Axpy(acc, rowF, q, d);  // exact: integers below 2^24
            PipeBarrier<PIPE_V>();
        }
        LocalTensor<half> s = scaleQue_.AllocTensor<half>();
        DataCopy(s, scaleGm_[(uint64_t)b * d], d);
        scaleQue_.EnQue(s);
        s = scaleQue_.DeQue<half>();
        Cast(rowF, s, RoundMode::CAST_NONE, d);
        PipeBarrier<PIPE_V>();
        scaleQue_.FreeTensor(s);
        Muls(rowF, rowF, dh, d);  // fp32(scale * dh), as the CPU kernel
        PipeBarrier<PIPE_V>();
        Mul(acc, acc, rowF, d);
        PipeBarrier<PIPE_V>();
        LocalTensor<float> yAcc = yAccBuf_.Get<float>();
        Add(yAcc, yAcc, acc, d);
        PipeBarrier<PIPE_V>();
    }

    __aicore__ inline void CopyInCodeRow(uint32_t i)
    {
        LocalTensor<int8_t> r = downQue_.AllocTensor<int8_t>();
        DataCopy(r, codeGm_[(uint64_t)i * p_.d], p_.d);  // d is a multiple of 32
        downQue_.EnQue(r);
    }

    __aicore__ inline void StoreTokenResult(uint32_t t)
    {
        uint64_t rec = (uint64_t)t * nBlk_ + blk_;
        LocalTensor<float> yAcc = yAccBuf_.Get<float>();
        SetFlag<HardEvent::V_MTE3>(0);
        WaitFlag<HardEvent::V_MTE3>(0);
        DataCopy(wsY_[rec * p_.d], yAcc, p_.d);
        StoreCounts(cntQue_, wsCnt_, rec, 0, (int32_t)nDown_);  // field 1: kept down rows, as sparse_ffn
    }

    QffnParams p_;
    uint32_t blk_ = 0, nBlk_ = 1, nbx_ = 1, rowBytes_ = Q8_BYTES, n0_ = 0, n1_ = 0;
    uint32_t tileStart_ = 0, nInTile_ = 0, nDown_ = 0;
    TPipe pipe_;
    TQue<QuePosition::VECIN, BUFFER_NUM> guQue_, downQue_;
    TQue<QuePosition::VECIN, 1> scaleQue_;
    TQue<QuePosition::VECOUT, 1> cntQue_;
    TBuf<QuePosition::VECCALC> xqBuf_, dxBuf_, codesHBuf_, codesFBuf_, dwBuf_, dotBuf_, redTmpBuf_, redDstBuf_, gBuf_,
        uBuf_, hBuf_, tmpBuf_, maskBuf_, tileIdsBuf_, listBuf_, accBuf_, yAccBuf_;
    GlobalTensor<float> xGm_, wsY_;
    GlobalTensor<int32_t> idxGm_, countGm_, wsCnt_;
    GlobalTensor<int8_t> wqGm_, codeGm_;
    GlobalTensor<half> wsGm_, scaleGm_;
};

// ---- cross-core reduction: y[t, cols] = sum_b partial[t, b, cols] (fp32, core order); down counts by core 0
class QffnReduceKernel {
public:
    __aicore__ inline void Init(GM_ADDR ws, GM_ADDR y, GM_ADDR downCount, uint32_t T, uint32_t d, uint32_t mainBlocks,
                                uint32_t cols)
    {
        T_ = T; d_ = d; B_ = mainBlocks; cols_ = cols;
        uint64_t yWs = (uint64_t)T * mainBlocks * d;
        wsY_.SetGlobalBuffer((__gm__ float*)ws, yWs);
        wsCnt_.SetGlobalBuffer((__gm__ int32_t*)(ws + yWs * sizeof(float)), (uint64_t)T * mainBlocks * WS_ROW_INTS);
        yGm_.SetGlobalBuffer((__gm__ float*)y, (uint64_t)T * d);
        downGm_.SetGlobalBuffer((__gm__ int32_t*)downCount, T);
        pipe_.InitBuffer(partQue_, BUFFER_NUM, cols * sizeof(float));
        pipe_.InitBuffer(accBuf_, cols * sizeof(float));
        pipe_.InitBuffer(cntBuf_, mainBlocks * WS_ROW_INTS * sizeof(int32_t));
        pipe_.InitBuffer(downBuf_, Align(T, 8) * sizeof(int32_t));
    }

    __aicore__ inline void Process()
    {
        uint32_t c0 = GetBlockIdx() * cols_;
        if (c0 < d_) {
            uint32_t n = Min(cols_, d_ - c0);  // a multiple of 8 (d is a multiple of 32)
            LocalTensor<float> acc = accBuf_.Get<float>();
            for (uint32_t t = 0; t < T_; ++t) {
                SumParts(acc, partQue_, wsY_, t, B_, d_, c0, n);
                SetFlag<HardEvent::V_MTE3>(0);
                WaitFlag<HardEvent::V_MTE3>(0);
                DataCopy(yGm_[(uint64_t)t * d_ + c0], acc, n);
                SetFlag<HardEvent::MTE3_V>(0);
                WaitFlag<HardEvent::MTE3_V>(0);
            }
        }
        if (GetBlockIdx() == 0) {
            LocalTensor<int32_t> cnt = cntBuf_.Get<int32_t>();
            LocalTensor<int32_t> dOut = downBuf_.Get<int32_t>();
            for (uint32_t t = 0; t < T_; ++t) {
                int32_t unused = 0, dn = 0;
                SumCounts(cnt, wsCnt_, t, B_, unused, dn);
                dOut.SetValue(t, dn);
            }
            SetFlag<HardEvent::S_MTE3>(0);
            WaitFlag<HardEvent::S_MTE3>(0);
            DataCopyPad(downGm_, dOut, DataCopyExtParams(1, T_ * sizeof(int32_t), 0, 0, 0));
        }
    }

private:
    uint32_t T_ = 0, d_ = 0, B_ = 1, cols_ = 8;
    TPipe pipe_;
    TQue<QuePosition::VECIN, BUFFER_NUM> partQue_;
    TBuf<QuePosition::VECCALC> accBuf_, cntBuf_, downBuf_;
    GlobalTensor<float> wsY_, yGm_;
    GlobalTensor<int32_t> wsCnt_, downGm_;
};
}  // namespace sparsedge

// ------------------------------------------------------------------------------------ entry points
extern "C" __global__ __aicore__ void sparsedge_qffn_rows_q8(GM_ADDR x, GM_ADDR idx, GM_ADDR count, GM_ADDR wGateUp,
                                                             GM_ADDR downCodes, GM_ADDR downScale, GM_ADDR workspace,
                                                             uint32_t T, uint32_t d, uint32_t I, uint32_t act,
                                                             float actParam, uint32_t bPerCore, uint32_t nbxPad,
                                                             uint32_t nTile, uint32_t nList)
{
    sparsedge::QffnParams p{T, d, I, act, actParam, bPerCore, nbxPad, nTile, nList};
    sparsedge::QffnRowsQ8Kernel op;
    op.Init(x, idx, count, wGateUp, downCodes, downScale, workspace, p);
    op.Process();
}

extern "C" __global__ __aicore__ void sparsedge_qffn_reduce(GM_ADDR workspace, GM_ADDR y, GM_ADDR downCount,
                                                            uint32_t T, uint32_t d, uint32_t mainBlocks, uint32_t cols)
{
    sparsedge::QffnReduceKernel op;
    op.Init(workspace, y, downCount, T, d, mainBlocks, cols);
    op.Process();
}
