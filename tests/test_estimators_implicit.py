"""CG, Neumann and NHGD against closed-form hypergradients (float64)."""

from __future__ import annotations

import pytest
import torch

from nhgd_ext.estimators import NHGD, Broyden, ConjugateGradient, Neumann
from nhgd_testing import gen, minimize


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


class Quadratic:
    """l(v, theta) = 1/2 theta^T H theta - theta^T (B v + c),
    f(v, theta) = 1/2 |theta - t|^2 + rho/2 |v|^2:
    grad Phi(v) = rho v + B^T H^-1 (theta*(v) - t), theta*(v) = H^-1 (B v + c)."""

    def __init__(self, p=12, q=4, eigs=None, seed=0, B=None):
        rng = gen(seed)
        Q = torch.linalg.qr(torch.randn(p, p, generator=rng, dtype=torch.float64))[0]
        lam = torch.linspace(0.5, 4.0, p, dtype=torch.float64) if eigs is None else eigs
        self.H = Q @ torch.diag(lam) @ Q.T if eigs is None else torch.diag(lam)
        self.B = torch.randn(p, q, generator=rng, dtype=torch.float64) if B is None else B
        self.c = torch.randn(p, generator=rng, dtype=torch.float64)
        self.t = torch.randn(p, generator=rng, dtype=torch.float64)
        self.rho = 0.3
        self.v = torch.randn(q, generator=rng, dtype=torch.float64).requires_grad_()
        self.theta = torch.linalg.solve(self.H, self.B @ self.v.detach() + self.c).requires_grad_()

    def inner(self):
        return 0.5 * self.theta @ self.H @ self.theta - self.theta @ (self.B @ self.v + self.c)

    def outer(self):
        return 0.5 * (self.theta - self.t).pow(2).sum() + 0.5 * self.rho * self.v.pow(2).sum()

    def exact(self):
        v = self.v.detach()
        theta_star = torch.linalg.solve(self.H, self.B @ v + self.c)
        return self.rho * v + self.B.T @ torch.linalg.solve(self.H, theta_star - self.t)


def test_cg_equals_exact_on_quadratic():
    prob = Quadratic()
    est = ConjugateGradient([prob.theta], [prob.v], iters=40, tol=1e-14)
    (h,) = est.hypergradient(prob.outer(), prob.inner)
    assert torch.allclose(h, prob.exact(), rtol=0, atol=1e-8)


def test_cg_equals_exact_on_softmax_regression():
    rng = gen(1)
    n, dim, k = 60, 5, 3
    X = torch.randn(n, dim, generator=rng, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=rng)
    Xv = torch.randn(20, dim, generator=rng, dtype=torch.float64)
    yv = torch.randint(0, k, (20,), generator=rng)
    log_lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)  # the outer variable: L2 weight
    W = torch.zeros(dim, k, dtype=torch.float64, requires_grad=True)

    def inner():
        return torch.nn.functional.cross_entropy(X @ W, y) + 0.5 * log_lam.exp() * W.pow(2).sum()

    minimize(inner, [W], max_iter=500, tolerance_grad=1e-14, tolerance_change=0)
    outer = torch.nn.functional.cross_entropy(Xv @ W, yv)
    # exact: dense Hessian of the inner problem in float64 (fine at this size)
    Hess = torch.autograd.functional.hessian(lambda w: torch.nn.functional.cross_entropy(X @ w, y)
                                             + 0.5 * log_lam.detach().exp() * w.pow(2).sum(), W.detach())
    Hess = Hess.reshape(dim * k, dim * k)
    f_theta = torch.autograd.grad(outer, W, retain_graph=True)[0].reshape(-1)
    w = torch.linalg.solve(Hess, f_theta)
    exact = -(log_lam.detach().exp() * W.detach().reshape(-1) @ w)  # d/dlog_lam of grad_W l = lam W
    est = ConjugateGradient([W], [log_lam], iters=100, tol=1e-14)
    (h,) = est.hypergradient(outer, inner)
    assert abs(float(h) - float(exact)) < 1e-8 * max(1.0, abs(float(exact)))


