// Sherman-Morrison update of a symmetric inverse, A' = A/a - (s/a) u u^T / (1 + s q)
// with u = A g, q = g^T u, s = b/a (DESIGN.md §2.1).
//
// The eager composition (A @ g, then addr_) moves 3 d^2 numbers. Here the
// product reads only the lower triangle (d^2/2: each entry below the diagonal
// serves row i and, mirrored, row j), and the update is one streaming
// read-modify-write of A (2 d^2), or of its lower triangle alone (d^2) when the
// caller keeps only that triangle current and mirrors it on demand.
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace nhgd::cpu {
namespace {

// The product u = A g is split into a fixed number of row ranges with equal
// shares of the triangle. Each range keeps its own partial sums, and the
// partials are added in a fixed order, so the result does not depend on the
// number of threads.
constexpr int64_t kParts = 8;

// Adds rows [r0, r1) of the symmetric product into acc. Row i below the
// diagonal feeds u_i (a dot product) and, through the mirrored column, u_j for
// j < i (an axpy), from one load of A. Four rows go together so that each
// load and store of acc serves four rows of A.
template <typename T>
void lower_matvec_rows(const T* A, const T* g, int64_t d, int64_t r0, int64_t r1, T* acc) {
  using V = Vec<T>;
  constexpr int N = V::kLanes;
  constexpr int R = 4;
  int64_t i0 = r0;
  for (; i0 + R <= r1; i0 += R) {
    const T* a0 = A + i0 * d;
    const T *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
    const auto g0 = V::broadcast(g[i0]), g1 = V::broadcast(g[i0 + 1]);
    const auto g2 = V::broadcast(g[i0 + 2]), g3 = V::broadcast(g[i0 + 3]);
    auto d0 = V::broadcast(0), d1 = d0, d2 = d0, d3 = d0;
    int64_t j = 0;
    for (; j + N <= i0; j += N) {
      const auto gj = V::load(g + j);
      const auto x0 = V::load(a0 + j), x1 = V::load(a1 + j), x2 = V::load(a2 + j), x3 = V::load(a3 + j);
      d0 += x0 * gj;
      d1 += x1 * gj;
      d2 += x2 * gj;
      d3 += x3 * gj;
      V::store(acc + j, V::load(acc + j) + ((x0 * g0 + x1 * g1) + (x2 * g2 + x3 * g3)));
    }
    const T dots[R] = {V::sum(d0), V::sum(d1), V::sum(d2), V::sum(d3)};
    for (int r = 0; r < R; ++r) {
      const T* Ar = A + (i0 + r) * d;
      const T gr = g[i0 + r];
      T dot = dots[r];
      for (int64_t k = j; k < i0 + r; ++k) {
        dot += Ar[k] * g[k];
        acc[k] += Ar[k] * gr;
      }
      acc[i0 + r] += dot + Ar[i0 + r] * gr;
    }
  }
  for (int64_t i = i0; i < r1; ++i) {
    const T* Ai = A + i * d;
    const T gi = g[i];
    T dot = 0;
    for (int64_t k = 0; k < i; ++k) {
      dot += Ai[k] * g[k];
      acc[k] += Ai[k] * gi;
    }
    acc[i] += dot + Ai[i] * gi;
  }
}

template <typename T>
void lower_matvec_partials(const T* A, const T* g, int64_t d, T* partials /* kParts x d */) {
  int64_t bounds[kParts + 1];
  for (int64_t p = 0; p <= kParts; ++p) {
    bounds[p] = std::min<int64_t>(d, std::llround(d * std::sqrt(double(p) / kParts)));
  }
  bounds[kParts] = d;
  std::fill(partials, partials + kParts * d, T(0));
  at::parallel_for(0, kParts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) lower_matvec_rows(A, g, d, bounds[p], bounds[p + 1], partials + p * d);
  });
}

