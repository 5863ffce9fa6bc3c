// CUDA kernels of the block-sparse linear products (schemas in csrc/bindings.cpp; format and semantics:
// the BSR description in lotus_kernels/ops/block_sparse_linear.py). W [out, in] is stored as
// values [nnzb, bs, bs] (values[k, i, j] = W[row_k*bs + i, col_k*bs + j]) with BSR pointers crow/col and
// their transpose ccol/row/perm.
//
//   bsr_linear_fwd        out = x @ W^T + bias   CTA (M tile, block row r): loop over r's stored blocks
//   bsr_linear_bwd_input  dx  = dy @ W           CTA (M tile, block column c): loop over c's stored blocks
//   bsr_linear_bwd_weight dvalues[k] = dy[:, r_k block]^T @ x[:, c_k block]   CTA k: loop over M (SDD)
//
// fwd and bwd_input are one kernel (block_row_product): both compute out[m, p*bs + j] =
// sum over the stored blocks t of pointer slot p of sum_q a[m, idx[t]*bs + q] * B_t[q, j], with B_t =
// values[k]^T for fwd (k = t) and values[k] for bwd_input (k = perm[t]). Every CTA owns a disjoint
// output tile and writes all of it once (empty slots write bias / zero, M rows past the end are not
// written), so there are no atomics, the results are deterministic and a poisoned output is overwritten.
// fwd / bwd_input: bf16 and fp16 on tensor cores (WMMA, sm80+, fp32 accumulation); fp32 and fp64 (and
// 16-bit types below sm80) on plain shared-memory tiles with FMA in the accumulation type (fp32 / fp64):
// fp32 is not given TF32 here, so fp32 results match a full-precision reference. bwd_weight likewise:
// WMMA for 16-bit types on sm80+, FMA otherwise. bwd_weight splits M into S ranges when there are too
// few stored blocks to fill the GPU (grid (nnzb, S)): each CTA writes an fp32 (fp64) partial block, and
// sum_partials_kernel adds the S partials in the fixed order s = 0..S-1 and rounds once: deterministic.
//
// Build time: as in token_gather.cu, the device passes (__CUDA_ARCH__ defined) see only the kernels and
// the small c10 scalar headers; the explicit instantiations (outside the guard) list every kernel the
// host code launches.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>

#include "launch_utils.cuh"
#endif

namespace {

constexpr int kBsrThreads = 256;

// Outputs per thread: 8 rows of one column for fp32/bf16, 4 for fp64 (keeps the fp64, bs = 64 tiles
// under the 48 KiB of static shared memory: 16x64 + 64x65 doubles = 41 KiB).
template <typename T>
struct RowsPerThread {
  static constexpr int value = 8;
};
template <>
struct RowsPerThread<double> {
  static constexpr int value = 4;
};

// The WMMA element type of a 16-bit torch scalar type (tiles are staged as raw 16-bit words).
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};

