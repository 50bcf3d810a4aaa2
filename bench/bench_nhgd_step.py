"""What one NHGD inner step costs against a plain SGD step, at a large batch.

A small tanh MLP (12 -> 16 -> 4, 276 parameters), cross-entropy, batch 1,024,
float32 on the CPU. Each variant runs the same inner step on the same
batches: forward, backward, feeding the estimator, the optimizer step.

* ``sgd``: forward, backward, ``optimizer.step()``.
* ``kfac``: ``NHGD(curvature="kfac")`` (factor GEMMs from the layer hooks).
* ``dense``: ``NHGD(modules=model)``, per-sample rows from the layer hooks,
  1,024 rows per step into the dense form (k >= d / 3: the Gram matrix
  accumulates, the inverse is rebuilt at the solve, not here).
* ``dense-mean``: ``NHGD(per_sample=False)``, the batch mean as one row.

The variants are interleaved round by round (after a warm-up), so a busy
neighbour slows them alike; the figures are medians over rounds, with the
thread count pinned and printed.

    python bench/bench_nhgd_step.py [--threads 1] [--rounds 30] [--steps 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _report import add_json_argument, write_json
from torch import nn

from nhgd_ext.estimators import NHGD

BATCH = 1024


def build(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    params = list(model.parameters())
    v = torch.zeros(1, requires_grad=True)  # an outer variable the inner step never needs
    opt = torch.optim.SGD(params, lr=0.05)
    est = None
    if variant == "kfac":
        est = NHGD(params, [v], curvature="kfac", modules=model, beta=0.9, damping=1e-3)
    elif variant == "dense":
        est = NHGD(params, [v], modules=model, beta=0.9, damping=1e-3)
    elif variant == "dense-mean":
        est = NHGD(params, [v], per_sample=False, beta=0.9, damping=1e-3)
    return model, params, opt, est


def step(model, params, opt, est, X, y):
    if est is None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()
        opt.step()
    else:
        per_sample = est.wants_per_sample_rows
        losses = F.cross_entropy(model(X), y, reduction="none" if per_sample else "mean")
        est.inner_step(losses, opt, batch_size=BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="inner steps timed per round and variant")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(args.steps, BATCH, 12, generator=g)
    y = torch.randint(0, 4, (args.steps, BATCH), generator=g)
    variants = ["sgd", "kfac", "dense", "dense-mean"]
    setups = {name: build(name) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 2):  # two warm-up rounds
        for name in variants:
            model, params, opt, est = setups[name]
            tick = time.perf_counter()
            for t in range(args.steps):
                step(model, params, opt, est, X[t], y[t])
            elapsed = (time.perf_counter() - tick) / args.steps
            if round_ >= 2:
                times[name].append(elapsed)
    d = sum(p.numel() for p in setups["sgd"][1])
    print(f"NHGD inner step vs SGD: MLP 12-16-4 (d = {d}), batch {BATCH}, float32, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps")
    medians = {name: statistics.median(times[name]) for name in variants}
    base = medians["sgd"]
    ratios = {}
    for name in variants:
        med = medians[name]
        # one value for the table and the JSON: the test recomputes it from the medians
        ratio = ratios[f"{name} / sgd"] = med / base
        print(f"  {name:11s} {1e6 * med:9.1f} us/step   {ratio:6.2f} x sgd")
    representations = {name: setups[name][3].curvature.representation for name in ("dense", "dense-mean")}
    print("  representation of the dense runs:", representations["dense"], "/", representations["dense-mean"])
    write_json(args.json, {"device": "cpu", "dtype": "float32", "batch": BATCH, "d": d, "rounds": args.rounds,
                           "steps": args.steps, "representations": representations},
               medians=medians, times=times, ratios=ratios)


if __name__ == "__main__":
    main()
