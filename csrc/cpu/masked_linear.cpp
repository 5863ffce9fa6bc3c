// CPU kernel for masked_linear's weight gradient (schema in csrc/bindings.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace {

template <size_t N>
using uint_of_size = std::conditional_t<N == 2, uint16_t, std::conditional_t<N == 4, uint32_t, uint64_t>>;

// Works on the bit patterns: all-zero bits is +0.0 in every IEEE type, so one integer select per
// element zeroes even inf/NaN gradients (a multiply by 0 would keep NaN and let a pruned weight
// drift), and the loop is a plain compare + and that the compiler vectorises for bf16/half as well.
template <typename bits_t>
void zero_where_false(bits_t* g, const uint8_t* m, int64_t n) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] = m[i] ? g[i] : bits_t(0);
  });
}

void masked_fill_grad_cpu(at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(grad.is_contiguous() && mask.is_contiguous(), "lotus_kernels_C: expected contiguous tensors");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_fill_grad_: mask must be bool");
  TORCH_CHECK(grad.sizes() == mask.sizes(), "masked_fill_grad_: grad and mask shapes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_fill_grad_cpu", [&] {
    using bits_t = uint_of_size<sizeof(scalar_t)>;
    // A bool tensor is one byte per element, 0 or 1.
    zero_where_false<bits_t>(static_cast<bits_t*>(grad.mutable_data_ptr()),
                             static_cast<const uint8_t*>(mask.const_data_ptr()), grad.numel());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("masked_fill_grad_", &masked_fill_grad_cpu);
}
