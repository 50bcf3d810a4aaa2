// CPU implementations of the operators. Arguments have passed the shared
// checks of checks.h; these functions do the value checks that need the data
// and leave every state tensor untouched when one fails.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace nhgd::cpu {

// With `lower_only`, only the lower triangle of A is updated (the upper one is
// left stale, for symmetrize_); otherwise all of A, which stays exactly
// symmetric when it was.
void sherman_morrison_(const at::Tensor& A, const at::Tensor& g, double a, double b, bool lower_only);
// Deferred form on the lower triangle (docs/design.md §2.1, one pass over A per
// update): the state is the pair (A, pending) with pending = [alpha, c, u]
// meaning A_true = alpha tril-sym(A) - c u u^T. Each call applies the pending
// update in the pass that computes A_true g, then leaves the new update
// pending. apply_pending_ writes it out and mirrors the lower triangle.
void sherman_morrison_deferred_(const at::Tensor& A, const at::Tensor& pending, const at::Tensor& g, double a,
                                double b);
void apply_pending_(const at::Tensor& A, const at::Tensor& pending);

// A v for symmetric A (d x d) from its lower triangle alone (d^2/2 reads).
at::Tensor symmetric_matvec(const at::Tensor& A, const at::Tensor& v);

void woodbury_(const at::Tensor& A, const at::Tensor& H, double a);
void kfac_update_(at::TensorList S_inv, at::TensorList G_inv, at::TensorList acts,
                  at::TensorList grads, double a, double b);
std::vector<at::Tensor> kfac_apply(at::TensorList S_inv, at::TensorList G_inv, at::TensorList V);
void running_average_(const at::Tensor& L, const at::Tensor& B, double a, double b);

// Copies the strictly lower triangle of each d x d matrix of A onto its upper
// triangle, so the result is bitwise symmetric.
void symmetrize_(const at::Tensor& A);

}  // namespace nhgd::cpu
