"""Natural Hypergradient Descent (paper Algorithm 1): H^-1 replaced by the
inverse empirical Fisher, kept current from the gradients the inner loop
already computes, so the hypergradient costs one solve with the kept inverse
plus ``cross_batches`` cross-derivative products."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..curvature import DenseEFIM
from .base import Closure, HypergradientEstimator, flat


class NHGD(HypergradientEstimator):
    """Args:
        curvature: ``"dense"`` (a :class:`DenseEFIM` over all inner parameters)
            or an object with ``update(g, batch_size)``, ``update_many(rows)``,
            ``solve(v)`` and ``reset()``.
        beta, damping: of the dense curvature (``beta=None``: running average).
        cross_batches: M, the closure calls averaged for the cross term.
        warm_start: keep the curvature across outer steps (else start afresh
            after every hypergradient).
    """

    wants_per_sample_rows = True

    def __init__(self, inner_params, outer_params, *, curvature="dense", beta: float | None = None,
                 damping: float = 1e-3, cross_batches: int = 1, warm_start: bool = True, inner_lr: float = 0.1):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr)
        if isinstance(cross_batches, bool) or not isinstance(cross_batches, int) or cross_batches < 1:
            raise ValueError(f"NHGD: argument 'cross_batches' must be a positive integer, got {cross_batches!r}")
        if curvature == "dense":
            first = self.inner_params[0]
            dim = sum(p.numel() for p in self.inner_params)
            curvature = DenseEFIM(dim, beta=beta, damping=damping, dtype=first.dtype, device=first.device)
        elif not all(hasattr(curvature, m) for m in ("update", "update_many", "solve", "reset")):
            raise ValueError("NHGD: argument 'curvature' must be 'dense' or an object with "
                             "update, update_many, solve and reset")
        self.curvature = curvature
        self.cross_batches, self.warm_start = cross_batches, warm_start

    def observe(self, grads: Sequence[torch.Tensor], *, batch_size: int = 1, rows: torch.Tensor | None = None) -> None:
        if rows is not None:
            self.curvature.update_many(rows)
        else:
            self.curvature.update(flat(grads), batch_size=batch_size)

    def hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        w = self.curvature.solve(f_theta)
        cross = None
        for _ in range(self.cross_batches):
            part = self.cross(self.inner_gradient(inner_closure()), w)
            cross = part if cross is None else [c + p for c, p in zip(cross, part)]
        if not self.warm_start:
            self.curvature.reset()
        return self.combine(f_v, [c / self.cross_batches for c in cross])

    def state_dict(self) -> dict:
        return {"curvature": self.curvature.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.curvature.load_state_dict(state["curvature"])

    def reset(self) -> None:
        self.curvature.reset()
