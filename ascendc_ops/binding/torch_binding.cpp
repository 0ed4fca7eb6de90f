// torch_npu binding of the sparsedge AscendC kernels: PrivateUse1 implementations of the `sparsedge` op schema
// (declared once in Python, sparsedge/ops).  Each implementation checks its inputs, computes the host tiling
// (include/sparsedge_tiling.h), allocates outputs and GM workspace as NPU tensors, and launches the kernels
// inside at_npu::native::OpCommand::SetCustomHandler so they are ordered with torch_npu's task queue.
//
// Build: ascendc_ops/CMakeLists.txt (needs CANN + torch_npu).  CI compiles this file two more ways without an NPU:
//   * -fsyntax-only against the torch-npu wheel's headers (tests/test_ascend_compile.py)
//   * with -DSPARSEDGE_FAKE_NPU against tests' fake OpCommand / NPUStream / acl shims and the emulated
//     launchers, then calls the registered PrivateUse1 kernels on CPU tensors (tests/test_ascend_dispatch.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "acl/acl.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

#include "sparsedge/activations.h"  // backends/include: the activation names every binding shares
#include "sparsedge_launch.h"
#include "sparsedge_tiling.h"

namespace sparsedge_npu {

#ifdef SPARSEDGE_FAKE_NPU
#define SD_CHECK_DEVICE(t, name) (void)(t)
#else
#define SD_CHECK_DEVICE(t, name) \
    TORCH_CHECK((t).device().type() == c10::DeviceType::PrivateUse1, "sparsedge (npu): ", name, " must be an NPU tensor")
#endif

int chip() {
    const char* soc = aclrtGetSocName();
    std::string s = soc ? soc : "";
    if (s.find("910B") != std::string::npos || s.find("910_93") != std::string::npos) return SD_CHIP_910B;
    if (s.find("310B") != std::string::npos) return SD_CHIP_310B;
    TORCH_CHECK(false, "sparsedge (npu): unsupported SoC '", s, "': the kernels are built for Ascend310B and Ascend910B");
    return -1;
}

uint32_t core_num(int chipId, const at::Tensor& t) {
    int64_t n = 0;
    uint32_t dev = t.device().has_index() ? uint32_t(t.device().index()) : 0u;
    // 910B: vector-only kernels launch on the AIV cores; 310B: coupled AI cores
    aclDeviceInfo what = chipId == SD_CHIP_910B ? ACL_DEVICE_INFO_VECTOR_CORE_NUM : ACL_DEVICE_INFO_AI_CORE_NUM;
    aclError rc = aclGetDeviceCapability(dev, what, &n);
    TORCH_CHECK(rc == ACL_SUCCESS && n > 0, "sparsedge (npu): aclGetDeviceCapability failed (", int(rc), ")");
    return uint32_t(n);
}

int dtype_of(const at::Tensor& x, int chipId) {
    if (x.scalar_type() == at::kHalf) return SD_F16;
    if (x.scalar_type() == at::kBFloat16) {
        TORCH_CHECK(chipId == SD_CHIP_910B, "sparsedge (npu): bf16 kernels exist for Ascend910B only; use fp16 on 310B");
        return SD_BF16;
    }
    TORCH_CHECK(false, "sparsedge (npu): kernels take fp16 (310B, 910B) or bf16 (910B), got ", x.scalar_type());
    return -1;
}

// the kernels' activation ids are the shared enum's values (the emulation build static_asserts it); unknown names
// throw std::invalid_argument (a ValueError in Python) listing the supported ones
uint32_t activation_id(const std::string& a) { return uint32_t(sparsedge::parse_activation(a)); }

void check_tiling(int rc, const char* what) {
    TORCH_CHECK(rc == SD_OK, "sparsedge (npu): ", what, " tiling failed (status ", rc,
                rc == SD_ERR_UB ? ": shape does not fit the Unified Buffer" : ": invalid shape", ")");
}

void* ptr(const at::Tensor& t) { return t.defined() ? const_cast<void*>(t.data_ptr()) : nullptr; }

void* stream() { return (void*)c10_npu::getCurrentNPUStream().stream(false); }

at::Tensor workspace(uint64_t bytes, const at::Tensor& like) {
    return at::empty({int64_t(bytes > 0 ? bytes : 32)}, like.options().dtype(at::kByte));
}

void check_weights(const at::Tensor& x, const at::Tensor& w, const char* name) {
    SD_CHECK_DEVICE(w, name);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "sparsedge (npu): ", name, " must be [I, d] with d = x.size(1)");
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.is_contiguous(), "sparsedge (npu): ", name,
                " must be contiguous and of x's dtype");
}

