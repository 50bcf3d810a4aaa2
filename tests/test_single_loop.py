"""Seed 003, Section 5: f(x, y) = 1/2 x^T Z x + 1/10 1^T y,
g(x, y) = 1/2 y^T Z y - L x^T y + 1^T y, Z = diag(L, mu), kappa = L / mu,
with the closed form grad Phi(x) = Z x + (L/10) Z^-1 1. With one inner step
per outer step and alpha = eta = 1/L, single-loop AID drives |grad Phi|^2 to
zero while single-loop ITD settles at a floor that grows with kappa."""

from __future__ import annotations

import torch

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
