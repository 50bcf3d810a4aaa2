"""Which implementation runs. CI sets NHGD_REQUIRE_COMPILED=1 and
NHGD_REQUIRE_CUDA_BUILD=1, so a silent fallback to the reference fails CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import nhgd_ext
from nhgd_testing import CUDA, env_flag

BACKENDS = {"cpp", "cuda", "reference"}


def test_backend_values():
    assert nhgd_ext.backend() in BACKENDS
    assert nhgd_ext.backend("cpu") in {"cpp", "reference"}
    assert nhgd_ext.backend(torch.device("cpu")) == nhgd_ext.backend("cpu")
    assert isinstance(nhgd_ext.compiled_with_cuda(), bool)
    if nhgd_ext.backend("cpu") == "reference":
        assert nhgd_ext.backend() == "reference"
        assert nhgd_ext.compiled_with_cuda() is False
    if nhgd_ext.backend() == "cuda":
        assert CUDA and nhgd_ext.compiled_with_cuda()
    if CUDA and nhgd_ext.compiled_with_cuda():
        assert nhgd_ext.backend() == "cuda"
        assert nhgd_ext.backend("cuda") == "cuda"
    if not CUDA:
        assert nhgd_ext.backend() != "cuda"


def test_compiled_with_cuda_matches_the_operator():
    if nhgd_ext.backend("cpu") == "cpp":
        assert nhgd_ext.compiled_with_cuda() == bool(torch.ops.nhgd_ext._compiled_with_cuda())


@pytest.mark.skipif(not env_flag("NHGD_REQUIRE_COMPILED"), reason="NHGD_REQUIRE_COMPILED is not set")
def test_compiled_backend_required():
    assert nhgd_ext.backend("cpu") == "cpp", "the compiled CPU extension did not load (silent fallback?)"
    if CUDA:
        assert nhgd_ext.backend() == "cuda"


@pytest.mark.skipif(not env_flag("NHGD_REQUIRE_CUDA_BUILD"), reason="NHGD_REQUIRE_CUDA_BUILD is not set")
def test_cuda_build_required():
    assert nhgd_ext.compiled_with_cuda() is True, "the extension was built without its CUDA kernels"


_PROBE = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, nhgd_ext
    from nhgd_ext import ops
    kind = nhgd_ext.backend("cpu")
    A = torch.eye(2)
    ops.sherman_morrison_(A, torch.ones(2), 0.5, 0.5)
print(json.dumps({"backend": kind, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def _probe(env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nhgd_warnings(result):
    return [w for w in result["warnings"] if "nhgd_ext" in w or "reference" in w.lower()]


def test_forced_reference_backend_warns():
    """NHGD_BACKEND=reference: the fallback is announced, never silent."""
    result = _probe({"NHGD_BACKEND": "reference"})
    assert result["backend"] == "reference"
    assert _nhgd_warnings(result), result


def test_this_process_backend_warns_iff_reference():
    """The backend this process loaded: a reference backend warns; a compiled one does not."""
    env = {k: v for k, v in os.environ.items() if k == "NHGD_BACKEND"}
    result = _probe(env)
    assert result["backend"] == nhgd_ext.backend("cpu")
    if result["backend"] == "reference":
        assert _nhgd_warnings(result), result
    else:
        assert not [w for w in result["warnings"] if "reference" in w.lower()], result


def test_first_import_build_compiles_the_ahead_of_time_recipe(monkeypatch):
    """Where the wheel was built without torch, the first import compiles
    with torch.utils.cpp_extension.load: the same sources and flags as
    setup.py (both read _toolchain.extension_arguments). Wiring only: the
    compiler itself is not run here."""
    from torch.utils import cpp_extension

    from nhgd_ext import _build, _toolchain

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "module")
    monkeypatch.setitem(_build._state, "module", _build._state["module"])
    monkeypatch.setattr(os, "environ", dict(os.environ, NHGD_WITH_CUDA="0"))  # the build sets CUDA variables
    _build._jit_build()
    assert _build._state["module"] == "module"
    (kwargs,) = calls
    recipe = _toolchain.extension_arguments(with_cuda=False)
    assert {k: kwargs[k] for k in recipe} == recipe and kwargs["with_cuda"] is False
    assert kwargs["is_python_module"] is True and kwargs["name"] == "nhgd_ext_ops"
    assert any(s.endswith("module.cpp") for s in recipe["sources"])
    assert not any(s.endswith(".cu") for s in recipe["sources"])
