// CPU kernels for attention_fwd / attention_bwd (schemas in csrc/bindings.cpp).
//
// Forward: up to ROWS_MAX_N keys a task holds a whole [bq, N] score block (exact two-pass softmax,
// one BLAS call per product); beyond that, flash-style key blocks with an online softmax, so no
// task holds more than a [BQ, BK] block. The backward recomputes P = exp(S - lse) from the saved
// log-sum-exp. Compute is in opmath (fp32 for bf16/half/fp32, fp64 for fp64).
//
// Layout: q, k, v, out, dq, dk, dv [B, H, N, D] contiguous; mask [B, N] bool (true = padded key);
// lse [B, H, N] in opmath. A query row that sees no unpadded key gets out = 0 and lse = +inf, so
// exp(s - lse) = 0 everywhere downstream (scores and gradients are 0 for it, never NaN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BQ = 64;   // queries per block
constexpr int64_t BK = 128;  // keys per block (row stride of every score block)

struct Dims {
  int64_t B, H, N, D;
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
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
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

// Row-major views, in the terms used below (all row-major, D contiguous):
//   S[nq][nk] (stride BK) = alpha * X[nq][D] . Y[nk][D]^T
template <typename T>
inline void rows_dot_rows(const T* x, const T* y, T* s, int64_t nq, int64_t nk, int64_t D, T alpha) {
  gemm<T>('T', 'N', nk, nq, D, alpha, y, D, x, D, T(0), s, BK);
}

// n elements of src as opmath: the source itself when it already is (fp32 / fp64), else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<acc_t>(src[e]);
    return buf;
  }
}

// y[j] = exp(x[j] - sub), in place. For float a polynomial exp the compiler vectorises (std::exp
// stays scalar, and at ViT sizes the N^2 exps per head cost as much as both GEMMs together):
// exp(x) = 2^n * e^f with n = round(x / ln 2), f = x - n ln 2 in [-ln2/2, ln2/2] (two-part ln 2 so
// f is exact to float precision), e^f by its degree-6 Taylor polynomial (truncation < 1.2e-7
// relative, i.e. ~1 ulp). Inputs here are <= ~0 (scores minus a row max or lse) or -inf; below
// -87 the result is flushed to exactly 0, which also keeps -inf from turning into NaN.
// no-trapping-math lets GCC if-convert the selects (else: "control flow in loop", not vectorised);
// target_clones adds an AVX2 copy picked at load time by CPU feature (not "arch=", which matches CPU models and skips AMD), the default copy keeps SSE2 machines working.
__attribute__((optimize("no-trapping-math"), target_clones("avx2", "default")))
void exp_sub(float* __restrict x, int64_t n, float sub) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] - sub;
    const float c = v > -87.0f ? v : -87.0f;
    const float t = c * 1.44269504088896341f;
    const float r = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick), |t| < 2^22
    const float f = (c - r * 0.693145751953125f) - r * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);  // not std::bit_cast: under optimize() it is not inlined
    const float y = p * two_n;
    x[j] = v < -87.0f ? 0.0f : y;
  }
}

inline void exp_sub(double* x, int64_t n, double sub) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - sub);
}

// Row max / sum of a score row. Reassociation is allowed here (the order of a sum over one key
// block does not matter at the tolerance of an fp32 softmax), so the reductions vectorise instead
// of running as a 4-cycle-per-element dependency chain.
#define LOTUS_VEC_REDUCE \
  __attribute__((optimize("no-trapping-math", "associative-math", "no-signed-zeros"), \
                 target_clones("avx2", "default")))
// The max is written on GCC vector types: GCC does not vectorise a float max reduction without
// finite-math-only (which the -inf of padded keys rules out), and the scalar vmaxss chain it made
// instead cost more than exp_sub. Two 8-lane accumulators; vector ?: is a compare + blend.
typedef float f32x8 __attribute__((vector_size(32)));
LOTUS_VEC_REDUCE float row_max(const float* x, int64_t n) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  f32x8 m0 = {NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF}, m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    f32x8 a, b;
    std::memcpy(&a, x + j, sizeof a);
    std::memcpy(&b, x + j + 8, sizeof b);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  m0 = m1 > m0 ? m1 : m0;
  float m = NEG_INF;
  for (int w = 0; w < 8; ++w) m = m0[w] > m ? m0[w] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
