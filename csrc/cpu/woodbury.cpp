// Rank-k (Woodbury) update of a symmetric inverse, M' = a M + H^T H (docs/design.md §2.2):
//   U = A H^T,  C = a I_k + H U = L L^T,  Y = U L^-T,  A' = (A - Y Y^T) / a.
// K-FAC factor updates are the same step with H = sqrt(b/n) * rows, so both
// ops share the two halves below: `prepare` (reads A, may fail) and `apply`
// (writes A, cannot fail). All preparations of a call run before any apply,
// so an error leaves every state tensor as it was.
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "cpu/transpose.h"
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace nhgd::cpu {
namespace {

// Y with Y Y^T = U C^-1 U^T for one matrix (2-D) or a batch (3-D).
at::Tensor prepare(const char* op, const std::string& where, const at::Tensor& A, const at::Tensor& H, double a) {
  const at::Tensor U = at::matmul(A, H.mT());
  const int64_t k = H.size(-2);
  at::Tensor C = at::matmul(H, U);
  C.diagonal(0, -2, -1).add_(a);
  auto [Lc, info] = at::linalg_cholesky_ex(C);
  TORCH_CHECK(info.eq(0).all().item<bool>(), op, ": the ", text(k), " x ", text(k),
              " system a I + H A H^T", where,
              " is not positive definite: A is not positive definite; the state was left unchanged");
  // Y L^T = U  <=>  Y = U L^-T.
  return at::linalg_solve_triangular(Lc.mT(), U, /*upper=*/true, /*left=*/false);
}

// A <- (A - Y Y^T) / a on the lower block triangle only, in row blocks of 512
// that each go through one BLAS call (about 5/8 of the flops of a full GEMM at
// d = 2048; larger blocks keep BLAS efficient), then mirrored by the caller:
// an exactly symmetric result.
void apply(const at::Tensor& A2, const at::Tensor& Y2, double a) {
  const int64_t d = A2.size(0);
  constexpr int64_t kBlock = 512;
  for (int64_t r0 = 0; r0 < d; r0 += kBlock) {
    const int64_t r1 = std::min(d, r0 + kBlock);
    at::Tensor rows = A2.narrow(0, r0, r1 - r0).narrow(1, 0, r1);
    rows.addmm_(Y2.narrow(0, r0, r1 - r0), Y2.narrow(0, 0, r1).mT(), 1.0 / a, -1.0 / a);
  }
}

}  // namespace

void symmetrize_(const at::Tensor& A) {
  const int64_t d = A.size(-1);
  const int64_t n = A.dim() == 3 ? A.size(0) : 1;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "symmetrize_", [&] {
    constexpr int64_t TB = kTile<scalar_t>;
    const int64_t nT = (d + TB - 1) / TB;
    const int64_t per = nT * (nT + 1) / 2;
    scalar_t* base = A.data_ptr<scalar_t>();
    at::parallel_for(0, n * per, 8, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        scalar_t* M = base + (k / per) * d * d;
        int64_t I, J;
        lower_tile_coords(k % per, I, J);
        mirror_tile(M, d, TB, I, J);
      }
    });
  });
}

void woodbury_(const at::Tensor& A, const at::Tensor& H, double a) {
  check_finite("woodbury_", "H", H);
  const at::Tensor Y = prepare("woodbury_", "", A, H, a);
  if (A.dim() == 2) {
    apply(A, Y, a);
  } else {
    for (int64_t m = 0; m < A.size(0); ++m) apply(A[m], Y[m], a);
  }
  symmetrize_(A);
}

void kfac_update_(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts,
                  at::TensorList grads, double a, double b) {
  const char* op = "kfac_update_";
  const size_t layers = S_inv.size();
  for (size_t i = 0; i < layers; ++i) {
    check_finite(op, "acts", acts[i]);
    check_finite(op, "grads", grads[i]);
  }
  if (b == 0.0) {
    // No new information: the factors only rescale, M' = a M.
    for (size_t i = 0; i < layers; ++i) {
      S_inv[i].mul_(1.0 / a);
      G_inv[i].mul_(1.0 / a);
    }
    return;
  }
  std::vector<at::Tensor> YS(layers), YG(layers);
  for (size_t i = 0; i < layers; ++i) {
    const std::string where = " of layer " + std::to_string(i);
    YS[i] = prepare(op, " (S_inv" + where + ")", S_inv[i],
                    acts[i] * std::sqrt(b / double(acts[i].size(0))), a);
    YG[i] = prepare(op, " (G_inv" + where + ")", G_inv[i],
                    grads[i] * std::sqrt(b / double(grads[i].size(0))), a);
  }
  at::parallel_for(0, static_cast<int64_t>(layers), 1, [&](int64_t l0, int64_t l1) {
    for (int64_t i = l0; i < l1; ++i) {
      apply(S_inv[i], YS[i], a);
      symmetrize_(S_inv[i]);
      apply(G_inv[i], YG[i], a);
      symmetrize_(G_inv[i]);
    }
  });
}

std::vector<at::Tensor> kfac_apply(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V) {
  std::vector<at::Tensor> out(S_inv.size());
  for (size_t i = 0; i < S_inv.size(); ++i) out[i] = at::matmul(at::matmul(G_inv[i], V[i]), S_inv[i]);
  return out;
}

}  // namespace nhgd::cpu
