"""pybivi: biophysical, contrastive analysis of single-cell CRISPR screens in Pyro.

Layout (the scverse convention): the model classes at the top level; :mod:`pybivi.pp`
(preparation), :mod:`pybivi.tl` (differential tests, metrics, posterior-predictive checks),
:mod:`pybivi.pl` (figures), :mod:`pybivi.datasets` (reading, the simulator and scoring
against its truth), :mod:`pybivi.report` (the HTML report and pipelines); numerics in
:mod:`pybivi.cme`, reaction schemes in :mod:`pybivi.schemes`, Pyro distributions in
:mod:`pybivi.distributions`.

The public names are imported lazily so that ``import pybivi`` stays cheap and a
sub-package (for example :mod:`pybivi.cme`) can be used on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

from pybivi import _moved

__version__ = "0.1.0"

_SUBMODULES = (
    "pp",
    "tl",
    "pl",
    "datasets",
    "report",
    "posterior",
    "schemes",
    "distributions",
    "cme",
)

_PUBLIC_CLASSES = {
    "ContrastiveBiVI": "pybivi.models",
    "BiVI": "pybivi.models",
    "SCVI": "pybivi.models",
    "ContrastiveVI": "pybivi.models",
    "BivariateCME": "pybivi.distributions",
}

__all__ = [*_SUBMODULES, *_PUBLIC_CLASSES, "__version__"]


# Modules that moved into the pp/tl/pl/datasets/report layout stay importable from their old
# names for one release, with a DeprecationWarning (see pybivi._moved).
_moved.install()


def __getattr__(name: str) -> Any:
    if name in _moved.OLD_MODULES:
        return importlib.import_module(f"pybivi.{name}")
    if name in _SUBMODULES:
        return importlib.import_module(f"pybivi.{name}")
    if name in _PUBLIC_CLASSES:
        return getattr(importlib.import_module(_PUBLIC_CLASSES[name]), name)
    raise AttributeError(f"module 'pybivi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
