// Argument checks shared by the CPU and CUDA registrations of every operator.
//
// Metadata checks (shape, dtype, device, layout) never read tensor values, so
// they are safe to run before a CUDA launch without a host sync. Value checks
// (finiteness, sign of a coefficient) are done on the host only for host data;
// for device data the CUDA kernels check on the device and skip the update.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ATen_fwd.h>

#include <optional>
#include <string>
#include <type_traits>

namespace nhgd {

// A coefficient (`a` or `b`) of an update: either a value the host knows, or a
// 0-d tensor that lives on the state's CUDA device and is only read there.
struct Coeff {
  double host = 0.0;
  std::optional<at::Tensor> device;  // same dtype as the state; never read on the host
  bool on_device() const { return device.has_value(); }
};

// `strictly_positive`: a > 0 (for `a`) versus b >= 0 (for `b`). Both must be finite.
Coeff host_coeff(const char* op, const char* name, double value, bool strictly_positive);
Coeff tensor_coeff(const char* op, const char* name, const at::Tensor& t,
                   const at::Tensor& state, bool strictly_positive);
// Either of the two, by the overload's coefficient type: each operator's float
// and tensor overloads are one template over it (ops.cpp, cuda/ops_cuda.cpp).
inline Coeff coeff(const char* op, const char* name, double value, const at::Tensor& /*state*/,
                   bool strictly_positive) {
  return host_coeff(op, name, value, strictly_positive);
}
inline Coeff coeff(const char* op, const char* name, const at::Tensor& t, const at::Tensor& state,
                   bool strictly_positive) {
  return tensor_coeff(op, name, t, state, strictly_positive);
}

void check_sherman_morrison_args(const at::Tensor& A, const at::Tensor& g,
                                 const std::optional<at::Tensor>& status);
void check_woodbury_args(const at::Tensor& A, const at::Tensor& H,
                         const std::optional<at::Tensor>& status);
void check_kfac_update_args(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts,
                            at::TensorList grads, const std::optional<at::Tensor>& status);
void check_kfac_apply_args(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V);
void check_running_average_args(const at::Tensor& L, const at::Tensor& B,
                                const std::optional<at::Tensor>& status);

void check_symmetrize_args(const at::Tensor& A);
void check_symmetric_matvec_args(const at::Tensor& A, const at::Tensor& v);
// `op` is sherman_morrison_deferred_ (with g) or apply_pending_ (g undefined).
void check_pending_args(const char* op, const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g);

// Numbers and shapes as text for error messages, converted here rather than
// streamed into the message: messages made of text alone raise reliably with
// every compiler these sources meet (the case that needed it: bench/RESULTS.md).
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
std::string text(I v) {
  return std::to_string(v);
}
std::string text(double v);
std::string text(at::IntArrayRef shape);

// Host tensors only: whether no element is NaN or infinite (one vectorized
// pass, no mask allocated).
bool all_finite(const at::Tensor& t);
// Host tensors only: ValueError naming `name` if any element is NaN or infinite.
void check_finite(const char* op, const char* name, const at::Tensor& t);

}  // namespace nhgd
