// The one translation unit that compiles the tiling functions (include/sparsedge_tiling.h) into the binding
// library (CMake), the fake-binding test library and the emulation test library.
#define SPARSEDGE_TILING_IMPL
#include "../include/sparsedge_tiling.h"