// ------------------------------------------------------------------------------------------ FFN
struct FfnInputs {
    at::Tensor x, p1, p2, bias, wg, wu, wd, idx, count;
};

// launches the main kernel + the reduce (or concat) kernel; returns nothing, fills outs
void run_ffn(int mode, const FfnInputs& in, const std::string& activation, double actParam, double tau,
             at::Tensor y, at::Tensor idxOut, at::Tensor countOut, at::Tensor downOut) {
    const at::Tensor& x = in.x;
    int c = chip();
    int dt = dtype_of(x, c);
    uint32_t T = uint32_t(x.size(0)), d = uint32_t(x.size(1)), I = uint32_t(in.wg.defined() ? in.wg.size(0) : in.p2.size(0));
    uint32_t r = in.p1.defined() ? uint32_t(in.p1.size(0)) : 0u;
    uint32_t act = mode == SD_FFN_PREDICT ? 0u : activation_id(activation);
    SdFfnTiling t;
    check_tiling(sd_ffn_tiling(c, mode, T, d, r, I, 2, core_num(c, x), &t), "sparse FFN");
    at::Tensor ws = workspace(t.wsBytes, x);
    at::Tensor scratch = mode == SD_FFN_ROWS ? at::empty({int64_t(T)}, x.options().dtype(at::kInt)) : at::Tensor();
    void* s = stream();
    at_npu::native::OpCommand cmd;
    cmd.Name(mode == SD_FFN_PREDICT ? "sparsedge_ffn_predict" : mode == SD_FFN_ROWS ? "sparsedge_sparse_ffn_rows"
                                                                                     : "sparsedge_sparse_ffn");
    // tensors are captured by value: their storage lives until the queued task has launched
    cmd.SetCustomHandler([=]() -> int {
        sd_launch_ffn(dt, t.blockDim, s, ptr(in.x), ptr(in.p1), ptr(in.p2), ptr(in.bias), ptr(in.wg), ptr(in.wu),
                      ptr(in.wd), ptr(in.idx), ptr(in.count), ptr(ws), T, d, r, I, uint32_t(mode), act,
                      float(actParam), float(tau), t.dPad, t.rPad, t.nPerCore, t.nTile, t.p2Rows);
        if (mode == SD_FFN_PREDICT) {
            sd_launch_ffn_concat(t.redBlockDim, s, ptr(ws), ptr(idxOut), ptr(countOut), T, I, t.dPad, t.blockDim,
                                 t.nPerCore);
        } else {
            sd_launch_ffn_reduce(dt, t.redBlockDim, s, ptr(ws), ptr(y), ptr(countOut.defined() ? countOut : scratch),
                                 ptr(downOut), T, d, t.dPad, t.blockDim, t.redCols);
        }
        return 0;
    });
    cmd.Run();
}

FfnInputs predictor_inputs(const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& bias) {
    SD_CHECK_DEVICE(x, "x");
    TORCH_CHECK(x.dim() == 2, "sparsedge (npu): x must be [T, d]");
    FfnInputs in;
    in.x = x.contiguous();
    check_weights(in.x, p1, "p1");
    TORCH_CHECK(p2.dim() == 2 && p2.size(1) == p1.size(0) && p2.scalar_type() == x.scalar_type(),
                "sparsedge (npu): p2 must be [I, r] of x's dtype");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == p2.size(0), "sparsedge (npu): bias must be [I]");
    in.p1 = p1;
    in.p2 = p2.contiguous();
    in.bias = bias.to(x.device(), at::kFloat).contiguous();
    return in;
}

