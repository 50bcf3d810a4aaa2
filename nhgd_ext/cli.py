"""``python -m nhgd_ext``: the main job (``demo``) and the paper's comparisons (``run``).

    python -m nhgd_ext demo [--out DIR] [--data mnist|digits]
    python -m nhgd_ext run cleaning|distillation|heat-pde|poisson|quadratic \\
        [--methods nhgd,cg10,neumann10,none,...] [--pipeline] [--outer-steps K] [--inner-steps T] \\
        [--device cpu|cuda] [--seed S] [--threads N|auto] [--data mnist|digits | --data-dir PATH] [--out DIR]

Every method runs on its own fresh instance of the problem (same seed: same
data, same starting point). Bad arguments end with one line on stderr and
exit status 2, before any work; a diverged method gives exit status 1,
Ctrl-C 130 (what had finished is written first).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import problems, report
from ._devices import checked_device
from .estimators import NHGD
from .problems.data import EMBEDDED
from .runner import METHODS, PIPELINED, Interrupted, check_method, method_spec, run

#: command-line name -> (class name in nhgd_ext.problems, takes --data / --data-dir)
PROBLEMS = {
    "cleaning": ("HyperDataCleaning", True),
    "distillation": ("DataDistillation", True),
    "heat-pde": ("HeatPDEControl", False),
    "poisson": ("PoissonControl1D", False),
    "quadratic": ("SyntheticQuadratic", False),
}

#: what a default run (the four default methods) took on two CPU cores, start-up included (bench/RESULTS.md)
DEFAULT_RUN_TIME = {
    "cleaning": "9 s (digits), 17 s (--data mnist)",
    "distillation": "10 s (digits or --data mnist)",
    "heat-pde": "3.3 min (the paper's size: 200 outer x 50 inner steps, 12,801 parameters; "
                "--outer-steps 20 takes 27 s)",
    "poisson": "9 s",
    "quadratic": "12 s",
}

#: each problem's own loop settings (outer steps, inner steps, inner lr, outer lr), which the flags
#: override; tests/test_cli.py checks them against the problems
DEFAULT_SETTINGS = {
    "cleaning": {"digits": (100, 10, 0.5, 10.0), "mnist": (200, 10, 0.1, 10.0)},
    "distillation": {"digits": (100, 30, 1.0, 1.0), "mnist": (100, 30, 0.1, 10.0)},
    "heat-pde": {"": (200, 50, 0.01, 0.05)},
    "poisson": {"": (50, 20, 0.01, 0.5)},
    "quadratic": {"": (1500, 1, 5.0, 0.05)},
}


def _defaults_text(column: int) -> str:
    """'cleaning 100 (digits) / 200 (mnist), heat-pde 200, ...' for one setting."""
    parts = []
    for problem, by_data in DEFAULT_SETTINGS.items():
        values = " / ".join(f"{v[column]:g}" + (f" ({data})" if data else "") for data, v in by_data.items())
        parts.append(f"{problem} {values}")
    return "default: the problem's own, " + ", ".join(parts)


#: the demo: NHGD synchronous and pipelined against CG10, Neumann10 and no reweighting
DEMO_METHODS = ["nhgd", "nhgd" + PIPELINED, "cg10", "neumann10", "none"]


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m nhgd_ext`` (its ``demo`` and ``run`` commands)."""
    parser = _Parser(prog="python -m nhgd_ext", description="Bilevel optimization by natural hypergradient descent.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="hyper-data cleaning of 5,000 real MNIST digits at 50%% label noise: "
                                            "NHGD (synchronous and pipelined) against CG10, Neumann10 and no "
                                            "reweighting; about 20 s on two cores")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    demo.add_argument("--data", default="mnist", choices=list(EMBEDDED), help="embedded data set (default: mnist)")
    demo.add_argument("--seed", type=int, default=0, help="(default: 0)")
    demo.add_argument("--outer-steps", type=int, default=None, help="(default: 200 on mnist, 100 on digits)")
    demo.add_argument("--inner-steps", type=int, default=None, help="(default: 10)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _threads_flag(demo)
    times = "; ".join(f"{name}: {text}" for name, text in DEFAULT_RUN_TIME.items())
    runner = commands.add_parser(
        "run", help="one problem, several methods, side by side",
        description=f"Time of a default run on two CPU cores: {times}.",
        epilog="Exit status: 0 when every method finished; 1 when one diverged (a NaN or infinity: the table, "
               "results.json and stderr say which, at which step, in what; its figures are null); 2 for a bad "
               "argument; 130 on Ctrl-C (what had finished is written first). Results are written as each "
               "method ends.")
    runner.add_argument("problem", help=", ".join(PROBLEMS))
    runner.add_argument("--methods", default="nhgd,cg10,neumann10,none",
                        help=f"comma-separated, from {', '.join(METHODS)} "
                             f"(also cgN, neumannN, <nhgd method>-refineK, <nhgd method>{PIPELINED})")
    runner.add_argument("--pipeline", action="store_true",
                        help="also run every NHGD method pipelined (paper Algorithm 2: the curvature updates on "
                             "a consumer thread with its own share of the CPU threads, a second CUDA stream, "
                             "or a second GPU), beside its synchronous run")
    for column, (flag, kind) in enumerate((("--outer-steps", int), ("--inner-steps", int), ("--inner-lr", float),
                                           ("--outer-lr", float))):
        runner.add_argument(flag, type=kind, default=None, help=_defaults_text(column))
    runner.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    runner.add_argument("--seed", type=int, default=0, help="data, initialization and batches (default: 0)")
    runner.add_argument("--data", default=None, choices=list(EMBEDDED),
                        help="embedded data set of cleaning and distillation (default: digits)")
    runner.add_argument("--data-dir", type=Path, default=None,
                        help="folder with MNIST / Fashion-MNIST IDX files, instead of an embedded set")
    runner.add_argument("--out", type=Path, default=None, help="output folder (default: out/<problem>)")
    runner.add_argument("--last", type=int, default=None,
                        help="average the table's figures over the last N steps (default: a fifth of the run, "
                             "at most 10; at most the run's length)")
    runner.add_argument("--quiet", action="store_true", help="no progress bars")
    _threads_flag(runner)
    return parser


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", default="auto",
                        help="torch's intra-op threads: a number, or 'auto' (the default): as many as the cores "
                             "other processes leave free when the run starts, unless OMP_NUM_THREADS is set")