// ---------------------------------------------------------------- fwd / bwd_input
// CTA (blockIdx.x = M tile, blockIdx.y = pointer slot p). Thread tid owns output column j = tid % BS
// and rows i = tid / BS + s * (kBsrThreads / BS), s < RPT, of the TM = RPT * kBsrThreads / BS row tile.
// Shared: as[TM][BS] (the a-tile of the current block) and bt[BS][BS + 1] (B_t, padded so that the
// transposing stores of fwd and the row reads bt[q][j] are both free of bank conflicts).
template <typename T, int BS, bool kTransW>
__global__ void __launch_bounds__(kBsrThreads)
    block_row_product_kernel(const T* __restrict__ a, const T* __restrict__ values, const int64_t* __restrict__ ptr,
                             const int64_t* __restrict__ idx, const int64_t* __restrict__ perm,
                             const T* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t a_stride,
                             int64_t out_stride) {
  using acc_t = at::opmath_type<T>;
  constexpr int RPT = RowsPerThread<T>::value;
  constexpr int kRowStep = kBsrThreads / BS;  // rows between the rows one thread owns
  constexpr int TM = RPT * kRowStep;
  static_assert(kBsrThreads % BS == 0 && (TM * BS) % kBsrThreads == 0 && (BS * BS) % kBsrThreads == 0,
                "tile loads assume whole rounds of kBsrThreads");
  __shared__ acc_t as[TM][BS];
  __shared__ acc_t bt[BS][BS + 1];

  const int tid = threadIdx.x;
  const int j = tid % BS, i0 = tid / BS;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int64_t p = blockIdx.y;
  const int64_t start = ptr[p], end = ptr[p + 1];

  acc_t acc[RPT];
#pragma unroll
  for (int s = 0; s < RPT; ++s) acc[s] = acc_t(0);

  for (int64_t t = start; t < end; ++t) {
    const int64_t k = perm == nullptr ? t : perm[t];
    const T* a_blk = a + idx[t] * BS;  // column idx[t]*BS of row 0
    const T* v_blk = values + k * (BS * BS);
    // a-tile: TM rows x BS contiguous columns, zero past row M (those rows are never stored, but
    // the FMAs below read them).
#pragma unroll
    for (int e = tid; e < TM * BS; e += kBsrThreads) {
      const int r = e / BS, q = e % BS;
      const int64_t m = m0 + r;
      as[r][q] = m < M ? static_cast<acc_t>(a_blk[m * a_stride + q]) : acc_t(0);
    }
    // B_t[q][j]: fwd wants W^T (values[k, j, q]), bwd_input wants W (values[k, q, j]); coalesced reads.
#pragma unroll
    for (int e = tid; e < BS * BS; e += kBsrThreads) {
      const int u = e / BS, w = e % BS;
      const acc_t v = static_cast<acc_t>(v_blk[e]);
      if (kTransW) {
        bt[w][u] = v;
      } else {
        bt[u][w] = v;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int q = 0; q < BS; ++q) {
      const acc_t b = bt[q][j];
#pragma unroll
      for (int s = 0; s < RPT; ++s) acc[s] += as[i0 + s * kRowStep][q] * b;
    }
    __syncthreads();  // the next block's tile loads overwrite as/bt
  }

  const int64_t n = p * BS + j;
  const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[n]);
#pragma unroll
  for (int s = 0; s < RPT; ++s) {
    const int64_t m = m0 + i0 + s * kRowStep;
    if (m < M) out[m * out_stride + n] = static_cast<T>(acc[s] + b);
  }
}

