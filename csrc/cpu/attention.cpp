// CPU kernels for attention_fwd / attention_bwd (schemas in csrc/bindings.cpp).
//
// Forward: up to ROWS_MAX_N keys a task holds a whole [bq, N] score block (exact two-pass softmax,
// one BLAS call per product); beyond that, flash-style key blocks with an online softmax, so no
// task holds more than a [BQ, BK] block. The backward recomputes P = exp(S - lse) from the saved
// log-sum-exp. Compute is in opmath (fp32 for bf16/half/fp32, fp64 for fp64).
//
// Layout (see Seqs): padded q, k, v, out, dq, dk, dv [B, H, N, D], mask [B, N] bool (true = padded
// key), lse [B, H, N], scores [B, N]; or packed varlen (cu_seqlens [B + 1]) q... [T, H, D], lse [H, T],
// scores [T]. One set of kernels serves both: every loop runs over (sequence, head) pairs whose rows
// sit at Seqs::x with row stride Seqs::ld. lse is in opmath. A query row that sees no unpadded key
// gets out = 0 and lse = +inf, so exp(s - lse) = 0 everywhere downstream (never NaN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iterator>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"

namespace {

constexpr int64_t BQ = 64;   // queries per block
constexpr int64_t BK = 128;  // keys per block (row stride of every score block)

// Where sequence b, head h lives. Padded: every sequence is N long, rows D apart. Packed (cu set):
// sequence b is tokens cu[b] .. cu[b + 1] of [T, H, D], rows H * D apart; N is the longest length.
struct Seqs {
  int64_t B, H, N, D;
  const int64_t* cu = nullptr;
  int64_t T = 0;
  int64_t len(int64_t b) const { return cu ? cu[b + 1] - cu[b] : N; }
  int64_t ld() const { return cu ? H * D : D; }
  int64_t x(int64_t b, int64_t h) const { return cu ? (cu[b] * H + h) * D : (b * H + h) * N * D; }  // q/k/v/out
  int64_t row(int64_t b, int64_t h) const { return cu ? h * T + cu[b] : (b * H + h) * N; }          // lse
  int64_t tok(int64_t b) const { return cu ? cu[b] : b * N; }                                       // scores
};

// The BLAS that libtorch_cpu carries (MKL on x86 wheels). Weak, so that a torch built without a
// Fortran-ABI BLAS still loads this extension and takes the plain loops below instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// Column-major C (m x n) = alpha * op(A) op(B) + beta * C, op = 'N' or 'T'. Every block product of
// this file is one call. A first version with plain vectorised loops (no register blocking) took
// 2.4x as long for the ViT-S forward (45 vs 19 ms, scalar exp in both); the fallback loop below is
// only for a torch without a BLAS.
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
          T beta, T* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ila = lda, ilb = ldb, ilc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
  } else {
    if (dgemm_) return dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p)
        sum += (ta == 'N' ? a[i + p * lda] : a[p + i * lda]) * (tb == 'N' ? b[p + j * ldb] : b[j + p * ldb]);
      c[i + j * ldc] = alpha * sum + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
}

// n rows of D elements, ld apart, in opmath: (pointer, row stride). fp32 / fp64 rows are used in
// place; other dtypes are converted into buf (row stride D).
template <typename scalar_t, typename acc_t>
inline std::pair<const acc_t*, int64_t> rows_acc(const scalar_t* src, int64_t ld, int64_t n, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {src, ld};
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; ++d) buf[i * D + d] = static_cast<acc_t>(src[i * ld + d]);
    return {buf, D};
  }
}

