#include "curvature/dense_efim.h"

#include "checks.h"  // all_finite(), text()

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

namespace nhgd::curvature {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The operators as the dispatcher has them: the same CPU or CUDA kernel that
// torch.ops.nhgd_ext.* runs from Python. The C++ types below are not a second
// copy of the schemas to keep in step: typed<>() checks them against the
// kernels' registered signatures, so a drift fails at the first update.
const auto& sherman_morrison_deferred_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nhgd_ext::sherman_morrison_deferred_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                         const OptionalTensor&)>();
  return op;
}

const auto& woodbury_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nhgd_ext::woodbury_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, double, const OptionalTensor&)>();
  return op;
}

const auto& symmetrize_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nhgd_ext::symmetrize_", "")
                             .typed<void(const at::Tensor&)>();
  return op;
}

const auto& apply_pending_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nhgd_ext::apply_pending_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// floor(sqrt(n)), exactly (the Python twin uses math.isqrt).
int64_t integer_sqrt(int64_t n) {
  auto r = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (r * r > n) --r;
  while ((r + 1) * (r + 1) <= n) ++r;
  return r;
}

// Errors that say the arguments were wrong (Python's ValueError, TypeError,
// ...) as opposed to a kernel finding the state no longer definite.
bool is_argument_error(const c10::Error& e) {
  return dynamic_cast<const c10::ValueError*>(&e) || dynamic_cast<const c10::TypeError*>(&e) ||
         dynamic_cast<const c10::IndexError*>(&e) || dynamic_cast<const c10::NotImplementedError*>(&e);
}

}  // namespace

DenseEFIM::DenseEFIM(int64_t dim, std::optional<double> beta, double damping, double refresh_below,
                     at::ScalarType dtype, at::Device device, std::optional<at::Tensor> status)
    : dim_(dim),
      beta_(beta),
      damping_(damping),
      refresh_below_(refresh_below),
      options_(at::TensorOptions().dtype(dtype).device(device)),
      status_(std::move(status)) {
  reset();
}

at::Tensor DenseEFIM::empty_pending() const {
  at::Tensor pending = at::zeros({dim_ + 2}, options_);
  pending[0] = 1;
  return pending;
}

void DenseEFIM::reset() {
  at::NoGradGuard no_grad;
  A_ = at::eye(dim_, options_) / damping_;
  pending_ = empty_pending();
  // float64 whatever the state's dtype: every refresh rebuilds the inverse from
  // F, so its rounding must not accumulate.
  F_ = at::zeros({dim_, dim_}, options_.dtype(at::kDouble));
  buffered_rows_.clear();
  buffered_weights_.clear();
  scale_ = 1.0;
  num_updates_ = num_samples_ = num_refreshes_ = last_rows_ = 0;
  L_ = at::Tensor();
  set_gram_rows(std::max<int64_t>(2, (dim_ + 9 * kAssumedStepsPerSolve - 1) / (9 * kAssumedStepsPerSolve)));
  mu_ = damping_;
}

void DenseEFIM::set_gram_rows(int64_t rows) {
  gram_rows_ = rows;
}

void DenseEFIM::set_counters(int64_t num_updates, int64_t num_samples, int64_t num_refreshes, double mu) {
  num_updates_ = num_updates;
  num_samples_ = num_samples;
  num_refreshes_ = num_refreshes;
  mu_ = mu;
  L_ = at::Tensor();
  buffered_rows_.clear();
  buffered_weights_.clear();
  scale_ = 1.0;
}

DenseEFIM::Coefficients DenseEFIM::coefficients(int64_t k, bool per_step) const {
  const double n = static_cast<double>(num_samples_);
  if (per_step && beta_) return {*beta_, std::vector<double>(k, (1.0 - *beta_) / static_cast<double>(k))};
  if (!beta_) {
    if (num_samples_ == 0) return {1.0, std::vector<double>(k, 1.0 / static_cast<double>(k))};
    return {n / (n + k), std::vector<double>(k, 1.0 / (n + k))};
  }
  const double beta = *beta_;
  std::vector<double> weights(k);
  for (int64_t i = 0; i < k; ++i) weights[i] = (1.0 - beta) * std::pow(beta, static_cast<double>(k - 1 - i));
  return {std::pow(beta, static_cast<double>(k)), std::move(weights)};  // the last row is the newest
}

