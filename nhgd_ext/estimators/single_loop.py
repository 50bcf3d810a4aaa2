"""The single-loop methods of seed 003 (Algorithms 1 and 2): with one inner
step per outer step (T = 1) they are exactly those algorithms; the linear-
system variable of AID is warm-started across outer steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Closure, HypergradientEstimator, KeepsSolution


class SingleLoopAID(KeepsSolution):
    """Algorithm 1: one gradient step on the linear system per outer step,
    v <- (I - eta H) v + eta grad_theta f, warm-started; then
    grad Phi ~ grad_v f - (d2_{v theta} l) v."""

    def __init__(self, inner_params, outer_params, *, eta: float = 0.1, inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        if not eta > 0:
            raise ValueError(f"SingleLoopAID: argument 'eta' must be > 0, got {eta!r}")
        self.eta = float(eta)

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = self.inner_gradient(inner_closure())
        v = self.kept_or_zeros(f_theta)
        self._kept = v - self.eta * self.hvp(g_theta, v) + self.eta * f_theta
        return self.combine(f_v, self.mixed_product(g_theta, self._kept))


class SOBA(SingleLoopAID):
    """SOBA (Dagreou et al., 2022): the same warm-started step on the linear
    system, z <- z - lr (H z - grad_theta f), but the hypergradient uses z
    before its step (all directions are taken at the same point)."""

    def __init__(self, inner_params, outer_params, *, lr: float = 0.1, inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, eta=lr, inner_lr=inner_lr, process_group=process_group)

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = self.inner_gradient(inner_closure())
        z = self.kept_or_zeros(f_theta)
        direction = self.combine(f_v, self.mixed_product(g_theta, z))
        self._kept = z - self.eta * (self.hvp(g_theta, z) - f_theta)
        return direction


class SingleLoopITD(HypergradientEstimator):
    """Algorithm 2: differentiate through the last inner step,
    grad Phi ~ grad_v f(v, theta) - alpha (d2_{v theta} l)(v, theta0) grad_theta f(v, theta),
    with theta0 the point before that step and alpha its step size.

    ``observe`` (which ``inner_step`` calls before the optimizer steps) keeps
    the values of theta0; the hypergradient evaluates the inner closure there
    for the mixed derivative, and puts theta back. The step's own graph is
    not kept: the optimizer changes theta in place, which invalidates every
    graph that saved theta itself (any model nonlinear in theta)."""

    _outer_step_attributes = ("_theta0",)

    def __init__(self, inner_params, outer_params, *, inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        self._theta0: list[torch.Tensor] | None = None

    def observe(self, grads: Sequence[torch.Tensor], *, batch_size: int = 1, **observations) -> None:
        """Call it before the step that ``grads`` make: it keeps theta0."""
        self._theta0 = [p.detach().clone() for p in self.inner_params]

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        if self._theta0 is None:
            raise RuntimeError("SingleLoopITD.hypergradient: no inner step to differentiate through yet")
        f_v, f_theta = self.outer_gradients(outer_loss)
        theta = [p.detach().clone() for p in self.inner_params]
        with torch.no_grad():
            for p, p0 in zip(self.inner_params, self._theta0):
                p.copy_(p0)
        try:
            g0 = self.inner_gradient(inner_closure())
            cross = self.mixed_product(g0, getattr(self, "_step_size", self.inner_lr) * f_theta)
        finally:
            with torch.no_grad():
                for p, p1 in zip(self.inner_params, theta):
                    p.copy_(p1)
        self._theta0 = None  # one step is differentiated through once
        return self.combine(f_v, cross)

    def reset(self) -> None:
        self._theta0 = None