// y[j] = exp(x[j] - sub), in place. For float a polynomial exp the compiler vectorises (std::exp
// stays scalar, and at ViT sizes the N^2 exps per head cost as much as both GEMMs together):
// exp(x) = 2^n * e^f with n = round(x / ln 2), f = x - n ln 2 in [-ln2/2, ln2/2] (two-part ln 2 so
// f is exact to float precision), e^f by its degree-6 Taylor polynomial (truncation < 1.2e-7
// relative, i.e. ~1 ulp). Inputs here are <= ~0 (scores minus a row max or lse) or -inf; below
// -87 the result is flushed to exactly 0, which also keeps -inf from turning into NaN.
// no-trapping-math lets GCC if-convert the selects (else: "control flow in loop", not vectorised);
// std::memcpy, not std::bit_cast: under optimize() the latter is not inlined.
//
// The fp32 softmax passes (this exp, row max, row sum) are built once per ISA level from one body
// (function-level `target`, as the block-sparse kernels: default = SSE2, avx2, avx512 with 512-bit
// vectors) and chosen per op call by lotus::cpu_isa(), so LOTUS_KERNELS_CPU_ISA caps them too. (They
// were `target_clones("avx2", "default")`, resolved once at load time by CPU feature, not "arch=",
// whose resolver matches CPU models and picked the SSE2 copy on this AMD EPYC.)
#define LOTUS_EXP_SUB(NAME, ...)                                                          \
  __attribute__((__VA_ARGS__)) void NAME(float* __restrict x, int64_t n, float sub) {     \
    for (int64_t j = 0; j < n; ++j) {                                                     \
      const float v = x[j] - sub;                                                         \
      const float c = v > -87.0f ? v : -87.0f;                                            \
      const float t = c * 1.44269504088896341f;                                           \
      const float r = (t + 12582912.0f) - 12582912.0f; /* round to nearest, |t| < 2^22 */ \
      const float f = (c - r * 0.693145751953125f) - r * 1.428606765330187e-06f;          \
      float p = 1.0f / 720.0f;                                                            \
      p = p * f + 1.0f / 120.0f;                                                          \
      p = p * f + 1.0f / 24.0f;                                                           \
      p = p * f + 1.0f / 6.0f;                                                            \
      p = p * f + 0.5f;                                                                   \
      p = p * f + 1.0f;                                                                   \
      p = p * f + 1.0f;                                                                   \
      const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;                         \
      float two_n;                                                                        \
      std::memcpy(&two_n, &bits, sizeof two_n);                                           \
      const float y = p * two_n;                                                          \
      x[j] = v < -87.0f ? 0.0f : y;                                                       \
    }                                                                                     \
  }

// Row max / sum of a score row. Reassociation is allowed here (the order of a sum over one key
// block does not matter at the tolerance of an fp32 softmax), so the reductions vectorise instead
// of running as a 4-cycle-per-element dependency chain.
// The max is written on GCC vector types: GCC does not vectorise a float max reduction without
// finite-math-only (which the -inf of padded keys rules out), and the scalar vmaxss chain it made
// instead cost more than exp_sub. Two W-lane accumulators; vector ?: is a compare + blend.
#define LOTUS_ROW_MAX(NAME, VEC, W, ...)                               \
  __attribute__((__VA_ARGS__)) float NAME(const float* x, int64_t n) { \
    constexpr float NEG_INF = -std::numeric_limits<float>::infinity(); \
    VEC m0, m1;                                                        \
    for (int w = 0; w < W; ++w) m0[w] = m1[w] = NEG_INF;               \
    int64_t j = 0;                                                     \
    for (; j + 2 * W <= n; j += 2 * W) {                               \
      VEC a, b;                                                        \
      std::memcpy(&a, x + j, sizeof a);                                \
      std::memcpy(&b, x + j + W, sizeof b);                            \
      m0 = a > m0 ? a : m0;                                            \
      m1 = b > m1 ? b : m1;                                            \
    }                                                                  \
    m0 = m1 > m0 ? m1 : m0;                                            \
    float m = NEG_INF;                                                 \
    for (int w = 0; w < W; ++w) m = m0[w] > m ? m0[w] : m;             \
    for (; j < n; ++j) m = x[j] > m ? x[j] : m;                        \
    return m;                                                          \
  }
