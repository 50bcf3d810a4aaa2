"""The runner and ``python -m nhgd_ext`` end to end, on tiny settings."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nhgd_ext.cli import main
from nhgd_ext.problems import HyperDataCleaning, SyntheticQuadratic
from nhgd_ext.runner import History, make_estimator, method_spec, run

ROOT = Path(__file__).resolve().parent.parent


def test_run_records_every_outer_step_and_times_only_the_loops():
    problem = SyntheticQuadratic.random(5, 3, mu=0.5, L=2.0, seed=1, noise=0.0, batch_size=None)
    history = run(problem, "cg10", outer_steps=4, inner_steps=3)
    assert isinstance(history, History)
    assert [row["step"] for row in history.rows] == [0, 1, 2, 3, 4]
    times = [row["wall_time"] for row in history.rows]
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    assert {"outer_loss", "grad_norm_sq", "inner_distance"} <= history.rows[-1].keys()


def test_exact_hypergradient_descent_lowers_the_quadratic_objective():
    problem = SyntheticQuadratic.random(6, 4, mu=1.0, L=3.0, seed=2, noise=0.0, batch_size=None)
    history = run(problem, "cg40", outer_steps=30, inner_steps=20, outer_lr=0.2)
    assert history.rows[-1]["grad_norm_sq"] < 1e-3 * history.rows[0]["grad_norm_sq"]


def test_none_trains_the_inner_problem_and_leaves_v_alone():
    problem = HyperDataCleaning(seed=0, n_train=200, n_val=50)
    v_before = [v.detach().clone() for v in problem.outer_params]
    history = run(problem, "none", outer_steps=3, inner_steps=5)
    assert all(torch.equal(a, b.detach()) for a, b in zip(v_before, problem.outer_params))
    assert history.rows[-1]["outer_loss"] < history.rows[0]["outer_loss"]


def test_method_names():
    assert method_spec("cg25")[1] == {"iters": 25}
    assert method_spec("neumann3")[1] == {"iters": 3}
    for bad in ("cg0", "newton", "NHGD"):
        with pytest.raises(ValueError, match="unknown method"):
            method_spec(bad)


def test_problem_options_reach_the_estimator_and_kfac_finds_the_model():
    problem = HyperDataCleaning(seed=0, n_train=100, n_val=20)
    est = make_estimator(problem, "nhgd-kfac")
    assert est.curvature.layers[0].module is problem.model
    assert make_estimator(problem, "neumann10").scale == problem.settings.method_options["neumann10"]["scale"]
    with pytest.raises(ValueError, match="nn.Linear"):
        make_estimator(SyntheticQuadratic(seed=0), "nhgd-kfac")


def test_sampled_fisher_gets_the_problems_outputs():
    from nhgd_ext.problems import DataDistillation

    problem = DataDistillation(seed=0, n_train=200)
    loss, logits = problem.inner_loss_and_outputs(reduction="none")
    assert logits.shape == (loss.numel(), 10)
    assert torch.equal(loss, problem.inner_loss(reduction="none"))
    history = run(problem, "nhgd-sampled", outer_steps=2, inner_steps=3)
    assert all(torch.isfinite(torch.tensor(value)) for value in history.final.values())
    with pytest.raises(ValueError, match="does not give them"):
        run(HyperDataCleaning(seed=0, n_train=100, n_val=20), "nhgd-sampled", outer_steps=1, inner_steps=1)


def test_cli_run_writes_its_files_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["run", "quadratic", "--methods", "nhgd,cg10,none", "--outer-steps", "3", "--inner-steps", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for method in ("nhgd", "cg10", "none"):
        assert any(line.split()[:1] == [method] for line in printed.splitlines())
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"nhgd", "cg10", "none"}
    assert results["headline_metric"] == "grad_norm_sq"
    assert results["methods"]["cg10"]["outer_steps"] == 3
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert len(rows) == 3 * 4 and {r["method"] for r in rows} == {"nhgd", "cg10", "none"}
    for png in ("outer_loss.png", "grad_norm_sq.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_cleaning_shows_the_val_only_reference(tmp_path, capsys):
    code = main(["run", "cleaning", "--methods", "cg10,none", "--outer-steps", "2", "--inner-steps", "2",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val-only" in printed and "test_accuracy" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["methods"]["cg10"]["test_accuracy"] <= 1.0
    assert "val-only" in results["references"]


def test_pipelined_runs_give_the_synchronous_numbers_and_leave_the_threads_as_they_were():
    """Algorithm 2 in the runner: the same outer losses and metrics step for
    step (float64, so a thread split cannot move a rounding), the consumer's
    thread share taken from the producer's for the run only."""
    problem = HyperDataCleaning(seed=0, n_train=120, n_val=30, batch_size=16, dtype=torch.float64)
    threads = torch.get_num_threads()
    sync = run(copy.deepcopy(problem), "nhgd", outer_steps=3, inner_steps=4)
    piped = run(copy.deepcopy(problem), "nhgd", outer_steps=3, inner_steps=4, pipeline=True)
    named = run(copy.deepcopy(problem), "nhgd-pipelined", outer_steps=3, inner_steps=4)
    assert torch.get_num_threads() == threads
    assert piped.method == named.method == "nhgd-pipelined"
    for a, b, c in zip(sync.rows, piped.rows, named.rows):
        for key in ("outer_loss", "test_accuracy", "weight_auc"):
            assert a[key] == pytest.approx(b[key], rel=1e-12) and b[key] == pytest.approx(c[key], rel=1e-12)
    assert method_spec("nhgd-kfac-refine2-pipelined")[1] == {"curvature": "kfac", "refine": 2, "pipeline": True}
    with pytest.raises(ValueError, match="only the NHGD methods run pipelined"):
        method_spec("cg10-pipelined")
    with pytest.raises(ValueError, match="argument 'pipeline' is for the NHGD methods"):
        run(problem, "cg10", outer_steps=1, inner_steps=1, pipeline=True)


