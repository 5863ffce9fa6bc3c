// CUDA kernels of gather_tokens / scatter_tokens (schemas in csrc/bindings.cpp, semantics in
// lotus_kernels/ops/token_gather.py). The Python layer validates and passes contiguous tensors; the
// checks here are a cheap second line of defence. Every kernel writes `out` completely.
//
// Build time: the torch headers, not the kernels, cost nearly all of it, and nvcc parses the TU once
// per target arch. The device passes (__CUDA_ARCH__ defined) therefore see only the kernels and the
// small c10 scalar headers; the dispatcher/Tensor headers and the host code are host-pass only. nvcc
// requires every kernel launched from the host to be instantiated identically in both passes: the
// explicit instantiations below (outside the guard) do that. A launch of an instantiation missing
// from that list would fail at load time with "invalid device function".
// Headers: the light ones. <ATen/ATen.h> adds nothing needed here, and <ATen/cuda/CUDAContext.h>
// needs the cuSPARSE/cuBLAS headers, which some toolkits lack; at::cuda::getCurrentCUDAStream
// comes from <c10/cuda/CUDAStream.h>.
#include <cstdint>

#include "ordered_scatter.cuh"

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>

#include "launch_utils.cuh"
#endif

namespace {

// ---------------------------------------------------------------- gather
// A row copy in whole words (16, 8, 4, 2 or 1 bytes, picked by the host so that it divides the row
// size and both pointers): the copy never looks at the dtype. blockDim.x threads copy one row,
// blockDim.y rows per block, so short rows still fill a warp.
template <typename W>
__global__ void gather_rows_kernel(const W* __restrict__ x, const int64_t* __restrict__ idx, W* __restrict__ out,
                                   int64_t rows, int64_t K, int64_t N, int64_t V) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / K;
  const W* src = x + (b * N + idx[row]) * V;
  W* dst = out + row * V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dst[v] = src[v];
}

// ---------------------------------------------------------------- scatter
// Deterministic and atomic-free (lotus::ordered_scatter_add): `out` is zeroed first (memset), then a
// block owns (batch b, a chunk of channels) and each thread owns one channel c, so out[b, :, c] is
// touched by that thread only; index n goes to offset n * C.
template <typename T>
__global__ void scatter_tokens_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, T* __restrict__ out,
                                      int64_t K, int64_t N, int64_t C) {
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  lotus::ordered_scatter_add(src + b * K * C + c, C, out + b * N * C + c, idx + b * K, K, c < C,
                             [C](int64_t n) { return n * C; });
}

// Every instantiation the host code launches (see the build-time note at the top).
#define LOTUS_GATHER_INST(W) \
  template __global__ void gather_rows_kernel<W>(const W*, const int64_t*, W*, int64_t, int64_t, int64_t, int64_t);
LOTUS_GATHER_INST(uint4)
LOTUS_GATHER_INST(uint2)
LOTUS_GATHER_INST(uint32_t)
LOTUS_GATHER_INST(uint16_t)
LOTUS_GATHER_INST(uint8_t)
#undef LOTUS_GATHER_INST
#define LOTUS_SCATTER_INST(T) \
  template __global__ void scatter_tokens_kernel<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t);
LOTUS_SCATTER_INST(float)
LOTUS_SCATTER_INST(double)
LOTUS_SCATTER_INST(c10::Half)
LOTUS_SCATTER_INST(c10::BFloat16)
#undef LOTUS_SCATTER_INST

}  // namespace

#if !defined(__CUDA_ARCH__)
namespace {

using namespace lotus;  // launch_utils.cuh

template <typename W>
void launch_gather(const at::Tensor& x, const at::Tensor& idx, at::Tensor& out, int64_t row_bytes) {
  const int64_t rows = idx.numel(), K = idx.size(1), N = x.size(1);
  const int64_t V = row_bytes / static_cast<int64_t>(sizeof(W));
  int tx = 1;
  while (tx < V && tx < kThreads) tx <<= 1;
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks = ceil_div(rows, block.y);
  TORCH_CHECK(blocks <= INT32_MAX, "gather_tokens: too many rows (", rows, ")");
  gather_rows_kernel<W><<<static_cast<unsigned>(blocks), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const W*>(x.const_data_ptr()), idx.const_data_ptr<int64_t>(), static_cast<W*>(out.data_ptr()), rows,
      K, N, V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_common(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& idx,
                  const at::Tensor& out) {
  check_cuda(op, {&a, &idx, &out});
  TORCH_CHECK(a.dim() == 3 && idx.dim() == 2 && out.dim() == 3, op, ": expected ", a_name,
              " [B, *, C], idx [B, K] and out [B, *, C]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64");
  TORCH_CHECK(out.scalar_type() == a.scalar_type(), op, ": out must have the dtype of ", a_name);
  TORCH_CHECK(a.size(0) == idx.size(0) && out.size(0) == idx.size(0) && out.size(2) == a.size(2), op,
              ": batch or channel sizes disagree");
}

void gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx, at::Tensor& out) {
  check_common("gather_tokens", x, "x", idx, out);
  TORCH_CHECK(out.size(1) == idx.size(1), "gather_tokens: out must be [B, K, C]");
  if (out.numel() == 0) return;
  TORCH_CHECK(x.size(1) > 0, "gather_tokens: x has no tokens to gather from");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t row_bytes = x.size(2) * x.element_size();
  switch (word_bytes({row_bytes}, {x.const_data_ptr(), out.const_data_ptr()})) {
    case 16:
      launch_gather<uint4>(x, idx, out, row_bytes);
      break;
    case 8:
      launch_gather<uint2>(x, idx, out, row_bytes);
      break;
    case 4:
      launch_gather<uint32_t>(x, idx, out, row_bytes);
      break;
    case 2:
      launch_gather<uint16_t>(x, idx, out, row_bytes);
      break;
    default:
      launch_gather<uint8_t>(x, idx, out, row_bytes);
      break;
  }
}

void scatter_tokens_cuda(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out) {
  check_common("scatter_tokens", src, "src", idx, out);
  TORCH_CHECK(src.size(1) == idx.size(1), "scatter_tokens: src must be [B, K, C] for idx [B, K]");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(src.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, out.nbytes(), stream));  // all-zero bits are +0.0
  if (src.numel() == 0) return;
  const int64_t B = src.size(0), K = src.size(1), C = src.size(2), N = out.size(1);
  const int threads = static_cast<int>(std::min<int64_t>(kScatterThreads, ceil_div(C, 32) * 32));
  const int64_t chunks = ceil_div(C, threads);
  TORCH_CHECK(chunks <= 65535 && B <= INT32_MAX, "scatter_tokens: too many channels or batches");
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scatter_tokens_cuda", [&] {
    scatter_tokens_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(), K, N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
}
#endif  // !defined(__CUDA_ARCH__)
