"""Op microbenchmarks: every nhgd_ext op against the best eager PyTorch
composition of the same math, on the same inputs (docs/design.md §6).

    .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only

Each group holds one op and its eager counterpart; compare within a group
(``--benchmark-group-by=group``, the default here). Both sides update their
state in place, repeatedly, with EMA coefficients, cycling through a bank of
update rows, so every call does the real work on a state that stays
symmetric positive definite and bounded; the state is restored from a saved
copy every few rounds, in the untimed setup. CUDA variants (their own groups)
synchronize inside the timed function. Nothing here asserts on a time.
"""

from __future__ import annotations

import math

import pytest
import torch

import nhgd_ext
from nhgd_ext import ops

CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
IMPLS = ["nhgd_ext", "eager"]
DTYPE = torch.float32
BETA = 0.999


# --------------------------------------------------------------------------- inputs


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def spd(d, seed, device, dtype=DTYPE):
    """Exactly symmetric, eigenvalues in [0.5, 2]."""
    X = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    lam = 0.5 + 1.5 * torch.rand(d, generator=_gen(seed + 1), dtype=torch.float64)
    M = (Q * lam) @ Q.mT
    return (0.5 * (M + M.mT)).to(dtype=dtype, device=device).contiguous()


def rows(shape, seed, device, dtype=DTYPE, scale=None):
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    return (x * (scale if scale is not None else 1 / math.sqrt(shape[-1]))).to(dtype=dtype, device=device)


def ema_rows(G, beta):
    """Rows g_1..g_k scaled by sqrt((1-beta) beta^(k-i)): one rank-k step == k EMA steps."""
    k = G.shape[-2]
    w = torch.tensor([math.sqrt((1 - beta) * beta ** (k - i)) for i in range(1, k + 1)],
                     dtype=G.dtype, device=G.device)
    return G * w.unsqueeze(-1)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- eager compositions


def eager_sherman_morrison_(A, g, a, b):
    u = A @ g
    q = g @ u
    s = b / a
    c = (s / a) / (1 + s * q)  # 0-d tensor: no host sync
    A.addr_(u * (-c), u, beta=1 / a)
    return A


def eager_woodbury_(A, H, a):
    U = A @ H.mT  # d x k
    C = H @ U  # k x k
    C.diagonal().add_(a)
    L, _ = torch.linalg.cholesky_ex(C)  # no error check: no host sync on CUDA
    Y = torch.linalg.solve_triangular(L, U.mT, upper=False)  # L^-1 U^T, k x d
    A.mul_(1 / a).addmm_(Y.mT, Y, alpha=-1 / a)  # (A - U C^-1 U^T) / a
    return A


def eager_kfac_update_(S_inv, G_inv, acts, grads, a, b):
    for S, G, x, dlt in zip(S_inv, G_inv, acts, grads):
        eager_woodbury_(S, x * math.sqrt(b / x.shape[0]), a)
        eager_woodbury_(G, dlt * math.sqrt(b / dlt.shape[0]), a)
    return S_inv, G_inv


def eager_running_average_(L, B, a, b):
    return L.mul_(a).add_(B, alpha=b)


# --------------------------------------------------------------------------- harness


def run(benchmark, *, group, device, step, state, bank, rounds, reset_every, inner=1, warmup=2):
    """Times `inner` calls of step(*bank[i]) (+ a CUDA sync), cycling through `bank`;
    restores `state` (a list of tensors) from a copy every `reset_every` rounds."""
    benchmark.group = group
    benchmark.extra_info.update(device=device, backend=nhgd_ext.backend(device), inner_calls=inner)
    saved = [t.clone() for t in state]
    counter = {"round": 0, "row": 0}

    def setup():
        counter["round"] += 1
        if counter["round"] % reset_every == 0:
            for t, s in zip(state, saved):
                t.copy_(s)
        args = []
        for _ in range(inner):
            args.append(bank[counter["row"] % len(bank)])
            counter["row"] += 1
        sync(device)
        return (args,), {}

    def timed(args):
        for a in args:
            step(*a)
        sync(device)

    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    for t in state:  # the state stayed usable: a guard on the benchmark itself, not a timing check
        assert torch.isfinite(t).all()


def _rounds(device, cpu, cuda):
    return cpu if device == "cpu" else cuda


# --------------------------------------------------------------------------- sherman_morrison_


@pytest.mark.parametrize("impl", IMPLS + ["nhgd_ext_lower_only", "nhgd_ext_deferred"])
@pytest.mark.parametrize("d", [512, 2048, 4096, 8192])
@pytest.mark.parametrize("device", DEVICES)
def test_sherman_morrison(benchmark, device, d, impl):
    if device == "cpu" and d > 2048:
        pytest.skip("the CPU groups stop at d = 2048 (the issue's size)")
    A = spd(d, 0, device)
    bank = [(rows((d,), 100 + i, device),) for i in range(64)]
    a, b = ops.ema_coeffs(BETA)
    state = [A]
    if impl == "nhgd_ext_deferred":
        pending = ops.new_pending(d, device=device)
        state.append(pending)

        def step(g):
            ops.sherman_morrison_deferred_(A, pending, g, a, b)
    elif impl.startswith("nhgd_ext"):
        lower_only = impl.endswith("lower_only")

        def step(g):
            ops.sherman_morrison_(A, g, a, b, lower_only=lower_only)
    else:
        def step(g):
            eager_sherman_morrison_(A, g, a, b)
    _check_same(lambda X, g: ops.sherman_morrison_(X, g, a, b), lambda X, g: eager_sherman_morrison_(X, g, a, b),
                A, bank[0][0])
    run(benchmark, group=f"sherman_morrison_ {device} d={d} f32", device=device, step=step, state=state, bank=bank,
        rounds=_rounds(device, 400 if d == 512 else 100, 200), reset_every=256,
        inner=1 if device == "cpu" else 20)


