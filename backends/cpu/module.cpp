// Python module shell for the CPU kernel library. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations in the other translation units (one per op family); it also carries DecodePlan, the C++ layer
// loop of one decode step (decode_loop.cpp).
#include <torch/extension.h>

namespace sparsedge::cpu {
void register_decode_loop(pybind11::module& m);
bool bf16_gemm();  // quant_linear.cpp: prefill GEMMs in bf16 (AVX512-BF16 builds)
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsedge fused CPU kernels (registered for the CPU dispatch key of the sparsedge ops)";
  sparsedge::cpu::register_decode_loop(m);
  m.def("bf16_gemm", &sparsedge::cpu::bf16_gemm, "whether qlinear's prefill GEMMs run in bf16 (x and rows rounded)");
}
