// TEST HARNESS: fake c10_npu stream (see ../../../../README.md).
#pragma once
#include "acl/acl.h"
namespace c10_npu {
struct NPUStream {
    aclrtStream stream(bool need_empty = true) const { (void)need_empty; return nullptr; }
};
inline NPUStream getCurrentNPUStream(int device_index = -1) { (void)device_index; return NPUStream(); }
}  // namespace c10_npu
