// TEST HARNESS: exported accessor for the fake OpCommand log (fake build only).
#include "torch_npu/csrc/framework/OpCommand.h"
extern "C" const char* sparsedge_fake_opcommand_log() { return at_npu::native::fake_opcommand_log().c_str(); }
extern "C" void sparsedge_fake_opcommand_clear() { at_npu::native::fake_opcommand_log().clear(); }
