"""DenseEFIM's state and update rules in pure PyTorch: the same object as the
compiled ``DenseEFIMCore`` (csrc/curvature/dense_efim.cpp), used where the
reference operators run, and by the tests as the yardstick the compiled one
must match. The math is documented in dense.py."""

from __future__ import annotations

import math

import torch

from .. import ops
from .._finite import NonFiniteError, first_nonfinite

# Rows reach the float64 Fisher per FOLD_ROWS (a step of that many at once, its
# products in the state's dtype), in FOLD_STRIPS GEMMs over its lower
# triangle (the only part kept current); see dense_efim.h.
FOLD_ROWS, FOLD_STRIPS = 16, 4
# F's scale stays pending until it falls below this.
RESCALE_BELOW = 1e-30
# A step of k >= gram_rows rows only reaches F, and factorizes F + damping I
# at once if dim <= FACTORIZE_ROWS_FACTOR * k; gram_rows assumes
# ASSUMED_STEPS_PER_SOLVE until told (see dense_efim.h).
ASSUMED_STEPS_PER_SOLVE, FACTORIZE_ROWS_FACTOR = 10, 3


def step_coefficients(beta: float | None, num_samples: int, k: int, per_step: bool) -> tuple[float, list[float]]:
    """(a, row weights) that fold k new rows into F after ``num_samples``:
    F <- a F + sum_i weights[i] x_i x_i^T (the last row is the newest)."""
    if per_step and beta is not None:
        return beta, [(1 - beta) / k] * k
    if beta is None:
        n = num_samples
        return (1.0, [1.0 / k] * k) if n == 0 else (n / (n + k), [1.0 / (n + k)] * k)
    return beta**k, [(1 - beta) * beta ** (k - 1 - i) for i in range(k)]


def cholesky_solve(L: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 b by two triangular solves (LAPACK's potrs, behind
    torch.cholesky_solve, took five times as long on a d = 650 vector)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)


