// CPU kernels of block_sparse_linear (schemas and the storage format: csrc/bindings.cpp and
// lotus_kernels/ops/block_sparse_linear.py). Three products over the stored bs x bs blocks only:
//   fwd        out[M, out] = x @ W^T + bias       (blocks of a block row, BSR order)
//   bwd_input  dx[M, in]   = dy @ W               (blocks of a block column, BSC order via perm)
//   bwd_weight dvalues[k]  = dy[:, r_k]^T @ x[:, c_k]  (SDD: only stored blocks)
//
// This file holds the tensor code, the threads and the choice of kernel; the micro-kernels are raw-
// pointer code, one file per ISA (bsr/avx2.cpp, bsr/avx512.cpp, bsr/avx512_bf16.cpp, interface in
// bsr/kernels.h). Each product has one best-first table of (ISA, dtype, kernel); a call takes, by
// isa.h's one picker (best_within_cap: the CPU's best, capped by LOTUS_KERNELS_CPU_ISA), the first
// entry within the cap whose dtype matches, or an fp32 entry for bf16 / fp16 inputs (converted to
// fp32 copies; rounded once on the way out), else the plain loops below (fp64, CPUs without AVX2,
// cap "default").
// `lotus_kernels_C::cpu_kernel_path("block_sparse_linear.fwd", dtype, block_size)` (isa.h) reports the choice.
//
// Parallel decomposition:
// - fwd / bwd_input: M is cut into chunks (packed A of a chunk <= ~256 KiB, an L2 share; a multiple
//   of the thread count, at least two per thread when M allows, boundaries spread evenly on panel
//   multiples), one task per chunk: it packs its rows and writes every output tile of them. Work
//   per row is the same (every row meets every stored block), so the static split is balanced to
//   within a panel per chunk. Output elements have one owner: no atomics, no zero-fill, one
//   barrier (after the weight repack). When K is long (a chunk of 96 rows of it would not fit),
//   K is cut into ranges (BLIS's kc) and a chunk's tiles accumulate over them.
// - bwd_weight: each thread owns a run of ~nnzb / threads stored blocks (equal work per block; BSR
//   order, or column order when x is the wider operand) and walks all M chunks itself, packing per
//   chunk the dy / x column blocks its blocks use: no barrier at all, each dvalues block has one
//   owner; the narrower operand's panels are packed by each thread that needs them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "bsr/kernels.h"
#include "isa.h"

