// CPU kernels for the kept-patch embedding: im2col_gather, col2im_scatter and the fused
// patch_embed_gather (schemas in csrc/bindings.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

namespace {

struct Geometry {
  int64_t B, C, H, W, ph, pw, gw, K, L;  // L = C*ph*pw, one unfolded patch
};

Geometry geometry(const at::Tensor& images, const at::Tensor& idx, int64_t ph, int64_t pw) {
  TORCH_CHECK(images.dim() == 4 && idx.dim() == 2, "lotus_kernels_C: images must be 4-D, idx 2-D");
  TORCH_CHECK(images.is_contiguous() && idx.is_contiguous(), "lotus_kernels_C: expected contiguous tensors");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "lotus_kernels_C: idx must be int64");
  TORCH_CHECK(ph > 0 && pw > 0 && images.size(2) % ph == 0 && images.size(3) % pw == 0,
              "lotus_kernels_C: patch size must divide the image");
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), ph, pw,
             images.size(3) / pw, idx.size(1), images.size(1) * ph * pw};
  return g;
}

// Unfold kept patches of rows [begin, end) of the flattened (b, k) index into dst (row stride L).
// Each (c, i) line of a patch is pw contiguous pixels: a memcpy.
void unfold_rows(const char* img, const int64_t* ix, char* dst, const Geometry& g, int64_t esize,
                 int64_t begin, int64_t end) {
  const int64_t line = g.pw * esize;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.K, n = ix[r];
    const int64_t y0 = (n / g.gw) * g.ph, x0 = (n % g.gw) * g.pw;
    char* d = dst + (r - begin) * g.L * esize;
    for (int64_t c = 0; c < g.C; ++c) {
      const char* plane = img + ((b * g.C + c) * g.H * g.W) * esize;
      for (int64_t i = 0; i < g.ph; ++i, d += line)
        std::memcpy(d, plane + ((y0 + i) * g.W + x0) * esize, line);
    }
  }
}

void im2col_gather_cpu(const at::Tensor& images, const at::Tensor& idx, int64_t ph, int64_t pw, at::Tensor& out) {
  const Geometry g = geometry(images, idx, ph, pw);
  TORCH_CHECK(out.is_contiguous() && out.numel() == g.B * g.K * g.L, "im2col_gather: bad out");
  const char* img = static_cast<const char*>(images.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t es = images.element_size();
  at::parallel_for(0, g.B * g.K, 16, [&](int64_t begin, int64_t end) {
    unfold_rows(img, idx.const_data_ptr<int64_t>(), dst + begin * g.L * es, g, es, begin, end);
  });
}

// Adjoint of im2col_gather. One task owns one (b, c) plane, so duplicate patches are summed by one
// thread in order (deterministic, no atomics); fp32 accumulation for reduced precision.
void col2im_scatter_cpu(const at::Tensor& cols, const at::Tensor& idx, int64_t ph, int64_t pw, at::Tensor& out) {
  TORCH_CHECK(cols.is_contiguous() && out.is_contiguous() && idx.is_contiguous(), "col2im_scatter: expected contiguous");
  TORCH_CHECK(idx.scalar_type() == at::kLong && cols.scalar_type() == out.scalar_type(), "col2im_scatter: dtypes");
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), K = idx.size(1);
  const int64_t gw = W / pw, L = C * ph * pw;
  TORCH_CHECK(cols.size(0) == B && cols.size(1) == K && cols.size(2) == L, "col2im_scatter: bad cols shape");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = cols.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> plane(H * W);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / C, c = t % C;
        std::fill(plane.begin(), plane.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = ix[b * K + k], y0 = (n / gw) * ph, x0 = (n % gw) * pw;
          const scalar_t* s = src + (b * K + k) * L + c * ph * pw;
          for (int64_t i = 0; i < ph; ++i)
            for (int64_t j = 0; j < pw; ++j) plane[(y0 + i) * W + x0 + j] += static_cast<acc_t>(s[i * pw + j]);
        }
        scalar_t* d = dst + t * H * W;
        for (int64_t p = 0; p < H * W; ++p) d[p] = static_cast<scalar_t>(plane[p]);
      }
    });
  });
}

// Fused forward. Rows m = (b, k) are split into one tile per task; each task unfolds its kept
// patches into a private buffer that stays in cache (the unfolded matrix never reaches DRAM),
// writes the epilogue (bias + pos[idx]) into its rows of `out`, and accumulates the tile GEMM on
// top of it with beta = 1 (BLAS, single-threaded inside the parallel region).
void patch_embed_gather_cpu(const at::Tensor& images, const at::Tensor& idx, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos,
                            at::Tensor& out) {
  const int64_t ph = weight.size(2), pw = weight.size(3), D = weight.size(0);
  const Geometry g = geometry(images, idx, ph, pw);
  TORCH_CHECK(weight.is_contiguous() && weight.size(1) == g.C, "patch_embed_gather: bad weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == g.B * g.K * D, "patch_embed_gather: bad out");
  const int64_t M = g.B * g.K, es = images.element_size();
  const at::Tensor w_t = weight.view({D, g.L}).t();  // [L, D] view: BLAS reads it transposed
  const int64_t threads = at::get_num_threads();
  // Tiles of <= 256 rows, at least one per thread: big enough for an efficient GEMM, small enough
  // that the unfolded tile (256 x L) stays in L2.
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(256, (M + threads - 1) / threads));
  const int64_t n_tiles = (M + tile - 1) / tile;
  const char* img = static_cast<const char*>(images.const_data_ptr());
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  at::Tensor out2d = out.view({M, D});
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    // We are already below autograd (the Python op owns the backward); the guard is thread-local,
    // so each worker sets it before calling ATen ops on tensors that require grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor buf = at::empty({tile, g.L}, images.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = t * tile, rows = std::min(tile, M - begin);
      unfold_rows(img, ix, static_cast<char*>(buf.mutable_data_ptr()), g, es, begin, begin + rows);
      at::Tensor o = out2d.narrow(0, begin, rows);
      if (pos.has_value()) {
        at::index_select_out(o, *pos, 0, idx.view({M}).narrow(0, begin, rows));
        if (bias.has_value()) o.add_(*bias);
      } else if (bias.has_value()) {
        o.copy_(bias->unsqueeze(0).expand({rows, D}));
      } else {
        o.zero_();
      }
      o.addmm_(buf.narrow(0, 0, rows), w_t);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("im2col_gather", &im2col_gather_cpu);
  m.impl("col2im_scatter", &col2im_scatter_cpu);
  m.impl("patch_embed_gather", &patch_embed_gather_cpu);
}
