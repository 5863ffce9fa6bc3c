// Device side of the deterministic, atomic-free scatter-adds: scatter_tokens (token_gather.cu) and
// col2im_scatter (patch_embed_gather.cu). Device code and constants only, so that the device passes
// still see no heavy torch header (see the build-time note at the top of token_gather.cu).
//
// A block owns (batch b, a chunk of destination elements) and each thread owns one element e of the
// destination pattern: it alone touches out[offset(n) + e] for every index n, so with `out` zeroed
// first it can walk k in order doing out[offset(idx[b, k])] += src[b, k, e] (the add in opmath: fp32
// for bf16/fp16, double for float64), and duplicates accumulate in a fixed order. That
// order-dependent read-modify-write would serialise every k on a memory round trip; instead k is
// taken in groups of kGroup: when a group's offsets are pairwise distinct (a flag computed once per
// block in shared memory), its loads are all issued before its stores, which gives exactly the
// serial loop's result. A group holding a duplicate runs the serial loop.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace lotus {

constexpr int kTile = 1024;  // idx entries staged in shared memory per pass
constexpr int kGroup = 8;
static_assert(kTile % kGroup == 0, "groups must not straddle tiles");

// The in-order loop of one thread. src: this thread's entry of k = 0 (entry k at src[k * src_stride]);
// out: this thread's element of the destination at offset 0; idx: the block's K indices;
// offset(n): the destination offset of index n, the same for every thread of the block. Every
// thread of the block must call it (it holds barriers); inactive ones (past the end of the
// element chunk) only help stage the tiles.
template <typename T, typename Offset>
__device__ __forceinline__ void ordered_scatter_add(const T* __restrict__ src, int64_t src_stride, T* __restrict__ out,
                                                    const int64_t* __restrict__ idx, int64_t K, bool active,
                                                    Offset offset) {
  using acc_t = at::opmath_type<T>;
  __shared__ int64_t s_off[kTile];             // offset(idx[k0 + t])
  __shared__ bool s_distinct[kTile / kGroup];  // the group's offsets are pairwise distinct

  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int tile = static_cast<int>(K - k0 < kTile ? K - k0 : kTile);
    const int groups = tile / kGroup;
    __syncthreads();  // the previous tile is consumed
    for (int t = threadIdx.x; t < tile; t += blockDim.x) s_off[t] = offset(idx[k0 + t]);
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
      bool distinct = true;
#pragma unroll
      for (int u = 0; u < kGroup; ++u)
#pragma unroll
        for (int v = u + 1; v < kGroup; ++v) distinct = distinct && s_off[g * kGroup + u] != s_off[g * kGroup + v];
      s_distinct[g] = distinct;
    }
    __syncthreads();
    if (!active) continue;  // only after the barriers: idle threads still help stage the tile

    const T* s = src + k0 * src_stride;
    for (int g = 0; g < groups; ++g) {
      int64_t off[kGroup];
      acc_t val[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        off[u] = s_off[g * kGroup + u];
        val[u] = static_cast<acc_t>(s[static_cast<int64_t>(g * kGroup + u) * src_stride]);
      }
      if (s_distinct[g]) {  // block-uniform branch
        acc_t cur[kGroup];
#pragma unroll
        for (int u = 0; u < kGroup; ++u) cur[u] = static_cast<acc_t>(out[off[u]]);
#pragma unroll
        for (int u = 0; u < kGroup; ++u) out[off[u]] = static_cast<T>(cur[u] + val[u]);
      } else {
#pragma unroll
        for (int u = 0; u < kGroup; ++u) out[off[u]] = static_cast<T>(static_cast<acc_t>(out[off[u]]) + val[u]);
      }
    }
    for (int t = groups * kGroup; t < tile; ++t) {
      const int64_t o = s_off[t];
      out[o] = static_cast<T>(static_cast<acc_t>(out[o]) + static_cast<acc_t>(s[static_cast<int64_t>(t) * src_stride]));
    }
  }
}

}  // namespace lotus
