"""Figures of a posterior-predictive check (:mod:`pybivi.tl.ppc`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pybivi.tl.ppc import PPCResult

__all__ = ["ppc", "calibration"]


def ppc(result: PPCResult, statistics: Sequence[str] | None = None):
    """Observed versus replicated statistics: per gene (top) and their distributions (bottom).

    Top row: each gene's observed statistic against the replicates' mean, with a bar of
    +-2 replicate sd and the identity line (log axes for means and variances). Bottom
    row: histogram over genes of the observed statistic and of the replicated one
    (all replicates pooled).
    """
    from matplotlib.figure import Figure

    names = list(statistics) if statistics is not None else list(result.observed.columns)
    fig = Figure(figsize=(3.0 * len(names), 5.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for j, name in enumerate(names):
        t = result.table[result.table["statistic"] == name]
        log = name.startswith(("mean", "variance"))
        ax = axes[0, j]
        ax.errorbar(
            t["observed"],
            t["replicate_mean"],
            yerr=2 * t["replicate_sd"],
            fmt=".",
            ms=3,
            alpha=0.6,
            elinewidth=0.5,
        )
        finite = np.concatenate([t["observed"], t["replicate_mean"]])
        finite = finite[np.isfinite(finite) & ((finite > 0) if log else True)]
        if finite.size:
            lo, hi = finite.min(), finite.max()
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.7)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(name.replace("_", " "), fontsize="medium")
        ax.set_xlabel("observed")
        rep = np.asarray(result.replicates[name]).ravel()
        obs = t["observed"].to_numpy()
        transform = (lambda v: np.log10(v[v > 0])) if log else (lambda v: v[np.isfinite(v)])
        bins = np.histogram_bin_edges(np.concatenate([transform(obs), transform(rep)]), 30)
        axes[1, j].hist(transform(rep), bins=bins, density=True, alpha=0.5, label="replicated")
        axes[1, j].hist(
            transform(obs), bins=bins, density=True, histtype="step", color="k", label="observed"
        )
        axes[1, j].set_xlabel(("log10 " if log else "") + name.replace("_", " "))
    axes[0, 0].set_ylabel("replicate mean (+-2 sd)")
    axes[1, 0].set_ylabel("density over genes")
    axes[1, 0].legend(fontsize="small", frameon=False)
    return fig


def calibration(result: PPCResult):
    """Histograms of the per-gene posterior-predictive p-values, one panel per statistic.

    With ``R`` replicates a ``ppp`` takes the values ``k / R`` (and ``(k + 1/2) / R``
    with ties), so the bins follow that grid (:func:`pybivi.tl.ppc.calibration_bins`): each
    holds the same number of grid values, or a known number, and the height is the share
    of genes per grid value. A calibrated model gives a flat histogram at ``1 / (R + 1)``
    (the dashed line); mass piled at 0 or 1 means the observed statistic falls outside
    the replicates for many genes.
    """
    from matplotlib.figure import Figure

    from pybivi.tl.ppc import calibration_bins

    names = list(result.observed.columns)
    fig = Figure(figsize=(2.6 * len(names), 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    n_rep = next(iter(result.replicates.values())).shape[0]
    edges, values_per_bin = calibration_bins(n_rep)
    for ax, name in zip(axes, names, strict=True):
        ppp = result.table.loc[result.table["statistic"] == name, "ppp"].to_numpy()
        ppp = ppp[np.isfinite(ppp)]
        counts, _ = np.histogram(ppp, bins=edges)
        share = counts / max(len(ppp), 1) / values_per_bin
        ax.stairs(share, edges, fill=True, color="0.4")
        ax.axhline(1.0 / (n_rep + 1), color="k", lw=0.7, ls="--")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(name.replace("_", " "), fontsize="medium")
        ax.set_xlabel(f"ppp (R = {n_rep})")
    axes[0].set_ylabel("share of genes per ppp value")
    return fig
