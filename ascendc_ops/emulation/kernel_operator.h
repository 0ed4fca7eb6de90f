// =====================================================================================================
//  TEST HARNESS — NOT A RUNTIME.  sparsedge host emulation of the AscendC subset our kernels use.
// =====================================================================================================
//  This header stands in for CANN's `kernel_operator.h` so that g++ compiles the *same* kernel sources
//  (ascendc_ops/kernels/*.cpp) on a CPU machine, and CI compares their numerics with the composite
//  reference (sparsedge.ops).  It is NOT Huawei's CPU twin-debug model (tikicpulib / libcpudebug_model),
//  it does not model timing, pipes, bank conflicts, or the real instruction encodings, and a kernel
//  passing here can still fail on hardware.  The real build uses CANN's bisheng via ascendc_library().
//
//  What it enforces (documented AscendC rules, each violation throws EmuError with a message):
//   * UB capacity per chip: every TPipe owns a UB of the selected chip's size (310B: 253,952 B;
//     910B: 196,608 B); InitBuffer rounds each buffer up to 32 B and fails when the total overflows.
//   * DataCopy (GM<->UB, UB<->UB): element count * sizeof(T) must be a multiple of 32 B and the UB
//     address 32-B aligned.  DataCopyPad: blockLen in bytes (any), UB blocks padded to 32 B.
//   * Vector instruction operands: UB start address 32-B aligned; accesses stay inside the buffer.
//   * CompareScalar: count * sizeof(T) must be a multiple of 256 B (one full repeat), <= 255 repeats.
//   * GatherMask (counter mode, reduceMode=true): `mask` = number of src0 elements (A2 / 200I-500 A2
//     counter semantics, repeatTimes ignored), <= 255 repeats of 256 B; non-counter mode processes
//     repeatTimes x 256 B, repeatTimes <= 255.
//   * Queue discipline: TQue AllocTensor -> EnQue -> DeQue -> FreeTensor, in this order, at most
//     `num` buffers in flight and at most `depth` tensors enqueued; every tensor freed by kernel end.
//   * GM bounds when SetGlobalBuffer got a size.
//   * Uninitialised UB reads show up: fresh UB is filled with 0x7F bytes (NaN for fp16 and fp32 words
//     of that pattern are huge / NaN), so a kernel that relies on unwritten pad lanes fails its test.
//  Multi-core: a launch is a loop over block indices 0..blockDim-1 run sequentially
//  (emu::launch), GetBlockIdx()/GetBlockNum() return the loop state.  Cross-core communication
//  must therefore go through GM workspace between launches (which is what our kernels do).
//  Synchronisation calls (PipeBarrier, SetFlag/WaitFlag) are accepted and are no-ops.
// =====================================================================================================
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define SPARSEDGE_EMULATION 1
#define __aicore__
#define __global__
#define __gm__
#define __ubuf__
#ifndef GM_ADDR
#define GM_ADDR uint8_t*
#endif

// ---------------------------------------------------------------------------------- scalar types
struct half {
    uint16_t bits = 0;
    half() = default;
    half(float f) { bits = from_float(f); }  // NOLINT: implicit, as the device type converts
    operator float() const { return to_float(bits); }
    static uint16_t from_float(float f) {  // round to nearest even
        uint32_t x;
        std::memcpy(&x, &f, 4);
        uint32_t sign = (x >> 16) & 0x8000u;
        uint32_t mant = x & 0x7FFFFFu;
        int32_t exp = int32_t((x >> 23) & 0xFF);
        if (exp == 0xFF) return uint16_t(sign | 0x7C00u | (mant ? 0x200u : 0u));
        exp = exp - 127 + 15;
        if (exp >= 0x1F) return uint16_t(sign | 0x7C00u);
        if (exp <= 0) {
            if (exp < -10) return uint16_t(sign);
            mant |= 0x800000u;
            uint32_t shift = uint32_t(14 - exp);
            uint32_t h = mant >> shift;
            uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
            if (rem > halfway || (rem == halfway && (h & 1u))) h++;
            return uint16_t(sign | h);
        }
        uint32_t h = (uint32_t(exp) << 10) | (mant >> 13);
        uint32_t rem = mant & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
        return uint16_t(sign | h);
    }
    static float to_float(uint16_t h) {
        uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FFu, x;
        if (exp == 0) {
            if (mant == 0) {
                x = sign;
            } else {
                int e = -1;
                do { e++; mant <<= 1; } while (!(mant & 0x400u));
                x = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
            }
        } else if (exp == 0x1F) {
            x = sign | 0x7F800000u | (mant << 13);
        } else {
            x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
        }
        float f;
        std::memcpy(&f, &x, 4);
        return f;
    }
};

