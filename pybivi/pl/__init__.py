"""Figures (matplotlib): computed tables and arrays in, :class:`matplotlib.figure.Figure` out.

Embeddings and metrics (paper figure 2), differential-test summaries (figure 3) and
posterior-predictive checks. The numbers behind each figure come from :mod:`pybivi.tl`.
"""

from __future__ import annotations

from pybivi.pl._de import call_counts, overlap, posterior_densities
from pybivi.pl._embedding import embed, embedding_grid, metric_bars, purity_bars, truth_scatter
from pybivi.pl._ppc import calibration, ppc

__all__ = [
    "embed",
    "embedding_grid",
    "metric_bars",
    "purity_bars",
    "truth_scatter",
    "call_counts",
    "overlap",
    "posterior_densities",
    "ppc",
    "calibration",
]
