#include "checks.h"

#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>

namespace nhgd {
namespace {

bool is_float_state_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}

// A state tensor the kernels update in place: float32/float64, contiguous,
// square in its last two dimensions, 2-D (or 3-D when batches are allowed).
void check_square_state(const char* op, const char* name, const at::Tensor& A, bool allow_batch) {
  TORCH_CHECK_VALUE(A.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_VALUE(is_float_state_dtype(A.scalar_type()), op, ": argument '", name,
                    "' must be float32 or float64, got ", A.scalar_type());
  const bool rank_ok = A.dim() == 2 || (allow_batch && A.dim() == 3);
  TORCH_CHECK_VALUE(rank_ok, op, ": argument '", name, "' must be ",
                    allow_batch ? "a d x d matrix or an n x d x d batch" : "a d x d matrix",
                    ", got shape ", text(A.sizes()));
  TORCH_CHECK_VALUE(A.size(-1) == A.size(-2), op, ": argument '", name,
                    "' must be square, got shape ", text(A.sizes()));
  TORCH_CHECK_VALUE(A.size(-1) >= 1, op, ": argument '", name, "' must have d >= 1, got shape ",
                    text(A.sizes()));
  TORCH_CHECK_VALUE(A.is_contiguous(), op, ": argument '", name,
                    "' must be contiguous (it is updated in place)");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* state_name,
                const at::Tensor& state) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_VALUE(t.scalar_type() == state.scalar_type(), op, ": argument '", name,
                    "' must have the dtype of '", state_name, "' (", state.scalar_type(), "), got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == state.device(), op, ": argument '", name,
                    "' must be on the device of '", state_name, "' (", state.device(), "), got ",
                    t.device());
}

void check_status(const char* op, const std::optional<at::Tensor>& status, const at::Tensor& state) {
  if (!status.has_value()) return;
  const at::Tensor& s = *status;
  TORCH_CHECK_VALUE(s.defined(), op, ": argument 'status' is undefined");
  TORCH_CHECK_VALUE(s.scalar_type() == at::kInt && s.numel() == 1, op,
                    ": argument 'status' must be an int32 tensor with one element, got ",
                    s.scalar_type(), " of shape ", text(s.sizes()));
  TORCH_CHECK_VALUE(s.device() == state.device(), op, ": argument 'status' must be on ",
                    state.device(), ", got ", s.device());
}

void check_coeff_value(const char* op, const char* name, double v, bool strictly_positive) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": argument '", name, "' must be finite, got ", text(v));
  if (strictly_positive) {
    TORCH_CHECK_VALUE(v > 0.0, op, ": argument '", name, "' must be > 0, got ", text(v));
  } else {
    TORCH_CHECK_VALUE(v >= 0.0, op, ": argument '", name, "' must be >= 0, got ", text(v));
  }
}

void check_list_sizes(const char* op, at::TensorList first, const char* first_name,
                      at::TensorList other, const char* other_name) {
  TORCH_CHECK_VALUE(first.size() == other.size(), op, ": argument '", other_name, "' has ",
                    text(other.size()), " tensors but '", first_name, "' has ", text(first.size()));
}

}  // namespace

Coeff host_coeff(const char* op, const char* name, double value, bool strictly_positive) {
  check_coeff_value(op, name, value, strictly_positive);
  return Coeff{value, std::nullopt};
}

Coeff tensor_coeff(const char* op, const char* name, const at::Tensor& t, const at::Tensor& state,
                   bool strictly_positive) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_VALUE(t.dim() == 0, op, ": argument '", name,
                    "' must be a Python float or a 0-d tensor, got shape ", text(t.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": argument '", name,
                    "' must be a floating-point tensor, got ", t.scalar_type());
  if (t.device().is_cpu()) {
    // Reading a host scalar costs no device sync, so it is checked like a float.
    return host_coeff(op, name, t.item<double>(), strictly_positive);
  }
  TORCH_CHECK_VALUE(t.device() == state.device(), op, ": argument '", name,
                    "' must be on the CPU or on the device of the state (", state.device(),
                    "), got ", t.device());
  return Coeff{0.0, t.to(state.scalar_type())};
}

