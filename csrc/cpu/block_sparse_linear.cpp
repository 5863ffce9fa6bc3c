// CPU kernels of block_sparse_linear (schemas and the storage format: csrc/bindings.cpp and
// lotus_kernels/ops/block_sparse_linear.py). Three products over the stored bs x bs blocks only:
//   fwd        out[M, out] = x @ W^T + bias       (blocks of a block row, BSR order)
//   bwd_input  dx[M, in]   = dy @ W               (blocks of a block column, BSC order via perm)
//   bwd_weight dvalues[k]  = dy[:, r_k]^T @ x[:, c_k]  (SDD: only stored blocks)
//
// fp32 on an AVX2+FMA CPU runs register-blocked micro-kernels (BLIS-style):
// - fwd / bwd_input: the activation (x or dy) is packed per M-chunk into 6-row panels [K][6]
//   (contiguous broadcasts, no 4 KiB-aliasing strided rows), the weight block rows are the B
//   operand (W^T or W per block, repacked per call into contiguous [bs][16] slivers); a 6x16 output
//   tile lives in 12 ymm accumulators across a K group of <= 256 reduction rows (the group's B
//   slivers stay in L1 while the chunk's panels stream from L2) and is written once per group
//   (+ bias with the first): each output element is owned by one tile, so no atomics and no
//   zero-fill pass; an empty block row/column is written as bias/zero by the same loop.
// - bwd_weight: the reduction runs over M; per M-chunk of 64 rows dy and x are repacked block by
//   block into [m][bs] panels (strided rows of a 1536/6144-byte pitch would map onto 2-8 L1 sets),
//   then every stored block is 4x16 tiles (8 accumulators = 2 FMA pipes x 4-cycle latency on Zen 3)
//   accumulated into dvalues in place. (A 4x24 tile over 8-column segments of a block row's blocks,
//   12 accumulators, did not measure faster on the shared machine; not kept.)
// bf16 / fp16 convert to fp32 and take the fp32 path (accumulation in fp32); fp64 and CPUs without
// AVX2 take plain loops (correct, not tuned).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOTUS_X86 1
#endif

