"""Old module names, kept importable for one release after the move to pp/tl/pl/datasets/report.

``import pybivi.de`` (or ``from pybivi import de``) still works and gives a module whose
attributes are looked up in the new places; the import and each attribute access emit a
:class:`DeprecationWarning` naming the new place. The mapping lives here only, so removing the
old names in the next release is deleting this file and its one call.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

#: old module -> (new modules searched in order, {old attribute: (new module, new name)})
OLD_MODULES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "de": (("pybivi.tl.de", "pybivi.datasets", "pybivi.report"), {}),
    "de_group": (("pybivi.tl.de",), {}),
    "de_streams": (("pybivi.tl._de_streams",), {}),
    "de_sources": (("pybivi.tl._de_sources",), {}),
    "shrinkage": (("pybivi.tl.bayes_factors",), {}),
    "bayes_factors": (("pybivi.tl.bayes_factors",), {}),
    "metrics": (("pybivi.tl.metrics",), {}),
    "ppc": (
        ("pybivi.tl.ppc",),
        {
            "plot_ppc": ("pybivi.pl", "ppc"),
            "plot_calibration": ("pybivi.pl", "calibration"),
            "section": ("pybivi.report", "ppc_section"),
        },
    ),
    "ppc_plots": (
        ("pybivi.pl",),
        {"plot_ppc": ("pybivi.pl", "ppc"), "plot_calibration": ("pybivi.pl", "calibration")},
    ),
    "ppc_report": (("pybivi.report",), {"section": ("pybivi.report", "ppc_section")}),
    "plotting": (("pybivi.pl",), {}),
    "de_report": (
        ("pybivi.report", "pybivi.tl.de"),
        {
            "plot_call_counts": ("pybivi.pl", "call_counts"),
            "plot_overlap": ("pybivi.pl", "overlap"),
            "plot_posterior_densities": ("pybivi.pl", "posterior_densities"),
        },
    ),
    "de_truth": (("pybivi.datasets",), {}),
    "report_sections": (("pybivi.report",), {}),
    "pipeline": (("pybivi.report",), {}),
}


def _resolve(old: str, name: str) -> Any:
    places, renamed = OLD_MODULES[old]
    if name in renamed:
        module, new_name = renamed[name]
        return getattr(importlib.import_module(module), new_name), f"{module}.{new_name}"
    for module in places:
        found = importlib.import_module(module)
        if hasattr(found, name):
            return getattr(found, name), f"{module}.{name}"
    raise AttributeError(f"module 'pybivi.{old}' has no attribute {name!r}")


def _module_getattr(old: str):
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value, new = _resolve(old, name)
        warnings.warn(
            f"pybivi.{old}.{name} moved to {new}; the old name will be removed in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):  # default module creation
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__.split(".", 1)[1]
        module.__getattr__ = _module_getattr(old)  # type: ignore[method-assign]
        new = ", ".join(OLD_MODULES[old][0])
        module.__doc__ = f"Deprecated alias: the contents moved to {new}."
        warnings.warn(
            f"pybivi.{old} moved to {new}; the old module will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package == "pybivi" and old in OLD_MODULES:
            return importlib.util.spec_from_loader(fullname, _Loader())
        return None


def install() -> None:
    """Let the old module names import (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
