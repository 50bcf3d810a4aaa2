"""The README's code runs as written: every Python block as a script, and
every ``python -m nhgd_ext`` command line is accepted by the parser."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.heavy  # every block runs as a script in a fresh interpreter


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


BLOCKS = re.findall(r"```python\n(.*?)```", readme(), re.S)


def run_script(tmp_path, script: str) -> subprocess.CompletedProcess:
    path = tmp_path / "block.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)


def test_the_readme_has_its_three_python_blocks():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_runs_as_written(tmp_path, index):
    done = run_script(tmp_path, BLOCKS[index])
    assert done.returncode == 0, done.stderr


def test_the_loop_example_moves_the_weight_and_reports_a_loss(tmp_path):
    section = readme()[readme().index("## Hypergradients in your own loop"):]
    done = run_script(tmp_path, re.search(r"```python\n(.*?)```", section, re.S).group(1))
    match = re.search(r"L2 weight ([0-9.]+), validation loss ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    # the outer step moved the weight off its start, exp(-3) = 0.0498, and the loss is a loss
    assert abs(float(match.group(1)) - 0.0498) > 1e-3
    assert 0.0 < float(match.group(2)) < 0.7


def command_lines() -> list[list[str]]:
    """Every ``python -m nhgd_ext ...`` line (continuations joined), its
    ``a|b`` alternatives and ``[optional]`` parts resolved to the first choice."""
    text = readme().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("python -m nhgd_ext"):
            continue
        line = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(" | ")[0], line)  # [x | y]: x
        line = re.sub(r"([\w-]+)(\|[\w-]+)+", r"\1", line)  # a|b|c: a
        words = shlex.split(line)[3:]
        found.append([w.rstrip(",") for w in words])
    return found


def test_every_command_line_in_the_readme_parses():
    from nhgd_ext.cli import build_parser

    lines = command_lines()
    assert len(lines) >= 3
    for words in lines:
        args = build_parser().parse_args(_placeholders(words))
        assert args.command in ("demo", "run")


def _placeholders(words: list[str]) -> list[str]:
    """The README's placeholders (K, T, S, PATH, DIR) as values the parser takes."""
    values = {"K": "3", "T": "2", "S": "0", "PATH": "/tmp", "DIR": "/tmp/out", "N": "1"}
    return [values.get(w, w) for w in words]
