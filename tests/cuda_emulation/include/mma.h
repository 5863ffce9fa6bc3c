// Emulation stand-in for CUDA's <mma.h> (tests/cuda_emulation): the WMMA calls the block-sparse kernel
// uses, for 16x16x16 bf16 or fp16 -> fp32. Every emulated thread holds the whole tile (the real per-lane
// element mapping is opaque anyway); lane 0 of each warp does the store.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/Half.h>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};

inline float emu_bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float emu_to_float(__nv_bfloat16 b) {
  return emu_bf16_to_float(b.x);
}
inline float emu_to_float(__half h) {
  return static_cast<float>(c10::Half(h.x, c10::Half::from_bits()));
}

// (r, c) = (row, column) of the fragment's matrix: (m, k) for matrix_a, (k, n) for matrix_b.
template <typename Use, typename E, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, E, Layout>& f, const E* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = emu_to_float(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (auto& row : f.v)
    for (float& x : row) x = v;
}

template <typename E, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, E, LA>& a,
              const fragment<matrix_b, 16, 16, 16, E, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}
}  // namespace wmma
}  // namespace nvcuda
