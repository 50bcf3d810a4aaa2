// CUDA registrations of the nhgd_ext operators (schemas: csrc/ops.cpp).
//
// Every registration runs the shared metadata checks of checks.h, converts
// the coefficients (a host float, a 0-d CPU tensor read on the host, or a 0-d
// device tensor that only the kernels read), makes A's device current, and
// enqueues its work on that device's current stream. Nothing here
// synchronizes with the device: value checks on device data happen in the
// kernels, which skip (leave the matrix untouched) and count in `status`.
// Workspace comes from the caching allocator (at::empty), which orders reuse
// on the current stream.
#include "checks.h"
#include "launch.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <tuple>
#include <utility>
#include <vector>

namespace nhgd {
namespace {

// A coefficient as the launchers take it: device pointer (state dtype) or host value.
struct LaunchCoeff {
  const void* dev = nullptr;
  double host = 0.0;
};

LaunchCoeff launch_coeff(const Coeff& c) {
  LaunchCoeff r;
  r.host = c.host;
  if (c.on_device()) r.dev = c.device->data_ptr();  // a pointer, never read here
  return r;
}

template <typename T>
const T* typed(const LaunchCoeff& c) {
  return static_cast<const T*>(c.dev);
}

int* status_ptr(const std::optional<at::Tensor>& status) {
  return status.has_value() ? status->data_ptr<int>() : nullptr;
}

// The dispatcher picks these kernels when any argument is a CUDA tensor; the
// shared checks tie every argument to the state's device, so this only
// guards against a state that is not a CUDA tensor at all.
void require_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor here, got device ",
                    t.device());
}

// Element `offset` of a tensor's storage, as an untyped pointer.
void* element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.data_ptr()) + offset * static_cast<int64_t>(t.element_size());
}

bool is_double(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }

// --------------------------------------------------------------------------- sherman_morrison_

void sherman_morrison_launch(const at::Tensor& A, const at::Tensor& g, const Coeff& ca, const Coeff& cb,
                             const std::optional<at::Tensor>& status) {
  const int64_t d = A.size(-1);
  const int64_t n = A.dim() == 3 ? A.size(0) : 1;
  if (n == 0) return;
  const at::Tensor gc = g.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const size_t bytes = cuda::sherman_morrison_workspace_bytes(n, d, A.element_size());
  const at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, A.options().dtype(at::kByte));
  const LaunchCoeff a = launch_coeff(ca), b = launch_coeff(cb);
  cudaError_t err;
  if (is_double(A)) {
    err = cuda::sherman_morrison(A.data_ptr<double>(), gc.data_ptr<double>(), n, d, ws.data_ptr(),
                                 typed<double>(a), a.host, typed<double>(b), b.host, status_ptr(status), stream);
  } else {
    err = cuda::sherman_morrison(A.data_ptr<float>(), gc.data_ptr<float>(), n, d, ws.data_ptr(),
                                 typed<float>(a), a.host, typed<float>(b), b.host, status_ptr(status), stream);
  }
  C10_CUDA_CHECK(err);
}