struct bfloat16_t {
    uint16_t bits = 0;
    bfloat16_t() = default;
    bfloat16_t(float f) {  // NOLINT
        uint32_t x;
        std::memcpy(&x, &f, 4);
        if ((x & 0x7FFFFFFFu) > 0x7F800000u) { bits = uint16_t((x >> 16) | 0x40u); return; }
        x += 0x7FFFu + ((x >> 16) & 1u);
        bits = uint16_t(x >> 16);
    }
    operator float() const {
        uint32_t x = uint32_t(bits) << 16;
        float f;
        std::memcpy(&f, &x, 4);
        return f;
    }
};

namespace emu {
struct EmuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
[[noreturn]] inline void fail(const std::string& m) { throw EmuError("[ascendc-emulation] " + m); }
#define EMU_CHECK(cond, msg)                                   \
    do {                                                       \
        if (!(cond)) ::emu::fail(std::string(msg) + " (" #cond ")"); \
    } while (0)

struct Chip {
    const char* name;
    uint32_t ubBytes;
};
inline Chip CHIP_310B{"Ascend310B", 253952u};
inline Chip CHIP_910B{"Ascend910B", 196608u};
inline Chip* g_chip = &CHIP_310B;
inline int64_t g_blockIdx = 0, g_blockNum = 1;
inline std::string g_deferred_error;  // errors found in destructors (queue leaks)
inline uint64_t g_ub_high_water = 0;

// Run `body` once per block index, standing in for blockDim cores.
inline void launch(uint32_t blockDim, const std::function<void()>& body) {
    EMU_CHECK(blockDim >= 1 && blockDim <= 65535, "blockDim out of range");
    g_blockNum = blockDim;
    for (uint32_t b = 0; b < blockDim; ++b) {
        g_blockIdx = b;
        body();
        if (!g_deferred_error.empty()) {
            std::string e = g_deferred_error;
            g_deferred_error.clear();
            fail(e);
        }
    }
    g_blockIdx = 0;
    g_blockNum = 1;
}
}  // namespace emu

namespace AscendC {
constexpr uint32_t ONE_BLK_SIZE = 32;
constexpr uint32_t ONE_REPEAT_BYTE_SIZE = 256;
constexpr uint32_t MAX_REPEAT_TIMES = 255;

inline int64_t GetBlockIdx() { return emu::g_blockIdx; }
inline int64_t GetBlockNum() { return emu::g_blockNum; }

enum class QuePosition { GM, VECIN, VECOUT, VECCALC, A1, A2, B1, B2, CO1, CO2 };
using TPosition = QuePosition;
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };
enum class CMPMODE { LT, GT, EQ, LE, GE, NE };
enum class SELMODE { VSEL_CMPMASK_SPR, VSEL_TENSOR_SCALAR_MODE, VSEL_TENSOR_TENSOR_MODE };
enum class HardEvent { MTE2_V, V_MTE2, MTE3_V, V_MTE3, V_S, S_V, MTE2_S, S_MTE2, MTE3_S, S_MTE3, MTE3_MTE2, MTE2_MTE3 };
enum pipe_t { PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };

template <pipe_t p>
inline void PipeBarrier() {}
inline void pipe_barrier(pipe_t) {}
template <HardEvent e>
inline void SetFlag(int32_t) {}
template <HardEvent e>
inline void WaitFlag(int32_t) {}

struct UBStore;  // one UB per TPipe

// ----------------------------------------------------------------------------------- LocalTensor
template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(uint8_t* ub, uint32_t byteOff, uint32_t byteEnd, int32_t slot, void* owner)
        : ub_(ub), off_(byteOff), end_(byteEnd), slot_(slot), owner_(owner) {}
    LocalTensor operator[](uint32_t elemOffset) const {
        LocalTensor t = *this;
        t.off_ = off_ + uint32_t(elemOffset * sizeof(T));
        EMU_CHECK(t.off_ <= end_, "LocalTensor offset past the end of its buffer");
        return t;
    }
    template <typename U>
    LocalTensor<U> ReinterpretCast() const { return LocalTensor<U>(ub_, off_, end_, slot_, owner_); }
    T GetValue(uint32_t i) const {
        check(i, 1);
        T v;
        std::memcpy(&v, ub_ + off_ + i * sizeof(T), sizeof(T));
        return v;
    }
    void SetValue(uint32_t i, T v) const {
        check(i, 1);
        std::memcpy(ub_ + off_ + i * sizeof(T), &v, sizeof(T));
    }
    uint32_t GetSize() const { return (end_ - off_) / sizeof(T); }
    uint64_t GetPhyAddr() const { return off_; }
    // emulation helpers (not AscendC API)
    T* ptr() const { return reinterpret_cast<T*>(ub_ + off_); }
    void check(uint64_t first, uint64_t n) const {
        EMU_CHECK(ub_ != nullptr, "use of an unallocated LocalTensor");
        EMU_CHECK(off_ + (first + n) * sizeof(T) <= end_, "LocalTensor access out of bounds of its UB buffer");
    }
    void vecOperand(uint64_t n, const char* api) const {
        if (off_ % ONE_BLK_SIZE != 0)
            emu::fail(std::string(api) + ": UB operand start address not 32-byte aligned (offset " +
                      std::to_string(off_) + ")");
        check(0, n);
    }
    int32_t slot() const { return slot_; }
    void* owner() const { return owner_; }
    uint32_t byteOff() const { return off_; }

private:
    uint8_t* ub_ = nullptr;
    uint32_t off_ = 0, end_ = 0;
    int32_t slot_ = -1;
    void* owner_ = nullptr;
};

