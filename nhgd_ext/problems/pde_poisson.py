"""A PINN bilevel problem whose hypergradient is known in closed form: the
1-D Poisson equation controlled by its boundary values.

    y'' = 2 on [0, 1],  y(0) = v0,  y(1) = v1      exact state  y_v(x) = x^2 + (v1 - v0 - 1) x + v0
    inner:  theta*(v) = argmin  mean_i (y_theta''(x_i) - 2)^2 + (y_theta(0) - v0)^2 + (y_theta(1) - v1)^2
    outer:  J = int_0^1 (y_theta - y_ref)^2 dx + (tikhonov / 2) |v|^2,   y_ref(x) = sin(pi x) + x

J of the exact state is a quadratic in v, so J(v) and grad J(v) are exact
(``exact_objective``, ``exact_hypergradient``); a PINN trained to its optimum
and an implicit-differentiation estimator must reproduce them. The optimum,
v0 = 2/pi + 1/6 and v1 = v0 + 1 (without Tikhonov), is asymmetric on purpose:
swapping v0 and v1 anywhere shows.

The outer integral is an n-point Gauss-Legendre rule (exact for polynomials
of degree 2n - 1; the integrand holds sin(pi x), whose rule error falls like
1/(2n)! -- below 1e-16 from n = 12 on).
"""

from __future__ import annotations

import math

import torch

from .base import Settings, check_count
from .pinn import (
    CollocationBatch,
    CollocationSet,
    ResidualProblem,
    check_layers,
    curvature_step_options,
    derivative,
    pretrain,
    tanh_mlp,
)


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [0, 1] (float64),
    from the eigenvalues of the Jacobi matrix of the Legendre recurrence (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off_diagonal = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2 * vectors[0].square()
    return (nodes + 1) / 2, weights / 2


def poisson_target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x) + x


