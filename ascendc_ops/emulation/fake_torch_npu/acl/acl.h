// TEST HARNESS: fake subset of AscendCL (see ../README.md). Names and signatures follow acl_base_rt.h.
#pragma once
#include <cstdint>
#include <cstdlib>
typedef int aclError;
typedef void* aclrtStream;
#define ACL_SUCCESS 0
typedef enum {
    ACL_DEVICE_INFO_UNDEFINED = -1,
    ACL_DEVICE_INFO_AI_CORE_NUM = 0,
    ACL_DEVICE_INFO_VECTOR_CORE_NUM = 1,
    ACL_DEVICE_INFO_L2_SIZE = 2
} aclDeviceInfo;
inline const char* aclrtGetSocName() {
    const char* s = std::getenv("SPARSEDGE_FAKE_SOC");
    return s ? s : "Ascend310B4";
}
inline aclError aclGetDeviceCapability(uint32_t, aclDeviceInfo, int64_t* value) {
    const char* s = std::getenv("SPARSEDGE_FAKE_CORES");
    *value = s ? std::atoll(s) : 4;
    return ACL_SUCCESS;
}
