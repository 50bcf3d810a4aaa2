"""DenseEFIM against float64 references built from first principles: F is
accumulated here in float64 from the same gradients, and the expected
inverse is torch.linalg.inv(F + mu I)."""

from __future__ import annotations

import math

import pytest
import torch

from nhgd_ext.curvature import DenseEFIM
from nhgd_testing import DEVICES, DTYPES, gen, rel_err, tol


class Reference:
    """F accumulated in float64, with the same schedule as the class."""

    def __init__(self, d, beta):
        self.F = torch.zeros(d, d, dtype=torch.float64)
        self.n, self.beta = 0, beta

    def add(self, x):
        x = x.to("cpu", torch.float64)
        if self.beta is None:
            self.F = (self.n * self.F + torch.outer(x, x)) / (self.n + 1)
        else:
            self.F = self.beta * self.F + (1 - self.beta) * torch.outer(x, x)
        self.n += 1

    def inverse(self, mu):
        return torch.linalg.inv(self.F + mu * torch.eye(self.F.shape[0], dtype=torch.float64))


def grads(n, d, seed, rank=None, dtype=torch.float64):
    """n gradients of norm about 1; with `rank`, confined to a random subspace."""
    rng = gen(seed)
    if rank is None:
        return (torch.randn(n, d, generator=rng, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=rng, dtype=torch.float64))[0]
    return ((torch.randn(n, rank, generator=rng, dtype=torch.float64) / math.sqrt(rank)) @ basis.T).to(dtype)


@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
@pytest.mark.parametrize("d", [1, 7, 33, 130])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_updates_match_float64_inverse(device, dtype, d, beta):
    c = DenseEFIM(d, beta=beta, damping=0.05, dtype=dtype, device=device)
    ref = Reference(d, beta)
    G = grads(30, d, seed=d)
    for t, g in enumerate(G):
        if t % 10 == 9:  # rows 7..9 of each ten go in one rank-3 step
            continue
        if t % 10 == 6:
            c.update_many(G[t:t + 4].to(device))
            for x in G[t:t + 4]:
                ref.add(x)
        elif t % 10 not in (7, 8):
            c.update(g.to(device))
            ref.add(g)
    assert c.num_samples == ref.n == 30
    A = c.inverse
    assert torch.equal(A, A.mT)
    assert rel_err(A, ref.inverse(c.mu)) < 50 * tol(dtype, d, 30)


@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
@pytest.mark.parametrize("d", [1, 5, 31, 64])
def test_state_fisher_is_the_float64_average(d, beta):
    """The kept F (its lower triangle folded in strips, every few rows) read
    out whole and symmetric: the float64 average of x x^T, across several
    folds and a refresh, after single updates and a rank-5 step."""
    c = DenseEFIM(d, beta=beta, damping=0.05, dtype=torch.float64)
    ref = Reference(d, beta)
    G = grads(45, d, seed=2 * d + 1)
    for t in range(40):
        c.update(G[t])
        ref.add(G[t])
    c.update_many(G[40:], per_step=False)
    for x in G[40:]:
        ref.add(x)
    F = c.state_dict()["fisher"]
    assert torch.equal(F, F.mT)
    assert rel_err(F, ref.F) < 1e-13
    assert c.num_refreshes >= 1


def test_fisher_stays_finite_between_rare_refreshes():
    """F's scaling is kept aside between refreshes (a factor 0.5 per update
    here, none of them refreshing for 990 updates), while large gradients
    enter with weights divided by it: F must neither overflow nor drift."""
    d = 7
    c = DenseEFIM(d, beta=0.5, damping=1e8, refresh_below=1e-300, dtype=torch.float64)
    ref = Reference(d, 0.5)
    G = grads(990, d, seed=5) * 1e6
    for g in G:
        c.update(g)
        ref.add(g)
    assert c.num_refreshes == 0
    F = c.state_dict()["fisher"]
    assert bool(torch.isfinite(F).all())
    assert rel_err(F, ref.F) < 1e-13


