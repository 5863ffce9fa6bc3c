// Which x86 ISA the CPU kernels may use: what the CPU (and OS) supports, capped by the environment
// variable LOTUS_KERNELS_CPU_ISA (default | avx2 | avx512 | avx512_bf16; unset or empty = no cap),
// like ATen's ATEN_CPU_CAPABILITY and oneDNN's ONEDNN_MAX_CPU_ISA. The CPU is probed once; the
// variable is re-read on every call (a getenv and a string compare against the cached value), so a
// test can force each kernel path in one process. An unknown value is an error naming the variable.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace lotus {

// ISA levels, nested like oneDNN's (each includes the ones before it). kDefault = plain C++ loops.
enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumIsa = 4;

Isa cpu_isa_supported();  // the CPU's best level (probed once)
Isa cpu_isa();            // min(supported, cap): what kernels may use now
const char* isa_name(Isa isa);

// The one ISA picker of the CPU kernels: the first entry of a best-first table of per-ISA kernels
// (each entry has an `isa` member) whose level is within cpu_isa() and that `usable` accepts (e.g.
// built into this binary, right dtype and block size); null if none is. cpu_isa() is read once
// per pick, so one call sees one cap.
template <typename Entry, size_t N, typename Usable>
const Entry* best_within_cap(const Entry (&table)[N], Usable usable) {
  const int cap = static_cast<int>(cpu_isa());
  for (const auto& e : table)
    if (static_cast<int>(e.isa) <= cap && usable(e)) return &e;
  return nullptr;
}

// The same for tables of interchangeable variants that end with a kDefault entry (always within the
// cap): the best entry within the cap, never null.
template <typename Entry, size_t N>
const Entry& best_within_cap(const Entry (&table)[N]) {
  const Entry* e = best_within_cap(table, [](const Entry&) { return true; });
  return e ? *e : table[N - 1];
}

// Each op file registers, per op name (e.g. "block_sparse_linear.fwd"), a function saying which
// kernel a call with this dtype / block size takes now; `lotus_kernels_C::cpu_kernel_path` answers
// from it (tests and benchmark records).
using KernelPathFn = std::string (*)(c10::ScalarType dtype, int64_t block_size);
struct KernelPathRegistrar {
  KernelPathRegistrar(const char* op, KernelPathFn fn);
};

}  // namespace lotus