namespace {

namespace bsr = lotus::bsr;
using lotus::Isa;

// ---------------------------------------------------------------- dispatch tables (best first)
template <typename Kernel>
struct Entry {
  Isa isa;
  at::ScalarType dtype;         // what the kernel reads and writes
  const Kernel* const* kernel;  // null where this build has no such kernel
};

const Entry<bsr::PanelKernel> kPanelTable[] = {
    // fwd and bwd_input
    {Isa::kAvx512Bf16, at::kBFloat16, &bsr::kAvx512Bf16Panel},
    {Isa::kAvx512, at::kFloat, &bsr::kAvx512Fp32Panel},
    {Isa::kAvx2, at::kFloat, &bsr::kAvx2Fp32Panel},
};
const Entry<bsr::WeightKernel> kWeightTable[] = {
    // bwd_weight
    {Isa::kAvx512Bf16, at::kBFloat16, &bsr::kAvx512Bf16Weight},
    {Isa::kAvx512, at::kFloat, &bsr::kAvx512Fp32Weight},
    {Isa::kAvx2, at::kFloat, &bsr::kAvx2Fp32Weight},
};

template <typename Kernel>
struct Choice {
  const Entry<Kernel>* entry;  // null: the plain loops
  bool convert;                // run on fp32 copies of bf16 / fp16 inputs
};

bool low_precision(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// The first entry within the cap that this build has, for this block size, whose dtype is the
// input's or fp32 for a bf16 / fp16 input (then run on fp32 copies); none: the plain loops.
template <typename Kernel, size_t N>
Choice<Kernel> choose(const Entry<Kernel> (&table)[N], at::ScalarType dtype, int64_t bs) {
  const Entry<Kernel>* e = lotus::best_within_cap(table, [&](const Entry<Kernel>& c) {
    const bool dtype_ok = c.dtype == dtype || (c.dtype == at::kFloat && low_precision(dtype));
    return *c.kernel != nullptr && bs % 16 == 0 && dtype_ok;
  });
  return {e, low_precision(dtype) && (e == nullptr || e->dtype != dtype)};
}

template <typename Kernel>
std::string path_name(const Choice<Kernel>& c) {
  std::string s = c.entry ? lotus::isa_name(c.entry->isa) : "default";
  return c.convert ? s + " (fp32 copies)" : s;
}

// ---------------------------------------------------------------- drivers of the ISA kernels
constexpr int64_t kChunkBytes = 256 * 1024;  // packed A per chunk: about half of a 512 KiB - 2 MiB L2

// Working memory (packed operands, partial sums) comes from grow-only per-thread buffers that live
// as long as the thread: a fresh multi-megabyte allocation per call can be a fresh mmap under
// glibc's defaults, page-faulted in again on every call (~1 us per 4 KiB page: ~1.5 ms for the
// 6 MB of bwd_weight panels of a ViT-S layer, a bf16 product's whole time at d = 0.3). A buffer
// over kScratchCacheBytes is allocated for the call only.
constexpr int64_t kScratchCacheBytes = int64_t(64) << 20;
enum ScratchSlot { kPanels, kAcc, kPackedWeight, kPackedRows, kNumSlots };

class Scratch {
 public:
  Scratch(ScratchSlot slot, int64_t bytes) {
    bytes = std::max<int64_t>(bytes, 64);
    if (bytes > kScratchCacheBytes) {
      own_.reset(new char[bytes]);
      ptr_ = own_.get();
      return;
    }
    thread_local std::unique_ptr<char[]> bufs[kNumSlots];
    thread_local int64_t sizes[kNumSlots] = {};
    if (sizes[slot] < bytes) {
      bufs[slot].reset();
      bufs[slot].reset(new char[bytes]);
      sizes[slot] = bytes;
    }
    ptr_ = bufs[slot].get();
  }
  char* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(ptr_);
  }

 private:
  std::unique_ptr<char[]> own_;
  char* ptr_ = nullptr;
};

// colsum: null, or fp32 [K] set to the column sums of A (bwd_input: dbias = sum of dy over M), added
// up while packing. Each parallel_for task sums into its own vector; the partials are added in
// chunk order afterwards (deterministic for a given thread count).
// a_f32 / out_f32 (mixed calls, kernels with pack_a_f32 / compute_f32_out only): A is fp32, rounded
// to the kernel's element while packing / out is fp32 (not rounded to the kernel's element).
void panel_gemm(const bsr::PanelKernel& k, const void* a, int64_t M, const bsr::PanelGemm& g, void* out,
                float* colsum = nullptr, bool a_f32 = false, bool out_f32 = false) {
  const int64_t elem = k.elem, mr = k.mr, bs = g.bs, Kb = g.K / bs, ldo = g.n_out * bs;
  const int64_t a_elem = a_f32 ? 4 : elem, out_elem = out_f32 ? 4 : elem;
  const auto pack_a = a_f32 ? k.pack_a_f32 : k.pack_a;
  const auto compute = out_f32 ? k.compute_f32_out : k.compute;
  int64_t kcb = Kb;  // K blocks per range
  if (96 * g.K * elem > kChunkBytes) kcb = std::max<int64_t>(1, kChunkBytes / (128 * elem * bs));
  const int64_t kc = kcb * bs, nranges = (Kb + kcb - 1) / kcb;
  // Chunks: as many as it takes to keep each within the L2 share, rounded up to a multiple of the
  // threads (at least two each when M allows); boundaries on panel multiples spread M evenly, so
  // the static split of chunks over threads is balanced to within one panel per chunk.
  const int64_t mc_max = std::max(mr, kChunkBytes / (kc * elem) / mr * mr);
  const int64_t T = at::get_num_threads();
  int64_t chunks = (M + mc_max - 1) / mc_max;
  if (T > 1) chunks = std::min((M + mr - 1) / mr, std::max(chunks, 2 * T) + (T - std::max(chunks, 2 * T) % T) % T);
  auto begin = [&](int64_t c) { return c >= chunks ? M : (c * M / chunks) / mr * mr; };
  int64_t mc = 0;
  for (int64_t c = 0; c < chunks; ++c) mc = std::max(mc, begin(c + 1) - begin(c));
  std::vector<std::vector<float>> partial(colsum ? static_cast<size_t>(chunks) : 0);  // by a task's first chunk
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const Scratch panels(kPanels, ((mc + mr - 1) / mr * mr) * kc * elem + bsr::kPanelSlack);
    // bf16 partial sums (touched only when a tile needs more than one pass)
    const Scratch acc(kAcc, elem != 4 ? mc * ldo * 4 : 0);
    float* sums = nullptr;
    if (colsum) {
      partial[c0].assign(static_cast<size_t>(g.K), 0.f);
      sums = partial[c0].data();
    }
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t m0 = begin(ch), rows = begin(ch + 1) - m0;
      if (rows == 0) continue;
      for (int64_t r = 0; r < nranges; ++r) {
        const int64_t kb0 = r * kcb, kb1 = std::min(Kb, kb0 + kcb);
        pack_a(static_cast<const char*>(a) + m0 * g.K * a_elem, g.K, rows, kb0 * bs, kb1 * bs, panels.get(),
               sums ? sums + kb0 * bs : nullptr);
        compute(g, panels.get(), rows, kb0, kb1, static_cast<char*>(out) + m0 * ldo * out_elem, ldo, acc.as<float>());
      }
    }
  });
  if (!colsum) return;
  std::fill(colsum, colsum + g.K, 0.f);
  for (const auto& p : partial)
    for (size_t j = 0; j < p.size(); ++j) colsum[j] += p[j];
}

