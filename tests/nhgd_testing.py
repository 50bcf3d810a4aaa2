"""Shared helpers for the nhgd_ext test suite (imported by the test modules;
tests/conftest.py puts this folder on sys.path).

Every reference in this suite is computed from first principles in float64:
the state A holds M^-1, so the expected result of an update is the float64
``torch.linalg.inv`` of the updated M, never another implementation of the
update formula.
"""

from __future__ import annotations

import contextlib
import math
import os
import types

import pytest
import torch

CUDA = torch.cuda.is_available()
_skip_without_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible")
#: marks of every GPU test: the `gpu` marker (pyproject.toml) and a clean skip without a GPU
CUDA_MARKS = (pytest.mark.gpu, _skip_without_cuda)


def requires_cuda(fn):
    """Decorator: a GPU-only test (marked `gpu`, skipped when no GPU is visible)."""
    return pytest.mark.gpu(_skip_without_cuda(fn))


#: devices every correctness test runs on: "cuda" only where a GPU is visible
#: (its cases are not generated elsewhere; the run's header says so)
DEVICES = [pytest.param("cpu", id="cpu")] + ([pytest.param("cuda", id="cuda", marks=CUDA_MARKS)] if CUDA else [])
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

#: how the coefficients a, b are passed: Python floats, 0-d CPU tensors, or
#: (CUDA only) 0-d tensors on the state's device
COEFF_KINDS = ["float", "cpu_tensor", "device_tensor"]


def device_coeff_params():
    """(device, coeff_kind) pairs: "device_tensor" only exists on CUDA."""
    out = []
    for dev, marks in (("cpu", ()), ("cuda", CUDA_MARKS))[:2 if CUDA else 1]:
        for kind in COEFF_KINDS:
            if dev == "cpu" and kind == "device_tensor":
                continue
            out.append(pytest.param(dev, kind, id=f"{dev}-{kind}", marks=marks))
    return out


def coeff(value: float, kind: str, device, dtype=torch.float64):
    """`value` as the op should receive it: a float or a 0-d tensor."""
    if kind == "float":
        return float(value)
    if kind == "cpu_tensor":
        return torch.tensor(value, dtype=dtype)
    if kind == "device_tensor":
        return torch.tensor(value, dtype=dtype, device=device)
    raise AssertionError(kind)


#: the kernels the Python wrappers of nhgd_ext.ops reach: "compiled", the
#: registered operators torch.ops.nhgd_ext (the C++ kernels where the extension
#: built), or "reference", the pure-PyTorch kernels of nhgd_ext/_reference.py
IMPLEMENTATIONS = ["compiled", "reference"]


class _ReferencePacket:
    """Stands in for an operator packet of torch.ops.nhgd_ext: called, it runs
    the default overload; one attribute per overload (``.default``,
    ``.tensor``), as csrc/schemas.h lists them, holds the reference kernel."""

    def __init__(self, overloads: dict):
        self.__dict__.update(overloads)

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)


@contextlib.contextmanager
def reference_kernels():
    """While the context lasts, the wrappers of nhgd_ext.ops call the reference
    kernels (nhgd_ext._reference) in place of torch.ops.nhgd_ext: the same
    Python-side checks, then the reference's own argument checks. The
    registered operators are restored on exit, whatever happens."""
    from nhgd_ext import _reference, ops

    packets: dict[str, dict] = {}
    for qualname, fn in _reference._IMPLS.items():
        name, _, overload = qualname.partition(".")
        packets.setdefault(name, {})[overload or "default"] = fn
    assert set(_reference._IMPLS) == set(_reference.SCHEMAS), "a schema without a reference kernel"
    registered = ops._ops
    ops._ops = types.SimpleNamespace(**{name: _ReferencePacket(o) for name, o in packets.items()})
    try:
        yield
    finally:
        ops._ops = registered


class _NoKernel:
    """Every operator (and overload) of the namespace no_kernels puts in place: calling it fails."""

    def __init__(self, name: str = ""):
        self.name = name

    def __getattr__(self, attr):
        return _NoKernel(f"{self.name}.{attr}" if self.name else attr)

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"the Python wrapper called the kernel {self.name}: it was to reject the call itself")


