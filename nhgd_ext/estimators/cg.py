"""Implicit differentiation with the linear system H w = grad_theta f solved
by conjugate gradients (Hessian-vector products only, never a dense H)."""

from __future__ import annotations

import torch

from .._finite import refuse_nonfinite
from .base import UNCHANGED, Closure, KeepsSolution


class ConjugateGradient(KeepsSolution):
    """``iters`` CG iterations on one batch from ``inner_closure``; ``tol``
    stops early on a relative residual. ``warm_start`` starts from the
    previous outer step's solution."""

    def __init__(self, inner_params, outer_params, *, iters: int = 10, tol: float = 0.0,
                 warm_start: bool = False, inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"ConjugateGradient: argument 'iters' must be a positive integer, got {iters!r}")
        self.iters, self.tol, self.warm_start = iters, float(tol), warm_start

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = self.inner_gradient(inner_closure())
        w = self.kept_or_zeros(f_theta).clone() if self.warm_start else torch.zeros_like(f_theta)
        r = f_theta - self.hvp(g_theta, w) if bool(w.any()) else f_theta.clone()
        p = r.clone()
        rr = r @ r
        stop = (self.tol * f_theta.norm()) ** 2
        for _ in range(self.iters):
            if rr <= stop or rr == 0:
                break
            Hp = self.hvp(g_theta, p)
            pHp = p @ Hp
            refuse_nonfinite("ConjugateGradient", [pHp], ["a Hessian-vector product"], UNCHANGED)
            if not pHp > 0:  # the residual is at rounding level (or H is not positive definite along p)
                break
            alpha = rr / pHp
            w.add_(p, alpha=float(alpha))
            r.sub_(Hp, alpha=float(alpha))
            rr_new = r @ r
            p.mul_(rr_new / rr).add_(r)
            rr = rr_new
        self._kept = w
        return self.combine(f_v, self.mixed_product(g_theta, w))