std::tuple<at::Tensor, at::Tensor> ffn_predict(const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
                                               const at::Tensor& bias) {
    FfnInputs in = predictor_inputs(x, p1, p2, bias);
    int64_t T = x.size(0), I = p2.size(0);
    at::Tensor idx = at::empty({T, I}, x.options().dtype(at::kInt));
    at::Tensor count = at::empty({T}, x.options().dtype(at::kInt));
    run_ffn(SD_FFN_PREDICT, in, "relu", 0.0, 0.0, at::Tensor(), idx, count, at::Tensor());
    return {idx, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn(const at::Tensor& x, const at::Tensor& p1,
                                                          const at::Tensor& p2, const at::Tensor& bias,
                                                          const at::Tensor& w_gate, const at::Tensor& w_up,
                                                          const at::Tensor& w_down_t, c10::string_view activation,
                                                          double act_param, double tau) {
    FfnInputs in = predictor_inputs(x, p1, p2, bias);
    check_weights(in.x, w_gate, "w_gate");
    check_weights(in.x, w_up, "w_up");
    check_weights(in.x, w_down_t, "w_down_t");
    TORCH_CHECK(w_gate.size(0) == p2.size(0), "sparsedge (npu): w_gate rows must equal p2 rows (I)");
    in.wg = w_gate; in.wu = w_up; in.wd = w_down_t;
    int64_t T = x.size(0);
    at::Tensor y = at::empty_like(in.x);
    at::Tensor count = at::empty({T}, x.options().dtype(at::kInt));
    at::Tensor down = at::empty({T}, x.options().dtype(at::kInt));
    run_ffn(SD_FFN_FUSED, in, std::string(activation), act_param, tau, y, at::Tensor(), count, down);
    return {y, count, down};
}

std::tuple<at::Tensor, at::Tensor> sparse_ffn_rows(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count,
                                                   const at::Tensor& w_gate, const at::Tensor& w_up,
                                                   const at::Tensor& w_down_t, c10::string_view activation,
                                                   double act_param, double tau) {
    SD_CHECK_DEVICE(x, "x");
    TORCH_CHECK(x.dim() == 2, "sparsedge (npu): x must be [T, d]");
    FfnInputs in;
    in.x = x.contiguous();
    check_weights(in.x, w_gate, "w_gate");
    check_weights(in.x, w_up, "w_up");
    check_weights(in.x, w_down_t, "w_down_t");
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.size(1) == w_gate.size(0) &&
                    idx.scalar_type() == at::kInt, "sparsedge (npu): idx must be int32 [T, I]");
    TORCH_CHECK(count.dim() == 1 && count.size(0) == x.size(0) && count.scalar_type() == at::kInt,
                "sparsedge (npu): count must be int32 [T]");
    in.wg = w_gate; in.wu = w_up; in.wd = w_down_t;
    in.idx = idx.contiguous();
    in.count = count.contiguous();
    at::Tensor y = at::empty_like(in.x);
    at::Tensor down = at::empty({x.size(0)}, x.options().dtype(at::kInt));
    run_ffn(SD_FFN_ROWS, in, std::string(activation), act_param, tau, y, at::Tensor(), at::Tensor(), down);
    return {y, down};
}

// 4-bit gate x up predictor: sparsedge_ffn_q4 (per-core active lists in the workspace) + sparsedge_ffn_concat
std::tuple<at::Tensor, at::Tensor> ffn_predict_q4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                                                  const at::Tensor& thresh, c10::string_view activation,
                                                  double act_param) {
    SD_CHECK_DEVICE(x, "x");
    SD_CHECK_DEVICE(q, "q");
    TORCH_CHECK(x.dim() == 2, "sparsedge (npu): x must be [T, d]");
    int64_t T = x.size(0), d = x.size(1), I = q.size(0);
    TORCH_CHECK(q.dim() == 3 && q.size(1) == 2 && q.size(2) * 2 == d && q.scalar_type() == at::kByte,
                "sparsedge (npu): q must be uint8 [I, 2, d/2]");
    TORCH_CHECK(scale.dim() == 3 && scale.size(0) == I && scale.size(1) == 2 && scale.size(2) > 0 &&
                    d % scale.size(2) == 0, "sparsedge (npu): scale must be [I, 2, d/G]");
    TORCH_CHECK(thresh.dim() == 1 && thresh.size(0) == I, "sparsedge (npu): thresh must be [I]");
    uint32_t G = uint32_t(d / scale.size(2));
    int c = chip();
    int dt = dtype_of(x, c);
    uint32_t act = activation_id(std::string(activation));
    SdFfnQ4Tiling t;
    check_tiling(sd_ffn_q4_tiling(c, uint32_t(T), uint32_t(d), G, uint32_t(I), 2, core_num(c, x), &t),
                 "ffn_predict_q4 (G must be a multiple of 16, at most 128)");
    at::Tensor xc = x.contiguous(), qc = q.contiguous();
    at::Tensor sc = scale.to(x.device(), at::kFloat).contiguous();
    at::Tensor th = thresh.to(x.device(), at::kFloat).contiguous();
    at::Tensor idx = at::empty({T, I}, x.options().dtype(at::kInt));
    at::Tensor count = at::empty({T}, x.options().dtype(at::kInt));
    at::Tensor ws = workspace(t.wsBytes, x);
    void* s = stream();
    at_npu::native::OpCommand cmd;
    cmd.Name("sparsedge_ffn_predict_q4");
    cmd.SetCustomHandler([=]() -> int {
        sd_launch_ffn_q4(dt, t.blockDim, s, ptr(xc), ptr(qc), ptr(sc), ptr(th), ptr(ws), uint32_t(T), uint32_t(d), G,
                         uint32_t(I), act, float(act_param), t.hPad, t.ngPad, t.nPerCore, t.nTile, t.qRows);
        // the q4 workspace has no partial-y region: concat reads it with dPad = 0
        sd_launch_ffn_concat(t.concatBlockDim, s, ptr(ws), ptr(idx), ptr(count), uint32_t(T), uint32_t(I), 0u,
                             t.blockDim, t.nPerCore);
        return 0;
    });
    cmd.Run();
    return {idx, count};
}

