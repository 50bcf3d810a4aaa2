"""nhgd_ext: bilevel optimization by Natural Hypergradient Descent, as a PyTorch extension."""

from ._build import backend, compiled_with_cuda
from . import ops

__version__ = "0.1.0"
__all__ = ["backend", "compiled_with_cuda", "ops", "__version__"]
