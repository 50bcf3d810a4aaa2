"""Every estimator through the identical calls of the protocol on one toy
problem (the well-specified regression of test_estimators_implicit), with its
default options: the hypergradient points the right way."""

from __future__ import annotations

import pytest
import torch
from test_estimators_implicit import WellSpecifiedRegression, cosine

import nhgd_ext.estimators as E

ALL = [E.NHGD, E.ConjugateGradient, E.Neumann, E.StocBiO, E.AmIGO, E.TTSA, E.SOBA, E.SingleLoopAID, E.SingleLoopITD,
       E.Broyden]


def drive(cls, outer_steps=15, inner_steps=10, **options):
    prob = WellSpecifiedRegression(seed=5)
    est = cls([prob.theta], [prob.v], **options)
    for _ in range(outer_steps):
        for _ in range(inner_steps):
            est.inner_step(prob.losses(prob.batch(32)).mean(), batch_size=32)
        prob.v.grad = None
        est.backward(prob.outer(), lambda: prob.losses(prob.batch(256)).mean())
    return prob, prob.v.grad


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_estimator_points_the_right_way(cls):
    prob, h = drive(cls)
    assert h is not None and bool(torch.isfinite(h).all())
    assert cosine(h, prob.exact) > 0.5, f"{cls.__name__}: cosine {cosine(h, prob.exact):.3f}"


@pytest.mark.parametrize("cls", [E.ConjugateGradient, E.AmIGO, E.SOBA, E.SingleLoopAID, E.TTSA, E.NHGD],
                         ids=lambda c: c.__name__)
def test_state_dict_round_trip(cls):
    prob = WellSpecifiedRegression(seed=6)
    first = cls([prob.theta], [prob.v])
    for _ in range(5):
        first.inner_step(prob.losses(prob.batch(32)).mean(), batch_size=32)
    first.hypergradient(prob.outer(), lambda: prob.losses().mean())
    second = cls([prob.theta], [prob.v])
    second.load_state_dict(first.state_dict())
    closure = lambda: prob.losses().mean()  # noqa: E731  deterministic, so both see the same batches
    (a,) = first.hypergradient(prob.outer(), closure)
    (b,) = second.hypergradient(prob.outer(), closure)
    assert torch.equal(a, b)


def test_bad_parameters_are_named():
    theta = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="'inner_params'"):
        E.Neumann([], [theta])
    with pytest.raises(ValueError, match="'outer_params'"):
        E.Neumann([theta], [torch.zeros(2)])
    with pytest.raises(ValueError, match="'iters'"):
        E.ConjugateGradient([theta], [torch.zeros(2, requires_grad=True)], iters=0)