// ------------------------------------------------------------------------------- quantized FFN rows
// qsparse_ffn_rows (sdk/sparsedge/ops/qffn.py). The AscendC kernel (kernels/qffn.cpp) covers W8 only: q8_0 gate/up
// rows and a q8_0 W_down by neuron (int8 codes, no mins). Other formats run the op's composite reference, with a
// warning: CompositeExplicitAutograd is an alias key and cannot be redispatched to, but its kernel fills every backend
// key without a direct registration, and no sparsedge library registers PrivateUse3, so a redispatch there runs the
// reference (sparsedge.ops.qffn.qsparse_ffn_rows_ref), whose torch ops dispatch on the tensors' own (NPU) keys.
using QffnRowsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, c10::string_view, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, c10::string_view, double);

std::tuple<at::Tensor, at::Tensor> qsparse_ffn_rows(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count,
                                                    const at::Tensor& w_gate_up, c10::string_view qtype,
                                                    const at::Tensor& codes, const at::Tensor& scale,
                                                    const at::Tensor& minv, c10::string_view activation,
                                                    double act_param) {
    uint32_t act = activation_id(std::string(activation));  // unknown names: ValueError, before any fallback
    if (qtype != "q8_0" || codes.scalar_type() != at::kChar || minv.numel() != 0) {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("sparsedge::qsparse_ffn_rows", "")
                                   .typed<QffnRowsFn>();
        TORCH_CHECK(op.hasComputedKernelForDispatchKey(c10::DispatchKey::PrivateUse3),
                    "sparsedge (npu): qsparse_ffn_rows has an AscendC kernel for q8_0 gate/up with a q8_0 W_down only, "
                    "and the composite reference is not registered (import sparsedge.ops)");
        TORCH_WARN_ONCE("[npu] sparsedge::qsparse_ffn_rows has an AscendC kernel for q8_0 gate/up rows with a q8_0 "
                        "W_down only (got gate/up ", qtype, ", W_down ", codes.scalar_type() == at::kChar ? "int8" : "4-bit",
                        " codes); using the composite reference path, which is much slower.");
        return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::PrivateUse3), x, idx, count, w_gate_up, qtype,
                             codes, scale, minv, activation, act_param);
    }
    SD_CHECK_DEVICE(x, "x");
    SD_CHECK_DEVICE(w_gate_up, "w_gate_up");
    SD_CHECK_DEVICE(codes, "down_codes");
    TORCH_CHECK_VALUE(x.dim() == 2 && at::isFloatingType(x.scalar_type()),
                      "qsparse_ffn_rows: x must be a float [T, d] tensor, got ", x.scalar_type(), " ", x.sizes());
    const int64_t T = x.size(0), d = x.size(1), I = codes.dim() == 2 ? codes.size(0) : 0;
    TORCH_CHECK_VALUE(d > 0 && d % 32 == 0, "qsparse_ffn_rows: d=", d, " must be a positive multiple of 32 (q8_0)");
    TORCH_CHECK_VALUE(I > 0 && I % 32 == 0 && codes.size(1) == d,
                      "qsparse_ffn_rows: down codes must be int8 [I, d] with I a positive multiple of 32, got ",
                      codes.sizes());
    TORCH_CHECK_VALUE(w_gate_up.dim() == 2 && w_gate_up.scalar_type() == at::kByte && w_gate_up.size(0) == 2 * I &&
                          w_gate_up.size(1) == d / 32 * 34,
                      "qsparse_ffn_rows: w_gate_up must be uint8 [", 2 * I, ", ", d / 32 * 34, "] (q8_0 gate and up rows "
                      "of K=", d, "), got ", w_gate_up.scalar_type(), " ", w_gate_up.sizes());
    TORCH_CHECK_VALUE(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.size(0) == I / 32 &&
                          scale.size(1) == d,
                      "qsparse_ffn_rows: down scale must be float16 [", I / 32, ", ", d, "], got ", scale.sizes());
    TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == T && idx.size(1) == I && idx.scalar_type() == at::kInt &&
                          count.numel() == T && count.scalar_type() == at::kInt,
                      "qsparse_ffn_rows: idx must be int32 [", T, ", ", I, "] and count int32 [", T,
                      "] (ffn_predict's output)");
    at::Tensor y = at::empty({T, d}, x.options().dtype(at::kFloat));
    at::Tensor down = at::empty({T}, x.options().dtype(at::kInt));
    if (T == 0) return {y.to(x.scalar_type()), down};
    int c = chip();
    SdQffnTiling t;
    check_tiling(sd_qffn_rows_q8_tiling(c, uint32_t(T), uint32_t(d), uint32_t(I), core_num(c, x), &t),
                 "qsparse_ffn_rows (q8_0)");
    // the kernel reads x in fp32 (x is rounded to int8 blocks from its fp32 values, as the reference does); count is
    // clamped to [0, I] on the device (reading it back here would synchronise the stream)
    at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor ic = idx.contiguous(), cc = count.contiguous(), wc = w_gate_up.contiguous(), dc = codes.contiguous(),
               sc = scale.contiguous();
    at::Tensor ws = workspace(t.wsBytes, x);
    void* s = stream();
    at_npu::native::OpCommand cmd;
    cmd.Name("sparsedge_qsparse_ffn_rows_q8");
    cmd.SetCustomHandler([=]() -> int {
        sd_launch_qffn_rows_q8(t.blockDim, s, ptr(xf), ptr(ic), ptr(cc), ptr(wc), ptr(dc), ptr(sc), ptr(ws),
                               uint32_t(T), uint32_t(d), uint32_t(I), act, float(act_param), t.bPerCore, t.nbxPad,
                               t.nTile, t.nList);
        sd_launch_qffn_reduce(t.redBlockDim, s, ptr(ws), ptr(y), ptr(down), uint32_t(T), uint32_t(d), t.blockDim,
                              t.redCols);
        return 0;
    });
    cmd.Run();
    return {x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()), down};
}

