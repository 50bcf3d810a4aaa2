"""What the PINN problems share: tanh networks initialised from the problem's
generator, a weighted set of collocation point groups (interior, boundary,
initial...) with stratified mini-batches, and the pretraining of the state
network for the initial control.

The PINN loss is a weighted sum of per-group means, sum_g w_g mean_g(r^2). A
residual of group g is scaled by sqrt(2 w_g n / n_g) (n points in the batch,
n_g of them in group g) into a row rho, so the loss is the plain mean of
rho^2 / 2 and ``reduction="none"`` gives the rho^2 / 2: a point of a small
group (the two boundary points of a 1-D problem) carries its group's share
of the loss, not the share of one interior point.

rho^2 / 2 is the negative log-likelihood of a unit-variance Gaussian with
mean rho and target 0, so the rows (``inner_residuals``) are the model
outputs a sampled Fisher needs (``NHGD(fisher="sampled",
likelihood="gaussian")``, ``outputs=rho``): its expectation, grad rho grad
rho^T, is the Gauss-Newton part of the Hessian. The empirical Fisher of a
PINN, rho^2 grad rho grad rho^T, vanishes with the residuals instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .base import BilevelProblem, check_count

#: indices into each point group, in the order of ``CollocationSet.groups``
CollocationBatch = tuple[torch.Tensor, ...]


def check_layers(name: str, layers, *, inputs: int, outputs: int) -> tuple[int, ...]:
    """The widths of an MLP, ``(inputs, hidden..., outputs)``, or ValueError naming ``name``."""
    try:
        widths = tuple(layers)
    except TypeError:
        raise ValueError(f"argument '{name}' must be a list of layer widths, got {layers!r}") from None
    if len(widths) < 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"argument '{name}' must hold at least two positive integers, got {layers!r}")
    if widths[0] != inputs or widths[-1] != outputs:
        raise ValueError(f"argument '{name}' must start with {inputs} and end with {outputs}, got {layers!r}")
    return widths


def tanh_mlp(widths: Sequence[int], generator: torch.Generator, *, device, dtype) -> nn.Sequential:
    """Linear layers with tanh between them, Glorot-normal weights (as the
    paper's reference code, DeepXDE, initialises them) and zero biases, drawn
    from ``generator`` so that the seed alone fixes the network."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            std = math.sqrt(2.0 / (fan_in + fan_out))
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64) * std)
            linear.bias.zero_()
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def derivative(output: torch.Tensor, points: torch.Tensor, coordinate: int) -> torch.Tensor:
    """d output_i / d points_i[coordinate] for every row i, keeping the graph
    (the loss built from it is differentiated twice more, in theta and in v).
    Summing first is exact because row i of a pointwise network depends on
    row i of the input only."""
    (grad,) = torch.autograd.grad(output.sum(), points, create_graph=True)
    return grad[:, coordinate]


def seeds_from(generator: torch.Generator, count: int) -> list[int]:
    return [int(s) for s in torch.randint(0, 2**31 - 1, (count,), generator=generator)]


def sobol(dimension: int, count: int, seed: int) -> torch.Tensor:
    """``count`` scrambled Sobol points in [0, 1)^dimension (float64, CPU)."""
    return torch.quasirandom.SobolEngine(dimension, scramble=True, seed=seed).draw(count, dtype=torch.float64)