void check_sherman_morrison_args(const at::Tensor& A, const at::Tensor& g,
                                 const std::optional<at::Tensor>& status) {
  const char* op = "sherman_morrison_";
  check_square_state(op, "A", A, /*allow_batch=*/true);
  check_like(op, "g", g, "A", A);
  const auto expected = A.sizes().slice(0, A.dim() - 1);
  TORCH_CHECK_VALUE(g.sizes() == expected, op, ": argument 'g' must have shape ", text(expected),
                    " to match A of shape ", text(A.sizes()), ", got ", text(g.sizes()));
  check_status(op, status, A);
}

void check_woodbury_args(const at::Tensor& A, const at::Tensor& H,
                         const std::optional<at::Tensor>& status) {
  const char* op = "woodbury_";
  check_square_state(op, "A", A, /*allow_batch=*/true);
  check_like(op, "H", H, "A", A);
  TORCH_CHECK_VALUE(H.dim() == A.dim(), op, ": argument 'H' must be ",
                    A.dim() == 2 ? "a k x d matrix" : "an n x k x d batch", " to match A of shape ",
                    text(A.sizes()), ", got shape ", text(H.sizes()));
  const bool batch_ok = A.dim() == 2 || H.size(0) == A.size(0);
  TORCH_CHECK_VALUE(batch_ok && H.size(-1) == A.size(-1) && H.size(-2) >= 1, op,
                    ": argument 'H' must have shape [", A.dim() == 3 ? "n, " : "", "k >= 1, ",
                    text(A.size(-1)), "] to match A of shape ", text(A.sizes()), ", got ", text(H.sizes()));
  check_status(op, status, A);
}

void check_kfac_update_args(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts,
                            at::TensorList grads, const std::optional<at::Tensor>& status) {
  const char* op = "kfac_update_";
  TORCH_CHECK_VALUE(!S_inv.empty(), op, ": argument 'S_inv' must hold at least one layer");
  check_list_sizes(op, S_inv, "S_inv", G_inv, "G_inv");
  check_list_sizes(op, S_inv, "S_inv", acts, "acts");
  check_list_sizes(op, S_inv, "S_inv", grads, "grads");
  for (size_t i = 0; i < S_inv.size(); ++i) {
    check_square_state(op, "S_inv", S_inv[i], /*allow_batch=*/false);
    check_square_state(op, "G_inv", G_inv[i], /*allow_batch=*/false);
    check_like(op, "G_inv", G_inv[i], "S_inv", S_inv[0]);
    check_like(op, "S_inv", S_inv[i], "S_inv", S_inv[0]);
    check_like(op, "acts", acts[i], "S_inv", S_inv[i]);
    check_like(op, "grads", grads[i], "G_inv", G_inv[i]);
    TORCH_CHECK_VALUE(acts[i].dim() == 2 && acts[i].size(1) == S_inv[i].size(0) && acts[i].size(0) >= 1,
                      op, ": argument 'acts' [layer ", text(i), "] must have shape [n >= 1, ",
                      text(S_inv[i].size(0)), "] to match S_inv, got ", text(acts[i].sizes()));
    TORCH_CHECK_VALUE(grads[i].dim() == 2 && grads[i].size(1) == G_inv[i].size(0) && grads[i].size(0) >= 1,
                      op, ": argument 'grads' [layer ", text(i), "] must have shape [m >= 1, ",
                      text(G_inv[i].size(0)), "] to match G_inv, got ", text(grads[i].sizes()));
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!S_inv[i].is_same(S_inv[j]) && !G_inv[i].is_same(G_inv[j]) &&
                            !S_inv[i].is_same(G_inv[j]) && !G_inv[i].is_same(S_inv[j]),
                        op, ": arguments 'S_inv'/'G_inv' must not repeat a tensor (layers ", text(j),
                        " and ", text(i), ")");
    }
    TORCH_CHECK_VALUE(!S_inv[i].is_same(G_inv[i]), op,
                      ": arguments 'S_inv' and 'G_inv' must be different tensors (layer ", text(i), ")");
  }
  check_status(op, status, S_inv[0]);
}

