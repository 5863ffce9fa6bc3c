// Host-side launch helpers shared by the CUDA kernel files (include inside their host-only
// `#if !defined(__CUDA_ARCH__)` section: nothing here is device code).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

#include <cuda_runtime.h>

namespace lotus {

constexpr int kThreads = 256;         // threads per block of the copy / gather kernels
constexpr int kScatterThreads = 128;  // threads per block of the ordered scatters

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Widest word (16, 8, 4, 2 or 1 bytes) that divides every size and every pointer, so that a copy
// can move whole words without looking at the dtype.
inline int word_bytes(std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t s : sizes) ok = ok && s % w == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<std::uintptr_t>(p) % w == 0;
    if (ok) return w;
  }
  return 1;
}

// The kernels' second line of defence (the Python ops validate first and pass contiguous tensors):
// every tensor of `ts` is a contiguous CUDA tensor on the first one's device.
inline void check_cuda(const char* op, std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& first = **ts.begin();
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->is_cuda(), op, ": expected CUDA tensors");
    TORCH_CHECK(t->device() == first.device(), op, ": expected tensors on one device");
    TORCH_CHECK(t->is_contiguous(), op, ": expected contiguous tensors");
  }
}

}  // namespace lotus
