// CUDA kernels of im2col_gather / col2im_scatter / patch_embed_gather (schemas in csrc/bindings.cpp,
// semantics in lotus_kernels/ops/patch_embed_gather.py). The Python layer validates and passes
// contiguous tensors; the checks here are a cheap second line of defence. Every op writes `out`
// completely.
//
// Geometry: images [B, Cin, H, W], patches ph x pw, grid gh x gw = H/ph x W/pw, patch n = r*gw + q
// covers rows r*ph.. and columns q*pw..; a column vector has L = Cin*ph*pw entries in (c, i, j) order.
//
// Build time: as in token_gather.cu, the device passes (__CUDA_ARCH__ defined) see only the kernels
// and the small c10 scalar headers; the host code and the heavy torch headers are host-pass only.
// The explicit instantiations (outside the guard) must list every kernel the host code launches.
#include <ATen/OpMathType.h>

#include <cstdint>

#include "ordered_scatter.cuh"

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>

#include "launch_utils.cuh"
#endif

namespace {

// ---------------------------------------------------------------- im2col_gather
// A pure copy, so it moves whole words W (16, 8, 4, 2 or 1 bytes, chosen by the host to divide the
// patch-row size pw*elsize, the image-row size W*elsize and both pointers): pww and Ww are the patch
// and image widths in words. One out row (b, k) per threadIdx.y, its L words spread over threadIdx.x,
// so the writes are coalesced and the reads come in contiguous runs of one patch row.
template <typename Wd>
__global__ void im2col_gather_kernel(const Wd* __restrict__ images, const int64_t* __restrict__ idx,
                                     Wd* __restrict__ out, int64_t rows, int64_t K, int64_t Cin, int64_t H, int64_t Ww,
                                     int ph, int pww, int64_t gw) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / K, n = idx[row];
  const int64_t r = n / gw, q = n - r * gw;
  const Wd* base = images + (b * Cin * H + r * ph) * Ww + q * pww;  // pixel (c=0, i=0, j=0) of the patch
  const int slab = ph * pww;                                        // words per channel in a column
  const int L = static_cast<int>(Cin) * slab;                       // < 2^31, checked by the host
  Wd* dst = out + row * L;
  for (int v = threadIdx.x; v < L; v += blockDim.x) {
    const int c = v / slab, rem = v - c * slab;
    const int i = rem / pww, j = rem - i * pww;
    dst[v] = base[(c * H + i) * Ww + j];
  }
}

// ---------------------------------------------------------------- col2im_scatter
// Deterministic and atomic-free, like scatter_tokens (lotus::ordered_scatter_add): `out` is zeroed
// first (memset, which also covers the pixels of patches no index points to); then a block owns
// (batch b, a chunk of the L column entries) and each thread owns one entry l = (c, i, j). Entry l of
// patch n is pixel (c, r*ph + i, q*pw + j), i.e. base(l) + off(n) with off(n) = r*ph*W + q*pw the
// same for the whole block, so the thread owns the pixels {base(l) + off(n)} for every n, and no
// other thread touches them. (Owning one pixel and searching all k for matches would cost O(N*K)
// per pixel.)
template <typename T>
__global__ void col2im_scatter_kernel(const T* __restrict__ cols, const int64_t* __restrict__ idx, T* __restrict__ out,
                                      int64_t K, int64_t L, int64_t Cin, int64_t H, int64_t W, int ph, int pw,
                                      int64_t gw) {
  const int64_t b = blockIdx.x;
  const int64_t l = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t slab = static_cast<int64_t>(ph) * pw;
  const int64_t c = l / slab, rem = l - c * slab;
  const int64_t i = rem / pw, j = rem - i * pw;
  lotus::ordered_scatter_add(cols + b * K * L + l, L, out + (b * Cin + c) * H * W + i * W + j, idx + b * K, K, l < L,
                             [=](int64_t n) {
                               const int64_t r = n / gw;
                               return r * ph * W + (n - r * gw) * pw;  // off(n)
                             });
}

// ---------------------------------------------------------------- patch_embed_gather epilogue init
// out[b, k, :] = bias + pos[idx[b, k], :] (either may be null), written before the GEMM so that
// cuBLAS adds it in with beta = 1: one pass over out instead of a separate epilogue pass.
template <typename T>
__global__ void embed_init_kernel(const T* __restrict__ bias, const T* __restrict__ pos,
                                  const int64_t* __restrict__ idx, T* __restrict__ out, int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const T* p = pos == nullptr ? nullptr : pos + idx[row] * D;
  T* dst = out + row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t v = 0;
    if (bias != nullptr) v += static_cast<acc_t>(bias[d]);
    if (p != nullptr) v += static_cast<acc_t>(p[d]);
    dst[d] = static_cast<T>(v);
  }
}

