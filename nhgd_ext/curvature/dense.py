"""DenseEFIM: the inverse of the damped empirical Fisher, kept current by
rank-one (Sherman-Morrison) and rank-k (Woodbury) updates.

What the state stands for. With x the scaled gradients fed so far (one per
sample), F is their running average (``beta=None``, paper Eq. 3.2) or their
exponential moving average (factor ``beta``, paper App. E), and

    inverse = (F + mu I)^-1,   refresh_below * damping <= mu <= damping.

Every update scales the damped matrix by a < 1, so the damping term mu decays
with it; when it has fallen to ``refresh_below * damping`` the inverse is
rebuilt exactly from F, kept alongside in float64 (its lower triangle), as
(F + damping I)^-1 through a float64 Cholesky factorization. That restores
mu = damping, resets the drift of the float32 rank-one updates, and is
counted in ``num_refreshes``. Running averages need a refresh only when the
sample count doubles; an EMA every log(refresh_below) / log(beta) updates.

The first running-average update has no previous average to scale (a = 0):
it starts from F = 0 with the full damping, D = x x^T + damping I.

The state and its update rules live in a core object: the compiled
``DenseEFIMCore`` (csrc/curvature/dense_efim.cpp) wherever the extension is
built, so that a Pipeline's consumer thread applies updates without taking
the GIL from the training loop; the pure-PyTorch one in _dense_reference.py
with the reference operators. This class checks arguments and reads the
state out.
"""

from __future__ import annotations

import math

import torch

from .. import _build, ops
from ._dense_reference import DenseEFIMCore as _ReferenceCore

_STATE_KEYS = ("inverse", "pending", "fisher")
_COUNTER_KEYS = ("num_updates", "num_samples", "num_refreshes", "mu")


def _make_core(dim, beta, damping, refresh_below, dtype, device):
    status = ops.device_status(device)  # where the CUDA kernels count skipped updates
    module = _build.native_module()
    if module is not None and _build.backend(device) != "reference":
        return module.DenseEFIMCore(dim, beta, damping, refresh_below, dtype, device, status)
    return _ReferenceCore(dim, beta, damping, refresh_below, dtype, device, status)


class DenseEFIM:
    """Dense inverse empirical Fisher of a ``dim``-dimensional parameter vector.

    Args:
        dim: number of parameters d (the inverse is d x d).
        beta: EMA factor in (0, 1), or ``None`` for the running average.
        damping: lambda > 0 added to the Fisher before inverting.
        refresh_below: rebuild the inverse exactly once the damping has decayed
            below this fraction of ``damping`` (0 < refresh_below < 1).
        dtype, device: of the state (float32 or float64).
    """

    def __init__(self, dim: int, *, beta: float | None = None, damping: float = 1e-3,
                 refresh_below: float = 0.25, dtype: torch.dtype = torch.float32, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"DenseEFIM: argument 'dim' must be a positive integer, got {dim!r}")
        if beta is not None and not 0.0 < beta < 1.0:
            raise ValueError(f"DenseEFIM: argument 'beta' must be None or lie in (0, 1), got {beta!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"DenseEFIM: argument 'damping' must be a finite number > 0, got {damping!r}")
        if not 0.0 < refresh_below < 1.0:
            raise ValueError(f"DenseEFIM: argument 'refresh_below' must lie in (0, 1), got {refresh_below!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"DenseEFIM: argument 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.beta, self.damping, self.refresh_below = dim, beta, float(damping), float(refresh_below)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self._core = _make_core(dim, None if beta is None else float(beta), self.damping, self.refresh_below,
                                dtype, self.device)

    @property
    def compiled_core(self):
        """The compiled object holding the state (``None`` with the reference
        operators): a Pipeline's consumer thread updates it without the GIL."""
        return None if isinstance(self._core, _ReferenceCore) else self._core

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Back to no samples: F = 0, inverse = I / damping."""
        self._core.reset()

    num_updates = property(lambda self: self._core.num_updates, doc="calls of update / update_many")
    num_samples = property(lambda self: self._core.num_samples, doc="gradients (rows) fed")
    num_refreshes = property(lambda self: self._core.num_refreshes, doc="exact rebuilds of the inverse")
    mu = property(lambda self: self._core.mu, doc="the damping the inverse currently includes")

    def _config(self) -> dict:
        return {"dim": self.dim, "beta": self.beta, "damping": self.damping, "refresh_below": self.refresh_below}

    def state_dict(self) -> dict:
        core = self._core
        core.fold()  # fisher becomes F itself (rows added, scale applied): the copy needs no buffer
        state = {k: getattr(core, k).clone() for k in _STATE_KEYS}
        ops.symmetrize_(state["fisher"])  # the core keeps its lower triangle current
        state.update({k: getattr(core, k) for k in _COUNTER_KEYS})
        state["config"] = self._config()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self._config():
            raise ValueError(f"DenseEFIM.load_state_dict: the state was saved with {state.get('config')}, "
                             f"this object has {self._config()}")
        targets = [getattr(self._core, key) for key in _STATE_KEYS]
        for key, target in zip(_STATE_KEYS, targets):
            if state[key].shape != target.shape:
                raise ValueError(f"DenseEFIM.load_state_dict: '{key}' has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
        for key, target in zip(_STATE_KEYS, targets):
            target.copy_(state[key])
        self._core.set_counters(*(state[key] for key in _COUNTER_KEYS))

    # ---------------------------------------------------------------- updates

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        """Feeds one gradient. For the mean gradient of a batch of D samples pass
        ``batch_size=D``: it enters as sqrt(D) g, whose outer product has the
        expectation of a single sample's (DESIGN.md §2.5)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DenseEFIM.update: argument 'batch_size' must be a positive integer, got {batch_size!r}")
        self._core.update(g, batch_size)

    def update_many(self, G: torch.Tensor, *, per_step: bool = False) -> None:
        """Feeds the rows of G (k x d) as k samples, oldest first, in one rank-k step.

        ``per_step=True``: the rows are the per-sample gradients of one
        optimizer step, and an EMA decays once per step (by ``beta``, as for
        one batch-mean gradient) with the rows sharing the new weight
        ``(1 - beta) / k``, rather than once per row (``beta**k``, which at
        the paper's beta = 0.8 and a batch of 100 would forget everything
        every step). The running average counts rows either way."""
        self._core.update_many(G, bool(per_step))

    # -------------------------------------------------------------- read-outs

    @property
    def inverse(self) -> torch.Tensor:
        """The d x d inverse (F + mu I)^-1, exactly symmetric. It is the live
        state: read it, do not write it."""
        self._core.flush()
        return self._core.inverse

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """inverse @ v for v of shape [d] or [d, m]."""
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[0] != self.dim:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"DenseEFIM.solve: argument 'v' must have shape [{self.dim}] or [{self.dim}, m], got {got}")
        v = v.to(device=self.device, dtype=self.dtype)
        if v.dim() == 2:
            return self.inverse @ v
        # The pending update is applied to the product rather than written into
        # the state: half a pass over A (its lower triangle), no writes.
        A, pending = self._core.inverse, self._core.pending
        alpha, c, u = pending[0], pending[1], pending[2:]
        return alpha * ops.symmetric_matvec(A, v) - c * (u @ v) * u