// values [nnzb][bs][bs] -> B slivers (transpose: W_k^T for fwd).
Scratch pack_weight(const bsr::PanelKernel& k, const at::Tensor& values, bool transpose) {
  const int64_t nnzb = values.size(0), bs = values.size(1);
  Scratch bp(kPackedWeight, nnzb * bs * bs * k.elem + bsr::kPanelSlack);
  at::parallel_for(0, nnzb, 16,
                   [&](int64_t b, int64_t e) { k.pack_b(values.const_data_ptr(), bs, b, e, transpose, bp.get()); });
  return bp;
}

void run_fwd(const bsr::PanelKernel& k, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
             const at::Tensor& col, const std::optional<at::Tensor>& bias, at::Tensor& out, bool x_f32 = false) {
  const int64_t nnzb = values.size(0);
  const Scratch bp = pack_weight(k, values, true);
  std::vector<int64_t> ident(static_cast<size_t>(nnzb));
  std::iota(ident.begin(), ident.end(), int64_t(0));
  const at::Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  bsr::PanelGemm g;
  g.K = x.size(1), g.bs = values.size(1), g.n_out = crow.numel() - 1;
  g.ptr = crow.const_data_ptr<int64_t>(), g.a_blk = col.const_data_ptr<int64_t>(), g.b_blk = ident.data();
  g.b = bp.get(), g.bias = bias ? b32.const_data_ptr<float>() : nullptr;
  panel_gemm(k, x.const_data_ptr(), x.size(0), g, out.mutable_data_ptr(), nullptr, x_f32);
}

// dbias: null, or fp32 [out] set to the sum of dy over M (from the dy packing pass).
void run_bwd_input(const bsr::PanelKernel& k, const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                   const at::Tensor& row, const at::Tensor& perm, at::Tensor& dx, float* dbias = nullptr,
                   bool dx_f32 = false) {
  const Scratch bp = pack_weight(k, values, false);
  bsr::PanelGemm g;
  g.K = dy.size(1), g.bs = values.size(1), g.n_out = ccol.numel() - 1;
  g.ptr = ccol.const_data_ptr<int64_t>(), g.a_blk = row.const_data_ptr<int64_t>(),
  g.b_blk = perm.const_data_ptr<int64_t>(), g.b = bp.get();
  panel_gemm(k, dy.const_data_ptr(), dy.size(0), g, dx.mutable_data_ptr(), dbias, false, dx_f32);
}

