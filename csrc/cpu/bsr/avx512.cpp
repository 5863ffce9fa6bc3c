// fp32 block-sparse micro-kernels for AVX-512 (F + BW + VL + DQ, oneDNN's avx512_core); interface:
// kernels.h. Same structure as avx2.cpp with the 32 zmm registers spent on bigger tiles:
// - PanelKernel: 12-row A panels, a 12 x 32 output tile in 24 zmm accumulators (12 x 16 for
//   bs = 16), A broadcast straight from the panel ({1to16} memory operands), two B loads per
//   reduction step: 24 FMAs per 14 loads (AVX2's 6x16: 12 per 8). On a CPU with two 512-bit FMA
//   pipes (Xeon) this doubles the FLOPs per cycle over AVX2; on Zen 4 (512-bit ops as two 256-bit
//   halves) the peak is the same and only the instruction and load counts fall.
// - WeightKernel: [m][bs] row panels, 8 x 32 tiles (16 accumulators).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "panel_loop.h"
#include "x86.h"

namespace lotus::bsr {
namespace {

#define LOTUS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t MR = 12;

LOTUS_AVX512 void pack_b(const void* values, int64_t bs, int64_t k0, int64_t k1, bool transpose, void* dst) {
  const int64_t nr = nr_of(bs);
  const float* v = static_cast<const float*>(values);
  float* d = static_cast<float*>(dst);
  for (int64_t k = k0; k < k1; ++k) {
    const float* vk = v + k * bs * bs;
    for (int64_t h = 0; h < bs / nr; ++h) {
      float* s = d + (k * (bs / nr) + h) * bs * nr;
      if (transpose) {  // [j][i'] = W_k[h * nr + i'][j]
        for (int64_t i0 = 0; i0 < nr; i0 += 8)
          for (int64_t j0 = 0; j0 < bs; j0 += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(vk + (h * nr + i0 + t) * bs + j0);
            transpose8(r);
            for (int t = 0; t < 8; ++t) _mm256_storeu_ps(s + (j0 + t) * nr + i0, r[t]);
          }
      } else {  // [i][j'] = W_k[i][h * nr + j']
        for (int64_t i = 0; i < bs; ++i)
          for (int64_t j = 0; j < nr; j += 16)
            _mm512_storeu_ps(s + i * nr + j, _mm512_loadu_ps(vk + i * bs + h * nr + j));
      }
    }
  }
}

// Panels [c1 - c0][12]: per 8 columns, rows 0-7 and rows 8-11 (+4 zero) transposed in registers;
// with colsum, the 12 loaded rows are also added up before the transpose.
LOTUS_AVX512 void pack_a(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum) {
  const int64_t K = c1 - c0;
  for (int64_t p = 0; p * MR < rows; ++p) {
    const int64_t mv = std::min(MR, rows - p * MR);
    float* d = static_cast<float*>(dst) + p * K * MR;
    const float* s = static_cast<const float*>(a) + p * MR * lda + c0;
    int64_t k = 0;
    if (mv == MR) {
      for (; k + 8 <= K; k += 8) {
        __m256 r[8], q[8];
        for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(s + t * lda + k);
        for (int t = 0; t < 4; ++t) q[t] = _mm256_loadu_ps(s + (8 + t) * lda + k);
        q[4] = q[5] = q[6] = q[7] = _mm256_setzero_ps();
        if (colsum) {
          const __m256 s0 = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3]));
          const __m256 s1 = _mm256_add_ps(_mm256_add_ps(r[4], r[5]), _mm256_add_ps(r[6], r[7]));
          const __m256 s2 = _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3]));
          _mm256_storeu_ps(colsum + k,
                           _mm256_add_ps(_mm256_loadu_ps(colsum + k), _mm256_add_ps(_mm256_add_ps(s0, s1), s2)));
        }
        transpose8(r);
        transpose8(q);
        for (int t = 0; t < 8; ++t) {
          _mm256_storeu_ps(d + (k + t) * MR, r[t]);
          _mm_storeu_ps(d + (k + t) * MR + 8, _mm256_castps256_ps128(q[t]));
        }
      }
    }
    pack_a_tail_f32(s, lda, mv, MR, k, K, d, colsum);
  }
}