@pytest.mark.parametrize("beta", [None, 0.95], ids=["running", "ema"])
def test_update_many_equals_sequential_updates(beta):
    d = 17
    G = grads(9, d, seed=3)
    # refresh_below small enough that neither refreshes: both then keep the same mu
    make = lambda: DenseEFIM(d, beta=beta, dtype=torch.float64, refresh_below=0.01)  # noqa: E731
    one, many = make(), make()
    one.update(G[0])
    many.update(G[0])
    for g in G[1:]:
        one.update(g)
    many.update_many(G[1:])
    assert one.num_samples == many.num_samples
    assert one.num_refreshes == many.num_refreshes == 0
    assert one.mu == pytest.approx(many.mu)
    assert rel_err(many.inverse, one.inverse.clone()) < 1e-10


@pytest.mark.parametrize("k", [1, 5, 13])
def test_update_many_per_step_decays_once_per_call(k):
    """EMA per optimizer step: M' = beta M + (1 - beta)/k sum_i g_i g_i^T,
    against the float64 inverse of that M."""
    d, beta, lam = 11, 0.8, 0.5
    c = DenseEFIM(d, beta=beta, damping=lam, dtype=torch.float64, refresh_below=1e-6)
    M = lam * torch.eye(d, dtype=torch.float64)
    for step in range(3):
        G = grads(k, d, seed=20 + step)
        c.update_many(G, per_step=True)
        M = beta * M + (1 - beta) / k * G.T @ G
    assert c.num_samples == 3 * k and c.num_refreshes == 0
    assert c.mu == pytest.approx(lam * beta**3)
    assert rel_err(c.inverse, torch.linalg.inv(M)) < 1e-12


def test_an_update_that_forgets_almost_everything_rebuilds_exactly():
    """beta**k = 0.8**100 ~ 2e-10 per call: the in-place update would divide
    the float32 state by that; the inverse is rebuilt from F instead."""
    d, k, beta = 20, 100, 0.8
    c = DenseEFIM(d, beta=beta, damping=0.05)
    F = torch.zeros(d, d, dtype=torch.float64)
    for step in range(3):
        G = grads(k, d, seed=40 + step, dtype=torch.float32)
        c.update_many(G)
        w = (1 - beta) * beta ** torch.arange(k - 1, -1, -1, dtype=torch.float64)
        F = beta**k * F + (G.double().T * w) @ G.double()
    assert c.num_refreshes == 3 and c.mu == c.damping
    ref = torch.linalg.inv(F + 0.05 * torch.eye(d, dtype=torch.float64))
    assert rel_err(c.inverse.double(), ref) < 1e-5


def test_batch_mean_is_scaled_by_sqrt_batch_size():
    d, D = 11, 16
    g = grads(1, d, seed=4)[0]
    make = lambda: DenseEFIM(d, damping=1.0, dtype=torch.float64)  # noqa: E731
    scaled, explicit, unscaled = make(), make(), make()
    scaled.update(g, batch_size=D)
    explicit.update(math.sqrt(D) * g)
    unscaled.update(g)
    assert torch.equal(scaled.inverse, explicit.inverse)
    # the Fisher of a batch mean enters D times larger, and that changes the inverse
    assert torch.allclose(scaled.state_dict()["fisher"], D * unscaled.state_dict()["fisher"], rtol=1e-14, atol=0)
    assert rel_err(unscaled.inverse, scaled.inverse.clone()) > 0.05


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_state(bad):
    d = 8
    c = DenseEFIM(d, beta=0.9)
    for g in grads(5, d, seed=5, dtype=torch.float32):
        c.update(g)
    before = c.state_dict()
    g = grads(1, d, seed=6, dtype=torch.float32)[0]
    g[3] = bad
    with pytest.raises(ValueError, match="'g'"):
        c.update(g)
    G = grads(3, d, seed=7, dtype=torch.float32)
    G[1, 2] = bad
    with pytest.raises(ValueError, match="'G'"):
        c.update_many(G)
    after = c.state_dict()
    for key in ("inverse", "pending", "fisher"):
        assert torch.equal(before[key], after[key])
    assert all(before[k] == after[k] for k in ("num_updates", "num_samples", "num_refreshes", "mu"))