// dv (fp32 [nnzb][bs][bs]) of the stored blocks.
void run_bwd_weight(const bsr::WeightKernel& k, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                    const at::Tensor& col, int64_t bs, float* dv, bool x_f32 = false) {
  const int64_t M = dy.size(0), out_f = dy.size(1), in = x.size(1), R = crow.numel() - 1, Cb = in / bs;
  const int64_t nnzb = col.numel(), elem = k.elem, mc = k.mc, chunks = (M + mc - 1) / mc;
  const int64_t slot_bytes = k.panel_elems(mc, bs) * elem;
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  std::vector<int64_t> brow(static_cast<size_t>(nnzb));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t e = cr[r]; e < cr[r + 1]; ++e) brow[e] = r;
  // Threads own equal runs of stored blocks, in BSR order when dy is the wider operand (their dy
  // block rows are then disjoint and only the narrower x panels are packed by more than one
  // thread), else in column order.
  std::vector<int64_t> order(static_cast<size_t>(nnzb));
  if (out_f >= in) {
    std::iota(order.begin(), order.end(), int64_t(0));
  } else {  // counting sort by block column (stable: rows ascending inside a column)
    std::vector<int64_t> start(static_cast<size_t>(Cb + 1), 0);
    for (int64_t e = 0; e < nnzb; ++e) ++start[cl[e] + 1];
    for (int64_t c = 0; c < Cb; ++c) start[c + 1] += start[c];
    for (int64_t e = 0; e < nnzb; ++e) order[start[cl[e]]++] = e;
  }
  const char* dyp = static_cast<const char*>(dy.const_data_ptr());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nnzb));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    const int64_t i0 = nnzb * t0 / T, i1 = nnzb * t1 / T;
    // This thread's dy block rows (slots first) and x block columns, packed chunk by chunk into its
    // own buffer: one chunk's panels stay in L2 between packing and use (packing all of M first
    // sent ~12 MB through DRAM and made the ViT-S fp32 product 10-40% slower at density 0.1).
    std::vector<int64_t> slot(static_cast<size_t>(R + Cb), -1), used;
    for (int64_t i = i0; i < i1; ++i)
      for (const int64_t t : {brow[order[i]], R + cl[order[i]]})
        if (slot[t] < 0) slot[t] = static_cast<int64_t>(used.size()), used.push_back(t);
    const Scratch buf(kPackedRows, static_cast<int64_t>(used.size()) * slot_bytes + bsr::kPanelSlack);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m0 = c * mc, rows = std::min(mc, M - m0);
      for (size_t s = 0; s < used.size(); ++s) {
        const bool is_dy = used[s] < R;
        const int64_t blk = is_dy ? used[s] : used[s] - R, ld = is_dy ? out_f : in;
        if (is_dy || !x_f32)
          k.pack((is_dy ? dyp : xp) + (m0 * ld + blk * bs) * elem, ld, rows, bs, buf.get() + s * slot_bytes);
        else
          k.pack_f32(xp + (m0 * ld + blk * bs) * 4, ld, rows, bs, buf.get() + s * slot_bytes);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = order[i];
        k.block(buf.get() + slot[brow[e]] * slot_bytes, buf.get() + slot[R + cl[e]] * slot_bytes, rows, bs,
                dv + e * bs * bs, c > 0);
      }
    }
  });
}

// ---------------------------------------------------------------- plain loops (fp64, no AVX2, cap "default")
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

// ---------------------------------------------------------------- entry points
// Mixed calls (autocast with an fp32 activation, see the op's Python wrapper): x (fwd, bwd_weight) or
// dx (bwd_input) fp32 while values and the rest are bf16 / fp16. The native bf16 kernels convert while
// packing / write fp32 directly; every other path casts (x.to(values' dtype), dx from a result in
// dy's dtype), so all paths agree with a cast-then-kernel call.
bool mixed_ok(const at::Tensor& act, const at::Tensor& values) {
  return act.scalar_type() == values.scalar_type() ||
         (act.scalar_type() == at::kFloat && low_precision(values.scalar_type()));
}

