"""Inverse-curvature state for NHGD (docs/design.md §3.2)."""

from .dense import DenseEFIM
from .kfac import KFAC
from .protocol import Curvature

__all__ = ["Curvature", "DenseEFIM", "KFAC"]