class CollocationSet:
    """Named groups of points with their weights in the loss, and stratified
    mini-batches over them (each group keeps its share of the batch, so every
    group's mean is estimated without bias).

    Args:
        groups: name -> points (n_g x dim), already on the problem's device.
        weights: name -> w_g.
        batch_size: points per mini-batch (None, or at least all points: every
            batch is the whole set).
    """

    def __init__(self, groups: dict[str, torch.Tensor], weights: dict[str, float], batch_size: int | None):
        self.names = list(groups)
        self.groups = [groups[name] for name in self.names]
        self.weights = [float(weights[name]) for name in self.names]
        sizes = [len(points) for points in self.groups]
        total = sum(sizes)
        if batch_size is not None:
            check_count("batch_size", batch_size, minimum=len(sizes))
        self.batch_size = None if batch_size is None or batch_size >= total else batch_size
        self.batch_counts = None if self.batch_size is None else _allocate(self.batch_size, sizes)

    def __len__(self) -> int:
        return sum(len(points) for points in self.groups)

    def sample(self, generator: torch.Generator) -> CollocationBatch | None:
        if self.batch_counts is None:
            return None
        return tuple(torch.randperm(len(points), generator=generator)[:count].to(points.device)
                     for points, count in zip(self.groups, self.batch_counts))

    def select(self, batch: CollocationBatch | None) -> list[torch.Tensor]:
        if batch is None:
            return list(self.groups)
        if len(batch) != len(self.groups):
            raise ValueError(f"argument 'batch' must hold {len(self.groups)} index tensors ({', '.join(self.names)})")
        return [points[index.to(points.device)] for points, index in zip(self.groups, batch)]

    def rows(self, residuals: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-point rows rho of one batch, residual_g * sqrt(2 w_g n / n_g):
        mean(rho^2 / 2) = sum_g w_g mean(residual_g^2), the loss."""
        total = sum(r.numel() for r in residuals)
        return torch.cat([r.reshape(-1) * math.sqrt(2 * w * total / r.numel()) for w, r in zip(self.weights, residuals)])


class ResidualProblem(BilevelProblem):
    """A PINN problem: subclasses give ``inner_residuals(batch)``, the rows rho;
    the inner loss is the mean of rho^2 / 2 and its outputs are the rows."""

    # K-FAC's factors are the layers' inputs and output gradients in one
    # forward pass; a PDE residual also reaches the weights through the
    # network's input derivatives (the forward pass's Taylor terms), which
    # those factors do not see: the Kronecker product is not this loss's
    # curvature, and the solve blew up on both PINNs (objective 2e8, or a
    # non-positive-definite factor).
    unsupported_methods = {
        "nhgd-kfac": "K-FAC's Kronecker factors see a layer's forward inputs only, and a PDE residual reaches "
                     "the weights through the network's input derivatives too; use nhgd-sampled "
                     "(Gauss-Newton rows) or nhgd"}

    def inner_residuals(self, batch: CollocationBatch | None = None) -> torch.Tensor:
        raise NotImplementedError

    def inner_loss_and_outputs(self, batch: CollocationBatch | None = None, *,
                               reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.inner_residuals(batch)
        return reduce_rows(rows, reduction), rows

    def inner_loss(self, batch: CollocationBatch | None = None, *, reduction: str = "mean") -> torch.Tensor:
        return reduce_rows(self.inner_residuals(batch), reduction)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The PINN loss from its rows: the mean of rho^2 / 2, or the rho^2 / 2 themselves."""
    if reduction == "mean":
        return 0.5 * rows.square().mean()
    if reduction == "none":
        return 0.5 * rows.square()
    raise ValueError(f"argument 'reduction' must be 'mean' or 'none', got {reduction!r}")


def _allocate(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over groups in proportion to their sizes (largest
    remainders), at least one point per group and at most the group."""
    quotas = [total * n / sum(sizes) for n in sizes]
    counts = [min(n, max(1, math.floor(q))) for n, q in zip(sizes, quotas)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: quotas[i] - counts[i], reverse=True)
    while sum(counts) < total:
        i = next(i for i in by_remainder if counts[i] < sizes[i])
        counts[i] += 1
        by_remainder.remove(i)
        by_remainder.append(i)
    while sum(counts) > total:
        counts[max(range(len(sizes)), key=lambda i: counts[i])] -= 1
    return counts


def curvature_step_options(step: float, nhgd: dict[str, Any], sampled: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-method options of a PINN problem: every Neumann-type scale and
    every step on the linear system set to ``step`` (it must stay below
    2 / lambda_max of the inner Hessian), NHGD's own (``sampled`` on top for
    ``nhgd-sampled``). TTSA gets a tenth:
    its single random term of the series, scaled by the number of terms,
    overshoots the stiff directions tenfold when it is the first one, and at
    the full step that threw v off on the Poisson problem."""
    return {"neumann10": {"scale": step}, "neumann40": {"scale": step}, "stocbio": {"scale": step},
            "ttsa": {"scale": step / 10}, "amigo": {"lr": step}, "soba": {"lr": step}, "aid": {"eta": step},
            # batch means, not per-point rows: a per-point gradient through the
            # input derivatives costs a backward pass each (88 s per outer
            # step on the small heat problem, against 0.4 s for CG10)
            "nhgd": {"per_sample": False, **nhgd},
            # the residual rows as unit-variance Gaussian means: the Fisher's
            # expectation is the Gauss-Newton matrix, whatever the residuals' size
            "nhgd-sampled": {"per_sample": False, "likelihood": "gaussian", **nhgd, **sampled}}


def pretrain(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *, steps: int, lr: float) -> None:
    """``steps`` full-batch Adam steps on ``loss`` in ``params`` (the state
    network for the initial control; Adam, as the reference code pretrains)."""
    if steps == 0:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss(), params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    for p in params:
        p.grad = None
