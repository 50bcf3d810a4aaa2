"""Pure-PyTorch implementations of the operators: the fallback where no C++
compiler works, and the kernels for CUDA tensors when the extension was built
without CUDA. Same schemas, same argument checks, same results up to rounding;
value errors are raised on every device (these kernels may sync the host).
"""

from __future__ import annotations

import math
import re

import torch


def _schemas() -> dict[str, str]:
    """name -> schema, read from csrc/schemas.h (the list ops.cpp defines)."""
    from ._toolchain import source_root

    text = (source_root() / "schemas.h").read_text()
    found = re.findall(r'NHGD_SCHEMA\("([^"]+)"\)', text)
    return {s[:s.index("(")]: s[s.index("("):] for s in found}


SCHEMAS = _schemas()


def _fail(op: str, name: str, why: str):
    raise ValueError(f"{op}: argument '{name}' {why}")


def _coeff(op: str, name: str, value, positive: bool, state: torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            _fail(op, name, f"must be a Python float or a 0-d tensor, got shape {list(value.shape)}")
        if not value.is_floating_point():
            _fail(op, name, f"must be a floating-point tensor, got {value.dtype}")
        if value.device.type != "cpu" and value.device != state.device:
            _fail(op, name, f"must be on the CPU or on the device of the state ({state.device}), got {value.device}")
        value = float(value.item())
    if not math.isfinite(value):
        _fail(op, name, f"must be finite, got {value}")
    if positive and not value > 0:
        _fail(op, name, f"must be > 0, got {value}")
    if not positive and not value >= 0:
        _fail(op, name, f"must be >= 0, got {value}")
    return value


def _state(op: str, name: str, A: torch.Tensor, batch: bool) -> None:
    if A.dtype not in (torch.float32, torch.float64):
        _fail(op, name, f"must be float32 or float64, got {A.dtype}")
    if A.dim() not in ((2, 3) if batch else (2,)):
        _fail(op, name, f"must be a d x d matrix{' or an n x d x d batch' if batch else ''}, got shape {list(A.shape)}")
    if A.shape[-1] != A.shape[-2] or A.shape[-1] < 1:
        _fail(op, name, f"must be square with d >= 1, got shape {list(A.shape)}")
    if not A.is_contiguous():
        _fail(op, name, "must be contiguous (it is updated in place)")


def _like(op: str, name: str, t: torch.Tensor, state_name: str, state: torch.Tensor) -> None:
    if t.dtype != state.dtype:
        _fail(op, name, f"must have the dtype of '{state_name}' ({state.dtype}), got {t.dtype}")
    if t.device != state.device:
        _fail(op, name, f"must be on the device of '{state_name}' ({state.device}), got {t.device}")


def _finite(op: str, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        _fail(op, name, "contains NaN or infinite values")


def _status(op: str, status, state: torch.Tensor) -> None:
    if status is not None and (status.dtype != torch.int32 or status.numel() != 1 or status.device != state.device):
        _fail(op, "status", f"must be an int32 tensor with one element on {state.device}")


def _woodbury_factor(op: str, A: torch.Tensor, H: torch.Tensor, a: float) -> torch.Tensor:
    U = A @ H.mT
    C = H @ U
    C.diagonal(dim1=-2, dim2=-1).add_(a)
    L, info = torch.linalg.cholesky_ex(C)
    if bool((info != 0).any()):
        raise RuntimeError(f"{op}: the system a I + H A H^T is not positive definite: A is not positive definite; "
                           "the state was left unchanged")
    return torch.linalg.solve_triangular(L.mT, U, upper=True, left=False)


def _downdate(A: torch.Tensor, Y: torch.Tensor, a: float) -> None:
    new = (A - Y @ Y.mT) / a
    lower = new.tril()
    A.copy_(lower + lower.tril(-1).mT)


def sherman_morrison_(A, g, a, b, status=None, lower_only=False):
    op = "sherman_morrison_"
    _state(op, "A", A, batch=True)
    _like(op, "g", g, "A", A)
    if tuple(g.shape) != tuple(A.shape[:-1]):
        _fail(op, "g", f"must have shape {list(A.shape[:-1])} to match A of shape {list(A.shape)}, got {list(g.shape)}")
    _status(op, status, A)
    a, b = _coeff(op, "a", a, True, A), _coeff(op, "b", b, False, A)
    _finite(op, "g", g)
    sym = A.tril() + A.tril(-1).mT
    u = (sym @ g.unsqueeze(-1)).squeeze(-1)
    q = (g.double() * u.double()).sum(-1)
    s = b / a
    den = 1 + s * q
    if not bool(((den > 0) & torch.isfinite(den)).all()):
        raise RuntimeError(f"{op}: the denominator 1 + (b/a) g^T A g is not positive: A is not positive definite; "
                           "A was left unchanged")
    c = ((s / a) / den).to(A.dtype)
    new = A / a - c[..., None, None] * (u.unsqueeze(-1) * u.unsqueeze(-2))
    A.copy_(torch.where(torch.ones_like(A, dtype=torch.bool).tril(), new, A) if lower_only else new)


def woodbury_(A, H, a, status=None):
    op = "woodbury_"
    _state(op, "A", A, batch=True)
    _like(op, "H", H, "A", A)
    if H.dim() != A.dim() or H.shape[-1] != A.shape[-1] or H.shape[-2] < 1 or (A.dim() == 3 and H.shape[0] != A.shape[0]):
        _fail(op, "H", f"must have shape [{'n, ' if A.dim() == 3 else ''}k >= 1, {A.shape[-1]}] to match A, got {list(H.shape)}")
    _status(op, status, A)
    a = _coeff(op, "a", a, True, A)
    _finite(op, "H", H)
    _downdate(A, _woodbury_factor(op, A, H, a), a)


def kfac_update_(S_inv, G_inv, acts, grads, a, b, status=None):
    op = "kfac_update_"
    if len(S_inv) == 0:
        _fail(op, "S_inv", "must hold at least one layer")
    for name, lst in (("G_inv", G_inv), ("acts", acts), ("grads", grads)):
        if len(lst) != len(S_inv):
            _fail(op, name, f"has {len(lst)} tensors but 'S_inv' has {len(S_inv)}")
    for S, G, x, d in zip(S_inv, G_inv, acts, grads):
        _state(op, "S_inv", S, batch=False)
        _state(op, "G_inv", G, batch=False)
        _like(op, "S_inv", S, "S_inv", S_inv[0])
        _like(op, "G_inv", G, "S_inv", S)
        _like(op, "acts", x, "S_inv", S)
        _like(op, "grads", d, "G_inv", G)
        if x.dim() != 2 or x.shape[1] != S.shape[0] or x.shape[0] < 1:
            _fail(op, "acts", f"must have shape [n >= 1, {S.shape[0]}], got {list(x.shape)}")
        if d.dim() != 2 or d.shape[1] != G.shape[0] or d.shape[0] < 1:
            _fail(op, "grads", f"must have shape [m >= 1, {G.shape[0]}], got {list(d.shape)}")
    factors_seen = [id(F) for F in list(S_inv) + list(G_inv)]
    if len(set(factors_seen)) != len(factors_seen):
        _fail(op, "S_inv", "and 'G_inv' must not repeat a tensor")
    _status(op, status, S_inv[0])
    a, b = _coeff(op, "a", a, True, S_inv[0]), _coeff(op, "b", b, False, S_inv[0])
    for x, d in zip(acts, grads):
        _finite(op, "acts", x)
        _finite(op, "grads", d)
    pairs = [(S, x) for S, x in zip(S_inv, acts)] + [(G, d) for G, d in zip(G_inv, grads)]
    factors = [_woodbury_factor(op, M, rows * math.sqrt(b / rows.shape[0]), a) for M, rows in pairs]
    for (M, _), Y in zip(pairs, factors):
        _downdate(M, Y, a)


def kfac_apply(S_inv, G_inv, V):
    op = "kfac_apply"
    for name, lst in (("G_inv", G_inv), ("V", V)):
        if len(lst) != len(S_inv):
            _fail(op, name, f"has {len(lst)} tensors but 'S_inv' has {len(S_inv)}")
    for S, G, v in zip(S_inv, G_inv, V):
        for name, F in (("S_inv", S), ("G_inv", G)):
            if F.dim() != 2 or F.shape[0] != F.shape[1]:
                _fail(op, name, f"must be a square matrix, got shape {list(F.shape)}")
        if S.dtype not in (torch.float32, torch.float64):
            _fail(op, "S_inv", f"must be float32 or float64, got {S.dtype}")
        _like(op, "G_inv", G, "S_inv", S)
        _like(op, "V", v, "S_inv", S)
        if v.shape != (G.shape[0], S.shape[0]):
            _fail(op, "V", f"must have shape [{G.shape[0]}, {S.shape[0]}], got {list(v.shape)}")
    return [G @ v @ S for S, G, v in zip(S_inv, G_inv, V)]


def running_average_(L, B, a, b, status=None):
    op = "running_average_"
    if L.dtype not in (torch.float32, torch.float64):
        _fail(op, "L", f"must be float32 or float64, got {L.dtype}")
    if not L.is_contiguous():
        _fail(op, "L", "must be contiguous (it is updated in place)")
    _like(op, "B", B, "L", L)
    if B.shape != L.shape:
        _fail(op, "B", f"must have the shape of L {list(L.shape)}, got {list(B.shape)}")
    _status(op, status, L)
    a, b = _coeff(op, "a", a, True, L), _coeff(op, "b", b, False, L)
    _finite(op, "B", B)
    L.mul_(a).add_(B, alpha=b)


def symmetrize_(A):
    _state("symmetrize_", "A", A, batch=True)
    A.copy_(A.tril() + A.tril(-1).mT)


def _pending(op, A, pending):
    _state(op, "A", A, batch=False)
    _like(op, "pending", pending, "A", A)
    if pending.shape != (A.shape[0] + 2,) or not pending.is_contiguous():
        _fail(op, "pending", f"must be a contiguous vector of d + 2 = {A.shape[0] + 2} entries, got shape {list(pending.shape)}")


def apply_pending_(A, pending):
    _pending("apply_pending_", A, pending)
    sym = A.tril() + A.tril(-1).mT
    u = pending[2:]
    A.copy_(pending[0] * sym - pending[1] * torch.outer(u, u))
    pending.zero_()
    pending[0] = 1


def sherman_morrison_deferred_(A, pending, g, a, b, status=None):
    op = "sherman_morrison_deferred_"
    _pending(op, A, pending)
    _like(op, "g", g, "A", A)
    if g.shape != (A.shape[0],):
        _fail(op, "g", f"must have shape [{A.shape[0]}] to match A, got {list(g.shape)}")
    _status(op, status, A)
    _coeff(op, "a", a, True, A)
    _coeff(op, "b", b, False, A)
    _finite(op, "g", g)
    apply_pending_(A, pending)
    sherman_morrison_(A, g, a, b)


def symmetric_matvec(A, v):
    op = "symmetric_matvec"
    _state(op, "A", A, batch=False)
    _like(op, "v", v, "A", A)
    if v.shape != (A.shape[0],):
        _fail(op, "v", f"must have shape [{A.shape[0]}] to match A, got {list(v.shape)}")
    return (A.tril() + A.tril(-1).mT) @ v


_IMPLS = {
    "symmetric_matvec": symmetric_matvec,
    "sherman_morrison_deferred_": sherman_morrison_deferred_,
    "apply_pending_": apply_pending_,
    "symmetrize_": symmetrize_,
    "sherman_morrison_": sherman_morrison_,
    "sherman_morrison_.tensor": sherman_morrison_,
    "woodbury_": woodbury_,
    "woodbury_.tensor": woodbury_,
    "kfac_update_": kfac_update_,
    "kfac_update_.tensor": kfac_update_,
    "kfac_apply": kfac_apply,
    "running_average_": running_average_,
    "running_average_.tensor": running_average_,
}

_libraries: list[torch.library.Library] = []  # registrations live as long as these do


def register(*, define: bool, dispatch_keys: tuple[str, ...]) -> None:
    """Registers these kernels for `dispatch_keys`; with `define`, also the schemas."""
    if define:
        lib = torch.library.Library("nhgd_ext", "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
        lib.define("_compiled_with_cuda() -> bool")
        lib.impl("_compiled_with_cuda", lambda: False, "CompositeExplicitAutograd")
        _libraries.append(lib)
    impl = torch.library.Library("nhgd_ext", "IMPL")
    for name, fn in _IMPLS.items():
        for key in dispatch_keys:
            impl.impl(name, fn, key)
    _libraries.append(impl)
