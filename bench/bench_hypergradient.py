"""Cost of the hypergradient methods on a softmax regression of MNIST's size
(784 inputs, 10 classes, d = 7850 inner parameters), in one run:

* the cost of forming the hypergradient after the inner loop: NHGD (dense
  inverse Fisher) against CG and Neumann with 10 and 40 Hessian-vector products;
* the cost of one inner step: plain SGD against NHGD's step with its
  curvature update (dense, and K-FAC).

    .venv/bin/python bench/bench_hypergradient.py [--n 2000] [--batch 128] [--repeats 5] [--steps 256]

Synthetic data (Gaussian inputs, random labels): only the cost is measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nhgd_ext.curvature import KFAC
from nhgd_ext.estimators import NHGD, ConjugateGradient, Neumann


def amortized(fn, steps: int) -> float:
    """Mean time of one call over `steps` consecutive calls: occasional work
    (the dense Fisher's batched folds, the refreshes) is included."""
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def timed(fn, repeats: int) -> float:
    fn()  # warm-up, outside the timing
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="training samples")
    parser.add_argument("--batch", type=int, default=128, help="inner mini-batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each hypergradient (median)")
    parser.add_argument("--steps", type=int, default=256, help="inner steps timed per method (mean)")
    args = parser.parse_args()
    torch.manual_seed(0)
    X, y = torch.randn(args.n, 784), torch.randint(0, 10, (args.n,))
    Xv, yv = torch.randn(500, 784), torch.randint(0, 10, (500,))
    model = nn.Linear(784, 10)
    params = list(model.parameters())
    log_decay = torch.tensor(-3.0, requires_grad=True)

    def inner(idx=None):
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        return nn.functional.cross_entropy(model(xb), yb) + log_decay.exp() * sum(p.pow(2).sum() for p in params)

    def outer():
        return nn.functional.cross_entropy(model(Xv), yv)

    def batch():
        return torch.randint(0, args.n, (args.batch,))

    print(f"softmax regression, d = {sum(p.numel() for p in params)}, n = {args.n}, batch = {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    # --- per inner step
    sgd = torch.optim.SGD(params, lr=0.1)

    def sgd_step():
        sgd.zero_grad()
        inner(batch()).backward()
        sgd.step()

    dense = NHGD(params, [log_decay], beta=0.99)
    kfac = NHGD(params, [log_decay], curvature=KFAC(model, params=params, beta=0.99))
    steps = args.steps
    rows = [("SGD step", amortized(sgd_step, steps))]
    rows.append(("NHGD dense inner_step", amortized(lambda: dense.inner_step(inner(batch()), batch_size=args.batch),
                                                    steps)))
    rows.append(("NHGD K-FAC inner_step", amortized(lambda: kfac.inner_step(inner(batch()), batch_size=args.batch),
                                                    steps)))
    base = rows[0][1]
    print(f"\nper inner step (mean of {steps})    time          / SGD step")
    for name, t in rows:
        print(f"  {name:28s} {t * 1e3:9.3f} ms  {t / base:8.2f}x")

    # --- after the inner loop
    methods = [("NHGD (dense)", dense), ("NHGD (K-FAC)", kfac),
               ("CG10", ConjugateGradient(params, [log_decay], iters=10)),
               ("CG40", ConjugateGradient(params, [log_decay], iters=40)),
               ("Neumann10", Neumann(params, [log_decay], iters=10, scale=0.5)),
               ("Neumann40", Neumann(params, [log_decay], iters=40, scale=0.5))]
    costs = [(name, timed(lambda est=est: est.hypergradient(outer(), inner), args.repeats)) for name, est in methods]
    cg10 = dict(costs)["CG10"]
    print("\nforming the hypergradient       median        / CG10")
    for name, t in costs:
        print(f"  {name:28s} {t * 1e3:9.3f} ms  {t / cg10:8.2f}x")


if __name__ == "__main__":
    main()