// One template per operator serves its float overload (C = double) and its
// tensor overload (C = const at::Tensor&: a 0-d coefficient on the CPU or on
// the state's device). The coefficients are checked first (naming a
// coefficient on another device), then A's device is selected, then the work.
// `lower_only` may be ignored: updating both triangles also satisfies it.
template <typename C>
void sherman_morrison_cuda(const at::Tensor& A, const at::Tensor& g, C a, C b,
                           const std::optional<at::Tensor>& status, bool /*lower_only*/) {
  const char* op = "sherman_morrison_";
  check_sherman_morrison_args(A, g, status);
  const Coeff ca = coeff(op, "a", a, A, true);
  const Coeff cb = coeff(op, "b", b, A, false);
  require_cuda(op, "A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  sherman_morrison_launch(A, g, ca, cb, status);
}

// --------------------------------------------------------------------------- deferred form

// On CUDA the deferred form runs eagerly: the fused kernel already makes one
// pass per update, so the pending update is applied at once and left empty.
// A <- alpha A - c u u^T keeps A exactly symmetric (u_i u_j == u_j u_i).
void apply_pending_now(const at::Tensor& A, const at::Tensor& pending) {
  const int64_t d = A.size(0);
  const at::Tensor u = pending.narrow(0, 2, d);
  A.mul_(pending.narrow(0, 0, 1)).sub_(at::outer(u, u).mul_(pending.narrow(0, 1, 1)));
  pending.zero_();
  pending.narrow(0, 0, 1).fill_(1);
}

void sherman_morrison_deferred_cuda(const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g, double a,
                                    double b, const std::optional<at::Tensor>& status) {
  const char* op = "sherman_morrison_deferred_";
  check_pending_args(op, A, pending, g);
  check_sherman_morrison_args(A, g, status);
  require_cuda(op, "A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const Coeff ca = host_coeff(op, "a", a, true);
  const Coeff cb = host_coeff(op, "b", b, false);
  apply_pending_now(A, pending);
  sherman_morrison_launch(A, g, ca, cb, status);
}

void apply_pending_cuda(const at::Tensor& A, const at::Tensor& pending) {
  check_pending_args("apply_pending_", A, pending, at::Tensor());
  require_cuda("apply_pending_", "A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  apply_pending_now(A, pending);
}

// The CUDA state is kept with both triangles current (its deferred form runs
// eagerly), so a plain matrix-vector product (cuBLAS) serves.
at::Tensor symmetric_matvec_cuda(const at::Tensor& A, const at::Tensor& v) {
  check_symmetric_matvec_args(A, v);
  require_cuda("symmetric_matvec", "A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  return at::mv(A, v);
}

// --------------------------------------------------------------------------- symmetrize_

void symmetrize_cuda(const at::Tensor& A) {
  check_symmetrize_args(A);
  require_cuda("symmetrize_", "A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t d = A.size(-1);
  const int64_t n = A.dim() == 3 ? A.size(0) : 1;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = is_double(A) ? cuda::symmetrize(A.data_ptr<double>(), n, d, stream)
                                       : cuda::symmetrize(A.data_ptr<float>(), n, d, stream);
  C10_CUDA_CHECK(err);
}

// --------------------------------------------------------------------------- woodbury_

// U = A H^T, C = a I + H U = L L^T, Y = U L^-T (so Y Y^T = U C^-1 U^T), all on
// the current stream without reading anything back; then the downdate
// kernel writes A' = (A - Y Y^T)/a for every matrix whose Cholesky succeeded
// and whose H and Y are finite (and a valid), and skips and counts the others.
void woodbury_launch(const at::Tensor& A, const at::Tensor& H, const Coeff& ca,
                     const std::optional<at::Tensor>& status) {
  const bool batched = A.dim() == 3;
  const int64_t n = batched ? A.size(0) : 1;
  if (n == 0) return;
  const int64_t d = A.size(-1), k = H.size(-2);
  const at::Tensor U = at::matmul(A, H.mT());  // [n,] d x k
  at::Tensor C = at::matmul(H, U);             // [n,] k x k
  if (ca.on_device()) {
    C.diagonal(0, -2, -1).add_(*ca.device);
  } else {
    C.diagonal(0, -2, -1).add_(ca.host);
  }
  const auto [L, info] = at::linalg_cholesky_ex(C, /*upper=*/false, /*check_errors=*/false);
  // Y L^T = U.
  const at::Tensor Y = at::linalg_solve_triangular(L.mT(), U, /*upper=*/true, /*left=*/false);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // bad[m] = 1 where H[m] or Y[m] has a non-finite entry (one launch).
  const at::Tensor bad = at::empty({n}, A.options().dtype(at::kInt));
  cuda::FiniteCheck checks[2];
  for (int q = 0; q < 2; ++q) {
    const at::Tensor& X = q == 0 ? H : Y;
    checks[q].p = X.data_ptr();
    checks[q].rows = X.size(-2);
    checks[q].cols = X.size(-1);
    checks[q].rs = X.stride(-2);
    checks[q].cs = X.stride(-1);
    checks[q].bs = batched ? X.stride(0) : 0;
  }
  C10_CUDA_CHECK(cuda::nonfinite_flags(checks, 2, n, is_double(A), bad.data_ptr<int>(), stream));
  const at::Tensor info_c = info.contiguous();

  cuda::DowndateProblem p;
  p.A = A.data_ptr();
  p.a_bs = d * d;
  p.Y = Y.data_ptr();
  p.y_rs = Y.stride(-2);
  p.y_cs = Y.stride(-1);
  p.y_bs = batched ? Y.stride(0) : 0;
  p.d = static_cast<int32_t>(d);
  p.k = static_cast<int32_t>(k);
  p.batch = static_cast<int32_t>(n);
  p.info = info_c.data_ptr<int>();
  p.bad = bad.data_ptr<int>();
  const LaunchCoeff a = launch_coeff(ca);
  C10_CUDA_CHECK(cuda::grouped_downdate(&p, 1, is_double(A), a.dev, a.host, nullptr, 0.0,
                                        /*check_b=*/false, status_ptr(status), stream));
}

template <typename C>
void woodbury_cuda(const at::Tensor& A, const at::Tensor& H, C a, const std::optional<at::Tensor>& status) {
  const char* op = "woodbury_";
  check_woodbury_args(A, H, status);
  const Coeff ca = coeff(op, "a", a, A, true);
  require_cuda(op, "A", A);
  const c10::cuda::CUDAGuard guard(A.device());  // A's device and stream, before any work
  woodbury_launch(A, H, ca, status);
}

// --------------------------------------------------------------------------- kfac_update_

// Every factor f (S_inv[i] with H = sqrt(b/n_i) acts_i, G_inv[i] with
// H = sqrt(b/m_i) grads_i) is a Woodbury update with k_f = rows of its H:
//   1. grouped GEMM, all factors:  U_f = sqrt(b/k_f) A_f X_f^T          (d_f x k_f)
//   2. grouped GEMM, all factors:  C_f = a I + sqrt(b/k_f) X_f U_f       (k_f x k_f)
//      written into one stacked k x k buffer per distinct k;
//   3. per distinct k: one batched Cholesky (info on the device) and one
//      batched triangular solve for L^-1;
//   4. grouped GEMM, all factors:  Y_f = U_f L_f^-T                      (d_f x k_f)
//   5. grouped downdate, all factors: A_f <- (A_f - Y_f Y_f^T)/a, skipped
//      and counted where a or b is invalid, X_f or Y_f is not finite, or the
//      Cholesky failed.
// Layers usually share the row count, so step 3 is usually one pair of calls.
void kfac_update_launch(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts, at::TensorList grads,
                        const Coeff& ca, const Coeff& cb, const std::optional<at::Tensor>& status) {
  const at::Tensor& S0 = S_inv[0];
  const auto opts = S0.options();
  const bool dbl = is_double(S0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const LaunchCoeff a = launch_coeff(ca), b = launch_coeff(cb);

  struct Factor {
    at::Tensor A, X;
    int64_t d = 0, k = 0;
    int64_t u_off = 0;  // offset of U_f / Y_f in the workspace (elements)
    int group = 0, slot = 0;
  };
  const size_t layers = S_inv.size();
  const int nf = static_cast<int>(2 * layers);
  std::vector<Factor> f(nf);
  int64_t total = 0;
  std::map<int64_t, std::vector<int>> by_k;
  for (int q = 0; q < nf; ++q) {
    const size_t i = static_cast<size_t>(q / 2);
    Factor& x = f[q];
    x.A = (q % 2 == 0) ? S_inv[i] : G_inv[i];
    x.X = (q % 2 == 0) ? acts[i] : grads[i];
    x.d = x.A.size(0);
    x.k = x.X.size(0);
    x.u_off = total;
    total += x.d * x.k;
    by_k[x.k].push_back(q);
  }
  struct Group {
    int64_t k = 0;
    at::Tensor C, L, info, Linv;
  };
  std::vector<Group> groups;
  for (const auto& [k, members] : by_k) {
    Group g;
    g.k = k;
    g.C = at::empty({static_cast<int64_t>(members.size()), k, k}, opts);
    for (size_t s = 0; s < members.size(); ++s) {
      f[members[s]].group = static_cast<int>(groups.size());
      f[members[s]].slot = static_cast<int>(s);
    }
    groups.push_back(std::move(g));
  }
  const at::Tensor U = at::empty({total}, opts);
  const at::Tensor Y = at::empty({total}, opts);
  const at::Tensor bad = at::zeros({nf}, opts.dtype(at::kInt));
  int* bad_p = bad.data_ptr<int>();

  std::vector<cuda::GemmProblem> p(nf);
  // 1. U_f = sqrt(b/k) A X^T: op(B)(l, j) = X(j, l).
  for (int q = 0; q < nf; ++q) {
    const Factor& x = f[q];
    cuda::GemmProblem& pr = p[q];
    pr = cuda::GemmProblem{};
    pr.A = x.A.data_ptr();
    pr.a_rs = x.d;
    pr.a_cs = 1;
    pr.B = x.X.data_ptr();
    pr.b_rs = x.X.stride(1);
    pr.b_cs = x.X.stride(0);
    pr.C = element_ptr(U, x.u_off);
    pr.ldc = x.k;
    pr.M = static_cast<int32_t>(x.d);
    pr.N = static_cast<int32_t>(x.k);
    pr.K = static_cast<int32_t>(x.d);
    pr.alpha = 1.0 / static_cast<double>(x.k);
    pr.flags = cuda::kGemmAlphaSqrtB | cuda::kGemmCheckB;
    pr.bad = bad_p + q;
  }
  C10_CUDA_CHECK(cuda::grouped_gemm(p.data(), nf, dbl, a.dev, a.host, b.dev, b.host, stream));
  // 2. C_f = a I + sqrt(b/k) X U.
  for (int q = 0; q < nf; ++q) {
    const Factor& x = f[q];
    cuda::GemmProblem& pr = p[q];
    pr = cuda::GemmProblem{};
    pr.A = x.X.data_ptr();
    pr.a_rs = x.X.stride(0);
    pr.a_cs = x.X.stride(1);
    pr.B = element_ptr(U, x.u_off);
    pr.b_rs = x.k;
    pr.b_cs = 1;
    pr.C = element_ptr(groups[x.group].C, static_cast<int64_t>(x.slot) * x.k * x.k);
    pr.ldc = x.k;
    pr.M = static_cast<int32_t>(x.k);
    pr.N = static_cast<int32_t>(x.k);
    pr.K = static_cast<int32_t>(x.d);
    pr.alpha = 1.0 / static_cast<double>(x.k);
    pr.flags = cuda::kGemmAlphaSqrtB | cuda::kGemmDiagA;
  }
  C10_CUDA_CHECK(cuda::grouped_gemm(p.data(), nf, dbl, a.dev, a.host, b.dev, b.host, stream));
  // 3. C = L L^T and L^-1, batched per distinct k.
  for (Group& g : groups) {
    std::tie(g.L, g.info) = at::linalg_cholesky_ex(g.C, /*upper=*/false, /*check_errors=*/false);
    const at::Tensor eye = at::eye(g.k, opts).expand({g.C.size(0), g.k, g.k});
    g.Linv = at::linalg_solve_triangular(g.L, eye, /*upper=*/false, /*left=*/true);
  }
  // 4. Y_f = U_f L_f^-T: op(B)(m, l) = Linv(l, m).
  for (int q = 0; q < nf; ++q) {
    const Factor& x = f[q];
    const Group& g = groups[x.group];
    cuda::GemmProblem& pr = p[q];
    pr = cuda::GemmProblem{};
    pr.A = element_ptr(U, x.u_off);
    pr.a_rs = x.k;
    pr.a_cs = 1;
    pr.B = element_ptr(g.Linv, static_cast<int64_t>(x.slot) * g.Linv.stride(0));
    pr.b_rs = g.Linv.stride(2);
    pr.b_cs = g.Linv.stride(1);
    pr.C = element_ptr(Y, x.u_off);
    pr.ldc = x.k;
    pr.M = static_cast<int32_t>(x.d);
    pr.N = static_cast<int32_t>(x.k);
    pr.K = static_cast<int32_t>(x.k);
    pr.alpha = 1.0;
    pr.flags = cuda::kGemmCheckOut;
    pr.bad = bad_p + q;
  }
  C10_CUDA_CHECK(cuda::grouped_gemm(p.data(), nf, dbl, a.dev, a.host, b.dev, b.host, stream));
  // 5. A_f <- (A_f - Y_f Y_f^T)/a where everything checked out.
  std::vector<cuda::DowndateProblem> dd(nf);
  for (int q = 0; q < nf; ++q) {
    const Factor& x = f[q];
    const Group& g = groups[x.group];
    cuda::DowndateProblem& pr = dd[q];
    pr.A = x.A.data_ptr();
    pr.a_bs = 0;
    pr.Y = element_ptr(Y, x.u_off);
    pr.y_rs = x.k;
    pr.y_cs = 1;
    pr.y_bs = 0;
    pr.d = static_cast<int32_t>(x.d);
    pr.k = static_cast<int32_t>(x.k);
    pr.batch = 1;
    pr.info = g.info.data_ptr<int>() + x.slot * g.info.stride(0);
    pr.bad = bad_p + q;
  }
  C10_CUDA_CHECK(cuda::grouped_downdate(dd.data(), nf, dbl, a.dev, a.host, b.dev, b.host, /*check_b=*/true,
                                        status_ptr(status), stream));
}

template <typename C>
void kfac_update_cuda(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts, at::TensorList grads,
                      C a, C b, const std::optional<at::Tensor>& status) {
  const char* op = "kfac_update_";
  check_kfac_update_args(S_inv, G_inv, acts, grads, status);
  const Coeff ca = coeff(op, "a", a, S_inv[0], true);
  const Coeff cb = coeff(op, "b", b, S_inv[0], false);
  require_cuda(op, "S_inv", S_inv[0]);
  const c10::cuda::CUDAGuard guard(S_inv[0].device());
  kfac_update_launch(S_inv, G_inv, acts, grads, ca, cb, status);
}

// --------------------------------------------------------------------------- kfac_apply

// out_i = (G_inv[i] V_i) S_inv[i]: two grouped GEMM launches per (device,
// dtype) present in the lists (normally one of each).
std::vector<at::Tensor> kfac_apply_cuda(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V) {
  const char* op = "kfac_apply";
  check_kfac_apply_args(S_inv, G_inv, V);
  const size_t layers = S_inv.size();
  std::vector<at::Tensor> out(layers);
  std::map<std::pair<int, int>, std::vector<size_t>> parts;
  for (size_t i = 0; i < layers; ++i) {
    require_cuda(op, "S_inv", S_inv[i]);
    parts[{S_inv[i].get_device(), static_cast<int>(S_inv[i].scalar_type())}].push_back(i);
  }
  for (const auto& [key, idx] : parts) {
    const at::Tensor& first = S_inv[idx.front()];
    const c10::cuda::CUDAGuard guard(first.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto opts = first.options();
    int64_t total = 0;
    std::vector<int64_t> off(idx.size());
    for (size_t s = 0; s < idx.size(); ++s) {
      off[s] = total;
      total += G_inv[idx[s]].size(0) * S_inv[idx[s]].size(0);
    }
    const at::Tensor tmp = at::empty({total}, opts);
    std::vector<cuda::GemmProblem> p1(idx.size()), p2(idx.size());
    for (size_t s = 0; s < idx.size(); ++s) {
      const size_t i = idx[s];
      const at::Tensor &S = S_inv[i], &G = G_inv[i], &v = V[i];
      const int64_t dout = G.size(0), din = S.size(0);
      out[i] = at::empty({dout, din}, opts);
      // tmp_i = G V
      cuda::GemmProblem& a = p1[s];
      a.A = G.data_ptr();
      a.a_rs = G.stride(0);
      a.a_cs = G.stride(1);
      a.B = v.data_ptr();
      a.b_rs = v.stride(0);
      a.b_cs = v.stride(1);
      a.C = element_ptr(tmp, off[s]);
      a.ldc = din;
      a.M = static_cast<int32_t>(dout);
      a.N = static_cast<int32_t>(din);
      a.K = static_cast<int32_t>(dout);
      // out_i = tmp_i S
      cuda::GemmProblem& b = p2[s];
      b.A = element_ptr(tmp, off[s]);
      b.a_rs = din;
      b.a_cs = 1;
      b.B = S.data_ptr();
      b.b_rs = S.stride(0);
      b.b_cs = S.stride(1);
      b.C = out[i].data_ptr();
      b.ldc = din;
      b.M = static_cast<int32_t>(dout);
      b.N = static_cast<int32_t>(din);
      b.K = static_cast<int32_t>(din);
    }
    const bool dbl = is_double(first);
    const int count = static_cast<int>(idx.size());
    C10_CUDA_CHECK(cuda::grouped_gemm(p1.data(), count, dbl, nullptr, 0.0, nullptr, 0.0, stream));
    C10_CUDA_CHECK(cuda::grouped_gemm(p2.data(), count, dbl, nullptr, 0.0, nullptr, 0.0, stream));
  }
  return out;
}

// --------------------------------------------------------------------------- running_average_

void running_average_launch(const at::Tensor& L, const at::Tensor& B, const Coeff& ca, const Coeff& cb,
                            const std::optional<at::Tensor>& status) {
  const at::Tensor Bc = B.contiguous();
  const at::Tensor flag = at::empty({1}, L.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const LaunchCoeff a = launch_coeff(ca), b = launch_coeff(cb);
  cudaError_t err;
  if (is_double(L)) {
    err = cuda::running_average(L.data_ptr<double>(), Bc.data_ptr<double>(), L.numel(), flag.data_ptr<int>(),
                                typed<double>(a), a.host, typed<double>(b), b.host, status_ptr(status), stream);
  } else {
    err = cuda::running_average(L.data_ptr<float>(), Bc.data_ptr<float>(), L.numel(), flag.data_ptr<int>(),
                                typed<float>(a), a.host, typed<float>(b), b.host, status_ptr(status), stream);
  }
  C10_CUDA_CHECK(err);
}

template <typename C>
void running_average_cuda(const at::Tensor& L, const at::Tensor& B, C a, C b,
                          const std::optional<at::Tensor>& status) {
  const char* op = "running_average_";
  check_running_average_args(L, B, status);
  const Coeff ca = coeff(op, "a", a, L, true);
  const Coeff cb = coeff(op, "b", b, L, false);
  require_cuda(op, "L", L);
  const c10::cuda::CUDAGuard guard(L.device());
  running_average_launch(L, B, ca, cb, status);
}

}  // namespace
}  // namespace nhgd

TORCH_LIBRARY_IMPL(nhgd_ext, CUDA, m) {
  m.impl("sherman_morrison_", &nhgd::sherman_morrison_cuda<double>);
  m.impl("sherman_morrison_.tensor", &nhgd::sherman_morrison_cuda<const at::Tensor&>);
  m.impl("woodbury_", &nhgd::woodbury_cuda<double>);
  m.impl("woodbury_.tensor", &nhgd::woodbury_cuda<const at::Tensor&>);
  m.impl("kfac_update_", &nhgd::kfac_update_cuda<double>);
  m.impl("kfac_update_.tensor", &nhgd::kfac_update_cuda<const at::Tensor&>);
  m.impl("kfac_apply", &nhgd::kfac_apply_cuda);
  m.impl("running_average_", &nhgd::running_average_cuda<double>);
  m.impl("running_average_.tensor", &nhgd::running_average_cuda<const at::Tensor&>);
  m.impl("symmetrize_", &nhgd::symmetrize_cuda);
  m.impl("sherman_morrison_deferred_", &nhgd::sherman_morrison_deferred_cuda);
  m.impl("apply_pending_", &nhgd::apply_pending_cuda);
  m.impl("symmetric_matvec", &nhgd::symmetric_matvec_cuda);
}
