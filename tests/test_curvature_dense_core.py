"""DenseEFIM's compiled core (csrc/curvature/dense_efim.cpp) against its
pure-PyTorch twin (nhgd_ext/curvature/_dense_reference.py). Both call the
same kernels, and their coefficients are the same IEEE operations, so every
tensor and counter must be bitwise equal after the same calls: any
difference is a rule one of them got wrong. (The math of both is checked
against float64 inverses in test_curvature_dense.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import nhgd_ext
from nhgd_ext import _build
from nhgd_ext.curvature import DenseEFIM
from nhgd_ext.curvature._dense_reference import DenseEFIMCore as ReferenceCore
from nhgd_testing import DEVICES, DTYPES, gen

pytestmark = pytest.mark.skipif(_build.native_module() is None, reason="the compiled extension is not loaded")


def test_the_compiled_core_is_used_where_the_extension_is_built():
    assert nhgd_ext.backend("cpu") == "cpp"
    c = DenseEFIM(3, representation="dense")
    assert c.compiled_core is not None and type(c.compiled_core).__name__ == "DenseEFIMCore"


def pair(d, beta, dtype, device, damping=0.05):
    compiled = _build.native_module().DenseEFIMCore(d, beta, damping, 0.25, dtype, torch.device(device), None)
    reference = ReferenceCore(d, beta, damping, 0.25, dtype, torch.device(device), None)
    return compiled, reference


def assert_same(compiled, reference, *, read_out=True):
    """Equal state; with ``read_out``, after both folded their buffered rows
    into F and wrote the pending update into the inverse (which changes
    later rounding, so the schedule's checks in between do not)."""
    if read_out:
        for core in (compiled, reference):
            core.fold()
            core.flush()
    for name in ("inverse", "pending", "fisher"):
        assert torch.equal(getattr(compiled, name), getattr(reference, name)), name
    for name in ("num_updates", "num_samples", "num_refreshes", "mu"):
        assert getattr(compiled, name) == getattr(reference, name), name


def schedule(d, dtype, device, seed):
    """Single gradients (batch sizes 1 and 5), rank-k steps with and without
    per_step, one of 130 rows (past the fold and past d / 3: the inverse goes
    stale), and a rebuild every eleventh call, as a solve makes: enough rows
    for several folds, stale stretches and rebuilds."""
    rng = gen(seed)
    calls = []
    for t in range(40):
        if t % 11 == 10:
            calls.append(("refresh", None, None))
        elif t % 9 == 4:
            k = 130 if t == 13 else 3 + t % 5
            calls.append(("update_many", torch.randn(k, d, generator=rng, dtype=torch.float64), t % 2 == 0))
        else:
            calls.append(("update", torch.randn(d, generator=rng, dtype=torch.float64) / math.sqrt(d), 5 if t % 3 else 1))
    return [(what, x if x is None else x.to(device=device, dtype=dtype), extra) for what, x, extra in calls]


@pytest.mark.parametrize("beta", [None, 0.9, 0.5], ids=["running", "ema0.9", "ema0.5"])
@pytest.mark.parametrize("d", [1, 7, 64, 129])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_core_equals_the_reference_bitwise(device, dtype, d, beta):
    compiled, reference = pair(d, beta, dtype, device)
    for i, (what, x, extra) in enumerate(schedule(d, dtype, device, seed=d)):
        for core in (compiled, reference):
            getattr(core, what)(*(() if x is None else (x, extra)))
        if i % 10 == 9:
            assert_same(compiled, reference, read_out=False)
    assert compiled.num_refreshes > 0
    assert_same(compiled, reference)


def test_an_update_the_kernel_refuses_leaves_both_stale_alike():
    """An update the CPU kernel refuses (a non-positive denominator, the state
    having lost definiteness): both cores keep the row in F, mark the inverse
    stale (mu = 0) and run no factorization; the next rebuild is exact. (On
    CUDA the kernel skips instead of raising.)"""
    compiled, reference = pair(5, None, torch.float64, "cpu")
    G = torch.randn(12, 5, generator=gen(1), dtype=torch.float64)
    for core in (compiled, reference):
        core.update(G[0], 1)
        core.flush()
        core.inverse.mul_(-1e3)  # far from positive definite: the next update fails
        core.update(G[8], 1)
        assert core.mu == 0.0 and core.num_refreshes == 0
    assert_same(compiled, reference)
    for core in (compiled, reference):
        core.refresh()
    assert_same(compiled, reference)
    expected = torch.linalg.inv(0.5 * (torch.outer(G[0], G[0]) + torch.outer(G[8], G[8])) + 0.05 * torch.eye(5, dtype=torch.float64))
    assert torch.allclose(compiled.inverse, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("core_kind", ["compiled", "reference"])
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.update(torch.tensor([1.0, float("nan"), 0.0]), 1), "argument 'g' contains NaN"),
        (lambda c: c.update(torch.ones(4), 1), r"argument 'g' must have shape \[3\], got \[4\]"),
        (lambda c: c.update(torch.ones(3, dtype=torch.int64), 1), "argument 'g' must be a floating-point tensor"),
        (lambda c: c.update([1.0, 2.0, 3.0], 1), "argument 'g' must be a tensor"),
        (lambda c: c.update_many(torch.ones(3), False), r"argument 'G' must have shape \[k >= 1, 3\], got \[3\]"),
        (lambda c: c.update_many(torch.full((2, 3), float("inf")), False), "argument 'G' contains NaN"),
    ],
    ids=["nan", "shape", "integer", "list", "rows_shape", "rows_inf"],
)
def test_bad_input_raises_the_same_error_and_changes_nothing(core_kind, call, match):
    compiled, reference = pair(3, 0.9, torch.float64, "cpu")
    core = compiled if core_kind == "compiled" else reference
    core.update(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), 1)
    before = [core.inverse.clone(), core.pending.clone(), core.fisher.clone(), core.num_updates, core.mu]
    with pytest.raises(ValueError, match=match):
        call(core)
    after = [core.inverse, core.pending, core.fisher, core.num_updates, core.mu]
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(before, after))
