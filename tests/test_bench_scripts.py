"""The benchmark scripts still run against the library (tiny settings): a
renamed argument or method breaks them here, not in the next measuring
session. The timed scripts also write what they print as data (``--json``):
no speed is judged at these settings, but every variant must be there, every
time finite and positive, every median the median of its raw times and every
printed ratio the quotient of the medians it names, so a script that drops a
variant or divides the wrong figures fails here, not in RESULTS.md."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.heavy  # each test runs a script in a fresh interpreter


def _run(*argv: str) -> str:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _run_json(tmp_path: Path, script: str, *argv: str) -> tuple[str, dict]:
    """(what the script printed, what it wrote with --json)."""
    path = tmp_path / "report.json"
    printed = _run(f"bench/{script}.py", *argv, "--json", str(path))
    report = json.loads(path.read_text())
    assert report["script"] == script and report["setup"]["device"] == "cpu"
    return printed, report


def _assert_times(*values: float) -> None:
    for value in values:
        assert isinstance(value, float) and math.isfinite(value) and value > 0, values


def _assert_medians(medians: dict, times: dict, names, repeats: int) -> None:
    """Each name has ``repeats`` raw times, all positive, and its median is theirs."""
    assert list(medians) == list(times) == list(names)
    for name in names:
        assert len(times[name]) == repeats, name
        _assert_times(*times[name], medians[name])
        assert medians[name] == pytest.approx(statistics.median(times[name]), rel=1e-9), name


def _assert_ratios(ratios: dict, expected: dict) -> None:
    """``expected``: each ratio's name -> (numerator, denominator), as the script prints it."""
    assert set(ratios) == set(expected)
    for name, (numerator, denominator) in expected.items():
        assert math.isfinite(ratios[name]), name
        assert ratios[name] == pytest.approx(numerator / denominator, rel=1e-9), name


def _line(printed: str, start: str) -> str:
    """The one printed line that starts with ``start``."""
    lines = [line for line in printed.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, printed)
    return lines[0]


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


def test_bench_pipeline(tmp_path):
    printed, report = _run_json(tmp_path, "bench_pipeline", "--dim", "64", "--steps", "20", "--repeats", "1")
    setup = report["setup"]
    assert (setup["dim"], setup["steps"], setup["repeats"], setup["threads"]) == (64, 20, 1, 1)
    assert isinstance(setup["batch"], int) and setup["batch"] >= 1
    modes = ["sgd", "synchronous", "pipelined", "pipelined, in Python"]
    medians = report["medians"]
    _assert_medians(medians, report["times"], modes, repeats=1)
    calibration, asleep, contention = report["calibration"], report["sleeping_producer"], report["contention"]
    push = report["push"]
    assert len(push["times"]) == 1 and push["median"] == pytest.approx(statistics.median(push["times"]), rel=1e-9)
    _assert_times(calibration["update"], calibration["step"], push["median"], push["no_slot_full"],
                  asleep["alone"], asleep["synchronous"], asleep["pipelined"], *report["after_sleep"].values(),
                  contention["consumer_sleeping"], contention["consumer_busy"], contention["step_alone"],
                  *report["parallelism"].values())
    # At d = 64 the consumer may drain the queue before the producer's first
    # step: then no step was timed and the script prints 0 (a third of runs here).
    assert math.isfinite(contention["step_during"]) and contention["step_during"] >= 0
    assert asleep["sleep"] == calibration["update"]
    _assert_ratios(report["ratios"], {
        **{f"{mode} / sgd": (medians[mode], medians["sgd"]) for mode in modes},
        "update / step": (calibration["update"], calibration["step"]),
        "sleeping: synchronous / alone": (asleep["synchronous"], asleep["alone"]),
        "sleeping: pipelined / alone": (asleep["pipelined"], asleep["alone"]),
        "contention: consumer busy / sleeping": (contention["consumer_busy"], contention["consumer_sleeping"]),
        "contention: step during / alone": (contention["step_during"], contention["step_alone"]),
    })
    assert report["update_per_step_in_runs"] == pytest.approx(medians["synchronous"] / medians["sgd"] - 1,
                                                              rel=1e-9, abs=1e-12)
    for mode in modes:  # the table RESULTS.md quotes shows these medians and ratios
        assert _line(printed, f"{mode:<24}").split()[-2:] == [f"{medians[mode]:.3f}",
                                                              f"{report['ratios'][f'{mode} / sgd']:.2f}"], printed
    assert f"(update / step {report['ratios']['update / step']:.2f})" in printed, printed
    assert f"update / step in these runs (synchronous / SGD alone - 1): {report['update_per_step_in_runs']:.2f}" \
        in printed, printed
    assert "consumer's time per update" in printed and "while the consumer drains" in printed, printed


def test_bench_curvature():
    """The microbenchmarks of DenseEFIM's cores, each run once untimed."""
    printed = _run("-m", "pytest", "bench/bench_curvature.py", "--benchmark-disable", "-q", "-p", "no:cacheprovider")
    assert "8 passed" in printed, printed


