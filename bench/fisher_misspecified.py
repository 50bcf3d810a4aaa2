"""How does the empirical-Fisher substitute compare with the exact
hypergradient when the model is misspecified? Relative error of NHGD's
hypergradient (dense, running average, per-sample rows) against the exact
one (dense float64 Hessian), with ``fisher="empirical"`` and ``"sampled"``,
on a softmax regression whose training labels are replaced by a random class
with probability ``noise`` (tests/nhgd_testing.py:misspecified_fisher_error).

    .venv/bin/python bench/fisher_misspecified.py [--seeds 5] [--steps 400]

Errors only, no timings: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nhgd_testing import misspecified_fisher_error  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.6])
    args = parser.parse_args()
    print("| label noise | empirical: median (max) rel. error | sampled: median (max) rel. error |")
    print("|---|---|---|")
    for noise in args.noise:
        row = []
        for fisher in ("empirical", "sampled"):
            errors = [misspecified_fisher_error(noise, fisher, seed=s, steps=args.steps) for s in range(args.seeds)]
            row.append(f"{statistics.median(errors):.3f} ({max(errors):.3f})")
        print(f"| {noise:.1f} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
