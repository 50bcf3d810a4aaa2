"""sherman_morrison_deferred_ / apply_pending_: the one-pass-per-update form.

The state is the pair (A, pending); after apply_pending_ it must equal the
float64 inverse of the accumulated M, like the immediate op.
"""

from __future__ import annotations

import pytest
import torch

import nhgd_ext
from nhgd_ext import ops
from nhgd_testing import (
    DEVICES,
    DTYPES,
    assert_exactly_symmetric,
    assert_unchanged,
    direct_inverse,
    inv64,
    rand_rows,
    random_spd,
    rel_err,
    snapshot,
    state_from,
    tol,
)

STEPS = 6


def accumulate(M, g, a, b):
    g64 = g.to("cpu", torch.float64)
    return a * M + b * torch.outer(g64, g64)


@pytest.mark.parametrize("schedule", ["running", "ema"])
@pytest.mark.parametrize("d", [1, 2, 7, 33, 130, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_deferred_sequence_matches_direct_inverse(device, dtype, d, schedule):
    if d == 1000 and dtype == torch.float32:
        pytest.skip("d = 1000 runs in float64 only, to keep the suite short")
    A = state_from(random_spd(d, seed=d), dtype, device)
    M = inv64(A)
    pending = ops.new_pending(d, dtype=dtype, device=device)
    for t in range(STEPS):
        a, b = ops.running_average_coeffs(t + 1) if schedule == "running" else ops.ema_coeffs(0.9)
        g = rand_rows(d, seed=300 + t, dtype=dtype).to(device)
        assert ops.sherman_morrison_deferred_(A, pending, g, a, b) is A
        M = accumulate(M, g, a, b)
    assert ops.apply_pending_(A, pending) is A
    assert_exactly_symmetric(A)
    assert torch.equal(pending.cpu(), ops.new_pending(d, dtype=dtype)), "apply_pending_ must empty the update"
    assert rel_err(A, direct_inverse(M)) < tol(dtype, d, STEPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_deferred_equals_immediate(device, dtype):
    d = 45
    A1 = state_from(random_spd(d, seed=1), dtype, device)
    A2 = A1.clone()
    pending = ops.new_pending(d, dtype=dtype, device=device)
    for t in range(4):
        g = rand_rows(d, seed=40 + t, dtype=dtype).to(device)
        ops.sherman_morrison_(A1, g, 0.8, 0.2)
        ops.sherman_morrison_deferred_(A2, pending, g, 0.8, 0.2)
    ops.apply_pending_(A2, pending)
    assert rel_err(A2, A1.to(torch.float64)) < tol(dtype, d, 4)


@pytest.mark.skipif(nhgd_ext.backend("cpu") != "cpp", reason="the deferral is a property of the compiled CPU kernel")
def test_deferred_keeps_work_pending_on_cpu():
    d = 9
    A = state_from(random_spd(d, seed=2), torch.float64, "cpu")
    pending = ops.new_pending(d, dtype=torch.float64)
    g = rand_rows(d, seed=3)
    before = A.clone()
    ops.sherman_morrison_deferred_(A, pending, g, 0.5, 0.5)
    # the first call only had an empty update to apply: A is as it was, the new one waits
    assert torch.equal(A.tril(), before.tril())
    assert pending[0].item() == pytest.approx(2.0) and pending[1].item() > 0


@pytest.mark.parametrize(
    "corrupt, name",
    [
        (lambda A, P, g: (A, P[:-1], g), "pending"),
        (lambda A, P, g: (A, P.float(), g), "pending"),
        (lambda A, P, g: (A, P, g[:-1]), "g"),
        (lambda A, P, g: (A, P, torch.full_like(g, float("nan"))), "g"),
        (lambda A, P, g: (A, P, g.float()), "g"),
        (lambda A, P, g: (A[:, :-1], P, g), "A"),
    ],
)
def test_deferred_bad_input_leaves_state(corrupt, name):
    d = 6
    A = state_from(random_spd(d, seed=4), torch.float64, "cpu")
    P = ops.new_pending(d, dtype=torch.float64)
    P[0], P[1] = 1.5, 0.25
    P[2:] = rand_rows(d, seed=5)
    g = rand_rows(d, seed=6)
    snap = snapshot(A, P)
    args = corrupt(A, P, g)
    with pytest.raises(ValueError, match=f"'{name}'"):
        ops.sherman_morrison_deferred_(*args, 0.9, 0.1)
    assert_unchanged([A, P], snap)


@pytest.mark.parametrize("a, b, name", [(0.0, 0.1, "a"), (-1.0, 0.1, "a"), (0.9, -0.1, "b"), (float("inf"), 0.1, "a")])
def test_deferred_bad_coefficients(a, b, name):
    d = 5
    A = state_from(random_spd(d, seed=7), torch.float32, "cpu")
    P = ops.new_pending(d)
    snap = snapshot(A, P)
    with pytest.raises(ValueError, match=f"'{name}'"):
        ops.sherman_morrison_deferred_(A, P, rand_rows(d, seed=8, dtype=torch.float32), a, b)
    assert_unchanged([A, P], snap)


def test_deferred_nonpositive_denominator_keeps_represented_state():
    d = 4
    A = -torch.eye(d, dtype=torch.float64)  # not positive definite: 1 + (b/a) g^T A g < 0
    P = ops.new_pending(d, dtype=torch.float64)
    g = torch.full((d,), 2.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not positive"):
        ops.sherman_morrison_deferred_(A, P, g, 0.5, 0.5)
    assert torch.equal(A, -torch.eye(d, dtype=torch.float64))
    assert torch.equal(P, ops.new_pending(d, dtype=torch.float64))


@pytest.mark.parametrize("d", [1, 2, 7, 33, 130, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_matvec_reads_the_lower_triangle(device, dtype, d):
    A = state_from(random_spd(d, seed=d + 1), dtype, device)
    v = rand_rows(d, seed=d + 2, dtype=dtype).to(device)
    expected = A.double() @ v.double()
    if device == "cpu":  # the CPU kernel must not look above the diagonal
        A = A.clone()
        A.masked_fill_(torch.ones_like(A, dtype=torch.bool).triu(1), float("nan"))
    got = ops.symmetric_matvec(A, v)
    assert rel_err(got.unsqueeze(0), expected.cpu().unsqueeze(0)) < tol(dtype, d)


def test_symmetric_matvec_bad_input():
    A = torch.eye(4)
    with pytest.raises(ValueError, match="'v'"):
        ops.symmetric_matvec(A, torch.ones(5))
    with pytest.raises(ValueError, match="'A'"):
        ops.symmetric_matvec(torch.ones(3, 4), torch.ones(4))