def test_bench_nhgd_step(tmp_path):
    printed, report = _run_json(tmp_path, "bench_nhgd_step", "--threads", "1", "--rounds", "1", "--steps", "2")
    setup = report["setup"]
    assert (setup["threads"], setup["rounds"], setup["steps"], setup["batch"]) == (1, 1, 2, 1024)
    assert setup["d"] == 12 * 16 + 16 + 16 * 4 + 4
    variants = ["sgd", "kfac", "dense", "dense-mean"]
    medians, ratios = report["medians"], report["ratios"]
    _assert_medians(medians, report["times"], variants, repeats=1)
    _assert_ratios(ratios, {f"{name} / sgd": (medians[name], medians["sgd"]) for name in variants})
    for name in variants:
        line = _line(printed, f"  {name} ")
        assert f"{1e6 * medians[name]:.1f} us/step" in line and f"{ratios[f'{name} / sgd']:.2f} x sgd" in line, printed
    representations = setup["representations"]
    assert f"{representations['dense']} / {representations['dense-mean']}" in printed, printed


def test_bench_upkeep_pde(tmp_path):
    printed, report = _run_json(tmp_path, "bench_upkeep_pde", "--threads", "1", "--outer-steps", "1",
                                "--inner-steps", "2", "--pretrain-steps", "0", "--warmup-steps", "1")
    setup = report["setup"]
    assert (setup["threads"], setup["outer_steps"], setup["inner_steps"], setup["pretrain_steps"],
            setup["warmup_steps"]) == (1, 1, 2, 0, 1)
    assert setup["d"] == 12801  # the paper's state network
    assert report["curvature"]["representation"] == "compact"
    variants = ["none", "nhgd", "nhgd-noop"]
    medians = report["medians"]
    _assert_medians(medians, report["times"], variants, repeats=1)
    upkeep = report["upkeep"]  # a difference: at these settings its sign is noise
    assert upkeep == pytest.approx(medians["nhgd"] - medians["nhgd-noop"], rel=1e-9, abs=1e-15)
    _assert_ratios(report["ratios"], {"upkeep / none": (upkeep, medians["none"])})
    for name in variants:
        assert f"{medians[name]:.3f} s / outer step" in _line(printed, f"  {name} "), printed
    assert (f"{100 * report['ratios']['upkeep / none']:.1f}% of none's loop "
            f"(representation: {report['curvature']['representation']}") in printed, printed


def test_hypergradient_accuracy(tmp_path):
    methods = ["nhgd-sampled-refine2", "nhgd-kfac", "cg10"]
    printed, report = _run_json(tmp_path, "hypergradient_accuracy", "--threads", "1", "--problems", "logistic",
                                "--steps", "3", "--methods", ",".join(methods))
    setup = report["setup"]
    assert (setup["threads"], setup["steps"], setup["problems"], setup["calls"]) == (1, 3, ["logistic"], 5)
    logistic = report["problems"]["logistic"]
    assert logistic["d"] == 31 and list(logistic["methods"]) == methods
    for method, found in logistic["methods"].items():
        assert math.isfinite(found["error"]) and found["error"] >= 0, method
        _assert_medians({method: found["median"]}, {method: found["times"]}, [method], repeats=setup["calls"])
        _assert_times(found["feeding_per_step"])
        line = _line(printed, f"  {method} ")
        assert f"error {found['error']:9.3e}" in line and f"{1e3 * found['median']:9.2f} ms / call" in line, printed
    assert logistic["methods"]["cg10"]["error"] < 0.1  # CG10 on a 31-parameter problem


def test_bench_mnist_cleaning(tmp_path):
    printed, report = _run_json(tmp_path, "bench_mnist_cleaning", "--threads", "1", "--rounds", "1",
                                "--outer-steps", "1", "--methods", "nhgd-mean,cg10")
    setup = report["setup"]
    assert (setup["threads"], setup["rounds"], setup["outer_steps"], setup["methods"]) == (1, 1, 1,
                                                                                          ["nhgd-mean", "cg10"])
    medians = report["medians"]
    _assert_medians(medians, report["times"], setup["methods"], repeats=1)
    _assert_ratios(report["ratios"], {f"{m} / cg10": (medians[m], medians["cg10"]) for m in setup["methods"]})
    for method in setup["methods"]:
        assert math.isfinite(report["final_outer_loss"][method]), method
        line = _line(printed, f"  {method} ")
        assert (f"{1e3 * medians[method]:.1f} ms / outer step" in line
                and f"{report['ratios'][f'{method} / cg10']:.2f} x cg10" in line), printed


def test_bench_kfac_cnn(tmp_path):
    printed, report = _run_json(tmp_path, "bench_kfac_cnn", "--threads", "1", "--repeats", "2", "--batches", "4,8")
    assert (report["setup"]["threads"], report["setup"]["repeats"], report["setup"]["batches"]) == (1, 2, [4, 8])
    assert [row["batch"] for row in report["batches"]] == [4, 8]
    for row in report["batches"]:
        medians = row["medians"]
        _assert_medians(medians, row["times"], ["sgd", "kfac"], repeats=2)
        _assert_ratios(row["ratios"], {"kfac / sgd": (medians["kfac"], medians["sgd"])})
        assert (f"| {row['batch']} | {medians['sgd'] * 1e3:.2f} | {medians['kfac'] * 1e3:.2f} "
                f"| {row['ratios']['kfac / sgd']:.2f} |") in printed, printed


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
    assert len(module.MUTATIONS) == 5
    for name, relative, text, replacement, args in module.MUTATIONS:
        assert (ROOT / relative).read_text().count(text) == 1, name
        assert replacement != text and all((ROOT / a).exists() for a in args if a.startswith("tests/"))
