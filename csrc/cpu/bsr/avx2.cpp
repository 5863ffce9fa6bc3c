// fp32 block-sparse micro-kernels for AVX2 + FMA (interface: kernels.h).
// - PanelKernel (fwd / bwd_input): A packed into 6-row panels [K][6] by an in-register 6x8 transpose;
//   B slivers [bs][16] per (block, 16-column slice), contiguous (with the [bs][bs] rows of a block,
//   a 128-256 B pitch, a 16-column slice used only every other L1 set and the group's slivers
//   thrashed against A); a 6x16 output tile in 12 ymm accumulators (2 FMA pipes x 4-cycle latency
//   needs >= 8 in flight).
// - WeightKernel (bwd_weight): [m][bs] row panels, 4x16 tiles (8 accumulators) reduced over the
//   chunk's rows. (A 4x24 tile over 8-column segments, 12 accumulators, did not measure faster.)
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "panel_loop.h"
#include "x86.h"

namespace lotus::bsr {
namespace {

#define LOTUS_AVX2 __attribute__((target("avx2,fma")))

constexpr int64_t MR = 6;
constexpr int64_t NR = 16;

// B slivers: transpose (fwd, B = W_k^T): [k][h][j][i'] = v[k][h*16 + i'][j]; else (bwd_input, B = W_k):
// [k][h][i][j'] = v[k][i][h*16 + j'].
LOTUS_AVX2 void pack_b(const void* values, int64_t bs, int64_t k0, int64_t k1, bool transpose, void* dst) {
  const float* v = static_cast<const float*>(values);
  float* d = static_cast<float*>(dst);
  for (int64_t k = k0; k < k1; ++k) {
    const float* vk = v + k * bs * bs;
    for (int64_t h = 0; h < bs / NR; ++h) {
      float* s = d + (k * (bs / NR) + h) * bs * NR;
      if (transpose) {
        for (int64_t i0 = 0; i0 < NR; i0 += 8)
          for (int64_t j0 = 0; j0 < bs; j0 += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(vk + (h * NR + i0 + t) * bs + j0);
            transpose8(r);
            for (int t = 0; t < 8; ++t) _mm256_storeu_ps(s + (j0 + t) * NR + i0, r[t]);
          }
      } else {
        for (int64_t i = 0; i < bs; ++i) {
          _mm256_storeu_ps(s + i * NR, _mm256_loadu_ps(vk + i * bs + h * NR));
          _mm256_storeu_ps(s + i * NR + 8, _mm256_loadu_ps(vk + i * bs + h * NR + 8));
        }
      }
    }
  }
}

// Panels [c1 - c0][6], zero rows past `rows`. Full panels: 8 columns at a time, a 6(+2 zero)x8
// transpose in registers, each column stored 8 wide at d + k * 6 (the next store overwrites the 2
// extra floats; the last one lands in the slack). The scalar loop took ~4 cycles per float. With
// colsum, the 6 loaded rows are also added up before the transpose.
LOTUS_AVX2 void pack_a(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum) {
  const int64_t K = c1 - c0;
  for (int64_t p = 0; p * MR < rows; ++p) {
    const int64_t mv = std::min(MR, rows - p * MR);
    float* d = static_cast<float*>(dst) + p * K * MR;
    const float* s = static_cast<const float*>(a) + p * MR * lda + c0;
    int64_t k = 0;
    if (mv == MR) {
      for (; k + 8 <= K; k += 8) {
        __m256 r[8];
        for (int t = 0; t < 6; ++t) r[t] = _mm256_loadu_ps(s + t * lda + k);
        r[6] = r[7] = _mm256_setzero_ps();
        if (colsum) {
          const __m256 s0 = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3]));
          _mm256_storeu_ps(colsum + k,
                           _mm256_add_ps(_mm256_loadu_ps(colsum + k), _mm256_add_ps(s0, _mm256_add_ps(r[4], r[5]))));
        }
        transpose8(r);
        for (int t = 0; t < 8; ++t) _mm256_storeu_ps(d + (k + t) * MR, r[t]);
      }
    }
    pack_a_tail_f32(s, lda, mv, MR, k, K, d, colsum);
  }
}

