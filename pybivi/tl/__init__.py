"""Analyses of fitted models: differential tests, Bayes factors, metrics, predictive checks.

Each function returns tables (pandas) or arrays; figures of them are in :mod:`pybivi.pl`.

* :mod:`pybivi.tl.de` -- differential tests of kinetic parameters (:func:`~pybivi.tl.de.kinetic`)
  and mean expression (:func:`~pybivi.tl.de.mean`);
* :mod:`pybivi.tl.bayes_factors` -- the tests' maths as pure functions on arrays;
* :mod:`pybivi.tl.metrics` -- program ARI, entropy of batch mixing, silhouettes;
* :mod:`pybivi.tl.ppc` -- posterior-predictive checks of count statistics.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["de", "bayes_factors", "metrics", "ppc"]


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so ``import pybivi.tl`` stays cheap.
    if name in __all__:
        return importlib.import_module(f"pybivi.tl.{name}")
    raise AttributeError(f"module 'pybivi.tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