// ---------------------------------------------------------------- bwd_weight (SDD)
// CTA (k = blockIdx.x, split = blockIdx.y) owns block k's product over rows [split * rows_per_split,
// +rows_per_split) of M. Thread tid owns column j = tid % BS and rows i = tid / BS + s * (kBsrThreads /
// BS), s < OPT. The rows are reduced in chunks of TK staged in shared memory (gs = dy's block-row
// columns, xs = x's block-column columns), in one fixed order. With partial == nullptr (one split) the
// CTA writes dvalues[k]; else its acc_t block at partial[split][k] (summed by sum_partials_kernel).
template <typename T, int BS>
__global__ void __launch_bounds__(kBsrThreads)
    bsr_weight_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ crow,
                           const int64_t* __restrict__ col, T* __restrict__ dvalues,
                           at::opmath_type<T>* __restrict__ partial, int64_t M, int64_t in_features,
                           int64_t out_features, int64_t R, int64_t nnzb, int64_t rows_per_split) {
  using acc_t = at::opmath_type<T>;
  constexpr int kRowStep = kBsrThreads / BS;
  constexpr int OPT = BS * BS / kBsrThreads > 0 ? BS * BS / kBsrThreads : 1;
  constexpr int TK = 32;
  static_assert(kBsrThreads % BS == 0 && (TK * BS) % kBsrThreads == 0, "tile loads assume whole rounds");
  static_assert(OPT * kRowStep == BS, "each thread's rows cover the block exactly");
  __shared__ acc_t gs[TK][BS];
  __shared__ acc_t xs[TK][BS];

  const int tid = threadIdx.x;
  const int j = tid % BS, i0 = tid / BS;
  const int64_t k = blockIdx.x;
  // Block row of k: the last r in [0, R) with crow[r] <= k (an empty row shares its crow value with
  // the next row, so the last such r is k's own). Every thread searches; the loads hit the cache.
  int64_t lo = 0, hi = R - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (crow[mid] <= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const T* g_blk = dy + lo * BS;     // column r*BS of row 0
  const T* x_blk = x + col[k] * BS;  // column c*BS of row 0

  acc_t acc[OPT];
#pragma unroll
  for (int s = 0; s < OPT; ++s) acc[s] = acc_t(0);

  const int64_t m_lo = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_hi = m_lo + rows_per_split < M ? m_lo + rows_per_split : M;
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += TK) {
#pragma unroll
    for (int e = tid; e < TK * BS; e += kBsrThreads) {
      const int r = e / BS, q = e % BS;
      const int64_t m = m0 + r;
      const bool in = m < m_hi;
      gs[r][q] = in ? static_cast<acc_t>(g_blk[m * out_features + q]) : acc_t(0);
      xs[r][q] = in ? static_cast<acc_t>(x_blk[m * in_features + q]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < TK; ++r) {
      const acc_t xv = xs[r][j];
#pragma unroll
      for (int s = 0; s < OPT; ++s) acc[s] += gs[r][i0 + s * kRowStep] * xv;
    }
    __syncthreads();
  }
  if (partial != nullptr) {
    acc_t* dst = partial + (static_cast<int64_t>(blockIdx.y) * nnzb + k) * (BS * BS);
#pragma unroll
    for (int s = 0; s < OPT; ++s) dst[(i0 + s * kRowStep) * BS + j] = acc[s];
    return;
  }
  T* dst = dvalues + k * (BS * BS);
#pragma unroll
  for (int s = 0; s < OPT; ++s) dst[(i0 + s * kRowStep) * BS + j] = static_cast<T>(acc[s]);
}

// dvalues[e] = sum over s = 0..S-1 of partial[s][e], in that order, rounded once. One element per thread.
template <typename T>
__global__ void __launch_bounds__(kBsrThreads) sum_partials_kernel(const at::opmath_type<T>* __restrict__ partial,
                                                                   T* __restrict__ dvalues, int64_t S, int64_t numel) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBsrThreads + threadIdx.x;
  if (e >= numel) return;
  at::opmath_type<T> v = partial[e];
  for (int64_t s = 1; s < S; ++s) v += partial[s * numel + e];
  dvalues[e] = static_cast<T>(v);
}

// ---------------------------------------------------------------- bf16 tile staging (WMMA kernels)
// Copies rows [m0, m0 + ROWS) x BS raw bf16 of a row-major matrix (src = its column 0 of the tile,
// `stride` elements per row) into dst[ROWS][LDS], zero bits (+0.0) for rows >= M. kVec: 16-byte
// words (8 elements), which the host picks when both base pointers are 16-byte aligned: row strides
// and tile offsets are multiples of bs >= 16 elements, and LDS * 2 bytes is a multiple of 16.
template <int ROWS, int BS, int LDS, bool kVec>
__device__ __forceinline__ void stage_rows(uint16_t (*dst)[LDS], const uint16_t* src, int64_t stride, int64_t m0,
                                           int64_t M, int tid) {
  constexpr int V = kVec ? 8 : 1;
  using W = typename std::conditional<kVec, uint4, uint16_t>::type;
  for (int e = tid; e < ROWS * (BS / V); e += kBsrThreads) {
    const int r = e / (BS / V), qv = e % (BS / V);
    const int64_t m = m0 + r;
    W w{};
    if (m < M) w = reinterpret_cast<const W*>(src + m * stride)[qv];
    reinterpret_cast<W*>(&dst[r][0])[qv] = w;
  }
}

// ---------------------------------------------------------------- fwd / bwd_input, bf16 / fp16 on tensor cores
// The same product for T = bf16 or fp16 with WMMA (launched on sm80+: m16n16k16, 16-bit in, fp32 accumulate): the CTA's
// output tile TM x BS (TM = 2048 / BS, as in the FMA kernel) is 8 fragments of 16 x 16, one per warp. Shared tiles hold
// raw bf16 bits (copied, never converted); B is values[k] as stored, read as col_major for fwd (W^T) and row_major for
// bwd_input (W). Rows padded by 8 elements (16 B): WMMA needs ldm % 8 == 0 and 32-byte aligned fragment pointers, which
// 16-row steps of (BS + 8) * 2 bytes keep. The fp32 tile goes through shared memory for the epilogue (bias, rounding,
// rows past M).
template <typename T, int BS, bool kTransW, bool kVec>
__global__ void __launch_bounds__(kBsrThreads)
    block_row_product_wmma_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ values,
                                  const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx,
                                  const int64_t* __restrict__ perm, const T* __restrict__ bias, T* __restrict__ out,
                                  int64_t M, int64_t a_stride, int64_t out_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this only on sm80+
