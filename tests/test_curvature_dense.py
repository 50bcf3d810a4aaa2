"""DenseEFIM against float64 references built from first principles: F is
accumulated here in float64 from the very rows the class was fed, and every
solve must equal torch.linalg.solve(F + damping I, v) for the damping given,
in both representations and in every mode."""

from __future__ import annotations

import math

import pytest
import torch

from nhgd_ext.curvature import DenseEFIM
from nhgd_testing import DEVICES, DTYPES, gen

REPRESENTATIONS = ["auto", "dense", "compact"]
#: solve error allowed: float64 to rounding, float32 to its rounding of the result
SOLVE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x (any shape) against a float64 reference."""
    x, ref = x.detach().to("cpu", torch.float64), ref.to("cpu", torch.float64)
    return float((x - ref).norm() / ref.norm())


class Reference:
    """F accumulated in float64 by the definition: the running average or EMA
    of x x^T from F = 0."""

    def __init__(self, d, beta):
        self.F = torch.zeros(d, d, dtype=torch.float64)
        self.n, self.beta = 0, beta

    def add(self, X, per_step=False):
        X = X.to("cpu", torch.float64).reshape(-1, self.F.shape[0])
        k = X.shape[0]
        if self.beta is None:
            self.F = (self.n * self.F + X.T @ X) / (self.n + k)
        elif per_step:
            self.F = self.beta * self.F + (1 - self.beta) / k * X.T @ X
        else:
            for x in X:
                self.F = self.beta * self.F + (1 - self.beta) * torch.outer(x, x)
        self.n += k

    def solve(self, lam, v):
        d = self.F.shape[0]
        return torch.linalg.solve(self.F + lam * torch.eye(d, dtype=torch.float64), v.to("cpu", torch.float64))

    def inverse(self, lam):
        return torch.linalg.inv(self.F + lam * torch.eye(self.F.shape[0], dtype=torch.float64))


def grads(n, d, seed, rank=None, dtype=torch.float64):
    """n gradients of norm about 1; with `rank`, confined to a random subspace."""
    rng = gen(seed)
    if rank is None:
        return (torch.randn(n, d, generator=rng, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=rng, dtype=torch.float64))[0]
    return ((torch.randn(n, rank, generator=rng, dtype=torch.float64) / math.sqrt(rank)) @ basis.T).to(dtype)


def one_step(c, ref, G):
    """One optimizer step's per-sample rows, into the class and the reference."""
    c.update_many(G, per_step=True)
    ref.add(G, per_step=True)


