"""kfac_update_ / kfac_apply (docs/design.md §2.3): per layer i,
S_i <- a S_i + (b/n_i) acts_i^T acts_i and G_i <- a G_i + (b/m_i) grads_i^T grads_i,
applied to the inverses S_inv[i], G_inv[i] in place; kfac_apply gives
G_inv[i] @ V[i] @ S_inv[i]."""

from __future__ import annotations

import math

import pytest
import torch

from nhgd_ext import ops
from nhgd_testing import (
    DEVICES,
    DTYPES,
    assert_exactly_symmetric,
    assert_unchanged,
    coeff,
    device_coeff_params,
    direct_inverse,
    inv64,
    rand_rows,
    random_spd,
    rel_err,
    requires_cuda,
    snapshot,
    state_from,
    status_value,
    tol,
)

# (d_in, d_out, n rows of acts, m rows of grads)
LAYERS = [(1, 2, 4, 4), (5, 7, 1, 1), (33, 10, 16, 16), (12, 3, 40, 40)]


def make_layers(dtype, device, layers=LAYERS, seed=0):
    S_inv, G_inv, acts, grads = [], [], [], []
    for i, (din, dout, n, m) in enumerate(layers):
        S_inv.append(state_from(random_spd(din, seed=seed + 10 * i), dtype, device))
        G_inv.append(state_from(random_spd(dout, seed=seed + 10 * i + 1), dtype, device))
        # activations of size ~1 per entry (like inputs of a layer), gradients small
        acts.append(rand_rows(n, din, seed=seed + 10 * i + 2, scale=1.0, dtype=dtype).to(device))
        grads.append(rand_rows(m, dout, seed=seed + 10 * i + 3, scale=0.1, dtype=dtype).to(device))
    return S_inv, G_inv, acts, grads


def factor_ref(M, X, a, b):
    X = X.double().cpu()
    return a * M + (b / X.shape[0]) * (X.mT @ X)


