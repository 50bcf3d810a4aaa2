"""The batch size of an inner step is hard to get wrong: taken from a 1-D
per-sample loss, refused where it contradicts the loss or the outputs,
warned about where it is ambiguous ([1]-shaped loss) or missing (a scalar
loss to an estimator whose state depends on it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nhgd_ext import estimators as E


def problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    v = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(6, 2, generator=g, dtype=torch.float64)

    def losses():
        return 0.5 * (model(X) - Y).pow(2).sum(1) + v.sum() * sum(p.pow(2).sum() for p in model.parameters())

    return model, v, losses


def test_a_per_sample_loss_gives_the_batch_size():
    """NHGD's batch-mean form scales the mean gradient by sqrt(batch): six
    per-sample losses do what their mean with batch_size=6 does."""
    states = []
    for given in ("rows", "mean"):
        model, v, losses = problem()
        est = E.NHGD(list(model.parameters()), [v], per_sample=False, representation="dense")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            est.inner_step(losses()) if given == "rows" else est.inner_step(losses().mean(), batch_size=6)
        states.append(est.curvature.state_dict())
    assert states[0]["num_samples"] == states[1]["num_samples"]
    assert torch.equal(states[0]["fisher"], states[1]["fisher"])
    model, v, losses = problem()
    est = E.NHGD(list(model.parameters()), [v], per_sample=False, representation="dense")
    est.inner_step(losses().mean(), batch_size=2)  # a different batch size: a different Fisher
    assert not torch.equal(est.curvature.state_dict()["fisher"], states[0]["fisher"])


@pytest.mark.parametrize("cls", [E.NHGD, E.ConjugateGradient])
def test_a_batch_size_that_contradicts_the_per_sample_losses_is_refused_before_any_change(cls):
    model, v, losses = problem()
    est = cls(list(model.parameters()), [v])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'batch_size' \(2\) contradicts the 6 per-sample losses"):
        est.inner_step(losses(), batch_size=2)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    est.inner_step(losses(), batch_size=6)  # agreeing is fine


def test_outputs_with_another_row_count_than_the_batch_are_refused():
    model, v, losses = problem()
    est = E.NHGD(list(model.parameters()), [v], fisher="sampled")
    X = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'outputs' has 4 rows"):
        est.inner_step(losses(), outputs=model(X[:4]))
    with pytest.raises(ValueError, match=r"'outputs' has 6 rows, but the batch holds 2 samples \(argument 'batch_size'\)"):
        est.inner_step(losses().mean(), batch_size=2, outputs=model(X))
    assert est.curvature.num_updates == 0


def test_a_scalar_loss_with_outputs_takes_their_row_count():
    model, v, losses = problem()
    est = E.NHGD(list(model.parameters()), [v], fisher="sampled", per_sample=False, seed=0)
    X = torch.randn(6, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "without batch_size" warning: the outputs say 6
        est.inner_step(losses().mean(), outputs=model(X))
    assert est.curvature.state_dict()["num_samples"] == 1  # one batch-mean update


def test_a_loss_of_shape_one_is_taken_as_a_scalar_with_a_warning_unless_the_batch_size_is_given():
    model, v, losses = problem()
    est = E.ConjugateGradient(list(model.parameters()), [v])
    with pytest.warns(UserWarning, match=r"shape \[1\] is taken as a scalar"):
        mean = est.inner_step(losses().mean().reshape(1))
    assert mean.dim() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.inner_step(losses().mean().reshape(1), batch_size=6)


def test_nhgd_warns_of_a_scalar_loss_without_batch_size_and_the_others_do_not():
    model, v, losses = problem()
    with pytest.warns(UserWarning, match="without 'batch_size' is taken as one sample's loss"):
        E.NHGD(list(model.parameters()), [v]).inner_step(losses().mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E.ConjugateGradient(list(model.parameters()), [v]).inner_step(losses().mean())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "6"])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(bad):
    model, v, losses = problem()
    est = E.NHGD(list(model.parameters()), [v])
    with pytest.raises(ValueError, match="argument 'batch_size' must be a positive integer"):
        est.inner_step(losses().mean(), batch_size=bad)


def test_an_empty_loss_is_refused():
    model, v, losses = problem()
    est = E.Neumann(list(model.parameters()), [v])
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        est.inner_step(losses()[:0])