#define LOTUS_ROW_SUM(NAME, ...)                                       \
  __attribute__((__VA_ARGS__)) float NAME(const float* x, int64_t n) { \
    float s = 0.0f;                                                    \
    for (int64_t j = 0; j < n; ++j) s += x[j];                         \
    return s;                                                          \
  }

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
#define LOTUS_EXP_OPT optimize("no-trapping-math")
#define LOTUS_REDUCE_OPT optimize("no-trapping-math", "associative-math", "no-signed-zeros")
LOTUS_EXP_SUB(exp_sub_default, LOTUS_EXP_OPT)
LOTUS_ROW_MAX(row_max_default, f32x8, 8, LOTUS_REDUCE_OPT)
LOTUS_ROW_SUM(row_sum_default, LOTUS_REDUCE_OPT)
#if defined(__x86_64__) || defined(_M_X64)
#define LOTUS_AVX2_T target("avx2,fma")
#define LOTUS_AVX512_T target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
LOTUS_EXP_SUB(exp_sub_avx2, LOTUS_EXP_OPT, LOTUS_AVX2_T)
LOTUS_ROW_MAX(row_max_avx2, f32x8, 8, LOTUS_REDUCE_OPT, LOTUS_AVX2_T)
LOTUS_ROW_SUM(row_sum_avx2, LOTUS_REDUCE_OPT, LOTUS_AVX2_T)
LOTUS_EXP_SUB(exp_sub_avx512, LOTUS_EXP_OPT, LOTUS_AVX512_T)
LOTUS_ROW_MAX(row_max_avx512, f32x16, 16, LOTUS_REDUCE_OPT, LOTUS_AVX512_T)
LOTUS_ROW_SUM(row_sum_avx512, LOTUS_REDUCE_OPT, LOTUS_AVX512_T)
#endif

struct SoftmaxFns {
  lotus::Isa isa;
  void (*exp_sub)(float* __restrict, int64_t, float);
  float (*row_max)(const float*, int64_t);
  float (*row_sum)(const float*, int64_t);
};
// Best first; avx512_bf16 adds nothing for fp32 passes.
const SoftmaxFns kSoftmaxTable[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {lotus::Isa::kAvx512, exp_sub_avx512, row_max_avx512, row_sum_avx512},
    {lotus::Isa::kAvx2, exp_sub_avx2, row_max_avx2, row_sum_avx2},
#endif
    {lotus::Isa::kDefault, exp_sub_default, row_max_default, row_sum_default},
};

const SoftmaxFns& softmax_fns() {
  return lotus::best_within_cap(kSoftmaxTable);
}

// Set by each op call (from softmax_fns()) before any kernel loop runs; read by the wrappers below.
std::atomic<const SoftmaxFns*> g_softmax{&kSoftmaxTable[std::size(kSoftmaxTable) - 1]};

inline void exp_sub(float* x, int64_t n, float sub) {
  g_softmax.load(std::memory_order_relaxed)->exp_sub(x, n, sub);
}
inline float row_max(const float* x, int64_t n) {
  return g_softmax.load(std::memory_order_relaxed)->row_max(x, n);
}
inline float row_sum(const float* x, int64_t n) {
  return g_softmax.load(std::memory_order_relaxed)->row_sum(x, n);
}

