"""The HTML report and the pipelines that write it (``pybivi demo`` and ``pybivi fit``).

The only layer that uses everything else: it fits models (:mod:`pybivi.models`), runs the
analyses of :mod:`pybivi.tl`, draws the figures of :mod:`pybivi.pl` and writes a static
report folder (:class:`Report`).
"""

from __future__ import annotations

from pybivi.report._figure3 import figure3
from pybivi.report._html import FigureRef, Report, Section, table_html
from pybivi.report._pipeline import DISPLAY, MODEL_NAMES, kinetic_estimates, run_pipeline
from pybivi.report._ppc import section as ppc_section
from pybivi.report._sections import add_figure2, add_kinetic_recovery, kinetic_recovery

__all__ = [
    "Report",
    "Section",
    "FigureRef",
    "table_html",
    "run_pipeline",
    "kinetic_estimates",
    "MODEL_NAMES",
    "DISPLAY",
    "figure3",
    "ppc_section",
    "add_figure2",
    "kinetic_recovery",
    "add_kinetic_recovery",
]
