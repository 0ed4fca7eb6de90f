/*
 * Shared by the sparsedge AscendC kernel files (sparse_ffn.cpp, qffn.cpp): queue depth, the per-(token, core)
 * counter record of the GM workspace, the activation ids (the values of backends/include/sparsedge/activations.h,
 * static_assert'ed by the emulation build), the cross-core reduction's pieces (StoreCounts, SumCounts, SumParts),
 * QuantizeGroups (x to int8 per group) and ActivateLanes, the fused h = act(g) * u over a tile of lanes.
 */
#pragma once
#include "kernel_operator.h"
using namespace AscendC;

namespace sparsedge {
constexpr int32_t BUFFER_NUM = 2;
constexpr uint32_t WS_ROW_INTS = 8;  // per (token, core) counter record: [active, down, 0...] = 32 B
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_FATRELU = 4, ACT_DRELU = 5, ACT_RELU2 = 6 };

__aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }

// One (token, core) counter record [c0, c1, 0...] out to the GM workspace through a VECOUT queue, then wait for the
// copy-out: the next token reuses the caller's accumulators and queues.
template <class Que>
__aicore__ inline void StoreCounts(Que& q, GlobalTensor<int32_t>& ws, uint64_t rec, int32_t c0, int32_t c1)
{
    LocalTensor<int32_t> c = q.template AllocTensor<int32_t>();
    for (uint32_t i = 0; i < WS_ROW_INTS; ++i) c.SetValue(i, 0);
    c.SetValue(0, c0);
    c.SetValue(1, c1);
    q.EnQue(c);
    c = q.template DeQue<int32_t>();
    DataCopy(ws[rec * WS_ROW_INTS], c, WS_ROW_INTS);
    q.FreeTensor(c);
    SetFlag<HardEvent::MTE3_V>(0);
    WaitFlag<HardEvent::MTE3_V>(0);
}

// The B cores' counter records of token t, summed field by field: (sum of c0, sum of c1). cnt: B * WS_ROW_INTS ints.
__aicore__ inline void SumCounts(LocalTensor<int32_t>& cnt, GlobalTensor<int32_t>& ws, uint32_t t, uint32_t B,
                                 int32_t& c0, int32_t& c1)
{
    DataCopy(cnt, ws[(uint64_t)t * B * WS_ROW_INTS], B * WS_ROW_INTS);
    SetFlag<HardEvent::MTE2_S>(0);
    WaitFlag<HardEvent::MTE2_S>(0);
    c0 = 0;
    c1 = 0;
    for (uint32_t b = 0; b < B; ++b) {
        c0 += cnt.GetValue(b * WS_ROW_INTS);
        c1 += cnt.GetValue(b * WS_ROW_INTS + 1);
    }
    SetFlag<HardEvent::S_MTE2>(0);
    WaitFlag<HardEvent::S_MTE2>(0);
}
__aicore__ inline uint32_t Align(uint32_t a, uint32_t b) { return (a + b - 1) / b * b; }

// x[0:d] -> int8 values per group of G lanes (held exactly in fp32; round half to even, as torch.round), and the
// group scales amax/127 at scales[g] and scales[pad + g] (the gate and the up copy). absX / xi: one d-lane scratch
// buffer seen as fp32 then int32; red / tmp: ReduceMax's. Shared by the W8 rows kernel and the 4-bit predictor.
__aicore__ inline void QuantizeGroups(const LocalTensor<float>& x, const LocalTensor<float>& absX,
                                      const LocalTensor<int32_t>& xi, const LocalTensor<float>& scales,
                                      const LocalTensor<float>& red, const LocalTensor<float>& tmp, uint32_t d,
                                      uint32_t nGroups, uint32_t G, uint32_t pad)
{
    Abs(absX, x, d);
    PipeBarrier<PIPE_V>();
    for (uint32_t g = 0; g < nGroups; ++g) {
        ReduceMax(red, absX[g * G], tmp, (int32_t)G);
        SetFlag<HardEvent::V_S>(0);
        WaitFlag<HardEvent::V_S>(0);
        float amax = red.GetValue(0);
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        float s = amax / 127.0f;
        scales.SetValue(g, s);
        scales.SetValue(pad + g, s);
        SetFlag<HardEvent::S_V>(0);
        WaitFlag<HardEvent::S_V>(0);
        Muls(x[g * G], x[g * G], inv, G);
    }
    PipeBarrier<PIPE_V>();
    Cast(xi, x, RoundMode::CAST_RINT, d);
    PipeBarrier<PIPE_V>();
    Cast(x, xi, RoundMode::CAST_NONE, d);
}

