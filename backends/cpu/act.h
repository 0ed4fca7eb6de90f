// The FFN activation of the CPU kernels (sparse_ffn.cpp, quant_sparse_ffn.cpp): names parsed through
// backends/include/sparsedge/activations.h, h = act(g) * u with sparsedge.activations' conventions.
#pragma once
#include <cmath>

#include <c10/util/string_view.h>

#include "sparsedge/activations.h"

namespace sparsedge::cpu {
namespace {

using Act = sparsedge::Activation;  // names and ids: backends/include/sparsedge/activations.h

// unknown names throw std::invalid_argument (a ValueError in Python) listing the supported ones
inline Act parse_act(c10::string_view s) { return sparsedge::parse_activation(std::string_view(s.data(), s.size())); }

// h = act(g) * u with the schema's conventions; zero where |act(g)| < tau (tau > 0).
inline float activate(Act act, float g, float u, float param, float tau) {
  float a;
  switch (act) {
    case Act::silu: a = g / (1.f + std::exp(-g)); break;
    case Act::gelu: a = 0.5f * g * (1.f + std::erf(g * 0.70710678118654752f)); break;
    case Act::gelu_tanh: {
      const float k = 0.79788456080286536f;
      a = 0.5f * g * (1.f + std::tanh(k * (g + 0.044715f * g * g * g)));
      break;
    }
    case Act::relu: a = g > 0.f ? g : 0.f; break;
    case Act::fatrelu: a = g > param ? g : 0.f; break;
    case Act::drelu: a = g > 0.f ? g : 0.f; u = u > 0.f ? u : 0.f; break;
    case Act::relu2: { const float r = g > 0.f ? g : 0.f; a = r * r; break; }
    default: a = 0.f;
  }
  if (tau > 0.f && std::fabs(a) < tau) return 0.f;
  return a * u;
}

}  // namespace
}  // namespace sparsedge::cpu
