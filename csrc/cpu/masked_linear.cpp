// CPU kernel for masked_linear's weight gradient (schema in csrc/bindings.cpp).
//
// One pass over the gradient, built per ISA level (default = SSE2, avx2, avx512 with 512-bit
// vectors) from one body and chosen per call by lotus::cpu_isa() (LOTUS_KERNELS_CPU_ISA caps it),
// like the block-sparse kernels. The pass is memory-bound (read 4 + 1 bytes, write 4 per fp32
// element), so wider vectors only cut instructions; the variants exist so that every CPU path is
// one table and one cap.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>

#include "isa.h"

namespace {

template <size_t N>
using uint_of_size = std::conditional_t<N == 2, uint16_t, std::conditional_t<N == 4, uint32_t, uint64_t>>;

// Works on the bit patterns: all-zero bits is +0.0 in every IEEE type, so one integer select per
// element zeroes even inf/NaN gradients (a multiply by 0 would keep NaN and let a pruned weight
// drift), and the loop is a plain compare + and that the compiler vectorises for bf16/half as well.
#define LOTUS_ZERO_WHERE_FALSE(NAME, BITS, ...)                                                        \
  __attribute__((__VA_ARGS__)) void NAME(BITS* __restrict g, const uint8_t* __restrict m, int64_t n) { \
    for (int64_t i = 0; i < n; ++i) g[i] = m[i] ? g[i] : BITS(0);                                      \
  }
#define LOTUS_ZERO_VARIANTS(SUFFIX, ...)                         \
  LOTUS_ZERO_WHERE_FALSE(zero16_##SUFFIX, uint16_t, __VA_ARGS__) \
  LOTUS_ZERO_WHERE_FALSE(zero32_##SUFFIX, uint32_t, __VA_ARGS__) \
  LOTUS_ZERO_WHERE_FALSE(zero64_##SUFFIX, uint64_t, __VA_ARGS__)

LOTUS_ZERO_VARIANTS(default, optimize("tree-vectorize"))
#if defined(__x86_64__) || defined(_M_X64)
LOTUS_ZERO_VARIANTS(avx2, target("avx2"))
LOTUS_ZERO_VARIANTS(avx512, target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"))
#endif

struct ZeroFns {
  lotus::Isa isa;
  void (*z16)(uint16_t* __restrict, const uint8_t* __restrict, int64_t);
  void (*z32)(uint32_t* __restrict, const uint8_t* __restrict, int64_t);
  void (*z64)(uint64_t* __restrict, const uint8_t* __restrict, int64_t);
};
// clang-format off: the table keeps one row per ISA, preprocessor lines included
const ZeroFns kZeroTable[] = {  // best first
#if defined(__x86_64__) || defined(_M_X64)
    {lotus::Isa::kAvx512, zero16_avx512, zero32_avx512, zero64_avx512},
    {lotus::Isa::kAvx2, zero16_avx2, zero32_avx2, zero64_avx2},
#endif
    {lotus::Isa::kDefault, zero16_default, zero32_default, zero64_default},
};
// clang-format on

const ZeroFns& zero_fns() {
  return lotus::best_within_cap(kZeroTable);
}

template <typename bits_t>
void zero_where_false(const ZeroFns& fns, bits_t* g, const uint8_t* m, int64_t n) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    if constexpr (sizeof(bits_t) == 2)
      fns.z16(g + begin, m + begin, end - begin);
    else if constexpr (sizeof(bits_t) == 4)
      fns.z32(g + begin, m + begin, end - begin);
    else
      fns.z64(g + begin, m + begin, end - begin);
  });
}

void masked_fill_grad_cpu(at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(grad.is_contiguous() && mask.is_contiguous(), "lotus_kernels_C: expected contiguous tensors");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_fill_grad_: mask must be bool");
  TORCH_CHECK(grad.sizes() == mask.sizes(), "masked_fill_grad_: grad and mask shapes differ");
  const ZeroFns& fns = zero_fns();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_fill_grad_cpu", [&] {
    using bits_t = uint_of_size<sizeof(scalar_t)>;
    // A bool tensor is one byte per element, 0 or 1.
    zero_where_false<bits_t>(fns, static_cast<bits_t*>(grad.mutable_data_ptr()),
                             static_cast<const uint8_t*>(mask.const_data_ptr()), grad.numel());
  });
}

std::string masked_path(at::ScalarType, int64_t) {
  return lotus::isa_name(zero_fns().isa);
}
const lotus::KernelPathRegistrar kMaskedPath("masked_weight_grad", masked_path);

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("masked_fill_grad_", &masked_fill_grad_cpu);
}