template <typename T>
void sum_partials(const T* partials, int64_t d, T* u) {
  for (int64_t i = 0; i < d; ++i) {
    T s = 0;
    for (int64_t p = 0; p < kParts; ++p) s += partials[p * d + i];
    u[i] = s;
  }
}

// The new value of one block of N entries of row i. Every entry of A, on
// either side of the diagonal and in the ragged tail of a row alike, goes
// through this one expression; since u_i u_j == u_j u_i exactly, entries
// (i, j) and (j, i) of a symmetric A stay bitwise equal whatever the compiler
// contracts into FMAs.
template <typename T>
inline typename Vec<T>::type updated(typename Vec<T>::type a_ij, typename Vec<T>::type u_j,
                                     typename Vec<T>::type u_i, typename Vec<T>::type inv_a,
                                     typename Vec<T>::type c) {
  return a_ij * inv_a - c * (u_i * u_j);
}

// A_ij <- A_ij / a - c u_i u_j, row by row: a sequential read-modify-write that
// the hardware prefetchers stream at full bandwidth. With `lower_only`, only
// j <= i (half the traffic; the upper triangle is left for `symmetrize_`).
template <typename T>
void rank_one_rows(T* A, const T* u, int64_t d, T inv_a, T c, bool lower_only) {
  using V = Vec<T>;
  constexpr int N = V::kLanes;
  const auto vinv = V::broadcast(inv_a), vc = V::broadcast(c);
  at::parallel_for(0, d, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* Ai = A + i * d;
      const auto vui = V::broadcast(u[i]);
      const int64_t end = lower_only ? i + 1 : d;
      int64_t j = 0;
      for (; j + N <= end; j += N) {
        V::store(Ai + j, updated<T>(V::load(Ai + j), V::load(u + j), vui, vinv, vc));
      }
      if (j < end) {
        T a_tail[N] = {}, u_tail[N] = {}, out[N];
        std::copy(Ai + j, Ai + end, a_tail);
        std::copy(u + j, u + end, u_tail);
        V::store(out, updated<T>(V::load(a_tail), V::load(u_tail), vui, vinv, vc));
        std::copy(out, out + (end - j), Ai + j);
      }
    }
  });
}

template <typename T>
void sherman_morrison_impl(const at::Tensor& A, const at::Tensor& g, double a, double b, bool lower_only) {
  const int64_t d = A.size(-1);
  const int64_t n = A.dim() == 3 ? A.size(0) : 1;
  T* Ap = A.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  std::vector<T> u(n * d), coef(n), partials(kParts * d);
  const double s = b / a;
  // Every denominator is checked before the first write, so a failure anywhere
  // in a batch leaves all of A as it was.
  for (int64_t m = 0; m < n; ++m) {
    lower_matvec_partials(Ap + m * d * d, gp + m * d, d, partials.data());
    T* um = u.data() + m * d;
    sum_partials(partials.data(), d, um);
    double q = 0;
    for (int64_t i = 0; i < d; ++i) q += double(gp[m * d + i]) * double(um[i]);
    const double den = 1.0 + s * q;
    TORCH_CHECK(std::isfinite(den) && den > 0.0,
                "sherman_morrison_: the denominator 1 + (b/a) g^T A g = ", den,
                n > 1 ? " (batch element " + std::to_string(m) + ")" : std::string(),
                " is not positive: A is not positive definite; A was left unchanged");
    coef[m] = static_cast<T>((s / a) / den);
  }
  const T inv_a = static_cast<T>(1.0 / a);
  for (int64_t m = 0; m < n; ++m) {
    rank_one_rows(Ap + m * d * d, u.data() + m * d, d, inv_a, coef[m], lower_only);
  }
}

}  // namespace

void sherman_morrison_(const at::Tensor& A, const at::Tensor& g, double a, double b, bool lower_only) {
  const at::Tensor gc = g.contiguous();
  check_finite("sherman_morrison_", "g", gc);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sherman_morrison_", [&] {
    sherman_morrison_impl<scalar_t>(A, gc, a, b, lower_only);
  });
}

}  // namespace nhgd::cpu