#else
  namespace wmma = nvcuda::wmma;
  constexpr int TM = 2048 / BS, LDS = BS + 8, LDC = BS + 4, FN = BS / 16;
  static_assert(TM % 16 == 0 && (TM / 16) * FN == kBsrThreads / 32, "one 16x16 fragment per warp");
  __shared__ __align__(32) uint16_t as[TM][LDS];
  __shared__ __align__(32) uint16_t bsm[BS][LDS];
  __shared__ __align__(32) float cs[TM][LDC];
  using BLayout = typename std::conditional<kTransW, wmma::col_major, wmma::row_major>::type;
  using E = typename WmmaType<T>::type;

  const int tid = threadIdx.x, warp = tid / 32;
  const int fm = warp / FN, fn = warp % FN;  // this warp's fragment: rows fm*16.., columns fn*16..
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int64_t p = blockIdx.y;
  const int64_t start = ptr[p], end = ptr[p + 1];

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int64_t t = start; t < end; ++t) {
    const int64_t k = perm == nullptr ? t : perm[t];
    const uint16_t* a_blk = a + idx[t] * BS;
    const uint16_t* v_blk = values + k * (BS * BS);
    stage_rows<TM, BS, LDS, kVec>(as, a_blk, a_stride, m0, M, tid);
    stage_rows<BS, BS, LDS, kVec>(bsm, v_blk, BS, 0, BS, tid);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BS; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, BLayout> fb;
      wmma::load_matrix_sync(fa, reinterpret_cast<const E*>(&as[fm * 16][kk]), LDS);
      // B[q][j]: fwd, col_major over values[k][j][q] (element (q, j) at bsm[j][q]); bwd_input, row_major
      const uint16_t* b_ptr = kTransW ? &bsm[fn * 16][kk] : &bsm[kk][fn * 16];
      wmma::load_matrix_sync(fb, reinterpret_cast<const E*>(b_ptr), LDS);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&cs[fm * 16][fn * 16], acc, LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TM * BS; e += kBsrThreads) {
    const int r = e / BS, j = e % BS;
    const int64_t m = m0 + r, n = p * BS + j;
    if (m < M) {
      const float b = bias == nullptr ? 0.0f : static_cast<float>(bias[n]);
      out[m * out_stride + n] = T(cs[r][j] + b);
    }
  }
#endif
}