def feed(c, ref, G, device):
    """A mixed schedule: single gradients (some as batch means of 4), a rank-4
    step, a per-step rank-3 step, repeating."""
    t = 0
    while t < G.shape[0]:
        phase = t % 10
        if phase == 6 and t + 4 <= G.shape[0]:
            c.update_many(G[t:t + 4].to(device))
            ref.add(G[t:t + 4])
            t += 4
        elif phase == 3 and t + 3 <= G.shape[0]:
            c.update_many(G[t:t + 3].to(device), per_step=True)
            ref.add(G[t:t + 3], per_step=True)
            t += 3
        elif phase == 1:
            c.update(G[t].to(device), batch_size=4)
            ref.add(2.0 * G[t])
            t += 1
        else:
            c.update(G[t].to(device))
            ref.add(G[t])
            t += 1


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("beta", [None, 0.9, 0.99], ids=["running", "ema0.9", "ema0.99"])
@pytest.mark.parametrize("d", [1, 7, 33, 130, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_solve_is_the_exactly_damped_fisher_solve(device, dtype, d, beta, representation):
    """After every few updates (so the dense form is read with its damping
    decayed, stale, and freshly rebuilt alike): the float64 direct solve with
    the damping given. The rows are rank-deficient (rank about d/4), where
    a wrong damping moves the solve most."""
    lam = 0.05
    c = DenseEFIM(d, beta=beta, damping=lam, dtype=dtype, device=device, representation=representation)
    ref = Reference(d, beta)
    G = grads(60, d, seed=d, rank=max(1, d // 4), dtype=dtype)
    for start in range(0, 60, 20):
        feed(c, ref, G[start:start + 20], device)
        v = grads(1, d, seed=100 + start)[0]
        V = grads(3, d, seed=200 + start).T
        assert rel_err(c.solve(v.to(device, dtype)), ref.solve(lam, v)) < SOLVE_TOL[dtype]
        assert rel_err(c.solve(V.to(device, dtype)), ref.solve(lam, V)) < SOLVE_TOL[dtype]
    assert c.num_samples == ref.n == 60
    if representation != "auto":
        assert c.representation == representation


@pytest.mark.parametrize("representation", ["dense", "compact"])
@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
@pytest.mark.parametrize("d", [5, 64])
def test_inverse_is_the_exact_float64_inverse_and_exactly_symmetric(d, beta, representation):
    c = DenseEFIM(d, beta=beta, damping=0.05, dtype=torch.float64, representation=representation)
    ref = Reference(d, beta)
    feed(c, ref, grads(25, d, seed=3 * d), "cpu")
    A = c.inverse
    assert torch.equal(A, A.mT)
    assert rel_err(A, ref.inverse(0.05)) < 1e-11


@pytest.mark.parametrize("beta", [None, 0.9, 0.99], ids=["running", "ema0.9", "ema0.99"])
@pytest.mark.parametrize("d", [9, 40])
def test_both_representations_give_the_same_solve(d, beta):
    make = lambda rep: DenseEFIM(d, beta=beta, damping=0.01, dtype=torch.float64, representation=rep)  # noqa: E731
    dense, compact = make("dense"), make("compact")
    G = grads(45, d, seed=d + 1, rank=d // 3)
    for c in (dense, compact):
        feed(c, Reference(d, beta), G, "cpu")
    v = grads(1, d, seed=7)[0]
    assert rel_err(dense.solve(v), compact.solve(v)) < 1e-11


def test_auto_keeps_an_ema_of_batch_means_compact_and_turns_a_running_average_dense():
    """The paper's form (one row per step, an EMA) keeps a window far below d:
    compact, whose memory is the window, not d^2. A running average keeps
    every row: dense once the rows pass d / 2, with the same solves."""
    d, lam = 400, 1e-3
    ema = DenseEFIM(d, beta=0.8, damping=lam, dtype=torch.float64)
    running = DenseEFIM(d, beta=None, damping=lam, dtype=torch.float64)
    ref_ema, ref_running = Reference(d, 0.8), Reference(d, None)
    G = grads(300, d, seed=11)
    v = grads(1, d, seed=12)[0]
    for t, g in enumerate(G):
        ema.update(g, batch_size=16)
        ref_ema.add(4.0 * g)
        running.update(g)
        ref_running.add(g)
        if t == 150:
            assert running.representation == "compact" and running.rank == 151
            assert rel_err(running.solve(v), ref_running.solve(lam, v)) < 1e-10
    assert ema.representation == "compact" and ema.rank < 200 and ema.num_refreshes == 0
    assert ema.truncation < 1e-12 * lam * 10  # what was dropped is negligible against the damping
    assert running.representation == "dense"
    assert rel_err(ema.solve(v), ref_ema.solve(lam, v)) < 1e-10
    assert rel_err(running.solve(v), ref_running.solve(lam, v)) < 1e-10


def test_a_step_with_many_rows_only_reaches_the_fisher():
    """k = 12 rows into d = 30: a Woodbury update in place would cost more
    than one factorization per solve; the inverse goes stale, and the next
    solve factorizes F + damping I once (a Cholesky factor, no explicit
    inverse) and keeps the factor until the next update."""
    d, k = 30, 12
    c = DenseEFIM(d, beta=0.8, damping=0.05, dtype=torch.float64, representation="dense")
    ref = Reference(d, 0.8)
    for step in range(4):
        one_step(c, ref, grads(k, d, seed=40 + step))
        assert c.mu == 0.0 and c.num_refreshes == 0
    v = grads(1, d, seed=50)[0]
    assert rel_err(c.solve(v), ref.solve(0.05, v)) < 1e-12
    assert rel_err(c.solve(2 * v), ref.solve(0.05, 2 * v)) < 1e-12
    assert c.num_refreshes == 1
    one_step(c, ref, grads(k, d, seed=60))
    assert rel_err(c.solve(v), ref.solve(0.05, v)) < 1e-12
    assert c.num_refreshes == 2


def test_a_large_step_factorizes_at_once_where_that_costs_no_more_than_its_gram_update():
    """k = 20 rows into d = 40 (d <= 3k): the step itself factorizes
    F + damping I, so the solve after it only substitutes (no further
    factorization) and is exact."""
    d, k = 40, 20
    c = DenseEFIM(d, beta=0.9, damping=0.01, dtype=torch.float64, representation="dense")
    ref = Reference(d, 0.9)
    for step in range(3):
        one_step(c, ref, grads(k, d, seed=70 + step))
        assert c.num_refreshes == step + 1
    v = grads(1, d, seed=80)[0]
    assert rel_err(c.solve(v), ref.solve(0.01, v)) < 1e-12
    assert c.num_refreshes == 3


@pytest.mark.parametrize("steps_per_solve", [1, 100])
def test_the_form_of_a_rank_k_step_follows_how_often_it_is_solved(steps_per_solve):
    """k = 4 rows into d = 200: in place (Woodbury) while solves come every
    step (4 < 200 / 9), added to F and factorized per solve when they come
    every 100 steps (4 >= 200 / 900, at least 2). Exact either way."""
    d, k = 200, 4
    c = DenseEFIM(d, beta=0.99, damping=0.01, dtype=torch.float64, representation="dense")
    ref = Reference(d, 0.99)
    v = grads(1, d, seed=90)[0]
    for step in range(3 * steps_per_solve):
        one_step(c, ref, grads(k, d, seed=91 + step))
        if step % steps_per_solve == steps_per_solve - 1:
            assert rel_err(c.solve(v), ref.solve(0.01, v)) < 1e-11
    assert (c.mu > 0) == (steps_per_solve == 1)


def test_an_update_that_forgets_almost_everything_is_exact():
    """beta**k = 0.8**100 ~ 2e-10 per call: the in-place update would divide
    the float32 state by that; it only reaches F, and the solve is exact."""
    d, k, beta = 20, 100, 0.8
    c = DenseEFIM(d, beta=beta, damping=0.05, representation="dense")
    ref = Reference(d, beta)
    for step in range(3):
        G = grads(k, d, seed=40 + step, dtype=torch.float32)
        c.update_many(G)
        ref.add(G)
    v = grads(1, d, seed=3)[0]
    assert rel_err(c.solve(v.float()), ref.solve(0.05, v)) < 1e-5


@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
@pytest.mark.parametrize("d", [1, 5, 31, 64])
def test_state_fisher_is_the_float64_average(d, beta):
    """The kept F (its lower triangle folded in strips, every few rows) read
    out whole and symmetric: the float64 average of x x^T, across several
    folds and a rebuild, after single updates and a rank-5 step."""
    c = DenseEFIM(d, beta=beta, damping=0.05, dtype=torch.float64, representation="dense")
    ref = Reference(d, beta)
    G = grads(45, d, seed=2 * d + 1)
    for t in range(40):
        c.update(G[t])
        ref.add(G[t])
        if t == 20:
            c.solve(G[0])
    c.update_many(G[40:], per_step=False)
    ref.add(G[40:])
    F = c.state_dict()["fisher"]
    assert torch.equal(F, F.mT)
    assert rel_err(F, ref.F) < 1e-13
    assert c.num_refreshes >= 1


def test_fisher_stays_finite_between_rare_refreshes():
    """F's scaling is kept aside between folds (a factor 0.5 per update here,
    over 990 updates), while large gradients enter with weights divided by
    it: F must neither overflow nor drift."""
    d = 7
    c = DenseEFIM(d, beta=0.5, damping=1e8, refresh_below=1e-300, dtype=torch.float64, representation="dense")
    ref = Reference(d, 0.5)
    G = grads(990, d, seed=5) * 1e6
    for g in G:
        c.update(g)
        ref.add(g)
    assert c.num_refreshes == 0
    F = c.state_dict()["fisher"]
    assert bool(torch.isfinite(F).all())
    assert rel_err(F, ref.F) < 1e-13


@pytest.mark.parametrize("representation", ["dense", "compact"])
@pytest.mark.parametrize("beta", [None, 0.95], ids=["running", "ema"])
def test_update_many_equals_sequential_updates(beta, representation):
    d = 17
    G = grads(9, d, seed=3)
    make = lambda: DenseEFIM(d, beta=beta, dtype=torch.float64, representation=representation)  # noqa: E731
    one, many = make(), make()
    one.update(G[0])
    many.update(G[0])
    for g in G[1:]:
        one.update(g)
    many.update_many(G[1:])
    assert one.num_samples == many.num_samples
    v = grads(1, d, seed=4)[0]
    assert rel_err(many.solve(v), one.solve(v)) < 1e-11


def test_batch_mean_is_scaled_by_sqrt_batch_size():
    d, D = 11, 16
    g = grads(1, d, seed=4)[0]
    v = g + 0.1 * grads(1, d, seed=5)[0]  # mostly along g, where the scaling shows
    for representation in ("dense", "compact"):
        make = lambda: DenseEFIM(d, damping=1.0, dtype=torch.float64, representation=representation)  # noqa: E731
        scaled, explicit, unscaled = make(), make(), make()
        scaled.update(g, batch_size=D)
        explicit.update(math.sqrt(D) * g)
        unscaled.update(g)
        assert rel_err(scaled.solve(v), explicit.solve(v)) < 1e-14
        # the Fisher of a batch mean enters D times larger, and that changes the solve
        assert rel_err(unscaled.solve(v), scaled.solve(v)) > 0.05


def _state_tensors(c):
    return {k: v for k, v in c.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("representation", ["dense", "compact"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_state(bad, representation):
    d = 8
    c = DenseEFIM(d, beta=0.9, representation=representation)
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
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def test_a_refused_update_does_not_switch_the_representation():
    d = 6
    c = DenseEFIM(d, beta=None)
    c.update_many(grads(3, d, seed=1, dtype=torch.float32))
    assert c.representation == "compact"
    G = grads(4, d, seed=2, dtype=torch.float32)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'G'"):
        c.update_many(G)
    assert c.representation == "compact" and c.num_samples == 3


@pytest.mark.parametrize("representation", ["auto", "dense", "compact"])
@pytest.mark.parametrize("beta", [None, 0.9], ids=["running", "ema"])
def test_state_dict_round_trip_resumes_bit_identically(beta, representation):
    d = 23
    G = grads(40, d, seed=8, dtype=torch.float32)
    first = DenseEFIM(d, beta=beta, representation=representation)
    for g in G[:17]:
        first.update(g)
    second = DenseEFIM(d, beta=beta, representation=representation)
    second.load_state_dict(first.state_dict())
    assert second.representation == first.representation
    for g in G[17:]:
        first.update(g)
        second.update(g)
    v = G[0]
    assert torch.equal(first.solve(v), second.solve(v))
    assert first.num_refreshes == second.num_refreshes and first.mu == second.mu


def test_load_state_dict_refuses_another_configuration():
    with pytest.raises(ValueError, match="config|saved"):
        DenseEFIM(5, beta=0.9).load_state_dict(DenseEFIM(5, beta=None).state_dict())
    with pytest.raises(ValueError, match="config|saved"):
        DenseEFIM(5, representation="dense").load_state_dict(DenseEFIM(5, representation="compact").state_dict())


def test_load_state_dict_refuses_a_damaged_state_before_changing_anything():
    c = DenseEFIM(3, representation="dense", dtype=torch.float64)
    c.update(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    before = c.state_dict()
    for key, value in (("gram_rows", 1), ("fisher", torch.zeros(4, 4, dtype=torch.float64))):
        damaged = dict(before, **{key: value})
        with pytest.raises(ValueError, match=key):
            c.load_state_dict(damaged)
        after = c.state_dict()
        assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v
                   for k, v in before.items()), key


@pytest.mark.parametrize(
    "kwargs, name",
    [({"dim": 0}, "dim"), ({"dim": 3, "beta": 1.0}, "beta"), ({"dim": 3, "damping": 0.0}, "damping"),
     ({"dim": 3, "refresh_below": 1.0}, "refresh_below"), ({"dim": 3, "dtype": torch.float16}, "dtype"),
     ({"dim": 3, "representation": "sparse"}, "representation"), ({"dim": 3, "window_tol": -1.0}, "window_tol")],
)
def test_bad_configuration(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        DenseEFIM(**kwargs)


@pytest.mark.parametrize("representation", ["dense", "compact"])
def test_bad_shapes(representation):
    c = DenseEFIM(4, representation=representation)
    with pytest.raises(ValueError, match="'g'"):
        c.update(torch.ones(5))
    with pytest.raises(ValueError, match="'G'"):
        c.update_many(torch.ones(4))
    with pytest.raises(ValueError, match="'v'"):
        c.solve(torch.ones(3))
    with pytest.raises(ValueError, match="'v'"):
        c.solve(torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="'batch_size'"):
        c.update(torch.ones(4), batch_size=0)


def test_no_factorization_runs_inside_the_inner_loop():
    """Updates alone never refactorize, however far the damping decays; the
    solves rebuild only when theirs has decayed past refresh_below (a running
    average: each time the sample count grew fourfold)."""
    d = 48
    G = grads(4000, d, seed=13, rank=12)
    ema = DenseEFIM(d, beta=0.99, damping=1e-3, representation="dense")
    running = DenseEFIM(d, beta=None, damping=1e-3, representation="dense")
    for t, g in enumerate(G):
        ema.update(g)
        running.update(g)
        if t % 20 == 19:
            running.solve(g)
    assert ema.num_refreshes == 0
    assert running.num_refreshes <= math.ceil(math.log(4000) / math.log(4)) + 1


@pytest.mark.parametrize(
    "beta, d, representation",
    [(0.9, 64, "dense"), (0.99, 64, "dense"), (None, 64, "dense"), (0.9, 512, "auto"), (0.99, 512, "dense"),
     (None, 512, "dense")],
    ids=["ema0.9-d64", "ema0.99-d64", "running-d64", "ema0.9-d512-auto", "ema0.99-d512", "running-d512"],
)
@pytest.mark.heavy
def test_long_float32_runs_stay_exact(beta, d, representation):
    """Rank-deficient gradients (rank d/4), 10^5 float32 updates with a solve
    every 10^4: each solve is the float64 solve of the same rows with the
    damping given, and no more than one rebuild runs per solve."""
    steps, every = 100_000, 10_000
    lam = 1e-3
    c = DenseEFIM(d, beta=beta, damping=lam, representation=representation)
    G = grads(steps, d, seed=12, rank=d // 4, dtype=torch.float32) * 3.0
    F = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, steps, every):
        block = G[start:start + every]
        for g in block:
            c.update(g)
        X = block.double()
        if beta is None:
            F = (start * F + X.T @ X) / (start + every)
        else:
            w = (1 - beta) * beta ** torch.arange(every - 1, -1, -1, dtype=torch.float64)
            F = beta**every * F + (X.T * w) @ X
        v = grads(1, d, seed=start)[0]
        ref = torch.linalg.solve(F + lam * torch.eye(d, dtype=torch.float64), v)
        assert rel_err(c.solve(v.float()), ref) < 1e-4
    assert c.num_refreshes <= steps // every
