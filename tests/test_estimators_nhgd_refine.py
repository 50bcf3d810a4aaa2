"""NHGD(refine=k) against the exact implicit hypergradient (dense float64
Hessian), with every curvature; and the misuse NHGD refuses or cleans up."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.estimators import NHGD
from nhgd_ext.pipeline import Pipeline
from nhgd_testing import gen, minimize


class NoisyLogistic:
    """Softmax regression with 30% label noise and an L2 weight exp(v) on W:
    misspecified, so the empirical Fisher at theta* is not the Hessian, and
    the paper's NHGD (refine=0) misses the implicit hypergradient."""

    def __init__(self, n=300, p=6, k=3, seed=0):
        rng = gen(seed)
        self.X = torch.randn(n, p, generator=rng, dtype=torch.float64)
        W0 = torch.randn(p, k, generator=rng, dtype=torch.float64)
        y = (self.X @ W0).argmax(1)
        flip = torch.rand(n, generator=rng, dtype=torch.float64) < 0.3
        self.y = torch.where(flip, torch.randint(0, k, (n,), generator=rng), y)
        self.Xv = torch.randn(60, p, generator=rng, dtype=torch.float64)
        self.yv = (self.Xv @ W0).argmax(1)
        self.model = nn.Linear(p, k, dtype=torch.float64)
        self.v = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        self.params = list(self.model.parameters())
        self.rng = gen(seed + 1)
        self._solve_inner()

    def inner(self, idx=None, reduction="mean"):
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        reg = 0.5 * self.v.exp() * self.model.weight.pow(2).sum()
        if reduction == "none":
            return F.cross_entropy(self.model(X), y, reduction="none") + reg
        return F.cross_entropy(self.model(X), y) + reg

    def outer(self):
        return F.cross_entropy(self.model(self.Xv), self.yv)

    def _solve_inner(self):
        minimize(self.inner, self.params, max_iter=40, tolerance_grad=1e-10)

    def exact(self):
        """-(d2_{v theta} l)^T H^-1 grad_theta f with the dense float64 Hessian
        at the current theta (what refinement converges to, at theta* or not)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        shapes = [p.shape for p in self.params]

        def loss_of(vec):
            W, b = vec[:shapes[0].numel()].view(shapes[0]), vec[shapes[0].numel():].view(shapes[1])
            return (F.cross_entropy(self.X @ W.T + b, self.y)
                    + 0.5 * self.v.detach().exp() * W.pow(2).sum())

        H = torch.autograd.functional.hessian(loss_of, flat)
        f_theta = torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.outer(), self.params)])
        w = torch.linalg.solve(H, f_theta)
        cross = torch.cat([(self.v.detach().exp() * self.model.weight.detach()).reshape(-1),
                           torch.zeros_like(self.model.bias).reshape(-1)])
        return -(cross @ w)

    def feed(self, est, steps=60, batch=50, per_sample=True):
        """Inner steps at a negligible step size: theta stays at theta*."""
        for _ in range(steps):
            idx = torch.randint(0, self.X.shape[0], (batch,), generator=self.rng)
            loss = self.inner(idx, reduction="none" if per_sample else "mean")
            est.inner_step(loss, batch_size=batch)


def hypergradient_error(prob, est):
    (h,) = est.hypergradient(prob.outer(), prob.inner)
    exact = prob.exact()
    return float(abs(h - exact) / abs(exact))


def make(prob, curvature, refine):
    common = {"beta": 0.9, "damping": 1e-2, "refine": refine, "inner_lr": 1e-12}
    if curvature == "kfac":
        return NHGD(prob.params, [prob.v], curvature="kfac", modules=prob.model, **common)
    if curvature == "pipeline":
        pipe = Pipeline(DenseEFIM(sum(p.numel() for p in prob.params), beta=0.9, damping=1e-2,
                                  dtype=torch.float64))
        return NHGD(prob.params, [prob.v], pipeline=pipe, **{k: v for k, v in common.items() if k != "beta"})
    return NHGD(prob.params, [prob.v], representation=curvature, **common)


@pytest.mark.parametrize("curvature", ["dense", "compact", "kfac", "pipeline"])
def test_refine_recovers_the_implicit_hypergradient(curvature):
    """The Fisher is not the Hessian here: refine=0 misses; a few refinement
    steps cut the error severalfold; as many steps as parameters (CG's finite
    termination) reach the exact hypergradient."""
    errors = {}
    for refine in (0, 3, 24):
        prob = NoisyLogistic(seed=4)
        est = make(prob, curvature, refine)
        prob.feed(est, per_sample=curvature != "kfac")
        errors[refine] = hypergradient_error(prob, est)
        est.close()
        if curvature == "pipeline":
            est.curvature.close()
    assert errors[0] > 0.05
    assert errors[3] < errors[0] / 3
    assert errors[24] < 1e-7


def test_refine_costs_one_more_hessian_vector_product_than_its_steps():
    prob = NoisyLogistic(seed=1)
    est = NHGD(prob.params, [prob.v], beta=0.9, damping=1e-2, refine=2, inner_lr=1e-12)
    prob.feed(est, steps=5)
    calls = []
    original = est.hvp
    est.hvp = lambda g, w: calls.append(1) or original(g, w)
    est.hypergradient(prob.outer(), prob.inner)
    assert len(calls) == 3


@pytest.mark.parametrize("curvature", ["dense", "kfac", "pipeline"])
def test_hypergradient_before_any_inner_step_raises(curvature):
    prob = NoisyLogistic(seed=2)
    est = make(prob, curvature, 0)
    with pytest.raises(RuntimeError, match="no inner step"):
        est.hypergradient(prob.outer(), prob.inner)
    prob.feed(est, steps=2, per_sample=curvature != "kfac")
    est.hypergradient(prob.outer(), prob.inner)
    est.reset()
    with pytest.raises(RuntimeError, match="no inner step"):
        est.hypergradient(prob.outer(), prob.inner)
    est.close()
    if curvature == "pipeline":
        est.curvature.close()


def test_state_takes_the_inner_parameters_dtype_unless_told():
    for dtype in (torch.float32, torch.float64):
        theta = torch.zeros(4, dtype=dtype, requires_grad=True)
        v = torch.zeros(1, dtype=dtype, requires_grad=True)
        assert NHGD([theta], [v]).curvature.dtype == dtype
    theta = torch.zeros(4, dtype=torch.float32, requires_grad=True)
    assert NHGD([theta], [v], dtype=torch.float64).curvature.dtype == torch.float64
    model = nn.Linear(3, 2, dtype=torch.float64)
    assert NHGD(list(model.parameters()), [v], curvature="kfac", modules=model).curvature.dtype == torch.float64


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_close_and_the_with_block_remove_the_kfac_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    v = torch.zeros(1, requires_grad=True)
    est = NHGD(list(model.parameters()), [v], curvature="kfac", modules=model)
    assert _hook_count(model) > 0
    est.close()
    est.close()  # idempotent
    assert _hook_count(model) == 0
    with NHGD(list(model.parameters()), [v], curvature="kfac", modules=model):
        assert _hook_count(model) > 0
    assert _hook_count(model) == 0


def test_a_dropped_estimator_leaves_no_hook_and_the_next_one_works():
    """The failure users hit: a K-FAC estimator dropped without close(), then
    a dense estimator with per-sample rows (a batched backward) on the same
    model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    v = torch.zeros(1, requires_grad=True)
    X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    est = NHGD(list(model.parameters()), [v], curvature="kfac", modules=model)
    est.inner_step(F.cross_entropy(model(X), y) + v.sum() * 0, batch_size=16)
    del est
    gc.collect()
    assert _hook_count(model) == 0
    dense = NHGD(list(model.parameters()), [v])
    dense.inner_step(F.cross_entropy(model(X), y, reduction="none") * v.exp())
    assert dense.curvature.num_samples == 16