// ---------------------------------------------------------------------------------------- delta
at::Tensor delta_encode(const at::Tensor& k, at::Tensor& ref, const at::Tensor& theta, at::Tensor& values,
                        at::Tensor& chan, at::Tensor& offsets, int64_t start) {
    SD_CHECK_DEVICE(k, "k");
    TORCH_CHECK(k.dim() == 3, "sparsedge (npu): k must be [T, H, D]");
    int64_t T = k.size(0), H = k.size(1), D = k.size(2);
    TORCH_CHECK(ref.scalar_type() == at::kFloat && ref.is_contiguous() && ref.size(0) == H && ref.size(1) == D,
                "sparsedge (npu): ref must be contiguous fp32 [H, D]");
    TORCH_CHECK(values.is_contiguous() && values.scalar_type() == k.scalar_type() && values.size(0) == H,
                "sparsedge (npu): values must be contiguous [H, cap] of k's dtype");
    TORCH_CHECK(chan.is_contiguous() && chan.scalar_type() == at::kByte && chan.sizes() == values.sizes(),
                "sparsedge (npu): chan must be contiguous uint8 [H, cap]");
    TORCH_CHECK(offsets.is_contiguous() && offsets.scalar_type() == at::kInt && offsets.size(0) == H &&
                    start + T < offsets.size(1), "sparsedge (npu): offsets must be contiguous int32 [H, Tmax+1]");
    int c = chip();
    int dt = dtype_of(k, c);
    SdDeltaEncodeTiling t;
    check_tiling(sd_delta_encode_tiling(c, uint32_t(T), uint32_t(H), uint32_t(D), 2, core_num(c, k), &t), "delta encode");
    at::Tensor kc = k.contiguous();
    at::Tensor th = theta.to(k.device(), at::kFloat).contiguous();  // theta may live on the host
    at::Tensor status = at::zeros({8}, k.options().dtype(at::kInt));
    void* s = stream();
    uint32_t cap = uint32_t(values.size(1)), offStride = uint32_t(offsets.size(1));
    for (int64_t t0 = 0; t0 < T; t0 += t.maxTokens) {
        uint32_t n = uint32_t(std::min<int64_t>(t.maxTokens, T - t0));
        at::Tensor kt = kc.narrow(0, t0, n);
        at_npu::native::OpCommand cmd;
        cmd.Name("sparsedge_delta_encode");
        cmd.SetCustomHandler([=]() -> int {
            sd_launch_delta_encode(dt, t.blockDim, s, ptr(kt), ptr(ref), ptr(th), ptr(values), ptr(chan), ptr(offsets),
                                   ptr(status), n, uint32_t(H), uint32_t(D), cap, offStride, uint32_t(start + t0),
                                   t.dPad, t.maxTokens);
            return 0;
        });
        cmd.Run();
    }
    // the packed buffer must never overflow silently. Positions < start hold at most D entries each, so when
    // (start + T) * D <= cap it cannot, and the device->host read (a stream sync) is skipped: the common case of a
    // buffer sized for the context, and every decode step until the buffer nears full
    if ((start + T) * D > int64_t(cap)) {
        at::Tensor st = status.cpu();
        const int32_t* sv = st.data_ptr<int32_t>();
        TORCH_CHECK(sv[0] == 0, "delta buffer capacity exceeded: head ", sv[1], " needs ", sv[2], " > ", sv[3],
                    " entries");
    }
    return (offsets.select(1, start + T) - offsets.select(1, start)).to(at::kLong);
}

