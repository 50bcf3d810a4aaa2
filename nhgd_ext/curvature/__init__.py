"""Inverse-curvature state for NHGD (docs/design.md §3.2)."""

from .dense import DenseEFIM
from .kfac import KFAC

__all__ = ["DenseEFIM", "KFAC"]