// ---------------------------------------------------------------------------------- GlobalTensor
template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T* p, uint64_t size = 0) { p_ = p; size_ = size; }
    GlobalTensor operator[](uint64_t off) const {
        GlobalTensor g = *this;
        g.p_ = p_ + off;
        if (size_) {
            EMU_CHECK(off <= size_, "GlobalTensor offset out of bounds");
            g.size_ = size_ - off;
            g.sized_ = true;
        }
        return g;
    }
    T GetValue(uint64_t i) const { check(i, 1); return p_[i]; }
    void SetValue(uint64_t i, T v) const { check(i, 1); p_[i] = v; }
    uint64_t GetSize() const { return size_; }
    T* GetPhyAddr() const { return p_; }
    void check(uint64_t first, uint64_t n) const {
        EMU_CHECK(p_ != nullptr, "GlobalTensor used before SetGlobalBuffer");
        if (size_ || sized_) EMU_CHECK(first + n <= size_, "GM access out of bounds of the GlobalTensor");
    }

private:
    T* p_ = nullptr;
    uint64_t size_ = 0;
    bool sized_ = false;
};

// ----------------------------------------------------------------------------- TPipe / TQue / TBuf
class TPipe;
struct BufBase {
    TPipe* pipe = nullptr;
    uint32_t base = 0, len = 0, num = 0;
};

template <QuePosition pos, int32_t depth>
class TQue : public BufBase {
public:
    enum State { FREE, ALLOC, QUEUED, DEQUED };
    template <typename T>
    LocalTensor<T> AllocTensor();
    template <typename T>
    void EnQue(const LocalTensor<T>& t) {
        EMU_CHECK(t.owner() == this, "EnQue of a tensor that was not allocated from this queue");
        EMU_CHECK(state_[t.slot()] == ALLOC, "EnQue of a tensor that is not in the allocated state");
        EMU_CHECK(int32_t(fifo_.size()) < depth, "EnQue beyond the queue depth");
        state_[t.slot()] = QUEUED;
        fifo_.push_back(t.slot());
    }
    template <typename T>
    LocalTensor<T> DeQue() {
        EMU_CHECK(!fifo_.empty(), "DeQue from an empty queue (missing EnQue)");
        int32_t s = fifo_.front();
        fifo_.erase(fifo_.begin());
        state_[s] = DEQUED;
        return make<T>(s);
    }
    template <typename T>
    void FreeTensor(const LocalTensor<T>& t) {
        EMU_CHECK(t.owner() == this, "FreeTensor of a tensor that does not belong to this queue");
        EMU_CHECK(state_[t.slot()] == DEQUED, "FreeTensor of a tensor that was not DeQue'd");
        state_[t.slot()] = FREE;
    }
    bool allFree() const {
        for (auto s : state_)
            if (s != FREE) return false;
        return true;
    }
    void init(TPipe* p, uint32_t b, uint32_t n, uint32_t l) {
        pipe = p; base = b; num = n; len = l;
        state_.assign(n, FREE);
        fifo_.clear();
    }
    ~TQue();

private:
    template <typename T>
    LocalTensor<T> make(int32_t s);
    std::vector<State> state_;
    std::vector<int32_t> fifo_;
};

template <QuePosition pos>
class TBuf : public BufBase {
public:
    template <typename T>
    LocalTensor<T> Get();
    template <typename T>
    LocalTensor<T> Get(uint32_t n) {
        EMU_CHECK(n * sizeof(T) <= len, "TBuf::Get(len) larger than the buffer");
        return Get<T>();
    }
    void init(TPipe* p, uint32_t b, uint32_t l) { pipe = p; base = b; len = l; num = 1; }
};

