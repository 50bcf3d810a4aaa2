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

import warnings
from collections.abc import Callable, Sequence

import torch

from .._data_parallel import DataParallel
from .._finite import refuse_nonfinite

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


#: what a refused hypergradient leaves as it was (the text of its NonFiniteError)
UNCHANGED = "the outer parameters' .grad and the estimator's state are unchanged"


def _union_of(shared: DataParallel, observations: dict) -> dict:
    """A step's observations as one process on the union of the ranks'
    batches would make them: per-sample rows gathered, means averaged."""
    out = dict(observations)
    if out.get("rows") is not None:
        out["rows"] = shared.rows(out["rows"])
    for name in ("cross", "fisher_grad"):
        if out.get(name) is not None:
            out[name] = shared.mean([out[name]])[0]
    if out.get("fisher_batch") is not None:
        out["fisher_batch"] *= shared.world
    return out


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

    Subclasses implement :meth:`_hypergradient` (and name in
    ``_outer_step_attributes`` what it rebinds), and :meth:`observe` when
    they learn from the inner gradients. A NaN or infinity anywhere raises
    :class:`NonFiniteError` before any state changes, for every estimator."""

    def __init__(self, inner_params, outer_params, *, inner_lr: float = 0.1, process_group=None):
        """``process_group``: the group of a data-parallel inner training
        (e.g. the model's ``DistributedDataParallel``; ``"world"`` for the
        default group): gradients, Hessian-vector and mixed products and
        outer gradients are averaged over its ranks and curvature rows
        gathered, so that each rank holds the state and hypergradient of one
        process on the union of their (equal-sized) batches."""
        self.inner_params = _param_list("inner_params", inner_params)
        self.outer_params = _param_list("outer_params", outer_params)
        if not inner_lr > 0:
            raise ValueError(f"argument 'inner_lr' must be > 0, got {inner_lr!r}")
        self.inner_lr = float(inner_lr)
        self._data_parallel = DataParallel.of(process_group)

    # -------------------------------------------------------------- inner loop

    def inner_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None, *,
                   batch_size: int | None = None, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """One inner step on ``loss``: writes theta.grad, feeds the estimator,
        steps theta. Returns the detached mean loss.

        ``loss`` is best given per sample (a 1-D tensor, ``reduction="none"``):
        the batch size is then its length, and ``batch_size`` may be left out
        (a different one is refused). A scalar is taken as the mean over
        ``batch_size`` samples (default 1; NHGD warns when it is not given,
        since its Fisher is scaled by it). A loss of shape [1] is ambiguous
        and taken as a scalar, with a warning.

        ``outputs`` are the model's outputs (logits or means, one row per
        sample) with their graph, for estimators that sample targets from the
        model (``NHGD(fisher="sampled")``); the others ignore them. Their
        row count must match the batch size.

        A NaN or infinite loss or gradient raises :class:`NonFiniteError`
        before anything changes (theta, its .grad, the estimator's state)."""
        if not isinstance(loss, torch.Tensor) or loss.dim() > 1 or loss.numel() == 0:
            raise ValueError("inner_step: argument 'loss' must be a scalar or a non-empty 1-D tensor of "
                             "per-sample losses")
        if outputs is not None and not isinstance(outputs, torch.Tensor):
            raise ValueError(f"inner_step: argument 'outputs' must be a tensor or None, got {type(outputs).__name__}")
        loss, batch = self._batch_of(loss, batch_size, outputs)
        per_sample = loss.dim() == 1
        mean = loss.mean() if per_sample else loss
        grads = grads_or_zeros(mean, self.inner_params, retain_graph=self._differentiates_again(per_sample, outputs))
        shared = self._data_parallel
        if shared is not None:  # every rank steps on the union's mean gradient
            shared.check_equal_batches(batch, mean.device)
            grads, batch = shared.mean(grads), batch * shared.world
        refuse_nonfinite("inner_step", [mean.detach(), *grads],
                          ["the inner loss"] + [f"the gradient of inner parameter {i}" for i in range(len(grads))],
                          "theta, its .grad and the estimator's state are unchanged")
        extras = self._observations(loss, mean, outputs, grads)
        if shared is not None:
            extras = _union_of(shared, extras)
        self._step_size = optimizer.param_groups[0].get("lr", self.inner_lr) if optimizer is not None else self.inner_lr
        self.observe(grads, batch_size=batch, **extras)
        for p, g in zip(self.inner_params, grads):
            p.grad = g.detach()
        if optimizer is not None:
            optimizer.step()
        else:
            with torch.no_grad():
                for p, g in zip(self.inner_params, grads):
                    p.sub_(g, alpha=self.inner_lr)
        return mean.detach()

    #: whether the estimator's state depends on the batch size of a scalar loss (NHGD's Fisher scale)
    uses_batch_size = False

    def _batch_of(self, loss: torch.Tensor, batch_size, outputs: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """(the loss, a scalar unless it is per sample; the batch size), checked
        against each other and against the outputs' rows."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"inner_step: argument 'batch_size' must be a positive integer, got {batch_size!r}")
        rows = outputs.shape[0] if outputs is not None and outputs.dim() > 0 else None
        if loss.dim() == 1 and loss.numel() > 1:
            batch, source = loss.numel(), "as many as the per-sample losses"
            if batch_size is not None and batch_size != batch:
                raise ValueError(f"inner_step: argument 'batch_size' ({batch_size}) contradicts the {batch} "
                                 f"per-sample losses given; leave it out for a 1-D loss")
        else:
            shape_one = loss.dim() == 1
            if shape_one and batch_size is None and rows is None:
                warnings.warn("inner_step: a loss of shape [1] is taken as a scalar (a mean over 'batch_size' "
                              "samples); give a 0-d mean with batch_size=..., or the per-sample losses "
                              "(reduction='none')", UserWarning, stacklevel=3)
            loss = loss.reshape(())
            if batch_size is None and rows is not None:
                batch, source = rows, "as many as the outputs' rows"
            else:
                batch, source = batch_size or 1, "argument 'batch_size'"
                if batch_size is None and self.uses_batch_size and not shape_one:  # one warning is enough
                    warnings.warn(f"{type(self).__name__}.inner_step: a scalar loss without 'batch_size' is taken "
                                  "as one sample's loss; pass batch_size=<samples in the batch> (the length of "
                                  "the inputs, not of the (inputs, targets) pair), or the per-sample losses "
                                  "(reduction='none')", UserWarning, stacklevel=3)
        if rows is not None and rows != batch:
            raise ValueError(f"inner_step: argument 'outputs' has {rows} rows, but the batch holds {batch} samples "
                             f"({source})")
        return loss, batch

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
        """grad Phi, one tensor per outer parameter. A NaN or infinity in the
        outer loss, in a loss ``inner_closure`` returns or in the result
        raises :class:`NonFiniteError`, with the estimator's state as it was
        before the call (the same policy for every estimator)."""
        refuse_nonfinite("hypergradient", [outer_loss.detach()], ["the outer loss"], UNCHANGED)

        def checked_closure():
            loss = inner_closure()
            refuse_nonfinite("hypergradient", [loss.detach()], ["a loss inner_closure returned"], UNCHANGED)
            return loss

        kept = self._outer_state()
        try:
            result = tuple(self._hypergradient(outer_loss, checked_closure))
            refuse_nonfinite("hypergradient", result, ["the hypergradient"] * len(result), UNCHANGED)
            # a finite result from a non-finite kept variable (SOBA's z) would poison the next step
            carried = [t for t in (getattr(self, name, None) for name in self._outer_step_attributes)
                       if isinstance(t, torch.Tensor)]
            refuse_nonfinite("hypergradient", carried, ["the linear-system variable kept for the next step"]
                              * len(carried), UNCHANGED)
        except BaseException:
            self._restore_outer_state(kept)
            raise
        self._outer_step_done()
        return result

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        """What a subclass computes; :meth:`hypergradient` wraps it in the failure policy."""
        raise NotImplementedError

    #: attributes :meth:`_hypergradient` may rebind (never change in place): kept and put back on a failure
    _outer_step_attributes: tuple[str, ...] = ()

    def _outer_state(self) -> dict:
        return {name: getattr(self, name, None) for name in self._outer_step_attributes}

    def _restore_outer_state(self, kept: dict) -> None:
        for name, value in kept.items():
            setattr(self, name, value)

    def _outer_step_done(self) -> None:
        """State changes that must wait until the hypergradient is known to be finite."""

    def backward(self, outer_loss: torch.Tensor, inner_closure: Closure) -> None:
        """Adds the hypergradient to ``v.grad`` of every outer parameter (left
        untouched where :meth:`hypergradient` raises)."""
        for v, h in zip(self.outer_params, self.hypergradient(outer_loss, inner_closure)):
            v.grad = h.detach().clone() if v.grad is None else v.grad + h.detach()

    def outer_gradients(self, outer_loss: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(grad_v f as a list, grad_theta f flattened)."""
        found = self._shared_mean(grads_or_zeros(outer_loss, self.outer_params + self.inner_params))
        k = len(self.outer_params)
        return [g.detach() for g in found[:k]], flat(found[k:]).detach()

    def inner_gradient(self, inner_loss: torch.Tensor) -> torch.Tensor:
        """grad_theta l, flattened, with its graph: one graph serves every
        Hessian-vector and mixed product taken from it."""
        return flat(torch.autograd.grad(inner_loss, self.inner_params, create_graph=True))

    def hvp(self, g_theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """H w = d/dtheta <grad_theta l, w>."""
        return flat(self._shared_mean(grads_or_zeros((g_theta * w).sum(), self.inner_params,
                                                     retain_graph=True))).detach()

    def mixed_product(self, g_theta: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """(d2_{v theta} l) w = d/dv <grad_theta l, w>, one tensor per outer parameter."""
        return [g.detach() for g in self._shared_mean(grads_or_zeros((g_theta * w).sum(), self.outer_params,
                                                                      retain_graph=True))]

    def _shared_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over a data-parallel group's ranks (the tensors themselves without one)."""
        return tensors if self._data_parallel is None else self._data_parallel.mean(tensors)

    def combine(self, f_v: list[torch.Tensor], cross: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(grad_v f - cross) per outer parameter: the hypergradient from its two parts."""
        return tuple(a - b for a, b in zip(f_v, cross))

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """What the estimator carries between calls (tensors cloned), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""
        pass

    def reset(self) -> None:
        """Forgets everything learnt: back to the state just after construction."""
        pass


class KeepsSolution(HypergradientEstimator):
    """An estimator that keeps its linear-system variable (w ~ H^-1 grad_theta f)
    from one outer step to the next, as a warm start."""

    _kept: torch.Tensor | None = None
    _outer_step_attributes = ("_kept",)

    def kept_or_zeros(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like) if self._kept is None else self._kept

    def state_dict(self) -> dict:
        return {"w": None if self._kept is None else self._kept.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._kept = None if state["w"] is None else state["w"].clone()

    def reset(self) -> None:
        self._kept = None
