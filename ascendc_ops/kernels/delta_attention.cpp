/*
 * sparsedge DeltaLLM kernels (AscendC, direct kernel launch): key delta encoding and hybrid delta
 * attention for decode (T = 1).  Semantics and buffer layouts: sparsedge.ops.delta.
 *
 *   ref [H, D] fp32   theta [H] fp32   values [H, cap] (fp16 | bf16)   chan [H, cap] uint8
 *   offsets [H, Tmax+1] int32   sink_k [H, S, D]   window_k [H, W, D]   v_cache [H, Tmax, D]
 *
 * delta_encode, per KV head (heads split across cores), per token:  d = k - ref (Sub), |d| (Abs),
 * CompareScalar(|d| > theta) -> bit mask, GatherMask of the rounded deltas and of a channel ramp into the
 * packed buffers, ref += select(mask, rounded d, 0); the packed run is appended at offsets[h, t] with
 * DataCopyPad (any byte length).  Capacity overflow is reported in a status record (the binding raises).
 *
 * delta_attention (decode), per KV head (its G = Hq/H query heads share every row read):
 *   pass 1  scores: exact q.k for sinks / the last `window` positions / the current key (key rows from
 *           sink_k, window_k, k); q.k_hat_j = q.k_hat_{j-1} + q.d_j for the others, where q.d_j is a
 *           UB Gather of q at the packed channels times the packed values (nnz MACs, not D).  Scaled scores
 *           go to a GM workspace [Hq, nPad]; a running max per query head is kept.
 *   pass 2  softmax and P.V: exp(s - max) per chunk, sum, and y += p_j v_j with one V row read per j.
 */
#include "kernel_operator.h"
using namespace AscendC;

namespace sparsedge {
constexpr int32_t DELTA_BUFFER_NUM = 2;
constexpr uint32_t MAX_GROUP = 32;

__aicore__ inline uint32_t DMin(uint32_t a, uint32_t b) { return a < b ? a : b; }

// ----------------------------------------------------------------------------------------- encode
template <typename T>
class DeltaEncodeKernel {
public:
    __aicore__ inline void Init(GM_ADDR k, GM_ADDR ref, GM_ADDR theta, GM_ADDR values, GM_ADDR chan, GM_ADDR offsets,
                                GM_ADDR status, uint32_t T_, uint32_t H, uint32_t D, uint32_t cap, uint32_t offStride,
                                uint32_t start, uint32_t dPad, uint32_t maxTokens)
    {
        T_n = T_; H_ = H; D_ = D; cap_ = cap; offStride_ = offStride; start_ = start; dPad_ = dPad;
        kGm_.SetGlobalBuffer((__gm__ T*)k, (uint64_t)T_ * H * D);
        refGm_.SetGlobalBuffer((__gm__ float*)ref, (uint64_t)H * D);
        thetaGm_.SetGlobalBuffer((__gm__ float*)theta, H);
        valGm_.SetGlobalBuffer((__gm__ T*)values, (uint64_t)H * cap);
        chanGm_.SetGlobalBuffer((__gm__ uint8_t*)chan, (uint64_t)H * cap);
        offGm_.SetGlobalBuffer((__gm__ int32_t*)offsets, (uint64_t)H * offStride);
        statusGm_.SetGlobalBuffer((__gm__ int32_t*)status, 8);
        // UB plan: must match sd_enc_ub() in sparsedge_tiling.h
        pipe_.InitBuffer(kQue_, DELTA_BUFFER_NUM, dPad * sizeof(T));
        pipe_.InitBuffer(refBuf_, dPad * sizeof(float));
        pipe_.InitBuffer(kFBuf_, dPad * sizeof(float));
        pipe_.InitBuffer(deltaBuf_, dPad * sizeof(float));
        pipe_.InitBuffer(absBuf_, dPad * sizeof(float));
        pipe_.InitBuffer(updBuf_, dPad * sizeof(float));
        pipe_.InitBuffer(maskBuf_, dPad / 8);
        pipe_.InitBuffer(dhBuf_, dPad * sizeof(T));
        pipe_.InitBuffer(rampBuf_, dPad * sizeof(half));
        pipe_.InitBuffer(valPackBuf_, dPad * sizeof(T));
        pipe_.InitBuffer(chanHBuf_, dPad * sizeof(half));
        pipe_.InitBuffer(chanU8Buf_, dPad * sizeof(uint8_t));
        pipe_.InitBuffer(offStageBuf_, (maxTokens + 1) * sizeof(int32_t));
        pipe_.InitBuffer(statusBuf_, 8 * sizeof(int32_t));
    }

