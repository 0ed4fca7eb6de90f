// FFN activation names, shared by every C++ layer that takes one: the CPU kernels (backends/cpu), the CUDA
// binding and kernels (cuda_ops) and the AscendC binding (ascendc_ops/binding). The enum value is the kernels'
// activation id; names and order equal sparsedge.activations.ACTIVATIONS (tests/test_ops.py parses this file).
// Plain C++17, no torch: an unknown name throws std::invalid_argument, which torch reports as a ValueError,
// the same error type as the composite reference's sparsedge.activations.check_activation.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace sparsedge {

enum class Activation : int { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3, fatrelu = 4, drelu = 5, relu2 = 6 };

inline constexpr const char* kActivationNames[] = {"silu", "gelu", "gelu_tanh", "relu", "fatrelu", "drelu", "relu2"};
inline constexpr int kNumActivations = int(sizeof(kActivationNames) / sizeof(kActivationNames[0]));
static_assert(kNumActivations == int(Activation::relu2) + 1, "one name per Activation, in enum order");

inline const char* activation_name(Activation a) { return kActivationNames[int(a)]; }

// "silu" -> Activation::silu; anything else: std::invalid_argument naming the supported activations.
inline Activation parse_activation(std::string_view name) {
    for (int i = 0; i < kNumActivations; ++i)
        if (name == kActivationNames[i]) return static_cast<Activation>(i);
    std::string msg = "unknown FFN activation '" + std::string(name) + "' (supported:";
    for (int i = 0; i < kNumActivations; ++i) msg += std::string(i ? ", " : " ") + kActivationNames[i];
    throw std::invalid_argument(msg + ")");
}

}  // namespace sparsedge
