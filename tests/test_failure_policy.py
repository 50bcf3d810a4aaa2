"""One failure policy for every estimator: a NaN or an infinity in an inner
loss, an outer loss, a loss the closure returns or the hypergradient raises
NonFiniteError before anything changes. Checked by running each estimator
twice on the same problem, once with every kind of failure injected between
its steps: the two must end bit-identical, and each refused call must leave
theta, its .grad, v.grad and the estimator's state as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nhgd_ext import NonFiniteError
from nhgd_ext import estimators as E

ESTIMATORS = {
    "NHGD": lambda p, v, m: E.NHGD(p, v, modules=m),
    "NHGD-kfac": lambda p, v, m: E.NHGD(p, v, curvature="kfac", modules=m),
    "NHGD-mean-cold": lambda p, v, m: E.NHGD(p, v, per_sample=False, warm_start=False),
    "NHGD-pipelined": lambda p, v, m: E.NHGD(p, v, modules=m, pipeline=True),
    "ConjugateGradient": lambda p, v, m: E.ConjugateGradient(p, v, warm_start=True),
    "Neumann": lambda p, v, m: E.Neumann(p, v),
    "StocBiO": lambda p, v, m: E.StocBiO(p, v, iters=3),
    "AmIGO": lambda p, v, m: E.AmIGO(p, v),
    "TTSA": lambda p, v, m: E.TTSA(p, v),
    "SOBA": lambda p, v, m: E.SOBA(p, v),
    "SingleLoopAID": lambda p, v, m: E.SingleLoopAID(p, v),
    "SingleLoopITD": lambda p, v, m: E.SingleLoopITD(p, v),
    "Broyden": lambda p, v, m: E.Broyden(p, v, warm_start=True, iters=5),
}
assert len({type(make([torch.zeros(1, requires_grad=True)], [torch.zeros(1, requires_grad=True)], None))
            for name, make in ESTIMATORS.items() if name not in ("NHGD-kfac", "NHGD-pipelined")}) == 10

NAN = float("nan")


class Problem:
    """A 4-3 linear regression (float64), v = log of its weight decay."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 3).double()
        g = torch.Generator().manual_seed(1)
        self.X = torch.randn(24, 4, generator=g, dtype=torch.float64)
        self.Y = torch.randn(24, 3, generator=g, dtype=torch.float64)
        self.v = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        self.params = list(self.model.parameters())

    def losses(self, rows):
        fit = 0.5 * (self.model(self.X[rows]) - self.Y[rows]).pow(2).sum(1)
        return fit + 0.5 * self.v.exp().sum() * sum(p.pow(2).sum() for p in self.params)

    def outer(self):
        return 0.5 * (self.model(self.X[:8]) - self.Y[:8]).pow(2).sum(1).mean()

    def closure(self):
        return self.losses(slice(8, 24)).mean()


def snapshot(prob: Problem, est) -> dict:
    state = est.state_dict()
    if isinstance(est, E.NHGD) and hasattr(est.curvature, "flush"):  # a pipeline: what the consumer holds
        state = {"curvature": est.curvature.state_dict()}
    extra = {k: getattr(est, k, None) for k in ("_kept", "_theta0", "_L", "_cross_steps", "num_restarts")}
    return copy.deepcopy({"state": state, "extra": extra,
                          "theta": [p.detach().clone() for p in prob.params],
                          "theta_grad": [None if p.grad is None else p.grad.clone() for p in prob.params],
                          "v": prob.v.detach().clone(),
                          "v_grad": None if prob.v.grad is None else prob.v.grad.clone()})


def assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path} keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} -> {b!r}"


def refused(prob, est, call, quantity: str) -> None:
    before = snapshot(prob, est)
    with pytest.raises(NonFiniteError, match="NaN or infinite") as info:
        call()
    assert info.value.quantity == quantity
    assert isinstance(info.value, ValueError)
    assert_same(before, snapshot(prob, est))


def observed(prob, est, call, quantity: str) -> None:
    """The clean twin's stand-in for :func:`refused`: the same two snapshots
    (a dense curvature folds its pending rows into F for a state_dict, which
    changes the rounding of what follows), no call."""
    snapshot(prob, est)
    snapshot(prob, est)


def drive(name: str, inject: bool) -> list[torch.Tensor]:
    check = refused if inject else observed
    prob = Problem()
    est = ESTIMATORS[name](prob.params, [prob.v], prob.model)
    found = []
    try:
        for _ in range(2):
            for t in range(3):
                rows = slice(4 * t, 4 * t + 4)
                check(prob, est, lambda: est.inner_step(prob.losses(rows) * NAN), "the inner loss")
                check(prob, est, lambda: est.inner_step(prob.losses(rows).mean() + float("inf"), batch_size=4),
                      "the inner loss")
                est.inner_step(prob.losses(rows))
            prob.v.grad = None
            check(prob, est, lambda: est.backward(prob.outer() * NAN, prob.closure), "the outer loss")
            check(prob, est, lambda: est.backward(prob.outer(), lambda: prob.closure() * NAN),
                  "a loss inner_closure returned")
            est.backward(prob.outer(), prob.closure)
            found.append(prob.v.grad.clone())
            with torch.no_grad():
                prob.v -= 0.1 * prob.v.grad
        found += [p.detach().clone() for p in prob.params]
    finally:
        getattr(est, "close", lambda: None)()
    return found


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_refused_calls_change_nothing_and_the_run_goes_on_as_if_they_never_happened(name):
    clean, injected = drive(name, False), drive(name, True)
    for a, b in zip(clean, injected):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


