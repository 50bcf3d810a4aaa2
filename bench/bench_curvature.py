"""DenseEFIM's update with its compiled core (csrc/curvature/dense_efim.cpp)
against the same rules in PyTorch from Python (curvature/_dense_reference.py),
on the same state and rows: what the C++ core saves per update, before any
pipelining (docs/design.md §6).

    .venv/bin/python -m pytest bench/bench_curvature.py --benchmark-only

Both cores start from the same warmed-up state (a running average of 1100
samples, so no exact refresh falls inside the timing) and are fed the same
bank of rows, one gradient (a batch mean of 8) or one step's 32 per-sample
rows per call; compare within a group. One intra-op thread, as a pipeline's
consumer runs (``consumer_threads=1`` in bench_pipeline.py). Nothing here
asserts on a time.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nhgd_ext import _build
from nhgd_ext.curvature._dense_reference import DenseEFIMCore as ReferenceCore

pytestmark = pytest.mark.skipif(_build.native_module() is None, reason="the compiled extension is not loaded")

CORES = ["compiled", "python"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def warmed_core(kind, d):
    make = _build.native_module().DenseEFIMCore if kind == "compiled" else ReferenceCore
    core = make(d, None, 1e-3, 0.25, torch.float32, torch.device("cpu"), None)
    core.update_many(torch.randn(1100, d, generator=torch.Generator().manual_seed(0)) / d**0.5, False)
    return core


@pytest.mark.parametrize("core_kind", CORES)
@pytest.mark.parametrize("d", [256, 1024])
def test_update(benchmark, core_kind, d):
    benchmark.group = f"DenseEFIM.update d={d}"
    core = warmed_core(core_kind, d)
    bank = itertools.cycle(torch.randn(64, d, generator=torch.Generator().manual_seed(1)) / d**0.5)
    benchmark(lambda: core.update(next(bank), 8))


@pytest.mark.parametrize("core_kind", CORES)
@pytest.mark.parametrize("d", [256, 1024])
def test_update_many_per_step(benchmark, core_kind, d):
    benchmark.group = f"DenseEFIM.update_many 32 rows d={d}"
    core = warmed_core(core_kind, d)
    bank = itertools.cycle(torch.randn(8, 32, d, generator=torch.Generator().manual_seed(2)) / d**0.5)
    benchmark(lambda: core.update_many(next(bank), True))
