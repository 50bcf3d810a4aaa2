"""The PINN problems (docs/design.md §3.5): the heat-equation control of the
paper's App. E.3 and the 1-D Poisson control with a closed-form
hypergradient. Tiny networks in float64; every derivative is checked against
central finite differences, the closed forms against quadrature."""

from __future__ import annotations

import math

import pytest
import torch

from nhgd_ext.estimators import NHGD, ConjugateGradient
from nhgd_ext.problems.pde_heat import HeatPDEControl, heat_residual, heat_target
from nhgd_ext.problems.pde_poisson import PoissonControl1D, gauss_legendre
from nhgd_ext.problems.pinn import CollocationSet, ResidualProblem, reduce_rows
from nhgd_ext.runner import METHODS, run
from nhgd_testing import minimize

F64 = torch.float64


def tiny_heat(**kwargs) -> HeatPDEControl:
    options = dict(state_layers=(3, 5, 4, 1), control_layers=(1, 3, 1), n_interior=16, n_boundary_per_side=4,
                   n_initial=8, n_test=27, batch_size=None, pretrain_steps=0, dtype=F64, seed=3)
    return HeatPDEControl(**(options | kwargs))


def tiny_poisson(**kwargs) -> PoissonControl1D:
    options = dict(layers=(1, 6, 6, 1), n_collocation=12, n_quadrature=16, pretrain_steps=0, tikhonov=0.1,
                   initial_control=(0.3, -0.4), dtype=F64, seed=5)
    return PoissonControl1D(**(options | kwargs))


# ------------------------------------------------------------ finite differences

def flat_grad(loss_fn, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                      for p, g in zip(params, grads)])


def finite_difference(fn, params, direction: torch.Tensor, h: float = 1e-5):
    """(fn(p + h d) - fn(p - h d)) / 2h, fn returning a tensor; params restored."""
    def shifted(scale):
        with torch.no_grad():
            start = 0
            for p in params:
                p.add_(direction[start:start + p.numel()].view_as(p), alpha=scale)
                start += p.numel()

    shifted(h)
    plus = fn().detach()
    shifted(-2 * h)
    minus = fn().detach()
    shifted(h)
    return (plus - minus) / (2 * h)


def fd_gradient(loss_fn, params, h: float = 1e-5) -> torch.Tensor:
    dim = sum(p.numel() for p in params)
    return torch.stack([finite_difference(loss_fn, params, torch.eye(dim, dtype=F64)[i], h) for i in range(dim)])


def assert_close(actual, expected, rtol=1e-6, atol=1e-9):
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


PROBLEMS = [pytest.param(tiny_heat, id="heat"), pytest.param(tiny_poisson, id="poisson")]


@pytest.mark.parametrize("make", PROBLEMS)
def test_first_derivatives_match_finite_differences(make):
    problem = make()
    for loss_fn in (problem.inner_loss, problem.outer_loss):
        for params in (problem.inner_params, problem.outer_params):
            assert_close(flat_grad(loss_fn, params), fd_gradient(loss_fn, params))