// Every instantiation the host code launches (see the build-time note at the top).
#define LOTUS_IM2COL_INST(Wd)                                                                                  \
  template __global__ void im2col_gather_kernel<Wd>(const Wd*, const int64_t*, Wd*, int64_t, int64_t, int64_t, \
                                                    int64_t, int64_t, int, int, int64_t);
LOTUS_IM2COL_INST(uint4)
LOTUS_IM2COL_INST(uint2)
LOTUS_IM2COL_INST(uint32_t)
LOTUS_IM2COL_INST(uint16_t)
LOTUS_IM2COL_INST(uint8_t)
#undef LOTUS_IM2COL_INST
#define LOTUS_TYPED_INST(T)                                                                                           \
  template __global__ void col2im_scatter_kernel<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t, \
                                                    int64_t, int, int, int64_t);                                      \
  template __global__ void embed_init_kernel<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t);
LOTUS_TYPED_INST(float)
LOTUS_TYPED_INST(double)
LOTUS_TYPED_INST(c10::Half)
LOTUS_TYPED_INST(c10::BFloat16)
#undef LOTUS_TYPED_INST

}  // namespace

#if !defined(__CUDA_ARCH__)
namespace {

using namespace lotus;  // launch_utils.cuh

// blockDim.x threads along a row of `row_len` items, the rest of the 256 threads on further rows.
dim3 row_block(int64_t row_len) {
  int tx = 1;
  while (tx < row_len && tx < kThreads) tx <<= 1;
  return dim3(tx, kThreads / tx);
}

unsigned row_grid(int64_t rows, const dim3& block, const char* op) {
  const int64_t blocks = ceil_div(rows, block.y);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows (", rows, ")");
  return static_cast<unsigned>(blocks);
}

void check_geometry(const char* op, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t Cin) {
  TORCH_CHECK(ph > 0 && pw > 0 && H % ph == 0 && W % pw == 0, op, ": image size (", H, ", ", W,
              ") is not a multiple of the patch size (", ph, ", ", pw, ")");
  TORCH_CHECK(Cin * ph * pw <= INT32_MAX, op, ": patch too large");
}

// images [B, Cin, H, W] -> out [B*K, Cin*ph*pw] memory (out may be a temporary).
void launch_im2col(const at::Tensor& images, const at::Tensor& idx, int64_t ph, int64_t pw, void* out) {
  const int64_t B = images.size(0), Cin = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t K = idx.size(1), rows = B * K, es = images.element_size();
  if (rows == 0 || Cin == 0) return;
  const int ws = word_bytes({pw * es, W * es}, {images.const_data_ptr(), out});
  const int64_t pww = pw * es / ws, Ww = W * es / ws;
  const dim3 block = row_block(Cin * ph * pww);
  const unsigned grid = row_grid(rows, block, "im2col_gather");
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto word) {
    using Wd = decltype(word);
    im2col_gather_kernel<Wd><<<grid, block, 0, stream>>>(
        static_cast<const Wd*>(images.const_data_ptr()), idx.const_data_ptr<int64_t>(), static_cast<Wd*>(out), rows, K,
        Cin, H, Ww, static_cast<int>(ph), static_cast<int>(pww), W / pw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (ws) {
    case 16:
      launch(uint4{});
      break;
    case 8:
      launch(uint2{});
      break;
    case 4:
      launch(uint32_t{});
      break;
    case 2:
      launch(uint16_t{});
      break;
    default:
      launch(uint8_t{});
      break;
  }
}

void im2col_gather_cuda(const at::Tensor& images, const at::Tensor& idx, int64_t ph, int64_t pw, at::Tensor& out) {
  check_cuda("im2col_gather", {&images, &idx, &out});
  TORCH_CHECK(images.dim() == 4 && idx.dim() == 2 && out.dim() == 3,
              "im2col_gather: expected images [B, Cin, H, W], "
              "idx [B, K] and out [B, K, Cin*ph*pw]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "im2col_gather: idx must be int64");
  TORCH_CHECK(out.scalar_type() == images.scalar_type(), "im2col_gather: out must have the dtype of images");
  const int64_t B = images.size(0), Cin = images.size(1), H = images.size(2), W = images.size(3);
  check_geometry("im2col_gather", H, W, ph, pw, Cin);
  TORCH_CHECK(idx.size(0) == B && out.size(0) == B && out.size(1) == idx.size(1) && out.size(2) == Cin * ph * pw,
              "im2col_gather: expected out [B, K, Cin*ph*pw] for images [B, Cin, H, W] and idx [B, K]");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(images.device());
  launch_im2col(images, idx, ph, pw, out.data_ptr());
}

void col2im_scatter_cuda(const at::Tensor& cols, const at::Tensor& idx, int64_t ph, int64_t pw, at::Tensor& out) {
  check_cuda("col2im_scatter", {&cols, &idx, &out});
  TORCH_CHECK(cols.dim() == 3 && idx.dim() == 2 && out.dim() == 4,
              "col2im_scatter: expected cols [B, K, Cin*ph*pw], "
              "idx [B, K] and out [B, Cin, H, W]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "col2im_scatter: idx must be int64");
  TORCH_CHECK(out.scalar_type() == cols.scalar_type(), "col2im_scatter: out must have the dtype of cols");
  const int64_t B = out.size(0), Cin = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t K = cols.size(1), L = cols.size(2);
  check_geometry("col2im_scatter", H, W, ph, pw, Cin);
  TORCH_CHECK(cols.size(0) == B && idx.size(0) == B && idx.size(1) == K && L == Cin * ph * pw,
              "col2im_scatter: expected cols [B, K, Cin*ph*pw] for out [B, Cin, H, W] and idx [B, K]");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(cols.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, out.nbytes(), stream));  // all-zero bits are +0.0
  if (cols.numel() == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(kScatterThreads, ceil_div(L, 32) * 32));
  const int64_t chunks = ceil_div(L, threads);
  TORCH_CHECK(chunks <= 65535 && B <= INT32_MAX, "col2im_scatter: too many columns or batches");
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_scatter_cuda", [&] {
    col2im_scatter_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        cols.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(), K, L, Cin, H, W,
        static_cast<int>(ph), static_cast<int>(pw), W / pw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void patch_embed_gather_cuda(const at::Tensor& images, const at::Tensor& idx, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos,
                             at::Tensor& out) {
  check_cuda("patch_embed_gather", {&images, &idx, &weight, &out});
  TORCH_CHECK(images.dim() == 4 && idx.dim() == 2 && weight.dim() == 4 && out.dim() == 3,
              "patch_embed_gather: expected images [B, Cin, H, W], idx [B, K], weight [D, Cin, ph, pw], out [B, K, D]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "patch_embed_gather: idx must be int64");
  TORCH_CHECK(weight.scalar_type() == images.scalar_type() && out.scalar_type() == images.scalar_type(),
              "patch_embed_gather: images, weight and out must share one dtype");
  const int64_t B = images.size(0), Cin = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t D = weight.size(0), ph = weight.size(2), pw = weight.size(3), K = idx.size(1);
  check_geometry("patch_embed_gather", H, W, ph, pw, Cin);
  const int64_t N = (H / ph) * (W / pw), L = Cin * ph * pw;
  TORCH_CHECK(weight.size(1) == Cin && idx.size(0) == B && out.size(0) == B && out.size(1) == K && out.size(2) == D,
              "patch_embed_gather: shapes of images, idx, weight and out disagree");
  for (const auto* opt : {&bias, &pos}) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = **opt;
    check_cuda("patch_embed_gather", {&images, &t});
    TORCH_CHECK(t.scalar_type() == images.scalar_type(),
                "patch_embed_gather: bias and pos must have the dtype of images");
  }
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == D), "patch_embed_gather: expected bias [D]");
  TORCH_CHECK(!pos.has_value() || (pos->dim() == 2 && pos->size(0) == N && pos->size(1) == D),
              "patch_embed_gather: expected pos [N, D]");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(images.device());

  at::Tensor cols = at::empty({B * K, L}, images.options());
  launch_im2col(images, idx, ph, pw, cols.data_ptr());
  at::Tensor out2d = out.view({B * K, D});
  const at::Tensor w_t = weight.view({D, L}).t();  // [L, D], a transposed view: cuBLAS reads it as is
  if (pos.has_value()) {
    const dim3 block = row_block(D);
    const unsigned grid = row_grid(B * K, block, "patch_embed_gather");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "patch_embed_init_cuda", [&] {
      embed_init_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, pos->const_data_ptr<scalar_t>(),
          idx.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B * K, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    out2d.addmm_(cols, w_t);  // out = init + cols @ W^T
  } else if (bias.has_value()) {
    at::addmm_out(out2d, *bias, cols, w_t);  // bias broadcast by torch (cuBLASLt bias epilogue where it applies)
  } else {
    at::mm_out(out2d, cols, w_t);  // beta = 0: the poisoned out is never read
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CUDA, m) {
  m.impl("im2col_gather", &im2col_gather_cuda);
  m.impl("col2im_scatter", &col2im_scatter_cuda);
  m.impl("patch_embed_gather", &patch_embed_gather_cuda);
}
#endif  // !defined(__CUDA_ARCH__)
