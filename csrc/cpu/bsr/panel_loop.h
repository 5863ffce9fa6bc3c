// The loop over output tiles shared by every ISA's PanelKernel::compute (see kernels.h). Plain C++,
// no target attributes: each ISA file instantiates it with its own tile function, which it calls
// (never inlines), so this loop is built for the baseline ISA in every file.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace lotus::bsr {

// A tile call: out rows [m, m + mv) x columns [o * bs + h * nr, + nr) from the panel at `apanel`,
// entries e0..e1 of output block column o; `first`: nothing was accumulated for these outputs yet;
// `last`: after this call they are complete (add the bias, convert, store).
struct TileCall {
  const PanelGemm* g;
  const void* apanel;  // this panel's first reduction element of K-block kb0
  int64_t kb0;
  int64_t o, h, e0, e1;
  bool first, last;
  int64_t row;  // first chunk row of the tile
  int64_t mv;   // valid rows (<= mr)
};

// Walks output block column o, its nr-wide column slices h, its entries in [kb0, kb1) in groups of
// at most `group` blocks (the group's B slivers stay in L1 while every panel of the chunk streams
// past them), and the chunk's panels. An empty output block column is written once (range kb0 == 0).
template <typename TileFn>
void panel_loop(const PanelGemm& g, const char* panels, int64_t rows, int64_t kb0, int64_t kb1, int64_t mr, int64_t nr,
                int64_t group, int64_t panel_bytes, TileFn&& tile) {
  const int64_t np = (rows + mr - 1) / mr;
  for (int64_t o = 0; o < g.n_out; ++o) {
    const int64_t* begin = g.a_blk + g.ptr[o];
    const int64_t* end = g.a_blk + g.ptr[o + 1];
    const int64_t lo = std::lower_bound(begin, end, kb0) - g.a_blk;
    const int64_t hi = std::lower_bound(begin, end, kb1) - g.a_blk;
    const bool first = lo == g.ptr[o], last = hi == g.ptr[o + 1];
    if (lo == hi && !(first && last && kb0 == 0)) continue;
    for (int64_t h = 0; h < g.bs / nr; ++h) {
      int64_t e0 = lo;
      do {
        const int64_t e1 = std::min(hi, e0 + group);
        for (int64_t p = 0; p < np; ++p)
          tile(TileCall{&g, panels + p * panel_bytes, kb0, o, h, e0, e1, first && e0 == lo, last && e1 == hi, p * mr,
                        std::min(mr, rows - p * mr)});
        e0 = e1;
      } while (e0 < hi);
    }
  }
}

// Blocks per L1-resident group: B slivers of bs x nr elements, ~16 KiB in all.
inline int64_t group_blocks(int64_t bs, int64_t nr, int64_t elem) {
  return std::max<int64_t>(1, 16384 / (bs * nr * elem));
}

}  // namespace lotus::bsr
