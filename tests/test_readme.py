"""The README's loop example is a complete script: it runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_loop_example_runs_as_written(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Hypergradients in your own loop"):]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "loop.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    match = re.search(r"L2 weight ([0-9.]+), validation loss ([0-9.]+)", done.stdout)
    assert match, done.stdout
    # the outer step moved the weight off its start, exp(-3) = 0.0498, and the loss is a loss
    assert abs(float(match.group(1)) - 0.0498) > 1e-3
    assert 0.0 < float(match.group(2)) < 0.7
