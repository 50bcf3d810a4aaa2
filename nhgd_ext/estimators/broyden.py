"""Implicit differentiation with the linear system solved by Broyden's
("good") quasi-Newton method, as in deep-equilibrium solvers.

The root of r(w) = grad_theta f - H w is sought with an inverse-Jacobian
estimate B = -alpha I + U V^T of bounded memory: each step w <- w - s B r
(s from a backtracking line search on |r|) adds one rank-one correction;
when the memory is full, B restarts from -alpha I. A step that makes the
residual non-finite or blow up restarts from the best iterate, and the
lowest-residual iterate is what is returned.
"""

from __future__ import annotations

import torch

from .base import Closure, KeepsSolution


class Broyden(KeepsSolution):
    _outer_step_attributes = ("_kept", "num_restarts")

    def __init__(self, inner_params, outer_params, *, memory: int = 20, iters: int = 40, alpha: float = 1.0,
                 tol: float = 1e-10, warm_start: bool = False, inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        for name, value in (("memory", memory), ("iters", iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Broyden: argument '{name}' must be a positive integer, got {value!r}")
        if not alpha > 0:
            raise ValueError(f"Broyden: argument 'alpha' must be > 0, got {alpha!r}")
        self.memory, self.iters, self.alpha, self.tol, self.warm_start = memory, iters, float(alpha), float(tol), warm_start
        self.num_restarts = 0

    def _solve(self, residual, w: torch.Tensor) -> torch.Tensor:
        U, V = [], []

        def apply_B(x):  # (-alpha I + U V^T) x
            out = -self.alpha * x
            for u, v in zip(U, V):
                out = out + u * (v @ x)
            return out

        def apply_Bt(x):  # (-alpha I + V U^T) x
            out = -self.alpha * x
            for u, v in zip(U, V):
                out = out + v * (u @ x)
            return out

        r = residual(w)
        best_w, best_norm = w.clone(), float(r.norm())
        stop = self.tol * max(best_norm, 1e-300)
        for _ in range(self.iters):
            if best_norm <= stop:
                break
            step = -apply_B(r)
            s, r_norm = 1.0, float(r.norm())
            for _ in range(6):  # backtracking: accept the first step that lowers |r|
                w_try = w + s * step
                r_try = residual(w_try)
                if bool(torch.isfinite(r_try).all()) and float(r_try.norm()) < r_norm:
                    break
                s *= 0.5
            if not bool(torch.isfinite(r_try).all()) or float(r_try.norm()) > 1e3 * max(best_norm, 1e-300):
                # diverging: back to the best iterate with a fresh estimate
                w, r, U, V = best_w.clone(), residual(best_w), [], []
                self.num_restarts += 1
                continue
            dw, dr = w_try - w, r_try - r
            w, r = w_try, r_try
            if float(r.norm()) < best_norm:
                best_w, best_norm = w.clone(), float(r.norm())
            if len(U) == self.memory:  # memory full: restart the estimate
                U, V = [], []
                self.num_restarts += 1
            B_dr = apply_B(dr)
            vt = apply_Bt(dw)
            denom = float(vt @ dr)
            if denom != 0.0 and abs(denom) > 1e-30:
                U.append((dw - B_dr) / denom)
                V.append(vt)
        return best_w

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = self.inner_gradient(inner_closure())
        start = self.kept_or_zeros(f_theta).clone() if self.warm_start else torch.zeros_like(f_theta)
        w = self._solve(lambda x: f_theta - self.hvp(g_theta, x), start)
        self._kept = w
        return self.combine(f_v, self.mixed_product(g_theta, w))