inline void exp_sub(double* x, int64_t n, double sub) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - sub);
}
inline double row_max(const double* x, int64_t n) {  // fp64 is the accuracy reference: keep the order
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}
inline double row_sum(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

// Whole-row forward, for N <= ROWS_MAX_N: one task per (b, h, query block); every query row sees
// all its keys at once (a [bq, n] score block, <= 532 KB), so the softmax is exact in two passes
// (row max, then exp and sum) with no online rescaling, and each task is two BLAS calls (S = Q K^T,
// O = P V) instead of two per 128-key block: MKL re-packs its operands on every call, which was ~20%
// of the sgemm time with 128-key blocks. Keys before the first and after the last unpadded key are
// skipped (padding usually sits at the end); padded keys inside get -inf. Query blocks past the end
// of a shorter packed sequence are empty tasks. When cls is given, row 0 of the normalised P of each
// (b, h) is written to cls[(b * H + h) * N ...].
constexpr int64_t ROWS_MAX_N = 2048;

template <typename scalar_t>
void fwd_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
              at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* cls, Seqs sq, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = sq.B, H = sq.H, N = sq.N, D = sq.D, ld = sq.ld();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  // 128 queries per task amortise MKL's packing of K / V better than 64 (ViT-S fwd, 1 thread:
  // ~3% at N = 197 and 1025); above 1024 keys, 64 keep the score block <= 512 KB.
  const int64_t bq = N <= 1024 ? 128 : 64;
  const int64_t nqb = (N + bq - 1) / bq;
  const int64_t LS = (N + 15) / 16 * 16;  // row stride of the score block

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(bq * LS), linv(bq), qbuf, kbuf, vbuf, obuf;
    if constexpr (convert) {  // K / V converted once per (b, h), reused by its query blocks
      qbuf.resize(bq * D), kbuf.resize(N * D), vbuf.resize(N * D), obuf.resize(bq * D);
    }
    int64_t converted = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * bq, b = bh / H, h = bh % H;
      const int64_t n = sq.len(b);
      if (i0 >= n) continue;
      const int64_t nq = std::min(bq, n - i0), xo = sq.x(b, h);
      const bool* mb = mask ? mask + b * N : nullptr;
      scalar_t* op = out + xo + i0 * ld;
      acc_t* lp = lse + sq.row(b, h) + i0;
      int64_t jlo = 0, jhi = n;
      if (mb) {
        while (jlo < n && mb[jlo]) ++jlo;
        while (jhi > jlo && mb[jhi - 1]) --jhi;
      }
      if (jlo == jhi) {  // no unpadded key: out = 0, lse = +inf, scores 0
        for (int64_t i = 0; i < nq; ++i) std::fill(op + i * ld, op + i * ld + D, scalar_t(0));
        std::fill(lp, lp + nq, std::numeric_limits<acc_t>::infinity());
        if (cls && i0 == 0) std::fill(cls + bh * N, cls + bh * N + n, acc_t(0));
        continue;
      }
      const int64_t nk = jhi - jlo;
      const auto [qf, ldq] = rows_acc(q + xo + i0 * ld, ld, nq, D, qbuf.data());
      const acc_t* kf;
      const acc_t* vf;
      acc_t* o;
      int64_t ldk, ldo;
      if constexpr (convert) {
        if (converted != bh) {
          rows_acc(k + xo, ld, n, D, kbuf.data());
          rows_acc(v + xo, ld, n, D, vbuf.data());
          converted = bh;
        }
        kf = kbuf.data(), vf = vbuf.data(), o = obuf.data(), ldk = D, ldo = D;
      } else {
        kf = k + xo, vf = v + xo, o = op, ldk = ld, ldo = ld;
      }
      // S[nq][nk] (stride LS) = scale * Q . K[jlo:jhi]^T
      gemm<acc_t>('T', 'N', nk, nq, D, scale, kf + jlo * ldk, ldk, qf, ldq, acc_t(0), s.data(), LS);
      const bool holes = mb && std::any_of(mb + jlo, mb + jhi, [](bool p) { return p; });
      for (int64_t i = 0; i < nq; ++i) {
        acc_t* srow = s.data() + i * LS;
        if (holes)
          for (int64_t j = 0; j < nk; ++j) srow[j] = mb[jlo + j] ? NEG_INF : srow[j];
        const acc_t mx = row_max(srow, nk);  // finite: key jlo is unpadded
        exp_sub(srow, nk, mx);
        const acc_t l = row_sum(srow, nk);  // >= 1: the max term is exp(0) = 1
        lp[i] = mx + std::log(l);
        linv[i] = acc_t(1) / l;
      }
      // O[nq][D] = P[nq][nk] . V[jlo:jhi][D], then rows scaled by 1 / l
      gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), vf + jlo * ldk, ldk, s.data(), LS, acc_t(0), o, ldo);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t d = 0; d < D; ++d) op[i * ld + d] = static_cast<scalar_t>(o[i * ldo + d] * linv[i]);
      if (cls && i0 == 0) {
        acc_t* c = cls + bh * N;
        std::fill(c, c + n, acc_t(0));
        for (int64_t j = 0; j < nk; ++j) c[jlo + j] = s[j] * linv[0];
      }
    }
  });
}

