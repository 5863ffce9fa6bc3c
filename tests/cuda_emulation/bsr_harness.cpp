// Runs the CUDA kernels of csrc/cuda/block_sparse_linear.cu on CPU threads, for
// tests/cuda_emulation: one std::thread per CUDA thread of a CTA, __syncthreads() as a std::barrier,
// __shared__ arrays as function statics; the CTAs of a grid run one after another (a barrier between
// them). Only the device half of the .cu is compiled (__CUDA_ARCH__ defined).
// torch headers first, without __CUDA_ARCH__ (they would take the device branches); their include
// guards keep the .cu from re-reading them.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <type_traits>
#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx;
thread_local EmuDim3 blockIdx;
std::barrier<>* emu_barrier = nullptr;
#define __syncthreads() emu_barrier->arrive_and_wait()
#define __global__
#define __shared__ static
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __device__
#define __forceinline__ inline
struct uint4 {
  unsigned x, y, z, w;
};
bool emu_vec = true;  // which staging variant the WMMA kernels use (the host picks by alignment)
#define __CUDA_ARCH__ 900
#include KERNEL_SOURCE
#undef __CUDA_ARCH__

namespace {
void run_grid(unsigned gx, unsigned gy, const std::function<void()>& body) {
  std::barrier<> bar(kBsrThreads);
  emu_barrier = &bar;
  std::vector<std::thread> ts;
  for (int t = 0; t < kBsrThreads; ++t)
    ts.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          blockIdx.x = bx;
          blockIdx.y = by;
          body();
          bar.arrive_and_wait();  // the next CTA reuses the shared arrays
        }
    });
  for (auto& th : ts) th.join();
}

// Mirrors the host launch code of the .cu: grid (ceil(M / TM), slots) and grid (nnzb).
template <typename T, int BS, bool kTrans>
void product(const void* a, const void* v, const int64_t* ptr, const int64_t* idx, const int64_t* perm,
             const void* bias, void* out, int64_t M, int64_t a_stride, int64_t out_stride, int64_t slots) {
  constexpr int TM = RowsPerThread<T>::value * kBsrThreads / BS;
  const unsigned tiles = static_cast<unsigned>((M + TM - 1) / TM);
  run_grid(tiles, static_cast<unsigned>(slots), [&] {
    block_row_product_kernel<T, BS, kTrans>(static_cast<const T*>(a), static_cast<const T*>(v), ptr, idx, perm,
                                            static_cast<const T*>(bias), static_cast<T*>(out), M, a_stride, out_stride);
  });
}

// bwd_weight's split of M, as the host code computes it from a requested number of splits.
struct Split {
  int64_t rows_per_split, splits;
};
Split split_rows(int64_t M, int64_t want) {
  const int64_t m = M > 0 ? M : 1;
  if (want <= 1) return {m, 1};
  const int64_t per = (((m + want - 1) / want + 63) / 64) * 64;
  return {per, (m + per - 1) / per};
}

// The second pass: dvalues = ordered sum of the partial blocks.
template <typename T>
void sum_partials(const at::opmath_type<T>* partial, void* dv, int64_t splits, int64_t numel) {
  run_grid(static_cast<unsigned>((numel + kBsrThreads - 1) / kBsrThreads), 1,
           [&] { sum_partials_kernel<T>(partial, static_cast<T*>(dv), splits, numel); });
}

template <typename T, int BS>
void wgrad(const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv, int64_t M, int64_t in,
           int64_t out, int64_t R, int64_t nnzb, int64_t want_splits) {
  const Split sp = split_rows(M, want_splits);
  std::vector<at::opmath_type<T>> partial(sp.splits > 1 ? sp.splits * nnzb * BS * BS : 0);
  run_grid(static_cast<unsigned>(nnzb), static_cast<unsigned>(sp.splits), [&] {
    bsr_weight_grad_kernel<T, BS>(static_cast<const T*>(dy), static_cast<const T*>(x), crow, col, static_cast<T*>(dv),
                                  sp.splits > 1 ? partial.data() : nullptr, M, in, out, R, nnzb, sp.rows_per_split);
  });
  if (sp.splits > 1) sum_partials<T>(partial.data(), dv, sp.splits, nnzb * BS * BS);
}

// bf16 / fp16 fwd / bwd_input on sm80+: the WMMA kernel, with its own row tile.
template <typename T, int BS, bool kTrans>
void product_wmma(const void* a, const void* v, const int64_t* ptr, const int64_t* idx, const int64_t* perm,
                  const void* bias, void* out, int64_t M, int64_t a_stride, int64_t out_stride, int64_t slots) {
  constexpr int TM = 2048 / BS;
  const unsigned tiles = static_cast<unsigned>((M + TM - 1) / TM);
  run_grid(tiles, static_cast<unsigned>(slots), [&] {
    auto k = emu_vec ? block_row_product_wmma_kernel<T, BS, kTrans, true>
                     : block_row_product_wmma_kernel<T, BS, kTrans, false>;
    k(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(v), ptr, idx, perm, static_cast<const T*>(bias),
      static_cast<T*>(out), M, a_stride, out_stride);
  });
}

