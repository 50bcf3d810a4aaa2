"""Quadratic bilevel problems with closed-form solutions:

    l(v, theta) = 1/2 theta^T H theta - theta^T B v + c^T theta      (inner, H SPD)
    f(v, theta) = 1/2 v^T P v + p^T v + 1/2 theta^T Q theta + q^T theta   (outer, P, Q PSD)

    theta*(v) = H^-1 (B v - c),    grad Phi(v) = P v + p + B^T H^-1 (Q theta*(v) + q)

Two modes. ``"seed003"``: the 2-D problem of seed 003 (Section 5),
H = P = Z = diag(L, mu), B = L I, c = 1, Q = 0, q = 1/10, L = kappa mu,
started at v = 1, theta = 0 as in tests/test_single_loop.py. (The paper's
Eq. 11 prints grad Phi = Z x + L Z^-1 1; differentiating its own f gives the
factor 1/10 on the second term, used here.) ``"random"``: any sizes, H with
eigenvalues spread over [mu, L] (both ends included, so its condition number
is exactly L / mu) in a random basis, the rest Gaussian, all from the seed.

Stochastic batches: the inner loss is the mean of ``n_samples`` per-sample
losses l_i = l - theta^T xi_i, with xi_i = noise * H^(1/2) z_i (z standard
normal, centred over the set, so the mean is l exactly). A batch is a set of
sample indices; its gradient is the exact one plus noise of covariance
noise^2 H / D. With noise = 1 (the default) the per-sample gradients at
theta* have covariance H: the empirical Fisher equals the Hessian there,
the well-specified case NHGD is built for; without noise the gradients
vanish at theta* and an empirical Fisher has nothing to learn from. The noise
is linear in theta, so Hessians and cross derivatives of every batch are
exact. ``noise=0, batch_size=None`` is the deterministic setting of seed 003
itself; ``batch=None`` is always the exact loss.
"""

from __future__ import annotations

import math

import torch

from .base import BilevelProblem, Settings, check_count