namespace {

constexpr int64_t MR = 6;    // rows of an fwd / bwd_input tile
constexpr int64_t NR = 16;   // columns of a tile (two ymm)
constexpr int64_t WMC = 64;  // M rows per bwd_weight chunk

struct Operands {
  const float* a;          // packed A panels of one M-chunk: panel p at a + p * K * MR, [K][MR]
  int64_t K;               // reduction length of the dense A (in for fwd, out for bwd_input)
  const int64_t* ptr;      // block list per output block column: ptr[o]..ptr[o+1]
  const int64_t* a_blk;    // per list entry: which bs-block of K it reads from A
  const int64_t* b_blk;    // per list entry: which stored block is B (index into b)
  const float* b;          // B blocks packed [nb][bs / NR][bs][NR]: row kk = reduction index, NR outputs
  const float* bias;       // [n_out * bs] or null
  int64_t bs;
};

bool have_avx2() {
#ifdef LOTUS_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// A panels: rows 0..rows of src [*, K] (row stride K) into [ceil(rows/MR)][K][MR], zero-padded.
// dst needs 2 floats of slack past the last panel (the 8-wide stores below overrun by 2).
#ifdef LOTUS_X86
__attribute__((target("avx2,fma"))) void pack_panels(const float* src, int64_t K, int64_t rows, float* dst) {
  for (int64_t p = 0; p * MR < rows; ++p) {
    const int64_t mv = std::min(MR, rows - p * MR);
    float* d = dst + p * K * MR;
    const float* s = src + p * MR * K;
    int64_t k = 0;
    if (mv == MR) {
      // 8 columns at a time: a 6(+2 zero)x8 transpose in registers, each column stored 8 wide at
      // d + k * 6 (the next store overwrites the 2 extra floats). The scalar loop took ~4 cycles
      // per float.
      const __m256 z = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        const __m256 r0 = _mm256_loadu_ps(s + k), r1 = _mm256_loadu_ps(s + K + k), r2 = _mm256_loadu_ps(s + 2 * K + k),
                     r3 = _mm256_loadu_ps(s + 3 * K + k), r4 = _mm256_loadu_ps(s + 4 * K + k),
                     r5 = _mm256_loadu_ps(s + 5 * K + k);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, z, 0x44), u5 = _mm256_shuffle_ps(t4, z, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, z, 0x44), u7 = _mm256_shuffle_ps(t5, z, 0xEE);
        float* o = d + k * MR;
        _mm256_storeu_ps(o + 0 * MR, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(o + 1 * MR, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(o + 2 * MR, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(o + 3 * MR, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(o + 4 * MR, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(o + 5 * MR, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(o + 6 * MR, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(o + 7 * MR, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
    }
    for (; k < K; ++k)
      for (int64_t m = 0; m < MR; ++m) d[k * MR + m] = m < mv ? s[m * K + k] : 0.f;
  }
}
#endif

#ifdef LOTUS_X86
// out tile [mv x 16] (row stride ldo) = bias + sum over the list of A panel slice [bs][6] x B slice
// [bs][16] (row stride bs).
// Entries e0..e1 of the list of output block column o; `first`: the tile starts from zero and gets the
// bias, else it adds to what `out` holds (a later K group).
__attribute__((target("avx2,fma"))) void tile_6x16(const Operands& op, const float* apanel, int64_t o, int64_t h,
                                                    int64_t e0, int64_t e1, bool first, float* out, int64_t ldo,
                                                    int64_t mv) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (!first) {  // rows >= mv stay 0: their A rows are zero padding and they are never stored
#define LOTUS_LOAD_ROW(m, a, b) \
  if (mv > m) { a = _mm256_loadu_ps(out + m * ldo); b = _mm256_loadu_ps(out + m * ldo + 8); }
    LOTUS_LOAD_ROW(0, c00, c01) LOTUS_LOAD_ROW(1, c10, c11) LOTUS_LOAD_ROW(2, c20, c21)
    LOTUS_LOAD_ROW(3, c30, c31) LOTUS_LOAD_ROW(4, c40, c41) LOTUS_LOAD_ROW(5, c50, c51)
#undef LOTUS_LOAD_ROW
  }
  const int64_t bs = op.bs;
  for (int64_t e = e0; e < e1; ++e) {
    const float* a = apanel + op.a_blk[e] * bs * MR;
    // Contiguous 2-4 KiB slivers: with the [bs][bs] rows of a block (128-256 B pitch) a 16-column
    // slice used only every other L1 set, and the B sliver of a K group thrashed against A.
    const float* b = op.b + (op.b_blk[e] * (bs / NR) + h) * bs * NR;
    for (int64_t kk = 0; kk < bs; ++kk, a += MR, b += NR) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      __m256 av = _mm256_broadcast_ss(a + 0);
      c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
      av = _mm256_broadcast_ss(a + 1);
      c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
      av = _mm256_broadcast_ss(a + 2);
      c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
      av = _mm256_broadcast_ss(a + 3);
      c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
      av = _mm256_broadcast_ss(a + 4);
      c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
      av = _mm256_broadcast_ss(a + 5);
      c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
  }
  __m256 z0 = _mm256_setzero_ps(), z1 = z0;
  if (first && op.bias) {
    z0 = _mm256_loadu_ps(op.bias + o * bs + h * NR);
    z1 = _mm256_loadu_ps(op.bias + o * bs + h * NR + 8);
  }
  const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int64_t m = 0; m < mv; ++m) {
    _mm256_storeu_ps(out + m * ldo, _mm256_add_ps(rows[m][0], z0));
    _mm256_storeu_ps(out + m * ldo + 8, _mm256_add_ps(rows[m][1], z1));
  }
}

// dv tile [4 x 16] (row stride bs) (+)= sum_m a[m][0..4]^T b[m][0..16], a/b rows of stride bs.
__attribute__((target("avx2,fma"))) void tile_4x16_t(const float* a, const float* b, int64_t bs, int64_t rows,
                                                      float* dv, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  if (accumulate) {
    c00 = _mm256_loadu_ps(dv); c01 = _mm256_loadu_ps(dv + 8);
    c10 = _mm256_loadu_ps(dv + bs); c11 = _mm256_loadu_ps(dv + bs + 8);
    c20 = _mm256_loadu_ps(dv + 2 * bs); c21 = _mm256_loadu_ps(dv + 2 * bs + 8);
    c30 = _mm256_loadu_ps(dv + 3 * bs); c31 = _mm256_loadu_ps(dv + 3 * bs + 8);
  }
  for (int64_t m = 0; m < rows; ++m, a += bs, b += bs) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
  }
  _mm256_storeu_ps(dv, c00); _mm256_storeu_ps(dv + 8, c01);
  _mm256_storeu_ps(dv + bs, c10); _mm256_storeu_ps(dv + bs + 8, c11);
  _mm256_storeu_ps(dv + 2 * bs, c20); _mm256_storeu_ps(dv + 2 * bs + 8, c21);
  _mm256_storeu_ps(dv + 3 * bs, c30); _mm256_storeu_ps(dv + 3 * bs + 8, c31);
}

// d [rows][n] = rows of s (pitch ld), n a multiple of 16. Explicit vectors: the plain loop (and a
// memcpy per row) ran at ~4 cycles per float, ~8 ms of packing per ViT-S bwd_weight.
__attribute__((target("avx2,fma"))) void copy_rows(const float* s, int64_t ld, int64_t rows, int64_t n, float* d) {
  for (int64_t m = 0; m < rows; ++m, s += ld, d += n)
    for (int64_t j = 0; j < n; j += 16) {
      const __m256 a = _mm256_loadu_ps(s + j), b = _mm256_loadu_ps(s + j + 8);
      _mm256_storeu_ps(d + j, a);
      _mm256_storeu_ps(d + j + 8, b);
    }
}
#endif

// out [M, n_out * bs] from A [M, K] (fp32, AVX2). M is cut into chunks whose packed panels fit in
// ~half the L2; per chunk the output block columns are walked in order so one B slice is reused
// by every panel of the chunk.
void sparse_panel_gemm(const float* A, int64_t M, Operands op, int64_t n_out, float* out) {
#ifdef LOTUS_X86
  const int64_t ldo = n_out * op.bs;
  const int64_t mc = std::max<int64_t>(MR, (256 * 1024 / 4 / std::max<int64_t>(op.K, 1)) / MR * MR);
  const int64_t chunks = (M + mc - 1) / mc;
  const int64_t kb = std::max<int64_t>(1, 256 / op.bs);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> panels(static_cast<size_t>(mc * op.K + 8));
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t m0 = ch * mc, rows = std::min(mc, M - m0);
      pack_panels(A + m0 * op.K, op.K, rows, panels.data());
      const int64_t np = (rows + MR - 1) / MR;
      for (int64_t o = 0; o < n_out; ++o)
        for (int64_t h = 0; h < op.bs / NR; ++h) {
          // K groups of <= KB blocks: their [KB*bs][16] B sliver (16 KiB) stays in L1 while every
          // panel of the chunk streams past it (a whole 1536-long list was 96 KiB: 1.35x slower).
          const int64_t end = op.ptr[o + 1];
          int64_t e0 = op.ptr[o];
          do {
            const int64_t e1 = std::min(end, e0 + kb);
            for (int64_t p = 0; p < np; ++p)
              tile_6x16(op, panels.data() + p * op.K * MR, o, h, e0, e1, e0 == op.ptr[o],
                        out + (m0 + p * MR) * ldo + o * op.bs + h * NR, ldo, std::min(MR, rows - p * MR));
            e0 = e1;
          } while (e0 < end);
        }
    }
  });
#endif
}

// ---------------------------------------------------------------- plain loops (fp64, no AVX2)
template <typename T>
void fwd_plain(const T* x, int64_t M, int64_t in, const T* v, const int64_t* crow, const int64_t* col, const T* bias,
               int64_t R, int64_t bs, T* out) {
  const int64_t ldo = R * bs;
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    std::vector<T> acc(bs);
    for (int64_t m = b; m < e; ++m)
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t i = 0; i < bs; ++i) acc[i] = bias ? bias[r * bs + i] : T(0);
        for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
          const T* xr = x + m * in + col[k] * bs;
          const T* vk = v + k * bs * bs;
          for (int64_t i = 0; i < bs; ++i) {
            T s = 0;
            for (int64_t j = 0; j < bs; ++j) s += vk[i * bs + j] * xr[j];
            acc[i] += s;
          }
        }
        std::copy(acc.begin(), acc.end(), out + m * ldo + r * bs);
      }
  });
}

