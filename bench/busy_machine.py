"""The command line on a machine another process keeps busy.

    .venv/bin/python bench/busy_machine.py [--repeats 3] [--outer-steps 10] [--out DIR]

Runs ``python -m nhgd_ext run cleaning --methods nhgd,cg10`` under each
configuration below, the configurations taking turns in every repeat, and
prints the median of each method's timed loop (results.json's
``wall_time_seconds``) and of the whole command. "busy" starts a Python
busy loop (the stand-in for ``yes > /dev/null``) on its own before the
command and stops it after; it is free to run on any core, as another
user's job would.

Configurations: quiet or busy, crossed with the thread choice: ``--threads
<all cores>`` (torch's default, what the command line did before), ``--threads
1``, ``--threads auto`` (the default now: the cores found free), and all
cores with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of
spinning at barriers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("nhgd", "cg10")
BUSY_LOOP = "while True: pass"


def configurations(cores: int) -> list[tuple[str, bool, str, dict[str, str]]]:
    """(name, busy, --threads value, extra environment)."""
    out = []
    for busy in (False, True):
        load = "busy" if busy else "quiet"
        out += [(f"{load}, --threads {cores}", busy, str(cores), {}),
                (f"{load}, --threads 1", busy, "1", {}),
                (f"{load}, --threads auto", busy, "auto", {}),
                (f"{load}, --threads {cores}, OMP_WAIT_POLICY=PASSIVE", busy, str(cores),
                 {"OMP_WAIT_POLICY": "PASSIVE"})]
    return out


def run_once(threads: str, busy: bool, extra_env: dict[str, str], outer_steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | extra_env
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if hog:
            time.sleep(0.5)  # let it be scheduled before the command looks for free cores
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nhgd_ext", "run", "cleaning", "--methods", ",".join(METHODS),
                            "--outer-steps", str(outer_steps), "--threads", threads, "--quiet", "--out", out],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            whole = time.perf_counter() - start
            results = json.loads((Path(out) / "results.json").read_text())
    finally:
        if hog:
            hog.kill()
            hog.wait()
    found = {m: results["methods"][m]["wall_time_seconds"] for m in METHODS}
    found["command"] = whole
    found["threads used"] = results["config"]["threads"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--outer-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    configs = configurations(cores)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in configs}
    for repeat in range(args.repeats):
        for name, busy, threads, env in configs:
            samples[name].append(run_once(threads, busy, env, args.outer_steps))
            print(f"repeat {repeat + 1}/{args.repeats}: {name}: {samples[name][-1]}", file=sys.stderr)
    quiet = {m: statistics.median(s[m] for s in samples[configs[0][0]]) for m in (*METHODS, "command")}
    lines = [f"cleaning on digits, {args.outer_steps} outer x 10 inner steps, {cores} cores, medians of "
             f"{args.repeats} (times relative to quiet, --threads {cores}):", "",
             "| configuration | threads used | nhgd loop [s] | cg10 loop [s] | whole command [s] |",
             "|---|---|---|---|---|"]
    for name, *_ in configs:
        med = {m: statistics.median(s[m] for s in samples[name]) for m in (*METHODS, "command")}
        used = sorted({s["threads used"] for s in samples[name]})
        cells = [f"{med[m]:.3f} ({med[m] / quiet[m]:.1f}x)" for m in (*METHODS, "command")]
        lines.append(f"| {name} | {', '.join(map(str, used))} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "busy_machine.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
