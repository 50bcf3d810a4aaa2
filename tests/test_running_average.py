"""running_average_: L <- a L + b B, any shape (docs/design.md §2.4)."""

from __future__ import annotations

import math

import pytest
import torch

from nhgd_ext import ops
from nhgd_testing import (
    DEVICES,
    DTYPES,
    assert_unchanged,
    coeff,
    device_coeff_params,
    gen,
    requires_cuda,
    snapshot,
    status_value,
)

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (300, 257), (0,), (4, 0, 2)]


def ulp_bound(dtype) -> float:
    # float64: 1e-14 relative; float32: 4 ulps (rounding of a, b, two products, one sum)
    return 1e-14 if dtype == torch.float64 else 4 * torch.finfo(torch.float32).eps


def check_exact(L_new, L_old, B, a, b):
    """|L_new - (a L + b B)| <= rtol * (|a L| + |b B|) elementwise (float64 reference):
    a relative bound that stays meaningful where a L and b B cancel."""
    L64, B64 = L_old.double().cpu(), B.double().cpu()
    ref = a * L64 + b * B64
    scale = (a * L64).abs() + (b * B64).abs()
    diff = (L_new.double().cpu() - ref).abs()
    bad = diff > ulp_bound(L_new.dtype) * scale
    assert not bool(bad.any()), f"max excess {float((diff - ulp_bound(L_new.dtype) * scale).max()):.3e}"


def rand(shape, seed, dtype, device):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,kind", device_coeff_params())
def test_update_exact(device, kind, dtype, shape):
    L = rand(shape, 1, dtype, device)
    ptr = L.data_ptr()
    status = ops.new_status(device)
    for step, (a, b) in enumerate([(0.75, 0.25), ops.running_average_coeffs(7), (1.0, 3.0), (2.5, 0.0)]):
        B = rand(shape, 10 + step, dtype, device)
        ca, cb = coeff(a, kind, device, dtype), coeff(b, kind, device, dtype)
        a_used = float(ca.item()) if isinstance(ca, torch.Tensor) else ca
        b_used = float(cb.item()) if isinstance(cb, torch.Tensor) else cb
        old = L.clone()
        out = ops.running_average_(L, B, ca, cb, status=status)
        assert out is L and L.data_ptr() == ptr and L.shape == shape
        check_exact(L, old, B, a_used, b_used)
    assert status_value(status) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_running_average_is_the_mean(device, dtype):
    """L = B_0, then (a, b) = running_average_coeffs(n) for n = 1.. gives the mean."""
    Bs = [rand((6, 4), 20 + i, dtype, device) for i in range(8)]
    L = Bs[0].clone()
    for n in range(1, len(Bs)):
        ops.running_average_(L, Bs[n], *ops.running_average_coeffs(n))
    ref = torch.stack([B.double().cpu() for B in Bs]).mean(0)
    err = float((L.double().cpu() - ref).abs().max())
    assert err <= (1e-14 if dtype == torch.float64 else 4e-6), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_ema_is_the_weighted_sum(device, dtype):
    beta = 0.8
    Bs = [rand((3, 3), 40 + i, dtype, device) for i in range(6)]
    L = Bs[0].clone()
    ref = Bs[0].double().cpu()
    for B in Bs[1:]:
        ops.running_average_(L, B, *ops.ema_coeffs(beta))
        ref = beta * ref + (1 - beta) * B.double().cpu()
    err = float((L.double().cpu() - ref).abs().max())
    assert err <= (1e-14 if dtype == torch.float64 else 4e-6), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_identity_coefficients_are_bitwise_identity(device, dtype):
    L = rand((5, 7), 3, dtype, device)
    before = L.clone()
    ops.running_average_(L, rand((5, 7), 4, dtype, device), 1.0, 0.0)
    assert torch.equal(L, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_B(device, dtype):
    L = rand((6, 9), 5, dtype, device)
    old = L.clone()
    B = rand((9, 6), 6, dtype, device).mT
    assert not B.is_contiguous()
    ops.running_average_(L, B, 0.6, 0.4)
    check_exact(L, old, B, 0.6, 0.4)
    B2 = rand((6, 18), 7, dtype, device)[:, ::2]
    old = L.clone()
    ops.running_average_(L, B2, torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64))
    check_exact(L, old, B2, 0.6, 0.4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_status_untouched(dtype):
    L = rand((4,), 1, dtype, "cpu")
    status = ops.new_status("cpu")
    ops.running_average_(L, rand((4,), 2, dtype, "cpu"), 0.5, 0.5, status=status)
    assert status_value(status) == 0


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a,b", [(-1.0, 0.5), (0.0, 0.5), (math.nan, 0.5), (0.5, -1.0), (0.5, math.inf)])
def test_cuda_invalid_device_coefficients_skip(dtype, a, b):
    L = rand((8, 3), 1, dtype, "cuda")
    B = rand((8, 3), 2, dtype, "cuda")
    snap = snapshot(L)
    status = ops.new_status("cuda")
    ops.running_average_(L, B, torch.tensor(a, device="cuda"), torch.tensor(b, device="cuda"), status=status)
    torch.cuda.synchronize()
    assert_unchanged([L], snap)
    assert status_value(status) == 1


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_cuda_nonfinite_B_skips(dtype, value):
    L = rand((1000,), 1, dtype, "cuda")
    B = rand((1000,), 2, dtype, "cuda")
    B[777] = value
    snap = snapshot(L)
    status = ops.new_status("cuda")
    ops.running_average_(L, B, 0.5, 0.5, status=status)
    torch.cuda.synchronize()
    assert_unchanged([L], snap)
    assert status_value(status) == 1


@requires_cuda
def test_cuda_runs_on_current_stream():
    L = rand((512, 512), 1, torch.float32, "cuda")
    B_true = rand((512, 512), 2, torch.float32, "cuda")
    old = L.clone()
    B = torch.zeros_like(B_true)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        B.copy_(B_true)
        ops.running_average_(L, B, 0.5, 0.5)
    s.synchronize()
    check_exact(L, old, B_true, 0.5, 0.5)
