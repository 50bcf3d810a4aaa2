"""KFAC: a block-diagonal inverse Fisher with Kronecker-factored blocks for
``nn.Linear`` layers (DESIGN.md §2.3) and a diagonal block for every other
parameter.

For a linear layer with inputs a (n x (d_in + 1), a column of ones for the
bias) and per-sample output gradients delta (n x d_out), the Fisher block of
the row-major weight [W | b] is approximated by G (x) S with
S = E[a a^T] and G = E[delta delta^T], so the block inverse applied to a
weight-shaped V is G^-1 V S^-1. The inverses are kept current by
``ops.kfac_update_`` (all layers in grouped calls), and rebuilt exactly from
the kept factors when their damping has decayed, as in :class:`DenseEFIM`.

The hooks record what the last forward/backward pass saw; ``update`` folds
it in. Output gradients of a loss that is a mean over n samples are n times
smaller than per-sample ones: they are scaled back by n (the batch size the
hook saw), so the convention matches the per-sample Fisher.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import ops


class _Layer:
    def __init__(self, module: nn.Linear, dtype, device, root_damping: float):
        self.module = module
        self.has_bias = module.bias is not None
        d_in = module.in_features + (1 if self.has_bias else 0)
        d_out = module.out_features
        eye = lambda d: torch.eye(d, dtype=dtype, device=device)  # noqa: E731
        self.S, self.G = torch.zeros(d_in, d_in, dtype=dtype, device=device), torch.zeros(d_out, d_out, dtype=dtype, device=device)
        self.S_inv, self.G_inv = eye(d_in) / root_damping, eye(d_out) / root_damping
        self.acts = self.grads = None
        self.recording = True
        self.handles = [module.register_forward_hook(self._forward)]

    def _forward(self, module, inputs, output):
        if torch.is_grad_enabled() and output.requires_grad:
            a = inputs[0].detach().reshape(-1, module.in_features)
            if self.has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            # The inputs are recorded with the output gradient, by the backward
            # pass itself: a forward pass that is never backpropagated (a
            # logged validation loss) must not replace this step's inputs.
            output.register_hook(lambda grad: self._output_grad(grad, a))

    def _output_grad(self, grad: torch.Tensor, acts: torch.Tensor) -> None:
        if not self.recording:
            return
        delta = grad.detach().reshape(-1, self.module.out_features)
        self.acts = acts
        self.grads = delta * delta.shape[0]  # per-sample output gradients of a mean loss


class KFAC:
    """Per-sample information comes from the layer hooks, so per-sample
    gradient rows (``takes_rows``) are not asked for.

    Args:
        modules: a module (its ``nn.Linear`` submodules are used) or a list of ``nn.Linear``.
        params: the parameters the flat vectors of ``update``/``solve`` are made of,
            in order (default: all parameters of ``modules``); those not in a
            tracked linear layer get a diagonal block.
        beta: EMA factor of the factors; damping: lambda (each factor gets sqrt(lambda)).
    """

    def __init__(self, modules, *, params: Iterable[torch.Tensor] | None = None, beta: float = 0.95,
                 damping: float = 1e-3, refresh_below: float = 0.25, dtype=None, device=None):
        if isinstance(modules, nn.Module):
            linears = [m for m in modules.modules() if isinstance(m, nn.Linear)]
            default_params = list(modules.parameters())
        else:
            linears = list(modules)
            if not all(isinstance(m, nn.Linear) for m in linears):
                raise ValueError("KFAC: argument 'modules' must be an nn.Module or a list of nn.Linear")
            default_params = [p for m in linears for p in m.parameters()]
        if not linears:
            raise ValueError("KFAC: argument 'modules' holds no nn.Linear layer")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"KFAC: argument 'beta' must lie in (0, 1), got {beta!r}")
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"KFAC: argument 'damping' must be > 0, got {damping!r}")
        self.params = list(params) if params is not None else default_params
        first = linears[0].weight
        self.dtype, self.device = dtype or first.dtype, device or first.device
        self.beta, self.damping, self.refresh_below = float(beta), float(damping), float(refresh_below)
        self._root = math.sqrt(self.damping)
        self.layers = [_Layer(m, self.dtype, self.device, self._root) for m in linears]
        owner = {}
        for i, layer in enumerate(self.layers):
            owner[id(layer.module.weight)] = (i, "weight")
            if layer.has_bias:
                owner[id(layer.module.bias)] = (i, "bias")
        self._owner = [owner.get(id(p)) for p in self.params]
        self._sizes = [p.numel() for p in self.params]
        self.dim = sum(self._sizes)  # the length of the flat vectors of update and solve
        self._diag = [torch.zeros(p.numel(), dtype=self.dtype, device=self.device) if o is None else None
                      for p, o in zip(self.params, self._owner)]
        self.num_updates = 0
        self.num_refreshes = 0
        self.mu = self._root  # the damping each factor currently includes

    #: whether estimators should hand per-sample gradient rows to update_many
    takes_rows = False

    @contextlib.contextmanager
    def paused(self):
        """Backward passes inside do not replace the recorded output gradients
        (for extra derivatives an estimator takes of the same graph)."""
        for layer in self.layers:
            layer.recording = False
        try:
            yield
        finally:
            for layer in self.layers:
                layer.recording = True

    def remove_hooks(self) -> None:
        for layer in self.layers:
            for h in layer.handles:
                h.remove()

    def reset(self) -> None:
        for layer in self.layers:
            layer.S.zero_()
            layer.G.zero_()
            layer.S_inv.copy_(torch.eye(layer.S.shape[0], dtype=self.dtype, device=self.device) / self._root)
            layer.G_inv.copy_(torch.eye(layer.G.shape[0], dtype=self.dtype, device=self.device) / self._root)
        for diag in self._diag:
            if diag is not None:
                diag.zero_()
        self.num_updates = self.num_refreshes = 0
        self.mu = self._root

    # ---------------------------------------------------------------- updates

    def update(self, g: torch.Tensor, batch_size: int = 1, *, captures: Sequence[torch.Tensor] | None = None) -> None:
        """Folds in the last forward/backward pass of the tracked layers, and
        ``g`` (flat, scaled by sqrt(batch_size)) into the diagonal blocks.
        ``captures``: that pass's :meth:`take_captures`, taken earlier (a
        pipelined update carries them to the consumer); by default taken now."""
        captures = self._captures(captures)
        self._update_diagonal(g.detach().reshape(1, -1) * math.sqrt(batch_size))
        self._update_factors(captures)

    def update_many(self, rows: torch.Tensor, *, per_step: bool = True,
                    captures: Sequence[torch.Tensor] | None = None) -> None:
        """Per-sample gradient rows feed the diagonal blocks; the factors come
        from the hooks (or ``captures``). Both decay once per call
        (``per_step`` is accepted for the curvature protocol; K-FAC always
        works per step)."""
        captures = self._captures(captures)
        self._update_diagonal(rows.detach())
        self._update_factors(captures)

    def _captures(self, given: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """The captures to fold in, checked before any state changes."""
        if given is None:
            return self.take_captures()
        given = list(given)
        if len(given) != 2 * len(self.layers) or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in given):
            raise ValueError(f"KFAC.update: argument 'captures' must hold {2 * len(self.layers)} 2-D tensors "
                             f"(inputs and output gradients of {len(self.layers)} layers)")
        return given

    def take_captures(self) -> list[torch.Tensor]:
        """What the hooks recorded of the last pass, [inputs, output gradients]
        per tracked layer in order, taken out of the layers (the next update
        needs a new pass). Raises, changing nothing, if a layer saw none."""
        if any(layer.acts is None or layer.grads is None for layer in self.layers):
            raise RuntimeError("KFAC.update: a tracked layer saw no forward and backward pass since the last update")
        captures = []
        for layer in self.layers:
            captures += [layer.acts, layer.grads]
            layer.acts = layer.grads = None
        return captures

    def _update_diagonal(self, rows: torch.Tensor) -> None:
        start = 0
        for diag, size in zip(self._diag, self._sizes):
            if diag is not None:
                part = rows[:, start:start + size].to(self.dtype)
                diag.mul_(self.beta).add_(part.pow(2).mean(0), alpha=1 - self.beta)
            start += size

    def _update_factors(self, captures: Sequence[torch.Tensor]) -> None:
        layers = self.layers
        acts = [t.to(device=self.device, dtype=self.dtype) for t in captures[0::2]]
        grads = [t.to(device=self.device, dtype=self.dtype) for t in captures[1::2]]
        a, b = self.beta, 1 - self.beta
        ops.kfac_update_([layer.S_inv for layer in layers], [layer.G_inv for layer in layers], acts, grads, a, b)
        for layer, x, d in zip(layers, acts, grads):
            layer.S.mul_(a).addmm_(x.mT, x, alpha=b / x.shape[0])
            layer.G.mul_(a).addmm_(d.mT, d, alpha=b / d.shape[0])
        self.num_updates += 1
        self.mu *= a
        if self.mu < self.refresh_below * self._root:
            self._refresh()

    def _refresh(self) -> None:
        """Each inverse <- (factor + sqrt(damping) I)^-1 exactly (float64 Cholesky)."""
        for layer in self.layers:
            for factor, inverse in ((layer.S, layer.S_inv), (layer.G, layer.G_inv)):
                D = factor.to(torch.float64)
                D = 0.5 * (D + D.mT)
                D.diagonal().add_(self._root)
                inv = torch.cholesky_inverse(torch.linalg.cholesky(D)).contiguous()  # column-major from LAPACK
                inverse.copy_(ops.symmetrize_(inv))  # exactly symmetric
        self.mu = self._root
        self.num_refreshes += 1

    # ----------------------------------------------------------------- solve

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """The block-diagonal inverse applied to the flat vector v."""
        total = sum(self._sizes)
        if v.dim() != 1 or v.numel() != total:
            raise ValueError(f"KFAC.solve: argument 'v' must be a vector of {total} entries, got shape {list(v.shape)}")
        pieces = list(torch.split(v.to(self.dtype), self._sizes))
        out = [None] * len(pieces)
        blocks = {}
        for k, (piece, o) in enumerate(zip(pieces, self._owner)):
            if o is None:
                out[k] = piece / (self._diag[k] + self.damping)
            else:
                blocks.setdefault(o[0], {})[o[1]] = (k, piece)
        order = sorted(blocks)
        V = []
        for i in order:
            layer = self.layers[i]
            w = blocks[i]["weight"][1]
            parts = [w.view(layer.module.out_features, layer.module.in_features)]
            if layer.has_bias:
                if "bias" not in blocks[i]:
                    raise ValueError("KFAC.solve: a tracked layer's bias is not among the parameters")
                parts.append(blocks[i]["bias"][1].view(-1, 1))
            V.append(torch.cat(parts, dim=1))
        solved = ops.kfac_apply([self.layers[i].S_inv for i in order], [self.layers[i].G_inv for i in order], V)
        for i, X in zip(order, solved):
            layer = self.layers[i]
            k_w = blocks[i]["weight"][0]
            out[k_w] = X[:, :layer.module.in_features].reshape(-1)
            if layer.has_bias:
                out[blocks[i]["bias"][0]] = X[:, -1].reshape(-1)
        return torch.cat(out)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "layers": [{k: getattr(layer, k).clone() for k in ("S", "G", "S_inv", "G_inv")} for layer in self.layers],
            "diag": [None if d is None else d.clone() for d in self._diag],
            "num_updates": self.num_updates, "num_refreshes": self.num_refreshes, "mu": self.mu,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["layers"]) != len(self.layers) or len(state["diag"]) != len(self._diag):
            raise ValueError("KFAC.load_state_dict: the state was saved for other layers or parameters")
        for layer, saved in zip(self.layers, state["layers"]):
            for k, t in saved.items():
                getattr(layer, k).copy_(t)
        for diag, saved in zip(self._diag, state["diag"]):
            if diag is not None:
                diag.copy_(saved)
        self.num_updates, self.num_refreshes, self.mu = state["num_updates"], state["num_refreshes"], state["mu"]
