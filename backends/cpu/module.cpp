// Python module shell for the CPU kernel library. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations in the other translation units (one per op family).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsedge fused CPU kernels (registered for the CPU dispatch key of the sparsedge ops)";
}
