// ISA probe and cap (see isa.h), and the op that tells Python about them.
#include "isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace lotus {
namespace {

constexpr const char* kEnv = "LOTUS_KERNELS_CPU_ISA";
constexpr const char* kNames[kNumIsa] = {"default", "avx2", "avx512", "avx512_bf16"};

Isa probe() {
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports also checks that the OS saves the ymm / zmm state (XGETBV).
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::kDefault;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return Isa::kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512;
  return Isa::kAvx512Bf16;
#else
  return Isa::kDefault;
#endif
}

Isa parse_cap(const char* value) {
  for (int i = 0; i < kNumIsa; ++i)
    if (std::string(value) == kNames[i]) return static_cast<Isa>(i);
  TORCH_CHECK(false, kEnv, ": expected one of default, avx2, avx512, avx512_bf16 (or unset for the CPU's best), got '",
              value, "'");
}

}  // namespace

const char* isa_name(Isa isa) {
  return kNames[static_cast<int>(isa)];
}

Isa cpu_isa_supported() {
  static const Isa best = probe();
  return best;
}

Isa cpu_isa() {
  const char* env = std::getenv(kEnv);
  if (env == nullptr || *env == '\0') return cpu_isa_supported();
  static std::mutex mu;
  static std::string cached_value;
  static Isa cached_cap = Isa::kDefault;
  std::lock_guard<std::mutex> lock(mu);
  if (cached_value != env) {
    cached_cap = parse_cap(env);  // throws on a bad value, leaving the cache as it was
    cached_value = env;
  }
  return static_cast<int>(cached_cap) < static_cast<int>(cpu_isa_supported()) ? cached_cap : cpu_isa_supported();
}

namespace {

std::map<std::string, KernelPathFn>& path_registry() {
  static std::map<std::string, KernelPathFn> registry;  // filled by static initialisers, read after
  return registry;
}

// capped: the level kernels use now (after LOTUS_KERNELS_CPU_ISA); else the CPU's own.
std::string cpu_isa_op(bool capped) {
  return isa_name(capped ? cpu_isa() : cpu_isa_supported());
}

std::string cpu_kernel_path_op(const std::string& op, c10::ScalarType dtype, int64_t block_size) {
  const auto& registry = path_registry();
  const auto it = registry.find(op);
  if (it == registry.end()) {
    std::string known;
    for (const auto& [name, fn] : registry) known += (known.empty() ? "" : ", ") + name;
    TORCH_CHECK(false, "cpu_kernel_path: op: expected one of ", known, ", got '", op, "'");
  }
  return it->second(dtype, block_size);
}

}  // namespace

KernelPathRegistrar::KernelPathRegistrar(const char* op, KernelPathFn fn) {
  path_registry()[op] = fn;
}

}  // namespace lotus

TORCH_LIBRARY_FRAGMENT(lotus_kernels_C, m) {
  m.def("cpu_isa(bool capped=True) -> str", &lotus::cpu_isa_op);
  m.def("cpu_kernel_path(str op, ScalarType dtype, int block_size=32) -> str", &lotus::cpu_kernel_path_op);
}
