// x86 helpers shared by the ISA files (avx2.cpp, avx512.cpp, avx512_bf16.cpp). Include only inside
// their `#if defined(__x86_64__)` guard. Built for AVX, the subset every ISA file's target includes,
// and always inlined into the caller, so each call is compiled with its caller's wider ISA.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lotus::bsr {

// 8x8 transpose of 32-bit words: rows r[0..8) in, columns out (in place). The bf16 kernels move
// pairs of bf16 as one 32-bit word through it.
__attribute__((target("avx"), always_inline)) inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The fp32 pack_a's column-by-column tail: columns [k, K) of one panel of mr rows (rows >= mv
// zero) into d[k * mr + m]; with colsum, each column's sum is added to colsum[k].
inline void pack_a_tail_f32(const float* s, int64_t lda, int64_t mv, int64_t mr, int64_t k, int64_t K, float* d,
                            float* colsum) {
  for (; k < K; ++k) {
    float cs = 0.f;
    for (int64_t m = 0; m < mr; ++m) cs += d[k * mr + m] = m < mv ? s[m * lda + k] : 0.f;
    if (colsum) colsum[k] += cs;
  }
}

// Output columns per tile of the 512-bit kernels: two zmm (32) where the block allows it, else 16.
inline int64_t nr_of(int64_t bs) {
  return bs % 32 == 0 ? 32 : 16;
}

}  // namespace lotus::bsr