def _set_threads(value: str) -> None:
    """``--threads``: a positive number, or ``auto`` (the free cores, see
    nhgd_ext/_cores.py; OMP_NUM_THREADS, where set, wins)."""
    if value == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return
        from ._cores import free_cores

        threads = free_cores()
    else:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise UsageError(f"argument --threads: must be a positive number or 'auto', got {value!r}")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line on ``argv`` (default: sys.argv); returns the exit status."""
    threads_before = torch.get_num_threads()  # put back for a caller in the same process
    try:
        args = build_parser().parse_args(argv)
        _set_threads(args.threads)
        if args.command == "demo":
            return _compare("cleaning", DEMO_METHODS, args, out=args.out, data=args.data, data_dir=None,
                            outer_steps=args.outer_steps, last=10)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.pipeline:
            methods = _with_pipelined_twins(methods)
        if args.data is not None and args.data_dir is not None:
            raise UsageError("arguments --data and --data-dir: give one of them")
        return _compare(args.problem, methods, args, out=args.out or Path("out") / args.problem,
                        data=args.data, data_dir=args.data_dir, outer_steps=args.outer_steps, last=args.last)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"nhgd_ext: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any method ran (data loading, pretraining)
        print("\nnhgd_ext: interrupted; nothing had finished", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _with_pipelined_twins(methods: list[str]) -> list[str]:
    """Every NHGD method followed by its pipelined twin (unless listed already)."""
    out = []
    for method in methods:
        out.append(method)
        twin = method + PIPELINED
        if not method.endswith(PIPELINED) and twin not in methods and _is_nhgd(method):
            out.append(twin)
    return out


def _is_nhgd(method: str) -> bool:
    try:
        return method_spec(method)[0] is NHGD
    except ValueError:
        return False  # reported with the other unknown names


def _compare(problem_name: str, methods: list[str], args, *, out: Path, data, data_dir, outer_steps, last) -> int:
    if problem_name not in PROBLEMS:
        raise UsageError(f"unknown problem {problem_name!r}; choose from {', '.join(PROBLEMS)}")
    if not methods:
        raise UsageError("argument --methods: no method given")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise UsageError(f"argument --methods: {', '.join(twice)} listed more than once")
    if last is not None and last < 1:
        raise UsageError(f"argument --last: must be a positive number of steps, got {last}")
    class_name, takes_data = PROBLEMS[problem_name]
    cls = getattr(problems, class_name)
    for method in methods:
        check_method(cls, method)  # unknown names, and what the problem refuses, fail before any work
    for name in ("outer_steps", "inner_steps", "inner_lr", "outer_lr"):
        value = outer_steps if name == "outer_steps" else getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"argument --{name.replace('_', '-')}: must be positive, got {value}")
    checked_device(args.device, "argument --device:")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"argument --seed: must lie in [0, 2**63), got {args.seed}")
    _check_out(out)
    if data_dir is not None and not takes_data:
        raise UsageError(f"argument --data-dir: problem {problem_name!r} uses no data set")
    if data is not None and not takes_data:
        raise UsageError(f"argument --data: problem {problem_name!r} uses no data set")
    kwargs: dict[str, Any] = {"seed": args.seed, "device": args.device}
    if takes_data:
        kwargs["data_dir"] = data_dir
        if data is not None:
            kwargs["data"] = data

    pristine = cls(**kwargs)  # built once (data loading, pretraining), copied per run
    for method in methods:
        check_method(pristine, method)

    def fresh():
        return copy.deepcopy(pristine)

    settings = pristine.settings
    loop = {"outer_steps": outer_steps or settings.outer_steps,
            "inner_steps": args.inner_steps or settings.inner_steps,
            "inner_lr": getattr(args, "inner_lr", None) or settings.inner_lr,
            "outer_lr": getattr(args, "outer_lr", None) or settings.outer_lr}
    last = min(last, loop["outer_steps"]) if last else max(1, min(10, loop["outer_steps"] // 5))
    references = pristine.references(loop["inner_steps"] * loop["outer_steps"])
    source = getattr(pristine, "source", None)
    config = {"problem": problem_name, "methods": methods, "seed": args.seed, "device": args.device,
              "data": source, "data_dir": None if data_dir is None else str(data_dir), **loop,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "backend": _backend(args.device)}
    histories = []
    try:
        for method in methods:
            warm = time.perf_counter()
            try:
                run(fresh(), method, **{**loop, "outer_steps": 1, "inner_steps": 1}, seed=args.seed)
            except Interrupted:
                raise KeyboardInterrupt from None  # a warm-up step is no result
            warmup = time.perf_counter() - warm
            bar = _progress(method, loop["outer_steps"], args.quiet)
            try:
                history = run(fresh(), method, **loop, seed=args.seed, progress=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            history.warmup_seconds = warmup
            histories.append(history)
            # on disk as each method ends: an interruption later loses nothing finished
            report.write_all(out, histories, references, config, last, plots=False)
    except KeyboardInterrupt as stop:
        if isinstance(stop, Interrupted):
            histories.append(stop.history)
        if not histories:
            raise
        written = report.write_all(out, histories, references, {**config, "interrupted": True}, last)
        print(f"\nnhgd_ext: interrupted during {method}; wrote what had finished "
              f"({', '.join(h.method + ('' if h.status == 'finished' else ' (interrupted)') for h in histories)})"
              f" to {', '.join(str(p) for p in written)}", file=sys.stderr)
        return 130
    metric = report.headline_metric(histories)
    print(f"\n{problem_name}{f' on {source}' if source else ''} (seed {args.seed}, {loop['outer_steps']} outer x "
          f"{loop['inner_steps']} inner steps, inner lr {loop['inner_lr']:g}, outer lr {loop['outer_lr']:g}, "
          f"device {args.device}, {torch.get_num_threads()} threads)")
    print(report.table(histories, references, metric, last))
    written = report.write_all(out, histories, references, config, last)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    diverged = [h for h in histories if h.diverged]
    if diverged:
        listed = "; ".join(f"{h.method} at outer step {h.diverged['step']} ({h.diverged['quantity']})"
                           for h in diverged)
        print(f"nhgd_ext: {len(diverged)} of {len(histories)} methods diverged: {listed}", file=sys.stderr)
        return 1
    return 0


def _check_out(out: Path) -> None:
    """The output folder, made now (before any method runs) and checked writable."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"argument --out: cannot create {str(out)!r} ({err.strerror or err})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"argument --out: {str(out)!r} is not writable")


class _Bar:
    def __init__(self, method: str, total: int):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, desc=f"{method:>10}", unit="step", leave=True, file=sys.stderr)

    def update(self, step: int, row: dict[str, float]) -> None:
        shown = {"loss": f"{row['outer_loss']:.4g}"}
        for key in report.PREFERRED_METRICS:
            if key in row:
                shown[key.replace("test_", "")] = f"{row[key]:.4g}"
                break
        self.tqdm.set_postfix(shown, refresh=False)
        self.tqdm.update(1)

    def close(self) -> None:
        self.tqdm.close()


def _progress(method: str, total: int, quiet: bool):
    return None if quiet else _Bar(method, total)


def _backend(device: str) -> str:
    from . import backend

    return backend(device)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())