at::Tensor delta_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_cache,
                           const at::Tensor& values, const at::Tensor& chan, const at::Tensor& offsets,
                           const at::Tensor& sink_k, const at::Tensor& window_k, int64_t start, int64_t n_sink,
                           int64_t window, double scale) {
    SD_CHECK_DEVICE(q, "q");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0), "sparsedge (npu): q [T, Hq, D], k [T, H, D]");
    int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), H = k.size(1);
    TORCH_CHECK(Hq % H == 0 && Hq / H <= 32, "sparsedge (npu): Hq must be a multiple of H with Hq / H <= 32");
    TORCH_CHECK(v_cache.is_contiguous() && v_cache.size(0) == H && v_cache.size(2) == D && start + T <= v_cache.size(1),
                "sparsedge (npu): v_cache must be contiguous [H, Tmax, D]");
    TORCH_CHECK(window == 0 || window_k.size(1) >= window, "sparsedge (npu): window_k must hold `window` slots");
    for (const at::Tensor* t : {&k, &v_cache, &values, &sink_k, &window_k})
        TORCH_CHECK(t->scalar_type() == q.scalar_type(), "sparsedge (npu): q, k, v_cache, values, sink_k, window_k share one dtype");
    int c = chip();
    int dt = dtype_of(q, c);
    uint32_t cores = core_num(c, q);
    at::Tensor qc = q.contiguous(), kc = k.contiguous(), sk = sink_k.contiguous();
    at::Tensor out = at::empty_like(qc);
    // decode is one launch; a chunk of T > 1 tokens runs token by token, each with the window ring as that token
    // sees it (the chunk's earlier keys written into their slots), which is exactly the reference's semantics
    at::Tensor win = T > 1 && window > 0 ? window_k.clone() : window_k.contiguous();
    void* s = stream();
    for (int64_t i = 0; i < T; ++i) {
        uint32_t pos = uint32_t(start + i);
        SdDeltaAttnTiling t;
        check_tiling(sd_delta_attn_tiling(c, uint32_t(H), uint32_t(Hq), uint32_t(D), pos + 1, 2, cores, &t),
                     "delta attention");
        at::Tensor ws = workspace(t.wsBytes, q);
        at::Tensor qi = qc.select(0, i), ki = kc.select(0, i), oi = out.select(0, i);
        at_npu::native::OpCommand cmd;
        cmd.Name("sparsedge_delta_attention");
        cmd.SetCustomHandler([=]() -> int {
            sd_launch_delta_attention(dt, t.blockDim, s, ptr(qi), ptr(ki), ptr(v_cache), ptr(values), ptr(chan),
                                      ptr(offsets), ptr(sk), ptr(win), ptr(oi), ptr(ws), uint32_t(H), t.G, uint32_t(D),
                                      uint32_t(v_cache.size(1)), uint32_t(values.size(1)), uint32_t(sk.size(1)),
                                      uint32_t(win.size(1)), pos, uint32_t(n_sink), uint32_t(window), float(scale),
                                      t.dPad, t.chunk, t.entTile, t.nPad);
            return 0;
        });
        cmd.Run();
        if (T > 1 && window > 0) win.select(1, int64_t(pos % uint32_t(window))).copy_(ki);
    }
    return out;
}