def cond_bound(M_new: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(M_new)
    return float(ev[-1] / ev[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,kind", device_coeff_params())
def test_update_matches_explicit_products(device, kind, dtype):
    S_inv, G_inv, acts, grads = make_layers(dtype, device)
    ptrs = [t.data_ptr() for t in S_inv + G_inv]
    S = [inv64(x) for x in S_inv]
    G = [inv64(x) for x in G_inv]
    status = ops.new_status(device)
    for step, (a, b) in enumerate([(0.9, 0.1), ops.running_average_coeffs(3), (1.0, 0.5)]):
        ca, cb = coeff(a, kind, device, dtype), coeff(b, kind, device, dtype)
        a_used = float(ca.item()) if isinstance(ca, torch.Tensor) else ca
        b_used = float(cb.item()) if isinstance(cb, torch.Tensor) else cb
        out = ops.kfac_update_(S_inv, G_inv, acts, grads, ca, cb, status=status)
        assert out[0] is S_inv and out[1] is G_inv
        S = [factor_ref(M, X, a_used, b_used) for M, X in zip(S, acts)]
        G = [factor_ref(M, X, a_used, b_used) for M, X in zip(G, grads)]
        # fresh rows for the next step
        acts = [rand_rows(*x.shape, seed=1000 * step + i, scale=1.0, dtype=dtype).to(device)
                for i, x in enumerate(acts)]
        grads = [rand_rows(*x.shape, seed=2000 * step + i, scale=0.1, dtype=dtype).to(device)
                 for i, x in enumerate(grads)]
    assert status_value(status) == 0
    assert [t.data_ptr() for t in S_inv + G_inv] == ptrs
    for name, states, facs in (("S", S_inv, S), ("G", G_inv, G)):
        for i, (X, M) in enumerate(zip(states, facs)):
            assert_exactly_symmetric(X)
            d = X.shape[0]
            err = rel_err(X, direct_inverse(M))
            assert err <= tol(dtype, d, 3, cond=cond_bound(M)), f"{name}[{i}] (d={d}): {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_grads_rows_may_differ_from_acts_rows(device, dtype):
    """m_i = grads_i.size(0) scales the G update (SPEC), independently of n_i."""
    layers = [(4, 3, 6, 2), (9, 5, 1, 7)]
    S_inv, G_inv, acts, grads = make_layers(dtype, device, layers, seed=50)
    S = [inv64(x) for x in S_inv]
    G = [inv64(x) for x in G_inv]
    ops.kfac_update_(S_inv, G_inv, acts, grads, 0.8, 0.4)
    for X, M, rows in zip(S_inv + G_inv, S + G, acts + grads):
        M_new = factor_ref(M, rows, 0.8, 0.4)
        assert rel_err(X, direct_inverse(M_new)) <= tol(dtype, X.shape[0], cond=cond_bound(M_new))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_update_equals_per_layer_woodbury(device, dtype):
    """One grouped call == a woodbury_ per factor with H = sqrt(b/n) rows."""
    S_inv, G_inv, acts, grads = make_layers(dtype, device, seed=7)
    S_ref = [x.clone() for x in S_inv]
    G_ref = [x.clone() for x in G_inv]
    a, b = 0.95, 0.05
    ops.kfac_update_(S_inv, G_inv, acts, grads, a, b)
    for X, rows in zip(S_ref + G_ref, acts + grads):
        H = (rows.double() * math.sqrt(b / rows.shape[0])).to(dtype)
        ops.woodbury_(X, H, a)
    for X, Y in zip(S_inv + G_inv, S_ref + G_ref):
        M = inv64(Y)
        assert rel_err(X, Y.double().cpu()) <= 2 * tol(dtype, X.shape[0], cond=cond_bound(M))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_tuples_and_single_layer(device, dtype):
    S_inv, G_inv, acts, grads = make_layers(dtype, device, [(6, 4, 3, 3)], seed=3)
    S0, G0 = inv64(S_inv[0]), inv64(G_inv[0])
    ops.kfac_update_(tuple(S_inv), tuple(G_inv), tuple(acts), tuple(grads), 0.5, 0.5)
    S1 = factor_ref(S0, acts[0], 0.5, 0.5)
    G1 = factor_ref(G0, grads[0], 0.5, 0.5)
    assert rel_err(S_inv[0], direct_inverse(S1)) <= tol(dtype, 6, cond=cond_bound(S1))
    assert rel_err(G_inv[0], direct_inverse(G1)) <= tol(dtype, 4, cond=cond_bound(G1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_nonfinite_rows_raise_and_leave_all_layers(dtype):
    S_inv, G_inv, acts, grads = make_layers(dtype, "cpu", seed=9)
    grads[2][3, 1] = math.inf  # a late layer: nothing of earlier layers may be written
    snap = snapshot(*S_inv, *G_inv)
    with pytest.raises(ValueError, match="'grads'"):
        ops.kfac_update_(S_inv, G_inv, acts, grads, 0.9, 0.1)
    assert_unchanged(S_inv + G_inv, snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_matches_products(device, dtype):
    S_inv, G_inv, _, _ = make_layers(dtype, device, seed=11)
    V = [rand_rows(G.shape[0], S.shape[0], seed=20 + i, scale=1.0, dtype=dtype).to(device)
         for i, (S, G) in enumerate(zip(S_inv, G_inv))]
    # one non-contiguous V
    V[2] = rand_rows(S_inv[2].shape[0], G_inv[2].shape[0], seed=30, scale=1.0, dtype=dtype).to(device).mT
    snap = snapshot(*S_inv, *G_inv, *V)
    out = ops.kfac_apply(S_inv, G_inv, V)
    assert_unchanged(S_inv + G_inv + V, snap)
    assert isinstance(out, list) and len(out) == len(V)
    for i, (S, G, v, o) in enumerate(zip(S_inv, G_inv, V, out)):
        assert o.shape == v.shape and o.dtype == dtype and o.device.type == device
        ref = G.double().cpu() @ v.double().cpu() @ S.double().cpu()
        err = rel_err(o, ref)
        assert err <= (1e-13 if dtype == torch.float64 else 4 * tol(dtype, max(S.shape[0], G.shape[0]))), (i, err)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_then_update_roundtrip(device):
    """kfac_apply with the updated inverses equals G^-1 V S^-1 computed from
    the float64 factors by direct solves."""
    dtype = torch.float64
    S_inv, G_inv, acts, grads = make_layers(dtype, device, seed=13)
    S = [factor_ref(inv64(x), X, 0.9, 0.1) for x, X in zip(S_inv, acts)]
    G = [factor_ref(inv64(x), X, 0.9, 0.1) for x, X in zip(G_inv, grads)]
    ops.kfac_update_(S_inv, G_inv, acts, grads, 0.9, 0.1)
    V = [rand_rows(g.shape[0], s.shape[0], seed=40 + i, scale=1.0).to(device) for i, (s, g) in enumerate(zip(S, G))]
    out = ops.kfac_apply(S_inv, G_inv, V)
    for o, s, g, v in zip(out, S, G, V):
        ref = torch.linalg.solve(g, v.cpu()) @ torch.linalg.inv(s)
        assert rel_err(o, ref) <= 1e-10


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_invalid_device_a_skips_every_layer(dtype):
    S_inv, G_inv, acts, grads = make_layers(dtype, "cuda", seed=15)
    snap = snapshot(*S_inv, *G_inv)
    status = ops.new_status("cuda")
    ops.kfac_update_(S_inv, G_inv, acts, grads, torch.tensor(-1.0, device="cuda"),
                     torch.tensor(0.1, device="cuda"), status=status)
    torch.cuda.synchronize()
    assert_unchanged(S_inv + G_inv, snap)
    # one per skipped layer (or one per skipped factor matrix)
    assert status_value(status) in (len(LAYERS), 2 * len(LAYERS))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nonfinite_acts_skip_and_count(dtype):
    S_inv, G_inv, acts, grads = make_layers(dtype, "cuda", seed=17)
    acts[1][0, 2] = math.nan
    S0 = [inv64(x) for x in S_inv]
    G0 = [inv64(x) for x in G_inv]
    before = [x.clone() for x in S_inv + G_inv]
    status = ops.new_status("cuda")
    ops.kfac_update_(S_inv, G_inv, acts, grads, 0.9, 0.1, status=status)
    torch.cuda.synchronize()
    assert status_value(status) >= 1
    assert torch.equal(S_inv[1], before[1])  # the factor fed NaN is untouched
    for i in (0, 2, 3):  # the other layers are updated
        M = factor_ref(S0[i], acts[i], 0.9, 0.1)
        assert rel_err(S_inv[i], direct_inverse(M)) <= tol(dtype, M.shape[0], cond=cond_bound(M))
        M = factor_ref(G0[i], grads[i], 0.9, 0.1)
        assert rel_err(G_inv[i], direct_inverse(M)) <= tol(dtype, M.shape[0], cond=cond_bound(M))


@requires_cuda
def test_cuda_runs_on_current_stream():
    dtype = torch.float32
    S_inv, G_inv, acts, grads = make_layers(dtype, "cuda", seed=19)
    S = [factor_ref(inv64(x), X, 0.9, 0.1) for x, X in zip(S_inv, acts)]
    G = [factor_ref(inv64(x), X, 0.9, 0.1) for x, X in zip(G_inv, grads)]
    stale = [torch.zeros_like(x) for x in acts]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        for z, x in zip(stale, acts):
            z.copy_(x)
        ops.kfac_update_(S_inv, G_inv, stale, grads, 0.9, 0.1)
    s.synchronize()
    for X, M in zip(S_inv + G_inv, S + G):
        assert rel_err(X, direct_inverse(M)) <= tol(dtype, M.shape[0], cond=cond_bound(M))
