"""DenseEFIM's compact representation: F as the weighted sum of the rows that
still carry weight, and (F + lambda I)^-1 v through the Woodbury identity.

With the kept rows Y (r x d) and their weights c (F = Y^T diag(c) Y),

    (F + lambda I)^-1 v = (v - Y^T S C^-1 S Y v) / lambda,
    S = diag(sqrt(c)),  C = lambda I_r + S (Y Y^T) S,

which costs O(r d + r^3) and O(r d) memory instead of the dense inverse's
d^2. Everything here is float64 whatever the state's dtype: the r x r core
is small, and rounding must not leak into the solve.

Costs are moved off the inner loop: an update stores its rows (O(d) each);
their inner products with the other kept rows (the Gram matrix Y Y^T) are
taken at the next solve, all new rows in one GEMM, and the core's Cholesky
factor is kept until the next update.

Rows are dropped once their share of F has become negligible against the
damping: weight * |x|^2 < window_tol * lambda. Every dropped row is a
positive semi-definite term of norm weight * |x|^2, so ``truncation`` (their
sum, decaying with F) bounds |F - F_kept| in the 2-norm, and the relative
error of a solve by truncation / lambda. Under an EMA the window stays
bounded (about log(window_tol * lambda / (w |x|^2)) / log(beta) steps); a
running average keeps every row.
"""

from __future__ import annotations

import math

import torch

from ._dense_reference import checked_rows, cholesky_solve, step_coefficients

_FLOAT64 = torch.float64
# Negligible rows are looked for every this many updates: a row kept a few
# updates longer only makes F_kept closer to F.
_DROP_EVERY = 8


