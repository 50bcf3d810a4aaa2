"""The kernels of nhgd_ext (docs/design.md §3.1), as plain Python functions.

Each function updates its state in place and returns it. ``a`` and ``b`` may be
Python floats or 0-d tensors; a 0-d tensor on the state's CUDA device is never
read by the host, so a CUDA update makes no host sync. On CUDA, value problems
that only the device can see (a device coefficient out of range, a non-finite
gradient, a non-positive Sherman-Morrison denominator) skip the update, leave
the state untouched and add one to ``status`` (an int32 counter from
:func:`new_status`; without one, to the per-device counter read by
:func:`skipped_updates`). On the CPU the same problems raise.

The state matrices are symmetric: ``sherman_morrison_`` reads only their lower
triangle, and every op writes an exactly symmetric result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _build  # noqa: F401  (loads the operators)
from ._reference import SCHEMAS

__all__ = [
    "sherman_morrison_",
    "woodbury_",
    "kfac_update_",
    "kfac_apply",
    "running_average_",
    "symmetrize_",
    "symmetric_matvec",
    "sherman_morrison_deferred_",
    "apply_pending_",
    "new_pending",
    "new_status",
    "device_status",
    "skipped_updates",
    "running_average_coeffs",
    "ema_coeffs",
]

_ops = torch.ops.nhgd_ext
_device_counters: dict[torch.device, torch.Tensor] = {}


def new_status(device: str | torch.device | None = None) -> torch.Tensor:
    """A zeroed int32 counter of skipped updates, for the ``status=`` argument."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _canonical(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def skipped_updates(device: str | torch.device = "cuda", *, reset: bool = False) -> int:
    """Updates skipped on ``device`` by calls made without ``status=`` (synchronizes)."""
    counter = _device_counters.get(_canonical(device))
    if counter is None:
        return 0
    value = int(counter.item())
    if reset:
        counter.zero_()
    return value


def device_status(device: str | torch.device) -> torch.Tensor | None:
    """The counter that updates of state on ``device`` made without
    ``status=`` add their skips to (read by :func:`skipped_updates`); ``None``
    on the CPU, where the same problems raise."""
    device = _canonical(device)
    if device.type != "cuda":
        return None
    counter = _device_counters.get(device)
    if counter is None:
        counter = _device_counters[device] = new_status(device)
    return counter


def _status_for(state: torch.Tensor, status: torch.Tensor | None) -> torch.Tensor | None:
    return status if status is not None else device_status(state.device)


def _tensor(op: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    return x


def _row_major(op: str, A: torch.Tensor) -> torch.Tensor:
    """A symmetric state as the kernels take it: A itself, or for a column-major
    A (what torch.linalg.inv returns) its transpose, which is the same matrix
    in row-major memory; updated in place, it updates A. Anything else goes
    to the kernel's own contiguity check."""
    if A.is_contiguous() or A.dim() < 2 or A.shape[-1] != A.shape[-2] or not A.mT.is_contiguous():
        return A
    return A.mT


def _tensors(op: str, name: str, xs) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise ValueError(f"{op}: argument '{name}' must be a list or tuple of tensors, got {type(xs).__name__}")
    return [_tensor(op, name, x) for x in xs]


def _coeffs(op: str, **values) -> tuple[bool, list]:
    """Returns (as_tensors, values): the tensor overload is used when any value is a tensor."""
    out = []
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise ValueError(f"{op}: argument '{name}' must be a float or a 0-d tensor, got {type(v).__name__}")
    as_tensors = any(isinstance(v, torch.Tensor) for v in out)
    if as_tensors:
        # A host float joins a device coefficient as a 0-d CPU tensor: read on
        # the host, so it costs no copy and no sync.
        out = [v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64) for v in out]
    return as_tensors, out