@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
def test_state_dict_round_trip_resumes_bit_identically(beta):
    d = 23
    G = grads(40, d, seed=8, dtype=torch.float32)
    first = DenseEFIM(d, beta=beta)
    for g in G[:17]:
        first.update(g)
    second = DenseEFIM(d, beta=beta)
    second.load_state_dict(first.state_dict())
    for g in G[17:]:
        first.update(g)
        second.update(g)
    assert torch.equal(first.inverse, second.inverse)
    assert first.num_refreshes == second.num_refreshes and first.mu == second.mu


def test_load_state_dict_refuses_another_configuration():
    with pytest.raises(ValueError, match="config|saved"):
        DenseEFIM(5, beta=0.9).load_state_dict(DenseEFIM(5, beta=None).state_dict())


@pytest.mark.parametrize(
    "kwargs, name",
    [({"dim": 0}, "dim"), ({"dim": 3, "beta": 1.0}, "beta"), ({"dim": 3, "damping": 0.0}, "damping"),
     ({"dim": 3, "refresh_below": 1.0}, "refresh_below"), ({"dim": 3, "dtype": torch.float16}, "dtype")],
)
def test_bad_configuration(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        DenseEFIM(**kwargs)


def test_bad_shapes():
    c = DenseEFIM(4)
    with pytest.raises(ValueError, match="'g'"):
        c.update(torch.ones(5))
    with pytest.raises(ValueError, match="'G'"):
        c.update_many(torch.ones(4))
    with pytest.raises(ValueError, match="'v'"):
        c.solve(torch.ones(3))
    with pytest.raises(ValueError, match="'batch_size'"):
        c.update(torch.ones(4), batch_size=0)


def test_solve_is_the_inverse_applied():
    d = 9
    c = DenseEFIM(d, beta=0.9, dtype=torch.float64)
    for g in grads(12, d, seed=9):
        c.update(g)
    v = grads(1, d, seed=10)[0]
    assert torch.allclose(c.solve(v), c.inverse @ v, rtol=0, atol=1e-14)
    V = grads(3, d, seed=11).T
    assert c.solve(V).shape == (d, 3)


@pytest.mark.parametrize(
    "beta, d, steps",
    [(0.9, 64, 100_000), (0.99, 64, 100_000), (None, 64, 100_000), (0.9, 512, 100_000), (0.99, 512, 100_000),
     (None, 512, 100_000)],
    ids=["ema0.9-d64", "ema0.99-d64", "running-d64", "ema0.9-d512", "ema0.99-d512", "running-d512"],
)
def test_long_float32_runs_stay_finite_symmetric_definite_and_accurate(beta, d, steps):
    """Rank-deficient gradients (rank d/4), 10^5 float32 updates: the damping
    never vanishes, refreshes are counted, and the inverse stays within 1e-3
    of the float64 inverse of the same (F + mu I)."""
    c = DenseEFIM(d, beta=beta, damping=1e-3)
    G = grads(steps, d, seed=12, rank=d // 4, dtype=torch.float32) * 3.0
    ref = Reference(d, beta)
    for g in G:
        c.update(g)
    for g in G:  # the reference sees the very same float32 rows
        ref.add(g)
    A = c.inverse
    assert bool(torch.isfinite(A).all())
    assert torch.equal(A, A.mT)
    torch.linalg.cholesky(A.double())  # positive definite
    assert c.num_refreshes > 0 and c.refresh_below * c.damping <= c.mu <= c.damping
    assert rel_err(A, ref.inverse(c.mu)) < 1e-3
