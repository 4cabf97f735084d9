"""Figures of differential tests: call counts, overlaps, posterior densities (paper figure 3)."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["call_counts", "overlap", "posterior_densities"]


def call_counts(counts: pd.DataFrame):
    """Grouped bars of :func:`pybivi.tl.de.call_counts` (one group of bars per program)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.2 * len(counts) + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, counts.shape[1])
    x = np.arange(len(counts))
    for j, col in enumerate(counts.columns):
        ax.bar(x + j * width, counts[col].to_numpy(), width, label=col)
    ax.set_xticks(x + 0.4 - width / 2, counts.index, rotation=30, ha="right")
    ax.set_ylabel("genes with strong evidence")
    ax.legend(fontsize="small", frameon=False)
    return fig


def overlap(overlap: pd.DataFrame):
    """Heat map of :func:`pybivi.tl.de.overlap_table` with the counts written in."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.1 * len(overlap) + 2, 1.0 * len(overlap) + 1.2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(overlap.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(overlap)), overlap.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(overlap)), overlap.index)
    for (i, j), v in np.ndenumerate(overlap.to_numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize="small")
    fig.colorbar(im, ax=ax, label="(group, gene) pairs called by both")
    return fig


def posterior_densities(samples: dict[str, dict[str, np.ndarray]], title: str = ""):
    """Densities of log10 posterior samples, one panel per quantity, one curve per group.

    ``samples = {"b (ContrastiveBiVI)": {"program1": array, "control": array}, ...}``
    (figures 3b-c and S1 of the paper).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(samples), 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(samples)))
    for ax, (name, groups) in zip(axes, samples.items(), strict=True):
        for g, values in groups.items():
            ax.hist(np.log10(values), bins=50, density=True, histtype="step", label=g)
        ax.set_xlabel(f"log10 {name}")
        ax.legend(fontsize="small", frameon=False)
    axes[0].set_ylabel("posterior density")
    fig.suptitle(title)
    return fig
