// The operators' definitions (their schemas come from schemas.h) and the CPU
// registrations. The CUDA registrations live in cuda/ops_cuda.cpp and run the
// same argument checks from checks.h.
//
// Mutating ops return nothing at the schema level: torch.compile's
// auto-functionalization handles `Tensor(a!)` arguments of custom ops but not
// returns that alias them. The Python wrappers return the updated tensors.
#include "schemas.h"
#include "checks.h"
#include "cpu/kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace nhgd {
namespace {

bool compiled_with_cuda() {
#ifdef NHGD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// On the CPU every coefficient is known to the host (tensor_coeff rejects
// tensors on another device), so the kernels take plain doubles.
double host_value(const Coeff& c) {
  TORCH_INTERNAL_ASSERT(!c.on_device());
  return c.host;
}

// Each template serves an operator's float overload (C = double) and its
// tensor overload (C = const at::Tensor&: a 0-d coefficient on the CPU).
template <typename C>
void sherman_morrison_cpu(const at::Tensor& A, const at::Tensor& g, C a, C b,
                          const std::optional<at::Tensor>& status, bool lower_only) {
  const char* op = "sherman_morrison_";
  check_sherman_morrison_args(A, g, status);
  const double ca = host_value(coeff(op, "a", a, A, true));
  const double cb = host_value(coeff(op, "b", b, A, false));
  cpu::sherman_morrison_(A, g, ca, cb, lower_only);
}

template <typename C>
void woodbury_cpu(const at::Tensor& A, const at::Tensor& H, C a, const std::optional<at::Tensor>& status) {
  check_woodbury_args(A, H, status);
  cpu::woodbury_(A, H, host_value(coeff("woodbury_", "a", a, A, true)));
}

template <typename C>
void kfac_update_cpu(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts, at::TensorList grads,
                     C a, C b, const std::optional<at::Tensor>& status) {
  const char* op = "kfac_update_";
  check_kfac_update_args(S_inv, G_inv, acts, grads, status);
  const double ca = host_value(coeff(op, "a", a, S_inv[0], true));
  const double cb = host_value(coeff(op, "b", b, S_inv[0], false));
  cpu::kfac_update_(S_inv, G_inv, acts, grads, ca, cb);
}

std::vector<at::Tensor> kfac_apply_cpu(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V) {
  check_kfac_apply_args(S_inv, G_inv, V);
  return cpu::kfac_apply(S_inv, G_inv, V);
}

template <typename C>
void running_average_cpu(const at::Tensor& L, const at::Tensor& B, C a, C b,
                         const std::optional<at::Tensor>& status) {
  const char* op = "running_average_";
  check_running_average_args(L, B, status);
  const double ca = host_value(coeff(op, "a", a, L, true));
  const double cb = host_value(coeff(op, "b", b, L, false));
  cpu::running_average_(L, B, ca, cb);
}

void sherman_morrison_deferred_cpu(const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g, double a,
                                   double b, const std::optional<at::Tensor>& status) {
  const char* op = "sherman_morrison_deferred_";
  check_pending_args(op, A, pending, g);
  check_sherman_morrison_args(A, g, status);
  const double ca = host_coeff(op, "a", a, true).host;
  const double cb = host_coeff(op, "b", b, false).host;
  cpu::sherman_morrison_deferred_(A, pending, g, ca, cb);
}

void apply_pending_cpu(const at::Tensor& A, const at::Tensor& pending) {
  check_pending_args("apply_pending_", A, pending, at::Tensor());
  cpu::apply_pending_(A, pending);
}

at::Tensor symmetric_matvec_cpu(const at::Tensor& A, const at::Tensor& v) {
  check_symmetric_matvec_args(A, v);
  return cpu::symmetric_matvec(A, v);
}

void symmetrize_cpu(const at::Tensor& A) {
  check_symmetrize_args(A);
  cpu::symmetrize_(A);
}

}  // namespace
}  // namespace nhgd

TORCH_LIBRARY(nhgd_ext, m) {
  // Fake kernels for torch.compile are registered in Python, by this module.
  m.set_python_module("nhgd_ext.ops");
#define NHGD_DEFINE(schema) m.def(schema);
  NHGD_SCHEMAS(NHGD_DEFINE)
#undef NHGD_DEFINE
  m.def("_compiled_with_cuda() -> bool", &nhgd::compiled_with_cuda);
}

TORCH_LIBRARY_IMPL(nhgd_ext, CPU, m) {
  m.impl("sherman_morrison_", &nhgd::sherman_morrison_cpu<double>);
  m.impl("sherman_morrison_.tensor", &nhgd::sherman_morrison_cpu<const at::Tensor&>);
  m.impl("woodbury_", &nhgd::woodbury_cpu<double>);
  m.impl("woodbury_.tensor", &nhgd::woodbury_cpu<const at::Tensor&>);
  m.impl("kfac_update_", &nhgd::kfac_update_cpu<double>);
  m.impl("kfac_update_.tensor", &nhgd::kfac_update_cpu<const at::Tensor&>);
  m.impl("kfac_apply", &nhgd::kfac_apply_cpu);
  m.impl("running_average_", &nhgd::running_average_cpu<double>);
  m.impl("running_average_.tensor", &nhgd::running_average_cpu<const at::Tensor&>);
  m.impl("symmetrize_", &nhgd::symmetrize_cpu);
  m.impl("sherman_morrison_deferred_", &nhgd::sherman_morrison_deferred_cpu);
  m.impl("apply_pending_", &nhgd::apply_pending_cpu);
  m.impl("symmetric_matvec", &nhgd::symmetric_matvec_cpu);
}
