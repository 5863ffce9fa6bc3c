// bf16 block-sparse micro-kernels for AVX512_BF16 (vdpbf16ps: 16 fp32 lanes, each += the dot
// product of a pair of bf16; interface: kernels.h). Operands stay bf16 (half the bytes of fp32 and
// twice the products per instruction), accumulation is fp32, each output is rounded to bf16 once
// (round to nearest even), like oneDNN's bf16 GEMM that torch uses for a dense bf16 nn.Linear.
// The reduction index is packed in pairs: a 32-bit word holds elements (2p, 2p + 1) of one row of
// A or one column of B, so everything below moves 32-bit words, the fp32 kernels' layouts with
// half the reduction length.
// - PanelKernel: 12-row A panels [K/2][12] words, B slivers [bs/2][nr] words, a 12 x 32 tile in
//   24 zmm accumulators (12 x 16 for bs = 16), A word broadcast from memory.
// - WeightKernel: the reduction is over M, so dy and x panels hold row pairs: [rows/2][bs] words
//   (an odd last row paired with zero); 8 x 32 tiles.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "panel_loop.h"
#include "x86.h"

namespace lotus::bsr {
namespace {

#define LOTUS_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t MR = 12;

// 16 words (lo[j], hi[j]) from 16 bf16 of each of two rows: one vpermt2w (upper halves unused).
LOTUS_BF16 inline __m512i interleave16(const uint16_t* lo, const uint16_t* hi) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                       5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
  const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
  return _mm512_permutex2var_epi16(a, idx, b);
}

// B slivers [k][h][bs/2][nr] words: transpose (fwd, B = W_k^T): word (p, n) = W_k[h*nr + n][2p, 2p+1],
// i.e. a word transpose of the slice's rows; else (bwd_input, B = W_k): (W_k[2p][h*nr + n], W_k[2p+1][..]).
LOTUS_BF16 void pack_b(const void* values, int64_t bs, int64_t k0, int64_t k1, bool transpose, void* dst) {
  const int64_t nr = nr_of(bs), bw = bs / 2;
  const uint16_t* v = static_cast<const uint16_t*>(values);
  uint32_t* d = static_cast<uint32_t*>(dst);
  for (int64_t k = k0; k < k1; ++k) {
    const uint16_t* vk = v + k * bs * bs;
    for (int64_t h = 0; h < bs / nr; ++h) {
      uint32_t* s = d + (k * (bs / nr) + h) * bw * nr;
      if (transpose) {
        const float* w = reinterpret_cast<const float*>(vk);  // row i = bw words
        for (int64_t n0 = 0; n0 < nr; n0 += 8)
          for (int64_t p0 = 0; p0 < bw; p0 += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(w + (h * nr + n0 + t) * bw + p0);
            transpose8(r);
            for (int t = 0; t < 8; ++t) _mm256_storeu_ps(reinterpret_cast<float*>(s + (p0 + t) * nr + n0), r[t]);
          }
      } else {
        for (int64_t p = 0; p < bw; ++p)
          for (int64_t n = 0; n < nr; n += 16)
            _mm512_storeu_si512(s + p * nr + n,
                                interleave16(vk + 2 * p * bs + h * nr + n, vk + (2 * p + 1) * bs + h * nr + n));
      }
    }
  }
}

// 16 bf16 (8 words) widened to fp32 (exact: a bf16 is the top half of an fp32). The maskz forms:
// GCC 12 warns about the unmasked ones' undefined pass-through operand.
LOTUS_BF16 inline __m512 widen16(__m256 words) {
  const __m512i w = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_castps_si256(words));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, w, 16));
}