class TPipe {
public:
    TPipe() : ub_(emu::g_chip->ubBytes, uint8_t(0x7F)) {}
    template <QuePosition pos, int32_t depth>
    void InitBuffer(TQue<pos, depth>& q, uint32_t num, uint32_t len) {
        EMU_CHECK(num >= 1 && num <= 8, "InitBuffer: buffer num must be 1..8 (2 = double buffering)");
        EMU_CHECK(len > 0, "InitBuffer: zero-length buffer");
        uint32_t l = round32(len);
        q.init(this, reserve(uint64_t(l) * num), num, l);
    }
    template <QuePosition pos>
    void InitBuffer(TBuf<pos>& b, uint32_t len) {
        EMU_CHECK(len > 0, "InitBuffer: zero-length buffer");
        uint32_t l = round32(len);
        b.init(this, reserve(l), l);
    }
    uint8_t* ub() { return ub_.data(); }
    uint32_t used() const { return used_; }

private:
    static uint32_t round32(uint32_t x) { return (x + 31u) / 32u * 32u; }
    uint32_t reserve(uint64_t bytes) {
        if (used_ + bytes > ub_.size())
            emu::fail("TPipe::InitBuffer: Unified Buffer overflow on " + std::string(emu::g_chip->name) + ": " +
                      std::to_string(used_ + bytes) + " B requested > " + std::to_string(ub_.size()) + " B");
        uint32_t b = used_;
        used_ += uint32_t(bytes);
        if (used_ > emu::g_ub_high_water) emu::g_ub_high_water = used_;
        return b;
    }
    std::vector<uint8_t> ub_;
    uint32_t used_ = 0;
};

template <QuePosition pos, int32_t depth>
template <typename T>
LocalTensor<T> TQue<pos, depth>::make(int32_t s) {
    uint32_t b = base + uint32_t(s) * len;
    return LocalTensor<T>(pipe->ub(), b, b + len, s, this);
}
template <QuePosition pos, int32_t depth>
template <typename T>
LocalTensor<T> TQue<pos, depth>::AllocTensor() {
    EMU_CHECK(pipe != nullptr, "AllocTensor on a queue without InitBuffer");
    for (uint32_t s = 0; s < num; ++s)
        if (state_[s] == FREE) {
            state_[s] = ALLOC;
            return make<T>(int32_t(s));
        }
    emu::fail("AllocTensor: all " + std::to_string(num) + " buffers of the queue are in use (missing FreeTensor)");
}
template <QuePosition pos, int32_t depth>
TQue<pos, depth>::~TQue() {
    if (pipe && !allFree() && emu::g_deferred_error.empty())
        emu::g_deferred_error = "[ascendc-emulation] kernel ended with a queue tensor not freed (AllocTensor/DeQue without FreeTensor)";
}
template <QuePosition pos>
template <typename T>
LocalTensor<T> TBuf<pos>::Get() {
    EMU_CHECK(pipe != nullptr, "TBuf::Get before InitBuffer");
    return LocalTensor<T>(pipe->ub(), base, base + len, -1, this);
}

// -------------------------------------------------------------------------------------- DataCopy
template <typename T>
inline void checkCopyLen(uint32_t count, const char* api) {
    if ((uint64_t(count) * sizeof(T)) % ONE_BLK_SIZE != 0)
        emu::fail(std::string(api) + ": length " + std::to_string(count * sizeof(T)) +
                  " B is not a multiple of 32 B (use DataCopyPad for ragged lengths)");
}
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    checkCopyLen<T>(count, "DataCopy GM->UB");
    dst.vecOperand(count, "DataCopy GM->UB");
    src.check(0, count);
    std::memcpy(dst.ptr(), src.GetPhyAddr(), count * sizeof(T));
}
template <typename T>
inline void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    checkCopyLen<T>(count, "DataCopy UB->GM");
    src.vecOperand(count, "DataCopy UB->GM");
    dst.check(0, count);
    std::memcpy(dst.GetPhyAddr(), src.ptr(), count * sizeof(T));
}
template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    checkCopyLen<T>(count, "DataCopy UB->UB");
    dst.vecOperand(count, "DataCopy UB->UB");
    src.vecOperand(count, "DataCopy UB->UB");
    std::memmove(dst.ptr(), src.ptr(), count * sizeof(T));
}