template <typename T>
void bwd_input_plain(const T* dy, int64_t M, int64_t out_f, const T* v, const int64_t* ccol, const int64_t* row,
                     const int64_t* perm, int64_t Cb, int64_t bs, T* dx) {
  const int64_t ldx = Cb * bs;
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    std::vector<T> acc(bs);
    for (int64_t m = b; m < e; ++m)
      for (int64_t c = 0; c < Cb; ++c) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t t = ccol[c]; t < ccol[c + 1]; ++t) {
          const T* g = dy + m * out_f + row[t] * bs;
          const T* vk = v + perm[t] * bs * bs;
          for (int64_t i = 0; i < bs; ++i)
            for (int64_t j = 0; j < bs; ++j) acc[j] += g[i] * vk[i * bs + j];
        }
        std::copy(acc.begin(), acc.end(), dx + m * ldx + c * bs);
      }
  });
}

template <typename T>
void bwd_weight_plain(const T* dy, const T* x, int64_t M, int64_t out_f, int64_t in, const int64_t* blk_row,
                      const int64_t* col, int64_t nnzb, int64_t bs, T* dv) {
  at::parallel_for(0, nnzb, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      T* d = dv + k * bs * bs;
      std::fill(d, d + bs * bs, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const T* g = dy + m * out_f + blk_row[k] * bs;
        const T* xr = x + m * in + col[k] * bs;
        for (int64_t i = 0; i < bs; ++i)
          for (int64_t j = 0; j < bs; ++j) d[i * bs + j] += g[i] * xr[j];
      }
    }
  });
}