at::Tensor DenseEFIM::rows(const char* name, const at::Tensor& x, int64_t ndim) const {
  TORCH_CHECK_VALUE(x.defined(), "DenseEFIM: argument '", name, "' must be a tensor");
  if (x.dim() != ndim || x.size(-1) != dim_ || x.numel() == 0) {
    const std::string want = ndim == 1 ? "[" + text(dim_) + "]" : "[k >= 1, " + text(dim_) + "]";
    TORCH_CHECK_VALUE(false, "DenseEFIM: argument '", name, "' must have shape ", want, ", got ", text(x.sizes()));
  }
  TORCH_CHECK_VALUE(x.is_floating_point(), "DenseEFIM: argument '", name, "' must be a floating-point tensor, got ",
                    c10::toString(x.scalar_type()));
  at::Tensor out = x.detach().to(options_);
  const bool finite = out.is_cpu() ? all_finite(out) : at::isfinite(out).all().item<bool>();
  TORCH_CHECK_VALUE(finite, "DenseEFIM: argument '", name, "' contains NaN or infinite values; the state is unchanged");
  return out;
}

void DenseEFIM::update(const at::Tensor& g, int64_t batch_size) {
  at::NoGradGuard no_grad;
  at::Tensor x = rows("g", g, 1);
  if (batch_size != 1) x = x * std::sqrt(static_cast<double>(batch_size));
  const Coefficients c = coefficients(1, false);
  const double a = c.a, b = c.weights[0];
  fold_in(x.reshape({1, -1}), a, b, [&] { sherman_morrison_deferred_op().call(A_, pending_, x, a, b, status_); });
}

void DenseEFIM::update_many(const at::Tensor& G, bool per_step) {
  at::NoGradGuard no_grad;
  const at::Tensor X = rows("G", G, 2);
  const int64_t k = X.size(0);
  const Coefficients c = coefficients(k, per_step);
  // rows scaled by the square roots of their weights, for the in-place update
  const auto woodbury = [&](const at::Tensor& H) {
    flush();
    woodbury_op().call(A_, H, c.a, status_);
  };
  const auto scaled = [&] { return X * at::tensor(c.weights, at::kDouble).sqrt().to(options_).unsqueeze(1); };
  if (k < kFoldRows) {
    const at::Tensor H = scaled();
    fold_in(H, c.a, 1.0, [&] { woodbury(H); });
    return;
  }
  // Enough rows for a fold of their own: they reach F now, in one GEMM of
  // the state's dtype (no float64 copy to buffer), after the in-place update
  // if it runs at all.
  update_in_place(c.a, k, [&] { woodbury(scaled()); });
  fold();
  if (c.a != 1.0) F_.mul_(c.a);
  add_rows(X, at::tensor(c.weights, at::kDouble).to(F_.device()));
  advance(c.a, k);
  if (k >= gram_rows_ && dim_ <= kFactorizeRowsFactor * k) factorize();
}

// Applies the in-place update of the inverse for a step of k rows. No
// factorization runs here, whatever happens: an update that would take the
// inverse's damping below refresh_below * damping, that has too many rows to
// pay in place, or that the kernel refuses (the float32 state lost
// definiteness) leaves the inverse stale, and the next solve rebuilds it.
template <typename Update>
void DenseEFIM::update_in_place(double a, int64_t k, Update&& update) {
  bool stale = goes_stale(a, k);
  if (!stale) {
    try {
      update();
    } catch (const c10::Error& e) {
      if (is_argument_error(e)) throw;
      stale = true;
    }
  }
  if (stale) mu_ = 0.0;
}