// Blocked forward (online softmax over BK-key blocks), for N > ROWS_MAX_N.
template <typename scalar_t>
void fwd_blocked(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
                 at::opmath_type<scalar_t>* lse, Seqs sq, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = sq.B, H = sq.H, N = sq.N, D = sq.D, ld = sq.ld();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t nqb = (N + BQ - 1) / BQ;
  // One task per (b, h, query block): the whole pass over keys for BQ queries.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(BQ * D), kbuf(BK * D), vbuf(BK * D), s(BQ * BK), acc(BQ * D), m(BQ), l(BQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * BQ, b = bh / H, h = bh % H;
      const int64_t n = sq.len(b);
      if (i0 >= n) continue;
      const int64_t nq = std::min(BQ, n - i0), xo = sq.x(b, h);
      const bool* mb = mask ? mask + b * N : nullptr;
      const auto [qf, ldq] = rows_acc(q + xo + i0 * ld, ld, nq, D, qbuf.data());
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < n; j0 += BK) {
        const int64_t nk = std::min(BK, n - j0);
        if (mb && std::all_of(mb + j0, mb + j0 + nk, [](bool p) { return p; })) continue;
        const auto [kf, ldk] = rows_acc(k + xo + j0 * ld, ld, nk, D, kbuf.data());
        const auto [vf, ldv] = rows_acc(v + xo + j0 * ld, ld, nk, D, vbuf.data());
        gemm<acc_t>('T', 'N', nk, nq, D, scale, kf, ldk, qf, ldq, acc_t(0), s.data(), BK);
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* srow = s.data() + i * BK;
          if (mb)
            for (int64_t j = 0; j < nk; ++j) srow[j] = mb[j0 + j] ? NEG_INF : srow[j];
          const acc_t mnew = std::max(m[i], row_max(srow, nk));
          if (mnew == NEG_INF) {  // nothing unpadded yet: P row is 0 (keeps -inf out of the P.V product)
            std::fill(srow, srow + nk, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(m[i] - mnew);  // 0 on the first unpadded block
          exp_sub(srow, nk, mnew);
          l[i] = l[i] * alpha + row_sum(srow, nk);
          m[i] = mnew;
          if (alpha != acc_t(1))
            for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= alpha;
        }
        // acc[nq][D] += P[nq][nk] . V[nk][D]
        gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), vf, ldv, s.data(), BK, acc_t(1), acc.data(), D);
      }
      scalar_t* op = out + xo + i0 * ld;
      acc_t* lp = lse + sq.row(b, h) + i0;
      for (int64_t i = 0; i < nq; ++i) {
        const bool empty = l[i] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[i];
        for (int64_t d = 0; d < D; ++d) op[i * ld + d] = static_cast<scalar_t>(acc[i * D + d] * inv);
        lp[i] = empty ? std::numeric_limits<acc_t>::infinity() : m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void fwd_impl(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
              at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* scores, int64_t mode, Seqs sq,
              double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = sq.B, H = sq.H, N = sq.N, D = sq.D, ld = sq.ld();
  const acc_t scale = static_cast<acc_t>(scale_d);

  if (N <= ROWS_MAX_N) {
    std::vector<acc_t> cls(mode == 1 ? B * H * N : 0);
    fwd_rows(q, k, v, mask, out, lse, mode == 1 ? cls.data() : nullptr, sq, scale_d);
    if (mode == 1) {
      // "cls": the forward kept row 0 of P per (b, h); average over heads, summed in order.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t n = sq.len(b);
          acc_t* sc = scores + sq.tok(b);
          std::fill(sc, sc + n, acc_t(0));
          for (int64_t h = 0; h < H; ++h) {
            const acc_t* c = cls.data() + (b * H + h) * N;
            for (int64_t j = 0; j < n; ++j) sc[j] += c[j];
          }
          for (int64_t j = 0; j < n; ++j) sc[j] /= static_cast<acc_t>(H);
        }
      });
      return;
    }
  } else {
    fwd_blocked(q, k, v, mask, out, lse, sq, scale_d);
  }

  if (mode == 1) {
    // "cls" (blocked path): row 0 of P per head, averaged over heads. One task per sequence, heads
    // summed in order.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q0(D);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = sq.len(b);
        acc_t* sc = scores + sq.tok(b);
        std::fill(sc, sc + n, acc_t(0));
        if (n == 0) continue;
        const bool* mb = mask ? mask + b * N : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t xo = sq.x(b, h);
          for (int64_t d = 0; d < D; ++d) q0[d] = static_cast<acc_t>(q[xo + d]);
          const acc_t lse0 = lse[sq.row(b, h)];
          for (int64_t j = 0; j < n; ++j) {
            if (mb && mb[j]) continue;
            const scalar_t* kr = k + xo + j * ld;
            acc_t dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += q0[d] * static_cast<acc_t>(kr[d]);
            sc[j] += std::exp(dot * scale - lse0);
          }
        }
        for (int64_t j = 0; j < n; ++j) sc[j] /= static_cast<acc_t>(H);
      }
    });
  } else if (mode == 2) {
    // "received": column sums of P over unpadded queries. A second pass over key blocks: one task
    // per (b, h, key block) owns those columns, so no atomics; heads are then summed in order.
    const int64_t nkb = (N + BK - 1) / BK;
    std::vector<acc_t> colsum(B * H * N);
    at::parallel_for(0, B * H * nkb, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qbuf(BQ * D), kbuf(BK * D), s(BQ * BK);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nkb, j0 = (t % nkb) * BK, b = bh / H, h = bh % H;
        const int64_t n = sq.len(b);
        if (j0 >= n) continue;
        const int64_t nk = std::min(BK, n - j0), xo = sq.x(b, h);
        const bool* mb = mask ? mask + b * N : nullptr;
        const acc_t* ls = lse + sq.row(b, h);
        acc_t* cs = colsum.data() + bh * N + j0;
        std::fill(cs, cs + nk, acc_t(0));
        const auto [kf, ldk] = rows_acc(k + xo + j0 * ld, ld, nk, D, kbuf.data());
        for (int64_t i0 = 0; i0 < n; i0 += BQ) {
          const int64_t nq = std::min(BQ, n - i0);
          const auto [qf, ldq] = rows_acc(q + xo + i0 * ld, ld, nq, D, qbuf.data());
          gemm<acc_t>('T', 'N', nk, nq, D, scale, kf, ldk, qf, ldq, acc_t(0), s.data(), BK);
          for (int64_t i = 0; i < nq; ++i) {
            if (mb && mb[i0 + i]) continue;
            acc_t* srow = s.data() + i * BK;
            exp_sub(srow, nk, ls[i0 + i]);
            for (int64_t j = 0; j < nk; ++j) cs[j] += srow[j];
          }
        }
        if (mb)
          for (int64_t j = 0; j < nk; ++j) cs[j] = mb[j0 + j] ? acc_t(0) : cs[j];
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = sq.len(b);
      int64_t nvalid = n;
      if (mask) nvalid = n - std::count(mask + b * N, mask + b * N + n, true);
      const acc_t denom = nvalid == 0 ? acc_t(0) : acc_t(1) / static_cast<acc_t>(H * nvalid);
      acc_t* sc = scores + sq.tok(b);
      for (int64_t j = 0; j < n; ++j) {
        acc_t sum = 0;
        for (int64_t h = 0; h < H; ++h) sum += colsum[(b * H + h) * N + j];
        sc[j] = sum * denom;
      }
    }
  }
}

