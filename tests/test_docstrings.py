"""Every public name says what it is: the classes and functions the
packages export, and their public methods and properties (a docstring of
the method they override counts)."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = ["nhgd_ext", "nhgd_ext.ops", "nhgd_ext.curvature", "nhgd_ext.estimators", "nhgd_ext.pipeline",
           "nhgd_ext.problems", "nhgd_ext.runner", "nhgd_ext.report", "nhgd_ext.cli"]


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
    missing = []
    for name in names:
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not obj.__module__.startswith("nhgd_ext"):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for key, value in vars(obj).items():
            if key.startswith("_") or not (inspect.isfunction(value) or isinstance(value, property)):
                continue
            inherited = any((getattr(getattr(base, key, None), "__doc__", None) or "").strip()
                            for base in obj.__mro__[1:])
            if not (value.__doc__ or "").strip() and not inherited:
                missing.append(f"{name}.{key}")
    return missing


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name):
    assert undocumented(module_name) == []
