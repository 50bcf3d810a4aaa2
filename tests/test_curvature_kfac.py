"""KFAC against dense references built from the same factors (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhgd_ext.curvature import KFAC
from nhgd_ext.estimators import NHGD


def net(seed=0, extra=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)]
    if extra:
        layers.insert(2, nn.LayerNorm(7))  # a parameterized layer K-FAC does not model
    return nn.Sequential(*layers).double()


def step(model, kfac, X, y):
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    kfac.update(torch.cat([p.grad.reshape(-1) for p in kfac.params]), batch_size=X.shape[0])


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_factors_follow_the_per_sample_convention():
    model = net()
    kfac = KFAC(model, beta=0.9)
    X, y = data()
    step(model, kfac, X, y)
    first = model[0]
    a = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], dim=1)
    assert torch.allclose(kfac.layers[0].S, 0.1 * a.T @ a / len(X), rtol=1e-12, atol=1e-14)
    # per-sample output gradients of the first layer, one sample at a time
    deltas = []
    for i in range(len(X)):
        out = first(X[i:i + 1])
        out.retain_grad()
        loss = nn.functional.cross_entropy(model[2](model[1](out)), y[i:i + 1])
        deltas.append(torch.autograd.grad(loss, out)[0].reshape(-1))
    D = torch.stack(deltas)
    assert torch.allclose(kfac.layers[0].G, 0.1 * D.T @ D / len(X), rtol=1e-10, atol=1e-14)


def test_inverses_track_the_damped_factors():
    model = net(seed=2)
    kfac = KFAC(model, beta=0.9, damping=1e-2, refresh_below=0.01)
    for s in range(6):
        step(model, kfac, *data(seed=10 + s))
    assert kfac.num_refreshes == 0
    for layer in kfac.layers:
        for F, F_inv in ((layer.S, layer.S_inv), (layer.G, layer.G_inv)):
            ref = torch.linalg.inv(F + kfac.mu * torch.eye(F.shape[0], dtype=torch.float64))
            assert torch.allclose(F_inv, ref, rtol=1e-9, atol=1e-9 * ref.abs().max())


def test_solve_equals_the_dense_block_inverse():
    model = net(seed=3, extra=True)
    kfac = KFAC(model, beta=0.8)
    for s in range(4):
        step(model, kfac, *data(seed=20 + s))
    v = torch.randn(sum(p.numel() for p in kfac.params), dtype=torch.float64)
    got = kfac.solve(v)
    pieces = list(torch.split(v, [p.numel() for p in kfac.params]))
    expected, at = [], 0
    first, norm_layer, last = model[0], model[2], model[3]
    # layer 0: [W | b] row-major, block inverse kron(G^-1, S^-1)
    L0 = kfac.layers[0]
    V0 = torch.cat([pieces[0].view(7, 5), pieces[1].view(7, 1)], dim=1).reshape(-1)
    X0 = (torch.kron(L0.G_inv, L0.S_inv) @ V0).view(7, 6)
    # the LayerNorm parameters: diagonal blocks
    diag = [pieces[k] / (kfac._diag[k] + kfac.damping) for k in (2, 3)]
    L1 = kfac.layers[1]
    X1 = (torch.kron(L1.G_inv, L1.S_inv) @ pieces[4]).view(3, 7)
    expected = torch.cat([X0[:, :5].reshape(-1), X0[:, 5], diag[0], diag[1], X1.reshape(-1)])
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_nhgd_with_kfac_on_a_network_with_an_unsupported_layer():
    model = net(seed=4, extra=True)
    log_decay = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())
    est = NHGD(params, [log_decay], curvature=KFAC(model, params=params), inner_lr=0.1)
    X, y = data(64, seed=5)
    Xv, yv = data(32, seed=6)

    def inner():
        return nn.functional.cross_entropy(model(X), y) + log_decay.exp() * sum(p.pow(2).sum() for p in params)

    for _ in range(10):
        est.inner_step(inner(), batch_size=64)
    (h,) = est.hypergradient(nn.functional.cross_entropy(model(Xv), yv), inner)
    assert h.shape == () and bool(torch.isfinite(h))


def test_bad_modules():
    with pytest.raises(ValueError, match="'modules'"):
        KFAC(nn.Sequential(nn.Tanh()))


def test_a_forward_pass_without_backward_does_not_replace_the_step_inputs():
    """A logged evaluation between the loss and the update (grad enabled, never
    backpropagated) must leave the factors to the step's own batch."""
    factors = []
    for extra_forward in (False, True):
        model = net(seed=4)
        kfac = KFAC(model, beta=0.9)
        X, y = data(seed=5)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        if extra_forward:
            model(100 * torch.randn(5, 5, dtype=torch.float64))
        loss.backward()
        kfac.update(torch.cat([p.grad.reshape(-1) for p in kfac.params]), batch_size=len(X))
        factors.append([(layer.S.clone(), layer.G.clone()) for layer in kfac.layers])
    for (S0, G0), (S1, G1) in zip(*factors):
        assert torch.equal(S0, S1) and torch.equal(G0, G1)


def test_captures_taken_then_given_back_equal_a_direct_update():
    X, y = data(seed=3)
    direct_model, later_model = net(seed=4), net(seed=4)
    direct, later = KFAC(direct_model, beta=0.9), KFAC(later_model, beta=0.9)
    step(direct_model, direct, X, y)
    later_model.zero_grad()
    nn.functional.cross_entropy(later_model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in later.params])
    captures = later.take_captures()
    assert len(captures) == 4 and all(layer.acts is None for layer in later.layers)
    later.update(g, batch_size=len(X), captures=captures)
    for a, b in zip(direct.state_dict()["layers"], later.state_dict()["layers"]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_update_without_a_pass_or_with_wrong_captures_changes_nothing():
    model = net(seed=5, extra=True)  # the LayerNorm has a diagonal block
    kfac = KFAC(model, beta=0.9)
    step(model, kfac, *data(seed=6))
    before = kfac.state_dict()
    assert any(d is not None for d in before["diag"])
    g = torch.ones(sum(p.numel() for p in kfac.params), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="saw no forward and backward pass"):
        kfac.update(g)  # no pass since the last update
    with pytest.raises(ValueError, match="'captures'"):
        kfac.update(g, captures=[torch.ones(2, 6, dtype=torch.float64)])
    after = kfac.state_dict()
    assert all(torch.equal(x, y) for x, y in zip(before["diag"], after["diag"]) if x is not None)
    for a, b in zip(before["layers"], after["layers"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert after["num_updates"] == before["num_updates"]