// act: the fp32-or-values-dtype activation (fwd: x, bwd_input: dx); other: values' dtype (out / dy).
void check_common(const at::Tensor& a, const at::Tensor& values, const at::Tensor& out, const char* name, bool fwd) {
  TORCH_CHECK(a.dim() == 2 && values.dim() == 3 && out.dim() == 2, name, ": expected 2-D activations, 3-D values");
  TORCH_CHECK(a.is_contiguous() && values.is_contiguous() && out.is_contiguous(), name,
              ": expected contiguous tensors");
  const at::Tensor& act = fwd ? a : out;
  const at::Tensor& other = fwd ? out : a;
  TORCH_CHECK(other.scalar_type() == values.scalar_type() && mixed_ok(act, values), name,
              ": expected one float dtype (or an fp32 ", fwd ? "x" : "dx", " with bf16 / fp16 values)");
}

// The panel kernel for a mixed call when it converts natively, else null.
const bsr::PanelKernel* native_mixed(at::ScalarType dtype, int64_t bs, bool for_out) {
  const auto c = choose(kPanelTable, dtype, bs);
  if (!c.entry || c.convert) return nullptr;
  const bsr::PanelKernel* k = *c.entry->kernel;
  return (for_out ? k->compute_f32_out != nullptr : k->pack_a_f32 != nullptr) ? k : nullptr;
}

at::Tensor f32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}
std::optional<at::Tensor> f32(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(f32(*t)) : std::nullopt;
}

void bsr_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                        const std::optional<at::Tensor>& bias, at::Tensor& out) {
  check_common(x, values, out, "bsr_linear_fwd", true);
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), "bsr_linear_fwd: expected contiguous index tensors");
  const int64_t M = x.size(0), in = x.size(1), bs = values.size(1), R = crow.numel() - 1;
  if (M == 0 || R == 0) return;
  if (x.scalar_type() != values.scalar_type()) {  // mixed: x fp32
    if (const auto* k = native_mixed(values.scalar_type(), bs, false); k && in > 0)
      return run_fwd(*k, x, values, crow, col, bias, out, true);
    return bsr_linear_fwd_cpu(x.to(values.scalar_type()), values, crow, col, bias, out);
  }
  const auto c = choose(kPanelTable, x.scalar_type(), bs);
  if (c.entry && in > 0) {
    const bsr::PanelKernel& k = **c.entry->kernel;
    if (!c.convert) return run_fwd(k, x, values, crow, col, bias, out);
    at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    run_fwd(k, f32(x), f32(values), crow, col, f32(bias), tmp);
    out.copy_(tmp);
    return;
  }
  if (low_precision(x.scalar_type())) {
    at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    bsr_linear_fwd_cpu(f32(x), f32(values), crow, col, f32(bias), tmp);
    out.copy_(tmp);
    return;
  }
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsr_linear_fwd_cpu", [&] {
    fwd_plain<scalar_t>(x.const_data_ptr<scalar_t>(), M, in, values.const_data_ptr<scalar_t>(),
                        crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
                        bias ? b.const_data_ptr<scalar_t>() : nullptr, R, bs, out.mutable_data_ptr<scalar_t>());
  });
}

