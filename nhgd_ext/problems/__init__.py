"""The paper's bilevel problems and two with closed-form hypergradients
(docs/design.md §3.5). Imported lazily: a user of one problem does not pay
for the others' dependencies (scikit-learn for the digits, for instance)."""

from __future__ import annotations

import importlib

from .base import BilevelProblem, Settings

_HOME = {
    "HyperDataCleaning": "cleaning",
    "DataDistillation": "distillation",
    "SyntheticQuadratic": "quadratic",
    "HeatPDEControl": "pde_heat",
    "PoissonControl1D": "pde_poisson",
}

__all__ = ["BilevelProblem", "Settings", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