def sherman_morrison_(
    A: torch.Tensor, g: torch.Tensor, a, b, *, status: torch.Tensor | None = None, lower_only: bool = False
) -> torch.Tensor:
    """A <- (a M + b g g^T)^-1 for A = M^-1 (docs/design.md §2.1); batched for A n x d x d, g n x d.

    The product A g reads only the lower triangle of A. With ``lower_only``,
    only the lower triangle is updated too (half the memory traffic); the
    upper one is then stale until :func:`symmetrize_` mirrors it.
    """
    op = "sherman_morrison_"
    A, g = _tensor(op, "A", A), _tensor(op, "g", g)
    as_tensors, (ca, cb) = _coeffs(op, a=a, b=b)
    fn = _ops.sherman_morrison_.tensor if as_tensors else _ops.sherman_morrison_.default
    state = _row_major(op, A)
    if lower_only and state is not A:
        raise ValueError(f"{op}: argument 'A' must be row-major (contiguous) for lower_only=True: in a "
                         "column-major A the kernel's lower triangle is A's upper one")
    fn(state, g, ca, cb, _status_for(A, status), bool(lower_only))
    return A


def new_pending(d: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An empty pending update for :func:`sherman_morrison_deferred_`: [alpha=1, c=0, u=0]."""
    pending = torch.zeros(d + 2, dtype=dtype, device=device)
    pending[0] = 1
    return pending


def sherman_morrison_deferred_(
    A: torch.Tensor, pending: torch.Tensor, g: torch.Tensor, a: float, b: float, *, status: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`sherman_morrison_` in one pass over A per update (A d x d).

    The state is the pair (A, pending) with pending = [alpha, c, u], standing
    for alpha * A - c * u u^T where A is read through its lower triangle. Each
    call applies the pending update in the same pass that computes the new
    product A g, then leaves its own update pending. Call
    :func:`apply_pending_` before reading A itself. (On CUDA the update is
    applied at once and ``pending`` stays empty.)
    """
    op = "sherman_morrison_deferred_"
    A, pending, g = _tensor(op, "A", A), _tensor(op, "pending", pending), _tensor(op, "g", g)
    _, (ca, cb) = _coeffs(op, a=a, b=b)
    if isinstance(ca, torch.Tensor):
        raise ValueError(f"{op}: arguments 'a' and 'b' must be Python floats")
    _ops.sherman_morrison_deferred_(A, pending, g, ca, cb, _status_for(A, status))
    return A


def apply_pending_(A: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
    """Writes the pending update into A (both triangles) and empties ``pending``."""
    op = "apply_pending_"
    _ops.apply_pending_(_tensor(op, "A", A), _tensor(op, "pending", pending))
    return A


def symmetric_matvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A v for a symmetric d x d state, reading only its lower triangle on the
    CPU (so it also serves states kept with ``lower_only`` or deferred updates)."""
    op = "symmetric_matvec"
    return _ops.symmetric_matvec(_tensor(op, "A", A), _tensor(op, "v", v))


def symmetrize_(A: torch.Tensor) -> torch.Tensor:
    """Copies the lower triangle of A (d x d or n x d x d) onto its upper triangle."""
    _ops.symmetrize_(_tensor("symmetrize_", "A", A))
    return A


def woodbury_(A: torch.Tensor, H: torch.Tensor, a, *, status: torch.Tensor | None = None) -> torch.Tensor:
    """A <- (a M + H^T H)^-1 for A = M^-1, H k x d (docs/design.md §2.2); batched for A n x d x d, H n x k x d."""
    op = "woodbury_"
    A, H = _tensor(op, "A", A), _tensor(op, "H", H)
    as_tensors, (ca,) = _coeffs(op, a=a)
    fn = _ops.woodbury_.tensor if as_tensors else _ops.woodbury_.default
    fn(_row_major(op, A), H, ca, _status_for(A, status))
    return A


def kfac_update_(S_inv, G_inv, acts, grads, a, b, *, status: torch.Tensor | None = None):
    """For every layer i, on the inverses in place (docs/design.md §2.3):
    S_i <- a S_i + (b/n_i) acts_i^T acts_i and G_i <- a G_i + (b/m_i) grads_i^T grads_i.
    Returns (S_inv, G_inv)."""
    op = "kfac_update_"
    S_list, G_list = _tensors(op, "S_inv", S_inv), _tensors(op, "G_inv", G_inv)
    acts_list, grads_list = _tensors(op, "acts", acts), _tensors(op, "grads", grads)
    if not S_list:
        raise ValueError(f"{op}: argument 'S_inv' must hold at least one layer")
    as_tensors, (ca, cb) = _coeffs(op, a=a, b=b)
    fn = _ops.kfac_update_.tensor if as_tensors else _ops.kfac_update_.default
    fn(S_list, G_list, acts_list, grads_list, ca, cb, _status_for(S_list[0], status))
    return S_inv, G_inv


def kfac_apply(S_inv, G_inv, V) -> list[torch.Tensor]:
    """[G_inv[i] @ V[i] @ S_inv[i] for every layer i]."""
    op = "kfac_apply"
    return _ops.kfac_apply(_tensors(op, "S_inv", S_inv), _tensors(op, "G_inv", G_inv), _tensors(op, "V", V))


def running_average_(L: torch.Tensor, B: torch.Tensor, a, b, *, status: torch.Tensor | None = None) -> torch.Tensor:
    """L <- a L + b B (docs/design.md §2.4)."""
    op = "running_average_"
    L, B = _tensor(op, "L", L), _tensor(op, "B", B)
    as_tensors, (ca, cb) = _coeffs(op, a=a, b=b)
    fn = _ops.running_average_.tensor if as_tensors else _ops.running_average_.default
    fn(L, B, ca, cb, _status_for(L, status))
    return L


def running_average_coeffs(n: int) -> tuple[float, float]:
    """(a, b) of paper Eq. 3.2 for the update after ``n`` samples: (n/(n+1), 1/(n+1))."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"running_average_coeffs: argument 'n' must be an integer >= 0, got {n!r}")
    return n / (n + 1), 1.0 / (n + 1)


def ema_coeffs(beta: float) -> tuple[float, float]:
    """(a, b) of an exponential moving average with factor ``beta`` (paper App. E)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"ema_coeffs: argument 'beta' must lie in (0, 1), got {beta!r}")
    return float(beta), 1.0 - float(beta)


# Fake kernels: shapes only, so torch.compile and FakeTensor tracing see
# through the ops. They are also the Meta kernels, which the dispatcher picks
# whenever any argument is on the meta device: so they check that the
# tensors share one device (0-d coefficients may stay on the CPU), or a real
# A with a meta g would silently do nothing.
def _fake(qualname: str, shapes=None):
    op = qualname.split("::")[1].split(".")[0]
    packet = getattr(torch.ops.nhgd_ext, op)
    overload = qualname.split(".")[1] if "." in qualname else "default"
    names = [a.name for a in getattr(packet, overload)._schema.arguments]

    def fake(*args, **kwargs):
        found = []
        for name, value in [*zip(names, args), *kwargs.items()]:
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu"):
                    found.append((name, t.device))
        for name, device in found[1:]:
            if device != found[0][1]:
                raise ValueError(f"{op}: argument '{name}' is on {device}, but '{found[0][0]}' is on "
                                 f"{found[0][1]}; all tensors must be on one device")
        return None if shapes is None else shapes(*args, **kwargs)

    torch.library.register_fake(qualname)(fake)


# every operator of csrc/schemas.h: the in-place ones return nothing, these two a result
_RESULT_SHAPES = {
    "symmetric_matvec": lambda A, v: v.new_empty(A.shape[0]),
    "kfac_apply": lambda S_inv, G_inv, V: [torch.empty_like(v) for v in V],
}
for _qualified in SCHEMAS:
    _fake(f"nhgd_ext::{_qualified}", _RESULT_SHAPES.get(_qualified))
