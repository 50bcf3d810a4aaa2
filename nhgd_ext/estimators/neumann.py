"""Implicit differentiation with H^-1 approximated by the truncated Neumann
series  phi * sum_{k=0}^{K} (I - phi H)^k,  valid for 0 < phi < 2 / lambda_max(H)."""

from __future__ import annotations

import torch

from .base import Closure, HypergradientEstimator


class Neumann(HypergradientEstimator):
    """``iters`` = K Hessian-vector products on one batch; ``scale`` = phi."""

    def __init__(self, inner_params, outer_params, *, iters: int = 10, scale: float = 0.1, inner_lr: float = 0.1,
                 process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"Neumann: argument 'iters' must be an integer >= 0, got {iters!r}")
        if not scale > 0:
            raise ValueError(f"Neumann: argument 'scale' must be > 0, got {scale!r}")
        self.iters, self.scale = iters, float(scale)

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = self.inner_gradient(inner_closure())
        term = f_theta.clone()  # (I - phi H)^k f_theta
        total = f_theta.clone()
        for _ in range(self.iters):
            term = term - self.scale * self.hvp(g_theta, term)
            total = total + term
        return self.combine(f_v, self.mixed_product(g_theta, self.scale * total))
