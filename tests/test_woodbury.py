"""woodbury_: A = M^-1 <- (a M + H^T H)^-1, H k x d (docs/design.md §2.2)."""

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

SIZES = [1, 2, 7, 33, 130]
KS = [1, 3, 17]


def gram(H64: torch.Tensor) -> torch.Tensor:
    return H64.mT @ H64


def ema_rows(G: torch.Tensor, beta: float) -> torch.Tensor:
    """Rows g_1..g_k (last dim d, row dim -2) scaled by sqrt((1-beta) beta^(k-i))."""
    k = G.shape[-2]
    w = torch.tensor([math.sqrt((1 - beta) * beta ** (k - i)) for i in range(1, k + 1)], dtype=torch.float64,
                     device=G.device)
    return (G.double() * w.unsqueeze(-1)).to(G.dtype)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,kind", device_coeff_params())
def test_matches_direct_inverse(device, kind, dtype, d, batched, k):
    batch = 3 if batched else None
    A = state_from(random_spd(d, batch=batch, seed=d + k), dtype, device)
    ptr = A.data_ptr()
    M = inv64(A)
    status = ops.new_status(device)
    steps = 2
    for t in range(steps):
        a = 0.8 if t == 0 else 0.95
        ca = coeff(a, kind, device, dtype)
        a_used = float(ca.item()) if isinstance(ca, torch.Tensor) else ca
        # rows of norm ~ sqrt(1/k): H^T H has norm ~1 whatever k
        H = rand_rows(*((batch,) if batch else ()), k, d, seed=100 * t + d + k, dtype=dtype)
        H = (H.double() / math.sqrt(k)).to(dtype).to(device)
        out = ops.woodbury_(A, H, ca, status=status)
        assert out is A and A.data_ptr() == ptr
        assert_exactly_symmetric(A)
        M = a_used * M + gram(H.double().cpu())
    assert status_value(status) == 0
    err = rel_err(A, direct_inverse(M))
    assert err <= tol(dtype, d, steps, cond=6.0), f"relative error {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_large_d(device, dtype):
    d, k = 1000, 17
    A = state_from(random_spd(d, seed=77), dtype, device)
    M = inv64(A)
    H = rand_rows(k, d, seed=78, dtype=dtype).to(device)
    ops.woodbury_(A, H, 0.9)
    assert_exactly_symmetric(A)
    err = rel_err(A, direct_inverse(0.9 * M + gram(H.double().cpu())))
    assert err <= tol(dtype, d, cond=8.0), f"relative error {err:.3e}"


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("d", [1, 7, 33])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_k_ema_rank_one_steps_equal_one_woodbury_step(device, dtype, d, batched, k):
    """k sequential EMA steps (a = beta, b = 1 - beta, rows in order) equal one
    rank-k step with a = beta^k and row i scaled by sqrt((1-beta) beta^(k-i))."""
    beta = 0.9
    batch = 3 if batched else None
    A0 = state_from(random_spd(d, batch=batch, seed=d * 31 + k), dtype, device)
    M = inv64(A0)
    G = rand_rows(*((batch,) if batch else ()), k, d, seed=d * 37 + k, dtype=dtype).to(device)

    A_seq = A0.clone()
    for i in range(k):
        ops.sherman_morrison_(A_seq, G[..., i, :].contiguous(), *ops.ema_coeffs(beta))
        M = beta * M + (1 - beta) * (G[..., i, :].double().cpu().unsqueeze(-1) * G[..., i, :].double().cpu().unsqueeze(-2))

    A_wb = A0.clone()
    ops.woodbury_(A_wb, ema_rows(G, beta), beta**k)
    assert_exactly_symmetric(A_wb)
    assert_exactly_symmetric(A_seq)

    ref = direct_inverse(M)
    # the EMA shrinks M by beta^k: the condition number grows to at most 4 / beta^k
    c = 4.0 / beta**k
    assert rel_err(A_seq, ref) <= tol(dtype, d, k, cond=c)
    assert rel_err(A_wb, ref) <= tol(dtype, d, 1, cond=c)
    assert rel_err(A_wb, A_seq.double().cpu()) <= 2 * tol(dtype, d, k, cond=c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_H(device, dtype):
    d, k = 20, 4
    A = state_from(random_spd(d, seed=21), dtype, device)
    M = inv64(A)
    Ht = rand_rows(d, k, seed=22, scale=0.3, dtype=dtype).to(device)
    H = Ht.mT
    assert not H.is_contiguous()
    ops.woodbury_(A, H, 0.75)
    err = rel_err(A, direct_inverse(0.75 * M + gram(H.double().cpu())))
    assert err <= tol(dtype, d, cond=8.0)
    # a strided slice too
    A2 = state_from(random_spd(d, batch=2, seed=23), dtype, device)
    M2 = inv64(A2)
    Hbig = rand_rows(2, 2 * k, d, seed=24, scale=0.3, dtype=dtype).to(device)
    H2 = Hbig[:, ::2]
    ops.woodbury_(A2, H2, torch.tensor(0.75, dtype=torch.float64))
    err = rel_err(A2, direct_inverse(0.75 * M2 + gram(H2.double().cpu())))
    assert err <= tol(dtype, d, cond=8.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_k_larger_than_d(device, dtype):
    d, k = 3, 40
    A = state_from(random_spd(d, seed=25), dtype, device)
    M = inv64(A)
    H = rand_rows(k, d, seed=26, scale=0.1, dtype=dtype).to(device)
    ops.woodbury_(A, H, 0.5)
    assert_exactly_symmetric(A)
    assert rel_err(A, direct_inverse(0.5 * M + gram(H.double().cpu()))) <= tol(dtype, d, cond=8.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_status_untouched(dtype):
    A = state_from(random_spd(4, seed=1), dtype, "cpu")
    status = ops.new_status("cpu")
    ops.woodbury_(A, rand_rows(2, 4, seed=2, dtype=dtype), 0.5, status=status)
    assert status_value(status) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_indefinite_state_does_not_continue_silently_on_cpu(dtype):
    """a I + H A H^T not positive definite (A lost definiteness): the CPU op
    must raise (docs/design.md §2.5: "repair or raise, never continue silently")
    and leave A unchanged."""
    A = -2 * torch.eye(3, dtype=dtype)
    H = torch.zeros(1, 3, dtype=dtype)
    H[0, 0] = 1
    snap = snapshot(A)
    with pytest.raises((RuntimeError, ValueError)):
        ops.woodbury_(A, H, 0.5)
    assert_unchanged([A], snap)


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a", [-1.0, 0.0, math.nan, math.inf])
def test_cuda_invalid_device_a_skips(dtype, a):
    n, d, k = 3, 5, 2
    A = state_from(random_spd(d, batch=n, seed=6), dtype, "cuda")
    H = rand_rows(n, k, d, seed=7, dtype=dtype).cuda()
    snap = snapshot(A)
    status = ops.new_status("cuda")
    ops.woodbury_(A, H, torch.tensor(a, device="cuda"), status=status)
    torch.cuda.synchronize()
    assert_unchanged([A], snap)
    assert status_value(status) == n


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nonfinite_H_skips_that_matrix(dtype):
    n, d, k = 3, 5, 2
    A = state_from(random_spd(d, batch=n, seed=6), dtype, "cuda")
    M = inv64(A)
    H = rand_rows(n, k, d, seed=7, dtype=dtype).cuda()
    H[1, 1, 2] = math.nan
    before = A.clone()
    status = ops.new_status("cuda")
    ops.woodbury_(A, H, 0.9, status=status)
    torch.cuda.synchronize()
    assert status_value(status) == 1
    assert torch.equal(A[1], before[1])
    keep = [0, 2]
    ref = direct_inverse(0.9 * M[keep] + gram(H[keep].double().cpu()))
    assert rel_err(A[keep], ref) <= tol(dtype, d, cond=8.0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_runs_on_current_stream(dtype):
    d, k = 48, 5
    A = state_from(random_spd(d, seed=13), dtype, "cuda")
    M = inv64(A)
    H_true = rand_rows(k, d, seed=14, dtype=dtype).cuda()
    H = torch.zeros_like(H_true)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        H.copy_(H_true)
        ops.woodbury_(A, H, 0.9)
    s.synchronize()
    ref = direct_inverse(0.9 * M + gram(H_true.double().cpu()))
    assert rel_err(A, ref) <= tol(dtype, d, cond=8.0)
