"""sherman_morrison_: A = M^-1 <- (a M + b g g^T)^-1 (docs/design.md §2.1).

Every expectation is the float64 inverse of the accumulated M, never the
update formula itself (the paper's Algorithm 2 misprints it).
"""

from __future__ import annotations

import math

import pytest
import torch

import nhgd_ext
from nhgd_ext import ops
from nhgd_testing import (
    CUDA,
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

SIZES = [1, 2, 7, 33, 130]
STEPS = 5


def schedule_coeffs(schedule: str, step: int) -> tuple[float, float]:
    """(a, b) of the `step`-th update (0-based)."""
    if schedule == "running":
        # n samples already averaged: start at n = 1 (a = 0 would be invalid),
        # so n = 2, 3, ... exercise the coefficients that Algorithm 2 misprints
        return ops.running_average_coeffs(step + 1)
    if schedule == "ema":
        return ops.ema_coeffs(0.9)
    raise AssertionError(schedule)


def run_sequence(d, dtype, device, *, batch, kind, schedule, steps=STEPS, seed=0):
    """Applies `steps` updates with fresh g's; returns (A, float64 direct inverse)."""
    A = state_from(random_spd(d, batch=batch, seed=seed), dtype, device)
    ptr = A.data_ptr()
    M = inv64(A)
    status = ops.new_status(device)
    for t in range(steps):
        a, b = schedule_coeffs(schedule, t)
        ca, cb = coeff(a, kind, device, dtype), coeff(b, kind, device, dtype)
        # the reference uses exactly the value the op receives
        a_used = float(ca) if not isinstance(ca, torch.Tensor) else float(ca.item())
        b_used = float(cb) if not isinstance(cb, torch.Tensor) else float(cb.item())
        g = rand_rows(*A.shape[:-1], seed=seed * 1000 + 17 + t, dtype=dtype).to(device)
        out = ops.sherman_morrison_(A, g, ca, cb, status=status)
        assert out is A
        assert A.data_ptr() == ptr
        assert_exactly_symmetric(A)
        g64 = g.to("cpu", torch.float64)
        M = a_used * M + b_used * (g64.unsqueeze(-1) * g64.unsqueeze(-2))
    assert status_value(status) == 0
    return A, direct_inverse(M)


@pytest.mark.parametrize("schedule", ["running", "ema"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,kind", device_coeff_params())
def test_consecutive_updates_match_direct_inverse(device, kind, dtype, d, batched, schedule):
    A, ref = run_sequence(d, dtype, device, batch=3 if batched else None, kind=kind, schedule=schedule)
    err = rel_err(A, ref)
    assert err <= tol(dtype, d, STEPS), f"relative error {err:.3e} > {tol(dtype, d, STEPS):.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_large_d(device, dtype):
    """d = 1000, single matrix, running-average coefficients as floats."""
    A, ref = run_sequence(1000, dtype, device, batch=None, kind="float", schedule="running", steps=3)
    err = rel_err(A, ref)
    assert err <= tol(dtype, 1000, 3), f"relative error {err:.3e}"


def _misprinted_update(A, g, n):
    """The update as the paper's Algorithm 2 (line 7) prints it, in float64:
    rank-one coefficient (n+1)/n where Eq. 3.2 has (n+1)/n^2."""
    u = A @ g
    q = g @ u
    return (n + 1) / n * A - (n + 1) / n * torch.outer(u, u) / (1 + q / n)


def _correct_update(A, g, n):
    """Eq. 3.2 evaluated by hand in float64 (only to validate this harness)."""
    u = A @ g
    q = g @ u
    return (n + 1) / n * A - (n + 1) / n**2 * torch.outer(u, u) / (1 + q / n)


@pytest.mark.parametrize("d", [2, 7, 33])
def test_misprinted_coefficients_fail_tolerance(d):
    """The tolerances of this suite discriminate the misprint of Algorithm 2.

    From n = 2 samples on, the printed coefficient differs from Eq. 3.2 by a
    factor n; both the printed formula and the op fed misprint-style
    coefficients (a = (n+1)/n) must miss the direct inverse by far more than
    the float32 tolerance used above, while Eq. 3.2 meets it.
    """
    tol32 = tol(torch.float32, d, STEPS)
    A0 = random_spd(d, seed=5)
    M = torch.linalg.inv(A0)
    A_print, A_eq = A0.clone(), A0.clone()
    A_op = A0.to(torch.float32).contiguous()
    M_op = inv64(A_op)
    for t in range(STEPS):
        n = t + 2  # 2, 3, ...: where the misprint matters
        g = rand_rows(d, seed=300 + t)
        a, b = ops.running_average_coeffs(n)
        M = a * M + b * torch.outer(g, g)
        A_print = _misprinted_update(A_print, g, n)
        A_eq = _correct_update(A_eq, g, n)
        # the op, fed the inverted ("(t+1)/t") coefficients
        ops.sherman_morrison_(A_op, g.to(torch.float32), (n + 1) / n, 1.0 / n)
        M_op = a * M_op + b * torch.outer(g, g)
    ref = direct_inverse(M)
    assert rel_err(A_eq, ref) <= 1e-12
    assert rel_err(A_print, ref) > 100 * tol32
    assert rel_err(A_op, direct_inverse(M_op)) > 100 * tol32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_single_update_each_coefficient_value(device, dtype):
    """One update per (a, b) pair including b = 0 (A' = A / a) and a = 1."""
    d = 9
    for i, (a, b) in enumerate([(1.0, 0.0), (0.5, 0.0), (1.0, 1.0), (0.25, 3.0), (0.999, 1e-3), (2.0, 0.5)]):
        A = state_from(random_spd(d, seed=40 + i), dtype, device)
        M = inv64(A)
        g = rand_rows(d, seed=60 + i, dtype=dtype).to(device)
        ops.sherman_morrison_(A, g, a, b)
        g64 = g.double().cpu()
        err = rel_err(A, direct_inverse(a * M + b * torch.outer(g64, g64)))
        assert err <= tol(dtype, d, cond=8 + 4 * b / a), (a, b, err)
        assert_exactly_symmetric(A)


def _with_garbage_upper(A):
    """A copy of A whose strict upper triangle holds large unrelated values."""
    bad = A.clone()
    d = A.shape[-1]
    garbage = 1e3 * torch.randn(A.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    upper = torch.ones(d, d, dtype=torch.bool).triu(1).expand(A.shape).to(A.device)
    bad[upper] = garbage.to(dtype=A.dtype, device=A.device)[upper]
    if d > 1:
        assert not torch.equal(bad, A)
    return bad, upper


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_lower_only_reads_and_writes_the_lower_triangle(device, dtype):
    """lower_only=True: garbage in the strict upper triangle changes nothing in
    the lower one (A g reads only the lower triangle); on the CPU the upper
    triangle is left as it was; symmetrize_ then gives the full-mode result."""
    for batch in (None, 2):
        A_sym = state_from(random_spd(12, batch=batch, seed=8), dtype, device)
        A_bad, upper = _with_garbage_upper(A_sym)
        stale = A_bad[upper].clone()
        g = rand_rows(*A_sym.shape[:-1], seed=10, dtype=dtype).to(device)
        A_full_bad = A_bad.clone()
        ops.sherman_morrison_(A_sym, g, 0.8, 0.2)  # full mode
        out = ops.sherman_morrison_(A_bad, g, 0.8, 0.2, lower_only=True)
        # full mode on the garbage state: u = A g still comes from the lower triangle
        ops.sherman_morrison_(A_full_bad, g, 0.8, 0.2)
        if device == "cpu":
            assert torch.equal(A_full_bad.tril(), A_sym.tril())
        else:
            assert rel_err(A_full_bad.tril(), A_sym.tril().double().cpu()) <= tol(dtype, 12)
        assert out is A_bad
        if device == "cpu":
            assert torch.equal(A_bad[upper], stale), "lower_only=True wrote the upper triangle"
            assert torch.equal(A_bad.tril(), A_sym.tril())
        else:  # the CUDA kernels may update both triangles; the lower one must be right
            assert rel_err(A_bad.tril(), A_sym.tril().double().cpu()) <= tol(dtype, 12)
        assert ops.symmetrize_(A_bad) is A_bad
        assert_exactly_symmetric(A_bad)
        if device == "cpu":
            assert torch.equal(A_bad, A_sym)
        else:
            assert rel_err(A_bad, A_sym.double().cpu()) <= tol(dtype, 12)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("d", [1, 7, 33, 130])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,kind", device_coeff_params())
def test_lower_only_sequence_then_symmetrize(device, kind, dtype, d, batched):
    """Consecutive lower_only updates from a state with a garbage upper
    triangle, one symmetrize_ at the end: the direct inverse."""
    batch = 3 if batched else None
    A_sym = state_from(random_spd(d, batch=batch, seed=d), dtype, device)
    M = inv64(A_sym)
    A, _ = _with_garbage_upper(A_sym)
    for t in range(STEPS):
        a, b = schedule_coeffs("running", t)
        ca, cb = coeff(a, kind, device, dtype), coeff(b, kind, device, dtype)
        a_used = float(ca.item()) if isinstance(ca, torch.Tensor) else ca
        b_used = float(cb.item()) if isinstance(cb, torch.Tensor) else cb
        g = rand_rows(*A.shape[:-1], seed=500 + t, dtype=dtype).to(device)
        ops.sherman_morrison_(A, g, ca, cb, lower_only=True)
        g64 = g.to("cpu", torch.float64)
        M = a_used * M + b_used * (g64.unsqueeze(-1) * g64.unsqueeze(-2))
    ops.symmetrize_(A)
    assert_exactly_symmetric(A)
    assert rel_err(A, direct_inverse(M)) <= tol(dtype, d, STEPS)


@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.int32, id="i32")])
@pytest.mark.parametrize("device", DEVICES)
def test_symmetrize_copies_lower_onto_upper(device, dtype):
    for shape in ((1, 1), (5, 5), (3, 17, 17), (2, 64, 64)):
        X = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        if dtype == torch.int32:
            X = (100 * X).to(dtype).to(device)
            with pytest.raises(ValueError, match="'A'"):
                ops.symmetrize_(X)
            continue
        X = X.to(dtype=dtype, device=device)
        expected = X.tril() + X.tril(-1).mT
        ptr = X.data_ptr()
        assert ops.symmetrize_(X) is X and X.data_ptr() == ptr
        assert torch.equal(X, expected)
        assert_exactly_symmetric(X)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_g(device, dtype):
    d = 17
    A = state_from(random_spd(d, batch=3, seed=11), dtype, device)
    M = inv64(A)
    G = rand_rows(d, 3, seed=12, dtype=dtype).to(device)  # d x 3
    g = G.mT  # 3 x d, strides (1, 3)
    assert not g.is_contiguous()
    ops.sherman_morrison_(A, g, 0.7, 0.3)
    g64 = g.double().cpu()
    ref = direct_inverse(0.7 * M + 0.3 * g64.unsqueeze(-1) * g64.unsqueeze(-2))
    assert rel_err(A, ref) <= tol(dtype, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_status_untouched(dtype):
    A = state_from(random_spd(5, seed=1), dtype, "cpu")
    status = ops.new_status("cpu")
    assert status.dtype == torch.int32 and status.numel() == 1 and status_value(status) == 0
    ops.sherman_morrison_(A, rand_rows(5, seed=2, dtype=dtype), 0.5, 0.5, status=status)
    assert status_value(status) == 0


def _indefinite_cases(dtype):
    """(A, g, a, b) with 1 + (b/a) g^T A g <= 0 or not finite."""
    e1 = torch.zeros(3, dtype=dtype)
    e1[0] = 1
    yield -2 * torch.eye(3, dtype=dtype), e1, 0.5, 0.5  # 1 + 1 * (-2) = -1
    yield -torch.eye(3, dtype=dtype), e1, 0.5, 0.5  # exactly 0
    yield -torch.eye(3, dtype=dtype), 4 * e1, 1.0, 1.0  # 1 - 16 < 0
    if dtype == torch.float64:
        yield torch.eye(3, dtype=dtype), 1e200 * e1, 1.0, 1e200  # 1 + inf: not finite


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonpositive_denominator_raises_on_cpu(dtype):
    for A, g, a, b in _indefinite_cases(dtype):
        snap = snapshot(A)
        status = ops.new_status("cpu")
        with pytest.raises(RuntimeError):
            ops.sherman_morrison_(A, g, a, b, status=status)
        assert_unchanged([A], snap)
        assert status_value(status) == 0
        # tensor overload too
        with pytest.raises(RuntimeError):
            ops.sherman_morrison_(A, g, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        assert_unchanged([A], snap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonpositive_denominator_in_one_batch_element_raises_and_leaves_all(dtype):
    A = state_from(random_spd(3, batch=3, seed=2), dtype, "cpu")
    A[1] = -2 * torch.eye(3, dtype=dtype)
    g = torch.zeros(3, 3, dtype=dtype)
    g[:, 0] = 1
    snap = snapshot(A)
    with pytest.raises(RuntimeError):
        ops.sherman_morrison_(A, g, 0.5, 0.5)
    assert_unchanged([A], snap)


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nonpositive_denominator_skips_and_counts(dtype):
    for A, g, a, b in _indefinite_cases(dtype):
        A, g = A.cuda(), g.cuda()
        snap = snapshot(A)
        status = ops.new_status("cuda")
        ops.sherman_morrison_(A, g, a, b, status=status)  # no exception
        torch.cuda.synchronize()
        assert_unchanged([A], snap)
        assert status_value(status) == 1


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_batch_skips_only_the_bad_element(dtype):
    d = 6
    A = state_from(random_spd(d, batch=3, seed=3), dtype, "cuda")
    A[1] = -2 * torch.eye(d, dtype=dtype, device="cuda")
    g = rand_rows(3, d, seed=4, dtype=dtype).cuda()
    g[1] = 0
    g[1, 0] = 1
    before = A.clone()
    M = inv64(A[[0, 2]])
    status = ops.new_status("cuda")
    ops.sherman_morrison_(A, g, 0.5, 0.5, status=status)
    torch.cuda.synchronize()
    assert status_value(status) == 1
    assert torch.equal(A[1], before[1])
    g64 = g[[0, 2]].double().cpu()
    ref = direct_inverse(0.5 * M + 0.5 * g64.unsqueeze(-1) * g64.unsqueeze(-2))
    assert rel_err(A[[0, 2]], ref) <= tol(dtype, d)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["a_negative", "a_zero", "a_nan", "b_negative", "b_inf"])
def test_cuda_invalid_device_coefficient_skips(dtype, bad):
    n, d = 3, 5
    A = state_from(random_spd(d, batch=n, seed=6), dtype, "cuda")
    g = rand_rows(n, d, seed=7, dtype=dtype).cuda()
    a, b = 0.9, 0.1
    a = {"a_negative": -1.0, "a_zero": 0.0, "a_nan": math.nan}.get(bad, a)
    b = {"b_negative": -1.0, "b_inf": math.inf}.get(bad, b)
    snap = snapshot(A)
    status = ops.new_status("cuda")
    ops.sherman_morrison_(A, g, torch.tensor(a, device="cuda"), torch.tensor(b, device="cuda"), status=status)
    torch.cuda.synchronize()
    assert_unchanged([A], snap)
    assert status_value(status) == n  # one per skipped matrix


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_cuda_nonfinite_g_skips_that_matrix(dtype, value):
    n, d = 3, 5
    A = state_from(random_spd(d, batch=n, seed=6), dtype, "cuda")
    M = inv64(A)
    g = rand_rows(n, d, seed=7, dtype=dtype).cuda()
    g[2, 3] = value
    before = A.clone()
    status = ops.new_status("cuda")
    ops.sherman_morrison_(A, g, 0.9, 0.1, status=status)
    torch.cuda.synchronize()
    assert status_value(status) == 1
    assert torch.equal(A[2], before[2])
    g64 = g[:2].double().cpu()
    ref = direct_inverse(0.9 * M[:2] + 0.1 * g64.unsqueeze(-1) * g64.unsqueeze(-2))
    assert rel_err(A[:2], ref) <= tol(dtype, d)


@requires_cuda
def test_cuda_skip_without_status_goes_to_device_counter():
    ops.skipped_updates("cuda", reset=True)
    A = state_from(random_spd(4, seed=1), torch.float32, "cuda")
    snap = snapshot(A)
    ops.sherman_morrison_(A, torch.ones(4, device="cuda"), torch.tensor(-1.0, device="cuda"), 0.5)
    assert ops.skipped_updates("cuda", reset=True) == 1
    assert_unchanged([A], snap)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_runs_on_current_stream(dtype):
    """The kernel must be ordered after earlier work on the current stream: g is
    written on a side stream behind a long sleep; a kernel launched on any
    other stream would read the stale (zero) g."""
    d = 64
    A = state_from(random_spd(d, seed=13), dtype, "cuda")
    M = inv64(A)
    g_true = rand_rows(d, seed=14, dtype=dtype).cuda()
    g = torch.zeros_like(g_true)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream
        g.copy_(g_true)
        ops.sherman_morrison_(A, g, 0.9, 0.1)
    s.synchronize()
    g64 = g_true.double().cpu()
    ref = direct_inverse(0.9 * M + 0.1 * torch.outer(g64, g64))
    assert rel_err(A, ref) <= tol(dtype, d)


def test_backend_is_reported():
    assert nhgd_ext.backend("cpu") in {"cpp", "reference"}
    if CUDA:
        assert nhgd_ext.backend("cuda") in {"cuda", "reference"}


@pytest.mark.parametrize("op", ["sherman_morrison_", "woodbury_"])
def test_a_column_major_symmetric_state_is_accepted_and_updated_in_place(op):
    """torch.linalg.inv hands back a column-major inverse: the same symmetric
    matrix as its row-major copy, so the update must accept it, write into
    it, and give the row-major result."""
    M = random_spd(7, seed=5)
    column_major = torch.linalg.inv(M)
    assert not column_major.is_contiguous() and column_major.mT.is_contiguous()
    row_major = column_major.contiguous()
    g = rand_rows(7, seed=6)
    H = rand_rows(3, 7, seed=7)
    for A in (column_major, row_major):
        returned = ops.sherman_morrison_(A, g, 0.9, 0.1) if op == "sherman_morrison_" else ops.woodbury_(A, H, 0.8)
        assert returned is A
    # torch.linalg.inv's inverse is symmetric up to rounding: the two read different triangles
    torch.testing.assert_close(column_major, row_major, rtol=1e-13, atol=1e-15)
    expected = direct_inverse(0.9 * M + 0.1 * torch.outer(g, g)) if op == "sherman_morrison_" \
        else direct_inverse(0.8 * M + H.T @ H)
    assert rel_err(column_major, expected) < 1e-10


def test_lower_only_refuses_a_column_major_state():
    A = torch.linalg.inv(random_spd(5, seed=8))
    before = A.clone()
    with pytest.raises(ValueError, match="argument 'A' must be row-major"):
        ops.sherman_morrison_(A, rand_rows(5, seed=9), 0.9, 0.1, lower_only=True)
    assert torch.equal(A, before)