    __aicore__ inline void Process()
    {
        LocalTensor<half> ramp = rampBuf_.Get<half>();
        CreateVecIndex(ramp, (half)0.0f, dPad_);
        for (uint32_t h = GetBlockIdx(); h < H_; h += GetBlockNum()) EncodeHead(h);
    }

private:
    __aicore__ inline void CopyInKey(uint32_t t, uint32_t h)
    {
        LocalTensor<T> kIn = kQue_.AllocTensor<T>();
        DataCopyPad(kIn, kGm_[((uint64_t)t * H_ + h) * D_], DataCopyExtParams(1, D_ * sizeof(T), 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        kQue_.EnQue(kIn);
    }

    __aicore__ inline void EncodeHead(uint32_t h)
    {
        LocalTensor<float> ref = refBuf_.Get<float>();
        LocalTensor<float> kF = kFBuf_.Get<float>();
        LocalTensor<float> delta = deltaBuf_.Get<float>();
        LocalTensor<float> absd = absBuf_.Get<float>();
        LocalTensor<float> upd = updBuf_.Get<float>();
        LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
        LocalTensor<T> dh = dhBuf_.Get<T>();
        LocalTensor<half> ramp = rampBuf_.Get<half>();
        LocalTensor<T> valPack = valPackBuf_.Get<T>();
        LocalTensor<half> chanH = chanHBuf_.Get<half>();
        LocalTensor<uint8_t> chanU8 = chanU8Buf_.Get<uint8_t>();
        LocalTensor<int32_t> offStage = offStageBuf_.Get<int32_t>();

        // pad lanes (D..dPad) of ref and k stay 0, so |delta| = 0 there and they are never selected
        Duplicate(ref, 0.0f, (int32_t)dPad_);
        Duplicate(kF, 0.0f, (int32_t)dPad_);
        SetFlag<HardEvent::V_MTE2>(0);
        WaitFlag<HardEvent::V_MTE2>(0);
        DataCopyPad(ref, refGm_[(uint64_t)h * D_], DataCopyExtParams(1, D_ * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        float theta = thetaGm_.GetValue(h);
        int32_t pos = offGm_.GetValue((uint64_t)h * offStride_ + start_);
        offStage.SetValue(0, pos);
        SetFlag<HardEvent::MTE2_V>(0);
        WaitFlag<HardEvent::MTE2_V>(0);

        uint32_t done = 0;
        bool overflow = false;
        CopyInKey(0, h);
        for (uint32_t t = 0; t < T_n; ++t) {
            if (t + 1 < T_n) CopyInKey(t + 1, h);
            LocalTensor<T> kIn = kQue_.DeQue<T>();
            Cast(kF, kIn, RoundMode::CAST_NONE, D_);
            kQue_.FreeTensor(kIn);
            if (overflow) continue;  // drain the prefetched rows, write nothing more
            PipeBarrier<PIPE_V>();
            Sub(delta, kF, ref, dPad_);
            PipeBarrier<PIPE_V>();
            Abs(absd, delta, dPad_);
            PipeBarrier<PIPE_V>();
            CompareScalar(mask, absd, theta, CMPMODE::GT, dPad_);
            Cast(dh, delta, RoundMode::CAST_RINT, dPad_);       // the value that will be stored
            PipeBarrier<PIPE_V>();
            Cast(upd, dh, RoundMode::CAST_NONE, dPad_);
            PipeBarrier<PIPE_V>();
            Select(upd, mask, upd, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, dPad_);
            PipeBarrier<PIPE_V>();
            Add(ref, ref, upd, dPad_);                          // ref moves only where a delta is sent
            uint64_t cnt = 0;
            GatherMask(valPack, dh, mask.ReinterpretCast<uint16_t>(), true, dPad_, GatherMaskParams(1, 1, 8, 8), cnt);
            GatherMask(chanH, ramp, mask.ReinterpretCast<uint16_t>(), true, dPad_, GatherMaskParams(1, 1, 8, 8), cnt);
            PipeBarrier<PIPE_V>();
            SetFlag<HardEvent::V_S>(0);
            WaitFlag<HardEvent::V_S>(0);
            uint32_t n = (uint32_t)cnt;
            if ((uint64_t)pos + n > cap_) {
                overflow = true;
                ReportOverflow(h, (uint32_t)pos + n);
                continue;
            }
            if (n > 0) {
                Cast(chanU8, chanH, RoundMode::CAST_ROUND, n);
                SetFlag<HardEvent::V_MTE3>(0);
                WaitFlag<HardEvent::V_MTE3>(0);
                DataCopyPad(valGm_[(uint64_t)h * cap_ + pos], valPack, DataCopyExtParams(1, n * sizeof(T), 0, 0, 0));
                DataCopyPad(chanGm_[(uint64_t)h * cap_ + pos], chanU8, DataCopyExtParams(1, n, 0, 0, 0));
                SetFlag<HardEvent::MTE3_V>(0);  // the next token overwrites valPack / chanU8
                WaitFlag<HardEvent::MTE3_V>(0);
            }
            pos += (int32_t)n;
            offStage.SetValue(t + 1, pos);
            ++done;
        }
        // offsets[h, start .. start+done] (the first value is rewritten unchanged), ref back to GM
        SetFlag<HardEvent::S_MTE3>(0);
        WaitFlag<HardEvent::S_MTE3>(0);
        DataCopyPad(offGm_[(uint64_t)h * offStride_ + start_], offStage,
                    DataCopyExtParams(1, (done + 1) * sizeof(int32_t), 0, 0, 0));
        SetFlag<HardEvent::V_MTE3>(0);
        WaitFlag<HardEvent::V_MTE3>(0);
        DataCopyPad(refGm_[(uint64_t)h * D_], ref, DataCopyExtParams(1, D_ * sizeof(float), 0, 0, 0));
        SetFlag<HardEvent::MTE3_V>(0);
        WaitFlag<HardEvent::MTE3_V>(0);
    }

    __aicore__ inline void ReportOverflow(uint32_t h, uint32_t need)
    {
        LocalTensor<int32_t> st = statusBuf_.Get<int32_t>();
        for (uint32_t i = 0; i < 8; ++i) st.SetValue(i, 0);
        st.SetValue(0, 1);
        st.SetValue(1, (int32_t)h);
        st.SetValue(2, (int32_t)need);
        st.SetValue(3, (int32_t)cap_);
        SetFlag<HardEvent::S_MTE3>(0);
        WaitFlag<HardEvent::S_MTE3>(0);
        DataCopy(statusGm_, st, 8);
    }

    uint32_t T_n, H_, D_, cap_, offStride_, start_, dPad_;
    TPipe pipe_;
    TQue<QuePosition::VECIN, DELTA_BUFFER_NUM> kQue_;
    TBuf<QuePosition::VECCALC> refBuf_, kFBuf_, deltaBuf_, absBuf_, updBuf_, maskBuf_, dhBuf_, rampBuf_, valPackBuf_,
        chanHBuf_, chanU8Buf_, offStageBuf_, statusBuf_;
    GlobalTensor<T> kGm_, valGm_;
    GlobalTensor<float> refGm_, thetaGm_;
    GlobalTensor<uint8_t> chanGm_;
    GlobalTensor<int32_t> offGm_, statusGm_;
};

// -------------------------------------------------------------------------------- attention (T=1)
struct DeltaAttnParams {
    uint32_t H, G, D, Tmax, cap, S, W, start, nSink, window;
    float scale;
    uint32_t dPad, chunk, entTile, nPad;
};

template <typename T>
class DeltaAttnKernel {
public:
    __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR vCache, GM_ADDR values, GM_ADDR chan, GM_ADDR offsets,
                                GM_ADDR sinkK, GM_ADDR windowK, GM_ADDR out, GM_ADDR ws, const DeltaAttnParams& p)
    {
        p_ = p;
        uint32_t Hq = p.H * p.G;
        qGm_.SetGlobalBuffer((__gm__ T*)q, (uint64_t)Hq * p.D);
        kGm_.SetGlobalBuffer((__gm__ T*)k, (uint64_t)p.H * p.D);
        vGm_.SetGlobalBuffer((__gm__ T*)vCache, (uint64_t)p.H * p.Tmax * p.D);
        valGm_.SetGlobalBuffer((__gm__ T*)values, (uint64_t)p.H * p.cap);
        chanGm_.SetGlobalBuffer((__gm__ uint8_t*)chan, (uint64_t)p.H * p.cap);
        offGm_.SetGlobalBuffer((__gm__ int32_t*)offsets, (uint64_t)p.H * (p.Tmax + 1));
        sinkGm_.SetGlobalBuffer((__gm__ T*)sinkK, (uint64_t)p.H * p.S * p.D);
        winGm_.SetGlobalBuffer((__gm__ T*)windowK, (uint64_t)p.H * p.W * p.D);
        outGm_.SetGlobalBuffer((__gm__ T*)out, (uint64_t)Hq * p.D);
        wsGm_.SetGlobalBuffer((__gm__ float*)ws, (uint64_t)Hq * p.nPad);
        // UB plan: must match sd_attn_ub() in sparsedge_tiling.h
        uint32_t maxRed = p.chunk > p.dPad ? p.chunk : p.dPad;
        pipe_.InitBuffer(rowQue_, DELTA_BUFFER_NUM, p.dPad * sizeof(T));
        pipe_.InitBuffer(qFBuf_, p.G * p.dPad * sizeof(float));
        pipe_.InitBuffer(rowFBuf_, p.dPad * sizeof(float));
        pipe_.InitBuffer(tmpBuf_, p.dPad * sizeof(float));
        pipe_.InitBuffer(accBuf_, p.G * p.dPad * sizeof(float));
        pipe_.InitBuffer(redTmpBuf_, (maxRed + 63) / 64 * sizeof(float));
        pipe_.InitBuffer(redDstBuf_, 32);
        pipe_.InitBuffer(scBuf_, p.G * p.chunk * sizeof(float));
        pipe_.InitBuffer(offBuf_, (p.chunk + 8) * sizeof(int32_t));
        pipe_.InitBuffer(entQue_, DELTA_BUFFER_NUM, p.entTile * sizeof(T));
        pipe_.InitBuffer(chanQue_, DELTA_BUFFER_NUM, p.entTile);
        pipe_.InitBuffer(chanHBuf_, p.entTile * sizeof(half));
        pipe_.InitBuffer(byteOffBuf_, p.entTile * sizeof(int32_t));
        pipe_.InitBuffer(valFBuf_, p.entTile * sizeof(float));
        pipe_.InitBuffer(gqBuf_, p.entTile * sizeof(float));
        pipe_.InitBuffer(prodBuf_, p.G * p.entTile * sizeof(float));
        pipe_.InitBuffer(outBuf_, p.dPad * sizeof(T));
    }

    __aicore__ inline void Process()
    {
        for (uint32_t h = GetBlockIdx(); h < p_.H; h += GetBlockNum()) Head(h);
    }

private:
    __aicore__ inline void CopyInRow(const GlobalTensor<T>& src, uint64_t elemOff)
    {
        LocalTensor<T> r = rowQue_.AllocTensor<T>();
        DataCopyPad(r, src[elemOff], DataCopyExtParams(1, p_.D * sizeof(T), 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        rowQue_.EnQue(r);
    }
    __aicore__ inline void NextRowF()  // dequeue -> rowF (fp32)
    {
        LocalTensor<T> r = rowQue_.DeQue<T>();
        LocalTensor<float> rowF = rowFBuf_.Get<float>();
        Cast(rowF, r, RoundMode::CAST_NONE, p_.D);
        rowQue_.FreeTensor(r);
        PipeBarrier<PIPE_V>();
    }

    // products q_g[chan_e] * val_e for the entry tile [e0, e0 + len), for every query head of the group
    __aicore__ inline void LoadEntryTile(uint32_t h, uint32_t e0, uint32_t len)
    {
        LocalTensor<T> vals = entQue_.AllocTensor<T>();
        LocalTensor<uint8_t> ch = chanQue_.AllocTensor<uint8_t>();
        DataCopyPad(vals, valGm_[(uint64_t)h * p_.cap + e0], DataCopyExtParams(1, len * sizeof(T), 0, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        DataCopyPad(ch, chanGm_[(uint64_t)h * p_.cap + e0], DataCopyExtParams(1, len, 0, 0, 0),
                    DataCopyPadExtParams<uint8_t>(false, 0, 0, 0));
        entQue_.EnQue(vals);
        chanQue_.EnQue(ch);
        vals = entQue_.DeQue<T>();
        ch = chanQue_.DeQue<uint8_t>();
        LocalTensor<float> valF = valFBuf_.Get<float>();
        LocalTensor<half> chanH = chanHBuf_.Get<half>();
        LocalTensor<int32_t> byteOff = byteOffBuf_.Get<int32_t>();
        LocalTensor<float> gq = gqBuf_.Get<float>();
        LocalTensor<float> prod = prodBuf_.Get<float>();
        LocalTensor<float> qF = qFBuf_.Get<float>();
        Cast(valF, vals, RoundMode::CAST_NONE, len);
        Cast(chanH, ch, RoundMode::CAST_NONE, len);
        PipeBarrier<PIPE_V>();
        Cast(byteOff, chanH, RoundMode::CAST_ROUND, len);
        PipeBarrier<PIPE_V>();
        Muls(byteOff, byteOff, (int32_t)sizeof(float), len);
        PipeBarrier<PIPE_V>();
        for (uint32_t g = 0; g < p_.G; ++g) {
            Gather(gq, qF, byteOff.ReinterpretCast<uint32_t>(), g * p_.dPad * (uint32_t)sizeof(float), len);
            PipeBarrier<PIPE_V>();
            Mul(prod[g * p_.entTile], gq, valF, len);
            PipeBarrier<PIPE_V>();
        }
        entQue_.FreeTensor(vals);
        chanQue_.FreeTensor(ch);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
    }

    __aicore__ inline void Head(uint32_t h)
    {
        const uint32_t G = p_.G, D = p_.D;
        const uint32_t n = p_.start + 1;
        LocalTensor<float> qF = qFBuf_.Get<float>();
        LocalTensor<float> rowF = rowFBuf_.Get<float>();
        LocalTensor<float> tmp = tmpBuf_.Get<float>();
        LocalTensor<float> acc = accBuf_.Get<float>();
        LocalTensor<float> red = redDstBuf_.Get<float>();
        LocalTensor<float> redTmp = redTmpBuf_.Get<float>();
        LocalTensor<float> sc = scBuf_.Get<float>();
        LocalTensor<int32_t> off = offBuf_.Get<int32_t>();
        LocalTensor<float> prod = prodBuf_.Get<float>();

        Duplicate(qF, 0.0f, (int32_t)(G * p_.dPad));
        PipeBarrier<PIPE_V>();
        for (uint32_t g = 0; g < G; ++g) {
            CopyInRow(qGm_, ((uint64_t)h * G + g) * D);
            NextRowF();
            DataCopy(qF[g * p_.dPad], rowF, p_.dPad);
            PipeBarrier<PIPE_V>();
        }
        // delta region: positions nSink .. p - window (inclusive); entries of 0 .. p - window are summed
        const int64_t jdEnd = (int64_t)p_.start - (int64_t)p_.window;
        uint32_t entEnd = 0;  // one past the last entry needed
        if (jdEnd >= 0) entEnd = (uint32_t)offGm_.GetValue((uint64_t)h * (p_.Tmax + 1) + (uint64_t)jdEnd + 1);
        const uint32_t ns = p_.nSink < n ? p_.nSink : n;
        float pre[MAX_GROUP], mx[MAX_GROUP], sum[MAX_GROUP];
        for (uint32_t g = 0; g < G; ++g) { pre[g] = 0.0f; mx[g] = -3.0e38f; sum[g] = 0.0f; }
        uint32_t tile0 = 0, tileLen = 0;

        // ---------------- pass 1: scores
        for (uint32_t c0 = 0; c0 < n; c0 += p_.chunk) {
            uint32_t len = DMin(p_.chunk, n - c0);
            DataCopyPad(off, offGm_[(uint64_t)h * (p_.Tmax + 1) + c0], DataCopyExtParams(1, (len + 1) * sizeof(int32_t), 0, 0, 0),
                        DataCopyPadExtParams<int32_t>(false, 0, 0, 0));
            SetFlag<HardEvent::MTE2_S>(0);
            WaitFlag<HardEvent::MTE2_S>(0);
            for (uint32_t jj = 0; jj < len; ++jj) {
                uint32_t j = c0 + jj;
                if ((int64_t)j <= jdEnd) {  // accumulate q.d_j into the prefix
                    uint32_t a = (uint32_t)off.GetValue(jj), b = (uint32_t)off.GetValue(jj + 1);
                    for (uint32_t e = a; e < b; ++e) {
                        if (e >= tile0 + tileLen) {
                            tile0 = e;
                            tileLen = DMin(p_.entTile, entEnd - e);
                            LoadEntryTile(h, tile0, tileLen);
                        }
                        for (uint32_t g = 0; g < G; ++g) pre[g] += prod.GetValue(g * p_.entTile + (e - tile0));
                    }
                }
                bool isDelta = j >= p_.nSink && (int64_t)j <= jdEnd;
                if (isDelta) {
                    for (uint32_t g = 0; g < G; ++g) sc.SetValue(g * p_.chunk + jj, pre[g]);
                    continue;
                }
                if (j < ns) CopyInRow(sinkGm_, ((uint64_t)h * p_.S + j) * D);
                else if (j == p_.start) CopyInRow(kGm_, (uint64_t)h * D);
                else CopyInRow(winGm_, ((uint64_t)h * p_.W + (j % p_.window)) * D);
                NextRowF();
                for (uint32_t g = 0; g < G; ++g) {
                    Mul(tmp, rowF, qF[g * p_.dPad], D);
                    PipeBarrier<PIPE_V>();
                    ReduceSum(red, tmp, redTmp, (int32_t)D);
                    SetFlag<HardEvent::V_S>(0);
                    WaitFlag<HardEvent::V_S>(0);
                    sc.SetValue(g * p_.chunk + jj, red.GetValue(0));
                }
            }
            SetFlag<HardEvent::S_V>(0);
            WaitFlag<HardEvent::S_V>(0);
            for (uint32_t g = 0; g < G; ++g) {
                LocalTensor<float> s = sc[g * p_.chunk];
                Muls(s, s, p_.scale, len);
                PipeBarrier<PIPE_V>();
                ReduceMax(red, s, redTmp, (int32_t)len);
                SetFlag<HardEvent::V_S>(0);
                WaitFlag<HardEvent::V_S>(0);
                float m = red.GetValue(0);
                if (m > mx[g]) mx[g] = m;
                SetFlag<HardEvent::V_MTE3>(0);
                WaitFlag<HardEvent::V_MTE3>(0);
                DataCopyPad(wsGm_[((uint64_t)h * G + g) * p_.nPad + c0], s, DataCopyExtParams(1, len * sizeof(float), 0, 0, 0));
            }
            SetFlag<HardEvent::MTE3_V>(0);
            WaitFlag<HardEvent::MTE3_V>(0);
        }
        PipeBarrier<PIPE_ALL>();  // workspace scores written by MTE3 are read back by MTE2 below

        // ---------------- pass 2: softmax + P.V
        Duplicate(acc, 0.0f, (int32_t)(G * p_.dPad));
        PipeBarrier<PIPE_V>();
        for (uint32_t c0 = 0; c0 < n; c0 += p_.chunk) {
            uint32_t len = DMin(p_.chunk, n - c0);
            for (uint32_t g = 0; g < G; ++g) {
                LocalTensor<float> s = sc[g * p_.chunk];
                DataCopyPad(s, wsGm_[((uint64_t)h * G + g) * p_.nPad + c0], DataCopyExtParams(1, len * sizeof(float), 0, 0, 0),
                            DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
                SetFlag<HardEvent::MTE2_V>(0);
                WaitFlag<HardEvent::MTE2_V>(0);
                Adds(s, s, -mx[g], len);
                PipeBarrier<PIPE_V>();
                Exp(s, s, len);
                PipeBarrier<PIPE_V>();
                ReduceSum(red, s, redTmp, (int32_t)len);
                SetFlag<HardEvent::V_S>(0);
                WaitFlag<HardEvent::V_S>(0);
                sum[g] += red.GetValue(0);
            }
            CopyInRow(vGm_, ((uint64_t)h * p_.Tmax + c0) * D);
            for (uint32_t jj = 0; jj < len; ++jj) {
                if (jj + 1 < len) CopyInRow(vGm_, ((uint64_t)h * p_.Tmax + c0 + jj + 1) * D);  // prefetch
                NextRowF();
                for (uint32_t g = 0; g < G; ++g) {
                    float pj = sc.GetValue(g * p_.chunk + jj);
                    Axpy(acc[g * p_.dPad], rowF, pj, D);
                    PipeBarrier<PIPE_V>();
                }
            }
        }
        LocalTensor<T> outRow = outBuf_.Get<T>();
        for (uint32_t g = 0; g < G; ++g) {
            LocalTensor<float> a = acc[g * p_.dPad];
            Muls(a, a, 1.0f / sum[g], D);
            PipeBarrier<PIPE_V>();
            Cast(outRow, a, RoundMode::CAST_RINT, D);
            SetFlag<HardEvent::V_MTE3>(0);
            WaitFlag<HardEvent::V_MTE3>(0);
            DataCopyPad(outGm_[((uint64_t)h * G + g) * D], outRow, DataCopyExtParams(1, D * sizeof(T), 0, 0, 0));
            SetFlag<HardEvent::MTE3_V>(0);
            WaitFlag<HardEvent::MTE3_V>(0);
        }
    }

    DeltaAttnParams p_;
    TPipe pipe_;
    TQue<QuePosition::VECIN, DELTA_BUFFER_NUM> rowQue_, entQue_, chanQue_;
    TBuf<QuePosition::VECCALC> qFBuf_, rowFBuf_, tmpBuf_, accBuf_, redTmpBuf_, redDstBuf_, scBuf_, offBuf_, chanHBuf_,
        byteOffBuf_, valFBuf_, gqBuf_, prodBuf_, outBuf_;
    GlobalTensor<T> qGm_, kGm_, vGm_, valGm_, sinkGm_, winGm_, outGm_;
    GlobalTensor<uint8_t> chanGm_;
    GlobalTensor<int32_t> offGm_;
    GlobalTensor<float> wsGm_;
};
}  // namespace sparsedge

#define SPARSEDGE_DELTA_KERNELS(SUFFIX, TYPE)                                                                          \
    extern "C" __global__ __aicore__ void sparsedge_delta_encode_##SUFFIX(                                             \
        GM_ADDR k, GM_ADDR ref, GM_ADDR theta, GM_ADDR values, GM_ADDR chan, GM_ADDR offsets, GM_ADDR status,          \
        uint32_t T, uint32_t H, uint32_t D, uint32_t cap, uint32_t offStride, uint32_t start, uint32_t dPad,           \
        uint32_t maxTokens)                                                                                            \
    {                                                                                                                  \
        sparsedge::DeltaEncodeKernel<TYPE> op;                                                                         \
        op.Init(k, ref, theta, values, chan, offsets, status, T, H, D, cap, offStride, start, dPad, maxTokens);        \
        op.Process();                                                                                                  \
    }                                                                                                                  \
    extern "C" __global__ __aicore__ void sparsedge_delta_attention_decode_##SUFFIX(                                   \
        GM_ADDR q, GM_ADDR k, GM_ADDR vCache, GM_ADDR values, GM_ADDR chan, GM_ADDR offsets, GM_ADDR sinkK,            \
        GM_ADDR windowK, GM_ADDR out, GM_ADDR workspace, uint32_t H, uint32_t G, uint32_t D, uint32_t Tmax,            \
        uint32_t cap, uint32_t S, uint32_t W, uint32_t start, uint32_t nSink, uint32_t window, float scale,            \
        uint32_t dPad, uint32_t chunk, uint32_t entTile, uint32_t nPad)                                                \
    {                                                                                                                  \
        sparsedge::DeltaAttnParams p{H, G, D, Tmax, cap, S, W, start, nSink, window, scale, dPad, chunk, entTile, nPad}; \
        sparsedge::DeltaAttnKernel<TYPE> op;                                                                           \
        op.Init(q, k, vCache, values, chan, offsets, sinkK, windowK, out, workspace, p);                               \
        op.Process();                                                                                                  \
    }

SPARSEDGE_DELTA_KERNELS(f16, half)
#if !defined(__CCE_AICORE__) || (__CCE_AICORE__ == 220)
SPARSEDGE_DELTA_KERNELS(bf16, bfloat16_t)
#endif