template <typename scalar_t>
void bwd_impl(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
              const at::opmath_type<scalar_t>* lse, const bool* mask, scalar_t* dq, scalar_t* dk, scalar_t* dv, Seqs sq,
              double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = sq.H, N = sq.N, D = sq.D, ld = sq.ld();
  const acc_t scale = static_cast<acc_t>(scale_d);
  // One task per (b, h): it owns dk/dv of every key and dq of every query of that head, so all
  // sums run in a fixed order (deterministic) without atomics. Buffers are O(N * D) per task.
  at::parallel_for(0, sq.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf, kbuf, vbuf, dobuf, dqa(N * D), delta(N);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (auto* buf : {&qbuf, &kbuf, &vbuf, &dobuf}) buf->resize(N * D);
    }
    std::vector<acc_t> p(BQ * BK), ds(BQ * BK), dka(BK * D), dva(BK * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, n = sq.len(b), xo = sq.x(b, h);
      if (n == 0) continue;
      const bool* mb = mask ? mask + b * N : nullptr;
      const acc_t* ls = lse + sq.row(b, h);
      // all four share one row stride: either all used in place (ld) or all converted (D)
      const auto [qf, lx] = rows_acc(q + xo, ld, n, D, qbuf.data());
      const acc_t* kf = rows_acc(k + xo, ld, n, D, kbuf.data()).first;
      const acc_t* vf = rows_acc(v + xo, ld, n, D, vbuf.data()).first;
      const acc_t* dof = rows_acc(dout + xo, ld, n, D, dobuf.data()).first;
      std::fill(dqa.begin(), dqa.begin() + n * D, acc_t(0));
      for (int64_t i = 0; i < n; ++i) {  // delta_i = rowsum(dO * O) = sum_j P_ij dP_ij
        acc_t sum = 0;
        for (int64_t d = 0; d < D; ++d) sum += dof[i * lx + d] * static_cast<acc_t>(out[xo + i * ld + d]);
        delta[i] = sum;
      }
      for (int64_t j0 = 0; j0 < n; j0 += BK) {
        const int64_t nk = std::min(BK, n - j0);
        std::fill(dka.begin(), dka.end(), acc_t(0));
        std::fill(dva.begin(), dva.end(), acc_t(0));
        const bool all_padded = mb && std::all_of(mb + j0, mb + j0 + nk, [](bool x) { return x; });
        for (int64_t i0 = 0; i0 < n && !all_padded; i0 += BQ) {
          const int64_t nq = std::min(BQ, n - i0);
          const acc_t* kb = kf + j0 * lx;
          gemm<acc_t>('T', 'N', nk, nq, D, scale, kb, lx, qf + i0 * lx, lx, acc_t(0), p.data(), BK);  // S
          gemm<acc_t>('T', 'N', nk, nq, D, acc_t(1), vf + j0 * lx, lx, dof + i0 * lx, lx, acc_t(0), ds.data(),
                      BK);  // dP
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* prow = p.data() + i * BK;
            acc_t* dsrow = ds.data() + i * BK;
            const acc_t li = ls[i0 + i], di = delta[i0 + i];
            exp_sub(prow, nk, li);  // P; lse = +inf (no unpadded key) gives 0
            if (mb)
              for (int64_t j = 0; j < nk; ++j) prow[j] = mb[j0 + j] ? acc_t(0) : prow[j];
            for (int64_t j = 0; j < nk; ++j) dsrow[j] = prow[j] * (dsrow[j] - di) * scale;  // dS, scale folded in
          }
          // dV[nk][D] += P^T dO;  dK[nk][D] += dS^T Q;  dQ[nq][D] += dS K
          gemm<acc_t>('N', 'T', D, nk, nq, acc_t(1), dof + i0 * lx, lx, p.data(), BK, acc_t(1), dva.data(), D);
          gemm<acc_t>('N', 'T', D, nk, nq, acc_t(1), qf + i0 * lx, lx, ds.data(), BK, acc_t(1), dka.data(), D);
          gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), kb, lx, ds.data(), BK, acc_t(1), dqa.data() + i0 * D, D);
        }
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t d = 0; d < D; ++d) {
            dk[xo + (j0 + j) * ld + d] = static_cast<scalar_t>(dka[j * D + d]);
            dv[xo + (j0 + j) * ld + d] = static_cast<scalar_t>(dva[j * D + d]);
          }
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < D; ++d) dq[xo + i * ld + d] = static_cast<scalar_t>(dqa[i * D + d]);
    }
  });
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous(), "attention (cpu): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "attention (cpu): ", name,
              " must match q's shape and dtype");
}