// The delta cache's decode step (sdk/sparsedge/ops/delta.py delta_step_ref): the two kernels above plus slice copies
// on the stream, in the reference's order. One op call per layer instead of five from Python.
at::Tensor delta_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& ref,
                      const at::Tensor& theta, at::Tensor& values, at::Tensor& chan, at::Tensor& offsets,
                      const at::Tensor& sink_k, at::Tensor& window_k, at::Tensor& v_cache, int64_t pos,
                      int64_t n_sink, int64_t window, double scale) {
    SD_CHECK_DEVICE(q, "q");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
                "delta_step: one token per call (q [1, Hq, D], k and v [1, H, D])");
    const int64_t Tmax = v_cache.size(1), H = k.size(1);
    TORCH_CHECK(pos >= n_sink && pos >= window && pos < Tmax, "delta_step: position ", pos, " needs n_sink (", n_sink,
                ") <= pos, window (", window, ") <= pos and pos < ", Tmax, " (the cache's tokens)");
    TORCH_CHECK(window == 0 || (window_k.dim() == 3 && window_k.size(1) == window),
                "delta_step: window_k must be [H, window, D]");
    const int64_t e = pos - window;
    v_cache.select(1, pos).copy_(v[0]);
    if (window == 0) {
        delta_encode(k, ref, theta, values, chan, offsets, pos);
        return delta_attention(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window, scale);
    }
    at::Tensor slot = window_k.select(1, pos % window);  // position e's key, which k replaces afterwards
    delta_encode(slot.unsqueeze(0), ref, theta, values, chan, offsets, e);
    offsets.narrow(1, e + 2, window).copy_(offsets.narrow(1, e + 1, 1).expand({H, window}));  // the window: empty
    at::Tensor out = delta_attention(q, k, v_cache, values, chan, offsets, sink_k, window_k, pos, n_sink, window, scale);
    slot.copy_(k[0]);
    return out;
}

}  // namespace sparsedge_npu

TORCH_LIBRARY_IMPL(sparsedge, PrivateUse1, m) {
    m.impl("ffn_predict", &sparsedge_npu::ffn_predict);
    m.impl("ffn_predict_q4", &sparsedge_npu::ffn_predict_q4);
    m.impl("sparse_ffn", &sparsedge_npu::sparse_ffn);
    m.impl("sparse_ffn_rows", &sparsedge_npu::sparse_ffn_rows);
    m.impl("delta_encode", &sparsedge_npu::delta_encode);
    m.impl("delta_attention", &sparsedge_npu::delta_attention);
    m.impl("delta_step", &sparsedge_npu::delta_step);
    m.impl("qsparse_ffn_rows", &sparsedge_npu::qsparse_ffn_rows);
}

// which kernels this library carries (read by sparsedge.backends.npu for `sparsedge doctor`)
extern "C" const char* sparsedge_ascend_build_info() {
    // one literal: tests/test_ops.py reads this list from the source
    return "ops=ffn_predict,sparse_ffn,sparse_ffn_rows,delta_encode,delta_attention,delta_step,ffn_predict_q4,qsparse_ffn_rows"
#ifdef SPARSEDGE_SOC_VERSION
           ";soc=" SPARSEDGE_SOC_VERSION
#endif
#ifdef SPARSEDGE_FAKE_NPU
           ";fake=1"
#endif
        ;
}