LOTUS_VEC_REDUCE float row_sum(const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
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

// Whole-row forward, for N <= ROWS_MAX_N: one task per (b, h, query block) as below, but every
// query row sees all its keys at once (a [bq, N] score block, <= 532 KB), so the softmax is
// exact in two passes (row max, then exp and sum) with no online rescaling, and each task is two BLAS
// calls (S = Q K^T, O = P V) instead of two per 128-key block: MKL re-packs its operands on every
// call, which was ~20% of the sgemm time with 128-key blocks. Keys before the first and after the
// last unpadded key are skipped (padding usually sits at the end); padded keys inside get -inf.
// When cls is given, row 0 of the normalised P of each (b, h) is written there ([B, H, N]).
constexpr int64_t ROWS_MAX_N = 2048;

template <typename scalar_t>
void fwd_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
              at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* cls, Dims dm, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = dm.B, H = dm.H, N = dm.N, D = dm.D;
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
      const int64_t bh = t / nqb, i0 = (t % nqb) * bq, b = bh / H;
      const int64_t nq = std::min(bq, N - i0);
      const bool* mb = mask ? mask + b * N : nullptr;
      scalar_t* op = out + (bh * N + i0) * D;
      acc_t* lp = lse + bh * N + i0;
      int64_t jlo = 0, jhi = N;
      if (mb) {
        while (jlo < N && mb[jlo]) ++jlo;
        while (jhi > jlo && mb[jhi - 1]) --jhi;
      }
      if (jlo == jhi) {  // no unpadded key: out = 0, lse = +inf, scores 0
        std::fill(op, op + nq * D, scalar_t(0));
        std::fill(lp, lp + nq, std::numeric_limits<acc_t>::infinity());
        if (cls && i0 == 0) std::fill(cls + bh * N, cls + (bh + 1) * N, acc_t(0));
        continue;
      }
      const int64_t nk = jhi - jlo;
      const acc_t* qf = as_acc(q + (bh * N + i0) * D, qbuf.data(), nq * D);
      const acc_t* kf;
      const acc_t* vf;
      acc_t* o;
      if constexpr (convert) {
        if (converted != bh) {
          as_acc(k + bh * N * D, kbuf.data(), N * D);
          as_acc(v + bh * N * D, vbuf.data(), N * D);
          converted = bh;
        }
        kf = kbuf.data(), vf = vbuf.data(), o = obuf.data();
      } else {
        kf = k + bh * N * D, vf = v + bh * N * D, o = op;
      }
      // S[nq][nk] (stride LS) = scale * Q . K[jlo:jhi]^T
      gemm<acc_t>('T', 'N', nk, nq, D, scale, kf + jlo * D, D, qf, D, acc_t(0), s.data(), LS);
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
      gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), vf + jlo * D, D, s.data(), LS, acc_t(0), o, D);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t d = 0; d < D; ++d) op[i * D + d] = static_cast<scalar_t>(o[i * D + d] * linv[i]);
      if (cls && i0 == 0) {
        acc_t* c = cls + bh * N;
        std::fill(c, c + N, acc_t(0));
        for (int64_t j = 0; j < nk; ++j) c[jlo + j] = s[j] * linv[0];
      }
    }
  });
}

