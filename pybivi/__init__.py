"""pybivi: biophysical, contrastive analysis of single-cell CRISPR screens in Pyro.

The public names are imported lazily so that ``import pybivi`` stays cheap and a
sub-package (for example :mod:`pybivi.cme`) can be used on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "cme",
    "schemes",
    "distributions",
    "datasets",
    "pp",
    "metrics",
    "de",
    "de_report",
    "ppc",
    "posterior",
    "plotting",
)

_PUBLIC_CLASSES = {
    "ContrastiveBiVI": "pybivi.models",
    "BiVI": "pybivi.models",
    "SCVI": "pybivi.models",
    "ContrastiveVI": "pybivi.models",
    "BivariateCME": "pybivi.distributions",
}

__all__ = [*_SUBMODULES, *_PUBLIC_CLASSES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"pybivi.{name}")
    if name in _PUBLIC_CLASSES:
        return getattr(importlib.import_module(_PUBLIC_CLASSES[name]), name)
    raise AttributeError(f"module 'pybivi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