// The layout of q ([B, H, N, D], or [T, H, D] packed by cu_seqlens) and the mask pointer.
Seqs layout(const at::Tensor& q, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu,
            int64_t max_seqlen, const bool** mp) {
  TORCH_CHECK(q.is_contiguous(), "attention (cpu): q must be contiguous");
  *mp = nullptr;
  if (cu.has_value()) {
    TORCH_CHECK(q.dim() == 3, "attention (cpu): q must be [T, H, D] with cu_seqlens");
    TORCH_CHECK(!mask.has_value(), "attention (cpu): key_padding_mask and cu_seqlens are exclusive");
    TORCH_CHECK(cu->is_contiguous() && cu->scalar_type() == at::kLong && cu->dim() == 1 && cu->numel() >= 1,
                "attention (cpu): cu_seqlens must be a contiguous int64 [B + 1] tensor");
    Seqs sq{cu->numel() - 1, q.size(1), max_seqlen, q.size(2), cu->const_data_ptr<int64_t>(), q.size(0)};
    TORCH_CHECK(sq.cu[0] == 0 && sq.cu[sq.B] == sq.T, "attention (cpu): cu_seqlens must run from 0 to T");
    for (int64_t b = 0; b < sq.B; ++b)
      TORCH_CHECK(sq.len(b) >= 0 && sq.len(b) <= max_seqlen, "attention (cpu): bad cu_seqlens / max_seqlen");
    return sq;
  }
  TORCH_CHECK(q.dim() == 4, "attention (cpu): q must be [B, H, N, D]");
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_contiguous() && mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == q.size(0) && mask->size(1) == q.size(2),
                "attention (cpu): key_padding_mask must be a contiguous bool [B, N] tensor");
    *mp = mask->const_data_ptr<bool>();
  }
  return Seqs{q.size(0), q.size(1), q.size(2), q.size(3)};
}