class PoissonControl1D(ResidualProblem):
    """Args:
        layers: widths of the PINN y_theta, (1, hidden..., 1), tanh.
        n_collocation: interior points x_i = (i + 1/2) / n of the residual term.
        n_quadrature: Gauss-Legendre nodes of the outer integral.
        n_grid: evenly spaced points (ends included) of the ``state_error`` metric.
        initial_control: (v0, v1) at the start.
        tikhonov: weight of (tikhonov / 2) |v|^2 in J.
        batch_size: collocation points per inner mini-batch (interior and the
            two boundary points in proportion, at least one boundary point);
            None, or at least all points: full batch.
        pretrain_steps, pretrain_lr: full-batch Adam steps on the inner loss
            for the initial control (0 skips them).
    """

    name = "poisson"

    def __init__(self, *, layers=(1, 16, 16, 1), n_collocation: int = 32, n_quadrature: int = 24, n_grid: int = 101,
                 initial_control=(0.0, 0.0), tikhonov: float = 0.0, batch_size: int | None = None,
                 pretrain_steps: int = 1000, pretrain_lr: float = 1e-2,
                 seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(seed=seed, device=device, dtype=dtype)
        layers = check_layers("layers", layers, inputs=1, outputs=1)
        check_count("n_collocation", n_collocation)
        check_count("n_quadrature", n_quadrature)
        check_count("n_grid", n_grid, minimum=2)
        check_count("pretrain_steps", pretrain_steps, minimum=0)
        if not pretrain_lr > 0:
            raise ValueError(f"argument 'pretrain_lr' must be > 0, got {pretrain_lr!r}")
        if not (isinstance(tikhonov, (int, float)) and math.isfinite(tikhonov) and tikhonov >= 0):
            raise ValueError(f"argument 'tikhonov' must be a finite number >= 0, got {tikhonov!r}")
        control = torch.as_tensor(initial_control, dtype=torch.float64)
        if control.shape != (2,) or not bool(torch.isfinite(control).all()):
            raise ValueError(f"argument 'initial_control' must be two finite numbers (v0, v1), got {initial_control!r}")
        self.tikhonov = float(tikhonov)

        self.state_net = self.model = tanh_mlp(layers, self.generator, device=self.device, dtype=dtype)
        self.inner_params = list(self.state_net.parameters())
        self.v = self._param(control)
        self.outer_params = [self.v]

        as_column = lambda x: x.reshape(-1, 1).to(device=self.device, dtype=dtype)  # noqa: E731
        interior = (torch.arange(n_collocation, dtype=torch.float64) + 0.5) / n_collocation
        self.collocation = CollocationSet({"interior": as_column(interior), "boundary": as_column(torch.tensor([0.0, 1.0]))},
                                          # weight 2 on the mean of the two boundary squares = their sum
                                          {"interior": 1.0, "boundary": 2.0}, batch_size)
        nodes, weights = gauss_legendre(n_quadrature)
        self.quadrature_nodes, self.quadrature_weights = as_column(nodes), weights.to(device=self.device, dtype=dtype)
        self.quadrature_target = poisson_target(self.quadrature_nodes.reshape(-1))
        self.grid = as_column(torch.linspace(0, 1, n_grid, dtype=torch.float64))

        self.batch_size = self.collocation.batch_size
        # Not a task of the paper: plain-SGD settings under which CG10 reaches
        # the closed-form optimum. lambda_max of the inner Hessian is about 90,
        # so steps and Neumann-type scales are 0.01; NHGD's damping brings its
        # hypergradient near the exact one (the empirical Fisher of a PINN
        # vanishes with the residuals, see pinn.py).
        self.settings = Settings(outer_steps=50, inner_steps=20, inner_lr=0.01, outer_lr=0.5,
                                 method_options=curvature_step_options(0.01, {"beta": 0.9, "damping": 100.0},
                                                                       {"damping": 1e-3}))

        pretrain(self.inner_loss, self.inner_params, steps=pretrain_steps, lr=pretrain_lr)
        self._pretrained = [p.detach().clone() for p in self.inner_params]

    # ------------------------------------------------------------ the losses

    def state_at(self, x: torch.Tensor) -> torch.Tensor:
        """y_theta at ``x`` (n or n x 1), one value per point."""
        return self.state_net(x.reshape(-1, 1)).reshape(-1)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """y_theta'' - 2 at ``x`` (n x 1), twice differentiable in theta."""
        x = x.detach().requires_grad_(True)
        y = self.state_at(x)
        return derivative(derivative(y, x, 0), x, 0) - 2

    def sample_batch(self) -> CollocationBatch | None:
        return self.collocation.sample(self.generator)

    def inner_residuals(self, batch: CollocationBatch | None = None) -> torch.Tensor:
        """Per-point rows rho with inner_loss = mean(rho^2 / 2): y'' - 2 and the
        boundary misfits, scaled by their groups' shares."""
        interior, boundary = self.collocation.select(batch)
        # boundary points are x = 0 or x = 1: x picks the control value to match
        boundary_value = self.v[0] + (self.v[1] - self.v[0]) * boundary.reshape(-1)
        return self.collocation.rows([self.residual(interior), self.state_at(boundary) - boundary_value])

    def outer_loss(self) -> torch.Tensor:
        misfit = (self.state_at(self.quadrature_nodes) - self.quadrature_target).square()
        return self.quadrature_weights @ misfit + 0.5 * self.tikhonov * self.v.square().sum()

    # ------------------------------------------------------------- closed form

    def exact_state(self, x: torch.Tensor) -> torch.Tensor:
        """y_v(x) = x^2 + (v1 - v0 - 1) x + v0 at the current v (differentiable in v)."""
        v0, v1 = self.v[0], self.v[1]
        return x * x + (v1 - v0 - 1) * x + v0

    def _exact_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int (y_v - y_ref)^2, int (y_v - y_ref) (1 - x), int (y_v - y_ref) x), with
        y_v = x^2 + a x + c and y_ref = sin(pi x) + x, from
        int x^k = 1/(k+1), int sin(pi x) = 2/pi, int x sin(pi x) = 1/pi,
        int x^2 sin(pi x) = (pi^2 - 4)/pi^3, int sin^2(pi x) = 1/2."""
        pi = math.pi
        v = self.v.detach()
        c, a = v[0], v[1] - v[0] - 1
        sin_moments = (2 / pi, 1 / pi, (pi * pi - 4) / pi**3)  # int x^k sin(pi x), k = 0, 1, 2
        y_sq = 1 / 5 + a * a / 3 + c * c + a / 2 + 2 * c / 3 + a * c
        y_ref = (sin_moments[2] + a * sin_moments[1] + c * sin_moments[0]) + (1 / 4 + a / 3 + c / 2)
        ref_sq = 1 / 2 + 2 * sin_moments[1] + 1 / 3
        misfit = y_sq - 2 * y_ref + ref_sq
        times_1 = (1 / 3 + a / 2 + c) - (sin_moments[0] + 1 / 2)
        times_x = (1 / 4 + a / 3 + c / 2) - (sin_moments[1] + 1 / 3)
        return misfit, times_1 - times_x, times_x

    def exact_objective(self) -> torch.Tensor:
        """J(v) of the exact state, closed form (0-d tensor)."""
        misfit, _, _ = self._exact_moments()
        return misfit + 0.5 * self.tikhonov * self.v.detach().square().sum()

    def exact_hypergradient(self) -> tuple[torch.Tensor]:
        """grad J(v) = (2 int (y_v - y_ref)(1 - x), 2 int (y_v - y_ref) x) + tikhonov v."""
        _, times_phi0, times_phi1 = self._exact_moments()
        return (2 * torch.stack([times_phi0, times_phi1]) + self.tikhonov * self.v.detach(),)

    def optimal_control(self) -> torch.Tensor:
        """argmin_v J(v): (G + tikhonov/2 I) v = b, G the Gram matrix of (1 - x, x)."""
        gram = torch.tensor([[1 / 3, 1 / 6], [1 / 6, 1 / 3]], dtype=torch.float64) + 0.5 * self.tikhonov * torch.eye(2, dtype=torch.float64)
        # int (y_ref - x^2 + x) phi_i, phi = (1 - x, x)
        rhs = torch.tensor([1 / math.pi + 1 / 6 + 1 / 12, 1 / math.pi + 1 / 3 + 1 / 12], dtype=torch.float64)
        return torch.linalg.solve(gram, rhs).to(device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, float]:
        with torch.no_grad():
            outer = float(self.outer_loss())
            state_error = float((self.state_at(self.grid) - self.exact_state(self.grid.reshape(-1))).square().mean().sqrt())
        with torch.enable_grad():  # the residual needs derivatives in x
            inner = float(self.inner_loss().detach())
        return {"outer_loss": outer, "exact_objective": float(self.exact_objective()),
                "state_error": state_error, "inner_loss": inner}

    def reset_inner(self) -> None:
        """Back to the state network pretrained for the initial control."""
        with torch.no_grad():
            for p, kept in zip(self.inner_params, self._pretrained):
                p.copy_(kept)
