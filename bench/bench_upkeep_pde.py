"""NHGD's curvature upkeep on the paper-size heat PDE, against the inner loop alone.

The heat-equation control problem at the paper's size (state network
[3, 64, 64, 64, 64, 1]: 12,801 parameters), NHGD with the sampled Fisher
(``nhgd-sampled``: one rank-one update per step from the batch mean of the
sampled losses' gradients, EMA beta = 0.9, as the runner configures it).
Three variants run the same outer steps (T inner steps, then the
hypergradient and the outer step), interleaved step by step:

* ``none``: the inner loop alone (T plain SGD steps);
* ``nhgd``: NHGD as the runner builds it;
* ``nhgd-noop``: the same estimator with a curvature that keeps nothing
  (its updates return at once, its solve is the identity): every gradient
  pass NHGD makes, the sampled Fisher's included, and none of the upkeep.

upkeep = time(nhgd) - time(nhgd-noop): the curvature's updates, checks and
solve. The figure is upkeep / time(none), medians over the timed outer
steps, in the steady state (after ``--warmup-steps`` untimed outer steps,
once the compact form's window has filled); the representation DenseEFIM
chose is printed.

    python bench/bench_upkeep_pde.py [--threads 1] [--outer-steps 10] [--inner-steps 50] [--warmup-steps 8]
                                     [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _report import add_json_argument, write_json

from nhgd_ext.problems import HeatPDEControl
from nhgd_ext.runner import make_estimator


class NoCurvature:
    """Keeps nothing: what NHGD costs without its curvature."""

    num_updates = 1  # NHGD refuses a hypergradient from a curvature that saw no step

    def update(self, g, batch_size=1):
        pass

    def update_many(self, rows, per_step=True):
        pass

    def solve(self, v):
        return v

    def reset(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--outer-steps", type=int, default=10, help="timed outer steps per variant")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--pretrain-steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=8,
                        help="outer steps run first, untimed: the compact form's window fills in about 350 "
                             "inner steps at beta = 0.9")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["none", "nhgd", "nhgd-noop"]
    runs = {}
    for name in variants:
        problem = HeatPDEControl(seed=0, pretrain_steps=args.pretrain_steps)
        est = None if name == "none" else make_estimator(problem, "nhgd-sampled")
        if name == "nhgd-noop":
            est.curvature = NoCurvature()
        inner = torch.optim.SGD(problem.inner_params, lr=problem.settings.inner_lr)
        outer = torch.optim.SGD(problem.outer_params, lr=problem.settings.outer_lr)
        runs[name] = (problem, est, inner, outer)
    d = sum(p.numel() for p in runs["none"][0].inner_params)

    def outer_step(problem, est, inner, outer):
        for _ in range(args.inner_steps):
            if est is None:
                inner.zero_grad(set_to_none=True)
                problem.inner_loss(problem.sample_batch()).backward(inputs=problem.inner_params)
                inner.step()
            else:
                loss, outputs = problem.inner_loss_and_outputs(problem.sample_batch())
                est.inner_step(loss, inner, outputs=outputs)  # the outputs' rows are the batch
        if est is not None:
            outer.zero_grad(set_to_none=True)
            est.backward(problem.outer_loss(), lambda: problem.inner_loss(problem.sample_batch()))
            outer.step()

    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.warmup_steps + args.outer_steps):
        for name in variants:
            tick = time.perf_counter()
            outer_step(*runs[name])
            if step >= args.warmup_steps:
                times[name].append(time.perf_counter() - tick)
    med = {name: statistics.median(times[name]) for name in variants}
    upkeep = med["nhgd"] - med["nhgd-noop"]
    curvature = runs["nhgd"][1].curvature
    print(f"heat PDE, state network d = {d}, {args.inner_steps} inner steps per outer step, batch "
          f"{runs['none'][0].batch_size}, torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.outer_steps} outer steps")
    for name in variants:
        print(f"  {name:10s} {med[name]:8.3f} s / outer step")
    # one value for the line and the JSON: the test recomputes it from the medians
    share = upkeep / med["none"]
    print(f"  upkeep     {upkeep:8.3f} s = {100 * share:.1f}% of none's loop "
          f"(representation: {curvature.representation}, rows kept: {curvature.rank}, "
          f"refreshes: {curvature.num_refreshes})")
    write_json(args.json, {"device": "cpu", "d": d, "batch": runs["none"][0].batch_size,
                           "outer_steps": args.outer_steps, "inner_steps": args.inner_steps,
                           "warmup_steps": args.warmup_steps, "pretrain_steps": args.pretrain_steps},
               medians=med, times=times, upkeep=upkeep, ratios={"upkeep / none": share},
               curvature={"representation": curvature.representation, "rank": curvature.rank,
                          "refreshes": curvature.num_refreshes})


if __name__ == "__main__":
    main()