@contextlib.contextmanager
def no_kernels():
    """While the context lasts, any call of the wrappers of nhgd_ext.ops that
    gets past their own checks to a kernel fails the test (AssertionError)."""
    from nhgd_ext import ops

    registered = ops._ops
    ops._ops = _NoKernel()
    try:
        yield
    finally:
        ops._ops = registered


def kernels(implementation: str):
    """The context in which nhgd_ext.ops runs `implementation`: one of
    IMPLEMENTATIONS, or "wrapper" (no kernel at all, see no_kernels)."""
    if implementation == "compiled":
        return contextlib.nullcontext()
    if implementation == "reference":
        return reference_kernels()
    if implementation == "wrapper":
        return no_kernels()
    raise AssertionError(implementation)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_spd(d: int, *, batch: int | None = None, lo: float = 0.5, hi: float = 2.0,
               seed: int = 0) -> torch.Tensor:
    """Exactly symmetric float64 SPD matrix (or batch) with eigenvalues in [lo, hi]."""
    rng = gen(seed)
    shape = (d, d) if batch is None else (batch, d, d)
    X = torch.randn(shape, generator=rng, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    lam = lo + (hi - lo) * torch.rand(shape[:-1], generator=rng, dtype=torch.float64)
    if d >= 2:  # pin the extremes so the condition number is exactly hi/lo
        lam[..., 0] = lo
        lam[..., -1] = hi
    M = (Q * lam.unsqueeze(-2)) @ Q.mT
    return 0.5 * (M + M.mT)  # fl(x + y) == fl(y + x): bitwise symmetric


def state_from(A64: torch.Tensor, dtype, device) -> torch.Tensor:
    """The float64 SPD matrix as op state (contiguous, exactly symmetric)."""
    A = A64.to(dtype=dtype, device=device).contiguous()
    assert torch.equal(A, A.mT)
    return A


def inv64(A: torch.Tensor) -> torch.Tensor:
    """float64 inverse of the (rounded) state: the M the op actually starts from."""
    M = torch.linalg.inv(A.detach().to("cpu", torch.float64))
    return 0.5 * (M + M.mT)


def direct_inverse(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(M.to(torch.float64))


def rand_rows(*shape, seed: int, scale: float | None = None, dtype=torch.float64) -> torch.Tensor:
    """Random rows of norm about 1 (entries ~ N(0, 1/d)), d = shape[-1]."""
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    s = (1.0 / math.sqrt(shape[-1])) if scale is None else scale
    return (x * s).to(dtype)


def rel_err(X: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest (over a batch) relative Frobenius error of X against a float64 reference."""
    X = X.detach().to("cpu", torch.float64)
    ref = ref.to(torch.float64)
    if X.dim() == 2:
        X, ref = X.unsqueeze(0), ref.unsqueeze(0)
    num = torch.linalg.matrix_norm(X - ref)
    den = torch.linalg.matrix_norm(ref).clamp_min(1e-300)
    return float((num / den).max())


def tol(dtype, d: int, steps: int = 1, cond: float = 4.0) -> float:
    """Relative Frobenius tolerance for an inverse update of a d x d state.

    float64: 1e-10 flat. float32: a few ulps times sqrt(d) per step, times the
    condition number of the state (4 for the spectra of `random_spd`); for
    the sizes here this stays in 2e-6 .. 4e-5, far below the O(1) error the
    misprinted coefficients of the paper's Algorithm 2 give (see
    test_sherman_morrison.py::test_misprinted_coefficients_fail_tolerance).
    """
    if dtype == torch.float64:
        return 1e-10
    eps = torch.finfo(torch.float32).eps
    return eps * cond * math.sqrt(steps) * (4 + math.sqrt(d))


def assert_exactly_symmetric(A: torch.Tensor) -> None:
    assert torch.equal(A, A.mT), "result is not bitwise symmetric"


def snapshot(*tensors: torch.Tensor):
    """(clone, data_ptr) of each tensor, to prove an op left its state alone."""
    return [(t.clone(), t.data_ptr()) for t in tensors]


def assert_unchanged(tensors, snap) -> None:
    for t, (ref, ptr) in zip(tensors, snap):
        assert t.data_ptr() == ptr, "state tensor was reallocated"
        assert t.dtype == ref.dtype and t.shape == ref.shape
        # equal_nan: a state that already held NaN must still hold it
        if t.is_floating_point():
            same = torch.equal(t.isnan(), ref.isnan()) and torch.equal(
                torch.nan_to_num(t, nan=0.0), torch.nan_to_num(ref, nan=0.0))
        else:
            same = torch.equal(t, ref)
        assert same, "state tensor changed although the op failed/skipped"


def status_value(status: torch.Tensor) -> int:
    return int(status.item())


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def minimize(loss, params, **options) -> None:
    """Runs L-BFGS (strong Wolfe line search, step 1) on ``loss()`` in
    ``params``; ``options`` go to torch.optim.LBFGS (max_iter, tolerances, ...)."""
    optimizer = torch.optim.LBFGS(params, lr=1, line_search_fn="strong_wolfe", **options)

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)


def misspecified_fisher_error(noise: float, fisher: str, *, seed: int = 0, steps: int = 400, batch: int = 64,
                              n: int = 4000, dim: int = 4, classes: int = 3) -> float:
    """Relative error of NHGD's hypergradient against the exact one on a
    softmax regression whose training labels are replaced, with probability
    ``noise``, by a uniformly drawn class: the model is well specified at
    noise 0 and misspecified above (the noisy conditional is no softmax of a
    linear function). The outer variable v is a logit offset; the outer loss
    the clean validation cross-entropy. Float64, theta started at theta*(v)
    and kept near it by small SGD steps on per-sample losses."""
    import torch.nn.functional as F

    from nhgd_ext.estimators import NHGD

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    W_true = 1.5 * torch.randn(classes, dim, generator=g, dtype=f64)

    def draw(size):
        X = torch.randn(size, dim, generator=g, dtype=f64)
        return X, torch.multinomial(torch.softmax(X @ W_true.T, 1), 1, generator=g).squeeze(1)

    X, y = draw(n)
    replaced = torch.rand(n, generator=g, dtype=f64) < noise
    y = torch.where(replaced, torch.randint(0, classes, (n,), generator=g), y)
    Xv, yv = draw(500)
    v = torch.zeros(classes, dtype=f64, requires_grad=True)
    W = torch.zeros(classes, dim, dtype=f64, requires_grad=True)

    def logits(idx=None):
        return (X if idx is None else X[idx]) @ W.T + v

    def inner(idx=None):
        return F.cross_entropy(logits(idx), y if idx is None else y[idx], reduction="none")

    def outer():
        return F.cross_entropy(Xv @ W.T + v, yv)

    minimize(lambda: inner().mean(), [W], max_iter=500, tolerance_grad=1e-13, tolerance_change=0)
    # exact: dense Hessian (d = classes * dim) and the mixed derivative by autograd
    H = torch.autograd.functional.hessian(lambda w: F.cross_entropy(X @ w.T + v.detach(), y), W.detach())
    H = H.reshape(W.numel(), W.numel())
    f_v, f_W = torch.autograd.grad(outer(), [v, W])
    g_W = torch.autograd.grad(inner().mean(), W, create_graph=True)[0].reshape(-1)
    exact = f_v - torch.autograd.grad(g_W @ torch.linalg.solve(H, f_W.reshape(-1)), v)[0]

    est = NHGD([W], [v], fisher=fisher, damping=1e-6, seed=seed + 1)
    sgd = torch.optim.SGD([W], lr=0.01)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        out = logits(idx)
        est.inner_step(F.cross_entropy(out, y[idx], reduction="none"), sgd, outputs=out)
    (h,) = est.hypergradient(outer(), lambda: inner().mean())
    return float((h - exact).norm() / exact.norm())


def tensors_of(x) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (a state_dict), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for value in x.values() for t in tensors_of(value)]
    if isinstance(x, (list, tuple)):
        return [t for value in x for t in tensors_of(value)]
    return []
