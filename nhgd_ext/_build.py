"""Finds an implementation of the ``torch.ops.nhgd_ext`` operators.

In order of preference: the module compiled ahead of time (``nhgd_ext._C``,
from ``pip install --no-build-isolation``), a build compiled on first import
with ``torch.utils.cpp_extension.load`` (cached in torch's extensions folder),
and, only where no compiler works, the pure-PyTorch reference with a warning.
``NHGD_BACKEND=reference`` forces the reference (for tests of the fallback).

Nothing here looks at the sources: after editing ``csrc/`` in a checkout,
rebuild (``pip install --no-build-isolation -e .``; ninja recompiles only
what changed). The test suite refuses to run on a module older than its
sources (tests/conftest.py).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from . import _toolchain

_state = {"kind": None, "with_cuda": False, "module": None}


def _jit_build() -> None:
    with_cuda = _toolchain.want_cuda()
    _toolchain.prepare_cuda_env()  # before cpp_extension reads CUDA_HOME, CUDA build or not
    from torch.utils import cpp_extension

    name = "nhgd_ext_ops_cuda" if with_cuda else "nhgd_ext_ops"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if not os.path.exists(os.path.join(build_dir, name + ".so")):
        print(
            f"nhgd_ext: compiling the C++{'/CUDA' if with_cuda else ''} operators "
            f"(first import only, a few minutes; cached in {build_dir}) ...",
            file=sys.stderr,
            flush=True,
        )
    _state["module"] = cpp_extension.load(
        name=name,
        **_toolchain.extension_arguments(with_cuda),
        with_cuda=with_cuda,
        is_python_module=True,  # the pipeline engine is a pybind11 class of the module
        verbose=os.environ.get("NHGD_VERBOSE_BUILD") == "1",
    )


def _load() -> None:
    if os.environ.get("NHGD_BACKEND") == "reference":
        _use_reference("NHGD_BACKEND=reference is set")
        return
    try:
        from . import _C  # importing registers the operators

        _state["module"] = _C
    except ImportError:
        try:
            _jit_build()
        except Exception as err:  # no compiler, broken toolchain, ...
            _use_reference(f"the C++ extension could not be compiled: {err}")
            return
    _state["kind"] = "cpp"
    _state["with_cuda"] = bool(torch.ops.nhgd_ext._compiled_with_cuda())
    if not _state["with_cuda"]:
        # CUDA tensors still work, through the reference kernels.
        from . import _reference

        _reference.register(define=False, dispatch_keys=("CUDA",))


def _use_reference(reason: str) -> None:
    from . import _reference

    warnings.warn(
        f"nhgd_ext: using the slow pure-PyTorch reference operators ({reason}).",
        RuntimeWarning,
        stacklevel=3,
    )
    _reference.register(define=True, dispatch_keys=("CPU", "CUDA"))
    _state["kind"] = "reference"


def backend(device: str | torch.device | None = None) -> str:
    """Which implementation runs the operators on ``device``.

    ``"cuda"`` (compiled CUDA kernels), ``"cpp"`` (compiled CPU kernels) or
    ``"reference"`` (pure PyTorch). Without a device: the GPU when one is
    visible and CUDA kernels were compiled, else the CPU.
    """
    if _state["kind"] == "reference":
        return "reference"
    if device is None:
        return "cuda" if _state["with_cuda"] and torch.cuda.is_available() else "cpp"
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpp"
    if kind == "cuda":
        return "cuda" if _state["with_cuda"] else "reference"
    raise ValueError(f"backend: argument 'device' must be a CPU or CUDA device, got {device!r}")


def native_module():
    """The compiled Python module (``nhgd_ext._C`` or its first-import build),
    or ``None`` when the reference operators run. It holds the classes that
    are not operators (the pipeline engine)."""
    return _state["module"] if _state["kind"] == "cpp" else None


def compiled_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels (GPU or not)."""
    return _state["kind"] == "cpp" and _state["with_cuda"]


_load()
