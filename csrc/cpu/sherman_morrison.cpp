// Sherman-Morrison update of a symmetric inverse, A' = A/a - (s/a) u u^T / (1 + s q)
// with u = A g, q = g^T u, s = b/a (docs/design.md §2.1).
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

// A rank-one update still to be applied to A: A_true = alpha A - c u u^T.
// The deferred op keeps it pending so that the next call can apply it in the
// same pass that computes the next product (one pass over A per update).
template <typename T>
struct Pending {
  T alpha = 1, c = 0;
  const T* u = nullptr;  // null: nothing pending
};

// Adds rows [r0, r1) of the symmetric product into acc. Row i below the
// diagonal feeds u_i (a dot product) and, through the mirrored column, u_j for
// j < i (an axpy), from one load of A. Four rows go together so that each
// load and store of acc serves four rows of A. With a pending update, each
// loaded entry is first updated and written back, and the product uses the
// new values.
template <typename T>
void lower_matvec_rows(T* A, const T* g, int64_t d, int64_t r0, int64_t r1, T* acc, Pending<T> p) {
  using V = Vec<T>;
  constexpr int N = V::kLanes;
  constexpr int R = 4;
  const bool apply = p.u != nullptr;
  const auto valpha = V::broadcast(p.alpha), vc = V::broadcast(p.c);
  auto fresh = [&](T* at, const typename V::type& ui, int64_t j) {
    auto x = V::load(at);
    if (apply) {
      x = x * valpha - vc * (ui * V::load(p.u + j));
      V::store(at, x);
    }
    return x;
  };
  auto fresh1 = [&](T* at, T ui, int64_t j) {
    if (apply) *at = *at * p.alpha - p.c * (ui * p.u[j]);
    return *at;
  };
  int64_t i0 = r0;
  for (; i0 + R <= r1; i0 += R) {
    T* a0 = A + i0 * d;
    T *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
    const auto g0 = V::broadcast(g[i0]), g1 = V::broadcast(g[i0 + 1]);
    const auto g2 = V::broadcast(g[i0 + 2]), g3 = V::broadcast(g[i0 + 3]);
    typename V::type u0{}, u1{}, u2{}, u3{};
    if (apply) {
      u0 = V::broadcast(p.u[i0]), u1 = V::broadcast(p.u[i0 + 1]);
      u2 = V::broadcast(p.u[i0 + 2]), u3 = V::broadcast(p.u[i0 + 3]);
    }
    auto d0 = V::broadcast(0), d1 = d0, d2 = d0, d3 = d0;
    int64_t j = 0;
    for (; j + N <= i0; j += N) {
      const auto gj = V::load(g + j);
      const auto x0 = fresh(a0 + j, u0, j), x1 = fresh(a1 + j, u1, j);
      const auto x2 = fresh(a2 + j, u2, j), x3 = fresh(a3 + j, u3, j);
      d0 += x0 * gj;
      d1 += x1 * gj;
      d2 += x2 * gj;
      d3 += x3 * gj;
      V::store(acc + j, V::load(acc + j) + ((x0 * g0 + x1 * g1) + (x2 * g2 + x3 * g3)));
    }
    const T dots[R] = {V::sum(d0), V::sum(d1), V::sum(d2), V::sum(d3)};
    for (int r = 0; r < R; ++r) {
      T* Ar = A + (i0 + r) * d;
      const T gr = g[i0 + r];
      const T ur = apply ? p.u[i0 + r] : T(0);
      T dot = dots[r];
      for (int64_t k = j; k < i0 + r; ++k) {
        const T x = fresh1(Ar + k, ur, k);
        dot += x * g[k];
        acc[k] += x * gr;
      }
      acc[i0 + r] += dot + fresh1(Ar + i0 + r, ur, i0 + r) * gr;
    }
  }
  for (int64_t i = i0; i < r1; ++i) {
    T* Ai = A + i * d;
    const T gi = g[i];
    const T ui = apply ? p.u[i] : T(0);
    T dot = 0;
    for (int64_t k = 0; k < i; ++k) {
      const T x = fresh1(Ai + k, ui, k);
      dot += x * g[k];
      acc[k] += x * gi;
    }
    acc[i] += dot + fresh1(Ai + i, ui, i) * gi;
  }
}

// Row ranges [bounds[p], bounds[p+1]) holding equal shares of the lower triangle.
inline void triangle_bounds(int64_t d, int64_t (&bounds)[kParts + 1]) {
  for (int64_t p = 0; p <= kParts; ++p) {
    bounds[p] = std::min<int64_t>(d, std::llround(d * std::sqrt(double(p) / kParts)));
  }
  bounds[kParts] = d;
}

