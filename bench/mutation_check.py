"""Whether the test suite still catches a broken kernel, a dropped argument
check (compiled, reference, Python wrapper) and a broken estimator: each mutation is applied to the sources, the
extension rebuilt where C++ changed, the tests that guard that code run, the
failures counted, and the source put back (and rebuilt).

    .venv/bin/python bench/mutation_check.py      # about 10 minutes on two cores (three rebuilds)
    .venv/bin/python bench/mutation_check.py reference wrapper   # only those (by the name's first word)

Run it from a clean tree: it edits files in place and restores them from
their text before the edit, whatever happens.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (name, file, text, replacement, pytest arguments): each replacement breaks what the tests must catch
MUTATIONS = [
    ("kernel: Sherman-Morrison's s = b / a becomes b / (2a)", "csrc/cpu/sherman_morrison.cpp",
     "  const double s = b / a;\n  // Every denominator", "  const double s = b / (2 * a);\n  // Every denominator",
     ["tests/test_sherman_morrison.py", "-x", "-q", "-k", "cpu"]),
    ("check: the state's contiguity check dropped", "csrc/checks.cpp",
     "  TORCH_CHECK_VALUE(A.is_contiguous(), op,", "  TORCH_CHECK_VALUE(true || A.is_contiguous(), op,",
     ["tests/test_bad_input.py", "-q", "-k", "strided"]),
    ("estimator: NHGD solves with f_theta halved", "nhgd_ext/estimators/nhgd.py",
     "        w = self.curvature.solve(f_theta)\n", "        w = self.curvature.solve(0.5 * f_theta)\n",
     ["tests/test_estimators_nhgd.py", "tests/test_estimators_nhgd_refine.py", "-q"]),
    ("reference check: running_average_'s status check dropped", "nhgd_ext/_reference.py",
     "    _status(op, status, L)\n", "",
     ["tests/test_bad_input.py", "-q", "-k", "running_average_ and reference"]),
    ("wrapper check: the ops' coefficients accept a string", "nhgd_ext/ops.py",
     "        elif isinstance(v, (int, float)) and not isinstance(v, bool):",
     "        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):",
     ["tests/test_bad_input.py", "-q"]),
]


def rebuild() -> None:
    env = os.environ | {"MAX_JOBS": "2"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", ".[test]"],
                   cwd=ROOT, env=env, check=True, capture_output=True)


def failures(args: list[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    found = re.search(r"(\d+) failed", summary)
    return (int(found.group(1)) if found else 0), summary


def main(only: list[str]) -> int:
    rows = []
    for name, relative, text, replacement, args in MUTATIONS:
        if only and name.split(":")[0].split()[0] not in only:
            continue
        path = ROOT / relative
        original = path.read_text()
        if original.count(text) != 1:
            raise SystemExit(f"{relative}: the text to mutate is not there exactly once")
        native = relative.startswith("csrc/")
        try:
            path.write_text(original.replace(text, replacement))
            if native:
                rebuild()
            failed, summary = failures(args)
        finally:
            path.write_text(original)
            if native:
                rebuild()
        rows.append((name, " ".join(args), failed, summary))
        print(f"{name}: {summary}", flush=True)
    print("\n| mutation | tests run | failed |\n|---|---|---|")
    for name, args, failed, _ in rows:
        print(f"| {name} | `{args}` | {failed} |")
    return 0 if all(failed > 0 for _, _, failed, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
