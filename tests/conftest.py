"""pytest configuration for the nhgd_ext tests.

The helpers live in tests/nhgd_testing.py; this folder is put on sys.path so
that the test modules can import them under any pytest import mode.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
