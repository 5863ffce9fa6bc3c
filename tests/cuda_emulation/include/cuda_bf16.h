// Emulation stand-in for CUDA's <cuda_bf16.h> (tests/cuda_emulation): only the storage type.
#pragma once
#include <cstdint>
struct __nv_bfloat16 {
  uint16_t x;
};
