// Torch glue of qlinear on CUDA (quant.cu): the same checks and error messages as the CPU kernel
// (backends/cpu/quant_linear.cpp; ValueError for a bad qtype / K / shape), the int8-x workspace and the fp32
// output from torch's caching allocator, the launch on the current stream. Registered for the CUDA dispatch
// key of sparsedge::qlinear beside binding.cpp's kernels (one library, several TORCH_LIBRARY_IMPL blocks).
// qsparse_ffn and qsparse_ffn_rows (qffn.cu) likewise: the CPU kernel's checks (backends/cpu/quant_sparse_ffn.cpp),
// workspace, launch.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>
#include <tuple>

#include "quant.h"

namespace sparsedge::cuda {
namespace {

const QTypeInfo& qtype_info(c10::string_view qtype) {
  std::string low, names;
  for (char c : qtype) low += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& t : kQTypes) {
    if (low == t.name) return t;
    names += (names.empty() ? "" : ", ") + std::string(t.name);
  }
  TORCH_CHECK_VALUE(false, "unsupported quantization type '", std::string(qtype), "'; supported: ", names);
  return kQTypes[0];  // unreachable
}

at::Tensor qlinear_cuda(const at::Tensor& x_in, const at::Tensor& w_in, c10::string_view qtype, int64_t K) {
  const QTypeInfo& qt = qtype_info(qtype);
  TORCH_CHECK_VALUE(K > 0 && K % qt.block == 0, qt.name, ": the row length K=", K,
                    " must be a positive multiple of its block size ", qt.block);
  const int64_t rb = K / qt.block * qt.size;
  TORCH_CHECK_VALUE(w_in.dim() == 2 && w_in.scalar_type() == at::kByte && w_in.size(1) == rb,
                    "qlinear: w must be uint8 [N, ", rb, "] (", qt.name, " rows of K=", K, "), got ",
                    w_in.scalar_type(), " ", w_in.sizes());
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == K && at::isFloatingType(x_in.scalar_type()),
                    "qlinear: x must be a float tensor [..., ", K, "], got ", x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK(x_in.is_cuda() && w_in.is_cuda() && x_in.device() == w_in.device(),
              "qlinear: x and w must be on the same CUDA device, got ", x_in.device(), " and ", w_in.device());
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = w_in.size(0), T = x_in.numel() / K;
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  // x in fp32 / fp16 / bf16 as it is; anything else (fp64) as fp32
  const auto xs = x_in.scalar_type();
  auto x = (xs == at::kFloat || xs == at::kHalf || xs == at::kBFloat16 ? x_in : x_in.to(at::kFloat))
               .reshape({T, K}).contiguous();
  const DType xt = x.scalar_type() == at::kHalf ? DType::F16 : x.scalar_type() == at::kBFloat16 ? DType::BF16 : DType::F32;
  auto w = w_in.contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 2 == 0, "qlinear: w must be 2-byte aligned");
  auto y = at::empty({T, N}, x.options().dtype(at::kFloat));
  at::Tensor ws = at::empty({std::max<int64_t>(qlinear_workspace_bytes(T, K), 256)}, x.options().dtype(at::kByte));
  const cudaError_t err = qlinear(x.data_ptr(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), T, N, K, qt.type, xt,
                                  ws.data_ptr(), c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "qlinear: CUDA launch failed: ", cudaGetErrorString(err));
  return y.to(x_in.scalar_type()).reshape(sizes);
}

// a contiguous tensor whose data is `align`-byte aligned (a fresh copy when a view's offset misaligns it)
at::Tensor aligned(const at::Tensor& t, uintptr_t align) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % align == 0 ? c : c.clone();
}