def test_pipeline_options_split_the_cpu_threads():
    from nhgd_ext.runner import pipeline_options

    old = torch.get_num_threads()
    try:
        for total, producer, consumer in ((1, 1, 1), (2, 1, 1), (4, 2, 2), (5, 3, 2)):
            torch.set_num_threads(total)
            assert pipeline_options(torch.device("cpu")) == (producer, {"consumer_threads": consumer})
        assert pipeline_options(torch.device("cpu"), {"consumer_threads": 3}) == (2, {"consumer_threads": 3})
    finally:
        torch.set_num_threads(old)


def test_cli_pipeline_flag_adds_the_pipelined_twin_of_every_nhgd_method(tmp_path, capsys):
    code = main(["run", "cleaning", "--data", "mnist", "--methods", "nhgd,cg10", "--pipeline", "--outer-steps", "2",
                 "--inner-steps", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cleaning on mnist" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == ["nhgd", "nhgd-pipelined", "cg10"]
    assert results["config"]["data"] == "mnist"
    assert results["methods"]["nhgd"]["final_outer_loss"] == pytest.approx(
        results["methods"]["nhgd-pipelined"]["final_outer_loss"], rel=1e-6)


def test_demo_runs_cleaning_on_the_embedded_mnist_with_nhgd_pipelined(tmp_path, capsys):
    from nhgd_ext.cli import DEMO_METHODS

    assert main(["demo", "--outer-steps", "2", "--inner-steps", "2", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "cleaning on mnist" in printed and "val-only" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == DEMO_METHODS and "nhgd-pipelined" in DEMO_METHODS
    assert results["config"]["data"] == "mnist"


def test_nhgd_kfac_on_a_pinn_is_refused_before_the_problem_is_built(monkeypatch, capsys):
    """K-FAC's factors cannot see a residual's input derivatives: refused by
    name (and its variants), before the heat problem's pretraining."""
    from nhgd_ext import problems

    def never(*args, **kwargs):
        raise AssertionError("the problem was built")

    monkeypatch.setattr(problems, "HeatPDEControl", type("Stub", (problems.HeatPDEControl,), {"__init__": never}))
    for method in ("nhgd-kfac", "nhgd-kfac-refine2", "nhgd-kfac-pipelined"):
        assert main(["run", "heat-pde", "--methods", f"cg10,{method}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"method '{method}' does not fit problem 'heat-pde': K-FAC's Kronecker factors" in err
    from nhgd_ext.problems import PoissonControl1D

    with pytest.raises(ValueError, match="does not fit problem 'poisson'"):
        run(PoissonControl1D(seed=0), "nhgd-kfac", outer_steps=1, inner_steps=1)


@pytest.mark.parametrize("argv, says", [
    (["run", "sudoku"], "unknown problem"),
    (["run", "quadratic", "--methods", "cg10,newton"], "unknown method"),
    (["run", "quadratic", "--outer-steps", "0"], "--outer-steps"),
    (["run", "quadratic", "--inner-steps", "-3"], "--inner-steps"),
    (["run", "cleaning", "--data-dir", "/nonexistent/mnist"], "train-images-idx3-ubyte"),
    (["run", "quadratic", "--data-dir", "/tmp"], "--data-dir"),
    (["run", "quadratic", "--outer-steps", "many"], "--outer-steps"),
    (["run", "quadratic", "--methods", "nhgd-sampled"], "does not give them"),
    (["run", "quadratic", "--data", "mnist"], "argument --data: problem 'quadratic' uses no data set"),
    (["run", "cleaning", "--data", "mnist", "--data-dir", "/tmp"], "give one of them"),
    (["run", "cleaning", "--data", "cifar"], "invalid choice"),
    (["run", "cleaning", "--methods", "cg10-pipelined"], "only the NHGD methods run pipelined"),
    (["run", "quadratic", "--device", "foo"], "argument --device: must be cpu, cuda or cuda:N, got 'foo'"),
    (["run", "quadratic", "--device", "mps"], "argument --device: must be cpu, cuda or cuda:N, got 'mps'"),
    (["run", "quadratic", "--seed", "99999999999999999999999"], "argument --seed: must lie in [0, 2**63)"),
    (["run", "quadratic", "--seed", "-1"], "argument --seed: must lie in [0, 2**63)"),
    (["run", "quadratic", "--methods", "nhgd,cg10,nhgd"], "argument --methods: nhgd listed more than once"),
    (["run", "quadratic", "--last", "-3"], "argument --last: must be a positive number of steps, got -3"),
    (["run", "quadratic", "--last", "0"], "argument --last: must be a positive number"),
    (["fly"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, says, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[:1] == ["run"] else [])) == 2
    err = capsys.readouterr().err
    assert says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_results_json_is_strict_json_with_null_for_a_non_finite_figure(tmp_path):
    from nhgd_ext import report

    history = History(problem="p", method="m", rows=[{"step": 0, "wall_time": 0.0, "outer_loss": 1.0},
                                                     {"step": 1, "wall_time": 0.1, "outer_loss": float("nan")}])
    report.write_all(tmp_path, [history], {"ref": {"outer_loss": float("inf")}}, {"seed": 0}, 1)
    text = (tmp_path / "results.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in results.json"))
    assert strict["methods"]["m"]["final_outer_loss"] is None and strict["references"]["ref"]["outer_loss"] is None


def test_an_unusable_out_folder_is_refused_before_any_method_runs(tmp_path, capsys, monkeypatch):
    import nhgd_ext.cli as cli

    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("a method ran"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    for out, says in ((a_file, "is a file, not a folder"), (a_file / "below", "cannot create")):
        assert main(["run", "quadratic", "--methods", "cg10", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "keep me"


def test_python_dash_m_exits_2_without_a_traceback():
    env = dict(os.environ, NHGD_WITH_CUDA=os.environ.get("NHGD_WITH_CUDA", "0"))
    done = subprocess.run([sys.executable, "-m", "nhgd_ext", "run", "quadratic", "--methods", "bogus"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("nhgd_ext: error")]
    assert lines == ["nhgd_ext: error: unknown method 'bogus'; choose from " + lines[0].split("choose from ")[1]]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [
    ["run", "quadratic", "--methods", "cg10,none,nhgd-kfac", "--outer-steps", "3000"],
    ["run", "cleaning", "--methods", "none,cg10,nhgd-sampled"],
    ["run", "quadratic", "--methods", "cg10,none,newton"],
])
def test_every_method_is_checked_before_the_first_one_runs(argv, tmp_path, capsys, monkeypatch):
    import nhgd_ext.cli as cli

    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("a method ran before all were checked"))
    assert main(argv + ["--out", str(tmp_path), "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def strict_json(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in {path}"))


def test_diverged_methods_are_marked_with_step_and_quantity_and_exit_1(tmp_path, capsys):
    """An inner step size of 1e30 sends every method's inner loss to infinity
    in the first outer step: each is marked, its figures are null, the run
    goes on to the next method, and the exit status is 1."""
    methods = ["nhgd", "cg10", "none"]
    assert main(["run", "cleaning", "--methods", ",".join(methods), "--inner-lr", "1e30", "--outer-steps", "3",
                 "--out", str(tmp_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "3 of 3 methods diverged: nhgd at outer step 1 (the inner loss)" in captured.err
    assert captured.out.count("diverged at step 1 (the inner loss)") == 3
    results = strict_json(tmp_path / "results.json")
    for method in methods:
        figures = results["methods"][method]
        assert figures["status"] == "diverged"
        assert figures["diverged"]["step"] == 1 and figures["diverged"]["quantity"] == "the inner loss"
        assert figures["final_outer_loss"] is None and figures["test_accuracy"] is None
        assert figures["final_metrics"] == {}
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"diverged"} and {r["step"] for r in rows} == {"0"}  # no NaN rows


def test_a_curvature_that_loses_definiteness_is_a_divergence_not_a_traceback(tmp_path, capsys):
    """Outer step 1e6 on the quadratic: theta's gradients grow past what
    F + damping I can hold in float64. NHGD is marked diverged (the
    curvature); CG goes on with finite, huge figures."""
    assert main(["run", "quadratic", "--methods", "nhgd,cg10", "--outer-lr", "1e6", "--outer-steps", "3",
                 "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nhgd at outer step 2 (the curvature)" in err
    results = strict_json(tmp_path / "results.json")
    assert results["methods"]["nhgd"]["status"] == "diverged"
    assert results["methods"]["cg10"]["status"] == "finished"


def test_results_record_the_settings_used_and_label_the_memory_and_the_mean(tmp_path, capsys):
    assert main(["run", "quadratic", "--methods", "cg10", "--outer-steps", "2", "--last", "1000",
                 "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = strict_json(tmp_path / "results.json")
    config = results["config"]
    assert (config["outer_steps"], config["inner_steps"], config["inner_lr"], config["outer_lr"]) == (2, 1, 5.0, 0.05)
    assert "outer_loss_mean_last_2" in results["methods"]["cg10"]  # --last 1000 on 2 steps: labelled 2
    assert "mean last 2" in printed and "RSS growth [MB]" in printed and "peak mem" not in printed


def test_default_settings_in_the_help_are_the_problems_own():
    from nhgd_ext import problems
    from nhgd_ext.cli import DEFAULT_SETTINGS, PROBLEMS

    built = {("cleaning", "digits"): problems.HyperDataCleaning(),
             ("cleaning", "mnist"): problems.HyperDataCleaning(data="mnist"),
             ("distillation", "digits"): problems.DataDistillation(),
             ("distillation", "mnist"): problems.DataDistillation(data="mnist"),
             ("heat-pde", ""): problems.HeatPDEControl(n_interior=16, n_boundary_per_side=4, n_initial=4, n_test=8,
                                                       batch_size=None, pretrain_steps=0),
             ("poisson", ""): problems.PoissonControl1D(),
             ("quadratic", ""): problems.SyntheticQuadratic()}
    assert set(DEFAULT_SETTINGS) == set(PROBLEMS)
    for (name, data), problem in built.items():
        s = problem.settings
        assert DEFAULT_SETTINGS[name][data] == (s.outer_steps, s.inner_steps, s.inner_lr, s.outer_lr), name


@pytest.mark.heavy
def test_ctrl_c_writes_what_had_finished_and_the_interrupted_history(tmp_path):
    """SIGINT once the first method's results are on disk: exit 130, 'none'
    finished, 'nhgd' marked interrupted with the steps it made, and the
    message on a line of its own."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nhgd_ext", "run", "cleaning", "--methods", "none,nhgd",
                             "--outer-steps", "3000", "--inner-steps", "1", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "results.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(2.0)  # nhgd's warm-up step, then some of its steps (about 8 ms each)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert any(line.startswith("nhgd_ext: interrupted during nhgd") for line in err.splitlines())
    results = strict_json(tmp_path / "results.json")
    assert results["config"]["interrupted"] is True
    assert results["methods"]["none"]["status"] == "finished"
    assert results["methods"]["none"]["outer_steps"] == 3000
    stopped = results["methods"]["nhgd"]
    assert stopped["status"] == "interrupted" and 0 < stopped["outer_steps"] < 3000
    assert stopped["final_outer_loss"] is not None
    assert (tmp_path / "outer_loss.png").exists()


def test_plots_give_every_method_its_own_style_draw_the_references_and_name_the_axes():
    from nhgd_ext import report

    histories = [History(problem="cleaning", method=f"m{i}",
                         rows=[{"step": s, "wall_time": 0.1 * s, "outer_loss": 1.0 / (s + 1 + i),
                                "test_accuracy": 0.5 + 0.01 * s} for s in range(3)]) for i in range(13)]
    histories[3].diverged = {"step": 3, "quantity": "the inner loss", "message": ""}
    fig = report.figure(histories, "test_accuracy", {"val-only": {"test_accuracy": 0.83}})
    by_step, by_time = fig.axes
    styles = {(line.get_color(), line.get_linestyle()) for line in by_step.get_lines()[:13]}
    assert len(styles) == 13  # no two methods alike (tab10 repeats its colours after ten)
    labels = [t.get_text() for t in by_time.get_legend().get_texts()]
    assert "val-only" in labels and "m3 (diverged)" in labels
    assert any(line.get_ydata()[0] == 0.83 for line in by_step.get_lines()[13:])  # the reference on both panels
    assert by_step.get_ylabel() == "test accuracy" and report.LABELS["grad_norm_sq"] == "squared hypergradient norm"


def _broken_idx_folder(folder: Path, how: str) -> None:
    import numpy as np
    from test_problems_data import write_idx, write_mnist_folder

    from nhgd_ext.problems import data

    write_mnist_folder(folder, gz=how == "damaged gzip")
    if how == "damaged gzip":
        path = folder / "train-images-idx3-ubyte.gz"
        raw = bytearray(path.read_bytes())
        raw[33] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif how == "no images":
        write_idx(folder / data.IDX_FILES["train_images"], np.zeros((0, 5, 3)))
        write_idx(folder / data.IDX_FILES["train_labels"], np.zeros(0))
    else:
        labels = np.arange(60) % 10
        labels[5] = 200
        write_idx(folder / data.IDX_FILES["train_labels"], labels)


@pytest.mark.parametrize("how, says", [("damaged gzip", "could not be read"), ("no images", "holds no pixels"),
                                       ("label 200", "labels go up to 200 but 190 classes have none")])
def test_a_broken_idx_folder_gives_one_line_and_exit_2(how, says, tmp_path, capsys):
    folder = tmp_path / "idx"
    folder.mkdir()
    _broken_idx_folder(folder, how)
    assert main(["run", "cleaning", "--data-dir", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--outer-steps", "--inner-steps", "--inner-lr", "--outer-lr"):
        assert f"{flag} {flag[2:].upper().replace('-', '_')} default: the problem's own, cleaning" in text
    assert "--device DEVICE cpu, cuda or cuda:N (default: cpu)" in text
    assert "--threads THREADS torch's intra-op threads" in text and "Exit status: 0" in text
