"""Natural Hypergradient Descent (paper Algorithm 1): H^-1 replaced by the
inverse Fisher, kept current from the gradients the inner loop already
computes, so the hypergradient costs one solve with the kept inverse plus
the cross-derivative products.

Two sources for the Fisher:

* ``fisher="empirical"`` (the paper's): the inner loss's own gradients. It
  equals the Hessian at the optimum of a well-specified model only.
* ``fisher="sampled"``: gradients of the model's likelihood at targets drawn
  from the model's own predictive distribution (``inner_step(...,
  outputs=...)`` hands over the logits or means). For softmax and Gaussian
  outputs its expectation is the Gauss-Newton matrix, which is the Hessian of
  the likelihood term wherever the model is linear in theta in its outputs,
  misspecified or not. It costs one more backward pass per step and sees the
  likelihood alone: a regularizer's curvature (2 lambda for lambda |theta|^2)
  belongs in ``damping``.

Two forms of the cross term (d2_{v theta} l)^T w:

* ``cross="end"``: ``cross_batches`` closure calls at the end of the inner
  loop, one double-backward of their mean; no dense matrix.
* ``cross="trajectory"`` (paper Eq. 3.3): the dense d_v x d_theta mixed
  derivative averaged over the inner steps of the current outer step
  (``ops.running_average_``); one batched double-backward per step, so only
  for a small outer dimension.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._data_parallel import group_of
from .._finite import refuse_nonfinite
from ..curvature import KFAC, Curvature, DenseEFIM, protocol
from ._layer_rows import LayerRows
from .base import UNCHANGED, Closure, HypergradientEstimator, flat, grads_or_zeros, unflat


class NHGD(HypergradientEstimator):
    """Args:
        curvature: ``"dense"`` (a :class:`DenseEFIM` over all inner
            parameters), ``"kfac"`` (a :class:`KFAC` over the ``nn.Linear``
            and ``nn.Conv2d`` layers of ``modules``), or an object with ``update(g, batch_size)``,
            ``update_many(rows, per_step=True)`` (one step's per-sample rows:
            an EMA decays once), ``solve(v)`` and ``reset()``.
        beta: EMA factor of the curvature per inner step (``None``: the
            running average of Eq. 3.2 for dense, 0.95 for K-FAC).
        damping: lambda added to the Fisher.
        fisher: ``"empirical"`` or ``"sampled"`` (then pass ``outputs`` to
            ``inner_step``); likelihood: ``"categorical"`` (outputs are logits)
            or ``"gaussian"`` (outputs are means, unit variance).
        cross: ``"end"`` or ``"trajectory"``; cross_batches: M, the closure
            calls averaged for ``cross="end"``.
        warm_start: keep the curvature across outer steps (else start afresh
            after every hypergradient).
        modules: the model whose layers ``curvature="kfac"`` tracks; with
            the dense curvature, where every inner parameter belongs to one
            of its ``nn.Linear`` layers, the per-sample rows are assembled
            from those layers' inputs and output gradients in the step's own
            backward pass (no batched backward; see _layer_rows.py).
        pipeline: the curvature updates run beside the training (paper
            Algorithm 2): the inner steps push their gradients and return at
            once, a consumer applies them. ``None``/``False``: no pipeline. Either a
            :class:`nhgd_ext.pipeline.Pipeline` holding the curvature (yours
            to close), or ``True`` / a dict of Pipeline options (``consumer``,
            ``consumer_threads``, ``slots``, ``engine``): then the curvature
            chosen by ``curvature`` is built on the consumer device and runs in
            a Pipeline this estimator owns. The hypergradients are those of
            the synchronous estimator.
        seed: of the target sampling (``None``: torch's global generator).
        process_group: see :class:`HypergradientEstimator`; taken from
            ``modules`` when it is a ``DistributedDataParallel`` model.
        per_sample: feed per-sample gradient rows when ``inner_step`` gets a
            1-D loss (rank D per step); ``False`` feeds the batch mean, scaled
            by sqrt(D) (one rank-one update, the paper's own form: cheaper
            where per-sample gradients are dear, e.g. through a PINN's input
            derivatives).
        refine: k steps of conjugate gradients on the true inner Hessian,
            H w = grad_theta f, started from and preconditioned by the
            curvature's solve, with Hessian-vector products from the inner
            closure (k + 1 of them). 0 is the paper's NHGD; where the Fisher
            is not the Hessian (label noise, networks, PINNs) two or three
            steps recover the implicit hypergradient.
        representation: of a ``"dense"`` curvature (``DenseEFIM``): ``"auto"``,
            ``"dense"`` or ``"compact"``.
        dtype: of the curvature state (default: the inner parameters').

    ``close()`` (or leaving a ``with`` block) removes what the estimator put
    on the model: the hooks of a K-FAC curvature it built and those giving
    the per-sample rows (a curvature or pipeline passed in is left to its
    owner). The hooks also come off when the estimator is collected.
    """

    uses_batch_size = True  # a batch-mean gradient enters the Fisher as sqrt(batch_size) g
    _outer_step_attributes = ("_L", "_cross_steps")

    def __init__(self, inner_params, outer_params, *, curvature="dense", beta: float | None = None,
                 damping: float = 1e-3, fisher: str = "empirical", likelihood: str = "categorical",
                 cross: str = "end", cross_batches: int = 1, warm_start: bool = True, modules=None,
                 seed: int | None = None, pipeline=None, per_sample: bool = True, refine: int = 0,
                 representation: str = "auto", dtype: torch.dtype | None = None, inner_lr: float = 0.1,
                 process_group=None):
        if process_group is None:  # a DistributedDataParallel model says its group itself
            process_group = group_of(modules)
        if process_group is not None and pipeline not in (None, False):
            raise ValueError("NHGD: argument 'pipeline' does not combine with data-parallel inner training "
                             "(a process group, or a DistributedDataParallel model): each rank keeps its curvature "
                             "itself")
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        _one_of("fisher", fisher, ("empirical", "sampled"))
        _one_of("likelihood", likelihood, ("categorical", "gaussian"))
        _one_of("cross", cross, ("end", "trajectory"))
        if isinstance(cross_batches, bool) or not isinstance(cross_batches, int) or cross_batches < 1:
            raise ValueError(f"NHGD: argument 'cross_batches' must be a positive integer, got {cross_batches!r}")
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"NHGD: argument 'refine' must be a non-negative integer, got {refine!r}")
        first = self.inner_params[0]
        dtype = first.dtype if dtype is None else dtype
        self._owned = []  # what close() releases, in order: a Pipeline and a K-FAC built here, layer hooks
        pipeline_options = _pipeline_options(pipeline)
        pipeline = None if pipeline is False else pipeline
        where = first.device
        if pipeline_options is not None:
            pipeline = None
            where = torch.device(pipeline_options.setdefault("consumer", first.device))
        elif pipeline is not None:
            if not (isinstance(curvature, str) and curvature == "dense"):
                raise ValueError("NHGD: argument 'pipeline' carries its own curvature (Pipeline(curvature, ...)); "
                                 "do not give NHGD a 'curvature' as well")
            # a Pipeline has the curvature interface: updates are pushed to the
            # consumer, solve() flushes them and solves there
            curvature = pipeline
        if isinstance(curvature, str) and curvature == "dense":
            dim = sum(p.numel() for p in self.inner_params)
            curvature = DenseEFIM(dim, beta=beta, damping=damping, representation=representation, dtype=dtype,
                                  device=where)
        elif isinstance(curvature, str) and curvature == "kfac":
            if modules is None:
                raise ValueError("NHGD: curvature='kfac' needs argument 'modules' (the model whose "
                                 "nn.Linear and nn.Conv2d layers it tracks)")
            curvature = KFAC(modules, params=self.inner_params, beta=0.95 if beta is None else beta,
                             damping=damping, dtype=dtype, device=where,
                             process_group=None if self._data_parallel is None else self._data_parallel.group)
            self._owned.append(curvature)
        elif isinstance(curvature, str) or not isinstance(curvature, Curvature):
            raise ValueError(f"NHGD: argument 'curvature' must be 'dense', 'kfac' or a Curvature (an object with "
                             f"{', '.join(protocol.REQUIRED)}); got {curvature!r}")
        if pipeline_options is not None:
            from ..pipeline import Pipeline

            curvature = Pipeline(curvature, producer=first.device, **pipeline_options)
            self._owned.insert(0, curvature)  # drained before the K-FAC hooks it reads come off
        self.curvature = curvature
        self.fisher, self.likelihood, self.cross = fisher, likelihood, cross
        self.cross_batches, self.warm_start = cross_batches, warm_start
        self.beta, self.refine = beta, refine
        # K-FAC reads per-sample information from its layer hooks; per-sample
        # rows through a batched backward would fire those hooks inside vmap.
        self.wants_per_sample_rows = bool(per_sample) and getattr(curvature, "takes_rows", True)
        self._layer_rows, self._layer_rows_checked = None, False
        if self.wants_per_sample_rows and isinstance(modules, nn.Module):
            self._layer_rows = LayerRows.covering(modules, self.inner_params)
            if self._layer_rows is not None:
                self._owned.append(self._layer_rows)
        self._generator = None if seed is None else torch.Generator(device=first.device).manual_seed(seed)
        self._L: torch.Tensor | None = None  # trajectory average of d2_{v theta} l, d_v x d_theta
        self._cross_steps = 0

    # -------------------------------------------------------------- inner loop

    def _differentiates_again(self, per_sample: bool, outputs: torch.Tensor | None) -> bool:
        return (self.cross == "trajectory" or self.fisher == "sampled"
                or super()._differentiates_again(per_sample, outputs))

    def _observations(self, loss: torch.Tensor, mean: torch.Tensor, outputs: torch.Tensor | None,
                      grads: Sequence[torch.Tensor]) -> dict:
        found = {}
        layer_rows = self._layer_rows
        if self.cross == "trajectory":
            with self._hooks_paused():
                found["cross"] = self._mixed_derivative(mean)
        if self.fisher == "empirical":
            rows = None
            if layer_rows is not None and loss.dim() == 1:
                rows = self._rows_from_layers(loss, flat(grads).detach())
            found.update({"rows": rows} if rows is not None else super()._observations(loss, mean, outputs, grads))
            return found
        losses = self._sampled_losses(outputs)
        if self.wants_per_sample_rows:
            rows = None
            if layer_rows is not None:  # the hooks record this backward pass of the sampled losses
                rows = self._rows_from_layers(
                    losses, flat(grads_or_zeros(losses.mean(), self.inner_params, retain_graph=True)))
            found["rows"] = rows if rows is not None else self._per_sample_rows(losses)
        else:  # the hooks of a K-FAC curvature see this backward pass's output gradients
            found["fisher_grad"] = flat(grads_or_zeros(losses.mean(), self.inner_params))
            found["fisher_batch"] = losses.numel()
        return found

    def _rows_from_layers(self, losses: torch.Tensor, mean_grad: torch.Tensor) -> torch.Tensor | None:
        """The per-sample rows of ``losses`` (whose mean gradient is
        ``mean_grad``) from the layer hooks, checked on the first step;
        ``None`` where autograd must give them."""
        rows = self._layer_rows.rows(mean_grad)
        if rows is not None and not self._layer_rows_checked:
            rows = self._check_layer_rows(rows, losses)
        return rows

    def _check_layer_rows(self, rows: torch.Tensor, losses: torch.Tensor) -> torch.Tensor | None:
        """Once, on the first step: the layer rows of two samples against
        autograd's gradients of their losses. A loss that differentiates
        through the layers' inputs (a PINN's residual) reaches the weights
        along paths the hooks do not see: then the rows come from autograd's
        batched backward from now on."""
        self._layer_rows_checked = True
        picks = sorted({0, losses.numel() - 1})
        exact = torch.stack([flat(grads_or_zeros(losses[i], self.inner_params, retain_graph=True)) for i in picks])
        scale = exact.norm() + torch.finfo(exact.dtype).tiny
        if float((rows[picks] - exact.to(rows.dtype)).norm() / scale) <= 1e-4:
            return rows
        warnings.warn("NHGD: the per-sample gradients assembled from the nn.Linear layers do not match autograd's "
                      "(the loss reaches the weights outside the layers' forward pass, e.g. through input "
                      "derivatives); using autograd's batched backward for the rows", RuntimeWarning, stacklevel=4)
        self._owned.remove(self._layer_rows)
        self._layer_rows.close()
        self._layer_rows = None
        return None

    def _sampled_losses(self, outputs: torch.Tensor | None) -> torch.Tensor:
        """Per-sample negative log-likelihoods at targets drawn from the model."""
        if outputs is None or not outputs.requires_grad:
            raise ValueError("NHGD(fisher='sampled').inner_step: argument 'outputs' must be the model's outputs "
                             "(one row per sample) with their graph")
        if self.likelihood == "categorical":
            if outputs.dim() != 2:
                raise ValueError(f"NHGD(fisher='sampled'): argument 'outputs' must be logits of shape "
                                 f"[n, classes], got {list(outputs.shape)}")
            probs = torch.softmax(outputs.detach().double(), dim=1)
            targets = torch.multinomial(probs, 1, generator=self._generator).squeeze(1)
            return F.cross_entropy(outputs, targets, reduction="none")
        means = outputs if outputs.dim() == 2 else outputs.reshape(outputs.shape[0], -1)
        noise = torch.randn(means.shape, dtype=means.dtype, device=means.device, generator=self._generator)
        return 0.5 * (means - (means.detach() + noise)).pow(2).sum(1)

    def _mixed_derivative(self, mean: torch.Tensor) -> torch.Tensor:
        """d2_{v theta} l of this step's loss (d_v x d_theta): the gradient in v
        with its graph, then one batched backward pass to theta."""
        g_v = flat(grads_or_zeros(mean, self.outer_params, create_graph=True, retain_graph=True))
        if not g_v.requires_grad:  # v does not reach theta's gradient
            d_theta = sum(p.numel() for p in self.inner_params)
            return torch.zeros(g_v.numel(), d_theta, dtype=g_v.dtype, device=g_v.device)
        return self._per_sample_rows(g_v, retain_graph=True)

    def observe(self, grads: Sequence[torch.Tensor], *, batch_size: int = 1, rows: torch.Tensor | None = None,
                cross: torch.Tensor | None = None, fisher_grad: torch.Tensor | None = None,
                fisher_batch: int | None = None) -> None:
        """Feeds one step: per-sample ``rows`` when given, else the (mean)
        gradient, or for the sampled Fisher without rows ``fisher_grad``; and
        the step's mixed derivative ``cross`` for ``cross="trajectory"``."""
        if self.cross == "trajectory":
            if cross is None:
                raise ValueError("NHGD(cross='trajectory').observe: argument 'cross' (the step's "
                                 "d2_{v theta} l, d_v x d_theta) is required")
            self._average_cross(cross)
        if rows is not None:
            self.curvature.update_many(rows, per_step=True)
        elif fisher_grad is not None:
            self.curvature.update(fisher_grad, batch_size=fisher_batch or batch_size)
        elif self.fisher == "sampled":
            raise ValueError("NHGD(fisher='sampled').observe: needs 'rows' or 'fisher_grad' from sampled targets; "
                             "call inner_step(loss, optimizer, outputs=model_outputs)")
        else:
            self.curvature.update(flat(grads), batch_size=batch_size)

    def _average_cross(self, B: torch.Tensor) -> None:
        d_v = sum(v.numel() for v in self.outer_params)
        d_theta = sum(p.numel() for p in self.inner_params)
        if B.shape != (d_v, d_theta):
            raise ValueError(f"NHGD.observe: argument 'cross' must have shape [{d_v}, {d_theta}], got {list(B.shape)}")
        B = B.detach().to(self.inner_params[0].dtype)
        if self._cross_steps == 0:  # the first step is the average so far (no zero prior to scale away)
            self._L = B.clone(memory_format=torch.contiguous_format)
        else:
            a, b = ops.ema_coeffs(self.beta) if self.beta is not None else ops.running_average_coeffs(self._cross_steps)
            ops.running_average_(self._L, B, a, b)
        self._cross_steps += 1

    # ----------------------------------------------------------- outer level


    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        fed = getattr(self.curvature, "num_updates", None)
        if fed == 0:
            raise RuntimeError("NHGD.hypergradient: the curvature has seen no inner step yet (call inner_step or "
                               "observe first): there is no Fisher to solve with")
        # the backward passes below are not inner steps: layer hooks record none of them
        with self._hooks_paused():
            return self._solve_and_cross(outer_loss, inner_closure)

    def _hooks_paused(self):
        stack = contextlib.ExitStack()
        stack.enter_context(getattr(self.curvature, "paused", contextlib.nullcontext)())
        if self._layer_rows is not None:
            stack.enter_context(self._layer_rows.paused())
        return stack

    def _solve_and_cross(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        g_theta = None
        if self.cross == "end" or self.refine:
            # The cross term (and refine's Hessian) of the mean over M closure
            # batches: linear in the loss, so one backward pass of the mean
            # loss instead of one per batch. Taken before the solve, so that a
            # refused closure leaves even the curvature's inverse as it was.
            batches = self.cross_batches if self.cross == "end" else 1
            g_theta = self.inner_gradient(sum(inner_closure() for _ in range(batches)) / batches)
        w = self.curvature.solve(f_theta)
        if self.refine:
            w = self._refined(g_theta, f_theta, w)
        if self.cross == "trajectory":
            if self._L is None:
                raise RuntimeError("NHGD(cross='trajectory').hypergradient: no inner step observed since the "
                                   "last hypergradient")
            cross = unflat(self._L @ w.to(self._L.dtype), self.outer_params)
            # Eq. 3.3 averages over the current inner loop: v moves after this call.
            self._L, self._cross_steps = None, 0
        else:
            cross = self.mixed_product(g_theta, w)
        return self.combine(f_v, cross)

    def _outer_step_done(self) -> None:
        if not self.warm_start:  # only once the hypergradient is known to be finite
            self.curvature.reset()

    def _refined(self, g_theta: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``refine`` steps of conjugate gradients on H w = b from w, with the
        curvature's solve as the preconditioner."""
        w = w.to(b.dtype)
        # where the residual is at rounding level, more steps only add noise
        floor = torch.finfo(b.dtype).eps ** 2 * abs(float(b @ w))
        r = b - self.hvp(g_theta, w)
        z = self.curvature.solve(r).to(b.dtype)
        p, rz = z.clone(), r @ z
        for step in range(self.refine):
            if not rz > floor:
                break
            q = self.hvp(g_theta, p)
            pq = p @ q
            refuse_nonfinite("NHGD(refine=...)", [pq], ["a Hessian-vector product"], UNCHANGED)
            if not pq > 0:  # converged, or H is not positive definite along p: w is as good as it gets
                break
            alpha = rz / pq
            w = w + alpha * p
            if step + 1 == self.refine:
                break
            r = r - alpha * q
            z = self.curvature.solve(r).to(b.dtype)
            rz_new = r @ z
            p = z + (rz_new / rz) * p
            rz = rz_new
        return w

    # ----------------------------------------------------------------- state

    def close(self) -> None:
        """Removes what this estimator attached to the model (the hooks of a
        K-FAC curvature it built, those giving per-sample rows). Idempotent."""
        owned, self._owned = self._owned, []
        for thing in owned:
            thing.close()
        self._layer_rows = None

    def __enter__(self) -> NHGD:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        return {"curvature": self.curvature.state_dict(),
                "cross": None if self._L is None else self._L.clone(), "cross_steps": self._cross_steps}

    def load_state_dict(self, state: dict) -> None:
        self.curvature.load_state_dict(state["curvature"])
        self._L = None if state.get("cross") is None else state["cross"].clone()
        self._cross_steps = state.get("cross_steps", 0)

    def reset(self) -> None:
        self.curvature.reset()
        self._L, self._cross_steps = None, 0


_PIPELINE_OPTIONS = ("consumer", "consumer_threads", "slots", "engine")


def _pipeline_options(pipeline) -> dict | None:
    """The options of a Pipeline NHGD is to build (``pipeline=True`` or a
    dict), ``None`` where it is given one or none."""
    if pipeline is True:
        return {}
    if isinstance(pipeline, dict):
        unknown = sorted(set(pipeline) - set(_PIPELINE_OPTIONS))
        if unknown:
            raise ValueError(f"NHGD: argument 'pipeline' takes the options {', '.join(_PIPELINE_OPTIONS)}; "
                             f"got {', '.join(map(repr, unknown))}")
        return dict(pipeline)
    return None


def _one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"NHGD: argument '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
