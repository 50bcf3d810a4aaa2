"""The benchmark scripts still run against the library (tiny settings, no
timing checked): a renamed argument or method breaks them here, not in the
next measuring session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str) -> str:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("argv, methods, reference", [
    (["cleaning", "--outer-steps", "2", "--inner-steps", "2", "--methods", "nhgd,nhgd-pipelined,cg10,none"],
     ["nhgd", "nhgd-pipelined", "cg10", "none"], "| val-only (reference) |"),
    (["distillation", "--outer-steps", "2", "--inner-steps", "1", "--methods", "nhgd-sampled,cg10"],
     ["nhgd-sampled", "cg10"], None),
    (["heat", "--scale", "small", "--outer-steps", "2", "--inner-steps", "1",
      "--methods", "nhgd-sampled,nhgd-sampled-pipelined,broyden"],
     ["nhgd-sampled", "nhgd-sampled-pipelined", "broyden"], None),
], ids=["cleaning", "distillation", "heat"])
def test_paper_tables(argv, methods, reference, tmp_path):
    """Two seeds of each table on the embedded MNIST (the heat problem at its
    small size): a row per method, the files written, one history per seed."""
    import json

    printed = _run("bench/paper_tables.py", *argv, "--seeds", "2", "--out", str(tmp_path))
    for method in methods:
        assert f"| {method} |" in printed, printed
    if reference:
        assert reference in printed, printed
    assert (tmp_path / "outer_loss_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "table.md").read_text().count("\n| ") >= len(methods)
    histories = json.loads((tmp_path / "histories.json").read_text())
    assert set(histories) == set(methods) and all(len(runs) == 2 for runs in histories.values())
    if "nhgd-pipelined" in histories:  # Algorithm 2 changes the timing, not the numbers
        synchronous, pipelined = ([r["outer_loss"] for r in histories[m][0]] for m in ("nhgd", "nhgd-pipelined"))
        assert pipelined == pytest.approx(synchronous, rel=1e-6)


def test_bench_pipeline():
    printed = _run("bench/bench_pipeline.py", "--dim", "64", "--steps", "20", "--repeats", "1")
    for mode in ("synchronous", "pipelined", "pipelined, in Python"):
        assert f"\n{mode} " in printed, printed
    assert "update / step in these runs" in printed, printed
    assert "consumer's time per update" in printed and "while the consumer drains" in printed, printed


def test_bench_curvature():
    """The microbenchmarks of DenseEFIM's cores, each run once untimed."""
    printed = _run("-m", "pytest", "bench/bench_curvature.py", "--benchmark-disable", "-q", "-p", "no:cacheprovider")
    assert "8 passed" in printed, printed


def test_bench_nhgd_step():
    printed = _run("bench/bench_nhgd_step.py", "--rounds", "1", "--steps", "2")
    for variant in ("sgd", "kfac", "dense", "dense-mean"):
        assert f"  {variant} " in printed and "x sgd" in printed, printed


def test_bench_upkeep_pde():
    printed = _run("bench/bench_upkeep_pde.py", "--outer-steps", "1", "--inner-steps", "2", "--pretrain-steps", "0",
                   "--warmup-steps", "1")
    assert "of none's loop (representation: compact" in printed, printed


def test_hypergradient_accuracy():
    printed = _run("bench/hypergradient_accuracy.py", "--problems", "logistic", "--steps", "3",
                   "--methods", "nhgd-sampled-refine2,nhgd-kfac,cg10")
    lines = [line for line in printed.splitlines() if "ms / call" in line]
    assert len(lines) == 3, printed
    assert float(lines[-1].split("error")[1].split()[0]) < 0.1, printed  # CG10 on a 31-parameter problem


def test_bench_mnist_cleaning():
    printed = _run("bench/bench_mnist_cleaning.py", "--rounds", "1", "--outer-steps", "1", "--methods", "nhgd-mean,cg10")
    assert "nhgd-mean" in printed and "x cg10" in printed, printed


def test_bench_kfac_cnn():
    printed = _run("bench/bench_kfac_cnn.py", "--threads", "1", "--repeats", "2", "--batches", "4,8")
    assert "| 4 |" in printed and "| 8 |" in printed, printed


def test_bench_busy_machine_lists_its_configurations():
    """The whole script runs the command line dozens of times (minutes);
    here only its configurations, which the table in RESULTS.md names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("busy_machine", ROOT / "bench" / "busy_machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = [name for name, *_ in module.configurations(2)]
    assert names[0] == "quiet, --threads 2" and "busy, --threads auto" in names and len(names) == 8
    result = module.run_once("1", False, {}, 1)
    assert set(result) == {"nhgd", "cg10", "command", "threads used"} and result["threads used"] == 1


def test_mutation_check_finds_each_text_it_mutates():
    """bench/mutation_check.py rebuilds the extension (minutes): here only
    that each mutation still applies to the sources as they are."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "bench" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.MUTATIONS) == 3
    for name, relative, text, replacement, args in module.MUTATIONS:
        assert (ROOT / relative).read_text().count(text) == 1, name
        assert replacement != text and all((ROOT / a).exists() for a in args if a.startswith("tests/"))
