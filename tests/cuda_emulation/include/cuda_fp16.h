// Emulation stand-in for CUDA's <cuda_fp16.h> (tests/cuda_emulation): only the storage type.
#pragma once
#include <cstdint>
struct __half {
  uint16_t x;
};