// ---------------------------------------------------------------- fp32 AVX2 drivers
void fwd_avx2(const float* x, int64_t M, int64_t in, const float* v, const int64_t* crow, const int64_t* col,
              const float* bias, int64_t R, int64_t bs, int64_t nnzb, float* out) {
  // B of the forward is W^T per block, packed: wt[k][h][j][i'] = v[k][h * NR + i'][j] (one pass over
  // the weight per call, nnzb * bs^2 floats, ~1/(2M) of the FLOPs).
  std::vector<float> wt(static_cast<size_t>(nnzb * bs * bs));
  at::parallel_for(0, nnzb, 16, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      for (int64_t h = 0; h < bs / NR; ++h)
        for (int64_t j = 0; j < bs; ++j)
          for (int64_t i = 0; i < NR; ++i)
            wt[((k * (bs / NR) + h) * bs + j) * NR + i] = v[(k * bs + h * NR + i) * bs + j];
  });
  std::vector<int64_t> kidx(static_cast<size_t>(nnzb));
  for (int64_t k = 0; k < nnzb; ++k) kidx[k] = k;
  Operands op{nullptr, in, crow, col, kidx.data(), wt.data(), bias, bs};
  sparse_panel_gemm(x, M, op, R, out);
}

void bwd_weight_avx2(const float* dy, const float* x, int64_t M, int64_t out_f, int64_t in, const int64_t* crow,
                     const int64_t* col, int64_t R, int64_t nnzb, int64_t bs, float* dv) {
#ifdef LOTUS_X86
  const int64_t Cb = in / bs;
  std::vector<float> dyp(static_cast<size_t>(WMC * out_f)), xp(static_cast<size_t>(WMC * in));
  std::vector<char> used(static_cast<size_t>(R + Cb), 0);  // block rows, then block columns, with a stored block
  for (int64_t r = 0; r < R; ++r) used[r] = crow[r + 1] > crow[r];
  for (int64_t k = 0; k < nnzb; ++k) used[R + col[k]] = 1;
  for (int64_t m0 = 0; m0 < M; m0 += WMC) {
    const int64_t rows = std::min(WMC, M - m0);
    // [block][m][bs] panels: the tiles below read them with a bs-float pitch.
    at::parallel_for(0, R + Cb, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const bool is_dy = t < R;
        const int64_t blk = is_dy ? t : t - R, ld = is_dy ? out_f : in;
        const float* s = (is_dy ? dy : x) + m0 * ld + blk * bs;
        float* d = (is_dy ? dyp.data() : xp.data()) + blk * WMC * bs;
        if (used[t]) copy_rows(s, ld, rows, bs, d);
      }
    });
    const bool accumulate = m0 > 0;
    at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r)
        for (int64_t k = crow[r]; k < crow[r + 1]; ++k)
          for (int64_t i = 0; i < bs; i += 4)
            for (int64_t j = 0; j < bs; j += NR)
              tile_4x16_t(dyp.data() + r * WMC * bs + i, xp.data() + col[k] * WMC * bs + j, bs, rows,
                          dv + (k * bs + i) * bs + j, accumulate);
    });
  }