// Blocked forward (online softmax over BK-key blocks), for N > ROWS_MAX_N.
template <typename scalar_t>
void fwd_blocked(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
                 at::opmath_type<scalar_t>* lse, Dims dm, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dm.B, H = dm.H, N = dm.N, D = dm.D;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t nqb = (N + BQ - 1) / BQ;
  // One task per (b, h, query block): the whole pass over keys for BQ queries.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(BQ * D), kbuf(BK * D), vbuf(BK * D), s(BQ * BK), acc(BQ * D), m(BQ), l(BQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * BQ, b = bh / H;
      const int64_t nq = std::min(BQ, N - i0);
      const bool* mb = mask ? mask + b * N : nullptr;
      const acc_t* qf = as_acc(q + (bh * N + i0) * D, qbuf.data(), nq * D);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < N; j0 += BK) {
        const int64_t nk = std::min(BK, N - j0);
        if (mb && std::all_of(mb + j0, mb + j0 + nk, [](bool p) { return p; })) continue;
        const acc_t* kf = as_acc(k + (bh * N + j0) * D, kbuf.data(), nk * D);
        const acc_t* vf = as_acc(v + (bh * N + j0) * D, vbuf.data(), nk * D);
        rows_dot_rows(qf, kf, s.data(), nq, nk, D, scale);
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
        gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), vf, D, s.data(), BK, acc_t(1), acc.data(), D);
      }
      scalar_t* op = out + (bh * N + i0) * D;
      for (int64_t i = 0; i < nq; ++i) {
        const bool empty = l[i] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[i];
        for (int64_t d = 0; d < D; ++d) op[i * D + d] = static_cast<scalar_t>(acc[i * D + d] * inv);
        lse[bh * N + i0 + i] = empty ? std::numeric_limits<acc_t>::infinity() : m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void fwd_impl(const scalar_t* q, const scalar_t* k, const scalar_t* v, const bool* mask, scalar_t* out,
              at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* scores, int64_t mode, Dims dm,
              double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dm.B, H = dm.H, N = dm.N, D = dm.D;
  const acc_t scale = static_cast<acc_t>(scale_d);

  if (N <= ROWS_MAX_N) {
    std::vector<acc_t> cls(mode == 1 ? B * H * N : 0);
    fwd_rows(q, k, v, mask, out, lse, mode == 1 ? cls.data() : nullptr, dm, scale_d);
    if (mode == 1) {
      // "cls": the forward kept row 0 of P per (b, h); average over heads, summed in order.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          acc_t* sc = scores + b * N;
          std::fill(sc, sc + N, acc_t(0));
          for (int64_t h = 0; h < H; ++h) {
            const acc_t* c = cls.data() + (b * H + h) * N;
            for (int64_t j = 0; j < N; ++j) sc[j] += c[j];
          }
          for (int64_t j = 0; j < N; ++j) sc[j] /= static_cast<acc_t>(H);
        }
      });
      return;
    }
  } else {
    fwd_blocked(q, k, v, mask, out, lse, dm, scale_d);
  }

  if (mode == 1) {
    // "cls" (blocked path): row 0 of P per head, averaged over heads. One task per image, heads
    // summed in order.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q0(D);
      for (int64_t b = begin; b < end; ++b) {
        acc_t* sc = scores + b * N;
        std::fill(sc, sc + N, acc_t(0));
        const bool* mb = mask ? mask + b * N : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          for (int64_t d = 0; d < D; ++d) q0[d] = static_cast<acc_t>(q[bh * N * D + d]);
          const acc_t lse0 = lse[bh * N];
          for (int64_t j = 0; j < N; ++j) {
            if (mb && mb[j]) continue;
            const scalar_t* kr = k + (bh * N + j) * D;
            acc_t dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += q0[d] * static_cast<acc_t>(kr[d]);
            sc[j] += std::exp(dot * scale - lse0);
          }
        }
        for (int64_t j = 0; j < N; ++j) sc[j] /= static_cast<acc_t>(H);
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
        const int64_t bh = t / nkb, j0 = (t % nkb) * BK, b = bh / H;
        const int64_t nk = std::min(BK, N - j0);
        const bool* mb = mask ? mask + b * N : nullptr;
        acc_t* cs = colsum.data() + bh * N + j0;
        std::fill(cs, cs + nk, acc_t(0));
        const acc_t* kf = as_acc(k + (bh * N + j0) * D, kbuf.data(), nk * D);
        for (int64_t i0 = 0; i0 < N; i0 += BQ) {
          const int64_t nq = std::min(BQ, N - i0);
          const acc_t* qf = as_acc(q + (bh * N + i0) * D, qbuf.data(), nq * D);
          rows_dot_rows(qf, kf, s.data(), nq, nk, D, scale);
          for (int64_t i = 0; i < nq; ++i) {
            if (mb && mb[i0 + i]) continue;
            acc_t* srow = s.data() + i * BK;
            exp_sub(srow, nk, lse[bh * N + i0 + i]);
            for (int64_t j = 0; j < nk; ++j) cs[j] += srow[j];
          }
        }
        if (mb)
          for (int64_t j = 0; j < nk; ++j) cs[j] = mb[j0 + j] ? acc_t(0) : cs[j];
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      int64_t nvalid = N;
      if (mask) nvalid = N - std::count(mask + b * N, mask + (b + 1) * N, true);
      const acc_t denom = nvalid == 0 ? acc_t(0) : acc_t(1) / static_cast<acc_t>(H * nvalid);
      for (int64_t j = 0; j < N; ++j) {
        acc_t sum = 0;
        for (int64_t h = 0; h < H; ++h) sum += colsum[(b * H + h) * N + j];
        scores[b * N + j] = sum * denom;
      }
    }
  }
}

