"""Hypergradient estimators behind one protocol (DESIGN.md §3.3)."""

from .base import HypergradientEstimator
from .cg import ConjugateGradient
from .neumann import Neumann
from .nhgd import NHGD
from .single_loop import SingleLoopAID, SingleLoopITD

__all__ = ["HypergradientEstimator", "ConjugateGradient", "Neumann", "NHGD", "SingleLoopAID", "SingleLoopITD"]
