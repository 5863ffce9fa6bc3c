// CPU kernels for gather_tokens / scatter_tokens (schemas in csrc/bindings.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

void check_common(const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& out) {
  TORCH_CHECK(rows.is_contiguous() && idx.is_contiguous() && out.is_contiguous(),
              "lotus_kernels_C: expected contiguous tensors");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "lotus_kernels_C: idx must be int64");
  TORCH_CHECK(rows.scalar_type() == out.scalar_type(), "lotus_kernels_C: dtype mismatch");
}

// A kept row is C contiguous elements, so the gather is a memcpy per (b, k): dtype-agnostic and
// already at memory bandwidth; parallel over rows.
void gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx, at::Tensor& out) {
  check_common(x, idx, out);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = idx.size(1);
  TORCH_CHECK(out.size(0) == B && out.size(1) == K && out.size(2) == C, "gather_tokens: bad out shape");
  const int64_t row_bytes = C * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K;
      std::memcpy(dst + r * row_bytes, src + (b * N + ix[r]) * row_bytes, row_bytes);
    }
  });
}

// Scatter-add without atomics: one task owns one image b (and a channel slice), so duplicate
// indices are summed in order by a single thread: deterministic. Every output row is written
// exactly once in the common no-duplicate case: the first row aimed at a token is copied, later
// ones are added, and tokens no row aims at are zeroed. (Zero-filling first and adding everything
// would touch the output twice; this kernel is memory-bound.)
template <typename scalar_t>
void scatter_rows(const scalar_t* src, const int64_t* ix, scalar_t* dst, int64_t B, int64_t N, int64_t K, int64_t C) {
  // Split channels only when images alone give too few tasks (e.g. B = 1 for a shared table's
  // gradient); slices stay >= 64 channels so each row segment is still a long contiguous run.
  const int64_t want = (2 * at::get_num_threads() + B - 1) / B;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(want, C / 64));
  const int64_t kChunk = (C + n_chunks - 1) / n_chunks;
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> seen(N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n_chunks, c0 = (t % n_chunks) * kChunk;
      const int64_t cw = std::min(kChunk, C - c0);
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = ix[b * K + k];
        const scalar_t* s = src + (b * K + k) * C + c0;
        scalar_t* d = dst + (b * N + n) * C + c0;
        if (!seen[n]) {
          std::memcpy(d, s, cw * sizeof(scalar_t));
          seen[n] = 1;
        } else {
          using acc_t = at::opmath_type<scalar_t>;  // bf16/fp16 add in fp32, round once per add
          for (int64_t c = 0; c < cw; ++c)
            d[c] = static_cast<scalar_t>(static_cast<acc_t>(d[c]) + static_cast<acc_t>(s[c]));
        }
      }
      for (int64_t n = 0; n < N; ++n)
        if (!seen[n]) std::memset(dst + (b * N + n) * C + c0, 0, cw * sizeof(scalar_t));
    }
  });
}

void scatter_tokens_cpu(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out) {
  check_common(src, idx, out);
  const int64_t B = src.size(0), K = src.size(1), C = src.size(2), N = out.size(1);
  TORCH_CHECK(out.size(0) == B && out.size(2) == C && idx.size(1) == K, "scatter_tokens: bad shapes");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scatter_tokens_cpu", [&] {
    scatter_rows<scalar_t>(src.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                           out.mutable_data_ptr<scalar_t>(), B, N, K, C);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
}
