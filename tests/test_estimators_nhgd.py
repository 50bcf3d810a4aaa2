"""NHGD's options: the sampled Fisher, the trajectory cross term, K-FAC by name
(float64 references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_estimators_implicit import Quadratic
from torch import nn

from nhgd_ext.curvature import KFAC
from nhgd_ext.estimators import NHGD
from nhgd_ext.estimators.base import grads_or_zeros
from nhgd_testing import gen, misspecified_fisher_error


def test_sampled_fisher_stays_close_where_the_empirical_one_drifts():
    """Label noise makes the softmax model misspecified: the empirical Fisher
    is no longer the Hessian at theta*, the sampled one (its expectation is the
    Gauss-Newton matrix, here the Hessian itself) still is."""
    seeds = (0, 1, 2)
    empirical = sum(misspecified_fisher_error(0.2, "empirical", seed=s) for s in seeds) / len(seeds)
    sampled = sum(misspecified_fisher_error(0.2, "sampled", seed=s) for s in seeds) / len(seeds)
    assert sampled < 0.15
    assert empirical > 3 * sampled


def test_sampled_fisher_of_a_linear_softmax_model_converges_to_the_hessian():
    """Targets drawn from the model: the mean of the per-sample outer products
    tends to sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T / n, the exact Hessian."""
    rng = gen(3)
    n, dim, k = 50, 3, 4
    X = torch.randn(n, dim, generator=rng, dtype=torch.float64)
    W = (0.7 * torch.randn(k, dim, generator=rng, dtype=torch.float64)).requires_grad_()
    v = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    est = NHGD([W], [v], fisher="sampled", damping=1e-9, seed=5, inner_lr=1e-300)
    draws = 400
    for _ in range(draws):  # theta does not move (lr ~ 0): the same n samples, fresh targets
        out = X @ W.T + v
        est.inner_step(F.cross_entropy(out, torch.zeros(n, dtype=torch.long), reduction="none"), outputs=out)
    p = torch.softmax(X @ W.detach().T, 1)
    H = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(X[i], X[i])) for i in range(n)) / n
    fisher = torch.linalg.inv(est.curvature.inverse) - 1e-9 * torch.eye(k * dim, dtype=torch.float64)
    # 20000 draws of a d = 12 matrix: sampling error ~ 1/sqrt(20000)
    assert float((fisher - H).norm() / H.norm()) < 0.05


def test_sampled_fisher_needs_the_outputs_and_leaves_theta_unchanged():
    prob = Quadratic(seed=11)
    est = NHGD([prob.theta], [prob.v], fisher="sampled")
    before = prob.theta.detach().clone()
    with pytest.raises(ValueError, match="'outputs'"):
        est.inner_step(prob.inner(), batch_size=1)
    assert torch.equal(prob.theta.detach(), before)
    assert est.curvature.num_updates == 0


def test_gaussian_sampled_fisher_is_the_gauss_newton_matrix():
    """Linear regression with unit-variance Gaussian noise: J = X, so the
    sampled Fisher tends to X^T X / n whatever the labels are."""
    rng = gen(4)
    n, dim = 40, 5
    X = torch.randn(n, dim, generator=rng, dtype=torch.float64)
    y = 10 * torch.randn(n, generator=rng, dtype=torch.float64)  # far from the model: EF would be huge
    theta = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    est = NHGD([theta], [v], fisher="sampled", likelihood="gaussian", damping=1e-9, seed=2, inner_lr=1e-300)
    for _ in range(500):
        out = X @ theta + v
        est.inner_step(0.5 * (out - y).pow(2), outputs=out)
    fisher = torch.linalg.inv(est.curvature.inverse)
    G = X.T @ X / n
    assert float((fisher - G).norm() / G.norm()) < 0.05


class Curved:
    """A problem whose mixed derivative changes along the trajectory:
    l(v, theta; x) = 1/2 |theta|^2 + log(1 + exp(x^T theta)) * (c^T v),
    f = 1/2 |theta - t|^2 + 1/2 |v|^2."""

    def __init__(self, p=5, q=3, seed=6):
        rng = gen(seed)
        self.X = torch.randn(64, p, generator=rng, dtype=torch.float64)
        self.c = torch.rand(q, generator=rng, dtype=torch.float64)
        self.t = torch.randn(p, generator=rng, dtype=torch.float64)
        self.theta = torch.randn(p, generator=rng, dtype=torch.float64).requires_grad_()
        self.v = torch.rand(q, generator=rng, dtype=torch.float64).requires_grad_()

    def loss(self, theta=None, v=None, idx=slice(None)):
        theta = self.theta if theta is None else theta
        v = self.v if v is None else v
        return 0.5 * theta.pow(2).sum() + F.softplus(self.X[idx] @ theta).mean() * (self.c @ v)

    def mixed(self, idx):
        """d2 l / dv dtheta (q x p) by the float64 autograd Jacobian of grad_v."""
        def g_v(th):
            v = self.v.detach().clone().requires_grad_()
            return torch.autograd.grad(self.loss(th, v, idx), v, create_graph=True)[0]

        return torch.autograd.functional.jacobian(g_v, self.theta.detach().clone())

    def outer(self):
        return 0.5 * (self.theta - self.t).pow(2).sum() + 0.5 * self.v.pow(2).sum()


@pytest.mark.parametrize("beta", [None, 0.8])
def test_trajectory_cross_is_the_average_of_the_steps_mixed_derivatives(beta):
    prob = Curved()
    est = NHGD([prob.theta], [prob.v], cross="trajectory", beta=beta, inner_lr=0.3)
    expected = None
    for t in range(7):
        idx = slice(8 * t, 8 * t + 8)
        B = prob.mixed(idx)
        if expected is None:
            expected = B
        elif beta is None:
            expected = (t * expected + B) / (t + 1)
        else:
            expected = beta * expected + (1 - beta) * B
        est.inner_step(prob.loss(idx=idx), batch_size=1)
    assert torch.allclose(est._L, expected, rtol=1e-12, atol=1e-14)
    f_theta = (prob.theta - prob.t).detach()
    w = est.curvature.solve(f_theta)
    (h,) = est.hypergradient(prob.outer(), lambda: pytest.fail("trajectory form calls no closure"))
    assert torch.allclose(h, prob.v.detach() - expected @ w, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="no inner step"):  # the average restarts with the next inner loop
        est.hypergradient(prob.outer(), prob.loss)


def test_trajectory_and_end_agree_where_the_mixed_derivative_is_constant():
    prob = Quadratic(seed=12)
    ends, trajectories = NHGD([prob.theta], [prob.v]), NHGD([prob.theta], [prob.v], cross="trajectory")
    for _ in range(5):  # both fed the same steps through observe, theta moved by hand
        loss = prob.inner()
        g = torch.autograd.grad(loss, prob.theta, create_graph=True)[0]
        mixed = torch.stack([torch.autograd.grad(g[i], prob.v, retain_graph=True)[0] for i in range(g.numel())]).T
        ends.observe([g.detach()])
        trajectories.observe([g.detach()], cross=mixed)
        with torch.no_grad():
            prob.theta.sub_(0.05 * g)
    (a,) = ends.hypergradient(prob.outer(), prob.inner)
    (b,) = trajectories.hypergradient(prob.outer(), prob.inner)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_kfac_by_name_equals_an_explicit_kfac_curvature():
    X = torch.randn(32, 4, generator=gen(7), dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen(8))
    results = []
    for by_name in (True, False):
        model = mlp()
        shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # outer: a logit offset
        params = list(model.parameters())
        curvature = "kfac" if by_name else KFAC(model, params=params, beta=0.95, damping=1e-3)
        est = NHGD(params, [shift], curvature=curvature, modules=model if by_name else None)
        for t in range(4):
            est.inner_step(F.cross_entropy(model(X[8 * t:8 * t + 8]) + shift, y[8 * t:8 * t + 8]), batch_size=8)
        results.append(est.hypergradient(F.cross_entropy(model(X) + shift, y), lambda: F.cross_entropy(model(X) + shift, y))[0])
    assert torch.equal(results[0], results[1])


def test_kfac_needs_modules():
    model = mlp()
    with pytest.raises(ValueError, match="'modules'"):
        NHGD(list(model.parameters()), [torch.zeros(1, requires_grad=True)], curvature="kfac")


def test_kfac_records_the_sampled_output_gradients():
    """One layer, logits = layer(x): the per-sample output gradient of the
    cross-entropy at a sampled target is p - onehot(y~), whatever the labels."""
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    X = torch.randn(16, 4, generator=gen(9), dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen(10))
    shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    est = NHGD(list(layer.parameters()), [shift], curvature="kfac", modules=layer, beta=0.9,
               fisher="sampled", seed=3)
    out = layer(X) + shift
    p = torch.softmax(out.detach(), 1)
    est.inner_step(F.cross_entropy(out, y), outputs=out, batch_size=16)
    drawn = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    delta = p - F.one_hot(drawn, 3).double()
    assert torch.allclose(est.curvature.layers[0].G, 0.1 * delta.T @ delta / 16, rtol=1e-12, atol=1e-15)


def test_kfac_with_trajectory_cross_keeps_the_loss_gradients_of_the_step():
    X = torch.randn(8, 4, generator=gen(11), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen(12))
    G = []
    for cross in ("end", "trajectory"):
        model = mlp(seed=3)
        shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        est = NHGD(list(model.parameters()), [shift], curvature="kfac", modules=model, cross=cross)
        est.inner_step(F.cross_entropy(model(X) + shift, y), batch_size=8)
        G.append([layer.G.clone() for layer in est.curvature.layers])
    for a, b in zip(*G):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option, value", [("fisher", "true"), ("cross", "middle"), ("likelihood", "poisson"),
                                           ("curvature", "diagonal")])
def test_bad_options_are_named(option, value):
    prob = Quadratic(seed=13)
    with pytest.raises(ValueError, match=f"'{option}'"):
        NHGD([prob.theta], [prob.v], **{option: value})


def test_state_dict_carries_the_trajectory_average():
    prob = Curved()
    est = NHGD([prob.theta], [prob.v], cross="trajectory")
    est.inner_step(prob.loss(idx=slice(0, 8)), batch_size=8)
    state = est.state_dict()
    other = NHGD([prob.theta], [prob.v], cross="trajectory")
    other.load_state_dict(state)
    assert torch.equal(other._L, est._L) and other._cross_steps == 1


class RowsRecorder:
    """A curvature that keeps the per-sample rows it is fed (into ``fed``)
    and refuses everything else."""

    takes_rows = True

    def __init__(self, fed: list):
        self.fed = fed

    def update_many(self, rows, per_step=True):
        self.fed.append(rows)

    def update(self, g, batch_size=1):
        raise AssertionError("rows expected")

    def solve(self, v):
        raise AssertionError("not called here")

    def reset(self):
        raise AssertionError("not called here")


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_per_sample_rows_from_the_layers_equal_autograds(fisher):
    """Rows assembled from the nn.Linear hooks (with the regularizer's share,
    which every sample has, restored from the mean gradient) against the
    batched backward of autograd, on a weighted loss like hyper-data
    cleaning's."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = list(model.parameters())
    v = torch.randn(12, dtype=torch.float64, requires_grad=True)  # per-sample weights
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    fed = []

    for modules in (model, None):
        est = NHGD(params, [v], curvature=RowsRecorder(fed), modules=modules, fisher=fisher, seed=1)
        assert (est._layer_rows is not None) == (modules is not None)
        out = model(X)
        losses = torch.sigmoid(v) * F.cross_entropy(out, y, reduction="none") + 0.1 * sum(p.pow(2).sum() for p in params)
        grads = torch.autograd.grad(losses.mean(), params, retain_graph=True)  # the hooks record this pass
        extras = est._observations(losses, losses.mean(), out, grads)  # what inner_step hands observe
        est.observe([g.detach() for g in grads], **extras)
        est.close()
    from_layers, from_autograd = fed
    assert from_layers.shape == from_autograd.shape == (12, sum(p.numel() for p in params))
    assert torch.allclose(from_layers, from_autograd, rtol=1e-12, atol=1e-12)