void check_kfac_apply_args(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V) {
  const char* op = "kfac_apply";
  check_list_sizes(op, S_inv, "S_inv", G_inv, "G_inv");
  check_list_sizes(op, S_inv, "S_inv", V, "V");
  for (size_t i = 0; i < S_inv.size(); ++i) {
    TORCH_CHECK_VALUE(S_inv[i].defined() && S_inv[i].dim() == 2 && S_inv[i].size(0) == S_inv[i].size(1),
                      op, ": argument 'S_inv' [layer ", text(i), "] must be a square matrix");
    TORCH_CHECK_VALUE(G_inv[i].defined() && G_inv[i].dim() == 2 && G_inv[i].size(0) == G_inv[i].size(1),
                      op, ": argument 'G_inv' [layer ", text(i), "] must be a square matrix");
    TORCH_CHECK_VALUE(is_float_state_dtype(S_inv[i].scalar_type()), op,
                      ": argument 'S_inv' must be float32 or float64, got ", S_inv[i].scalar_type());
    check_like(op, "G_inv", G_inv[i], "S_inv", S_inv[i]);
    check_like(op, "V", V[i], "S_inv", S_inv[i]);
    TORCH_CHECK_VALUE(V[i].dim() == 2 && V[i].size(0) == G_inv[i].size(0) && V[i].size(1) == S_inv[i].size(0),
                      op, ": argument 'V' [layer ", text(i), "] must have shape [", text(G_inv[i].size(0)), ", ",
                      text(S_inv[i].size(0)), "], got ", text(V[i].sizes()));
  }
}

void check_running_average_args(const at::Tensor& L, const at::Tensor& B,
                                const std::optional<at::Tensor>& status) {
  const char* op = "running_average_";
  TORCH_CHECK_VALUE(L.defined(), op, ": argument 'L' is undefined");
  TORCH_CHECK_VALUE(is_float_state_dtype(L.scalar_type()), op,
                    ": argument 'L' must be float32 or float64, got ", L.scalar_type());
  TORCH_CHECK_VALUE(L.is_contiguous(), op, ": argument 'L' must be contiguous (it is updated in place)");
  check_like(op, "B", B, "L", L);
  TORCH_CHECK_VALUE(B.sizes() == L.sizes(), op, ": argument 'B' must have the shape of L ", text(L.sizes()),
                    ", got ", text(B.sizes()));
  check_status(op, status, L);
}

void check_symmetrize_args(const at::Tensor& A) {
  check_square_state("symmetrize_", "A", A, /*allow_batch=*/true);
}

namespace {

// x - x is 0 for finite x and NaN for an infinity or a NaN, so one vectorized
// read of the data answers the question (at::isfinite(t).all() makes several
// passes and allocates a mask as large as t).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using V = cpu::Vec<T>;
  constexpr int N = V::kLanes;
  auto acc = V::broadcast(0);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto x = V::load(p + i);
    acc += x - x;
  }
  T tail = 0;
  for (; i < n; ++i) tail += p[i] - p[i];
  return V::sum(acc) + tail == T(0);
}

}  // namespace

void check_symmetric_matvec_args(const at::Tensor& A, const at::Tensor& v) {
  const char* op = "symmetric_matvec";
  check_square_state(op, "A", A, /*allow_batch=*/false);
  check_like(op, "v", v, "A", A);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == A.size(0), op, ": argument 'v' must have shape [", text(A.size(0)),
                    "] to match A, got ", text(v.sizes()));
}

void check_pending_args(const char* op, const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g) {
  check_square_state(op, "A", A, /*allow_batch=*/false);
  check_like(op, "pending", pending, "A", A);
  TORCH_CHECK_VALUE(pending.dim() == 1 && pending.size(0) == A.size(0) + 2 && pending.is_contiguous(), op,
                    ": argument 'pending' must be a contiguous vector of d + 2 = ", text(A.size(0) + 2),
                    " entries, got shape ", text(pending.sizes()));
  if (!g.defined()) return;
  check_like(op, "g", g, "A", A);
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == A.size(0), op, ": argument 'g' must have shape [", text(A.size(0)),
                    "] to match A, got ", text(g.sizes()));
}

std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

std::string text(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

bool all_finite(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu(), "all_finite reads values: host tensors only");
  const at::Tensor c = t.contiguous();
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
      if (!all_finite(p + i0, i1 - i0)) finite = false;
    });
  });
  return finite.load();
}

void check_finite(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(all_finite(t), op, ": argument '", name, "' contains NaN or infinite values");
}

}  // namespace nhgd