inline float bf16_lo(uint32_t w) {
  const uint32_t b = w << 16;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
inline float bf16_hi(uint32_t w) {
  const uint32_t b = w & 0xFFFF0000u;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}

// 8 words (16 reduction elements, pairs (2k, 2k + 1) ..) of a row from word k on: bf16 rows as they
// are; fp32 rows rounded to bf16 (vcvtneps2bf16: round to nearest even, like Tensor.to(bfloat16);
// it also flushes fp32 denormals to zero, which Tensor.to keeps, but vdpbf16ps reads bf16 denormals
// as zero anyway, so the products are the same).
LOTUS_BF16 inline __m256 load_words(const uint16_t* row, int64_t k) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
LOTUS_BF16 inline __m256 load_words(const float* row, int64_t k) {
  return (__m256)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + 2 * k));
}

// Tensor.to(bfloat16) of one fp32 (c10::BFloat16's round to nearest even; NaN -> quiet NaN).
inline uint32_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
inline uint32_t word_at(const uint16_t* row, int64_t k) {
  uint32_t w;
  __builtin_memcpy(&w, row + 2 * k, 4);
  return w;
}
inline uint32_t word_at(const float* row, int64_t k) {
  return to_bf16(row[2 * k]) | to_bf16(row[2 * k + 1]) << 16;
}

// Panels [(c1 - c0)/2][12] words (the fp32 packer of avx512.cpp on words) from bf16 or fp32 A (T).
// With colsum, the 12 loaded rows are also widened to fp32 and added up (fp32 sums of 16 columns
// per step).
template <typename T>
LOTUS_BF16 void pack_a_t(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum) {
  const int64_t K = (c1 - c0) / 2;
  for (int64_t p = 0; p * MR < rows; ++p) {
    const int64_t mv = std::min(MR, rows - p * MR);
    float* d = reinterpret_cast<float*>(static_cast<uint32_t*>(dst) + p * K * MR);
    const T* s = static_cast<const T*>(a) + c0 + p * MR * lda;
    int64_t k = 0;
    if (mv == MR) {
      for (; k + 8 <= K; k += 8) {
        __m256 r[8], q[8];
        for (int t = 0; t < 8; ++t) r[t] = load_words(s + t * lda, k);
        for (int t = 0; t < 4; ++t) q[t] = load_words(s + (8 + t) * lda, k);
        q[4] = q[5] = q[6] = q[7] = _mm256_setzero_ps();
        if (colsum) {
          __m512 s0 = _mm512_add_ps(widen16(r[0]), widen16(r[1])), s1 = _mm512_add_ps(widen16(r[2]), widen16(r[3]));
          s0 = _mm512_add_ps(s0, _mm512_add_ps(widen16(r[4]), widen16(r[5])));
          s1 = _mm512_add_ps(s1, _mm512_add_ps(widen16(r[6]), widen16(r[7])));
          s0 = _mm512_add_ps(s0, _mm512_add_ps(widen16(q[0]), widen16(q[1])));
          s1 = _mm512_add_ps(s1, _mm512_add_ps(widen16(q[2]), widen16(q[3])));
          _mm512_storeu_ps(colsum + 2 * k, _mm512_add_ps(_mm512_loadu_ps(colsum + 2 * k), _mm512_add_ps(s0, s1)));
        }
        transpose8(r);
        transpose8(q);
        for (int t = 0; t < 8; ++t) {
          _mm256_storeu_ps(d + (k + t) * MR, r[t]);
          _mm_storeu_ps(d + (k + t) * MR + 8, _mm256_castps256_ps128(q[t]));
        }
      }
    }
    uint32_t* dw = reinterpret_cast<uint32_t*>(d);
    for (; k < K; ++k) {
      float lo = 0.f, hi = 0.f;
      for (int64_t m = 0; m < MR; ++m) {
        const uint32_t w = m < mv ? word_at(s + m * lda, k) : 0u;
        dw[k * MR + m] = w;
        lo += bf16_lo(w);
        hi += bf16_hi(w);
      }
      if (colsum) colsum[2 * k] += lo, colsum[2 * k + 1] += hi;
    }
  }
}

