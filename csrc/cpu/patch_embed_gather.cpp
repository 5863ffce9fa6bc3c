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
  Geometry g{images.size(0),      images.size(1), images.size(2),          images.size(3), ph, pw,
             images.size(3) / pw, idx.size(1),    images.size(1) * ph * pw};
  return g;
}

// Unfold kept patches of rows [begin, end) of the flattened (b, k) index into dst (row stride L).
// Each (c, i) line of a patch is pw contiguous pixels: a memcpy.
void unfold_rows(const char* img, const int64_t* ix, char* dst, const Geometry& g, int64_t esize, int64_t begin,
                 int64_t end) {
  const int64_t line = g.pw * esize;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.K, n = ix[r];
    const int64_t y0 = (n / g.gw) * g.ph, x0 = (n % g.gw) * g.pw;
    char* d = dst + (r - begin) * g.L * esize;
    for (int64_t c = 0; c < g.C; ++c) {
      const char* plane = img + ((b * g.C + c) * g.H * g.W) * esize;
      for (int64_t i = 0; i < g.ph; ++i, d += line) std::memcpy(d, plane + ((y0 + i) * g.W + x0) * esize, line);
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
  TORCH_CHECK(cols.is_contiguous() && out.is_contiguous() && idx.is_contiguous(),
              "col2im_scatter: expected contiguous");
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

// Forward: unfold the kept patches into `cols` [M, L] (parallel memcpy), write the epilogue
// (pos[idx] + bias) into `out`, then one BLAS GEMM accumulates cols @ W^T on top of it (beta = 1).
// A per-thread tiled variant that kept each unfolded tile in cache measured 20% slower here: one
// large GEMM lets BLAS block and thread it better than tile-sized single-threaded calls, and the
// unfolded matrix is small (M x L x 4 bytes = 2.4 MB for ViT-S/16, batch 8, keep 0.5). See
// docs/design/token_drop_attention.md.
void patch_embed_gather_cpu(const at::Tensor& images, const at::Tensor& idx, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos,
                            at::Tensor& out) {
  // Already below autograd (the Python op owns the backward): ATen calls here must not record.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t ph = weight.size(2), pw = weight.size(3), D = weight.size(0);
  const Geometry g = geometry(images, idx, ph, pw);
  TORCH_CHECK(weight.is_contiguous() && weight.size(1) == g.C, "patch_embed_gather: bad weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == g.B * g.K * D, "patch_embed_gather: bad out");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == D), "patch_embed_gather: bad bias");
  TORCH_CHECK(!pos.has_value() || (pos->is_contiguous() && pos->size(-1) == D), "patch_embed_gather: bad pos");
  const int64_t M = g.B * g.K, es = images.element_size();
  const int64_t* ix = idx.const_data_ptr<int64_t>();

  at::Tensor cols = at::empty({M, g.L}, images.options());
  const char* img = static_cast<const char*>(images.const_data_ptr());
  char* cdst = static_cast<char*>(cols.mutable_data_ptr());
  at::parallel_for(
      0, M, 16, [&](int64_t begin, int64_t end) { unfold_rows(img, ix, cdst + begin * g.L * es, g, es, begin, end); });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "patch_embed_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pos.has_value() ? pos->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bs = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* orow = o + r * D;
        const scalar_t* prow = p ? p + ix[r] * D : nullptr;
        for (int64_t d = 0; d < D; ++d) {
          acc_t v = prow ? static_cast<acc_t>(prow[d]) : acc_t(0);
          if (bs) v += static_cast<acc_t>(bs[d]);
          orow[d] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  out.view({M, D}).addmm_(cols, weight.view({D, g.L}).t());
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("im2col_gather", &im2col_gather_cpu);
  m.impl("col2im_scatter", &col2im_scatter_cpu);
  m.impl("patch_embed_gather", &patch_embed_gather_cpu);
}