struct DataCopyExtParams {
    DataCopyExtParams() = default;
    DataCopyExtParams(uint16_t c, uint32_t l, uint32_t s, uint32_t d, uint32_t r)
        : blockCount(c), blockLen(l), srcStride(s), dstStride(d), rsv(r) {}
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;   // bytes
    uint32_t srcStride = 0;  // GM->UB: bytes between GM blocks; UB->GM: 32-B blocks between UB blocks
    uint32_t dstStride = 0;  // GM->UB: 32-B blocks between UB blocks; UB->GM: bytes between GM blocks
    uint32_t rsv = 0;
};
template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams() = default;
    DataCopyPadExtParams(bool p, uint8_t l, uint8_t r, T v) : isPad(p), leftPadding(l), rightPadding(r), paddingValue(v) {}
    bool isPad = false;
    uint8_t leftPadding = 0, rightPadding = 0;
    T paddingValue{};
};
// GM -> UB: each block lands 32-B aligned in UB (blockLen rounded up to 32 B, plus dstStride blocks).
template <typename T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                        const DataCopyPadExtParams<T>& pad) {
    EMU_CHECK(p.blockLen % sizeof(T) == 0, "DataCopyPad: blockLen must be a whole number of elements");
    EMU_CHECK(p.blockCount >= 1, "DataCopyPad: blockCount must be >= 1");
    uint32_t ubBlk = (p.blockLen + 31u) / 32u * 32u + p.dstStride * 32u;
    dst.vecOperand(0, "DataCopyPad GM->UB");
    uint64_t n = p.blockLen / sizeof(T);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t gOff = uint64_t(b) * (p.blockLen + p.srcStride) / sizeof(T);
        src.check(gOff, n);
        uint32_t uOff = b * ubBlk / sizeof(T);
        dst.check(uOff, (p.blockLen + 31u) / 32u * 32u / sizeof(T));
        std::memcpy(dst.ptr() + uOff, src.GetPhyAddr() + gOff, p.blockLen);
        if (pad.isPad) {
            uint32_t padElems = ((p.blockLen + 31u) / 32u * 32u - p.blockLen) / sizeof(T);
            EMU_CHECK(pad.rightPadding <= padElems, "DataCopyPad: rightPadding beyond the 32-B block");
            for (uint32_t i = 0; i < pad.rightPadding; ++i) dst.ptr()[uOff + n + i] = pad.paddingValue;
        }
    }
}
// UB -> GM: writes exactly blockLen bytes per block (GM address may be unaligned).
template <typename T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    EMU_CHECK(p.blockLen % sizeof(T) == 0, "DataCopyPad: blockLen must be a whole number of elements");
    uint32_t ubBlk = (p.blockLen + 31u) / 32u * 32u + p.srcStride * 32u;
    src.vecOperand(0, "DataCopyPad UB->GM");
    uint64_t n = p.blockLen / sizeof(T);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint64_t gOff = uint64_t(b) * (p.blockLen + p.dstStride) / sizeof(T);
        dst.check(gOff, n);
        uint32_t uOff = b * ubBlk / sizeof(T);
        src.check(uOff, n);
        std::memcpy(dst.GetPhyAddr() + gOff, src.ptr() + uOff, p.blockLen);
    }
}

// ------------------------------------------------------------------------------- vector (Level 2)
namespace detail {
template <typename T>
inline float f(T v) { return float(v); }
template <typename D, typename A, typename B, typename F>
inline void binary(const LocalTensor<D>& d, const LocalTensor<A>& a, const LocalTensor<B>& b, uint32_t n, F fn,
                   const char* api) {
    d.vecOperand(n, api); a.vecOperand(n, api); b.vecOperand(n, api);
    std::vector<A> av(a.ptr(), a.ptr() + n);
    std::vector<B> bv(b.ptr(), b.ptr() + n);
    for (uint32_t i = 0; i < n; ++i) d.ptr()[i] = D(fn(av[i], bv[i]));
}
template <typename D, typename F>
inline void unary(const LocalTensor<D>& d, const LocalTensor<D>& s, uint32_t n, F fn, const char* api) {
    d.vecOperand(n, api); s.vecOperand(n, api);
    std::vector<D> sv(s.ptr(), s.ptr() + n);
    for (uint32_t i = 0; i < n; ++i) d.ptr()[i] = D(fn(sv[i]));
}
}  // namespace detail