#endif
}

// ---------------------------------------------------------------- entry points
void check_common(const at::Tensor& a, const at::Tensor& values, const at::Tensor& out, const char* name) {
  TORCH_CHECK(a.dim() == 2 && values.dim() == 3 && out.dim() == 2, name, ": expected 2-D activations, 3-D values");
  TORCH_CHECK(a.is_contiguous() && values.is_contiguous() && out.is_contiguous(), name, ": expected contiguous tensors");
  TORCH_CHECK(a.scalar_type() == values.scalar_type() && a.scalar_type() == out.scalar_type(), name,
              ": expected one float dtype");
}

bool low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void bsr_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                        const std::optional<at::Tensor>& bias, at::Tensor& out) {
  check_common(x, values, out, "bsr_linear_fwd");
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), "bsr_linear_fwd: expected contiguous index tensors");
  if (low_precision(x)) {
    at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    std::optional<at::Tensor> b32 = bias ? std::optional<at::Tensor>(f32(*bias)) : std::nullopt;
    bsr_linear_fwd_cpu(f32(x), f32(values), crow, col, b32, tmp);
    out.copy_(tmp);
    return;
  }
  const int64_t M = x.size(0), in = x.size(1), bs = values.size(1), R = crow.numel() - 1, nnzb = values.size(0);
  if (M == 0) return;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat && have_avx2() && bs % NR == 0) {
    fwd_avx2(x.const_data_ptr<float>(), M, in, values.const_data_ptr<float>(), crow.const_data_ptr<int64_t>(),
             col.const_data_ptr<int64_t>(), bias ? b.const_data_ptr<float>() : nullptr, R, bs, nnzb,
             out.mutable_data_ptr<float>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsr_linear_fwd_cpu", [&] {
    fwd_plain<scalar_t>(x.const_data_ptr<scalar_t>(), M, in, values.const_data_ptr<scalar_t>(),
                        crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
                        bias ? b.const_data_ptr<scalar_t>() : nullptr, R, bs, out.mutable_data_ptr<scalar_t>());
  });
}

