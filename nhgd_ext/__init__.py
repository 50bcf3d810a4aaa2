"""nhgd_ext: bilevel optimization by Natural Hypergradient Descent, as a PyTorch extension."""

from . import ops
from ._build import backend, compiled_with_cuda
from ._finite import NonFiniteError

__version__ = "0.1.0"
__all__ = ["NonFiniteError", "backend", "compiled_with_cuda", "free_cores", "ops", "run", "__version__"]


def __getattr__(name: str):
    # nhgd_ext.run(problem, method, ...) -> History; imported on first use so
    # that the operators alone do not pull in the problems and their data.
    if name == "run":
        from .runner import run

        return run
    if name == "free_cores":  # the cores other processes leave free: a thread count for a shared machine
        from ._cores import free_cores

        return free_cores
    raise AttributeError(f"module 'nhgd_ext' has no attribute {name!r}")