void bsr_linear_bwd_input_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                              const at::Tensor& row, const at::Tensor& perm, at::Tensor& dx) {
  check_common(dy, values, dx, "bsr_linear_bwd_input", false);
  TORCH_CHECK(ccol.is_contiguous() && row.is_contiguous() && perm.is_contiguous(),
              "bsr_linear_bwd_input: expected contiguous index tensors");
  const int64_t M = dy.size(0), out_f = dy.size(1), bs = values.size(1), Cb = ccol.numel() - 1;
  if (M == 0 || Cb == 0) return;
  if (dx.scalar_type() != dy.scalar_type()) {  // mixed: dx fp32
    if (const auto* k = native_mixed(dy.scalar_type(), bs, true); k && out_f > 0)
      return run_bwd_input(*k, dy, values, ccol, row, perm, dx, nullptr, true);
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(dy.scalar_type()));
    bsr_linear_bwd_input_cpu(dy, values, ccol, row, perm, tmp);
    dx.copy_(tmp);
    return;
  }
  const auto c = choose(kPanelTable, dy.scalar_type(), bs);
  if (c.entry && out_f > 0) {
    const bsr::PanelKernel& k = **c.entry->kernel;
    if (!c.convert) return run_bwd_input(k, dy, values, ccol, row, perm, dx);
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(at::kFloat));
    run_bwd_input(k, f32(dy), f32(values), ccol, row, perm, tmp);
    dx.copy_(tmp);
    return;
  }
  if (low_precision(dy.scalar_type())) {
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(at::kFloat));
    bsr_linear_bwd_input_cpu(f32(dy), f32(values), ccol, row, perm, tmp);
    dx.copy_(tmp);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_linear_bwd_input_cpu", [&] {
    bwd_input_plain<scalar_t>(dy.const_data_ptr<scalar_t>(), M, out_f, values.const_data_ptr<scalar_t>(),
                              ccol.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(),
                              perm.const_data_ptr<int64_t>(), Cb, bs, dx.mutable_data_ptr<scalar_t>());
  });
}

// bwd_input and dbias = dy.sum(0) in one call: the ISA kernels add dy's columns up while packing
// dy (the one pass that reads all of it), instead of a separate reduction over dy afterwards.
void bsr_linear_bwd_input_bias_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol,
                                   const at::Tensor& row, const at::Tensor& perm, at::Tensor& dx, at::Tensor& dbias) {
  check_common(dy, values, dx, "bsr_linear_bwd_input_bias", false);
  TORCH_CHECK(ccol.is_contiguous() && row.is_contiguous() && perm.is_contiguous(),
              "bsr_linear_bwd_input_bias: expected contiguous index tensors");
  TORCH_CHECK(dbias.dim() == 1 && dbias.size(0) == dy.size(1) && dbias.is_contiguous() &&
                  dbias.scalar_type() == dy.scalar_type(),
              "bsr_linear_bwd_input_bias: dbias: expected a contiguous [out] tensor of dy's dtype");
  const int64_t M = dy.size(0), out_f = dy.size(1), bs = values.size(1), Cb = ccol.numel() - 1;
  const bool dx_f32 = dx.scalar_type() != dy.scalar_type();  // mixed: dx fp32
  if (dx_f32 && !(native_mixed(dy.scalar_type(), bs, true) && M > 0 && Cb > 0 && out_f > 0)) {
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(dy.scalar_type()));
    bsr_linear_bwd_input_bias_cpu(dy, values, ccol, row, perm, tmp, dbias);
    dx.copy_(tmp);
    return;
  }
  const auto c = choose(kPanelTable, dy.scalar_type(), bs);
  if (!c.entry || M == 0 || Cb == 0 || out_f == 0) {  // nothing to fuse with
    bsr_linear_bwd_input_cpu(dy, values, ccol, row, perm, dx);
    at::sum_out(dbias, dy, {0});
    return;
  }
  const bsr::PanelKernel& k = **c.entry->kernel;
  at::Tensor db = dbias.scalar_type() == at::kFloat ? dbias : at::empty({out_f}, dbias.options().dtype(at::kFloat));
  if (!c.convert) {
    run_bwd_input(k, dy, values, ccol, row, perm, dx, db.mutable_data_ptr<float>(), dx_f32);
  } else {
    at::Tensor tmp = at::empty(dx.sizes(), dx.options().dtype(at::kFloat));
    run_bwd_input(k, f32(dy), f32(values), ccol, row, perm, tmp, db.mutable_data_ptr<float>());
    dx.copy_(tmp);
  }
  if (!db.is_same(dbias)) dbias.copy_(db);
}

