// Shared helpers for the CPU kernels: dtype conversion and argument checks.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

namespace sparsedge::cpu {

template <typename T> inline float to_f32(T v) { return static_cast<float>(v); }
template <typename T> inline T from_f32(float v) { return static_cast<T>(v); }

// t as a contiguous tensor of dtype `dt`: itself when it already is. `.to(dt).contiguous()` costs two dispatcher
// calls even when both are no-ops; a decode token makes a few hundred op calls whose serial part the other
// threads wait through.
inline at::Tensor as_plain(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous();
}

#define SPARSEDGE_CHECK_CPU_CONTIG(t) \
  TORCH_CHECK((t).device().is_cpu() && (t).is_contiguous(), #t " must be a contiguous CPU tensor")

// Dispatch over the three weight/activation dtypes the kernels support.
#define SPARSEDGE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace sparsedge::cpu
