// The state and update rules of nhgd_ext.curvature.DenseEFIM in C++, so that
// a pipeline's consumer thread can apply an update without the Python
// interpreter (and without waiting for the GIL the producer's training loop
// holds). nhgd_ext/curvature/dense.py documents the math; the Python class
// keeps its arguments, read-outs and state_dict, and delegates the updates
// here. nhgd_ext/curvature/_dense_reference.py is the same object in pure
// PyTorch, for the reference backend and as the test's yardstick.
//
// Every kernel is reached through the dispatcher (torch.ops.nhgd_ext.*), so
// one object serves CPU and CUDA state alike.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace nhgd::curvature {

class DenseEFIM {
 public:
  // Rows wait in a buffer (float64 copies) and reach the float64 Fisher per
  // this many; a step of at least this many reaches it at once, its products
  // in the state's dtype. Either way in
  // kFoldStrips GEMMs over the lower triangle (F is symmetric: only its lower
  // triangle is kept current). Few rows per fold keep each fold short (at
  // d = 1024 about four updates' time, not fifteen), so a pipeline's few
  // slots absorb the delay it gives the consumer.
  static constexpr int64_t kFoldRows = 16;
  static constexpr int64_t kFoldStrips = 4;
  // F's scale waits in scale_ (see there) until it falls below this.
  static constexpr double kRescaleBelow = 1e-30;
  // A step of at least gram_rows() rows is not applied to the inverse in
  // place: it is added to F, and F + damping I is factorized instead. A
  // Woodbury update of k rows costs about 4 k d^2, the Gram update k d^2,
  // and one factorization, d^3 / 3, serves every step before the next solve:
  // in place pays while k < d / (9 T), T the steps per solve. DenseEFIM
  // (dense.py) sets it from the steps it sees between solves; until the
  // first, T = kAssumedStepsPerSolve. A single row always goes in place: the
  // fused Sherman-Morrison kernel makes one pass over the inverse, about
  // what adding the row to F costs.
  static constexpr int64_t kAssumedStepsPerSolve = 10;
  // Such a step factorizes at once when dim <= this many times k (the
  // factorization, dim^3 / 3, is then at most twice the step's Gram update,
  // k dim^2 / 2), so the solve after the inner loop finds it ready; beyond,
  // the solve factorizes, once.
  static constexpr int64_t kFactorizeRowsFactor = 3;

  // `status`: the skip counter the CUDA kernels write to (see nhgd_ext.ops);
  // unused on the CPU, where the same problems raise. The settings and a
  // batch size are checked once, by their public layer (the Python
  // DenseEFIM, Pipeline.push); this core checks only the tensors it reads.
  DenseEFIM(int64_t dim, std::optional<double> beta, double damping, double refresh_below, at::ScalarType dtype,
            at::Device device, std::optional<at::Tensor> status);

  // Back to no samples: F = 0, inverse = I / damping.
  void reset();
  // One gradient; a batch mean of `batch_size` samples enters as sqrt(batch_size) g.
  void update(const at::Tensor& g, int64_t batch_size);
  // The rows of G (k x d) as k samples, oldest first, in one rank-k step
  // (`per_step`: one optimizer step's per-sample rows, see dense.py).
  void update_many(const at::Tensor& G, bool per_step);
  // Folds the buffered rows into F and applies F's pending scale: `fisher`
  // is then F itself (its lower triangle).
  void fold();
  // Writes the pending rank-one update into the inverse.
  void flush();
  // inverse <- (F + damping I)^-1 exactly (float64 Cholesky), mu <- damping.
  void refresh();
  // factor <- L with L L^T = F + damping I (float64), no explicit inverse:
  // what a solve needs after steps too large for the in-place updates.
  // Counted in num_refreshes; dropped by the next update.
  void factorize();
  // After the caller has overwritten inverse, pending and fisher (load_state_dict):
  // sets the counters and drops the buffered rows.
  void set_counters(int64_t num_updates, int64_t num_samples, int64_t num_refreshes, double mu);

  // The live state, shared with Python (read them, do not replace them).
  const at::Tensor& inverse() const { return A_; }
  const at::Tensor& pending() const { return pending_; }
  // F itself right after fold(), otherwise F / scale_ short of the buffered
  // rows; only the lower triangle is current (see kFoldRows).
  const at::Tensor& fisher() const { return F_; }
  // The Cholesky factor of factorize(); undefined (None) when there is none.
  const at::Tensor& factor() const { return L_; }

  int64_t dim() const { return dim_; }
  int64_t num_updates() const { return num_updates_; }
  int64_t num_samples() const { return num_samples_; }
  int64_t num_refreshes() const { return num_refreshes_; }
  double mu() const { return mu_; }
  // Rows of the last update (0 before any): whether a solve's rebuild can
  // serve the next in-place updates or only itself (dense.py).
  int64_t last_rows() const { return last_rows_; }
  int64_t gram_rows() const { return gram_rows_; }
  void set_gram_rows(int64_t rows);

 private:
  struct Coefficients {
    double a;
    std::vector<double> weights;  // one per new row
  };
  Coefficients coefficients(int64_t k, bool per_step) const;
  at::Tensor rows(const char* name, const at::Tensor& x, int64_t ndim) const;
  template <typename Update>
  void update_in_place(double a, int64_t k, Update&& update);
  template <typename Update>
  void fold_in(const at::Tensor& rows, double a, double weight, Update&& update);
  void remember(const at::Tensor& rows, double a, double weight);
  void add_rows(const at::Tensor& X, const at::Tensor& w);
  void add_buffered_rows();
  // Whether the in-place update is skipped (the inverse then goes stale,
  // mu = 0, until the next refresh): its damping would fall below
  // refresh_below * damping, or the step has too many rows.
  bool goes_stale(double a, int64_t k) const {
    return mu_ * a < refresh_below_ * damping_ || k >= gram_rows_;
  }
  void advance(double a, int64_t k);
  at::Tensor damped_fisher();
  at::Tensor empty_pending() const;

  int64_t dim_;
  std::optional<double> beta_;
  double damping_, refresh_below_;
  at::TensorOptions options_;
  std::optional<at::Tensor> status_;

  at::Tensor A_, pending_, F_, L_;
  std::vector<at::Tensor> buffered_rows_;  // float64 copies, oldest first
  std::vector<double> buffered_weights_;   // each row's weight divided by scale_ at its arrival
  // F = scale_ (F_ + the buffered rows' share): the product of the a's since
  // fold() last made F_ exact (a refresh, a state_dict, or scale_ falling
  // below kRescaleBelow).
  double scale_ = 1.0;
  int64_t num_updates_ = 0, num_samples_ = 0, num_refreshes_ = 0, last_rows_ = 0, gram_rows_ = 1;
  // The damping the inverse currently includes: inverse = (F + mu I)^-1,
  // refresh_below * damping <= mu <= damping, or mu = 0 when the inverse is
  // stale (not updated since some rows arrived).
  double mu_ = 0.0;
};

}  // namespace nhgd::curvature