# --------------------------------------------------------------------------- woodbury_


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("device", DEVICES)
def test_woodbury(benchmark, device, k, impl):
    d = 2048
    A = spd(d, 1, device)
    bank = [(ema_rows(rows((k, d), 200 + i, device), BETA),) for i in range(8)]
    a = BETA**k
    if impl == "nhgd_ext":
        def step(H):
            ops.woodbury_(A, H, a)
    else:
        def step(H):
            eager_woodbury_(A, H, a)
    _check_same(lambda X, H: ops.woodbury_(X, H, a), lambda X, H: eager_woodbury_(X, H, a), A, bank[0][0])
    run(benchmark, group=f"woodbury_ {device} d={d} k={k} f32", device=device, step=step, state=[A], bank=bank,
        rounds=_rounds(device, 30 if k == 64 else 15, 100), reset_every=32, inner=1 if device == "cpu" else 5)


# --------------------------------------------------------------------------- kfac_update_

# 20 layers of mixed sizes (d_in with the bias column, d_out), batch rows 32
KFAC_LAYERS = [(785, 512), (513, 256), (257, 128), (129, 10), (1025, 1024), (1025, 64), (65, 64), (65, 10),
               (301, 100), (101, 100), (101, 10), (33, 32), (33, 16), (17, 10), (2049, 256), (257, 256),
               (257, 1), (9, 9), (129, 128), (129, 2)]
KFAC_ROWS = 32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_kfac_update(benchmark, device, impl):
    S_inv = [spd(i, 10 + j, device) for j, (i, _) in enumerate(KFAC_LAYERS)]
    G_inv = [spd(o, 50 + j, device) for j, (_, o) in enumerate(KFAC_LAYERS)]
    bank = []
    for r in range(4):
        acts = [rows((KFAC_ROWS, i), 1000 * r + j, device, scale=1.0) for j, (i, _) in enumerate(KFAC_LAYERS)]
        grads = [rows((KFAC_ROWS, o), 1000 * r + 500 + j, device, scale=0.1) for j, (_, o) in enumerate(KFAC_LAYERS)]
        bank.append((acts, grads))
    a, b = ops.ema_coeffs(0.95)
    if impl == "nhgd_ext":
        def step(acts, grads):
            ops.kfac_update_(S_inv, G_inv, acts, grads, a, b)
    else:
        def step(acts, grads):
            eager_kfac_update_(S_inv, G_inv, acts, grads, a, b)
    run(benchmark, group=f"kfac_update_ {device} {len(KFAC_LAYERS)} layers n={KFAC_ROWS} f32", device=device,
        step=step, state=S_inv + G_inv, bank=bank, rounds=_rounds(device, 10, 50), reset_every=16,
        inner=1, warmup=1)


# --------------------------------------------------------------------------- running_average_


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_running_average(benchmark, device, impl):
    shape = (4096, 1024)
    L = rows(shape, 7, device, scale=1.0)
    bank = [(rows(shape, 300 + i, device, scale=1.0),) for i in range(4)]
    a, b = ops.ema_coeffs(0.9)
    if impl == "nhgd_ext":
        def step(B):
            ops.running_average_(L, B, a, b)
    else:
        def step(B):
            eager_running_average_(L, B, a, b)
    run(benchmark, group=f"running_average_ {device} {shape[0]}x{shape[1]} f32", device=device, step=step,
        state=[L], bank=bank, rounds=_rounds(device, 100, 200), reset_every=1000,
        inner=1 if device == "cpu" else 20)


# --------------------------------------------------------------------------- sanity


def _check_same(op_step, eager_step, A, x):
    """One step of each side from the same state agrees (guards against timing
    two different computations); run once, outside the timing."""
    X, Y = A.clone(), A.clone()
    op_step(X, x)
    eager_step(Y, x)
    err = float(torch.linalg.matrix_norm((X - Y).double()) / torch.linalg.matrix_norm(Y.double()))
    assert err < 1e-3, f"op and eager composition disagree: relative difference {err:.2e}"


# --------------------------------------------------------------------------- the memory limit


@pytest.mark.parametrize("d", [2048, 8192])
@pytest.mark.parametrize("device", DEVICES)
def test_copy_reference(benchmark, device, d):
    """A d x d float32 copy (reads and writes 8 d^2 bytes): the bandwidth the
    bandwidth-bound ops are measured against (docs/design.md §6)."""
    if device == "cpu" and d > 2048:
        pytest.skip("the CPU groups stop at d = 2048")
    src = torch.randn(d, d, device=device)
    dst = torch.empty_like(src)
    inner = 1 if device == "cpu" else 20

    def step():
        dst.copy_(src)

    run(benchmark, group=f"copy {device} d={d} f32 (8 d^2 bytes)", device=device, step=step, state=[dst],
        bank=[()], rounds=_rounds(device, 100, 200), reset_every=10**9, inner=inner)