template <int NB>
LOTUS_AVX512 void tile(const TileCall& t, float* out, int64_t ldo) {
  constexpr int64_t NR = 16 * NB;
  const PanelGemm& g = *t.g;
  const int64_t bs = g.bs, mv = t.mv;
  float* o = out + t.row * ldo + t.o * bs + t.h * NR;
  __m512 c[MR][NB];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n)
      c[m][n] = (!t.first && m < mv) ? _mm512_loadu_ps(o + m * ldo + 16 * n) : _mm512_setzero_ps();
  const float* bpk = static_cast<const float*>(g.b);
  for (int64_t e = t.e0; e < t.e1; ++e) {
    const float* a = static_cast<const float*>(t.apanel) + (g.a_blk[e] - t.kb0) * bs * MR;
    const float* b = bpk + (g.b_blk[e] * (bs / NR) + t.h) * bs * NR;
    for (int64_t kk = 0; kk < bs; ++kk, a += MR, b += NR) {
      __m512 bv[NB];
#pragma GCC unroll 2
      for (int n = 0; n < NB; ++n) bv[n] = _mm512_loadu_ps(b + 16 * n);
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a[m]);
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n) c[m][n] = _mm512_fmadd_ps(av, bv[n], c[m][n]);
      }
    }
  }
  __m512 z[NB];
#pragma GCC unroll 2
  for (int n = 0; n < NB; ++n)
    z[n] = (t.last && g.bias) ? _mm512_loadu_ps(g.bias + t.o * bs + t.h * NR + 16 * n) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m)
    if (m < mv)
#pragma GCC unroll 2
      for (int n = 0; n < NB; ++n) _mm512_storeu_ps(o + m * ldo + 16 * n, _mm512_add_ps(c[m][n], z[n]));
}

void compute(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out, int64_t ldo,
             float*) {
  const int64_t K = (kb1 - kb0) * g.bs, nr = nr_of(g.bs);
  float* o = static_cast<float*>(out);
  const char* pn = static_cast<const char*>(panels);
  if (nr == 32)
    panel_loop(g, pn, rows, kb0, kb1, MR, nr, group_blocks(g.bs, nr, 4), K * MR * 4,
               [&](const TileCall& t) { tile<2>(t, o, ldo); });
  else
    panel_loop(g, pn, rows, kb0, kb1, MR, nr, group_blocks(g.bs, nr, 4), K * MR * 4,
               [&](const TileCall& t) { tile<1>(t, o, ldo); });
}

// ---------------------------------------------------------------- bwd_weight
LOTUS_AVX512 void pack_rows(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst) {
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
  for (int64_t m = 0; m < rows; ++m, s += ld, d += bs)
    for (int64_t j = 0; j < bs; j += 16) _mm512_storeu_ps(d + j, _mm512_loadu_ps(s + j));
}

int64_t row_panel_elems(int64_t rows, int64_t bs) {
  return rows * bs;
}

// dv tile [8 x 16 NB] (row stride bs) (+)= sum_m a[m][0..8]^T b[m][0..16 NB].
template <int NB>
LOTUS_AVX512 void wtile(const float* a, const float* b, int64_t bs, int64_t rows, float* dv, bool accumulate) {
  __m512 c[8][NB];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) c[i][n] = accumulate ? _mm512_loadu_ps(dv + i * bs + 16 * n) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m, a += bs, b += bs) {
    __m512 bv[NB];
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) bv[n] = _mm512_loadu_ps(b + 16 * n);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512 av = _mm512_set1_ps(a[i]);
#pragma GCC unroll 2
      for (int n = 0; n < NB; ++n) c[i][n] = _mm512_fmadd_ps(av, bv[n], c[i][n]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) _mm512_storeu_ps(dv + i * bs + 16 * n, c[i][n]);
}

void weight_block(const void* a_panel, const void* b_panel, int64_t rows, int64_t bs, float* dv, bool accumulate) {
  const float* a = static_cast<const float*>(a_panel);
  const float* b = static_cast<const float*>(b_panel);
  const int64_t nr = nr_of(bs);
  for (int64_t i = 0; i < bs; i += 8)
    for (int64_t j = 0; j < bs; j += nr) {
      if (nr == 32)
        wtile<2>(a + i, b + j, bs, rows, dv + i * bs + j, accumulate);
      else
        wtile<1>(a + i, b + j, bs, rows, dv + i * bs + j, accumulate);
    }
}

const PanelKernel kPanel{"avx512 fp32 12x32", MR, 4, pack_b, pack_a, compute, nullptr, nullptr};
const WeightKernel kWeight{"avx512 fp32 8x32", 64, 4, pack_rows, row_panel_elems, weight_block, nullptr};

}  // namespace

const PanelKernel* const kAvx512Fp32Panel = &kPanel;
const WeightKernel* const kAvx512Fp32Weight = &kWeight;

}  // namespace lotus::bsr

#else  // not x86: no such kernels (the dispatch tables skip null entries)
#include "kernels.h"
namespace lotus::bsr {
const PanelKernel* const kAvx512Fp32Panel = nullptr;
const WeightKernel* const kAvx512Fp32Weight = nullptr;
}  // namespace lotus::bsr
#endif
