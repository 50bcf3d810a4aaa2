"""The protocol every hypergradient estimator follows (docs/design.md §3.3).

    est = Method(inner_params, outer_params, **options)
    for t in range(T):
        est.inner_step(inner_loss(batch), optimizer)          # steps theta, feeds the estimator
    est.backward(outer_loss(v, theta), lambda: inner_loss(fresh_batch()))   # adds to v.grad

The hypergradient of Phi(v) = f(v, theta*(v)) is
    grad Phi = grad_v f - (d2_{theta v} l)^T w,   w ~ H^-1 grad_theta f,
and the methods differ in how they get w (and, for the single-loop ones, in
what they keep between outer steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Closure = Callable[[], torch.Tensor]


def _param_list(name: str, params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params) if isinstance(params, Sequence) or hasattr(params, "__iter__") else None
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError(f"argument '{name}' must be a non-empty list of tensors")
    if not all(p.requires_grad for p in params):
        raise ValueError(f"argument '{name}' must hold tensors with requires_grad=True")
    return params


def grads_or_zeros(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """d output / d params, with zeros for parameters the output does not reach."""
    found = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in like:
        out.append(vector[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out


class HypergradientEstimator:
    """Base class: the inner step, the feeding and the accumulation into .grad.

    Subclasses implement :meth:`hypergradient`, and :meth:`observe` when they
    learn from the inner gradients."""

    def __init__(self, inner_params, outer_params, *, inner_lr: float = 0.1):
        self.inner_params = _param_list("inner_params", inner_params)
        self.outer_params = _param_list("outer_params", outer_params)
        if not inner_lr > 0:
            raise ValueError(f"argument 'inner_lr' must be > 0, got {inner_lr!r}")
        self.inner_lr = float(inner_lr)

    # -------------------------------------------------------------- inner loop

    def inner_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None, *,
                   batch_size: int = 1, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """One inner step on ``loss`` (a scalar mean over ``batch_size`` samples,
        or a 1-D tensor of per-sample losses): writes theta.grad, feeds the
        estimator, steps theta. ``outputs`` are the model's outputs (logits or
        means, one row per sample) with their graph, for estimators that sample
        targets from the model (``NHGD(fisher="sampled")``); the others ignore
        them. Returns the detached mean loss."""
        if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
            raise ValueError("inner_step: argument 'loss' must be a scalar or a 1-D tensor of per-sample losses")
        if outputs is not None and not isinstance(outputs, torch.Tensor):
            raise ValueError(f"inner_step: argument 'outputs' must be a tensor or None, got {type(outputs).__name__}")
        per_sample = loss.dim() == 1
        mean = loss.mean() if per_sample else loss
        batch = loss.numel() if per_sample else batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"inner_step: argument 'batch_size' must be a positive integer, got {batch!r}")
        grads = grads_or_zeros(mean, self.inner_params, retain_graph=self._differentiates_again(per_sample, outputs))
        extras = self._observations(loss, mean, outputs, grads)
        for p, g in zip(self.inner_params, grads):
            p.grad = g.detach()
        self._step_size = optimizer.param_groups[0].get("lr", self.inner_lr) if optimizer is not None else self.inner_lr
        self.observe(grads, batch_size=batch, **extras)
        if optimizer is not None:
            optimizer.step()
        else:
            with torch.no_grad():
                for p, g in zip(self.inner_params, grads):
                    p.sub_(g, alpha=self.inner_lr)
        return mean.detach()

    #: whether observe() uses per-sample gradient rows when inner_step gets a 1-D loss
    wants_per_sample_rows = False

    def _differentiates_again(self, per_sample: bool, outputs: torch.Tensor | None) -> bool:
        """Whether :meth:`_observations` takes more derivatives of the step's loss graph."""
        return per_sample and self.wants_per_sample_rows

    def _observations(self, loss: torch.Tensor, mean: torch.Tensor, outputs: torch.Tensor | None,
                      grads: Sequence[torch.Tensor]) -> dict:
        """Keyword arguments for :meth:`observe` beyond the gradients, taken
        from the step's loss graph (whose mean gradient is ``grads``) before
        theta moves."""
        if loss.dim() == 1 and self.wants_per_sample_rows:
            return {"rows": self._per_sample_rows(loss)}
        return {}

    def _per_sample_rows(self, vector: torch.Tensor, *, retain_graph: bool | None = None) -> torch.Tensor:
        """d vector_i / d theta for every entry, flattened (n x d): per-sample
        gradients of a 1-D loss, or the rows of a Jacobian. One batched
        backward pass; zeros for parameters the vector does not reach."""
        n = vector.numel()
        eye = torch.eye(n, dtype=vector.dtype, device=vector.device)
        found = torch.autograd.grad(vector, self.inner_params, grad_outputs=eye, is_grads_batched=True,
                                    allow_unused=True, retain_graph=retain_graph)
        return torch.cat([torch.zeros(n, p.numel(), dtype=p.dtype, device=p.device) if g is None
                          else g.reshape(n, -1) for p, g in zip(self.inner_params, found)], dim=1).detach()

    def observe(self, grads: Sequence[torch.Tensor], *, batch_size: int = 1, **observations) -> None:
        """Feeds the gradients of one inner step (for loops that step theta
        themselves). Estimators that learn more from a step take it as keyword
        arguments: ``rows`` (per-sample gradients, n x d), ``cross`` (the
        step's mixed derivative, NHGD's ``cross="trajectory"``)."""

    # ----------------------------------------------------------- outer level

    def hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def backward(self, outer_loss: torch.Tensor, inner_closure: Closure) -> None:
        """Adds the hypergradient to ``v.grad`` of every outer parameter."""
        for v, h in zip(self.outer_params, self.hypergradient(outer_loss, inner_closure)):
            v.grad = h.detach().clone() if v.grad is None else v.grad + h.detach()

    def outer_gradients(self, outer_loss: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(grad_v f as a list, grad_theta f flattened)."""
        found = grads_or_zeros(outer_loss, self.outer_params + self.inner_params)
        k = len(self.outer_params)
        return [g.detach() for g in found[:k]], flat(found[k:]).detach()

    def inner_gradient(self, inner_loss: torch.Tensor) -> torch.Tensor:
        """grad_theta l, flattened, with its graph: one graph serves every
        Hessian-vector and cross product taken from it."""
        return flat(torch.autograd.grad(inner_loss, self.inner_params, create_graph=True))

    def hvp(self, g_theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """H w = d/dtheta <grad_theta l, w>."""
        return flat(grads_or_zeros((g_theta * w).sum(), self.inner_params, retain_graph=True)).detach()

    def cross(self, g_theta: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """(d2_{v theta} l) w = d/dv <grad_theta l, w>, one tensor per outer parameter."""
        return [g.detach() for g in grads_or_zeros((g_theta * w).sum(), self.outer_params, retain_graph=True)]

    def combine(self, f_v: list[torch.Tensor], cross: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(a - b for a, b in zip(f_v, cross))

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        pass


class KeepsSolution(HypergradientEstimator):
    """An estimator that keeps its linear-system variable (w ~ H^-1 grad_theta f)
    from one outer step to the next, as a warm start."""

    _kept: torch.Tensor | None = None

    def kept_or_zeros(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like) if self._kept is None else self._kept

    def state_dict(self) -> dict:
        return {"w": None if self._kept is None else self._kept.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._kept = None if state["w"] is None else state["w"].clone()

    def reset(self) -> None:
        self._kept = None
