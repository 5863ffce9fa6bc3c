// Runs the CUDA kernels of csrc/cuda/block_sparse_linear.cu on CPU threads, for
// tests/cuda_emulation: one std::thread per CUDA thread of a CTA, __syncthreads() as a std::barrier,
// __shared__ arrays as function statics; the CTAs of a grid run one after another (a barrier between
// them). Only the device half of the .cu is compiled (__CUDA_ARCH__ defined).
// torch headers first, without __CUDA_ARCH__ (they would take the device branches); their include
// guards keep the .cu from re-reading them.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <type_traits>
#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
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
                                            static_cast<const T*>(bias), static_cast<T*>(out), M, a_stride,
                                            out_stride);
  });
}

template <typename T, int BS>
void wgrad(const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv, int64_t M, int64_t in,
           int64_t out, int64_t R, int64_t nnzb) {
  run_grid(static_cast<unsigned>(nnzb), 1, [&] {
    bsr_weight_grad_kernel<T, BS>(static_cast<const T*>(dy), static_cast<const T*>(x), crow, col, static_cast<T*>(dv),
                                  M, in, out, R);
  });
}

// bf16 fwd / bwd_input on sm80+: the WMMA kernel, with its own row tile.
template <int BS, bool kTrans>
void product_wmma(const void* a, const void* v, const int64_t* ptr, const int64_t* idx, const int64_t* perm,
                  const void* bias, void* out, int64_t M, int64_t a_stride, int64_t out_stride, int64_t slots) {
  constexpr int TM = 2048 / BS;
  const unsigned tiles = static_cast<unsigned>((M + TM - 1) / TM);
  run_grid(tiles, static_cast<unsigned>(slots), [&] {
    auto k = emu_vec ? block_row_product_wmma_kernel<BS, kTrans, true> : block_row_product_wmma_kernel<BS, kTrans, false>;
    k(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(v), ptr, idx, perm,
      static_cast<const c10::BFloat16*>(bias), static_cast<c10::BFloat16*>(out), M, a_stride, out_stride);
  });
}

struct Wmma {};  // tag: bf16 through the WMMA kernel

template <int BS>
void wgrad_wmma(const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv, int64_t M,
                int64_t in, int64_t out, int64_t R, int64_t nnzb) {
  run_grid(static_cast<unsigned>(nnzb), 1, [&] {
    auto k = emu_vec ? bsr_weight_grad_wmma_kernel<BS, true> : bsr_weight_grad_wmma_kernel<BS, false>;
    k(static_cast<const uint16_t*>(dy), static_cast<const uint16_t*>(x), crow, col, static_cast<c10::BFloat16*>(dv), M,
      in, out, R);
  });
}

template <typename F>
void by_type_bs(int dtype, int bs, F&& f) {  // dtype 0 float, 1 double, 2 bf16 (WMMA where it applies), 3 bf16 FMA
  auto with_t = [&](auto t) {
    using T = decltype(t);
    if (bs == 16) f(T{}, std::integral_constant<int, 16>{});
    else if (bs == 32) f(T{}, std::integral_constant<int, 32>{});
    else f(T{}, std::integral_constant<int, 64>{});
  };
  if (dtype == 0) with_t(float{});
  else if (dtype == 1) with_t(double{});
  else if (dtype == 2) with_t(Wmma{});
  else with_t(c10::BFloat16{});
}
}  // namespace

extern "C" {
void emu_set_vec(int on) { emu_vec = on != 0; }
void emu_fwd(int dtype, int bs, const void* x, const void* values, const int64_t* crow, const int64_t* col,
             const void* bias, void* out, int64_t M, int64_t in, int64_t out_f) {
  if (M == 0) return;  // the host code returns on out.numel() == 0
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (std::is_same_v<decltype(t), Wmma>)
      product_wmma<decltype(b)::value, true>(x, values, crow, col, nullptr, bias, out, M, in, out_f, out_f / bs);
    else
      product<decltype(t), decltype(b)::value, true>(x, values, crow, col, nullptr, bias, out, M, in, out_f, out_f / bs);
  });
}
void emu_bwd_input(int dtype, int bs, const void* dy, const void* values, const int64_t* ccol, const int64_t* row,
                   const int64_t* perm, void* dx, int64_t M, int64_t in, int64_t out_f) {
  if (M == 0) return;
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (std::is_same_v<decltype(t), Wmma>)
      product_wmma<decltype(b)::value, false>(dy, values, ccol, row, perm, nullptr, dx, M, out_f, in, in / bs);
    else
      product<decltype(t), decltype(b)::value, false>(dy, values, ccol, row, perm, nullptr, dx, M, out_f, in, in / bs);
  });
}
void emu_bwd_weight(int dtype, int bs, const void* dy, const void* x, const int64_t* crow, const int64_t* col, void* dv,
                    int64_t M, int64_t in, int64_t out_f, int64_t nnzb) {
  if (nnzb == 0) return;
  by_type_bs(dtype, bs, [&](auto t, auto b) {
    if constexpr (std::is_same_v<decltype(t), Wmma>)
      wgrad_wmma<decltype(b)::value>(dy, x, crow, col, dv, M, in, out_f, out_f / bs, nnzb);
    else
      wgrad<decltype(t), decltype(b)::value>(dy, x, crow, col, dv, M, in, out_f, out_f / bs, nnzb);
  });
}
}