#define EMU_BINARY(NAME, EXPR)                                                                           \
    template <typename T>                                                                                \
    inline void NAME(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, uint32_t n) { \
        detail::binary(d, a, b, n, [](T x, T y) { return EXPR; }, #NAME);                                \
    }
EMU_BINARY(Add, float(x) + float(y))
EMU_BINARY(Sub, float(x) - float(y))
EMU_BINARY(Mul, float(x) * float(y))
EMU_BINARY(Div, float(x) / float(y))
EMU_BINARY(Max, std::fmax(float(x), float(y)))
#undef EMU_BINARY

template <typename T>
inline void Adds(const LocalTensor<T>& d, const LocalTensor<T>& s, T v, uint32_t n) {
    detail::unary(d, s, n, [v](T x) { return float(x) + float(v); }, "Adds");
}
template <typename T>
inline void Muls(const LocalTensor<T>& d, const LocalTensor<T>& s, T v, uint32_t n) {
    detail::unary(d, s, n, [v](T x) { return float(x) * float(v); }, "Muls");
}
template <typename T>
inline void Maxs(const LocalTensor<T>& d, const LocalTensor<T>& s, T v, uint32_t n) {
    detail::unary(d, s, n, [v](T x) { return std::fmax(float(x), float(v)); }, "Maxs");
}
template <typename T>
inline void Abs(const LocalTensor<T>& d, const LocalTensor<T>& s, uint32_t n) {
    detail::unary(d, s, n, [](T x) { return std::fabs(float(x)); }, "Abs");
}
template <typename T>
inline void Exp(const LocalTensor<T>& d, const LocalTensor<T>& s, uint32_t n) {
    detail::unary(d, s, n, [](T x) { return std::exp(float(x)); }, "Exp");
}
template <typename T>
inline void Relu(const LocalTensor<T>& d, const LocalTensor<T>& s, uint32_t n) {
    detail::unary(d, s, n, [](T x) { return float(x) > 0.f ? float(x) : 0.f; }, "Relu");
}
// high-level math API (lib/math): Erf
template <typename T>
inline void Erf(const LocalTensor<T>& d, const LocalTensor<T>& s, uint32_t n) {
    detail::unary(d, s, n, [](T x) { return std::erf(float(x)); }, "Erf");
}
template <typename T>
inline void Duplicate(const LocalTensor<T>& d, const T& v, int32_t n) {
    d.vecOperand(uint32_t(n), "Duplicate");
    for (int32_t i = 0; i < n; ++i) d.ptr()[i] = v;
}
// dst += src * scalar (fp32 accumulate)
template <typename T, typename U>
inline void Axpy(const LocalTensor<T>& d, const LocalTensor<U>& s, U v, uint32_t n) {
    d.vecOperand(n, "Axpy"); s.vecOperand(n, "Axpy");
    for (uint32_t i = 0; i < n; ++i) d.ptr()[i] = T(float(d.ptr()[i]) + float(s.ptr()[i]) * float(v));
}

template <typename D, typename S>
inline void Cast(const LocalTensor<D>& d, const LocalTensor<S>& s, RoundMode mode, uint32_t n) {
    d.vecOperand(n, "Cast"); s.vecOperand(n, "Cast");
    std::vector<S> sv(s.ptr(), s.ptr() + n);
    for (uint32_t i = 0; i < n; ++i) {
        float x = float(sv[i]);
        if constexpr (std::is_integral_v<D>) {
            switch (mode) {
                case RoundMode::CAST_FLOOR: x = std::floor(x); break;
                case RoundMode::CAST_CEIL: x = std::ceil(x); break;
                case RoundMode::CAST_TRUNC: x = std::trunc(x); break;
                case RoundMode::CAST_ROUND: x = std::round(x); break;
                default: x = std::nearbyint(x); break;
            }
            d.ptr()[i] = D(x);
        } else {
            d.ptr()[i] = D(x);  // float -> half/bf16 rounds to nearest even (CAST_RINT / CAST_NONE)
        }
    }
}

// And (bitwise, tensor-tensor) and ShiftRight (by a scalar): 16-bit integer types (AscendC also has 32-bit
// ShiftRight); unsigned types shift logically, signed types arithmetically.
template <typename T>
inline void And(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, const int32_t& n) {
    static_assert(std::is_same_v<T, uint16_t> || std::is_same_v<T, int16_t>, "And: uint16_t / int16_t operands only");
    d.vecOperand(uint32_t(n), "And"); a.vecOperand(uint32_t(n), "And"); b.vecOperand(uint32_t(n), "And");
    std::vector<T> av(a.ptr(), a.ptr() + n), bv(b.ptr(), b.ptr() + n);
    for (int32_t i = 0; i < n; ++i) d.ptr()[i] = T(av[i] & bv[i]);
}
template <typename T>
inline void ShiftRight(const LocalTensor<T>& d, const LocalTensor<T>& s, const T& v, const int32_t& n) {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 2 || sizeof(T) == 4), "ShiftRight: 16/32-bit integers only");
    d.vecOperand(uint32_t(n), "ShiftRight"); s.vecOperand(uint32_t(n), "ShiftRight");
    std::vector<T> sv(s.ptr(), s.ptr() + n);
    for (int32_t i = 0; i < n; ++i) d.ptr()[i] = T(sv[i] >> v);
}