@pytest.mark.parametrize("make", PROBLEMS)
def test_hessian_and_cross_products_match_finite_differences(make):
    """What the estimators take from the inner loss: H w = d/dtheta <grad_theta l, w>
    and d/dv <grad_theta l, w>, against differences of grad_theta l in theta and in v."""
    problem = make()
    theta, v = problem.inner_params, problem.outer_params
    rng = torch.Generator().manual_seed(0)
    w = torch.randn(sum(p.numel() for p in theta), generator=rng, dtype=F64)
    u = torch.randn(sum(p.numel() for p in v), generator=rng, dtype=F64)

    def grad_theta():
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(problem.inner_loss(), theta, create_graph=True)])

    g = grad_theta()
    hvp = torch.cat([x.reshape(-1) for x in torch.autograd.grad(g @ w, theta, retain_graph=True)])
    cross = torch.cat([x.reshape(-1) for x in torch.autograd.grad(g @ w, v)])
    assert_close(hvp, finite_difference(grad_theta, theta, w), rtol=1e-5, atol=1e-8)
    assert_close(cross @ u, finite_difference(lambda: grad_theta() @ w, v, u), rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------- batches, seeds

@pytest.mark.parametrize("make", PROBLEMS)
@pytest.mark.parametrize("batch_size", [None, 7])
def test_per_point_losses_average_to_the_mean_loss(make, batch_size):
    problem = make(batch_size=batch_size)
    batch = problem.sample_batch()
    assert (batch is None) == (batch_size is None)
    rows = problem.inner_loss(batch, reduction="none")
    assert rows.dim() == 1 and rows.numel() == (len(problem.collocation) if batch is None else batch_size)
    assert_close(rows.mean(), problem.inner_loss(batch), rtol=1e-12, atol=0)
    assert_close(problem.inner_residuals(batch).square() / 2, rows, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        problem.inner_loss(batch, reduction="sum")


def test_mini_batch_rows_weigh_each_group_by_its_share():
    """Batch of 3 + 1 points from groups of 6 and 2 with weights 1 and 2: the
    boundary row carries 2 * 4/1, an interior row 1 * 4/3."""
    groups = {"interior": torch.arange(6.0, dtype=F64).reshape(-1, 1), "boundary": torch.tensor([[10.0], [20.0]], dtype=F64)}
    points = CollocationSet(groups, {"interior": 1.0, "boundary": 2.0}, batch_size=4)
    assert points.batch_counts == [3, 1]
    interior, boundary = points.select(points.sample(torch.Generator().manual_seed(1)))
    rows = reduce_rows(points.rows([interior.reshape(-1), boundary.reshape(-1)]), "none")
    assert_close(rows, torch.cat([interior.reshape(-1) ** 2 * 4 / 3, boundary.reshape(-1) ** 2 * 8]), rtol=1e-14, atol=0)
    # a batch of every point is the full batch
    assert CollocationSet(groups, {"interior": 1.0, "boundary": 2.0}, batch_size=8).sample(torch.Generator()) is None


@pytest.mark.parametrize("make", PROBLEMS)
def test_same_seed_same_problem_and_batches(make):
    first, second, other = make(batch_size=9), make(batch_size=9), make(batch_size=9, seed=11)
    for name, value in first.state().items():
        assert value.dtype == F64
        assert torch.equal(value, second.state()[name])
    assert not all(torch.equal(value, other.state()[name]) for name, value in first.state().items())
    for a, b in zip(first.collocation.groups, second.collocation.groups):
        assert a.dtype == F64 and torch.equal(a, b)
    for _ in range(3):
        batch_a, batch_b = first.sample_batch(), second.sample_batch()
        assert all(torch.equal(a, b) for a, b in zip(batch_a, batch_b))
        assert sum(len(index) for index in batch_a) == 9
        assert all(len(index) >= 1 and len(set(index.tolist())) == len(index) for index in batch_a)
    assert torch.equal(first.inner_loss(batch_a), second.inner_loss(batch_b))
    assert first.metrics() == second.metrics()


# ------------------------------------------------------------------------ heat

def test_heat_target_vanishes_on_the_boundary_and_at_time_zero():
    problem = tiny_heat(n_boundary_per_side=32, n_initial=32)
    _, boundary, initial = problem.collocation.groups
    assert boundary.shape == (4 * 32, 3) and initial.shape == (32, 3)
    on_side = (boundary[:, :2] == 0) | (boundary[:, :2] == 1)
    assert bool(on_side.any(dim=1).all()) and bool((initial[:, 2] == 0).all())
    assert heat_target(boundary).abs().max() < 1e-15
    assert heat_target(initial).abs().max() < 1e-15
    assert float(heat_target(torch.tensor([[0.5, 0.5, 0.5]], dtype=F64))) == pytest.approx(1.0)


def test_heat_points_lie_in_the_domain_and_the_test_grid_is_uniform():
    problem = tiny_heat()
    interior, boundary, initial = problem.collocation.groups
    for points in (interior, boundary, initial, problem.test_points):
        assert bool((points[:, :2] >= 0).all() and (points[:, :2] <= 1).all())
        assert bool((points[:, 2] >= 0).all() and (points[:, 2] <= 2).all())
    assert problem.test_points.shape == (27, 3)
    assert sorted(set(problem.test_points[:, 2].tolist())) == pytest.approx([1 / 3, 1.0, 5 / 3])


def test_heat_residual_on_an_analytic_function():
    """u = sin(x) cos(2y) e^t: u_t = u, Laplacian = -5 u, so F = u (1 + 5 nu) - f."""
    rng = torch.Generator().manual_seed(2)
    points = torch.rand(20, 3, generator=rng, dtype=F64)
    forcing = torch.rand(20, generator=rng, dtype=F64)
    amplitude = torch.tensor(1.5, dtype=F64, requires_grad=True)

    def state(p):
        return amplitude * torch.sin(p[:, 0]) * torch.cos(2 * p[:, 1]) * torch.exp(p[:, 2])

    nu = 0.3
    residual = heat_residual(state, points, forcing, nu)
    assert_close(residual, state(points).detach() * (1 + 5 * nu) - forcing, rtol=1e-12, atol=1e-12)
    # the residual keeps its graph: d residual / d amplitude = u / amplitude * (1 + 5 nu)
    (slope,) = torch.autograd.grad(residual.sum(), amplitude)
    with torch.no_grad():
        expected_slope = state(points).sum() / amplitude * (1 + 5 * nu)
    assert float(slope) == pytest.approx(float(expected_slope), rel=1e-12)


def test_heat_inner_loss_is_the_sum_of_three_mean_squares():
    problem = tiny_heat()
    interior, boundary, initial = problem.collocation.groups
    expected = (problem.residual(interior).square().mean() + problem.state_at(boundary).square().mean()
                + problem.state_at(initial).square().mean()).detach()
    assert_close(problem.inner_loss(), expected, rtol=1e-14, atol=0)
    metrics = problem.metrics()
    error = problem.state_at(problem.test_points).detach() - heat_target(problem.test_points)
    assert metrics["outer_loss"] == pytest.approx(float(error.square().mean()), rel=1e-12)
    assert metrics["test_error"] == pytest.approx(float(error.norm() / heat_target(problem.test_points).norm()), rel=1e-12)
    assert metrics["inner_loss"] == pytest.approx(float(expected), rel=1e-12)


def test_heat_pretraining_lowers_the_inner_loss_and_reset_returns_to_it():
    untrained, trained = tiny_heat(), tiny_heat(pretrain_steps=30, pretrain_lr=1e-2)
    before, after = float(untrained.inner_loss().detach()), float(trained.inner_loss().detach())
    assert after < 0.5 * before
    with torch.no_grad():
        trained.inner_params[0].add_(1.0)
    trained.reset_inner()
    assert float(trained.inner_loss().detach()) == after


# --------------------------------------------------------------------- Poisson

def test_gauss_legendre_is_exact_to_degree_2n_minus_1():
    nodes, weights = gauss_legendre(5)
    for degree in range(10):
        assert float(weights @ nodes**degree) == pytest.approx(1 / (degree + 1), rel=1e-14)
    assert float(weights @ nodes**10) != pytest.approx(1 / 11, rel=1e-9)


@pytest.mark.parametrize("control", [(0.0, 0.0), (0.3, -0.4), (2.0, 1.0)])
def test_poisson_closed_forms_match_quadrature_and_finite_differences(control):
    problem = tiny_poisson(initial_control=control)
    x, w = gauss_legendre(40)
    with torch.no_grad():
        quadrature = w @ (problem.exact_state(x) - torch.sin(math.pi * x) - x).square()
    expected = quadrature + 0.5 * problem.tikhonov * problem.v.detach().square().sum()
    assert float(problem.exact_objective()) == pytest.approx(float(expected), rel=1e-13, abs=1e-15)
    (exact,) = problem.exact_hypergradient()
    assert_close(exact, fd_gradient(problem.exact_objective, problem.outer_params, h=1e-4), rtol=1e-9, atol=1e-10)
    # the state solves the boundary-value problem
    assert float(problem.exact_state(torch.tensor(0.0, dtype=F64)).detach()) == pytest.approx(control[0])
    assert float(problem.exact_state(torch.tensor(1.0, dtype=F64)).detach()) == pytest.approx(control[1])


@pytest.mark.parametrize("tikhonov", [0.0, 0.1])
def test_poisson_optimal_control_zeroes_the_exact_gradient(tikhonov):
    problem = tiny_poisson(tikhonov=tikhonov)
    optimum = problem.optimal_control()
    if tikhonov == 0:
        assert_close(optimum, torch.tensor([2 / math.pi + 1 / 6, 2 / math.pi + 7 / 6], dtype=F64), rtol=1e-14)
    with torch.no_grad():
        problem.v.copy_(optimum)
    assert float(problem.exact_hypergradient()[0].abs().max()) < 1e-14


def test_poisson_implicit_hypergradient_of_a_trained_pinn_is_the_exact_one():
    problem = _trained_poisson(0)
    metrics = problem.metrics()
    assert metrics["inner_loss"] < 1e-5 and metrics["state_error"] < 1e-3
    assert metrics["outer_loss"] == pytest.approx(metrics["exact_objective"], rel=1e-3)
    estimator = ConjugateGradient(problem.inner_params, problem.outer_params, iters=100, tol=1e-14)
    (estimate,) = estimator.hypergradient(problem.outer_loss(), problem.inner_loss)
    (exact,) = problem.exact_hypergradient()
    assert float(estimate @ exact / (estimate.norm() * exact.norm())) > 0.99
    assert float((estimate - exact).norm() / exact.norm()) < 0.02


def _trained_poisson(seed: int) -> PoissonControl1D:
    problem = tiny_poisson(tikhonov=0.0, n_collocation=16, seed=seed)
    minimize(problem.inner_loss, problem.inner_params, max_iter=400, tolerance_grad=1e-12, tolerance_change=0,
             history_size=50)
    return problem


def _nhgd_error_on_a_trained_pinn(problem: PoissonControl1D, fisher: str, seed: int) -> float:
    """Relative error of NHGD's hypergradient after 200 inner steps that
    barely move theta from the PINN's solution, fed the residual rows."""
    estimator = NHGD(problem.inner_params, problem.outer_params, fisher=fisher, likelihood="gaussian", damping=1e-3,
                     beta=None, per_sample=False, seed=seed)
    optimizer = torch.optim.SGD(problem.inner_params, lr=1e-6)
    for _ in range(200):
        loss, rows = problem.inner_loss_and_outputs()
        estimator.inner_step(loss, optimizer, batch_size=rows.numel(), outputs=rows)
    (estimate,) = estimator.hypergradient(problem.outer_loss(), problem.inner_loss)
    (exact,) = problem.exact_hypergradient()
    return float((estimate - exact).norm() / exact.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_fisher_of_the_residual_rows_gives_the_exact_hypergradient(seed):
    """The rows as Gaussian means: the sampled Fisher's expectation is the
    Gauss-Newton matrix, the Hessian at a zero-residual solution. The
    empirical Fisher, rho^2 grad rho grad rho^T, vanishes with the residuals:
    at the same damping its solve is orders of magnitude too large."""
    sampled = _nhgd_error_on_a_trained_pinn(_trained_poisson(seed), "sampled", seed)
    assert sampled < 0.25
    if seed == 0:
        assert _nhgd_error_on_a_trained_pinn(_trained_poisson(seed), "empirical", seed) > 100


def test_poisson_boundary_terms_pull_toward_the_control():
    problem = tiny_poisson(tikhonov=0.0)
    expected = (problem.residual(problem.collocation.groups[0]).square().mean()
                + (problem.state_at(torch.tensor([0.0], dtype=F64)) - problem.v[0]).square().sum()
                + (problem.state_at(torch.tensor([1.0], dtype=F64)) - problem.v[1]).square().sum())
    assert_close(problem.inner_loss(), expected, rtol=1e-14, atol=0)


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, kwargs, argument", [
    (HeatPDEControl, {"nu": 0.0}, "nu"),
    (HeatPDEControl, {"nu": -1e-3}, "nu"),
    (HeatPDEControl, {"state_layers": (2, 8, 1)}, "state_layers"),
    (HeatPDEControl, {"state_layers": (3, 0, 1)}, "state_layers"),
    (HeatPDEControl, {"state_layers": (3,)}, "state_layers"),
    (HeatPDEControl, {"control_layers": (1, 4, 2)}, "control_layers"),
    (HeatPDEControl, {"control_layers": 5}, "control_layers"),
    (HeatPDEControl, {"n_interior": 0}, "n_interior"),
    (HeatPDEControl, {"n_boundary_per_side": -4}, "n_boundary_per_side"),
    (HeatPDEControl, {"n_initial": 0}, "n_initial"),
    (HeatPDEControl, {"n_test": 30}, "n_test"),
    (HeatPDEControl, {"batch_size": 0}, "batch_size"),
    (HeatPDEControl, {"batch_size": 2}, "batch_size"),
    (HeatPDEControl, {"pretrain_steps": -1}, "pretrain_steps"),
    (PoissonControl1D, {"layers": (1, 8, 2)}, "layers"),
    (PoissonControl1D, {"layers": (1, 8.5, 1)}, "layers"),
    (PoissonControl1D, {"n_collocation": 0}, "n_collocation"),
    (PoissonControl1D, {"n_quadrature": 0}, "n_quadrature"),
    (PoissonControl1D, {"n_grid": 1}, "n_grid"),
    (PoissonControl1D, {"initial_control": (1.0,)}, "initial_control"),
    (PoissonControl1D, {"tikhonov": -0.1}, "tikhonov"),
    (PoissonControl1D, {"batch_size": 1}, "batch_size"),
])
def test_bad_constructor_arguments_name_the_argument(make, kwargs, argument):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        make(pretrain_steps=0, **kwargs) if "pretrain_steps" not in kwargs else make(**kwargs)


# ------------------------------------------------------------------ the runner

@pytest.mark.parametrize("method", [m for m in METHODS if m not in ResidualProblem.unsupported_methods])
@pytest.mark.parametrize("make", PROBLEMS)
def test_every_method_of_the_runner_runs_on_the_pinn_problems(make, method):
    """All but what the PINNs refuse up front (tests/test_cli.py: nhgd-kfac)."""
    history = run(make(batch_size=9), method, outer_steps=2, inner_steps=2)
    assert len(history.rows) == 3
    assert all(math.isfinite(value) for value in history.final.values())