def checked_rows(name: str, x, ndim: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` detached and converted, if it is a finite floating-point tensor of
    shape [dim] (ndim 1) or [k >= 1, dim] (ndim 2); a ValueError naming it otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"DenseEFIM: argument '{name}' must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[-1] != dim or x.numel() == 0:
        want = f"[{dim}]" if ndim == 1 else f"[k >= 1, {dim}]"
        raise ValueError(f"DenseEFIM: argument '{name}' must have shape {want}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"DenseEFIM: argument '{name}' must be a floating-point tensor, got {x.dtype}")
    x = x.detach().to(device=device, dtype=dtype)
    if first_nonfinite([x]) is not None:
        raise NonFiniteError(f"DenseEFIM: argument '{name}' contains NaN or infinite values; the state is unchanged",
                             name)
    return x


class DenseEFIMCore:
    def __init__(self, dim: int, beta: float | None, damping: float, refresh_below: float,
                 dtype: torch.dtype, device: torch.device, status: torch.Tensor | None = None):
        self.dim, self.beta, self.damping, self.refresh_below = dim, beta, damping, refresh_below
        self.dtype, self.device, self.status = dtype, device, status
        self.reset()

    def reset(self) -> None:
        d = self.dim
        self.inverse = torch.eye(d, dtype=self.dtype, device=self.device) / self.damping
        self.pending = ops.new_pending(d, dtype=self.dtype, device=self.device)
        # float64 whatever the state's dtype: every refresh rebuilds the inverse
        # from F, so its rounding must not accumulate
        self.fisher = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.num_updates = self.num_samples = self.num_refreshes = 0
        self.last_rows = 0  # rows of the last update (see dense_efim.h)
        self.factor = None
        per = 9 * ASSUMED_STEPS_PER_SOLVE
        self.gram_rows = max(2, (self.dim + per - 1) // per)
        self.mu = self.damping
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        # rows[i] enters `fisher` with weight weights[i] at the next fold
        self._rows: list[torch.Tensor] = []
        self._weights: list[float] = []
        # F = scale * (fisher + the buffered rows' share): the product of the
        # a's since fold() last made `fisher` exact (see dense_efim.h)
        self._scale = 1.0

    def set_counters(self, num_updates: int, num_samples: int, num_refreshes: int, mu: float) -> None:
        self.num_updates, self.num_samples, self.num_refreshes, self.mu = num_updates, num_samples, num_refreshes, mu
        self.factor = None
        self._clear_buffer()

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        x = checked_rows("g", g, 1, self.dim, self.dtype, self.device)
        if batch_size != 1:
            x = x * math.sqrt(batch_size)
        a, (b,) = step_coefficients(self.beta, self.num_samples, 1, False)
        self._fold_in(x.reshape(1, -1), a, b, lambda: ops.sherman_morrison_deferred_(
            self.inverse, self.pending, x, a, b, status=self.status))

    def update_many(self, G: torch.Tensor, per_step: bool = False) -> None:
        X = checked_rows("G", G, 2, self.dim, self.dtype, self.device)
        k = X.shape[0]
        a, w = step_coefficients(self.beta, self.num_samples, k, per_step)

        def scaled():
            return X * torch.tensor(w, dtype=torch.float64).sqrt().to(device=self.device, dtype=self.dtype).unsqueeze(1)

        def woodbury(H):
            self.flush()
            ops.woodbury_(self.inverse, H, a, status=self.status)

        if k < FOLD_ROWS:
            H = scaled()
            self._fold_in(H, a, 1.0, lambda: woodbury(H))
            return
        # enough rows for a fold of their own: into F now, in the state's dtype
        self._update_in_place(a, k, lambda: woodbury(scaled()))
        self.fold()
        if a != 1.0:
            self.fisher.mul_(a)
        self._add_rows(X, torch.tensor(w, dtype=torch.float64).to(self.fisher.device))
        self._advance(a, k)
        if k >= self.gram_rows and self.dim <= FACTORIZE_ROWS_FACTOR * k:
            self.factorize()

    def _goes_stale(self, a: float, k: int) -> bool:
        return self.mu * a < self.refresh_below * self.damping or k >= self.gram_rows

    def set_gram_rows(self, rows: int) -> None:
        self.gram_rows = rows

    def _advance(self, a: float, k: int) -> None:
        self.num_updates += 1
        self.num_samples += k
        self.last_rows = k
        self.mu *= a
        self.factor = None

    def _update_in_place(self, a: float, k: int, update) -> None:
        """Applies the in-place ``update`` of the inverse for a step of k rows.
        No factorization runs here: an update that would take the damping
        below ``refresh_below * damping``, that has too many rows to pay in
        place, or that the kernel refuses (the float32 state lost
        definiteness) leaves the inverse stale (mu = 0) for the next solve
        to rebuild."""
        stale = self._goes_stale(a, k)
        if not stale:
            try:
                update()
            except NotImplementedError:  # a missing kernel, nothing a rebuild mends
                raise
            except RuntimeError:
                stale = True
        if stale:
            self.mu = 0.0

    def _fold_in(self, rows: torch.Tensor, a: float, weight: float, update) -> None:
        """The in-place ``update``, then the rows recorded for F."""
        self._update_in_place(a, rows.shape[0], update)
        self._remember(rows, a, weight)
        self._advance(a, rows.shape[0])

    def _remember(self, rows: torch.Tensor, a: float, weight: float) -> None:
        """F <- a F + weight * rows^T rows, deferred to the next fold."""
        if self._scale < RESCALE_BELOW:  # the weights below must not overflow
            self.fold()
        self._scale *= a
        # a copy even when the rows are float64 already: F must not see the
        # caller's later writes to the tensor it passed
        self._rows.append(rows.to(torch.float64, copy=True))
        self._weights.extend([weight / self._scale] * rows.shape[0])
        if len(self._weights) >= FOLD_ROWS:
            self._add_buffered_rows()

    def _add_rows(self, X: torch.Tensor, w: torch.Tensor) -> None:
        """fisher += X^T diag(w) X over its lower triangle, the products in X's dtype."""
        Xw = X * w.to(X.dtype).unsqueeze(1)
        d, start = self.dim, 0
        for j in range(1, FOLD_STRIPS + 1):
            end = math.isqrt(d * d * j // FOLD_STRIPS)  # strips of about equal area
            if end > start:
                strip, left, right = self.fisher[start:end, :end], X[:, start:end].mT, Xw[:, :end]
                if X.dtype == torch.float64:
                    strip.addmm_(left, right)
                else:
                    strip.add_(torch.mm(left, right))
            start = end

    def _add_buffered_rows(self) -> None:
        """The buffered rows into fisher, its scale left pending."""
        if not self._rows:
            return
        self._add_rows(torch.cat(self._rows), torch.tensor(self._weights, dtype=torch.float64).to(self.fisher.device))
        self._rows, self._weights = [], []

    def fold(self) -> None:
        """Makes ``fisher`` F itself (its lower triangle)."""
        self._add_buffered_rows()
        if self._scale != 1.0:
            self.fisher.mul_(self._scale)
        self._scale = 1.0

    def _damped_fisher(self) -> torch.Tensor:
        self.fold()
        D = ops.symmetrize_(self.fisher.clone())  # only its lower triangle is current
        D.diagonal().add_(self.damping)
        return D

    def factorize(self) -> None:
        """factor <- L with L L^T = F + damping I (float64), no explicit inverse."""
        self.factor = torch.linalg.cholesky(self._damped_fisher())
        self.num_refreshes += 1

    def refresh(self) -> None:
        """inverse <- (F + damping I)^-1, exactly (float64 Cholesky), mu <- damping."""
        inv = torch.cholesky_inverse(torch.linalg.cholesky(self._damped_fisher())).contiguous()  # LAPACK may hand it back column-major
        self.inverse.copy_(ops.symmetrize_(inv))  # exactly symmetric
        self.pending.copy_(ops.new_pending(self.dim, dtype=self.dtype, device=self.device))
        self.mu = self.damping
        self.num_refreshes += 1

    def flush(self) -> None:
        ops.apply_pending_(self.inverse, self.pending)
