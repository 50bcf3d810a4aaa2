"""``--json PATH`` for the timed scripts: what a script printed, as data.

The printed tables are for people (bench/RESULTS.md quotes them); the JSON
is for checks: tests/test_bench_scripts.py recomputes every printed ratio
from the medians and every median from the raw times, which no search in
the printed text can do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the setup, the medians and raw times (seconds) and the printed "
                             "ratios to PATH as JSON")


def write_json(path: str | None, setup: dict, **results) -> None:
    """Write ``{"script", "setup", **results}`` to ``path`` (nothing without
    one). The thread count is read back from torch here rather than taken
    from the command line, so a script that forgot to pin it shows."""
    if not path:
        return
    report = {"script": Path(sys.argv[0]).stem,
              "setup": {"torch": torch.__version__, "threads": torch.get_num_threads(), **setup},
              **results}
    # allow_nan (the default) on purpose: a NaN or infinite time must reach
    # the check that looks for it, not abort the run that measured it.
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
