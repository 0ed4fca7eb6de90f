// Torch glue of qlinear on CUDA (quant.cu): the same checks and error messages as the CPU kernel
// (backends/cpu/quant_linear.cpp; ValueError for a bad qtype / K / shape), the int8-x workspace and the fp32
// output from torch's caching allocator, the launch on the current stream. Registered for the CUDA dispatch
// key of sparsedge::qlinear beside binding.cpp's kernels (one library, several TORCH_LIBRARY_IMPL blocks).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cctype>
#include <string>

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

}  // namespace

TORCH_LIBRARY_IMPL(sparsedge, CUDA, m) { m.impl("qlinear", &qlinear_cuda); }

}  // namespace sparsedge::cuda
