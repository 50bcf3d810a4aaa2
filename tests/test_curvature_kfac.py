"""KFAC against references built from first principles in float64: the
factors accumulated by hand from each layer's inputs and per-sample output
gradients, and the solve against the dense inverse of the block-diagonal
matrix assembled with torch.kron. Also: the hooks come off (close, ``with``,
garbage collection), refused updates change nothing, state round trips."""

from __future__ import annotations

import gc
import io
import math
import weakref

import pytest
import torch
from torch import nn

from nhgd_ext.curvature import KFAC
from nhgd_ext.estimators import NHGD

SHAPES = [(7, 5, 3), (16, 32, 1)]
BATCHES = [5, 8, 3, 13, 1, 6]  # odd sizes, and a single sample
DTYPES = [torch.float32, torch.float64]


def make_net(sizes=(7, 5, 3), *, bias=True, dtype=torch.float64, seed=0, extra=False):
    """Linear, Tanh, Linear; ``extra`` puts a LayerNorm between (parameters
    K-FAC does not model: they get diagonal blocks)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(sizes[0], sizes[1], bias=bias), nn.Tanh(), nn.Linear(sizes[1], sizes[2], bias=bias)]
    if extra:
        layers.insert(2, nn.LayerNorm(sizes[1]))
        with torch.no_grad():  # not the identity, so its gradients are not trivial
            layers[2].weight.uniform_(0.5, 1.5)
            layers[2].bias.uniform_(-0.5, 0.5)
    return nn.Sequential(*layers).to(dtype)


def batch(sizes, n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, sizes[0], generator=g, dtype=torch.float64).to(dtype)
    Y = torch.randn(n, sizes[-1], generator=g, dtype=torch.float64).to(dtype)
    return X, Y


def losses(out, Y):
    return 0.5 * (out - Y).pow(2).sum(1)


def flat_grad(model_params):
    return torch.cat([p.grad.reshape(-1) for p in model_params])


def step(model, kfac, X, Y):
    """One pass of the mean loss through the model, then kfac.update."""
    model.zero_grad()
    losses(model(X), Y).mean().backward()
    kfac.update(flat_grad(kfac.params), batch_size=X.shape[0])


class Reference:
    """What K-FAC should hold, accumulated by hand in float64 from a float64
    copy of the model (the same weights and inputs)."""

    def __init__(self, model, beta, damping):
        self.model, self.beta, self.damping = model, beta, damping
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.params = list(model.parameters())
        self.S = [torch.zeros(m.in_features + (m.bias is not None), m.in_features + (m.bias is not None),
                              dtype=torch.float64) for m in self.linears]
        self.G = [torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for m in self.linears]
        self.diag = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64)

    def per_sample(self, X, Y):
        """Each layer's inputs [x | 1] and per-sample output gradients
        d loss_i / d z_i, and the per-sample gradient rows (n x dim)."""
        X, Y = X.double(), Y.double()
        h, inputs, outputs = X, [], []
        for m in self.model:
            if isinstance(m, nn.Linear):
                inputs.append(h.detach())
                h = m(h)
                outputs.append(h)
            else:
                h = m(h)
        per = losses(h, Y)
        deltas = torch.autograd.grad(per.sum(), outputs, retain_graph=True)  # samples are independent
        acts = [torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) if m.bias is not None else x
                for x, m in zip(inputs, self.linears)]
        rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(per[i], self.params,
                                                                                   retain_graph=True)])
                            for i in range(len(per))])
        return acts, list(deltas), rows

    def update(self, X, Y, *, rows_given=False):
        acts, deltas, rows = self.per_sample(X, Y)
        b = 1 - self.beta
        for i, (a, d) in enumerate(zip(acts, deltas)):
            self.S[i] = self.beta * self.S[i] + b * a.T @ a / len(a)
            self.G[i] = self.beta * self.G[i] + b * d.T @ d / len(d)
        # update(g, batch_size=n) feeds sqrt(n) times the mean gradient as one row
        fed = rows if rows_given else math.sqrt(len(rows)) * rows.mean(0, keepdim=True)
        self.diag = self.beta * self.diag + b * fed.pow(2).mean(0)
        return rows

    def dense(self, kfac_params):
        """The block-diagonal matrix whose inverse KFAC.solve applies, in the
        layout of the flat vectors (the parameters in order, each row-major)."""
        sizes = [p.numel() for p in kfac_params]
        offset = dict(zip([id(p) for p in kfac_params], [sum(sizes[:k]) for k in range(len(sizes))]))
        dim = sum(sizes)
        M = torch.zeros(dim, dim, dtype=torch.float64)
        covered = torch.zeros(dim, dtype=torch.bool)
        root = math.sqrt(self.damping)
        # the reference model's parameters stand at the same places as the KFAC model's
        ours = dict(zip([id(p) for p in self.params], kfac_params))
        for m, S, G in zip(self.linears, self.S, self.G):
            K = torch.kron(G + root * torch.eye(len(G), dtype=torch.float64),
                           S + root * torch.eye(len(S), dtype=torch.float64))
            ow = offset[id(ours[id(m.weight)])]
            ob = offset[id(ours[id(m.bias)])] if m.bias is not None else None
            # entry (r, c) of [W | b] is row r * width + c of the row-major vec K acts on
            pos = [ow + r * m.in_features + c if c < m.in_features else ob + r
                   for r in range(m.out_features) for c in range(len(S))]
            pos = torch.tensor(pos)
            M[pos[:, None], pos[None, :]] = K
            covered[pos] = True
        rest = (~covered).nonzero().reshape(-1)
        M[rest, rest] = self.diag[rest] + self.damping
        return M


def close(x, ref, tol):
    return float((x.double() - ref).norm()) <= tol * float(ref.norm())


# ------------------------------------------------------------------ factors


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_factors_equal_the_hand_accumulated_ema(beta, sizes, bias, dtype):
    model = make_net(sizes, bias=bias, dtype=dtype, seed=1)
    ref = Reference(make_net(sizes, bias=bias, dtype=dtype, seed=1).double(), beta, 1e-2)
    kfac = KFAC(model, beta=beta, damping=1e-2)
    assert kfac.dtype == dtype and all(layer.S_inv.dtype == dtype for layer in kfac.layers)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    for s, n in enumerate(BATCHES):
        X, Y = batch(sizes, n, seed=100 + s, dtype=dtype)
        step(model, kfac, X, Y)
        ref.update(X, Y)
        for layer, S, G in zip(kfac.layers, ref.S, ref.G):
            assert layer.S.dtype == layer.G.dtype == torch.float64  # see the precision note in kfac.py
            assert close(layer.S, S, tol) and close(layer.G, G, tol), s
    assert kfac.num_updates == len(BATCHES) and kfac.num_refreshes == 0


def test_factors_follow_the_per_sample_convention():
    """G from the output gradients of one sample at a time (a batch of one each)."""
    model = make_net(seed=2)
    kfac = KFAC(model, beta=0.9)
    X, Y = batch((7, 5, 3), 16, seed=1, dtype=torch.float64)
    step(model, kfac, X, Y)
    first = model[0]
    deltas = []
    for i in range(len(X)):
        out = first(X[i:i + 1])
        loss = losses(model[2](model[1](out)), Y[i:i + 1]).sum()
        deltas.append(torch.autograd.grad(loss, out)[0].reshape(-1))
    D = torch.stack(deltas)
    assert torch.allclose(kfac.layers[0].G, 0.1 * D.T @ D / len(X), rtol=1e-10, atol=1e-14)


# -------------------------------------------------------------------- solve


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_solve_equals_the_dense_inverse_and_is_rebuilt_lazily(sizes, bias, dtype):
    beta, damping = 0.9, 1e-2
    model = make_net(sizes, bias=bias, dtype=dtype, seed=3)
    ref = Reference(make_net(sizes, bias=bias, dtype=dtype, seed=3).double(), beta, damping)
    kfac = KFAC(model, beta=beta, damping=damping)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    v = torch.randn(kfac.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    solves = 0
    for s, n in enumerate(BATCHES):
        X, Y = batch(sizes, n, seed=200 + s, dtype=dtype)
        step(model, kfac, X, Y)
        ref.update(X, Y)
        if s in (2, 5):  # after several updates, and again after more
            assert kfac.num_refreshes == solves  # nothing rebuilt by the updates
            expected = torch.linalg.solve(ref.dense(kfac.params), v)
            got = kfac.solve(v.to(dtype))
            solves += 1
            assert got.dtype == dtype and close(got, expected, tol), s
            assert kfac.num_refreshes == solves
            assert torch.equal(kfac.solve(v.to(dtype)), got)  # a second solve rebuilds nothing
            assert kfac.num_refreshes == solves


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_solve_with_diagonal_blocks_and_per_sample_rows(dtype):
    """A LayerNorm between the layers: its parameters get (diag + lambda)^-1,
    diag from the per-sample rows given to update_many."""
    sizes, beta, damping = (7, 5, 3), 0.8, 1e-2
    model = make_net(sizes, dtype=dtype, seed=4, extra=True)
    ref = Reference(make_net(sizes, dtype=dtype, seed=4, extra=True).double(), beta, damping)
    kfac = KFAC(model, beta=beta, damping=damping)
    assert sum(d is not None for d in kfac._diag) == 2
    for s, n in enumerate(BATCHES[:4]):
        X, Y = batch(sizes, n, seed=300 + s, dtype=dtype)
        model.zero_grad()
        losses(model(X), Y).mean().backward()
        rows = ref.update(X, Y, rows_given=True)
        kfac.update_many(rows.to(dtype), per_step=True)
    v = torch.randn(kfac.dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = torch.linalg.solve(ref.dense(kfac.params), v)
    assert close(kfac.solve(v.to(dtype)), expected, 1e-12 if dtype == torch.float64 else 1e-5)


def test_the_damping_is_exact_after_many_updates_and_rebuilds_happen_only_in_solves():
    """10^4 updates (captures given directly), 5 solves: the inverses are those
    of the factors plus exactly sqrt(lambda) I, rebuilt at most once per solve."""
    g = torch.Generator().manual_seed(9)
    layers = [nn.Linear(6, 4), nn.Linear(4, 3, bias=False)]
    damping, beta = 1e-3, 0.99
    kfac = KFAC(layers, beta=beta, damping=damping)
    S = [torch.zeros(7, 7, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)]
    G = [torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
    zero = torch.zeros(kfac.dim)
    solves = 0
    for t in range(10_000):
        n = 1 + t % 5
        captures = [torch.cat([torch.randn(n, 6, generator=g), torch.ones(n, 1)], 1), torch.randn(n, 4, generator=g),
                    torch.randn(n, 4, generator=g), 0.1 * torch.randn(n, 3, generator=g)]
        kfac.update(zero, captures=captures)
        for i in range(2):
            a, d = captures[2 * i].double(), captures[2 * i + 1].double()
            S[i] = beta * S[i] + (1 - beta) * a.T @ a / n
            G[i] = beta * G[i] + (1 - beta) * d.T @ d / n
        assert kfac.num_refreshes == solves  # updates rebuild nothing
        if t % 2000 == 1999:
            kfac.solve(torch.ones(kfac.dim))
            solves += 1
    assert kfac.num_updates == 10_000 and solves == 5
    assert kfac.num_refreshes <= solves
    for (S_inv, G_inv), S_i, G_i in zip(kfac.inverses(), S, G):
        for got, F in ((S_inv, S_i), (G_inv, G_i)):
            exact = torch.linalg.inv(F + math.sqrt(damping) * torch.eye(len(F), dtype=torch.float64))
            assert close(got, exact, 1e-6)  # float32 state
            assert torch.equal(got, got.mT)


def test_no_rebuild_while_only_updating():
    model = make_net(seed=5)
    kfac = KFAC(model, beta=0.9)
    for s in range(20):
        step(model, kfac, *batch((7, 5, 3), 4, seed=s, dtype=torch.float64))
    assert kfac.num_updates == 20 and kfac.num_refreshes == 0
    kfac.solve(torch.ones(kfac.dim, dtype=torch.float64))
    assert kfac.num_refreshes == 1


# -------------------------------------------------------------------- hooks


def hook_counts(model):
    return [len(m._forward_hooks) for m in model.modules()]


def test_close_removes_every_hook_and_refuses_updates():
    model = make_net(seed=6)
    kfac = KFAC(model)
    assert sum(hook_counts(model)) == 2
    X, Y = batch((7, 5, 3), 4, seed=1, dtype=torch.float64)
    z = model[0](X)  # a graph still alive, with a tensor hook on the layer output
    assert len(z._backward_hooks) == 1
    step(model, kfac, X, Y)
    kfac.close()
    kfac.close()  # idempotent
    assert kfac.closed and sum(hook_counts(model)) == 0 and not z._backward_hooks
    model.zero_grad()
    losses(model(X), Y).mean().backward()
    g = flat_grad(kfac.params)
    with pytest.raises(RuntimeError, match="closed"):
        kfac.update(g, batch_size=4)
    with pytest.raises(RuntimeError, match="closed"):
        kfac.update_many(g.reshape(1, -1))
    with pytest.raises(RuntimeError, match="closed"):
        kfac.take_captures()
    assert kfac.num_updates == 1
    assert kfac.solve(torch.ones(kfac.dim, dtype=torch.float64)).shape == (kfac.dim,)  # the state stays readable
    kfac.remove_hooks()  # the old name, still an alias


def test_a_with_block_closes_the_kfac():
    model = make_net(seed=7)
    with KFAC(model, beta=0.9) as kfac:
        step(model, kfac, *batch((7, 5, 3), 4, seed=2, dtype=torch.float64))
        assert sum(hook_counts(model)) == 2
    assert kfac.closed and sum(hook_counts(model)) == 0
    with pytest.raises(RuntimeError, match="closed"):
        kfac.update(torch.zeros(kfac.dim, dtype=torch.float64))


def test_a_collected_kfac_takes_its_hooks_with_it():
    model = make_net(seed=8)
    kfac = KFAC(model)
    X, Y = batch((7, 5, 3), 4, seed=3, dtype=torch.float64)
    step(model, kfac, X, Y)
    z = model[0](X)
    assert len(z._backward_hooks) == 1
    alive = weakref.ref(kfac)
    del kfac
    gc.collect()
    assert alive() is None  # no hook holds the KFAC
    assert sum(hook_counts(model)) == 0 and not z._backward_hooks


def test_an_nhgd_that_owned_a_kfac_leaves_no_hooks():
    model = make_net(seed=9)
    params = list(model.parameters())
    log_wd = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    est = NHGD(params, [log_wd], curvature="kfac", modules=model)
    X, Y = batch((7, 5, 3), 8, seed=4, dtype=torch.float64)
    est.inner_step(losses(model(X), Y).mean() + log_wd.exp() * sum(p.pow(2).sum() for p in params), batch_size=8)
    assert sum(hook_counts(model)) == 2
    del est
    gc.collect()
    assert sum(hook_counts(model)) == 0


def test_after_a_dropped_kfac_a_new_one_and_batched_per_sample_gradients_work():
    """A dropped K-FAC's hooks must not stay and fire inside the batched
    backward (they would fail there: "Batching rule not implemented for aten::detach")."""
    sizes = (7, 5, 3)
    model = make_net(sizes, seed=10)
    old = KFAC(model)
    step(model, old, *batch(sizes, 4, seed=5, dtype=torch.float64))
    del old
    gc.collect()
    assert sum(hook_counts(model)) == 0

    ref = Reference(make_net(sizes, seed=10), 0.9, 1e-3)
    kfac = KFAC(model, beta=0.9)
    params = list(model.parameters())
    X, Y = batch(sizes, 6, seed=6, dtype=torch.float64)
    model.zero_grad()
    per = losses(model(X), Y)
    # per-sample gradients through one batched backward, with the new KFAC's hooks on
    found = torch.autograd.grad(per, params, grad_outputs=torch.eye(6, dtype=torch.float64),
                                is_grads_batched=True, retain_graph=True)
    rows = torch.cat([f.reshape(6, -1) for f in found], 1)
    with pytest.raises(RuntimeError, match="saw no forward and backward pass"):
        kfac.take_captures()  # the batched backward recorded nothing
    per.mean().backward()
    kfac.update(flat_grad(params), batch_size=6)
    expected_rows = ref.update(X, Y)
    assert torch.allclose(rows, expected_rows, rtol=1e-12, atol=1e-14)
    for layer, S, G in zip(kfac.layers, ref.S, ref.G):
        assert close(layer.S, S, 1e-13) and close(layer.G, G, 1e-13)


# ------------------------------------------------------- refused updates


def snapshot(kfac):
    state = kfac.state_dict()
    return state, [(r.acts, r.grads) for r in kfac._recorders]


def assert_unchanged(kfac, before):
    state, recorded = before
    now, now_recorded = snapshot(kfac)
    assert now.keys() == state.keys()
    for a, b in zip(state["layers"], now["layers"]):
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(state["diag"], now["diag"]):
        assert (a is None and b is None) or torch.equal(a, b)
    for key in ("num_updates", "num_refreshes", "stale", "config"):
        assert now[key] == state[key], key
    assert all(x is y for pair, now_pair in zip(recorded, now_recorded) for x, y in zip(pair, now_pair))


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-inverses", "stale-inverses"])
def test_a_refused_update_changes_nothing(stale):
    sizes = (7, 5, 3)
    twins = []
    for refuse in (False, True):
        model = make_net(sizes, seed=11, extra=True)  # the LayerNorm has diagonal blocks
        kfac = KFAC(model, beta=0.9, damping=1e-2)
        for s in range(3):
            step(model, kfac, *batch(sizes, 5, seed=400 + s, dtype=torch.float64))
        if not stale:
            kfac.solve(torch.ones(kfac.dim, dtype=torch.float64))
        X, Y = batch(sizes, 7, seed=410, dtype=torch.float64)
        model.zero_grad()
        losses(model(X), Y).mean().backward()  # recorded by the hooks, not yet folded in
        g = flat_grad(kfac.params)
        if refuse:
            refuse_everything(kfac, g)
        kfac.update(g, batch_size=7)  # the hooks' captures survived the refusals
        twins.append(kfac.state_dict())
    for a, b in zip(*(t["layers"] for t in twins)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(x is None or torch.equal(x, y) for x, y in zip(twins[0]["diag"], twins[1]["diag"]))


def refuse_everything(kfac, g):
    before = snapshot(kfac)
    ln_weight = next(k for k, d in enumerate(kfac._diag) if d is not None)
    ln_start = sum(p.numel() for p in kfac.params[:ln_weight])
    layer_shapes = [(layer.d_in, layer.d_out) for layer in kfac.layers]
    good = [t for d_in, d_out in layer_shapes for t in (torch.ones(4, d_in, dtype=torch.float64),
                                                        torch.ones(4, d_out, dtype=torch.float64))]

    def bad_g(index, value):
        out = g.clone()
        out[index] = value
        return out

    inf_in_acts = [t.clone() for t in good]
    inf_in_acts[2][1, 3] = math.inf
    nan_in_grads = [t.clone() for t in good]
    nan_in_grads[1][0, 0] = math.nan
    wide = [t.clone() for t in good]
    wide[3] = torch.ones(4, layer_shapes[1][1] + 1, dtype=torch.float64)
    refusals = [
        (lambda: kfac.update(bad_g(ln_start + 1, math.inf), batch_size=7), ValueError, "'g'"),  # the diagonal block
        (lambda: kfac.update(bad_g(0, math.nan), batch_size=7), ValueError, "'g'"),  # a linear layer's entry
        (lambda: kfac.update(g[:-1], batch_size=7), ValueError, "'g'"),
        (lambda: kfac.update(g.reshape(1, -1), batch_size=7), ValueError, "'g'"),
        (lambda: kfac.update(g.int(), batch_size=7), ValueError, "'g'"),
        (lambda: kfac.update(g, batch_size=0), ValueError, "'batch_size'"),
        (lambda: kfac.update(g, captures=good[:2]), ValueError, "'captures'"),  # one layer's, of two
        (lambda: kfac.update(g, captures=good + good[:2]), ValueError, "'captures'"),
        (lambda: kfac.update(g, captures=wide), ValueError, "'captures'"),
        (lambda: kfac.update(g, captures=[t[:0] for t in good]), ValueError, "'captures'"),
        (lambda: kfac.update(g, captures=inf_in_acts), ValueError, "captures"),
        (lambda: kfac.update(g, captures=nan_in_grads), ValueError, "captures"),
        (lambda: kfac.update_many(torch.stack([g, bad_g(ln_start, -math.inf)])), ValueError, "'rows'"),
        (lambda: kfac.update_many(g.reshape(1, -1)[:, 1:]), ValueError, "'rows'"),
        (lambda: kfac.update_many(g.new_zeros(0, g.numel())), ValueError, "'rows'"),
    ]
    for call, error, match in refusals:
        with pytest.raises(error, match=match):
            call()
        assert_unchanged(kfac, before)


def test_an_update_without_a_pass_changes_nothing():
    model = make_net(seed=12, extra=True)
    kfac = KFAC(model, beta=0.9)
    step(model, kfac, *batch((7, 5, 3), 6, seed=6, dtype=torch.float64))
    before = snapshot(kfac)
    g = torch.ones(kfac.dim, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="saw no forward and backward pass"):
        kfac.update(g)  # no pass since the last update
    with pytest.raises(RuntimeError, match="saw no forward and backward pass"):
        kfac.update_many(g.reshape(1, -1))
    assert_unchanged(kfac, before)


# ------------------------------------------------------------ state dict


def random_captures(kfac, seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for layer in kfac.layers
            for d in (layer.d_in, layer.d_out)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("stale", [False, True], ids=["fresh-inverses", "stale-inverses"])
def test_a_state_dict_round_trip_resumes_bit_for_bit(dtype, stale):
    first, second = (KFAC(make_net((16, 32, 1), seed=13, extra=True).to(dtype), beta=0.9) for _ in range(2))
    rows = lambda s: torch.randn(3, first.dim, generator=torch.Generator().manual_seed(s), dtype=dtype)  # noqa: E731
    for s in range(4):
        first.update_many(rows(s), captures=random_captures(first, s))
    first.solve(torch.ones(first.dim, dtype=dtype))
    if stale:
        first.update_many(rows(4), captures=random_captures(first, 4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["stale"] is stale
    second.load_state_dict(saved)
    v = torch.randn(first.dim, generator=torch.Generator().manual_seed(99), dtype=dtype)
    for s in range(5, 8):
        for k in (first, second):
            k.update_many(rows(s), captures=random_captures(k, s))
        assert torch.equal(first.solve(v), second.solve(v))
    a, b = first.state_dict(), second.state_dict()
    for x, y in zip(a["layers"], b["layers"]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(x is None or torch.equal(x, y) for x, y in zip(a["diag"], b["diag"]))
    assert (a["num_updates"], a["num_refreshes"], a["stale"]) == (b["num_updates"], b["num_refreshes"], b["stale"])


def test_load_state_dict_refuses_another_configuration_and_changes_nothing():
    kfac = KFAC(make_net(seed=14), beta=0.9, damping=1e-2)
    kfac.update(torch.zeros(kfac.dim, dtype=torch.float64), captures=random_captures(kfac, 1))
    before = snapshot(kfac)
    other = KFAC(make_net(seed=14), beta=0.9, damping=1e-3)
    with pytest.raises(ValueError, match="saved with"):
        kfac.load_state_dict(other.state_dict())
    smaller = KFAC(make_net((7, 4, 3), seed=14), beta=0.9, damping=1e-2)
    with pytest.raises(ValueError, match="shape"):
        kfac.load_state_dict(smaller.state_dict())
    assert_unchanged(kfac, before)


# ----------------------------------------------------------- construction


def test_state_dtype_and_device_follow_the_first_layer_unless_given():
    model = make_net(dtype=torch.float32)
    assert KFAC(model).dtype == torch.float32
    kfac = KFAC(model, dtype=torch.float64, device="cpu")
    assert kfac.dtype == torch.float64 and kfac.device == torch.device("cpu")
    assert all(layer.S_inv.dtype == torch.float64 for layer in kfac.layers)
    X, Y = batch((7, 5, 3), 4, seed=1, dtype=torch.float32)
    step(model, kfac, X, Y)  # float32 gradients and captures into a float64 state
    assert kfac.solve(torch.ones(kfac.dim)).dtype == torch.float64
    with pytest.raises(ValueError, match="'dtype'"):
        KFAC(model, dtype=torch.float16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'modules'"):
        KFAC(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match="'beta'"):
        KFAC(make_net(), beta=1.0)
    with pytest.raises(ValueError, match="'damping'"):
        KFAC(make_net(), damping=0.0)
    model = make_net()
    with pytest.raises(ValueError, match="'params'.*bias"):
        KFAC(model, params=[model[0].weight, model[2].weight, model[2].bias])
    with pytest.raises(TypeError):
        KFAC(model, refresh_below=0.25)  # removed: the damping no longer decays


def test_a_layer_outside_params_is_tracked_but_not_solved_for():
    model = make_net(seed=15)
    kfac = KFAC(model, params=list(model[2].parameters()))
    assert kfac.dim == 5 * 3 + 3
    step(model, kfac, *batch((7, 5, 3), 4, seed=2, dtype=torch.float64))
    assert kfac.solve(torch.ones(kfac.dim, dtype=torch.float64)).shape == (kfac.dim,)


# -------------------------------------------------------- with the estimator


def test_nhgd_with_kfac_on_a_network_with_an_unsupported_layer():
    model = make_net(seed=16, extra=True)
    log_decay = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())
    est = NHGD(params, [log_decay], curvature=KFAC(model, params=params), inner_lr=0.1)
    X, Y = batch((7, 5, 3), 64, seed=5, dtype=torch.float64)
    Xv, Yv = batch((7, 5, 3), 32, seed=6, dtype=torch.float64)

    def inner():
        return losses(model(X), Y).mean() + log_decay.exp() * sum(p.pow(2).sum() for p in params)

    for _ in range(10):
        est.inner_step(inner(), batch_size=64)
    (h,) = est.hypergradient(losses(model(Xv), Yv).mean(), inner)
    assert h.shape == () and bool(torch.isfinite(h))
    assert est.curvature.num_refreshes == 1


def test_a_forward_pass_without_backward_does_not_replace_the_step_inputs():
    """A logged evaluation between the loss and the update (grad enabled, never
    backpropagated) must leave the factors to the step's own batch."""
    factors = []
    for extra_forward in (False, True):
        model = make_net(seed=17)
        kfac = KFAC(model, beta=0.9)
        X, Y = batch((7, 5, 3), 16, seed=5, dtype=torch.float64)
        model.zero_grad()
        loss = losses(model(X), Y).mean()
        if extra_forward:
            model(100 * torch.randn(5, 7, dtype=torch.float64))
        loss.backward()
        kfac.update(flat_grad(kfac.params), batch_size=len(X))
        factors.append([(layer.S.clone(), layer.G.clone()) for layer in kfac.layers])
    for (S0, G0), (S1, G1) in zip(*factors):
        assert torch.equal(S0, S1) and torch.equal(G0, G1)


def test_captures_taken_then_given_back_equal_a_direct_update():
    X, Y = batch((7, 5, 3), 16, seed=3, dtype=torch.float64)
    direct_model, later_model = make_net(seed=18), make_net(seed=18)
    direct, later = KFAC(direct_model, beta=0.9), KFAC(later_model, beta=0.9)
    step(direct_model, direct, X, Y)
    later_model.zero_grad()
    losses(later_model(X), Y).mean().backward()
    g = flat_grad(later.params)
    captures = later.take_captures()
    assert len(captures) == 4 and all(r.acts is None for r in later._recorders)
    later.update(g, batch_size=len(X), captures=captures)
    for a, b in zip(direct.state_dict()["layers"], later.state_dict()["layers"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