// WholeReduceSum, contiguous-mask mode: for each of repeatTimes repeats, the sum of the first `mask` elements of
// the repeat (src starts at r * srcRepStride 32-B blocks) goes to dst[r * dstRepStride] (unit: one dst element).
// The hardware adds within a repeat as a binary tree; this sums sequentially in fp32 (identical for exact sums).
template <typename T>
inline void WholeReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t mask,
                           const int32_t repeatTimes, const int32_t dstRepStride, const int32_t srcBlkStride,
                           const int32_t srcRepStride) {
    const int32_t per = int32_t(ONE_REPEAT_BYTE_SIZE / sizeof(T)), blk = int32_t(ONE_BLK_SIZE / sizeof(T));
    EMU_CHECK(mask >= 1 && mask <= per, "WholeReduceSum: mask out of range for the data type");
    EMU_CHECK(repeatTimes >= 0 && repeatTimes <= int32_t(MAX_REPEAT_TIMES), "WholeReduceSum: repeatTimes must be 0..255");
    EMU_CHECK(srcBlkStride == 1, "WholeReduceSum: the harness implements srcBlkStride = 1 only");
    src.vecOperand(0, "WholeReduceSum");
    for (int32_t r = 0; r < repeatTimes; ++r) {
        uint64_t base = uint64_t(r) * uint64_t(srcRepStride) * uint64_t(blk);
        src.check(base, uint64_t(mask));
        float sum = 0.f;
        for (int32_t i = 0; i < mask; ++i) sum += float(src.ptr()[base + i]);
        dst.check(uint64_t(r) * uint64_t(dstRepStride), 1);
        dst.ptr()[uint64_t(r) * uint64_t(dstRepStride)] = T(sum);
    }
}

// ReduceSum / ReduceMax: result in dst[0]; the shared tmp buffer must hold one partial per 256-B repeat.
template <typename T>
inline void checkReduceTmp(const LocalTensor<T>& tmp, uint32_t n, const char* api) {
    uint32_t per = ONE_REPEAT_BYTE_SIZE / sizeof(T);
    tmp.vecOperand((n + per - 1) / per, api);
}
template <typename T>
inline void ReduceSum(const LocalTensor<T>& d, const LocalTensor<T>& s, const LocalTensor<T>& tmp, int32_t n) {
    s.vecOperand(uint32_t(n), "ReduceSum"); d.vecOperand(1, "ReduceSum"); checkReduceTmp(tmp, uint32_t(n), "ReduceSum");
    // the hardware sums per 256-B repeat, then the partials; mimic that order in fp32
    uint32_t per = ONE_REPEAT_BYTE_SIZE / sizeof(T);
    float total = 0.f;
    for (uint32_t r = 0; r < uint32_t(n); r += per) {
        float part = 0.f;
        for (uint32_t i = r; i < std::min<uint32_t>(r + per, uint32_t(n)); ++i) part += float(s.ptr()[i]);
        total += part;
    }
    d.ptr()[0] = T(total);
}
template <typename T>
inline void ReduceMax(const LocalTensor<T>& d, const LocalTensor<T>& s, const LocalTensor<T>& tmp, int32_t n,
                      bool calIndex = false) {
    (void)calIndex;
    s.vecOperand(uint32_t(n), "ReduceMax"); d.vecOperand(1, "ReduceMax"); checkReduceTmp(tmp, uint32_t(n), "ReduceMax");
    float m = -INFINITY;
    for (int32_t i = 0; i < n; ++i) m = std::fmax(m, float(s.ptr()[i]));
    d.ptr()[0] = T(m);
}

// CompareScalar: bit i of dst (uint8 bitstream, LSB first) = (src[i] cmp scalar)
template <typename T, typename U>
inline void CompareScalar(const LocalTensor<U>& dst, const LocalTensor<T>& src, const T scalar, CMPMODE mode,
                          uint32_t n) {
    if ((uint64_t(n) * sizeof(T)) % ONE_REPEAT_BYTE_SIZE != 0)
        emu::fail("CompareScalar: count * sizeof(T) = " + std::to_string(n * sizeof(T)) +
                  " B is not a multiple of the 256-B repeat");
    EMU_CHECK(n * sizeof(T) / ONE_REPEAT_BYTE_SIZE <= MAX_REPEAT_TIMES, "CompareScalar: more than 255 repeats");
    src.vecOperand(n, "CompareScalar");
    LocalTensor<uint8_t> bits = dst.template ReinterpretCast<uint8_t>();
    bits.vecOperand(n / 8, "CompareScalar");
    float s = float(scalar);
    for (uint32_t i = 0; i < n; ++i) {
        float x = float(src.ptr()[i]);
        bool r = false;
        switch (mode) {
            case CMPMODE::LT: r = x < s; break;
            case CMPMODE::GT: r = x > s; break;
            case CMPMODE::EQ: r = x == s; break;
            case CMPMODE::LE: r = x <= s; break;
            case CMPMODE::GE: r = x >= s; break;
            case CMPMODE::NE: r = x != s; break;
        }
        uint8_t& byte = bits.ptr()[i / 8];
        byte = uint8_t(r ? (byte | (1u << (i % 8))) : (byte & ~(1u << (i % 8))));
    }
}

