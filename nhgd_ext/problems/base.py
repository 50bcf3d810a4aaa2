"""What the runner needs from a bilevel problem, and nothing more.

    min_v  f(v, theta*(v))    theta*(v) = argmin_theta  E_batch l(v, theta, batch)

A problem owns its tensors (inner parameters theta, outer parameters v, data),
samples its own batches from its own generator (so a seed fixes a run), and
reports its metrics. The estimators never see a problem: the runner turns one
into the calls of the estimator protocol (docs/design.md §3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def check_count(name: str, value, *, minimum: int = 1, owner: str | None = None) -> int:
    """``value`` if it is an integer >= ``minimum``; else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}argument '{name}' must be {want}, got {value!r}")
    return value


@dataclass
class Settings:
    """A problem's default loop settings (the paper's, scaled to the data)."""

    outer_steps: int = 50
    inner_steps: int = 20
    inner_lr: float = 0.1
    outer_lr: float = 0.1
    #: options per method name (e.g. {"neumann10": {"scale": 0.1}}), merged into the estimator's
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)


class BilevelProblem:
    """Base class. Subclasses set ``inner_params``, ``outer_params`` and
    ``settings`` in ``__init__`` and implement the four methods that raise.

    Every constructor takes ``seed``, ``device`` and ``dtype`` (float32 by
    default; the tests build tiny problems in float64).
    """

    name: str = "problem"
    #: the network the inner parameters belong to, where there is one (NHGD's
    #: ``curvature="kfac"`` hooks its ``nn.Linear`` layers)
    model: torch.nn.Module | None = None
    inner_params: list[torch.Tensor]
    outer_params: list[torch.Tensor]
    settings: Settings
    #: method name -> why it cannot work on this problem (the runner refuses
    #: the method, and its refineK / pipelined variants, before any step)
    unsupported_methods: dict[str, str] = {}

    def __init__(self, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    # ------------------------------------------------------------ the losses

    def sample_batch(self) -> Any:
        """A fresh inner mini-batch (whatever ``inner_loss`` accepts)."""
        raise NotImplementedError

    def inner_loss(self, batch: Any = None, *, reduction: str = "mean") -> torch.Tensor:
        """l(v, theta) on ``batch`` (``None``: the whole inner data set), with its
        graph to both theta and v. ``reduction="none"`` gives the 1-D tensor of
        per-sample losses (their mean is the ``"mean"`` loss, regularizer included)."""
        raise NotImplementedError

    def inner_loss_and_outputs(self, batch: Any = None, *,
                               reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """``inner_loss`` together with the model outputs it was computed from
        (logits, or a PINN's residual rows), one row per sample and on the same
        graph: what ``NHGD(fisher="sampled")`` draws its targets from. Only
        problems whose inner loss is a plain likelihood of those outputs
        override this; the default has no outputs."""
        return self.inner_loss(batch, reduction=reduction), None

    def outer_loss(self) -> torch.Tensor:
        """f(v, theta) at the current parameters, with its graph."""
        raise NotImplementedError

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Evaluation figures at the current parameters (``test_accuracy``,
        ``test_loss``, ...); cheap enough to call every outer step."""
        raise NotImplementedError

    # --------------------------------------------------------------- optional

    def reset_inner(self) -> None:
        """Re-initializes theta (the runner calls it once, before the first step)."""

    def project_outer(self) -> None:
        """Puts v back into its feasible set after an outer step (default: none)."""

    def exact_hypergradient(self) -> tuple[torch.Tensor, ...] | None:
        """The closed-form grad Phi(v) at the current v, where the problem has one."""
        return None

    def references(self, inner_steps: int) -> dict[str, dict[str, float]]:
        """Extra reference runs the results table shows beside the methods
        (e.g. ``val-only`` for hyper-data cleaning): name -> metrics."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """The current parameters, detached copies (for checkpoints and tests)."""
        return {f"inner.{i}": p.detach().clone() for i, p in enumerate(self.inner_params)} | {
            f"outer.{i}": p.detach().clone() for i, p in enumerate(self.outer_params)}

    def _param(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).requires_grad_(True)
