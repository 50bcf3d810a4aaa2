"""pytest configuration for the nhgd_ext tests.

The helpers live in tests/nhgd_testing.py; this folder is put on sys.path so
that the test modules can import them under any pytest import mode.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_REPO = Path(__file__).resolve().parent.parent


def _stale_module() -> str | None:
    """In a checkout, the compiled module if a file of csrc/ is newer: the
    tests would run old kernels. (The package itself never scans csrc/.)"""
    spec = importlib.util.find_spec("nhgd_ext._C")
    if spec is None or spec.origin is None or not (_REPO / "csrc").is_dir():
        return None
    built = os.path.getmtime(spec.origin)
    newer = [p for p in (_REPO / "csrc").rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh"}
             and os.path.getmtime(p) > built]
    return f"{spec.origin} is older than {newer[0]}" if newer else None


def pytest_sessionstart(session):
    stale = _stale_module()
    if stale:
        raise pytest.UsageError(f"{stale}: rebuild the extension first "
                                "(pip install --no-build-isolation -e .), or run bash scripts/test.sh")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same global RNG state (the tests themselves
    draw from seeded generators; this covers anything that does not)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def one_thread_each():
    """One intra-op thread for the test's own thread (a pipeline's producer):
    on two cores the producer and the consumer get one each, as OpenMP teams
    fighting for busy cores make every update slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_report_header(config):
    try:
        import nhgd_ext

        return (f"nhgd_ext backend: cpu={nhgd_ext.backend('cpu')} default={nhgd_ext.backend()} "
                f"compiled_with_cuda={nhgd_ext.compiled_with_cuda()} cuda_visible={torch.cuda.is_available()}"
                + ("" if torch.cuda.is_available() else
                   "\nno GPU visible: the device='cuda' cases of the parametrized tests are not generated, "
                   "and the GPU-only tests skip"))
    except Exception as err:  # noqa: BLE001 - a header must not break collection
        return f"nhgd_ext backend: import failed: {err!r}"
