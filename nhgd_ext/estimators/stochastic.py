"""Stochastic implicit-differentiation baselines: every Hessian-vector product
takes a fresh batch from ``inner_closure``.

* StocBiO (Ji et al., 2021): truncated Neumann series, w = scale * sum_q prod (I - scale H_j) grad_theta f.
* AmIGO (Arbel & Mairal, 2022): ``iters`` SGD steps on 1/2 w^T H w - w^T grad_theta f, warm-started.
* TTSA (Hong et al., 2020): one term of the Neumann series drawn at random,
  w = iters * scale * prod_{j < p} (I - scale H_j) grad_theta f, p ~ U{0..iters-1}
  (an unbiased estimate of the truncated series).
"""

from __future__ import annotations

import torch

from .base import Closure, HypergradientEstimator, KeepsSolution


def _check_positive_int(cls: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(cls: str, name: str, value) -> float:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{cls}: argument '{name}' must be > 0, got {value!r}")
    return float(value)


class StocBiO(HypergradientEstimator):
    def __init__(self, inner_params, outer_params, *, iters: int = 10, scale: float = 0.1, inner_lr: float = 0.1,
                 process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        self.iters = _check_positive_int("StocBiO", "iters", iters, minimum=0)
        self.scale = _check_positive("StocBiO", "scale", scale)

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        term, total = f_theta.clone(), f_theta.clone()
        for _ in range(self.iters):
            term = term - self.scale * self.hvp(self.inner_gradient(inner_closure()), term)
            total = total + term
        return self.combine(f_v, self.mixed_product(self.inner_gradient(inner_closure()), self.scale * total))


class AmIGO(KeepsSolution):
    def __init__(self, inner_params, outer_params, *, iters: int = 5, lr: float = 0.1, inner_lr: float = 0.1,
                 process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        self.iters = _check_positive_int("AmIGO", "iters", iters)
        self.lr = _check_positive("AmIGO", "lr", lr)

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        w = self.kept_or_zeros(f_theta)
        for _ in range(self.iters):
            w = w - self.lr * (self.hvp(self.inner_gradient(inner_closure()), w) - f_theta)
        self._kept = w
        return self.combine(f_v, self.mixed_product(self.inner_gradient(inner_closure()), w))


class TTSA(HypergradientEstimator):
    def __init__(self, inner_params, outer_params, *, iters: int = 10, scale: float = 0.1, seed: int = 0,
                 inner_lr: float = 0.1, process_group=None):
        super().__init__(inner_params, outer_params, inner_lr=inner_lr, process_group=process_group)
        self.iters = _check_positive_int("TTSA", "iters", iters)
        self.scale = _check_positive("TTSA", "scale", scale)
        self.seed = seed
        self.reset()

    def _hypergradient(self, outer_loss: torch.Tensor, inner_closure: Closure) -> tuple[torch.Tensor, ...]:
        f_v, f_theta = self.outer_gradients(outer_loss)
        depth = int(torch.randint(0, self.iters, (1,), generator=self._rng))
        term = f_theta.clone()
        for _ in range(depth):
            term = term - self.scale * self.hvp(self.inner_gradient(inner_closure()), term)
        w = self.iters * self.scale * term
        return self.combine(f_v, self.mixed_product(self.inner_gradient(inner_closure()), w))

    def _outer_state(self) -> dict:
        return self.state_dict()

    def _restore_outer_state(self, kept: dict) -> None:
        self.load_state_dict(kept)

    def state_dict(self) -> dict:
        return {"rng": self._rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._rng.set_state(state["rng"])

    def reset(self) -> None:
        self._rng = torch.Generator()
        self._rng.manual_seed(self.seed)