// The in-place update, then the rows recorded for F.
template <typename Update>
void DenseEFIM::fold_in(const at::Tensor& rows, double a, double weight, Update&& update) {
  update_in_place(a, rows.size(0), std::forward<Update>(update));
  remember(rows, a, weight);
  advance(a, rows.size(0));
}

void DenseEFIM::remember(const at::Tensor& rows, double a, double weight) {
  // A refresh_below near zero leaves F_'s scale pending for long: the rows'
  // weights (divided by it) must not overflow.
  if (scale_ < kRescaleBelow) fold();
  scale_ *= a;
  // a copy even when the rows are float64 already: F must not see the caller's
  // later writes to the tensor it passed
  buffered_rows_.push_back(rows.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true));
  buffered_weights_.insert(buffered_weights_.end(), rows.size(0), weight / scale_);
  if (static_cast<int64_t>(buffered_weights_.size()) >= kFoldRows) add_buffered_rows();
}

// F_ += X^T diag(w) X over its lower triangle, the products in X's dtype
// (w: float64, on F_'s device).
void DenseEFIM::add_rows(const at::Tensor& X, const at::Tensor& w) {
  // X^T (w X): scaling the rows of X is one contiguous pass (X^T scaled by
  // columns is a strided one, several times slower)
  const at::Tensor Xw = X * w.to(X.scalar_type()).unsqueeze(1);
  // Row strips of the lower triangle. Strip j = 1..S ends at row
  // floor(d sqrt(j / S)): the strips have about equal areas.
  int64_t start = 0;
  for (int64_t j = 1; j <= kFoldStrips; ++j) {
    const int64_t end = integer_sqrt(dim_ * dim_ * j / kFoldStrips);
    if (end > start) {
      at::Tensor strip = F_.narrow(0, start, end - start).narrow(1, 0, end);
      const at::Tensor left = X.narrow(1, start, end - start).mT(), right = Xw.narrow(1, 0, end);
      if (X.scalar_type() == at::kDouble) {
        strip.addmm_(left, right);
      } else {
        strip.add_(at::mm(left, right));
      }
    }
    start = end;
  }
}

// The buffered rows into F_. F_'s own scaling waits in scale_: MKL's GEMM
// applies a beta != 1 in a separate pass over its output, which cost as
// much as a third of the fold.
void DenseEFIM::add_buffered_rows() {
  at::NoGradGuard no_grad;
  if (buffered_rows_.empty()) return;
  add_rows(at::cat(buffered_rows_), at::tensor(buffered_weights_, at::kDouble).to(F_.device()));
  buffered_rows_.clear();
  buffered_weights_.clear();
}

void DenseEFIM::fold() {
  add_buffered_rows();
  if (scale_ != 1.0) F_.mul_(scale_);
  scale_ = 1.0;
}

void DenseEFIM::advance(double a, int64_t k) {
  ++num_updates_;
  num_samples_ += k;
  last_rows_ = k;
  L_ = at::Tensor();
  mu_ *= a;
}

at::Tensor DenseEFIM::damped_fisher() {
  fold();
  at::Tensor D = F_.clone();  // only its lower triangle is current
  symmetrize_op().call(D);
  D.diagonal().add_(damping_);
  return D;
}

void DenseEFIM::factorize() {
  at::NoGradGuard no_grad;
  L_ = at::linalg_cholesky(damped_fisher());
  ++num_refreshes_;
}

void DenseEFIM::refresh() {
  const at::Tensor L = at::linalg_cholesky(damped_fisher());
  at::Tensor inv = at::cholesky_inverse(L).contiguous();  // LAPACK may hand it back column-major
  symmetrize_op().call(inv);  // exactly symmetric
  A_.copy_(inv);
  pending_.copy_(empty_pending());
  mu_ = damping_;
  ++num_refreshes_;
}

void DenseEFIM::flush() { apply_pending_op().call(A_, pending_); }

}  // namespace nhgd::curvature