template <typename T>
void lower_matvec_partials(T* A, const T* g, int64_t d, T* partials /* kParts x d */,
                           Pending<T> pending = {}) {
  int64_t bounds[kParts + 1];
  triangle_bounds(d, bounds);
  std::fill(partials, partials + kParts * d, T(0));
  at::parallel_for(0, kParts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      lower_matvec_rows(A, g, d, bounds[p], bounds[p + 1], partials + p * d, pending);
    }
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
  // Rows of the triangle grow with i: split them by area, not by count.
  int64_t bounds[kParts + 1];
  for (int64_t p = 0; p <= kParts; ++p) bounds[p] = d * p / kParts;
  if (lower_only) triangle_bounds(d, bounds);
  at::parallel_for(0, kParts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t i = bounds[p0]; i < bounds[p1]; ++i) {
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
                "sherman_morrison_: the denominator 1 + (b/a) g^T A g = ", text(den),
                n > 1 ? " (batch element " + std::to_string(m) + ")" : std::string(),
                " is not positive: A is not positive definite; A was left unchanged");
    coef[m] = static_cast<T>((s / a) / den);
  }
  const T inv_a = static_cast<T>(1.0 / a);
  for (int64_t m = 0; m < n; ++m) {
    rank_one_rows(Ap + m * d * d, u.data() + m * d, d, inv_a, coef[m], lower_only);
  }
}

// pending = [alpha, c, u_1 .. u_d]; "nothing pending" is [1, 0, 0 ...].
template <typename T>
void reset_pending(T* P, int64_t d) {
  std::fill(P, P + d + 2, T(0));
  P[0] = 1;
}

template <typename T>
void deferred_impl(const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g, double a, double b) {
  const int64_t d = A.size(0);
  T* Ap = A.data_ptr<T>();
  T* P = pending.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  std::vector<T> partials(kParts * d), v(d);
  const bool has_pending = !(P[0] == T(1) && P[1] == T(0));
  const Pending<T> old{P[0], P[1], has_pending ? P + 2 : nullptr};
  lower_matvec_partials(Ap, gp, d, partials.data(), old);
  sum_partials(partials.data(), d, v.data());
  // The pending update is in A now: whatever follows, the pair (A, pending)
  // must say so before anything can throw.
  reset_pending(P, d);
  double q = 0;
  for (int64_t i = 0; i < d; ++i) q += double(gp[i]) * double(v[i]);
  const double s = b / a;
  const double den = 1.0 + s * q;
  TORCH_CHECK(std::isfinite(den) && den > 0.0, "sherman_morrison_deferred_: the denominator 1 + (b/a) g^T A g = ",
              text(den), " is not positive: A is not positive definite; the state was left unchanged");
  P[0] = static_cast<T>(1.0 / a);
  P[1] = static_cast<T>((s / a) / den);
  std::copy(v.begin(), v.end(), P + 2);
}

template <typename T>
void apply_pending_impl(const at::Tensor& A, const at::Tensor& pending) {
  const int64_t d = A.size(0);
  T* P = pending.data_ptr<T>();
  if (!(P[0] == T(1) && P[1] == T(0))) rank_one_rows(A.data_ptr<T>(), P + 2, d, P[0], P[1], /*lower_only=*/true);
  reset_pending(P, d);
}

}  // namespace

at::Tensor symmetric_matvec(const at::Tensor& A, const at::Tensor& v) {
  const int64_t d = A.size(0);
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::empty({d}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "symmetric_matvec", [&] {
    std::vector<scalar_t> partials(kParts * d);
    // Read-only here: the product kernel writes A only when handed a pending update.
    lower_matvec_partials(const_cast<scalar_t*>(A.data_ptr<scalar_t>()), vc.data_ptr<scalar_t>(), d,
                          partials.data());
    sum_partials(partials.data(), d, out.data_ptr<scalar_t>());
  });
  return out;
}

void sherman_morrison_deferred_(const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g, double a,
                                double b) {
  const at::Tensor gc = g.contiguous();
  check_finite("sherman_morrison_deferred_", "g", gc);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sherman_morrison_deferred_", [&] {
    deferred_impl<scalar_t>(A, pending, gc, a, b);
  });
}

void apply_pending_(const at::Tensor& A, const at::Tensor& pending) {
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "apply_pending_", [&] { apply_pending_impl<scalar_t>(A, pending); });
  symmetrize_(A);
}

void sherman_morrison_(const at::Tensor& A, const at::Tensor& g, double a, double b, bool lower_only) {
  const at::Tensor gc = g.contiguous();
  check_finite("sherman_morrison_", "g", gc);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sherman_morrison_", [&] {
    sherman_morrison_impl<scalar_t>(A, gc, a, b, lower_only);
  });
}

}  // namespace nhgd::cpu
