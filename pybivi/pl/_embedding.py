"""Figures of the report: 2-D embeddings coloured by labels, and metric bar charts.

Every function draws with matplotlib's non-interactive ``Agg`` backend when
saving, returns the :class:`matplotlib.figure.Figure`, and writes a PNG when
``path`` is given, so the report works on a headless machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["embed", "embedding_grid", "metric_bars", "purity_bars", "truth_scatter"]

# Fixed colours for the labels the report uses most, so panels agree with each other.
_FIXED = {"G1": "#4c72b0", "S": "#dd8452", "G2M": "#55a868", "control": "#bbbbbb"}


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def embed(representation: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """2-D embedding of a representation for plotting.

    Parameters
    ----------
    representation
        ``(n_cells, n_dims)`` array.
    method
        ``"umap"`` (umap-learn, as the paper's figure 2; its first call in a
        process compiles with numba for about 20 s) or ``"pca"`` (instant).
    seed
        Random state.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, 2)`` coordinates.
    """
    rep = np.asarray(representation, dtype=np.float64)
    if rep.ndim != 2 or rep.shape[0] < 3:
        raise ValueError(f"need a 2-D representation with at least 3 cells, got {rep.shape}")
    if method == "pca":
        centred = rep - rep.mean(0)
        if rep.shape[1] == 1:
            return np.column_stack([centred[:, 0], np.zeros(len(rep))])
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T
    if method == "umap":
        import umap

        n_neighbors = int(min(15, rep.shape[0] - 1))
        reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(rep))
    raise ValueError(f"method must be 'umap' or 'pca', not {method!r}")


def _colours(labels: Sequence[str]) -> dict[str, str]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    out, i = {}, 0
    for lab in labels:
        if lab in _FIXED:
            out[lab] = _FIXED[lab]
        else:
            out[lab] = matplotlib.colors.to_hex(palette[i % len(palette)])
            i += 1
    return out


def _scatter(ax, coords: np.ndarray, labels: np.ndarray, title: str, highlight=None) -> None:
    cats = list(pd.unique(pd.Series(labels)))
    colours = _colours(sorted(cats, key=str))
    size = max(2.0, min(12.0, 6000.0 / len(labels)))
    for lab in sorted(cats, key=str):
        sel = labels == lab
        faded = highlight is not None and lab not in highlight
        ax.scatter(
            coords[sel, 0], coords[sel, 1], s=size, linewidths=0,
            c="#dddddd" if faded else colours[lab], label=None if faded else str(lab),
            zorder=1 if faded else 2,
        )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2.0, frameon=False, loc="best")


def embedding_grid(
    panels: Sequence[tuple[np.ndarray, np.ndarray, str]],
    ncols: int = 2,
    path: str | Path | None = None,
    highlight: Sequence[str] | None = None,
    panel_size: float = 4.0,
):
    """A grid of 2-D scatter plots, one per ``(coords, labels, title)``.

    Parameters
    ----------
    panels
        Each entry: ``(n, 2)`` coordinates, ``n`` labels, panel title.
    ncols
        Panels per row.
    path
        Where to save a PNG (optional).
    highlight
        Labels to colour; the others are drawn in light grey.
    panel_size
        Inches per panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    for ax, (coords, labels, title) in zip(axes.flat, panels, strict=False):
        _scatter(ax, np.asarray(coords), np.asarray(labels).astype(str), title, highlight)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    return _finish(fig, path)


def _finish(fig: Any, path: str | Path | None) -> Any:
    """Lay ``fig`` out, write it to ``path`` when one is given, and return it."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _bar_chart(
    heights: pd.DataFrame,
    ticks: Sequence[str],
    ylabel: str,
    path: str | Path | None,
    *,
    figsize: tuple[float, float],
    ticks_style: Mapping[str, Any],
    bar_style: Mapping[str, Any] | None = None,
    ylim: tuple[float, float] | None = None,
    legend: bool = False,
    draw: Callable[[Any, np.ndarray], None] | None = None,
):
    """The report's bar chart: a slot per row of ``heights`` holding one bar per column,
    side by side in a width of 0.8; no top or right spine; a PNG when ``path`` is given.

    ``bar_style`` goes to every ``ax.bar``; ``draw(ax, x)`` adds marks over the bars; with
    ``legend`` the columns are named in a legend.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    x = np.arange(len(heights))
    n_bars = heights.shape[1]
    width = 0.8 / max(1, n_bars)
    for j, column in enumerate(heights.columns):
        offset = (j - (n_bars - 1) / 2) * width
        style = {**(bar_style or {}), **({"label": column} if legend else {})}
        ax.bar(x + offset, heights[column], width, **style)
    if draw is not None:
        draw(ax, x)
    ax.set_xticks(x, ticks, **ticks_style)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if legend:
        ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    return _finish(fig, path)


