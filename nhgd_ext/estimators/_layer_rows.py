"""Per-sample gradient rows of ``nn.Linear`` parameters from the step's own
backward pass.

For a linear layer the gradient of sample i's loss is delta_i a_i^T (its
output gradient times its input), and the hooks K-FAC uses record both in
the backward pass that computes the step's mean gradient anyway. The rows
then cost O(n d) to assemble, where autograd's batched backward over n
one-hot vectors costs n backward passes of the whole batch.

What the layers do not see is a term every sample shares (a regularizer on
the weights): it is restored as the difference between the step's mean
gradient and the mean of the layer rows, which is exact wherever the
parameters reach the per-sample losses only through their layers and
through terms that do not depend on the sample.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ..curvature._hooks import LinearRecorder, paused, release


class LayerRows:
    """Use :meth:`covering` to build one; ``None`` means some parameter is
    not the weight or bias of an ``nn.Linear`` in the model."""

    def __init__(self, layers: list[nn.Linear], params: Sequence[torch.Tensor]):
        self._recorders = [LinearRecorder(m, bias_column=False) for m in layers]
        # (recorder index, "weight" | "bias") per parameter, in the flat order
        where = {}
        for i, m in enumerate(layers):
            where[id(m.weight)] = (i, "weight")
            if m.bias is not None:
                where[id(m.bias)] = (i, "bias")
        self._parts = [where[id(p)] + (p.numel(),) for p in params]
        self._dim = sum(p.numel() for p in params)
        self._finalizer = weakref.finalize(self, release, self._recorders)

    @classmethod
    def covering(cls, model: nn.Module, params: Sequence[torch.Tensor]) -> LayerRows | None:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        owned = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
        if not layers or not all(id(p) in owned for p in params):
            return None
        wanted = {id(p) for p in params}
        return cls([m for m in layers if id(m.weight) in wanted or (m.bias is not None and id(m.bias) in wanted)],
                   params)

    def paused(self):
        """Backward passes inside (extra derivatives of the step) are not recorded."""
        return paused(self._recorders)

    def rows(self, mean_grad: torch.Tensor) -> torch.Tensor | None:
        """The n x d per-sample gradients of the last recorded backward pass
        (of a mean loss over n samples whose mean gradient is ``mean_grad``),
        or ``None`` if some layer recorded nothing (or disagrees on n)."""
        recorders = self._recorders
        if any(r.acts is None for r in recorders) or len({r.grads.shape[0] for r in recorders}) != 1:
            return None
        n = recorders[0].grads.shape[0]
        rows = torch.empty(n, self._dim, dtype=mean_grad.dtype, device=mean_grad.device)
        start = 0
        for index, part, size in self._parts:  # written in place: no pieces to concatenate
            r, target = recorders[index], rows[:, start:start + size]
            if part == "bias":
                target.copy_(r.grads)
            else:
                torch.mul(r.grads.unsqueeze(2), r.acts.unsqueeze(1), out=target.view(n, r.out_features, r.in_features))
            start += size
        for r in recorders:
            r.acts = r.grads = None  # one step's records feed one update
        return rows.add_(mean_grad - rows.mean(0))

    def close(self) -> None:
        self._finalizer()
