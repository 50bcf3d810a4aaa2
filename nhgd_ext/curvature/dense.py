"""DenseEFIM: the inverse of the damped empirical Fisher, kept current by
rank-one (Sherman-Morrison) and rank-k (Woodbury) updates.

What the state stands for. With x the scaled gradients fed so far (one per
sample), F is their running average (``beta=None``, paper Eq. 3.2) or their
exponential moving average (factor ``beta``, paper App. E), and

    inverse = (F + mu I)^-1,   refresh_below * damping <= mu <= damping.

Every update scales the damped matrix by a < 1, so the damping term mu decays
with it; when it has fallen to ``refresh_below * damping`` the inverse is
rebuilt exactly from F, kept alongside in the same dtype, as
(F + damping I)^-1 through a float64 Cholesky factorization. That restores
mu = damping, resets the drift of the float32 rank-one updates, and is
counted in ``num_refreshes``. Running averages need a refresh only when the
sample count doubles; an EMA every log(refresh_below) / log(beta) updates.

The first running-average update has no previous average to scale (a = 0):
it starts from F = 0 with the full damping, D = x x^T + damping I.
"""

from __future__ import annotations

import math

import torch

from .. import ops

_STATE_KEYS = ("inverse", "pending", "fisher")
_COUNTER_KEYS = ("num_updates", "num_samples", "num_refreshes", "mu")


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
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Back to no samples: F = 0, inverse = I / damping."""
        d = self.dim
        self._A = torch.eye(d, dtype=self.dtype, device=self.device) / self.damping
        self._pending = ops.new_pending(d, dtype=self.dtype, device=self.device)
        # The kept Fisher is float64 whatever the state's dtype: it is what every
        # refresh rebuilds the inverse from, so its rounding must not accumulate
        # (a float32 running average over 10^5 samples drifts by about 1e-2).
        self._F = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        # New rows reach F in batches (one GEMM per FOLD_ROWS rows rather than a
        # pass over F per update): rows[i] enters F with weight scale * weights[i].
        self._pending_rows: list[torch.Tensor] = []
        self._pending_weights: list[float] = []
        self._scale = 1.0  # product of the a's since the last fold
        self.num_updates = 0  # calls of update / update_many
        self.num_samples = 0  # gradients (rows) fed
        self.num_refreshes = 0
        self.mu = self.damping  # the damping the inverse currently includes

    def state_dict(self) -> dict:
        self._fold()  # F complete (the same F, rounded once more), so the copy needs no buffer
        state = {"inverse": self._A.clone(), "pending": self._pending.clone(), "fisher": self._F.clone()}
        state.update({k: getattr(self, k) for k in _COUNTER_KEYS})
        state["config"] = {"dim": self.dim, "beta": self.beta, "damping": self.damping,
                           "refresh_below": self.refresh_below}
        return state

    def load_state_dict(self, state: dict) -> None:
        config = {"dim": self.dim, "beta": self.beta, "damping": self.damping, "refresh_below": self.refresh_below}
        if state.get("config") != config:
            raise ValueError(f"DenseEFIM.load_state_dict: the state was saved with {state.get('config')}, "
                             f"this object has {config}")
        for key, target in zip(_STATE_KEYS, (self._A, self._pending, self._F)):
            if state[key].shape != target.shape:
                raise ValueError(f"DenseEFIM.load_state_dict: '{key}' has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
        for key, target in zip(_STATE_KEYS, (self._A, self._pending, self._F)):
            target.copy_(state[key])
        for key in _COUNTER_KEYS:
            setattr(self, key, state[key])
        self._pending_rows, self._pending_weights, self._scale = [], [], 1.0

    # ---------------------------------------------------------------- updates

    def _coefficients(self, k: int, per_step: bool = False) -> tuple[float, torch.Tensor]:
        """(a, row weights) that fold k new samples into the damped matrix."""
        n = self.num_samples
        if per_step and self.beta is not None:
            return self.beta, torch.full((k,), (1 - self.beta) / k, dtype=torch.float64)
        if self.beta is None:
            if n == 0:
                return 1.0, torch.full((k,), 1.0 / k, dtype=torch.float64)
            return n / (n + k), torch.full((k,), 1.0 / (n + k), dtype=torch.float64)
        beta = self.beta
        ages = torch.arange(k - 1, -1, -1, dtype=torch.float64)  # the last row is the newest
        return beta**k, (1 - beta) * beta**ages

    def _rows(self, name: str, x: torch.Tensor, ndim: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"DenseEFIM: argument '{name}' must be a tensor, got {type(x).__name__}")
        if x.dim() != ndim or x.shape[-1] != self.dim or x.numel() == 0:
            want = f"[{self.dim}]" if ndim == 1 else f"[k >= 1, {self.dim}]"
            raise ValueError(f"DenseEFIM: argument '{name}' must have shape {want}, got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"DenseEFIM: argument '{name}' must be a floating-point tensor, got {x.dtype}")
        x = x.detach()
        if x.dtype != self.dtype or x.device != self.device:
            x = x.to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"DenseEFIM: argument '{name}' contains NaN or infinite values; the state is unchanged")
        return x

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        """Feeds one gradient. For the mean gradient of a batch of D samples pass
        ``batch_size=D``: it enters as sqrt(D) g, whose outer product has the
        expectation of a single sample's (DESIGN.md §2.5)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DenseEFIM.update: argument 'batch_size' must be a positive integer, got {batch_size!r}")
        x = self._rows("g", g, 1)
        if batch_size != 1:
            x = x * math.sqrt(batch_size)
        a, w = self._coefficients(1)
        b = float(w[0])
        self._fold_in(x.reshape(1, -1), a, b, lambda: ops.sherman_morrison_deferred_(self._A, self._pending, x, a, b))

    def update_many(self, G: torch.Tensor, *, per_step: bool = False) -> None:
        """Feeds the rows of G (k x d) as k samples, oldest first, in one rank-k step.

        ``per_step=True``: the rows are the per-sample gradients of one
        optimizer step, and an EMA decays once per step (by ``beta``, as for
        one batch-mean gradient) with the rows sharing the new weight
        ``(1 - beta) / k``, rather than once per row (``beta**k``, which at
        the paper's beta = 0.8 and a batch of 100 would forget everything
        every step). The running average counts rows either way."""
        X = self._rows("G", G, 2)
        k = X.shape[0]
        a, w = self._coefficients(k, per_step)
        H = X * w.sqrt().to(device=self.device, dtype=self.dtype).unsqueeze(1)

        def woodbury():
            self._flush()
            ops.woodbury_(self._A, H, a)

        self._fold_in(H, a, 1.0, woodbury)

    def _fold_in(self, rows: torch.Tensor, a: float, weight: float, update) -> None:
        """Applies the in-place ``update`` of the inverse, then records the rows
        for F. The update is skipped when the refresh it triggers rebuilds the
        inverse from F anyway; when it finds the inverse has lost definiteness
        (float32 drift) it is retried once on the exactly rebuilt state."""
        if not self._refresh_follows(a):
            try:
                update()
            except RuntimeError:
                self._refresh()
                update()
        self._remember(rows, a, weight)
        self._advance(a, rows.shape[0])

    FOLD_ROWS = 64

    def _remember(self, rows: torch.Tensor, a: float, weight: float) -> None:
        """F <- a F + weight * rows^T rows, deferred to the next fold."""
        self._scale *= a
        # a copy even when the rows are float64 already: F must not see the
        # caller's later writes to the tensor it passed
        self._pending_rows.append(rows.to(torch.float64, copy=True))
        self._pending_weights.extend([weight / self._scale] * rows.shape[0])
        if len(self._pending_weights) >= self.FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if self._pending_rows:
            X = torch.cat(self._pending_rows)
            w = torch.tensor(self._pending_weights, dtype=torch.float64, device=self.device) * self._scale
            self._F.mul_(self._scale).addmm_(X.mT * w, X)
        elif self._scale != 1.0:
            self._F.mul_(self._scale)
        self._pending_rows, self._pending_weights, self._scale = [], [], 1.0

    def _refresh_follows(self, a: float) -> bool:
        """Whether this update takes the damping below the refresh threshold:
        then the refresh rebuilds the inverse from F anyway, and the in-place
        update is skipped (for a tiny a, say beta**k over a large batch, it
        would divide the float32 state by a and overflow)."""
        return self.mu * a < self.refresh_below * self.damping

    def _advance(self, a: float, k: int) -> None:
        self.num_updates += 1
        self.num_samples += k
        self.mu *= a
        if self.mu < self.refresh_below * self.damping:
            self._refresh()

    def _refresh(self) -> None:
        """inverse <- (F + damping I)^-1, exactly (float64 Cholesky), mu <- damping."""
        self._fold()
        D = 0.5 * (self._F + self._F.mT)
        D.diagonal().add_(self.damping)
        L = torch.linalg.cholesky(D)
        inv = torch.cholesky_inverse(L)
        inv = inv.tril() + inv.tril(-1).mT  # exactly symmetric
        self._A.copy_(inv)
        self._pending.copy_(ops.new_pending(self.dim, dtype=self.dtype, device=self.device))
        self.mu = self.damping
        self.num_refreshes += 1

    def _flush(self) -> None:
        ops.apply_pending_(self._A, self._pending)

    # -------------------------------------------------------------- read-outs

    @property
    def inverse(self) -> torch.Tensor:
        """The d x d inverse (F + mu I)^-1, exactly symmetric. It is the live
        state: read it, do not write it."""
        self._flush()
        return self._A

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
        alpha, c, u = self._pending[0], self._pending[1], self._pending[2:]
        return alpha * ops.symmetric_matvec(self._A, v) - c * (u @ v) * u