void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                       int64_t max_seqlen, double scale, int64_t scores_mode, at::Tensor& out, at::Tensor& lse,
                       at::Tensor& scores) {
  g_softmax.store(&softmax_fns(), std::memory_order_relaxed);
  const bool* mp;
  const Seqs sq = layout(q, mask, cu_seqlens, max_seqlen, &mp);
  check(k, "k", q);
  check(v, "v", q);
  check(out, "out", q);
  const int64_t rows = sq.cu ? sq.H * sq.T : sq.B * sq.H * sq.N, toks = sq.cu ? sq.T : sq.B * sq.N;
  TORCH_CHECK(scores_mode >= 0 && scores_mode <= 2, "attention (cpu): scores_mode must be 0, 1 or 2");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == rows, "attention (cpu): bad lse");
  TORCH_CHECK(scores_mode == 0 ||
                  (scores.is_contiguous() && scores.numel() == toks && scores.scalar_type() == lse.scalar_type()),
              "attention (cpu): bad scores");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "attention (cpu): lse dtype");
    fwd_impl<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), mp,
                       out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(),
                       scores_mode == 0 ? nullptr : scores.mutable_data_ptr<acc_t>(), scores_mode, sq, scale);
  });
}

void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale, at::Tensor& dq,
                       at::Tensor& dk, at::Tensor& dv) {
  g_softmax.store(&softmax_fns(), std::memory_order_relaxed);
  const bool* mp;
  const Seqs sq = layout(q, mask, cu_seqlens, max_seqlen, &mp);
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) check(*t, name, q);
  for (auto [t, name] : {std::pair{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}) check(*t, name, q);
  const int64_t rows = sq.cu ? sq.H * sq.T : sq.B * sq.H * sq.N;
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == rows, "attention (cpu): bad lse");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "attention (cpu): lse dtype");
    bwd_impl<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                       v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), mp,
                       dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                       dv.mutable_data_ptr<scalar_t>(), sq, scale);
  });
}

// The softmax / score passes' variant (fp32 math for fp32 / bf16 / fp16; fp64 stays scalar). The
// block products go to the BLAS inside torch (MKL's own dispatch).
std::string attention_path(at::ScalarType dtype, int64_t) {
  return dtype == at::kDouble ? "default" : lotus::isa_name(softmax_fns().isa);
}
const lotus::KernelPathRegistrar kAttentionPath("attention", attention_path);

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
