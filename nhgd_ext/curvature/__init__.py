"""Inverse-curvature state for NHGD (DESIGN.md §3.2)."""

from .dense import DenseEFIM

__all__ = ["DenseEFIM"]