// out tile [mv x 16] (+)= A panel x the call's B slivers; bias added on the last pass.
LOTUS_AVX2 void tile_6x16(const TileCall& t, float* out, int64_t ldo) {
  const PanelGemm& g = *t.g;
  const int64_t bs = g.bs, mv = t.mv;
  float* o = out + t.row * ldo + t.o * bs + t.h * NR;
  // Every loop over the accumulators is fully unrolled: an array indexed by a run-time value
  // stays in memory, and GCC then stored all 12 accumulators back every reduction step.
  // Rows >= mv stay 0: their A rows are zero padding and they are never stored.
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    const bool load = !t.first && m < mv;
    c[m][0] = load ? _mm256_loadu_ps(o + m * ldo) : _mm256_setzero_ps();
    c[m][1] = load ? _mm256_loadu_ps(o + m * ldo + 8) : _mm256_setzero_ps();
  }
  const float* bpk = static_cast<const float*>(g.b);
  for (int64_t e = t.e0; e < t.e1; ++e) {
    const float* a = static_cast<const float*>(t.apanel) + (g.a_blk[e] - t.kb0) * bs * MR;
    const float* b = bpk + (g.b_blk[e] * (bs / NR) + t.h) * bs * NR;
    for (int64_t kk = 0; kk < bs; ++kk, a += MR, b += NR) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(a + m);
        c[m][0] = _mm256_fmadd_ps(av, b0, c[m][0]);
        c[m][1] = _mm256_fmadd_ps(av, b1, c[m][1]);
      }
    }
  }
  __m256 z0 = _mm256_setzero_ps(), z1 = z0;
  if (t.last && g.bias) {
    z0 = _mm256_loadu_ps(g.bias + t.o * bs + t.h * NR);
    z1 = _mm256_loadu_ps(g.bias + t.o * bs + t.h * NR + 8);
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
    if (m < mv) {
      _mm256_storeu_ps(o + m * ldo, _mm256_add_ps(c[m][0], z0));
      _mm256_storeu_ps(o + m * ldo + 8, _mm256_add_ps(c[m][1], z1));
    }
}

void compute(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out, int64_t ldo,
             float*) {
  const int64_t K = (kb1 - kb0) * g.bs;
  float* o = static_cast<float*>(out);
  panel_loop(g, static_cast<const char*>(panels), rows, kb0, kb1, MR, NR, group_blocks(g.bs, NR, 4), K * MR * 4,
             [&](const TileCall& t) { tile_6x16(t, o, ldo); });
}

// ---------------------------------------------------------------- bwd_weight
// Panel = rows [m][bs] copied contiguous: the source rows are 1.5-6 KiB apart and would map onto
// 2-8 L1 sets. Explicit vectors: the plain loop (and a memcpy per row) ran at ~4 cycles per float.
LOTUS_AVX2 void pack_rows(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst) {
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
  for (int64_t m = 0; m < rows; ++m, s += ld, d += bs)
    for (int64_t j = 0; j < bs; j += 16) {
      const __m256 x0 = _mm256_loadu_ps(s + j), x1 = _mm256_loadu_ps(s + j + 8);
      _mm256_storeu_ps(d + j, x0);
      _mm256_storeu_ps(d + j + 8, x1);
    }
}

int64_t row_panel_elems(int64_t rows, int64_t bs) {
  return rows * bs;
}

// dv tile [4 x 16] (row stride bs) (+)= sum_m a[m][0..4]^T b[m][0..16], a/b rows of stride bs.
LOTUS_AVX2 void tile_4x16_t(const float* a, const float* b, int64_t bs, int64_t rows, float* dv, bool accumulate) {
  __m256 c[4][2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    if (accumulate) {
      c[i][0] = _mm256_loadu_ps(dv + i * bs);
      c[i][1] = _mm256_loadu_ps(dv + i * bs + 8);
    } else {
      c[i][0] = c[i][1] = _mm256_setzero_ps();
    }
  for (int64_t m = 0; m < rows; ++m, a += bs, b += bs) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i);
      c[i][0] = _mm256_fmadd_ps(av, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(av, b1, c[i][1]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dv + i * bs, c[i][0]);
    _mm256_storeu_ps(dv + i * bs + 8, c[i][1]);
  }
}

void weight_block(const void* a_panel, const void* b_panel, int64_t rows, int64_t bs, float* dv, bool accumulate) {
  const float* a = static_cast<const float*>(a_panel);
  const float* b = static_cast<const float*>(b_panel);
  for (int64_t i = 0; i < bs; i += 4)
    for (int64_t j = 0; j < bs; j += NR) tile_4x16_t(a + i, b + j, bs, rows, dv + i * bs + j, accumulate);
}

const PanelKernel kPanel{"avx2 fp32 6x16", MR, 4, pack_b, pack_a, compute, nullptr, nullptr};
const WeightKernel kWeight{"avx2 fp32 4x16", 64, 4, pack_rows, row_panel_elems, weight_block, nullptr};

}  // namespace

const PanelKernel* const kAvx2Fp32Panel = &kPanel;
const WeightKernel* const kAvx2Fp32Weight = &kWeight;

}  // namespace lotus::bsr

#else  // not x86: no such kernels (the dispatch tables skip null entries)
#include "kernels.h"
namespace lotus::bsr {
const PanelKernel* const kAvx2Fp32Panel = nullptr;
const WeightKernel* const kAvx2Fp32Weight = nullptr;
}  // namespace lotus::bsr
#endif