def metric_bars(
    table: pd.DataFrame,
    metric: str,
    path: str | Path | None = None,
    order: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    ylabel: str | None = None,
):
    """Bar chart of a metric per model: mean over seeds, error bar = standard deviation.

    Parameters
    ----------
    table
        Long table with columns ``model``, ``seed`` and ``metric``.
    metric
        Column to plot.
    path
        Where to save a PNG (optional).
    order
        Models in display order (default: as they appear).
    labels
        Display name per model (e.g. ``"BiVI (N+M)"``).
    ylabel
        Axis label (default: ``metric``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    order = list(order) if order is not None else list(pd.unique(table["model"]))
    stats = table.groupby("model")[metric].agg(["mean", "std", "count"]).reindex(order)

    def seeds(ax, x: np.ndarray) -> None:  # every seed's value over its model's bar
        for i, model in enumerate(order):
            vals = table.loc[table["model"] == model, metric].to_numpy()
            ax.scatter(np.full(vals.shape, x[i]), vals, s=10, color="k", zorder=3)

    return _bar_chart(
        stats[["mean"]],
        [labels.get(m, m) if labels else m for m in order],
        ylabel or metric,
        path,
        figsize=(1.3 * len(order) + 1.5, 3.2),
        ticks_style={"rotation": 20, "ha": "right", "fontsize": 8},
        bar_style={"yerr": stats["std"].fillna(0.0), "capsize": 4, "color": "#8da0cb"},
        draw=seeds,
    )


def purity_bars(
    table: pd.DataFrame,
    path: str | Path | None = None,
    order: Sequence[str] | None = None,
    kinds: Mapping[str, str] | None = None,
):
    """Grouped bars of per-program neighbour purity, one colour per model.

    Parameters
    ----------
    table
        Columns ``model``, ``program`` and ``purity`` (averaged over seeds here).
    path
        Where to save a PNG (optional).
    order
        Models in display order.
    kinds
        Program -> kind of its kinetic effect, shown under the program name.

    Returns
    -------
    matplotlib.figure.Figure
    """
    mean = table.groupby(["program", "model"])["purity"].mean().unstack("model")
    order = list(order) if order is not None else list(mean.columns)
    mean = mean[[m for m in order if m in mean.columns]]
    return _bar_chart(
        mean,
        [f"{p}\n({kinds[p]})" if kinds and p in kinds else str(p) for p in mean.index],
        "same-program neighbours",
        path,
        figsize=(1.2 * len(mean) + 2.0, 3.4),
        ticks_style={"fontsize": 7},
        ylim=(0, 1),
        legend=True,
    )


def truth_scatter(
    panels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    kind_names: Sequence[str],
    path: str | Path | None = None,
):
    """Estimated against true log2 changes, one panel per parameter, coloured by effect kind.

    Parameters
    ----------
    panels
        Each entry: ``(truth, estimate, kind code, title)`` arrays of equal length.
    kind_names
        Name of each kind code (``pybivi.datasets.EFFECT_KINDS``).
    path
        Where to save a PNG (optional).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    colours = _colours([k for k in kind_names if k != "none"])
    colours["none"] = "#cccccc"
    for ax, (truth, est, kind, title) in zip(axes.flat, panels, strict=True):
        for code in np.unique(kind):
            sel = kind == code
            name = kind_names[code]
            ax.scatter(truth[sel], est[sel], s=8, c=colours[name], label=name, linewidths=0)
        lim = float(np.nanmax(np.abs(np.concatenate([truth, est])))) * 1.05 + 0.1
        ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("true log2 change")
        ax.set_ylabel("estimated log2 change")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
    return _finish(fig, path)