def test_layer_rows_fall_back_where_the_loss_differentiates_through_the_inputs():
    """A PINN-like loss (the square of du/dx per point) reaches the weights
    through the derivative graph too, which the hooks do not see: the first
    step finds the mismatch, warns, and the rows come from autograd."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    params = list(model.parameters())
    v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    fed = []

    est = NHGD(params, [v], curvature=RowsRecorder(fed), modules=model)

    def losses():
        x = torch.linspace(-1, 1, 9, dtype=torch.float64).unsqueeze(1).requires_grad_()
        du = torch.autograd.grad(model(x).sum(), x, create_graph=True)[0]
        return (du.squeeze(1) - v).pow(2)

    with pytest.warns(RuntimeWarning, match="do not match"):
        args, extras = _step_feed(est, losses(), params)
        est.observe(*args, **extras)
    assert est._layer_rows is None
    loss = losses()
    exact = torch.stack([torch.cat([g.reshape(-1) for g in grads_or_zeros(loss[i], params, retain_graph=True)])
                         for i in range(9)])
    assert torch.allclose(fed[0], exact, rtol=1e-12, atol=1e-12)


def _step_feed(est, losses, params):
    grads = grads_or_zeros(losses.mean(), params, retain_graph=True)
    return ([g.detach() for g in grads],), est._observations(losses, losses.mean(), None, grads)


def test_the_curvature_protocol_is_what_nhgd_accepts():
    """DenseEFIM, KFAC and a Pipeline are Curvatures; an object missing a
    required method is refused by NHGD, naming what it needs."""
    import torch.nn as nn

    from nhgd_ext.curvature import KFAC, Curvature, DenseEFIM
    from nhgd_ext.pipeline import Pipeline

    dense = DenseEFIM(3)
    with KFAC(nn.Linear(2, 2)) as kfac, Pipeline(DenseEFIM(3), producer="cpu", consumer="cpu") as pipe:
        assert all(isinstance(c, Curvature) for c in (dense, kfac, pipe))

    class Partial:
        def update(self, g, batch_size=1): ...
        def solve(self, v): ...
        def reset(self): ...

    assert not isinstance(Partial(), Curvature)
    theta, v = torch.zeros(3, requires_grad=True), torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"a Curvature \(an object with update, update_many, solve, reset\)"):
        NHGD([theta], [v], curvature=Partial())
    NHGD([theta], [v], curvature=dense).close()