#: the methods that multiply by the closure's Hessian (or keep what they got from it) and must refuse
MUST_REFUSE = {"ConjugateGradient", "Neumann", "StocBiO", "AmIGO", "SOBA", "SingleLoopAID"}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_nan_hessian_behind_a_finite_closure_loss_is_refused_with_the_state_kept(name):
    """The closure's loss is finite, but sqrt(|s - s|) puts NaN into its
    gradient along theta (0 x inf), hence into every Hessian-vector product;
    the mixed derivative stays finite. The methods that use H must refuse;
    the others (NHGD solves with its Fisher, ITD never multiplies by H,
    Broyden restarts from its best iterate, TTSA may draw depth 0) may return
    a finite hypergradient, but never a non-finite one, nor keep one."""
    prob = Problem()
    est = ESTIMATORS[name](prob.params, [prob.v], prob.model)
    try:
        for t in range(3):
            est.inner_step(prob.losses(slice(4 * t, 4 * t + 4)))

        def nan_hessian():
            s = sum(p.sum() for p in prob.params)
            return prob.closure() + (s - s.detach()).abs().sqrt()

        before = snapshot(prob, est)
        try:
            est.backward(prob.outer(), nan_hessian)
        except NonFiniteError as err:
            assert err.quantity in ("the hypergradient", "a Hessian-vector product",
                                    "the linear-system variable kept for the next step")
            assert_same(before, snapshot(prob, est))
        else:
            assert name not in MUST_REFUSE, f"{name} did not refuse"
            assert torch.isfinite(prob.v.grad).all()
            assert all(torch.isfinite(t).all() for t in est._outer_state().values() if isinstance(t, torch.Tensor))
    finally:
        getattr(est, "close", lambda: None)()


def test_nonfinite_error_is_exported_at_the_top_and_names_what_diverged():
    import nhgd_ext

    assert nhgd_ext.NonFiniteError is NonFiniteError
    err = NonFiniteError("x", "the outer loss")
    assert isinstance(err, FloatingPointError) and isinstance(err, ValueError) and err.quantity == "the outer loss"


def test_kfac_refuses_an_infinite_capture_before_touching_any_block():
    """A parameter outside the nn.Linear layers (a diagonal block) and an
    infinite input: the update is refused with the factors, the diagonal
    block and the counters as they were."""
    from nhgd_ext.curvature import KFAC

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2).double()
            self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.linear(x) * self.scale

    torch.manual_seed(0)
    model = Scaled()
    params = list(model.parameters())
    with KFAC(model, params=params) as kfac:
        x = torch.randn(4, 3, dtype=torch.float64)
        (model(x) ** 2).mean().backward()
        kfac.update(torch.cat([p.grad.reshape(-1) for p in params]), batch_size=4)
        before = copy.deepcopy(kfac.state_dict())
        x[1, 2] = float("inf")
        model.zero_grad()
        (model(x) ** 2).mean().backward()
        finite_g = torch.ones(sum(p.numel() for p in params), dtype=torch.float64)  # only the captures are bad
        with pytest.raises(NonFiniteError, match="captures") as info:
            kfac.update(finite_g, batch_size=4)
        assert info.value.quantity.startswith("captures")
        assert_same(before, kfac.state_dict())


@pytest.mark.parametrize("representation", ["dense", "compact"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["direct", "pipelined"])
def test_a_curvature_beyond_float64_refuses_its_solve_and_changes_nothing(representation, pipelined):
    """Rows of size 1e150 make F ~ 1e300 of rank one: F + 1e-3 I is positive
    definite in exact arithmetic, not in float64. The solve refuses (also
    through a Pipeline, whose stream stays usable), the state is kept, and
    after a reset the curvature works again."""
    from nhgd_ext.curvature import DenseEFIM
    from nhgd_ext.pipeline import Pipeline

    curvature = DenseEFIM(3, representation=representation, dtype=torch.float64)
    target = Pipeline(curvature, producer="cpu", consumer="cpu") if pipelined else curvature
    try:
        g = torch.full((3,), 1e150, dtype=torch.float64)
        (target.push if pipelined else target.update)(g)
        (target.push if pipelined else target.update)(g * (1 + 1e-7))
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(NonFiniteError, match="not positive definite in floating point") as info:
            target.solve(torch.ones(3, dtype=torch.float64))
        assert info.value.quantity == "the curvature"
        assert_same(before, target.state_dict())
        target.reset()
        (target.push if pipelined else target.update)(torch.ones(3, dtype=torch.float64))
        w = target.solve(torch.ones(3, dtype=torch.float64))
        expected = torch.linalg.solve(torch.ones(3, 3, dtype=torch.float64) + 1e-3 * torch.eye(3, dtype=torch.float64),
                                      torch.ones(3, dtype=torch.float64))
        assert torch.allclose(w, expected, rtol=1e-10)
    finally:
        if pipelined:
            target.close()
