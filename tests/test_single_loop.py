"""Seed 003, Section 5: f(x, y) = 1/2 x^T Z x + 1/10 1^T y,
g(x, y) = 1/2 y^T Z y - L x^T y + 1^T y, Z = diag(L, mu), kappa = L / mu,
with the closed form grad Phi(x) = Z x + (L/10) Z^-1 1. With one inner step
per outer step and alpha = eta = 1/L, single-loop AID drives |grad Phi|^2 to
zero while single-loop ITD settles at a floor that grows with kappa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nhgd_ext.estimators import SingleLoopAID, SingleLoopITD

MU = 0.1


def run(cls, kappa, steps, beta=0.05, **options):
    L = kappa * MU
    Z = torch.diag(torch.tensor([L, MU], dtype=torch.float64))
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    est = cls([y], [x], inner_lr=1 / L, **options)

    def inner():
        return 0.5 * y @ Z @ y - L * (x @ y) + y.sum()

    offset = 0.1 * L * torch.linalg.solve(Z, torch.ones(2, dtype=torch.float64))
    history = []
    for _ in range(steps):
        est.inner_step(inner())
        (h,) = est.hypergradient(0.5 * x @ Z @ x + 0.1 * y.sum(), inner)
        with torch.no_grad():
            x -= beta * h
        exact = Z @ x.detach() + offset
        history.append(float(exact @ exact))
    return history


def test_single_loop_aid_converges():
    history = run(SingleLoopAID, 2, 1500, eta=1 / (2 * MU))
    assert history[-1] < 1e-6 * history[0]
    assert history[-1] < history[len(history) // 2] < history[len(history) // 4]


def test_single_loop_itd_settles_at_a_floor_growing_with_kappa():
    floors = {}
    for kappa, steps in ((2, 1500), (5, 1500)):
        history = run(SingleLoopITD, kappa, steps)
        floors[kappa] = history[-1]
        assert history[-1] > 1e-3  # does not vanish ...
        assert abs(history[-1] - history[-100]) < 1e-2 * history[-1]  # ... but has settled
    assert floors[5] > 4 * floors[2]


def test_itd_needs_an_inner_step_first():
    y = torch.zeros(2, requires_grad=True)
    x = torch.ones(2, requires_grad=True)
    est = SingleLoopITD([y], [x])
    try:
        est.hypergradient((x * y).sum(), lambda: (y**2).sum())
    except RuntimeError as err:
        assert "inner step" in str(err)
    else:
        raise AssertionError("expected a RuntimeError")


def test_itd_equals_differentiating_through_the_step_on_a_model_nonlinear_in_theta():
    """A tanh network whose L2 weight exp(v) multiplies the weights: the mixed
    derivative needs theta0's values, which the optimizer's in-place step
    overwrites. Reference: theta1(v) = theta0 - alpha grad l(v, theta0)
    built out of place, and the gradient in v of f(v, theta1(v)), float64
    (closure = the step's full-batch loss, so both see the same l)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    W1 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    W2 = torch.randn(5, generator=g, dtype=torch.float64)
    v0, alpha = torch.tensor(-1.0, dtype=torch.float64), 0.05

    def inner(v, w1, w2):
        return ((torch.tanh(X @ w1) @ w2 - y) ** 2).mean() + 0.5 * v.exp() * w1.square().sum()

    def outer(v, w1, w2):
        return (torch.tanh(X[:5] @ w1) @ w2).square().sum() + 0.1 * v**2

    v = v0.clone().requires_grad_()
    w1, w2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()
    step = torch.autograd.grad(inner(v, w1, w2), (w1, w2), create_graph=True)
    expected = torch.autograd.grad(outer(v, w1 - alpha * step[0], w2 - alpha * step[1]), v)[0]

    v = v0.clone().requires_grad_()
    p1, p2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()
    est = SingleLoopITD([p1, p2], [v])
    est.inner_step(inner(v, p1, p2), torch.optim.SGD([p1, p2], lr=alpha))
    theta1 = [p1.detach().clone(), p2.detach().clone()]
    (h,) = est.hypergradient(outer(v, p1, p2), lambda: inner(v, p1, p2))
    assert torch.allclose(h, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(p1, theta1[0]) and torch.equal(p2, theta1[1])  # theta put back after the call


def _tanh_net(g):
    X, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    theta = [torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    v0 = torch.tensor(-1.0, dtype=torch.float64)

    def inner(v, w1, w2):
        return ((torch.tanh(X @ w1) @ w2 - y) ** 2).mean() + 0.5 * v.exp() * w1.square().sum()

    def outer(v, w1, w2):
        return (torch.tanh(X[:5] @ w1) @ w2).square().sum() + 0.1 * v**2

    return v0, theta, inner, outer


def _input_scaling(g):
    """Logistic regression on inputs scaled by exp(v) per feature: v and
    theta meet inside the logits, (x * exp(v)) @ theta."""
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    theta = [torch.randn(4, 3, generator=g, dtype=torch.float64)]
    v0 = 0.3 * torch.randn(4, generator=g, dtype=torch.float64)

    def inner(v, w):
        return F.cross_entropy((X[:20] * v.exp()) @ w, y[:20]) + 1e-2 * w.square().sum()

    def outer(v, w):
        return F.cross_entropy((X[20:] * v.exp()) @ w, y[20:])

    return v0, theta, inner, outer


def _distillation(g):
    """Data distillation: the distilled images v are the inner problem's
    inputs, logits v @ theta; the outer loss is on real data."""
    Xr, yr = torch.randn(25, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (25,), generator=g)
    labels = torch.arange(3).repeat_interleave(2)
    theta = [torch.randn(6, 3, generator=g, dtype=torch.float64)]
    v0 = torch.randn(6, 6, generator=g, dtype=torch.float64)

    def inner(v, w):
        return F.cross_entropy(v @ w, labels) + 1e-3 * w.square().sum()

    def outer(v, w):
        return F.cross_entropy(Xr @ w, yr)

    return v0, theta, inner, outer


@pytest.mark.parametrize("model", [_tanh_net, _input_scaling, _distillation], ids=lambda m: m.__name__[1:])
def test_itd_equals_the_unrolled_last_step_wherever_v_and_theta_meet_in_the_forward_pass(model):
    """The unrolled float64 reference: theta1(v) = theta0 - alpha grad l(v,
    theta0) built out of place, then d/dv f(v, theta1(v)); ITD inside an
    ordinary loop (SGD steps in place, several of them, the user's code
    unchanged) must give it for the last step."""
    g = torch.Generator().manual_seed(4)
    v0, theta0, inner, outer = model(g)
    alpha = 0.05
    v = v0.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in theta0]
    est = SingleLoopITD(params, [v])
    opt = torch.optim.SGD(params, lr=alpha)
    for _ in range(3):
        est.inner_step(inner(v, *params), opt)
    before_last = [p.detach().clone() for p in params]
    est.inner_step(inner(v, *params), opt)
    (h,) = est.hypergradient(outer(v, *params), lambda: inner(v, *params))

    v_ref = v0.clone().requires_grad_()
    start = [t.clone().requires_grad_() for t in before_last]
    step = torch.autograd.grad(inner(v_ref, *start), start, create_graph=True)
    (expected,) = torch.autograd.grad(outer(v_ref, *[t - alpha * s for t, s in zip(start, step)]), v_ref)
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-14)