void pack_a(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum) {
  pack_a_t<uint16_t>(a, lda, rows, c0, c1, dst, colsum);
}
void pack_a_f32(const void* a, int64_t lda, int64_t rows, int64_t c0, int64_t c1, void* dst, float* colsum) {
  pack_a_t<float>(a, lda, rows, c0, c1, dst, colsum);
}

LOTUS_BF16 inline void store_bf16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Output tile: complete in one call (first and last) -> straight to out (bf16, or fp32 for F32Out);
// otherwise partial sums live in the fp32 `acc` (same row / column indices as out) until the last call.
template <int NB, bool F32Out>
LOTUS_BF16 void tile(const TileCall& t, void* out, float* acc, int64_t ldo) {
  constexpr int64_t NR = 16 * NB;
  const PanelGemm& g = *t.g;
  const int64_t bs = g.bs, mv = t.mv, bw = bs / 2;
  const int64_t off = t.row * ldo + t.o * bs + t.h * NR;
  __m512 c[MR][NB];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n)
      c[m][n] = (!t.first && m < mv) ? _mm512_loadu_ps(acc + off + m * ldo + 16 * n) : _mm512_setzero_ps();
  const uint32_t* bpk = static_cast<const uint32_t*>(g.b);
  for (int64_t e = t.e0; e < t.e1; ++e) {
    const uint32_t* a = static_cast<const uint32_t*>(t.apanel) + (g.a_blk[e] - t.kb0) * bw * MR;
    const uint32_t* b = bpk + (g.b_blk[e] * (bs / NR) + t.h) * bw * NR;
    for (int64_t p = 0; p < bw; ++p, a += MR, b += NR) {
      __m512bh bv[NB];
#pragma GCC unroll 2
      for (int n = 0; n < NB; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(b + 16 * n);
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m]));
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n) c[m][n] = _mm512_dpbf16_ps(c[m][n], av, bv[n]);
      }
    }
  }
  if (t.last) {
    __m512 z[NB];
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n)
      z[n] = g.bias ? _mm512_loadu_ps(g.bias + t.o * bs + t.h * NR + 16 * n) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
      if (m < mv)
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n) {
          if constexpr (F32Out)
            _mm512_storeu_ps(static_cast<float*>(out) + off + m * ldo + 16 * n, _mm512_add_ps(c[m][n], z[n]));
          else
            store_bf16(static_cast<uint16_t*>(out) + off + m * ldo + 16 * n, _mm512_add_ps(c[m][n], z[n]));
        }
  } else {
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
      if (m < mv)
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n) _mm512_storeu_ps(acc + off + m * ldo + 16 * n, c[m][n]);
  }
}

template <bool F32Out>
void compute_t(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out, int64_t ldo,
               float* acc) {
  const int64_t K = (kb1 - kb0) * g.bs, nr = nr_of(g.bs);
  const char* pn = static_cast<const char*>(panels);
  if (nr == 32)
    panel_loop(g, pn, rows, kb0, kb1, MR, nr, group_blocks(g.bs, nr, 2), K * MR * 2,
               [&](const TileCall& t) { tile<2, F32Out>(t, out, acc, ldo); });
  else
    panel_loop(g, pn, rows, kb0, kb1, MR, nr, group_blocks(g.bs, nr, 2), K * MR * 2,
               [&](const TileCall& t) { tile<1, F32Out>(t, out, acc, ldo); });
}

void compute(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out, int64_t ldo,
             float* acc) {
  compute_t<false>(g, panels, rows, kb0, kb1, out, ldo, acc);
}
void compute_f32_out(const PanelGemm& g, const void* panels, int64_t rows, int64_t kb0, int64_t kb1, void* out,
                     int64_t ldo, float* acc) {
  compute_t<true>(g, panels, rows, kb0, kb1, out, ldo, acc);
}