class SyntheticQuadratic(BilevelProblem):
    """Args:
        mode: ``"seed003"`` (2-D, condition number ``kappa``) or ``"random"``.
        kappa, mu, L: inner strong convexity mu and smoothness L (L defaults to kappa * mu).
        inner_dim, outer_dim: sizes of theta and v (``"random"`` mode; ``"seed003"`` is 2 x 2).
        noise, n_samples, batch_size: the stochastic inner loss (see the module docstring);
            ``batch_size=None`` makes ``sample_batch`` return ``None`` (exact loss).
    """

    name = "quadratic"

    def __init__(self, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 mode: str = "seed003", kappa: float = 2.0, mu: float = 0.1, L: float | None = None,
                 inner_dim: int = 2, outer_dim: int = 2, noise: float = 1.0, n_samples: int = 256,
                 batch_size: int | None = 16):
        super().__init__(seed=seed, device=device, dtype=dtype)
        if mode not in ("seed003", "random"):
            raise ValueError(f"SyntheticQuadratic: argument 'mode' must be 'seed003' or 'random', got {mode!r}")
        if not (isinstance(mu, (int, float)) and mu > 0 and math.isfinite(mu)):
            raise ValueError(f"SyntheticQuadratic: argument 'mu' must be a finite number > 0, got {mu!r}")
        if L is None:
            if not (isinstance(kappa, (int, float)) and kappa >= 1 and math.isfinite(kappa)):
                raise ValueError(f"SyntheticQuadratic: argument 'kappa' must be a finite number >= 1, got {kappa!r}")
            L = kappa * mu
        if not (isinstance(L, (int, float)) and L >= mu and math.isfinite(L)):
            raise ValueError(f"SyntheticQuadratic: argument 'L' must be a finite number >= mu = {mu}, got {L!r}")
        for name, value in (("inner_dim", inner_dim), ("outer_dim", outer_dim), ("n_samples", n_samples)):
            check_count(name, value, owner="SyntheticQuadratic")
        if batch_size is not None:
            check_count("batch_size", batch_size, owner="SyntheticQuadratic")
        if mode == "seed003" and (inner_dim, outer_dim) != (2, 2):
            raise ValueError(f"SyntheticQuadratic: arguments 'inner_dim', 'outer_dim' are 2 in mode 'seed003' "
                             f"(got {inner_dim}, {outer_dim}); use mode='random' for other sizes")
        if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"SyntheticQuadratic: argument 'noise' must be a finite number >= 0, got {noise!r}")
        self.mode, self.mu, self.L, self.noise = mode, float(mu), float(L), float(noise)
        self.n_samples = n_samples
        self.batch_size = None if batch_size is None else min(batch_size, n_samples)

        # everything is drawn and assembled in float64 on the CPU, then moved:
        # the same seed gives the same problem on every device and dtype
        g, f64 = self.generator, torch.float64
        if mode == "seed003":
            Z = torch.diag(torch.tensor([self.L, self.mu], dtype=f64))
            H, P, B = Z, Z.clone(), self.L * torch.eye(2, dtype=f64)
            c, p = torch.ones(2, dtype=f64), torch.zeros(2, dtype=f64)
            Q, q = torch.zeros(2, 2, dtype=f64), torch.full((2,), 0.1, dtype=f64)
            theta0, v0 = torch.zeros(2, dtype=f64), torch.ones(2, dtype=f64)
        else:
            n, m = inner_dim, outer_dim
            H = _spd_with_spectrum(torch.linspace(self.mu, self.L, n, dtype=f64) if n > 1
                                   else torch.tensor([self.L], dtype=f64), g)
            # B of scale sqrt(mu L) keeps H^-1 B, and with it Phi's curvature, of
            # order sqrt(kappa) rather than kappa; P's spectrum [1/2, 3/2] makes
            # Phi strongly convex whatever Q is
            B = torch.randn(n, m, generator=g, dtype=f64) * math.sqrt(self.mu * self.L / m)
            c = torch.randn(n, generator=g, dtype=f64)
            P = _spd_with_spectrum(torch.linspace(0.5, 1.5, m, dtype=f64), g)
            p = torch.randn(m, generator=g, dtype=f64)
            Q = _wishart(n, g)
            q = torch.randn(n, generator=g, dtype=f64)
            theta0, v0 = torch.zeros(n, dtype=f64), torch.randn(m, generator=g, dtype=f64)
        z = torch.randn(n_samples, H.shape[0], generator=g, dtype=f64)
        z -= z.mean(dim=0)
        xi = self.noise * z @ _sqrtm(H)  # rows noise * H^(1/2) z_i (H^(1/2) symmetric)

        to = lambda t: t.to(device=self.device, dtype=dtype)  # noqa: E731
        self.H, self.B, self.c, self.P, self.p, self.Q, self.q, self.xi = map(to, (H, B, c, P, p, Q, q, xi))
        self._theta0, self._v0 = to(theta0), to(v0)
        self.theta = self._param(theta0)
        self.v = self._param(v0)
        self.inner_params, self.outer_params = [self.theta], [self.v]
        self.settings = self._default_settings()

    @classmethod
    def seed003(cls, kappa: float = 2.0, *, mu: float = 0.1, **options) -> SyntheticQuadratic:
        """The 2-D problem of seed 003, Section 5, with condition number kappa."""
        return cls(mode="seed003", kappa=kappa, mu=mu, **options)

    @classmethod
    def random(cls, inner_dim: int, outer_dim: int, *, mu: float = 0.1, L: float = 1.0,
               **options) -> SyntheticQuadratic:
        """A random problem with inner Hessian eigenvalues spread over [mu, L]."""
        return cls(mode="random", inner_dim=inner_dim, outer_dim=outer_dim, mu=mu, L=L, **options)

    # ------------------------------------------------------------ the losses

    def sample_batch(self) -> torch.Tensor | None:
        if self.batch_size is None:
            return None
        return torch.randperm(self.n_samples, generator=self.generator)[: self.batch_size].to(self.device)

    def inner_loss(self, batch: torch.Tensor | None = None, *, reduction: str = "mean") -> torch.Tensor:
        theta, v = self.theta, self.v
        exact = 0.5 * theta @ self.H @ theta - theta @ (self.B @ v) + self.c @ theta
        if reduction == "mean" and batch is None:
            return exact
        xi = self.xi if batch is None else self.xi[batch]
        per_sample = exact - xi @ theta
        if reduction == "none":
            return per_sample
        if reduction == "mean":
            return per_sample.mean()
        raise ValueError(f"argument 'reduction' must be 'mean' or 'none', got {reduction!r}")

    def outer_loss(self) -> torch.Tensor:
        return self._outer(self.v, self.theta)

    def _outer(self, v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * v @ self.P @ v + self.p @ v + 0.5 * theta @ self.Q @ theta + self.q @ theta

    # ------------------------------------------------------- closed forms

    def inner_solution(self, v: torch.Tensor | None = None) -> torch.Tensor:
        """theta*(v) = H^-1 (B v - c)."""
        v = self.v.detach() if v is None else v
        return torch.linalg.solve(self.H, self.B @ v - self.c)

    def phi(self, v: torch.Tensor | None = None) -> torch.Tensor:
        """Phi(v) = f(v, theta*(v)); differentiable in ``v`` when it is given with a graph."""
        v = self.v.detach() if v is None else v
        return self._outer(v, self.inner_solution(v))

    def exact_hypergradient(self) -> tuple[torch.Tensor, ...]:
        v = self.v.detach()
        adjoint = torch.linalg.solve(self.H, self.Q @ self.inner_solution(v) + self.q)
        return (self.P @ v + self.p + self.B.T @ adjoint,)

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        (grad,) = self.exact_hypergradient()
        return {"grad_norm_sq": float(grad @ grad),
                "inner_distance": float(torch.linalg.vector_norm(self.theta - self.inner_solution())),
                "phi": float(self.phi())}

    # --------------------------------------------------------------- optional

    def reset_inner(self) -> None:
        with torch.no_grad():
            self.theta.copy_(self._theta0)

    def outer_hessian(self) -> torch.Tensor:
        """Hessian of Phi, P + B^T H^-1 Q H^-1 B (constant: Phi is quadratic)."""
        HinvB = torch.linalg.solve(self.H, self.B)
        return self.P + HinvB.T @ self.Q @ HinvB

    def _default_settings(self) -> Settings:
        """Seed 003: one inner step (the single-loop setting), alpha = eta = 1/L
        (its Theorems 1 and 3), outer step 0.05 (tests/test_single_loop.py).
        Random: ten inner steps at 1/L and the outer step 1/L_Phi, with L_Phi
        the largest eigenvalue of Phi's Hessian. Every linear-system step
        (Neumann, stocBiO, TTSA phi; AmIGO, SOBA, AID steps) is 1/L."""
        step = 1.0 / self.L
        if self.mode == "seed003":
            inner_steps, outer_lr, outer_steps = 1, 0.05, 1500
        else:
            L_phi = float(torch.linalg.eigvalsh(self.outer_hessian().double()).max())
            inner_steps, outer_lr, outer_steps = 10, 1.0 / max(L_phi, 1e-12), 300
        options = {
            "neumann10": {"iters": 10, "scale": step}, "neumann40": {"iters": 40, "scale": step},
            "stocbio": {"iters": 10, "scale": step}, "ttsa": {"iters": 10, "scale": step},
            "amigo": {"lr": step}, "soba": {"lr": step}, "aid": {"eta": step},
            "cg10": {"iters": 10}, "cg40": {"iters": 40},
        }
        return Settings(outer_steps=outer_steps, inner_steps=inner_steps, inner_lr=step, outer_lr=outer_lr,
                        method_options=options)



def _random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a Haar-distributed orthogonal matrix


def _spd_with_spectrum(eigenvalues: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    U = _random_rotation(eigenvalues.numel(), generator)
    M = (U * eigenvalues) @ U.T
    return 0.5 * (M + M.T)


def _wishart(n: int, generator: torch.Generator) -> torch.Tensor:
    G = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return G @ G.T / (2 * n)


def _sqrtm(H: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(H)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
