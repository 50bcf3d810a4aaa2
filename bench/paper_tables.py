"""The paper's comparisons (000_e6070b1e682511fa.txt, Tables 2 and 3, Fig. 4)
re-run here, every method side by side in one run, through ``nhgd_ext.run``:

    .venv/bin/python bench/paper_tables.py cleaning     [--seeds 3] [--outer-steps 100]
    .venv/bin/python bench/paper_tables.py distillation [--seeds 3]
    .venv/bin/python bench/paper_tables.py heat         [--outer-steps 20] [--scale small|paper] [--seed 0]

Prints markdown tables: outer loss and test metric averaged over the last
steps (the paper averages its last 50 epochs), their spread over seeds, and
the timed wall time of the loops (estimator construction and a throwaway
warm-up step excluded, as in the command line).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import nhgd_ext
from nhgd_ext import problems

CLEANING_METHODS = ["nhgd", "nhgd-mean", "nhgd-kfac", "stocbio", "amigo", "ttsa", "soba", "aid", "neumann10",
                    "neumann40", "cg10", "cg40", "broyden", "none"]
DISTILLATION_METHODS = ["nhgd", "nhgd-mean", "nhgd-sampled", "nhgd-kfac", "amigo", "ttsa", "soba", "aid",
                        "neumann10", "neumann40", "cg10", "cg40", "broyden", "none"]
HEAT_METHODS = ["nhgd", "nhgd-sampled", "broyden", "cg10"]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def compare(make, methods, seeds, outer_steps, inner_steps, last, metric):
    print(f"| method | outer loss (mean of last {last}) | {metric} (mean of last {last}) | loop time [s] |")
    print("|---|---|---|---|")
    pristine = {seed: make(seed) for seed in seeds}
    references: dict[str, list[float]] = {}
    for seed, problem in pristine.items():
        for name, values in problem.references(inner_steps * outer_steps).items():
            references.setdefault(name, []).append(values[metric])
    for method in methods:
        losses, scores, times = [], [], []
        for seed in seeds:
            nhgd_ext.run(copy.deepcopy(pristine[seed]), method, outer_steps=1, inner_steps=1, seed=seed)  # warm-up
            h = nhgd_ext.run(copy.deepcopy(pristine[seed]), method, outer_steps=outer_steps,
                             inner_steps=inner_steps, seed=seed)
            losses.append(h.mean_over_last("outer_loss", last))
            scores.append(h.mean_over_last(metric, last))
            times.append(h.final["wall_time"])
        print(f"| {method} | {_spread(losses)} | {_spread(scores)} | {statistics.fmean(times):.1f} |", flush=True)
    for name, values in references.items():
        print(f"| {name} (reference) | - | {_spread(values)} | - |")


def heat(methods, outer_steps: int, inner_steps: int, scale: str, seed: int) -> None:
    """Outer loss against wall time, and the time each method takes to first
    reach the final outer loss of Broyden (the paper's Fig. 4 comparison)."""
    sizes = {"small": dict(state_layers=(3, 32, 32, 32, 1), control_layers=(1, 16, 16, 1), n_interior=256,
                           n_boundary_per_side=64, n_initial=64, n_test=216),
             "paper": {}}[scale]
    start = time.perf_counter()
    pristine = problems.HeatPDEControl(seed=seed, **sizes)
    print(f"(setup incl. pretraining: {time.perf_counter() - start:.1f} s)")
    histories = {}
    for method in methods:
        nhgd_ext.run(copy.deepcopy(pristine), method, outer_steps=1, inner_steps=1, seed=seed)  # warm-up
        histories[method] = nhgd_ext.run(copy.deepcopy(pristine), method, outer_steps=outer_steps,
                                         inner_steps=inner_steps, seed=seed)
    target = histories["broyden"].final["outer_loss"] if "broyden" in histories else None
    print(f"| method | outer loss at start | at end | test error at end | loop time [s] | "
          f"time to outer loss <= {target:.4g} [s] | (time: outer loss) |")
    print("|---|---|---|---|---|---|---|")
    for method, h in histories.items():
        reached = next((r["wall_time"] for r in h.rows if target is not None and r["outer_loss"] <= target), None)
        trace = ", ".join(f"{r['wall_time']:.1f}s: {r['outer_loss']:.3g}" for r in h.rows[:: max(1, outer_steps // 5)])
        print(f"| {method} | {h.rows[0]['outer_loss']:.4g} | {h.final['outer_loss']:.4g} | "
              f"{h.final.get('test_error', float('nan')):.4g} | {h.final['wall_time']:.1f} | "
              f"{'not reached' if reached is None else f'{reached:.1f}'} | {trace} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["cleaning", "distillation", "heat"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--outer-steps", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=None)
    parser.add_argument("--last", type=int, default=10)
    parser.add_argument("--methods", default=None)
    parser.add_argument("--scale", default="small", choices=["small", "paper"])
    parser.add_argument("--seed", type=int, default=0, help="of the heat problem")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    if args.table == "heat":
        heat(args.methods.split(",") if args.methods else HEAT_METHODS, args.outer_steps or 20,
             args.inner_steps or 10, args.scale, args.seed)
        return
    cls = problems.HyperDataCleaning if args.table == "cleaning" else problems.DataDistillation
    settings = cls(seed=0).settings
    methods = args.methods.split(",") if args.methods else (
        CLEANING_METHODS if args.table == "cleaning" else DISTILLATION_METHODS)
    compare(lambda seed: cls(seed=seed), methods, seeds, args.outer_steps or settings.outer_steps,
            args.inner_steps or settings.inner_steps, args.last, "test_accuracy")


if __name__ == "__main__":
    main()