// ---------------------------------------------------------------- bwd_weight
// Panel [ceil(rows/2)][bs] words: word (p, j) = (src[2p][j], src[2p+1][j]), a missing odd row = 0.
LOTUS_BF16 void pack_pairs(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  uint32_t* d = static_cast<uint32_t*>(dst);
  alignas(64) static constexpr uint16_t kZeros[64] = {};
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const uint16_t* r0 = s + 2 * p * ld;
    const bool odd_tail = 2 * p + 1 >= rows;
    for (int64_t j = 0; j < bs; j += 16)
      _mm512_storeu_si512(d + p * bs + j, interleave16(r0 + j, odd_tail ? kZeros : r0 + ld + j));
  }
}

// pack_pairs from fp32 rows, each rounded to bf16 first (vcvtneps2bf16, as load_words).
LOTUS_BF16 void pack_pairs_f32(const void* src, int64_t ld, int64_t rows, int64_t bs, void* dst) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                       5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const float* s = static_cast<const float*>(src);
  uint32_t* d = static_cast<uint32_t*>(dst);
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const float* r0 = s + 2 * p * ld;
    const bool odd_tail = 2 * p + 1 >= rows;
    for (int64_t j = 0; j < bs; j += 16) {
      const __m512i a = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
      const __m512i b = odd_tail ? _mm512_setzero_si512()
                                 : _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + ld + j)));
      _mm512_storeu_si512(d + p * bs + j, _mm512_permutex2var_epi16(a, idx, b));
    }
  }
}

int64_t pair_panel_elems(int64_t rows, int64_t bs) {
  return (rows + 1) / 2 * bs * 2;
}

// dv tile [8 x 16 NB] (row stride bs) (+)= sum over row pairs p of a words (p, 0..8) x b words (p, 0..16 NB).
template <int NB>
LOTUS_BF16 void wtile(const uint32_t* a, const uint32_t* b, int64_t bs, int64_t pairs, float* dv, bool accumulate) {
  __m512 c[8][NB];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) c[i][n] = accumulate ? _mm512_loadu_ps(dv + i * bs + 16 * n) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p, a += bs, b += bs) {
    __m512bh bv[NB];
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(b + 16 * n);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i]));
#pragma GCC unroll 2
      for (int n = 0; n < NB; ++n) c[i][n] = _mm512_dpbf16_ps(c[i][n], av, bv[n]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) _mm512_storeu_ps(dv + i * bs + 16 * n, c[i][n]);
}

void weight_block(const void* a_panel, const void* b_panel, int64_t rows, int64_t bs, float* dv, bool accumulate) {
  const uint32_t* a = static_cast<const uint32_t*>(a_panel);
  const uint32_t* b = static_cast<const uint32_t*>(b_panel);
  const int64_t nr = nr_of(bs), pairs = (rows + 1) / 2;
  for (int64_t i = 0; i < bs; i += 8)
    for (int64_t j = 0; j < bs; j += nr) {
      if (nr == 32)
        wtile<2>(a + i, b + j, bs, pairs, dv + i * bs + j, accumulate);
      else
        wtile<1>(a + i, b + j, bs, pairs, dv + i * bs + j, accumulate);
    }
}

const PanelKernel kPanel{"avx512_bf16 12x32", MR, 2, pack_b, pack_a, compute, pack_a_f32, compute_f32_out};
const WeightKernel kWeight{"avx512_bf16 8x32", 128, 2, pack_pairs, pair_panel_elems, weight_block, pack_pairs_f32};

}  // namespace

const PanelKernel* const kAvx512Bf16Panel = &kPanel;
const WeightKernel* const kAvx512Bf16Weight = &kWeight;

}  // namespace lotus::bsr

#else  // not x86: no such kernels (the dispatch tables skip null entries)
#include "kernels.h"
namespace lotus::bsr {
const PanelKernel* const kAvx512Bf16Panel = nullptr;
const WeightKernel* const kAvx512Bf16Weight = nullptr;
}  // namespace lotus::bsr
#endif