@pytest.mark.parametrize("iters", [0, 3, 10])
def test_neumann_error_is_one_minus_phi_lambda_to_the_k_plus_one(iters):
    p = 6
    lam = torch.tensor([0.5, 0.8, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    prob = Quadratic(p=p, q=p, eigs=lam, B=torch.eye(p, dtype=torch.float64), seed=2)
    phi = 0.3  # < 2 / lambda_max
    est = Neumann([prob.theta], [prob.v], iters=iters, scale=phi)
    (h,) = est.hypergradient(prob.outer(), prob.inner)
    f_theta = (prob.theta - prob.t).detach()
    expected_error = -((1 - phi * lam) ** (iters + 1)) * f_theta / lam  # per coordinate, B = I
    assert torch.allclose(h - prob.exact(), expected_error, rtol=1e-10, atol=1e-12)


class WellSpecifiedRegression:
    """y = x^T theta0 + eps, eps ~ N(0, 1); the outer variable shifts the model:
    l(v, theta; x, y) = 1/2 (y - x^T (theta + C v))^2. The model is well
    specified for every v, so the Fisher equals the Hessian E[x x^T] at
    theta*(v) = theta0 - C v. f = 1/2 |theta - t|^2 + rho/2 |v|^2:
    grad Phi = rho v - C^T (theta*(v) - t)."""

    def __init__(self, n=20000, p=5, q=3, seed=3):
        rng = gen(seed)
        self.X = torch.randn(n, p, generator=rng, dtype=torch.float64) @ torch.diag(torch.linspace(0.7, 1.5, p, dtype=torch.float64))
        theta0 = torch.randn(p, generator=rng, dtype=torch.float64)
        self.y = self.X @ theta0 + torch.randn(n, generator=rng, dtype=torch.float64)
        self.C = torch.randn(p, q, generator=rng, dtype=torch.float64)
        self.t = torch.randn(p, generator=rng, dtype=torch.float64)
        self.rho = 0.5
        self.v = torch.randn(q, generator=rng, dtype=torch.float64).requires_grad_()
        Sigma = self.X.T @ self.X / n
        theta_star = torch.linalg.solve(Sigma, self.X.T @ self.y / n) - self.C @ self.v.detach()
        self.theta = theta_star.clone().requires_grad_()
        self.exact = self.rho * self.v.detach() - self.C.T @ (theta_star - self.t)
        self.rng = gen(seed + 1)

    def losses(self, idx=None):
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        return 0.5 * (y - X @ (self.theta + self.C @ self.v)).pow(2)

    def batch(self, size):
        return torch.randint(0, self.X.shape[0], (size,), generator=self.rng)

    def outer(self):
        return 0.5 * (self.theta - self.t).pow(2).sum() + 0.5 * self.rho * self.v.pow(2).sum()


@pytest.mark.parametrize("feed", ["batch_mean", "per_sample"])
def test_nhgd_converges_to_exact_on_well_specified_model(feed):
    prob = WellSpecifiedRegression()
    est = NHGD([prob.theta], [prob.v], damping=1e-4, inner_lr=0.01)
    D = 32
    for _ in range(1500):
        losses = prob.losses(prob.batch(D))
        if feed == "batch_mean":
            est.inner_step(losses.mean(), batch_size=D)
        else:
            est.inner_step(losses)
    (h,) = est.hypergradient(prob.outer(), lambda: prob.losses().mean())
    assert cosine(h, prob.exact) > 0.98
    assert float((h - prob.exact).norm() / prob.exact.norm()) < 0.15


def test_nhgd_without_batch_scaling_is_wrong():
    """The negative control: batch means fed as if they were single samples
    make the inverse D times too large, and the hypergradient misses."""
    prob = WellSpecifiedRegression()
    est = NHGD([prob.theta], [prob.v], damping=1e-4, inner_lr=0.01)
    for _ in range(1500):
        est.inner_step(prob.losses(prob.batch(32)).mean(), batch_size=1)
    (h,) = est.hypergradient(prob.outer(), lambda: prob.losses().mean())
    assert float((h - prob.exact).norm() / prob.exact.norm()) > 0.5


def test_backward_accumulates_into_grad():
    prob = Quadratic(seed=4)
    est = ConjugateGradient([prob.theta], [prob.v], iters=40, tol=1e-14)
    prob.v.grad = torch.ones_like(prob.v)
    est.backward(prob.outer(), prob.inner)
    assert torch.allclose(prob.v.grad, 1 + prob.exact(), atol=1e-8)


def test_inner_step_steps_theta_and_writes_grad():
    prob = Quadratic(seed=5)
    with torch.no_grad():
        prob.theta.add_(1.0)
    before = prob.theta.detach().clone()
    est = Neumann([prob.theta], [prob.v], inner_lr=0.05)
    loss = est.inner_step(prob.inner())
    assert not loss.requires_grad
    g = prob.H @ before - (prob.B @ prob.v.detach() + prob.c)
    assert torch.allclose(prob.theta.grad, g)
    assert torch.allclose(prob.theta.detach(), before - 0.05 * g)


@pytest.mark.parametrize("memory", [30, 5])
def test_broyden_solves_the_linear_system(memory):
    prob = Quadratic(seed=7)
    est = Broyden([prob.theta], [prob.v], memory=memory, iters=80)
    (h,) = est.hypergradient(prob.outer(), prob.inner)
    assert torch.allclose(h, prob.exact(), rtol=0, atol=1e-8)
    if memory == 5:
        assert est.num_restarts > 0  # the memory filled up and the estimate restarted


def test_broyden_guards_against_divergence_and_returns_its_best_iterate():
    prob = Quadratic(seed=8)
    est = Broyden([prob.theta], [prob.v], alpha=1e9, iters=5)  # every step overshoots by far
    (h,) = est.hypergradient(prob.outer(), prob.inner)
    assert est.num_restarts > 0
    assert bool(torch.isfinite(h).all())
    # no step ever lowered the residual: the best iterate is the start, w = 0
    assert torch.allclose(h, prob.rho * prob.v.detach(), rtol=0, atol=1e-12)
