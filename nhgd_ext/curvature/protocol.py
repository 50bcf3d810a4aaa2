"""What NHGD asks of a curvature: the contract DenseEFIM, KFAC and a
Pipeline meet, and a user's own curvature must."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Curvature(Protocol):
    """An inverse-curvature state fed by the inner steps.

    Required: ``update(g, batch_size)`` (a flat batch-mean gradient, which
    enters as sqrt(batch_size) g), ``update_many(rows, per_step=...)`` (one
    step's per-sample rows, n x d: an EMA decays once), ``solve(v)``
    ((F + damping I)^-1 v for the flat v) and ``reset()``. Optional, read
    with defaults: ``takes_rows`` (``True``: whether per-sample rows are
    wanted; K-FAC reads its own from layer hooks), ``paused()`` (a context in
    which backward passes are not recorded), ``num_updates``,
    ``state_dict()`` / ``load_state_dict()``. Every method refuses bad input
    before changing anything; a NaN or infinity raises
    :class:`nhgd_ext.NonFiniteError`.
    """

    def update(self, g: torch.Tensor, batch_size: int = 1) -> None:
        """Folds in one flat batch-mean gradient of ``batch_size`` samples."""

    def update_many(self, rows: torch.Tensor, *, per_step: bool = False) -> None:
        """Folds in one step's per-sample gradient rows (n x d)."""

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """(F + damping I)^-1 v for the flat vector v."""

    def reset(self) -> None:
        """Back to no updates."""


#: the methods a curvature must have, in the order Curvature declares them (for messages)
REQUIRED = tuple(name for name, value in vars(Curvature).items() if callable(value) and not name.startswith("_"))