// Select, tensor-scalar mode: dst[i] = bit(sel, i) ? src0[i] : scalar
template <typename T, typename U>
inline void Select(const LocalTensor<T>& dst, const LocalTensor<U>& sel, const LocalTensor<T>& src0, T scalar,
                   SELMODE mode, uint32_t n) {
    EMU_CHECK(mode == SELMODE::VSEL_TENSOR_SCALAR_MODE, "Select: the harness implements the tensor-scalar mode only");
    dst.vecOperand(n, "Select"); src0.vecOperand(n, "Select");
    LocalTensor<uint8_t> bits = sel.template ReinterpretCast<uint8_t>();
    bits.vecOperand((n + 7) / 8, "Select");
    for (uint32_t i = 0; i < n; ++i) dst.ptr()[i] = ((bits.ptr()[i / 8] >> (i % 8)) & 1u) ? src0.ptr()[i] : scalar;
}

struct GatherMaskParams {
    GatherMaskParams() = default;
    GatherMaskParams(uint8_t bs, uint16_t rt, uint16_t rs, uint8_t s1rs)
        : src0BlockStride(bs), repeatTimes(rt), src0RepeatStride(rs), src1RepeatStride(s1rs) {}
    uint8_t src0BlockStride = 1;
    uint16_t repeatTimes = 0;
    uint16_t src0RepeatStride = 8;
    uint8_t src1RepeatStride = 8;
};
// GatherMask, user pattern: keep src0[i] where bit i of the pattern bitstream is set, packed into dst.
template <typename T, typename U>
inline void GatherMask(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<U>& pattern,
                       const bool reduceMode, const uint32_t mask, const GatherMaskParams& p, uint64_t& rsvdCnt) {
    static_assert(sizeof(U) == sizeof(T) || (sizeof(T) == 4 && sizeof(U) == 4) || (sizeof(T) == 2 && sizeof(U) == 2),
                  "GatherMask: pattern must be uint16_t for 2-byte T and uint32_t for 4-byte T");
    EMU_CHECK(p.src0BlockStride == 1 && p.src0RepeatStride == 8, "GatherMask: the harness implements contiguous src0 only");
    uint32_t per = ONE_REPEAT_BYTE_SIZE / sizeof(T);
    uint32_t n = reduceMode ? mask : uint32_t(p.repeatTimes) * per;
    EMU_CHECK((n + per - 1) / per <= MAX_REPEAT_TIMES, "GatherMask: more than 255 repeats of 256 B");
    src0.vecOperand(n, "GatherMask");
    LocalTensor<uint8_t> bits = pattern.template ReinterpretCast<uint8_t>();
    bits.vecOperand((n + 7) / 8, "GatherMask");
    dst.vecOperand(0, "GatherMask");
    uint64_t k = 0;
    std::vector<T> sv(src0.ptr(), src0.ptr() + n);
    for (uint32_t i = 0; i < n; ++i)
        if ((bits.ptr()[i / 8] >> (i % 8)) & 1u) {
            dst.check(k, 1);
            dst.ptr()[k++] = sv[i];
        }
    rsvdCnt = k;
}

// Gather (UB): dst[i] = *(T*)((uint8_t*)src + srcBaseAddr + offset[i])  (offsets in bytes)
template <typename T>
inline void Gather(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<uint32_t>& offset,
                   const uint32_t srcBaseAddr, const uint32_t n) {
    dst.vecOperand(n, "Gather"); offset.vecOperand(n, "Gather"); src.vecOperand(0, "Gather");
    for (uint32_t i = 0; i < n; ++i) {
        uint32_t byteOff = srcBaseAddr + offset.ptr()[i];
        EMU_CHECK(byteOff % sizeof(T) == 0, "Gather: byte offset not a multiple of sizeof(T)");
        src.check(byteOff / sizeof(T), 1);
        dst.ptr()[i] = src.ptr()[byteOff / sizeof(T)];
    }
}

// CreateVecIndex: dst[i] = first + i
template <typename T>
inline void CreateVecIndex(const LocalTensor<T>& dst, const T first, uint32_t n) {
    dst.vecOperand(n, "CreateVecIndex");
    for (uint32_t i = 0; i < n; ++i) dst.ptr()[i] = T(float(first) + float(i));
}
template <>
inline void CreateVecIndex<int32_t>(const LocalTensor<int32_t>& dst, const int32_t first, uint32_t n) {
    dst.vecOperand(n, "CreateVecIndex");
    for (uint32_t i = 0; i < n; ++i) dst.ptr()[i] = first + int32_t(i);
}
}  // namespace AscendC