// The cross-core reduction's column sum: acc[0:n] = sum over the B cores of their fp32 partial rows
// ws[(t * B + b) * stride + c0 ...], in core order, the next core's part copied in while one is added.
template <class Que>
__aicore__ inline void CopyInPart(Que& q, GlobalTensor<float>& ws, uint64_t at, uint32_t n)
{
    LocalTensor<float> part = q.template AllocTensor<float>();
    DataCopy(part, ws[at], n);
    q.EnQue(part);
}
template <class Que>
__aicore__ inline void SumParts(LocalTensor<float>& acc, Que& q, GlobalTensor<float>& ws, uint32_t t, uint32_t B,
                                uint32_t stride, uint32_t c0, uint32_t n)
{
    Duplicate(acc, 0.0f, (int32_t)n);
    PipeBarrier<PIPE_V>();
    CopyInPart(q, ws, (uint64_t)t * B * stride + c0, n);
    for (uint32_t b = 0; b < B; ++b) {
        if (b + 1 < B) CopyInPart(q, ws, ((uint64_t)t * B + b + 1) * stride + c0, n);
        LocalTensor<float> part = q.template DeQue<float>();
        Add(acc, acc, part, n);
        PipeBarrier<PIPE_V>();
        q.FreeTensor(part);
    }
}

// ---- h = act(g) * u over n lanes (n * 4 B a multiple of 256 B; pad lanes with g = u = 0 give h = 0).
// tmp: n fp32 scratch, mask: n bits. Shared by SparseFfnKernel, FfnPredictQ4Kernel and QffnRowsQ8Kernel.
__aicore__ inline void ActivateLanes(const LocalTensor<float>& g, const LocalTensor<float>& u, const LocalTensor<float>& h,
                                     const LocalTensor<float>& tmp, const LocalTensor<uint8_t>& mask, uint32_t n,
                                     uint32_t act, float actParam, float tau)
{
    switch (act) {
        case ACT_SILU:  // g * sigmoid(g)
            Muls(tmp, g, -1.0f, n);
            Exp(tmp, tmp, n);
            Adds(tmp, tmp, 1.0f, n);
            Div(h, g, tmp, n);
            break;
        case ACT_GELU:  // 0.5 g (1 + erf(g / sqrt 2))
            Muls(tmp, g, 0.70710678118654752f, n);
            Erf(tmp, tmp, n);
            Adds(tmp, tmp, 1.0f, n);
            Mul(tmp, tmp, g, n);
            Muls(h, tmp, 0.5f, n);
            break;
        case ACT_GELU_TANH:  // 0.5 g (1 + tanh z) = g * sigmoid(2z),  z = sqrt(2/pi) (g + 0.044715 g^3)
            Mul(tmp, g, g, n);
            Mul(tmp, tmp, g, n);
            Muls(tmp, tmp, 0.044715f, n);
            Add(tmp, tmp, g, n);
            Muls(tmp, tmp, -1.5957691216057308f, n);
            Exp(tmp, tmp, n);
            Adds(tmp, tmp, 1.0f, n);
            Div(h, g, tmp, n);
            break;
        case ACT_FATRELU:  // g if g > t else 0
            CompareScalar(mask, g, actParam, CMPMODE::GT, n);
            Select(h, mask, g, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, n);
            break;
        case ACT_RELU2:
            Relu(h, g, n);
            Mul(h, h, h, n);
            break;
        default:  // relu, drelu
            Relu(h, g, n);
            break;
    }
    PipeBarrier<PIPE_V>();
    if (tau > 0.0f) {  // CATS-style: keep lanes with |act(g)| >= tau
        Abs(tmp, h, n);
        CompareScalar(mask, tmp, tau, CMPMODE::GE, n);
    }
    if (act == ACT_DRELU) Relu(u, u, n);
    Mul(h, h, u, n);
    if (tau > 0.0f) Select(h, mask, h, 0.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, n);
    PipeBarrier<PIPE_V>();
}

}  // namespace sparsedge