class CompactCore:
    """The compact state (see the module docstring). ``dtype`` is the dtype
    the solve returns; the state itself is float64."""

    def __init__(self, dim: int, beta: float | None, damping: float, window_tol: float,
                 dtype: torch.dtype, device: torch.device):
        self.dim, self.beta, self.damping, self.window_tol = dim, beta, damping, window_tol
        self.dtype, self.device = dtype, device
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        d = self.dim
        self._rows = torch.zeros(0, d, dtype=_FLOAT64, device=self.device)  # one slot per row
        self._weights = torch.zeros(0, dtype=_FLOAT64, device=self.device)  # 0: a free slot
        self._norms = torch.zeros(0, dtype=_FLOAT64, device=self.device)  # |x|^2 of each slot's row
        self._gram = torch.zeros(0, 0, dtype=_FLOAT64, device=self.device)
        self._unsynced: list[int] = []  # slots whose Gram row and column are not taken yet
        self._free: list[int] = []  # slots without a row
        self._factor = None  # (sqrt weights, Cholesky factor of C), until the next update
        self.rank = 0
        self.num_updates = self.num_samples = 0
        self.truncation = 0.0

    num_refreshes = 0  # nothing is ever refactorized beyond the r x r core
    mu = property(lambda self: self.damping, doc="the damping of every solve: the one given")

    def state(self) -> dict:
        active = self._active()
        return {"rows": self._rows[active].clone(), "weights": self._weights[active].clone(),
                "num_updates": self.num_updates, "num_samples": self.num_samples, "truncation": self.truncation}

    def load(self, state: dict) -> None:
        rows, weights = state["rows"], state["weights"]
        if rows.dim() != 2 or rows.shape[1] != self.dim or weights.shape != (rows.shape[0],):
            raise ValueError(f"DenseEFIM.load_state_dict: 'rows' must have shape [r, {self.dim}] with one "
                             f"weight each, got {list(rows.shape)} and {list(weights.shape)}")
        self.reset()
        r = rows.shape[0]
        self._grow(r)
        self._rows[:r] = rows
        self._weights[:r] = weights
        self._norms[:r] = (self._rows[:r] ** 2).sum(1)
        self._unsynced = list(range(r))
        self._free = (self._weights == 0).nonzero().flatten().tolist()
        self.rank = int((weights > 0).sum())
        self.num_updates, self.num_samples = int(state["num_updates"]), int(state["num_samples"])
        self.truncation = float(state["truncation"])

    def fisher(self) -> torch.Tensor:
        """F = Y^T diag(c) Y as a d x d float64 matrix (O(r d^2))."""
        active = self._active()
        Y = self._rows[active]
        return Y.T @ (Y * self._weights[active].unsqueeze(1))

    # ---------------------------------------------------------------- updates

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        x = checked_rows("g", g, 1, self.dim, _FLOAT64, self.device)
        if batch_size != 1:
            x = x * math.sqrt(batch_size)
        self._add(x.unsqueeze(0), *step_coefficients(self.beta, self.num_samples, 1, False))

    def update_many(self, G: torch.Tensor, per_step: bool = False) -> None:
        X = checked_rows("G", G, 2, self.dim, _FLOAT64, self.device)
        self._add(X, *step_coefficients(self.beta, self.num_samples, X.shape[0], bool(per_step)))

    def _add(self, X: torch.Tensor, a: float, weights: list[float]) -> None:
        k = X.shape[0]
        if a != 1.0:
            self._weights.mul_(a)
            self.truncation *= a
        slots = self._free_slots(k)
        if k == 1:  # plain indexing: no index tensor to build
            slot = slots[0]
            self._rows[slot] = X[0]
            self._norms[slot] = X[0] @ X[0]
            self._weights[slot] = weights[0]
        else:
            index = torch.tensor(slots, device=self.device)
            self._rows.index_copy_(0, index, X)
            self._norms.index_copy_(0, index, (X * X).sum(1))
            self._weights.index_copy_(0, index, torch.tensor(weights, dtype=_FLOAT64).to(self.device))
        self._unsynced += slots
        self.rank += k
        self.num_updates += 1
        self.num_samples += k
        if self.num_updates % _DROP_EVERY == 0:
            self._drop_negligible_rows()
        self._factor = None

    def _free_slots(self, k: int) -> list[int]:
        if len(self._free) < k:
            old = self._weights.shape[0]
            # a quarter more each time: the solve works on every slot (a free
            # one has weight 0), so slack costs it time
            self._grow(max(old + old // 4, old + k - len(self._free), 16))
            self._free += list(range(old, self._weights.shape[0]))
        taken, self._free = self._free[:k], self._free[k:]
        return taken

    def _grow(self, capacity: int) -> None:
        old = self._weights.shape[0]
        d, device = self.dim, self.device
        rows = torch.zeros(capacity, d, dtype=_FLOAT64, device=device)
        rows[:old] = self._rows
        gram = torch.zeros(capacity, capacity, dtype=_FLOAT64, device=device)
        gram[:old, :old] = self._gram
        self._rows, self._gram = rows, gram
        self._weights = torch.cat([self._weights, torch.zeros(capacity - old, dtype=_FLOAT64, device=device)])
        self._norms = torch.cat([self._norms, torch.zeros(capacity - old, dtype=_FLOAT64, device=device)])

    def _drop_negligible_rows(self) -> None:
        mass = self._weights * self._norms
        drop = (self._weights > 0) & (mass < self.window_tol * self.damping)
        if bool(drop.any()):
            self.truncation += float(mass[drop].sum())
            self._weights[drop] = 0.0
            dropped = drop.nonzero().flatten().tolist()
            self._free += dropped
            self.rank -= len(dropped)

    # ------------------------------------------------------------------ solve

    def _active(self) -> torch.Tensor:
        return (self._weights > 0).nonzero().flatten()

    def _sync_gram(self) -> None:
        """The Gram rows and columns of the rows added since the last solve,
        in one GEMM against every slot (a free one is masked by its weight 0)."""
        if not self._unsynced:
            return
        new = torch.tensor(sorted(set(self._unsynced)), device=self.device)
        self._unsynced = []
        block = self._rows[new] @ self._rows.T
        self._gram.index_copy_(0, new, block)
        self._gram.index_copy_(1, new, block.T.contiguous())

    def _core_factor(self):
        """(sqrt weights, Cholesky factor of C) over every slot: a free slot's
        weight 0 leaves it a lone lambda on C's diagonal."""
        if self._factor is None:
            self._sync_gram()
            s = self._weights.sqrt()
            C = self._gram * s.unsqueeze(1) * s.unsqueeze(0)
            C.diagonal().add_(self.damping)
            self._factor = (s, torch.linalg.cholesky(C))
        return self._factor

    def solve(self, v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(F_kept + lambda I)^-1 v for v of shape [d] or [d, m], in ``dtype``
        (default: the state's). Where F's eigenvalues dwarf lambda the
        subtraction in the Woodbury formula loses about eps * trace(F) /
        lambda; one step of iterative refinement then recovers it, if that
        loss would show in ``dtype``."""
        dtype = dtype or self.dtype
        b = v.to(device=self.device, dtype=_FLOAT64)
        b2 = b.unsqueeze(1) if b.dim() == 1 else b
        if self.rank == 0:
            return (b / self.damping).to(dtype)
        s, L = self._core_factor()
        Y = self._rows
        s1 = s.unsqueeze(1)

        def woodbury(rhs):
            t = cholesky_solve(L, s1 * (Y @ rhs))
            return (rhs - Y.T @ (s1 * t)) / self.damping

        w = woodbury(b2)
        trace = float((self._weights * self._norms).sum())
        if torch.finfo(_FLOAT64).eps * trace / self.damping > 0.01 * torch.finfo(dtype).eps:
            residual = b2 - (self.damping * w + Y.T @ (s1 * s1 * (Y @ w)))
            w = w + woodbury(residual)
        return (w.squeeze(1) if b.dim() == 1 else w).to(dtype)