// qsparse_ffn and qsparse_ffn_rows (qffn.cu): the CPU kernel's checks and messages (backends/cpu/quant_sparse_ffn.cpp,
// qffn()), in its order, with the op's name; thresh set for qsparse_ffn, idx / count for qsparse_ffn_rows.
std::tuple<at::Tensor, at::Tensor> qffn_cuda(const char* op, const at::Tensor& x_in, const at::Tensor& w_in,
                                             c10::string_view qtype, const at::Tensor& codes_in,
                                             const at::Tensor& scale_in, const at::Tensor& minv_in,
                                             const at::Tensor* thresh_in, const at::Tensor* idx_in,
                                             const at::Tensor* count_in, c10::string_view activation,
                                             double act_param) {
  const QTypeInfo& qt = qtype_info(qtype);
  const Act act = sparsedge::parse_activation(std::string_view(activation.data(), activation.size()));
  TORCH_CHECK_VALUE(qt.block > 1, op, ": gate/up format ", qt.name, " is not block-quantized");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && at::isFloatingType(x_in.scalar_type()), op,
                    ": x must be a float [T, d] tensor");
  const int64_t T = x_in.size(0), d = x_in.size(1), I = thresh_in ? thresh_in->numel() : codes_in.size(0);
  constexpr int64_t QK = 32;
  TORCH_CHECK_VALUE(d > 0 && d % qt.block == 0 && d % QK == 0, op, ": d=", d, " must be a multiple of ", qt.block);
  if (thresh_in) {
    TORCH_CHECK_VALUE(thresh_in->dim() == 1 && thresh_in->scalar_type() == at::kFloat && I > 0 && I % QK == 0, op,
                      ": thresh must be float32 [I], I a positive multiple of 32");
  } else {
    TORCH_CHECK_VALUE(I > 0 && I % QK == 0 && idx_in->dim() == 2 && idx_in->size(0) == T && idx_in->size(1) == I &&
                          idx_in->scalar_type() == at::kInt && count_in->numel() == T &&
                          count_in->scalar_type() == at::kInt,
                      op, ": idx must be int32 [T, I] and count int32 [T] (sparsedge::ffn_predict's output), I a "
                      "positive multiple of 32");
  }
  const int64_t rb = d / qt.block * qt.size;
  TORCH_CHECK_VALUE(w_in.dim() == 2 && w_in.scalar_type() == at::kByte && w_in.size(0) == 2 * I && w_in.size(1) == rb,
                    op, ": w_gate_up must be uint8 [", 2 * I, ", ", rb, "], got ", w_in.sizes());
  const bool four = codes_in.scalar_type() == at::kByte;
  TORCH_CHECK_VALUE(codes_in.dim() == 2 && codes_in.size(0) == I && codes_in.size(1) == (four ? d / 2 : d) &&
                        (four || codes_in.scalar_type() == at::kChar),
                    op, ": down codes must be uint8 [I, d/2] or int8 [I, d], got ", codes_in.scalar_type(), " ",
                    codes_in.sizes());
  TORCH_CHECK_VALUE(scale_in.scalar_type() == at::kHalf && scale_in.dim() == 2 && scale_in.size(0) == I / QK &&
                        scale_in.size(1) == d,
                    op, ": down scale must be float16 [I/32, d]");
  const bool has_min = minv_in.numel() > 0;
  TORCH_CHECK_VALUE(!has_min || (minv_in.scalar_type() == at::kHalf && minv_in.dim() == 2 &&
                                 minv_in.size(0) == I / QK && minv_in.size(1) == d),
                    op, ": down min must be empty or float16 [I/32, d]");
  TORCH_CHECK_VALUE(has_min || !four, op, ": 4-bit down codes need their mins");
  const auto dev = x_in.device();
  TORCH_CHECK(x_in.is_cuda() && w_in.device() == dev && codes_in.device() == dev && scale_in.device() == dev &&
                  (!thresh_in || thresh_in->device() == dev) && (!idx_in || idx_in->device() == dev) &&
                  (!count_in || count_in->device() == dev) && (!has_min || minv_in.device() == dev),
              op, ": x, w_gate_up, down_codes, down_scale, down_min and ", thresh_in ? "thresh" : "idx, count",
              " must be on the same CUDA device, got x on ", dev);
  c10::cuda::CUDAGuard guard(dev);
  // x in fp32 / fp16 / bf16 as it is; anything else (fp64) as fp32, y cast back at the end
  const auto xs = x_in.scalar_type();
  auto x = (xs == at::kFloat || xs == at::kHalf || xs == at::kBFloat16 ? x_in : x_in.to(at::kFloat)).contiguous();
  const DType xt = x.scalar_type() == at::kHalf       ? DType::F16
                   : x.scalar_type() == at::kBFloat16 ? DType::BF16
                                                      : DType::F32;
  auto y = at::empty({T, d}, x.options());
  auto count = at::empty({T}, x.options().dtype(at::kInt));
  if (T == 0) return {y.to(xs), count};
  // qsparse_ffn_rows: count[t] is not checked against [0, I] here, unlike the CPU kernel (which raises): that would
  // read count back to the host, a sync per call on the decode path. The gate/up kernel clamps it to [0, I] instead.
  auto w = aligned(w_in, 2), codes = aligned(codes_in, 16), scale = aligned(scale_in, 8);
  const at::Tensor thresh = thresh_in ? thresh_in->contiguous() : at::Tensor();
  const at::Tensor idx = idx_in ? idx_in->contiguous() : at::Tensor();
  const at::Tensor listed = count_in ? count_in->contiguous() : at::Tensor();
  at::Tensor minv = has_min ? aligned(minv_in, 8) : at::Tensor();
  const int device = dev.index();
  at::Tensor ws = at::empty({std::max<int64_t>(qsparse_ffn_workspace_bytes(T, d, I, device), 256)},
                            x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const auto* cp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const void* mp = has_min ? minv.data_ptr() : nullptr;
  const cudaError_t err =
      thresh_in ? qsparse_ffn(x.data_ptr(), w.data_ptr<uint8_t>(), qt.type, cp, four, scale.data_ptr(), mp,
                              thresh.data_ptr<float>(), y.data_ptr(), count.data_ptr<int32_t>(), T, d, I, act,
                              static_cast<float>(act_param), xt, ws.data_ptr(), device, stream)
                : qsparse_ffn_rows(x.data_ptr(), idx.data_ptr<int32_t>(), listed.data_ptr<int32_t>(),
                                   w.data_ptr<uint8_t>(), qt.type, cp, four, scale.data_ptr(), mp, y.data_ptr(),
                                   count.data_ptr<int32_t>(), T, d, I, act, static_cast<float>(act_param), xt,
                                   ws.data_ptr(), device, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {y.to(xs), count};
}

std::tuple<at::Tensor, at::Tensor> qsparse_ffn_cuda(const at::Tensor& x, const at::Tensor& w, c10::string_view qtype,
                                                    const at::Tensor& codes, const at::Tensor& scale,
                                                    const at::Tensor& minv, const at::Tensor& thresh,
                                                    c10::string_view activation, double act_param) {
  return qffn_cuda("qsparse_ffn", x, w, qtype, codes, scale, minv, &thresh, nullptr, nullptr, activation, act_param);
}

std::tuple<at::Tensor, at::Tensor> qsparse_ffn_rows_cuda(const at::Tensor& x, const at::Tensor& idx,
                                                         const at::Tensor& count, const at::Tensor& w,
                                                         c10::string_view qtype, const at::Tensor& codes,
                                                         const at::Tensor& scale, const at::Tensor& minv,
                                                         c10::string_view activation, double act_param) {
  return qffn_cuda("qsparse_ffn_rows", x, w, qtype, codes, scale, minv, nullptr, &idx, &count, activation, act_param);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CUDA, m) {
  m.impl("qlinear", &qlinear_cuda);
  m.impl("qsparse_ffn", &qsparse_ffn_cuda);
  m.impl("qsparse_ffn_rows", &qsparse_ffn_rows_cuda);
}

}  // namespace sparsedge::cuda