// ---------------------------------------------------------------- bwd_weight, bf16 / fp16 on tensor cores
// CTA k owns dvalues[k] = G^T X (G = dy's block-row columns, X = x's block-column columns, both
// [M, BS]) as F = (BS/16)^2 fragments of 16 x 16. With fewer fragments than the 8 warps (BS = 16:
// 1, BS = 32: 4), the warps also split each staged chunk of TK rows of M S ways (S = 8, 2, 1 for
// BS = 16, 32, 64), and the S partial tiles are summed in a fixed order at the end: deterministic.
// A = G^T is read col_major from the row-major staged G; B = X row_major. blockIdx.y picks the range
// of M (rows_per_split rows) and `partial` as in bsr_weight_grad_kernel.
template <typename T, int BS, bool kVec>
__global__ void __launch_bounds__(kBsrThreads)
    bsr_weight_grad_wmma_kernel(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ x,
                                const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                                T* __restrict__ dvalues, float* __restrict__ partial, int64_t M, int64_t in_features,
                                int64_t out_features, int64_t R, int64_t nnzb, int64_t rows_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this only on sm80+
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kWarps = kBsrThreads / 32, NF = BS / 16, F = NF * NF;
  constexpr int S = F >= kWarps ? 1 : kWarps / F;  // ways M is split
  constexpr int WPS = kWarps / S;                  // warps per split
  constexpr int FPW = F / WPS;                     // fragments per warp
  constexpr int TK = 16 * S > 64 ? 16 * S : 64;    // rows of M staged at once
  constexpr int ROWS = TK / S;                     // rows of a chunk per split
  constexpr int LDS = BS + 8, LDC = BS + 4;
  static_assert(F % WPS == 0 && ROWS % 16 == 0, "fragments and rows divide evenly");
  __shared__ __align__(32) uint16_t gs[TK][LDS];
  __shared__ __align__(32) uint16_t xs[TK][LDS];
  __shared__ __align__(32) float red[S][BS][LDC];
  using E = typename WmmaType<T>::type;

  const int tid = threadIdx.x, warp = tid / 32;
  const int split = warp / WPS, first = warp % WPS;
  const int64_t k = blockIdx.x;
  int64_t lo = 0, hi = R - 1;  // block row of k, as in bsr_weight_grad_kernel
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (crow[mid] <= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const uint16_t* g_blk = dy + lo * BS;
  const uint16_t* x_blk = x + col[k] * BS;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FPW];
#pragma unroll
  for (int f = 0; f < FPW; ++f) wmma::fill_fragment(acc[f], 0.0f);
  const int64_t m_lo = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_hi = m_lo + rows_per_split < M ? m_lo + rows_per_split : M;
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += TK) {
    stage_rows<TK, BS, LDS, kVec>(gs, g_blk, out_features, m0, m_hi, tid);
    stage_rows<TK, BS, LDS, kVec>(xs, x_blk, in_features, m0, m_hi, tid);
    __syncthreads();
#pragma unroll
    for (int kk = split * ROWS; kk < (split + 1) * ROWS; kk += 16) {
#pragma unroll
      for (int f = 0; f < FPW; ++f) {
        const int fi = (first + f * WPS) / NF, fj = (first + f * WPS) % NF;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major> fa;  // G^T
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb;  // X
        wmma::load_matrix_sync(fa, reinterpret_cast<const E*>(&gs[kk][fi * 16]), LDS);
        wmma::load_matrix_sync(fb, reinterpret_cast<const E*>(&xs[kk][fj * 16]), LDS);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int fi = (first + f * WPS) / NF, fj = (first + f * WPS) % NF;
    wmma::store_matrix_sync(&red[split][fi * 16][fj * 16], acc[f], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  float* part = partial == nullptr ? nullptr : partial + (static_cast<int64_t>(blockIdx.y) * nnzb + k) * (BS * BS);
  T* dst = dvalues + k * (BS * BS);
  for (int e = tid; e < BS * BS; e += kBsrThreads) {
    const int i = e / BS, j = e % BS;
    float v = 0.0f;
#pragma unroll
    for (int s2 = 0; s2 < S; ++s2) v += red[s2][i][j];
    if (part != nullptr) {
      part[e] = v;
    } else {
      dst[e] = T(v);
    }
  }
#endif
}

// Every instantiation the host code launches (see the build-time note at the top).
// clang-format off: explicit instantiations, one macro line per variant (the formatter would merge them)
#define LOTUS_BSR_INST_BS(T, BS)                                                                                   \
  template __global__ void block_row_product_kernel<T, BS, true>(const T*, const T*, const int64_t*, const int64_t*, \
                                                                 const int64_t*, const T*, T*, int64_t, int64_t,  \
                                                                 int64_t);                                        \
  template __global__ void block_row_product_kernel<T, BS, false>(const T*, const T*, const int64_t*,               \
                                                                  const int64_t*, const int64_t*, const T*, T*,     \
                                                                  int64_t, int64_t, int64_t);                       \
  template __global__ void bsr_weight_grad_kernel<T, BS>(const T*, const T*, const int64_t*, const int64_t*, T*,   \
                                                         at::opmath_type<T>*, int64_t, int64_t, int64_t, int64_t,  \
                                                         int64_t, int64_t);
#define LOTUS_BSR_INST(T)                                                               \
  LOTUS_BSR_INST_BS(T, 16) LOTUS_BSR_INST_BS(T, 32) LOTUS_BSR_INST_BS(T, 64)            \
  template __global__ void sum_partials_kernel<T>(const at::opmath_type<T>*, T*, int64_t, int64_t);
LOTUS_BSR_INST(float)
LOTUS_BSR_INST(double)
LOTUS_BSR_INST(c10::BFloat16)
LOTUS_BSR_INST(c10::Half)
#define LOTUS_BSR_WMMA_INST(T, BS, TRANS, VEC)                                                                  \
  template __global__ void block_row_product_wmma_kernel<T, BS, TRANS, VEC>(const uint16_t*, const uint16_t*,   \
                                                                            const int64_t*, const int64_t*,     \
                                                                            const int64_t*, const T*, T*, int64_t, \
                                                                            int64_t, int64_t);
#define LOTUS_BSR_WGRAD_WMMA_INST(T, BS, VEC)                                                                    \
  template __global__ void bsr_weight_grad_wmma_kernel<T, BS, VEC>(const uint16_t*, const uint16_t*,            \
                                                                   const int64_t*, const int64_t*, T*, float*,  \
                                                                   int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                                   int64_t);
#define LOTUS_BSR_WMMA_INST_BS(T, BS)                                                                   \
  LOTUS_BSR_WMMA_INST(T, BS, true, true) LOTUS_BSR_WMMA_INST(T, BS, true, false)                       \
  LOTUS_BSR_WMMA_INST(T, BS, false, true) LOTUS_BSR_WMMA_INST(T, BS, false, false)                     \
  LOTUS_BSR_WGRAD_WMMA_INST(T, BS, true) LOTUS_BSR_WGRAD_WMMA_INST(T, BS, false)
#define LOTUS_BSR_WMMA_INST_T(T) LOTUS_BSR_WMMA_INST_BS(T, 16) LOTUS_BSR_WMMA_INST_BS(T, 32) LOTUS_BSR_WMMA_INST_BS(T, 64)
LOTUS_BSR_WMMA_INST_T(c10::BFloat16)
LOTUS_BSR_WMMA_INST_T(c10::Half)
#undef LOTUS_BSR_WMMA_INST_T
#undef LOTUS_BSR_WMMA_INST_BS
// clang-format on
#undef LOTUS_BSR_WGRAD_WMMA_INST
#undef LOTUS_BSR_WMMA_INST
#undef LOTUS_BSR_INST
#undef LOTUS_BSR_INST_BS

}  // namespace

#if !defined(__CUDA_ARCH__)
namespace {

using lotus::ceil_div;
using lotus::check_cuda;
using lotus::word_bytes;

void check_index(const char* op, const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == len, op, ": expected ", name, " int64 [",
              len, "], got ", t.sizes());
}

// Block size from values [nnzb, bs, bs]; the kernels exist for 16, 32 and 64.
int64_t check_values(const char* op, const at::Tensor& values, const at::Tensor& like, const char* name = "values") {
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2), op, ": expected ", name, " [nnzb, bs, bs]");
  const int64_t bs = values.size(1);
  TORCH_CHECK(bs == 16 || bs == 32 || bs == 64, op, ": block size must be 16, 32 or 64, got ", bs);
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), op, ": all float tensors must share one dtype");
  return bs;
}

