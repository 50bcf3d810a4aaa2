"""The paper's comparisons (its Tables 2, 3 and 5 / Fig. 4) re-run here,
every method side by side, seed after seed, through ``nhgd_ext.run``:

    .venv/bin/python bench/paper_tables.py cleaning     [--seeds 3] [--data mnist] [--out DIR]
    .venv/bin/python bench/paper_tables.py distillation [--seeds 3] [--data mnist] [--out DIR]
    .venv/bin/python bench/paper_tables.py heat         [--seeds 3] [--outer-steps 200] [--scale paper|small]
    (any of them with --device cuda)

Prints a markdown table per run: outer loss and test metric averaged over
the last steps (the paper averages its last epochs) with their spread over
seeds, the loop's wall time (estimator construction and a throwaway warm-up
step excluded, as in the command line), and the time each method takes to
first reach the *target*: the final outer loss of CG10 (cleaning,
distillation) or of Broyden (heat), seed by seed, with how many seeds got
there. Writes the plot of outer loss against wall time (seed 0, and every
seed thin) and the table to ``--out``.

Within a seed the methods take turns on copies of one problem (same data,
same start); the thread count is pinned and printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import nhgd_ext
from nhgd_ext import problems

# nhgd on MNIST is the paper's batch-mean form (the problems' settings), so nhgd-mean would repeat it
CLEANING_METHODS = ["nhgd", "nhgd-pipelined", "nhgd-kfac", "nhgd-kfac-pipelined", "stocbio", "amigo", "ttsa",
                    "soba", "aid", "neumann10", "neumann40", "cg10", "cg40", "broyden", "none"]
DISTILLATION_METHODS = ["nhgd", "nhgd-pipelined", "nhgd-sampled", "nhgd-kfac", "amigo", "ttsa", "soba", "aid",
                        "neumann10", "neumann40", "cg10", "cg40", "broyden", "none"]
HEAT_METHODS = ["nhgd-sampled", "nhgd-sampled-pipelined", "broyden", "cg10"]
TARGET = {"cleaning": "cg10", "distillation": "cg10", "heat": "broyden"}
SMALL_HEAT = dict(state_layers=(3, 32, 32, 32, 1), control_layers=(1, 16, 16, 1), n_interior=256,
                  n_boundary_per_side=64, n_initial=64, n_test=216)


def _spread(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def time_to(history, target: float) -> float | None:
    """Wall time of the first row whose outer loss is at or below ``target``."""
    return next((row["wall_time"] for row in history.rows if row["outer_loss"] <= target), None)


def compare(make, methods: list[str], seeds: list[int], steps: dict, metric: str):
    """{method: [History per seed]}, the references' metric per seed, and the
    loop lengths (``steps``' where not None, else the problem's settings)."""
    histories: dict[str, list] = {m: [] for m in methods}
    references: dict[str, list[float]] = {}
    for seed in seeds:
        start = time.perf_counter()
        pristine = make(seed)
        loop = {key: value or getattr(pristine.settings, key) for key, value in steps.items()}
        print(f"seed {seed}: problem built in {time.perf_counter() - start:.1f} s; "
              f"{loop['outer_steps']} outer x {loop['inner_steps']} inner steps", flush=True)
        for name, values in pristine.references(loop["inner_steps"] * loop["outer_steps"]).items():
            references.setdefault(name, []).append(values[metric])
        for method in methods:
            try:
                nhgd_ext.run(copy.deepcopy(pristine), method, outer_steps=1, inner_steps=1, seed=seed)  # warm-up
                h = nhgd_ext.run(copy.deepcopy(pristine), method, **loop, seed=seed)
            except (ValueError, RuntimeError) as err:  # a method that breaks down is a row, not the end of the table
                first_line = " ".join(str(err).split(" At: ")[0].split())  # without the consumer's Python stack
                histories[method].append(Failed(seed, first_line))
                print(f"  {method}: FAILED: {histories[method][-1].reason}", flush=True)
                continue
            histories[method].append(h)
            print(f"  {method}: outer loss {h.final['outer_loss']:.4g}, {metric} {h.final.get(metric, float('nan')):.4g}, "
                  f"{h.final['wall_time']:.1f} s", flush=True)
    return histories, references, loop


@dataclass
class Failed:
    """A run that raised (seed, first line of the error) instead of a History."""

    seed: int
    reason: str


def markdown(histories: dict, references: dict, last: int, metric: str, target_method: str) -> str:
    targets = [None if isinstance(h, Failed) else h.final["outer_loss"] for h in histories.get(target_method, [])]
    lines = [f"| method | outer loss (mean of last {last}) | {metric} (mean of last {last}) | loop time [s] | "
             f"time to {target_method}'s final outer loss [s] |", "|---|---|---|---|---|"]
    for method, runs in histories.items():
        done = [h for h in runs if not isinstance(h, Failed)]
        reached = [time_to(h, t) for h, t in zip(runs, targets) if t is not None and not isinstance(h, Failed)]
        hits = [r for r in reached if r is not None]
        when = (f"{statistics.fmean(hits):.2f} ({len(hits)}/{len(reached)} seeds)" if hits
                else f"not reached (0/{len(reached)})") if reached else "-"
        failed = "".join(f"; seed {h.seed} failed: {h.reason}" for h in runs if isinstance(h, Failed))
        lines.append(f"| {method} | {_spread([h.mean_over_last('outer_loss', last) for h in done])} | "
                     f"{_spread([h.mean_over_last(metric, last) for h in done])} | "
                     f"{_spread([h.final['wall_time'] for h in done], 2)} | {when}{failed} |")
    for name, values in references.items():
        lines.append(f"| {name} (reference) | - | {_spread(values)} | - | - |")
    return "\n".join(lines)


def plot(histories: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (method, runs) in enumerate(histories.items()):
        style = {"color": colors[i % len(colors)], "linestyle": "--" if method.endswith("-pipelined") else "-"}
        for k, h in enumerate(h for h in runs if not isinstance(h, Failed)):
            ax.plot([r["wall_time"] for r in h.rows], [r["outer_loss"] for r in h.rows], **style,
                    linewidth=1.6 if k == 0 else 0.5, alpha=1.0 if k == 0 else 0.5,
                    label=method if k == 0 else None)
    ax.set_xlabel("wall time of the loop [s]")
    ax.set_ylabel("outer loss")
    ax.set_yscale("log")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["cleaning", "distillation", "heat"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--outer-steps", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=None)
    parser.add_argument("--last", type=int, default=10)
    parser.add_argument("--methods", default=None)
    parser.add_argument("--data", default="mnist", choices=["mnist", "digits"], help="cleaning and distillation")
    parser.add_argument("--scale", default="paper", choices=["paper", "small"], help="of the heat problem")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as torch has)")
    parser.add_argument("--device", default="cpu", help="of every problem (cuda: pipelined runs use a second stream)")
    parser.add_argument("--out", type=Path, default=None, help="default: out/tables/<table>")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    if args.table == "heat":
        sizes = SMALL_HEAT if args.scale == "small" else {}

        def make(seed):
            return problems.HeatPDEControl(seed=seed, device=args.device, **sizes)

        default_methods, metric = HEAT_METHODS, "test_error"
    else:
        cls = problems.HyperDataCleaning if args.table == "cleaning" else problems.DataDistillation

        def make(seed):
            return cls(seed=seed, data=args.data, device=args.device)

        default_methods = CLEANING_METHODS if args.table == "cleaning" else DISTILLATION_METHODS
        metric = "test_accuracy"
    methods = args.methods.split(",") if args.methods else default_methods
    target = TARGET[args.table]
    histories, references, loop = compare(make, methods, seeds, {"outer_steps": args.outer_steps,
                                                                  "inner_steps": args.inner_steps}, metric)
    header = (f"{args.table} ({args.data if args.table != 'heat' else args.scale + ' size'}), {args.device}, seeds {seeds}, "
              f"{loop['outer_steps']} outer x {loop['inner_steps']} inner steps, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, backend {nhgd_ext.backend()}")
    table = markdown(histories, references, args.last, metric, target)
    print("\n" + header + "\n\n" + table)
    out = args.out or Path("out/tables") / args.table
    out.mkdir(parents=True, exist_ok=True)
    plot(histories, out / "outer_loss_vs_time.png", header)
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    (out / "histories.json").write_text(json.dumps(
        {m: [h.reason if isinstance(h, Failed) else h.rows for h in runs] for m, runs in histories.items()},
        default=float))
    print(f"\nwrote {out / 'outer_loss_vs_time.png'}, {out / 'table.md'}, {out / 'histories.json'}")


if __name__ == "__main__":
    main()
