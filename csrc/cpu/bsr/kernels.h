// Raw-pointer interface of the per-ISA block-sparse micro-kernels (one file per ISA beside this one:
// avx2.cpp, avx512.cpp, avx512_bf16.cpp). No torch / ATen headers here or in those files: each holds
// intrinsics on plain pointers with function-level `target` attributes, so nothing built for one ISA
// can leak into code that runs on a CPU without it. The tensor code, the threads and the choice of
// kernel live in ../block_sparse_linear.cpp (ISA levels and the picker: ../isa.h).
#pragma once

#include <cstdint>

namespace lotus::bsr {

// One "sparse panel GEMM": out[M, n_out * bs] = A[M, K] x B, B block-sparse, listed per output block
// column o as entries ptr[o] .. ptr[o + 1] - 1, sorted by a_blk. Entry e multiplies A's K-block
// a_blk[e] (columns a_blk[e] * bs ..) with stored block b_blk[e] of the packed B.
//   fwd:       A = x,  K = in,  o = block row of W,    B block = W_k^T, list = BSR (a_blk = col)
//   bwd_input: A = dy, K = out, o = block column of W, B block = W_k,   list = BSC (a_blk = row, b_blk = perm)
struct PanelGemm {
  int64_t K = 0;
  int64_t bs = 0;
  int64_t n_out = 0;
  const int64_t* ptr = nullptr;
  const int64_t* a_blk = nullptr;
  const int64_t* b_blk = nullptr;
  const void* b = nullptr;      // packed by the kernel's pack_b
  const float* bias = nullptr;  // [n_out * bs] fp32, or null
};

// A kernel for PanelGemm. A is packed per (M chunk, K range) into panels of mr rows; each panel
// holds the range's reduction index outermost ([K range / kpair][mr][kpair] elements), so a
// micro-kernel reads it front to back. Elements are fp32 (elem 4) or bf16 (elem 2, kpair 2: the
// reduction packed in pairs, as vdpbf16ps reads them).
struct PanelKernel {
  const char* name;
  int64_t mr;    // rows of a panel / of a micro-kernel tile
  int64_t elem;  // bytes per element of A, B and out
  // B slivers of stored blocks [k0, k1) of values [nnzb][bs][bs] into dst (layout private to the
  // kernel, nnzb * bs * bs elements in all); transpose: B block = W_k^T (fwd), else W_k (bwd_input).
  void (*pack_b)(const void* values, int64_t bs, int64_t k0, int64_t k1, bool transpose, void* dst);
  // Rows [0, rows) and reduction columns [c0, c1) of A (row stride lda elements) into panels at dst
  // (ceil(rows / mr) panels of (c1 - c0) * mr elements, zero rows past `rows`; dst needs
  // kPanelSlack bytes past the end). colsum: null, or fp32 [c1 - c0] to which the column sums of
  // those rows are added (bwd_input's bias gradient, sum of dy over M, from the one pass that
  // already reads every dy element: no separate reduction over dy).
  void (*pack_a)(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum);
  // Every output tile of one packed chunk for the entries whose K-block lies in [kb0, kb1) (the
  // panels' range). An output block column's first contribution overwrites `out`, its last adds the
  // bias (and converts to the output dtype); one without any entry is written as bias / zero in the
  // range kb0 == 0. When a tile needs more than one pass over its entries (more than one K range,
  // or a list longer than the L1-sized group), fp32 partial sums go to `acc` (row stride ldo
  // floats, as many rows as the chunk) unless the output is fp32 itself (then acc may be null).
  void (*compute)(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out,
                  int64_t ldo, float* acc);
  // Mixed calls (autocast with an fp32 activation; null in the fp32 kernels, which never need them):
  // pack_a reading fp32 A and rounding it to the kernel's element on the way (round to nearest even,
  // as Tensor.to does, so the panels equal those of a cast-then-pack), and compute writing an fp32
  // `out` (the fp32 sums without the final rounding: bwd_input's dx for an fp32 x).
  void (*pack_a_f32)(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum);
  void (*compute_f32_out)(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out,
                          int64_t ldo, float* acc);
};

// dvalues of the stored blocks (SDD): dv[k] (+)= dy[:, r_k]^T x[:, c_k], reduction over M, in M
// chunks. Each used bs-wide column block of dy / x is packed per chunk into a panel (layout private
// to the kernel; panel_elems(rows, bs) elements); `block` then adds one chunk's product into an
// fp32 dv block [bs][bs].
struct WeightKernel {
  const char* name;
  int64_t mc;  // M rows per chunk
  int64_t elem;
  // Rows [0, rows) of columns [0, bs) of src (row stride ld elements) into a panel at dst.
  void (*pack)(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst);
  int64_t (*panel_elems)(int64_t rows, int64_t bs);
  // dv [bs][bs] = (accumulate ? dv : 0) + a_panel^T b_panel over `rows` rows.
  void (*block)(const void* a_panel, const void* b_panel, int64_t rows, int64_t bs, float* dv, bool accumulate);
  // pack from fp32 src, rounded to the kernel's element (RNE, as Tensor.to); null in the fp32 kernels.
  void (*pack_f32)(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst);
};

constexpr int64_t kPanelSlack = 256;

// Defined in the ISA files; null where the compiler cannot build that ISA.
extern const PanelKernel* const kAvx2Fp32Panel;
extern const WeightKernel* const kAvx2Fp32Weight;
extern const PanelKernel* const kAvx512Fp32Panel;
extern const WeightKernel* const kAvx512Fp32Weight;
extern const PanelKernel* const kAvx512Bf16Panel;
extern const WeightKernel* const kAvx512Bf16Weight;

}  // namespace lotus::bsr