void bsr_linear_bwd_input_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                              const at::Tensor& row, const at::Tensor& perm, at::Tensor& dx) {
  check_common(dy, values, dx, "bsr_linear_bwd_input");
  TORCH_CHECK(ccol.is_contiguous() && row.is_contiguous() && perm.is_contiguous(),
              "bsr_linear_bwd_input: expected contiguous index tensors");
  if (low_precision(dy)) {
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(at::kFloat));
    bsr_linear_bwd_input_cpu(f32(dy), f32(values), ccol, row, perm, tmp);
    dx.copy_(tmp);
    return;
  }
  const int64_t M = dy.size(0), out_f = dy.size(1), bs = values.size(1), Cb = ccol.numel() - 1;
  if (M == 0) return;
  if (dy.scalar_type() == at::kFloat && have_avx2() && bs % NR == 0) {
    // B is W itself per block, packed [k][h][i][j'] = v[k][i][h * NR + j'].
    const int64_t nnzb = values.size(0);
    const float* v = values.const_data_ptr<float>();
    std::vector<float> vp(static_cast<size_t>(nnzb * bs * bs));
    at::parallel_for(0, nnzb, 16, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        for (int64_t h = 0; h < bs / NR; ++h)
          for (int64_t i = 0; i < bs; ++i)
            for (int64_t j = 0; j < NR; ++j)
              vp[((k * (bs / NR) + h) * bs + i) * NR + j] = v[(k * bs + i) * bs + h * NR + j];
    });
    Operands op{nullptr, out_f, ccol.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(),
                perm.const_data_ptr<int64_t>(), vp.data(), nullptr, bs};
    sparse_panel_gemm(dy.const_data_ptr<float>(), M, op, Cb, dx.mutable_data_ptr<float>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_linear_bwd_input_cpu", [&] {
    bwd_input_plain<scalar_t>(dy.const_data_ptr<scalar_t>(), M, out_f, values.const_data_ptr<scalar_t>(),
                              ccol.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(),
                              perm.const_data_ptr<int64_t>(), Cb, bs, dx.mutable_data_ptr<scalar_t>());
  });
}

void bsr_linear_bwd_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               at::Tensor& dvalues) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dvalues.dim() == 3, "bsr_linear_bwd_weight: bad ranks");
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous() && dvalues.is_contiguous() && crow.is_contiguous() &&
                  col.is_contiguous(),
              "bsr_linear_bwd_weight: expected contiguous tensors");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.scalar_type() == dvalues.scalar_type(),
              "bsr_linear_bwd_weight: expected one float dtype");
  if (low_precision(dy)) {
    at::Tensor tmp = at::empty(dvalues.sizes(), dvalues.options().dtype(at::kFloat));
    bsr_linear_bwd_weight_cpu(f32(dy), f32(x), crow, col, tmp);
    dvalues.copy_(tmp);
    return;
  }
  const int64_t M = dy.size(0), out_f = dy.size(1), in = x.size(1), bs = dvalues.size(1), nnzb = dvalues.size(0),
                R = crow.numel() - 1;
  if (nnzb == 0) return;
  if (M == 0) {
    dvalues.zero_();
    return;
  }
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  if (dy.scalar_type() == at::kFloat && have_avx2() && bs % NR == 0) {
    bwd_weight_avx2(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), M, out_f, in, cr,
                    col.const_data_ptr<int64_t>(), R, nnzb, bs, dvalues.mutable_data_ptr<float>());
    return;
  }
  std::vector<int64_t> blk_row(static_cast<size_t>(nnzb));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = cr[r]; k < cr[r + 1]; ++k) blk_row[k] = r;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_linear_bwd_weight_cpu", [&] {
    bwd_weight_plain<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), M, out_f, in,
                               blk_row.data(), col.const_data_ptr<int64_t>(), nnzb, bs,
                               dvalues.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("bsr_linear_fwd", &bsr_linear_fwd_cpu);
  m.impl("bsr_linear_bwd_input", &bsr_linear_bwd_input_cpu);
  m.impl("bsr_linear_bwd_weight", &bsr_linear_bwd_weight_cpu);
}