template <typename T>
struct Wmma {};  // tag: T (bf16 / fp16) through the WMMA kernels
template <typename X>
struct IsWmma : std::false_type {};
template <typename T>
struct IsWmma<Wmma<T>> : std::true_type {
  using type = T;
};

template <typename T, int BS>
void wgrad_wmma(const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv, int64_t M, int64_t in,
                int64_t out, int64_t R, int64_t nnzb, int64_t want_splits) {
  const Split sp = split_rows(M, want_splits);
  std::vector<float> partial(sp.splits > 1 ? sp.splits * nnzb * BS * BS : 0);
  run_grid(static_cast<unsigned>(nnzb), static_cast<unsigned>(sp.splits), [&] {
    auto k = emu_vec ? bsr_weight_grad_wmma_kernel<T, BS, true> : bsr_weight_grad_wmma_kernel<T, BS, false>;
    k(static_cast<const uint16_t*>(dy), static_cast<const uint16_t*>(x), crow, col, static_cast<T*>(dv),
      sp.splits > 1 ? partial.data() : nullptr, M, in, out, R, nnzb, sp.rows_per_split);
  });
  if (sp.splits > 1) sum_partials<T>(partial.data(), dv, sp.splits, nnzb * BS * BS);
}

// dtype 0 float, 1 double, 2 bf16 WMMA (what sm80+ runs), 3 bf16 FMA (below sm80), 4 fp16 WMMA, 5 fp16 FMA
template <typename F>
void by_type_bs(int dtype, int bs, F&& f) {
  auto with_t = [&](auto t) {
    using T = decltype(t);
    if (bs == 16)
      f(T{}, std::integral_constant<int, 16>{});
    else if (bs == 32)
      f(T{}, std::integral_constant<int, 32>{});
    else
      f(T{}, std::integral_constant<int, 64>{});
  };
  if (dtype == 0)
    with_t(float{});
  else if (dtype == 1)
    with_t(double{});
  else if (dtype == 2)
    with_t(Wmma<c10::BFloat16>{});
  else if (dtype == 3)
    with_t(c10::BFloat16{});
  else if (dtype == 4)
    with_t(Wmma<c10::Half>{});
  else
    with_t(c10::Half{});
}
}  // namespace

extern "C" {
void emu_set_vec(int on) {
  emu_vec = on != 0;
}
void emu_fwd(int dtype, int bs, const void* x, const void* values, const int64_t* crow, const int64_t* col,
             const void* bias, void* out, int64_t M, int64_t in, int64_t out_f) {
  if (M == 0) return;  // the host code returns on out.numel() == 0
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (IsWmma<decltype(t)>::value)
      product_wmma<typename IsWmma<decltype(t)>::type, decltype(b)::value, true>(x, values, crow, col, nullptr, bias,
                                                                                 out, M, in, out_f, out_f / bs);
    else
      product<decltype(t), decltype(b)::value, true>(x, values, crow, col, nullptr, bias, out, M, in, out_f,
                                                     out_f / bs);
  });
}
void emu_bwd_input(int dtype, int bs, const void* dy, const void* values, const int64_t* ccol, const int64_t* row,
                   const int64_t* perm, void* dx, int64_t M, int64_t in, int64_t out_f) {
  if (M == 0) return;
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (IsWmma<decltype(t)>::value)
      product_wmma<typename IsWmma<decltype(t)>::type, decltype(b)::value, false>(dy, values, ccol, row, perm, nullptr,
                                                                                  dx, M, out_f, in, in / bs);
    else
      product<decltype(t), decltype(b)::value, false>(dy, values, ccol, row, perm, nullptr, dx, M, out_f, in, in / bs);
  });
}
void emu_bwd_weight(int dtype, int bs, const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv,
                    int64_t M, int64_t in, int64_t out_f, int64_t nnzb, int64_t splits) {
  if (nnzb == 0) return;
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (IsWmma<decltype(t)>::value)
      wgrad_wmma<typename IsWmma<decltype(t)>::type, decltype(b)::value>(dy, x, crow, col, dv, M, in, out_f, out_f / bs,
                                                                         nnzb, splits);
    else
      wgrad<decltype(t), decltype(b)::value>(dy, x, crow, col, dv, M, in, out_f, out_f / bs, nnzb, splits);
  });
}
}