// Calls f(std::integral_constant<int, bs>) for the runtime block size.
template <typename F>
void dispatch_bs(int64_t bs, F&& f) {
  switch (bs) {
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    default:
      f(std::integral_constant<int, 64>{});
      break;
  }
}

int compute_capability_major(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major;
}

int multiprocessors(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

// bf16 / fp16 on sm80+ go to the WMMA kernels.
bool use_wmma(const at::Tensor& t) {
  return (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf) && compute_capability_major(t) >= 8;
}

// Calls f(T{}) with T = c10::BFloat16 or c10::Half for a 16-bit tensor.
template <typename F>
void dispatch_16bit(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(c10::Half{});
  }
}

// Ranges M is split into for bwd_weight: enough CTAs for ~4 waves when nnzb alone is too few, never
// a range under 256 rows (the partial blocks cost S * nnzb * bs^2 * 4 bytes of traffic).
int64_t weight_grad_splits(int64_t M, int64_t nnzb, int sms) {
  const int64_t want = ceil_div(4 * static_cast<int64_t>(sms), nnzb);
  const int64_t most = ceil_div(M, int64_t{256});
  return std::max<int64_t>(1, std::min(want, most));
}

// fwd (kTransW, ptr = crow, idx = col, perm = null) and bwd_input (ptr = ccol, idx = row, perm).
template <bool kTransW>
void launch_block_row_product(const char* op, const at::Tensor& a, const at::Tensor& values, const at::Tensor& ptr,
                              const at::Tensor& idx, const at::Tensor* perm, const at::Tensor* bias, at::Tensor& out,
                              int64_t bs) {
  const int64_t M = a.size(0), slots = ptr.size(0) - 1;
  TORCH_CHECK(slots <= 65535, op, ": too many block ", kTransW ? "rows" : "columns", " (", slots, ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (use_wmma(a)) {  // tensor cores
    dispatch_16bit(a, [&](auto t) {
      using T = decltype(t);
      dispatch_bs(bs, [&](auto bs_c) {
        constexpr int BS = decltype(bs_c)::value;
        constexpr int TM = 2048 / BS;
        const int64_t tiles = ceil_div(M, TM);
        TORCH_CHECK(tiles <= INT32_MAX, op, ": too many rows (", M, ")");
        const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slots));
        auto launch = [&](auto vec) {
          block_row_product_wmma_kernel<T, BS, kTransW, decltype(vec)::value><<<grid, kBsrThreads, 0, stream>>>(
              static_cast<const uint16_t*>(a.const_data_ptr()), static_cast<const uint16_t*>(values.const_data_ptr()),
              ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
              perm == nullptr ? nullptr : perm->const_data_ptr<int64_t>(),
              bias == nullptr ? nullptr : bias->const_data_ptr<T>(), out.data_ptr<T>(), M, a.size(1), out.size(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (word_bytes({}, {a.const_data_ptr(), values.const_data_ptr()}) == 16) {
          launch(std::true_type{});
        } else {
          launch(std::false_type{});
        }
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bsr_block_row_product_cuda", [&] {
    dispatch_bs(bs, [&](auto bs_c) {
      constexpr int BS = decltype(bs_c)::value;
      constexpr int TM = RowsPerThread<scalar_t>::value * kBsrThreads / BS;
      const int64_t tiles = ceil_div(M, TM);
      TORCH_CHECK(tiles <= INT32_MAX, op, ": too many rows (", M, ")");
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slots));
      block_row_product_kernel<scalar_t, BS, kTransW><<<grid, kBsrThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), ptr.const_data_ptr<int64_t>(),
          idx.const_data_ptr<int64_t>(), perm == nullptr ? nullptr : perm->const_data_ptr<int64_t>(),
          bias == nullptr ? nullptr : bias->const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, a.size(1),
          out.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bsr_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                         const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const char* op = "bsr_linear_fwd";
  check_cuda(op, {&x, &values, &crow, &col, &out});
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op, ": expected x [M, in] and out [M, out]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have the dtype of x");
  const int64_t bs = check_values(op, values, x);
  const int64_t R = out.size(1) / bs, nnzb = values.size(0);
  TORCH_CHECK(out.size(1) % bs == 0 && x.size(1) % bs == 0, op, ": block size ", bs, " must divide in and out");
  check_index(op, crow, "crow", R + 1);
  check_index(op, col, "col", nnzb);
  if (bias.has_value()) {
    check_cuda(op, {&x, &*bias});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out.size(1) && bias->scalar_type() == x.scalar_type(), op,
                ": expected bias [out] of the dtype of x");
  }
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  launch_block_row_product<true>(op, x, values, crow, col, nullptr, bias.has_value() ? &*bias : nullptr, out, bs);
}

void bsr_linear_bwd_input_cuda(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                               const at::Tensor& row, const at::Tensor& perm, at::Tensor& dx) {
  const char* op = "bsr_linear_bwd_input";
  check_cuda(op, {&dy, &values, &ccol, &row, &perm, &dx});
  TORCH_CHECK(dy.dim() == 2 && dx.dim() == 2 && dx.size(0) == dy.size(0), op, ": expected dy [M, out] and dx [M, in]");
  TORCH_CHECK(dx.scalar_type() == dy.scalar_type(), op, ": dx must have the dtype of dy");
  const int64_t bs = check_values(op, values, dy);
  const int64_t Cb = dx.size(1) / bs, nnzb = values.size(0);
  TORCH_CHECK(dx.size(1) % bs == 0 && dy.size(1) % bs == 0, op, ": block size ", bs, " must divide in and out");
  check_index(op, ccol, "ccol", Cb + 1);
  check_index(op, row, "row", nnzb);
  check_index(op, perm, "perm", nnzb);
  if (dx.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  launch_block_row_product<false>(op, dy, values, ccol, row, &perm, nullptr, dx, bs);
}

void bsr_linear_bwd_weight_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                                const at::Tensor& col, at::Tensor& dvalues) {
  const char* op = "bsr_linear_bwd_weight";
  check_cuda(op, {&dy, &x, &crow, &col, &dvalues});
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), op, ": expected dy [M, out] and x [M, in]");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy and x must share one dtype");
  const int64_t bs = check_values(op, dvalues, x, "dvalues");
  const int64_t R = dy.size(1) / bs, nnzb = dvalues.size(0);
  TORCH_CHECK(dy.size(1) % bs == 0 && x.size(1) % bs == 0, op, ": block size ", bs, " must divide in and out");
  check_index(op, crow, "crow", R + 1);
  check_index(op, col, "col", nnzb);
  if (dvalues.numel() == 0) return;  // nnzb == 0
  TORCH_CHECK(nnzb <= INT32_MAX, op, ": too many blocks (", nnzb, ")");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0);
  const int64_t S = weight_grad_splits(M, nnzb, multiprocessors(x));
  const int64_t rows_per_split = S == 1 ? std::max<int64_t>(M, 1) : ceil_div(ceil_div(M, S), int64_t{64}) * 64;
  const int64_t splits = ceil_div(std::max<int64_t>(M, 1), rows_per_split);
  TORCH_CHECK(splits <= 65535, op, ": too many row splits (", splits, ")");
  const dim3 grid(static_cast<unsigned>(nnzb), static_cast<unsigned>(splits));
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // fp32 (fp64) partial blocks, summed in order by sum_partials_kernel; none for one split.
  const at::Tensor partial = splits > 1 ? at::empty({splits, nnzb, bs, bs}, x.options().dtype(acc_type)) : at::Tensor();
  if (use_wmma(x)) {  // tensor cores
    dispatch_16bit(x, [&](auto t) {
      using T = decltype(t);
      dispatch_bs(bs, [&](auto bs_c) {
        constexpr int BS = decltype(bs_c)::value;
        auto launch = [&](auto vec) {
          bsr_weight_grad_wmma_kernel<T, BS, decltype(vec)::value><<<grid, kBsrThreads, 0, stream>>>(
              static_cast<const uint16_t*>(dy.const_data_ptr()), static_cast<const uint16_t*>(x.const_data_ptr()),
              crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), dvalues.data_ptr<T>(),
              splits > 1 ? partial.data_ptr<float>() : nullptr, M, x.size(1), dy.size(1), R, nnzb, rows_per_split);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (word_bytes({}, {dy.const_data_ptr(), x.const_data_ptr()}) == 16) {
          launch(std::true_type{});
        } else {
          launch(std::false_type{});
        }
      });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_linear_bwd_weight_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_bs(bs, [&](auto bs_c) {
        constexpr int BS = decltype(bs_c)::value;
        bsr_weight_grad_kernel<scalar_t, BS><<<grid, kBsrThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), crow.const_data_ptr<int64_t>(),
            col.const_data_ptr<int64_t>(), dvalues.data_ptr<scalar_t>(),
            splits > 1 ? partial.data_ptr<acc_t>() : nullptr, M, x.size(1), dy.size(1), R, nnzb, rows_per_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (splits > 1) {
    const int64_t numel = dvalues.numel();
    const int64_t blocks = ceil_div(numel, int64_t{kBsrThreads});
    TORCH_CHECK(blocks <= INT32_MAX, op, ": too many weight elements (", numel, ")");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_sum_partials_cuda", [&] {
      sum_partials_kernel<scalar_t><<<static_cast<unsigned>(blocks), kBsrThreads, 0, stream>>>(
          partial.const_data_ptr<at::opmath_type<scalar_t>>(), dvalues.data_ptr<scalar_t>(), splits, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CUDA, m) {
  m.impl("bsr_linear_fwd", &bsr_linear_fwd_cuda);
  m.impl("bsr_linear_bwd_input", &bsr_linear_bwd_input_cuda);
  m.impl("bsr_linear_bwd_weight", &bsr_linear_bwd_weight_cuda);
}
#endif  // !defined(__CUDA_ARCH__)