void bsr_linear_bwd_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               at::Tensor& dvalues) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dvalues.dim() == 3, "bsr_linear_bwd_weight: bad ranks");
  TORCH_CHECK(
      dy.is_contiguous() && x.is_contiguous() && dvalues.is_contiguous() && crow.is_contiguous() && col.is_contiguous(),
      "bsr_linear_bwd_weight: expected contiguous tensors");
  TORCH_CHECK(dy.scalar_type() == dvalues.scalar_type() && mixed_ok(x, dvalues),
              "bsr_linear_bwd_weight: ", "expected one float dtype (or an fp32 x with bf16 / fp16 dy)");
  const int64_t M = dy.size(0), out_f = dy.size(1), in = x.size(1), bs = dvalues.size(1), nnzb = dvalues.size(0),
                R = crow.numel() - 1;
  if (nnzb == 0) return;
  if (M == 0) {
    dvalues.zero_();
    return;
  }
  const auto c = choose(kWeightTable, dy.scalar_type(), bs);
  if (x.scalar_type() != dy.scalar_type()) {  // mixed: x fp32
    if (!(c.entry && !c.convert && (*c.entry->kernel)->pack_f32))
      return bsr_linear_bwd_weight_cpu(dy, x.to(dy.scalar_type()), crow, col, dvalues);
    at::Tensor tmp = at::empty(dvalues.sizes(), dvalues.options().dtype(at::kFloat));
    run_bwd_weight(**c.entry->kernel, dy, x, crow, col, bs, tmp.mutable_data_ptr<float>(), true);
    dvalues.copy_(tmp);
    return;
  }
  if (c.entry) {
    const bsr::WeightKernel& k = **c.entry->kernel;
    if (dvalues.scalar_type() == at::kFloat) {
      run_bwd_weight(k, dy, x, crow, col, bs, dvalues.mutable_data_ptr<float>());
    } else {  // fp32 sums, rounded once
      at::Tensor tmp = at::empty(dvalues.sizes(), dvalues.options().dtype(at::kFloat));
      if (c.convert)
        run_bwd_weight(k, f32(dy), f32(x), crow, col, bs, tmp.mutable_data_ptr<float>());
      else
        run_bwd_weight(k, dy, x, crow, col, bs, tmp.mutable_data_ptr<float>());
      dvalues.copy_(tmp);
    }
    return;
  }
  if (low_precision(dy.scalar_type())) {
    at::Tensor tmp = at::empty(dvalues.sizes(), dvalues.options().dtype(at::kFloat));
    bsr_linear_bwd_weight_cpu(f32(dy), f32(x), crow, col, tmp);
    dvalues.copy_(tmp);
    return;
  }
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  std::vector<int64_t> blk_row(static_cast<size_t>(nnzb));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = cr[r]; k < cr[r + 1]; ++k) blk_row[k] = r;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_linear_bwd_weight_cpu", [&] {
    bwd_weight_plain<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), M, out_f, in,
                               blk_row.data(), col.const_data_ptr<int64_t>(), nnzb, bs,
                               dvalues.mutable_data_ptr<scalar_t>());
  });
}

std::string fwd_path(at::ScalarType dtype, int64_t bs) {
  return path_name(choose(kPanelTable, dtype, bs));
}
std::string weight_path(at::ScalarType dtype, int64_t bs) {
  return path_name(choose(kWeightTable, dtype, bs));
}
const lotus::KernelPathRegistrar kFwdPath("block_sparse_linear.fwd", fwd_path);
const lotus::KernelPathRegistrar kBwdInputPath("block_sparse_linear.bwd_input", fwd_path);
const lotus::KernelPathRegistrar kBwdWeightPath("block_sparse_linear.bwd_weight", weight_path);

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("bsr_linear_fwd", &bsr_linear_fwd_cpu);
  m.impl("bsr_linear_bwd_input", &bsr_linear_bwd_input_cpu);
  m.impl("bsr_linear_bwd_input_bias", &bsr_linear_bwd_input_bias_cpu);
  m.impl("bsr_linear_bwd_weight", &bsr_linear_bwd_weight_cpu);
}
