"""--threads and the free-core count behind its default."""

from __future__ import annotations

import pytest
import torch

from nhgd_ext import _cores
from nhgd_ext.cli import main


def fake_counters(monkeypatch, busy_per_second: float, cores: int = 2) -> None:
    """/proc/stat as if other processes kept ``busy_per_second`` cores busy."""
    clock = {"t": 0.0}
    monkeypatch.setattr(_cores, "usable_cores", lambda: list(range(cores)))
    monkeypatch.setattr(_cores.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    monkeypatch.setattr(_cores.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(_cores, "_busy_seconds", lambda c: busy_per_second * clock["t"])
    monkeypatch.setattr(_cores, "_own_cpu_seconds", lambda: 0.0)


@pytest.mark.parametrize("busy, free", [(0.0, 2), (0.3, 2), (0.9, 1), (1.0, 1), (2.0, 1), (5.0, 1)])
def test_free_cores_subtracts_what_others_keep_busy_and_leaves_at_least_one(monkeypatch, busy, free):
    fake_counters(monkeypatch, busy)
    assert _cores.free_cores() == free


def test_free_cores_counts_every_core_where_there_are_no_counters(monkeypatch):
    monkeypatch.setattr(_cores, "usable_cores", lambda: [0, 1, 2])
    monkeypatch.setattr(_cores, "_busy_seconds", lambda c: None)
    assert _cores.free_cores() == 3


def test_free_cores_reads_this_machine():
    found = _cores.free_cores(window=0.05)
    assert 1 <= found <= len(_cores.usable_cores())


def test_threads_auto_sets_the_free_cores_for_the_run_and_puts_the_count_back(monkeypatch, tmp_path):
    import nhgd_ext.cli as cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_cores, "free_cores", lambda: 1)
    seen = []
    monkeypatch.setattr(cli, "_compare", lambda *a, **k: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["run", "quadratic", "--out", str(tmp_path)]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    assert main(["run", "quadratic", "--threads", "3", "--out", str(tmp_path)]) == 0
    assert seen[-1] == 3 and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins over auto
    monkeypatch.setattr(_cores, "free_cores", lambda: pytest.fail("measured although OMP_NUM_THREADS is set"))
    assert main(["run", "quadratic", "--out", str(tmp_path)]) == 0
    assert seen[-1] == before


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_thread_count_is_refused(value, capsys, tmp_path):
    assert main(["run", "quadratic", "--threads", value, "--out", str(tmp_path)]) == 2
    assert "argument --threads: must be a positive number or 'auto'" in capsys.readouterr().err


def test_free_cores_is_exported():
    import nhgd_ext

    assert nhgd_ext.free_cores is _cores.free_cores
