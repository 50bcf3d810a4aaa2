"""NHGD with its curvature behind a Pipeline gives the hypergradient of the
synchronous estimator, bit for bit (torch.equal, float64): the consumer makes
the same calls on the same gradients in the same order."""

from __future__ import annotations

import pytest
import torch

from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.estimators import NHGD
from nhgd_ext.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread_each")


def _run(make_estimator, per_sample: bool):
    """Ridge regression, v = log lambda; three outer steps of 60 inner steps."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(200, 8, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)
    Xv, yv = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    theta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    log_lam = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    est = make_estimator([theta], [log_lam])
    batches = torch.Generator().manual_seed(6)

    def inner_loss(idx, reduce=True):
        per = 0.5 * (X[idx] @ theta - y[idx]) ** 2 + 0.5 * log_lam.exp() * theta.pow(2).sum()
        return per.mean() if reduce else per

    found = []
    for _ in range(3):
        for _ in range(60):
            idx = torch.randint(0, 200, (10,), generator=batches)
            est.inner_step(inner_loss(idx, reduce=not per_sample), batch_size=10)
        outer = 0.5 * ((Xv @ theta - yv) ** 2).mean()
        fresh = torch.randint(0, 200, (50,), generator=batches)
        found.append(est.hypergradient(outer, lambda: inner_loss(fresh))[0].detach().clone())
        with torch.no_grad():
            log_lam -= 0.1 * found[-1]
    return found


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch-mean", "per-sample-rows"])
def test_pipelined_nhgd_equals_synchronous(per_sample):
    sync = _run(lambda i, o: NHGD(i, o, curvature=DenseEFIM(8, beta=0.95, dtype=torch.float64, representation="dense")), per_sample)
    pipes = []

    def piped(i, o):
        pipes.append(Pipeline(DenseEFIM(8, beta=0.95, dtype=torch.float64, representation="dense"), slots=4))
        return NHGD(i, o, pipeline=pipes[-1])

    got = _run(piped, per_sample)
    assert pipes[0].num_updates == 180
    pipes[0].close()
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)


def run_mlp(make_estimator, device: str = "cpu"):
    """A 5-7-3 tanh MLP (two nn.Linear layers) on a regression, v = log of the
    weight decay; three outer steps of 40 inner steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double().to(device)
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randn(120, 5, generator=g, dtype=torch.float64), torch.randn(120, 3, generator=g, dtype=torch.float64)
    X, Y = X.to(device), Y.to(device)
    log_wd = torch.tensor([-2.0], dtype=torch.float64, device=device, requires_grad=True)
    params = list(model.parameters())
    est = make_estimator(model, params, [log_wd])
    batches = torch.Generator().manual_seed(9)

    def inner_loss(idx):
        fit = 0.5 * (model(X[idx]) - Y[idx]).pow(2).sum(1).mean()
        return fit + 0.5 * log_wd.exp().sum() * sum(p.pow(2).sum() for p in params)

    found = []
    for _ in range(3):
        for _ in range(40):
            est.inner_step(inner_loss(torch.randint(0, 120, (12,), generator=batches).to(device)), batch_size=12)
        outer = 0.5 * (model(X[:30]) - Y[:30]).pow(2).sum(1).mean()
        fresh = torch.randint(0, 120, (40,), generator=batches).to(device)
        found.append(est.hypergradient(outer, lambda: inner_loss(fresh))[0].detach().clone())
        with torch.no_grad():
            log_wd -= 0.1 * found[-1]
    return found


@pytest.mark.parametrize("engine", ["cpp", "reference"])
@pytest.mark.parametrize("cross", ["end", "trajectory"])
def test_pipelined_kfac_nhgd_equals_synchronous(engine, cross):
    """K-FAC's hooks record each step's layer inputs and output gradients on
    the producer; the push carries them to the consumer's update."""
    from nhgd_ext import _build
    from nhgd_ext.curvature import KFAC

    if engine == "cpp" and _build.backend() != "cpp":
        pytest.skip("the compiled engine needs the built extension")
    kfac = lambda model, i: KFAC(model, params=i, beta=0.9, damping=1e-2)  # noqa: E731
    sync = run_mlp(lambda m, i, o: NHGD(i, o, curvature=kfac(m, i), cross=cross, beta=0.9))
    pipes = []

    def piped(m, i, o):
        pipes.append(Pipeline(kfac(m, i), slots=3, engine=engine))
        return NHGD(i, o, pipeline=pipes[-1], cross=cross, beta=0.9)

    got = run_mlp(piped)
    assert pipes[0].num_updates == 120
    pipes[0].close()
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_a_separate_recorder_feeds_a_kfac_built_on_a_replica(engine):
    """recorder=: the producer's KFAC only records (its hooks); the consumer's
    KFAC, built on a replica of the layers that never runs, is updated with
    what it recorded. The same as the synchronous estimator, bit for bit."""
    from nhgd_ext import _build
    from nhgd_ext.curvature import KFAC

    if engine == "cpp" and _build.backend() != "cpp":
        pytest.skip("the compiled engine needs the built extension")
    kfac = lambda model, i: KFAC(model, params=i, beta=0.9, damping=1e-2)  # noqa: E731
    sync = run_mlp(lambda m, i, o: NHGD(i, o, curvature=kfac(m, i), beta=0.9))
    pipes = []

    def piped(m, i, o):
        replica = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        pipes.append(Pipeline(kfac(replica, list(replica.parameters())), recorder=kfac(m, i), slots=3, engine=engine))
        return NHGD(i, o, pipeline=pipes[-1], beta=0.9)

    got = run_mlp(piped)
    assert not pipes[0].takes_rows
    assert pipes[0].num_updates == 120
    pipes[0].close()
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize("curvature", ["dense", "kfac"])
@pytest.mark.parametrize("pipeline", [True, {"consumer_threads": 1, "slots": 2}], ids=["true", "options"])
def test_nhgd_builds_and_owns_its_pipeline(curvature, pipeline):
    """pipeline=True (or Pipeline options): NHGD builds the curvature it would
    build anyway, runs it behind a Pipeline of its own, and stops that
    pipeline at close(); the hypergradients are the synchronous ones."""
    def make(m, i, o, **kw):
        modules = m if curvature == "kfac" else None  # run_mlp's loss has shape [1]: no per-sample rows
        return NHGD(i, o, curvature=curvature, modules=modules, beta=0.9, damping=1e-2, **kw)

    sync = run_mlp(make)
    built = []

    def piped(m, i, o):
        built.append(make(m, i, o, pipeline=pipeline))
        return built[-1]

    got = run_mlp(piped)
    est = built[0]
    assert isinstance(est.curvature, Pipeline) and est.curvature.num_updates == 120
    for a, b in zip(got, sync):
        assert torch.equal(a, b), (a, b)
    est.close()
    with pytest.raises(Exception, match="closed"):
        est.curvature.push(torch.zeros(est.curvature.dim or 0))
    est.close()  # idempotent


def test_nhgd_refuses_unknown_pipeline_options_before_building_anything():
    theta = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="argument 'pipeline' takes the options consumer, consumer_threads, slots, "
                                         "engine; got 'threads'"):
        NHGD([theta], [torch.zeros(1, requires_grad=True)], pipeline={"threads": 2})
    assert NHGD([theta], [torch.zeros(1, requires_grad=True)], pipeline=False).curvature.__class__ is DenseEFIM
