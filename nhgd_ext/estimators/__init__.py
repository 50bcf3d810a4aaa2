"""Hypergradient estimators behind one protocol (docs/design.md §3.3)."""

from .base import HypergradientEstimator
from .broyden import Broyden
from .cg import ConjugateGradient
from .neumann import Neumann
from .nhgd import NHGD
from .single_loop import SOBA, SingleLoopAID, SingleLoopITD
from .stochastic import TTSA, AmIGO, StocBiO

__all__ = [
    "HypergradientEstimator",
    "NHGD",
    "ConjugateGradient",
    "Neumann",
    "StocBiO",
    "AmIGO",
    "TTSA",
    "SOBA",
    "SingleLoopAID",
    "SingleLoopITD",
    "Broyden",
]