template <typename scalar_t>
void bwd_impl(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
              const at::opmath_type<scalar_t>* lse, const bool* mask, scalar_t* dq, scalar_t* dk, scalar_t* dv,
              Dims dm, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = dm.H, N = dm.N, D = dm.D;
  const acc_t scale = static_cast<acc_t>(scale_d);
  // One task per (b, h): it owns dk/dv of every key and dq of every query of that head, so all
  // sums run in a fixed order (deterministic) without atomics. Buffers are O(N * D) per task.
  at::parallel_for(0, dm.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf, kbuf, vbuf, dobuf, dqa(N * D), delta(N);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (auto* buf : {&qbuf, &kbuf, &vbuf, &dobuf}) buf->resize(N * D);
    }
    std::vector<acc_t> p(BQ * BK), ds(BQ * BK), dka(BK * D), dva(BK * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t base = bh * N * D, b = bh / H;
      const bool* mb = mask ? mask + b * N : nullptr;
      const acc_t* ls = lse + bh * N;
      const acc_t* qf = as_acc(q + base, qbuf.data(), N * D);
      const acc_t* kf = as_acc(k + base, kbuf.data(), N * D);
      const acc_t* vf = as_acc(v + base, vbuf.data(), N * D);
      const acc_t* dof = as_acc(dout + base, dobuf.data(), N * D);
      std::fill(dqa.begin(), dqa.end(), acc_t(0));
      for (int64_t i = 0; i < N; ++i) {  // delta_i = rowsum(dO * O) = sum_j P_ij dP_ij
        acc_t sum = 0;
        for (int64_t d = 0; d < D; ++d) sum += dof[i * D + d] * static_cast<acc_t>(out[base + i * D + d]);
        delta[i] = sum;
      }
      for (int64_t j0 = 0; j0 < N; j0 += BK) {
        const int64_t nk = std::min(BK, N - j0);
        std::fill(dka.begin(), dka.end(), acc_t(0));
        std::fill(dva.begin(), dva.end(), acc_t(0));
        const bool all_padded = mb && std::all_of(mb + j0, mb + j0 + nk, [](bool x) { return x; });
        for (int64_t i0 = 0; i0 < N && !all_padded; i0 += BQ) {
          const int64_t nq = std::min(BQ, N - i0);
          const acc_t* kb = kf + j0 * D;
          rows_dot_rows(qf + i0 * D, kb, p.data(), nq, nk, D, scale);         // S
          rows_dot_rows(dof + i0 * D, vf + j0 * D, ds.data(), nq, nk, D, acc_t(1));  // dP
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
          gemm<acc_t>('N', 'T', D, nk, nq, acc_t(1), dof + i0 * D, D, p.data(), BK, acc_t(1), dva.data(), D);
          gemm<acc_t>('N', 'T', D, nk, nq, acc_t(1), qf + i0 * D, D, ds.data(), BK, acc_t(1), dka.data(), D);
          gemm<acc_t>('N', 'N', D, nq, nk, acc_t(1), kb, D, ds.data(), BK, acc_t(1), dqa.data() + i0 * D, D);
        }
        for (int64_t e = 0; e < nk * D; ++e) {
          dk[base + j0 * D + e] = static_cast<scalar_t>(dka[e]);
          dv[base + j0 * D + e] = static_cast<scalar_t>(dva[e]);
        }
      }
      for (int64_t e = 0; e < N * D; ++e) dq[base + e] = static_cast<scalar_t>(dqa[e]);
    }
  });
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous(), "attention (cpu): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "attention (cpu): ", name,
              " must match q's shape and dtype");
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->is_contiguous() && mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                  mask->size(0) == q.size(0) && mask->size(1) == q.size(2),
              "attention (cpu): key_padding_mask must be a contiguous bool [B, N] tensor");
  return mask->const_data_ptr<bool>();
}

void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask, double scale, int64_t scores_mode, at::Tensor& out,
                       at::Tensor& lse, at::Tensor& scores) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "attention (cpu): q must be a contiguous [B, H, N, D] tensor");
  check(k, "k", q);
  check(v, "v", q);
  check(out, "out", q);
  const Dims dm{q.size(0), q.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(scores_mode >= 0 && scores_mode <= 2, "attention (cpu): scores_mode must be 0, 1 or 2");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == dm.B * dm.H * dm.N, "attention (cpu): bad lse");
  TORCH_CHECK(scores_mode == 0 || (scores.is_contiguous() && scores.numel() == dm.B * dm.N &&
                                   scores.scalar_type() == lse.scalar_type()),
              "attention (cpu): bad scores");
  const bool* mp = mask_ptr(mask, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "attention (cpu): lse dtype");
    fwd_impl<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), mp,
                       out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(),
                       scores_mode == 0 ? nullptr : scores.mutable_data_ptr<acc_t>(), scores_mode, dm, scale);
  });
}

void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                       double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "attention (cpu): q must be a contiguous [B, H, N, D] tensor");
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) check(*t, name, q);
  for (auto [t, name] : {std::pair{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}) check(*t, name, q);
  const Dims dm{q.size(0), q.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == dm.B * dm.H * dm.N, "attention (cpu): bad lse");
  const bool* mp = mask_ptr(mask, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "attention (cpu): lse dtype");
    bwd_impl<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                       v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), mp,
                       dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                       dv.mutable_data_ptr<scalar_t>(), dm, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lotus_kernels_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
