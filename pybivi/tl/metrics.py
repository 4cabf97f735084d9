"""Representation metrics of the paper's appendix D, and parameter-recovery scores.

* :func:`program_ari`: k-means on a representation against known gene-program
  labels, scored with the adjusted Rand index (higher is better).
* :func:`mixing_entropy`: the mean entropy of the cell-cycle phase labels among
  each cell's ``k`` nearest neighbours (higher is better: less confounding).
* :func:`log2_change_recovery`: how well estimated per-gene log2 changes match a
  simulator's ground truth (correlation and sign agreement).

All functions take plain arrays (cells x dimensions) and label vectors; the
paper computes them on perturbed cells only, which the caller selects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

__all__ = ["program_ari", "mixing_entropy", "neighbour_purity", "log2_change_recovery"]


def _as_representation(representation: np.ndarray, n_labels: int, name: str) -> np.ndarray:
    rep = np.asarray(representation, dtype=np.float64)
    if rep.ndim == 1:
        rep = rep[:, None]
    if rep.ndim != 2:
        raise ValueError(
            f"representation must be a 2-D array (cells x dims), got shape {rep.shape}"
        )
    if rep.shape[0] != n_labels:
        raise ValueError(
            f"representation has {rep.shape[0]} rows but {name} has {n_labels} entries"
        )
    if not np.all(np.isfinite(rep)):
        raise ValueError("representation contains NaN or infinite values")
    return rep


def _as_labels(labels: Sequence | np.ndarray | pd.Series, name: str) -> np.ndarray:
    lab = np.asarray(pd.Series(labels).astype(str))
    if lab.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return lab


def _neighbours(rep: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(n, k)`` of each row's k nearest rows (Euclidean), the row itself excluded."""
    n = rep.shape[0]
    # Ask for k + 1 neighbours and drop each cell itself; with duplicated points the
    # cell may not come first, so remove it by index rather than by position.
    idx = NearestNeighbors(n_neighbors=k + 1).fit(rep).kneighbors(rep, return_distance=False)
    not_self = idx != np.arange(n)[:, None]
    # A row that did not list itself keeps its first k entries.
    keep = not_self & (np.cumsum(not_self, axis=1) <= k)
    return idx[keep].reshape(n, k)


def program_ari(
    representation: np.ndarray,
    labels: Sequence | np.ndarray | pd.Series,
    n_clusters: int | None = None,
    seed: int = 0,
    n_init: int = 10,
) -> float:
    """Adjusted Rand index of k-means clusters of a representation against program labels.

    Parameters
    ----------
    representation
        Array of shape ``(n_cells, n_dims)``: e.g. the salient posterior mean of
        the perturbed cells.
    labels
        Gene-program label of each cell (same order as ``representation``).
    n_clusters
        Number of k-means clusters; defaults to the number of distinct labels
        (the paper's choice, appendix D.1).
    seed
        Random state of k-means.
    n_init
        Number of k-means restarts (the best inertia is kept).

    Returns
    -------
    float
        The ARI, 1 for a perfect recovery, about 0 for a random partition.
    """
    lab = _as_labels(labels, "labels")
    rep = _as_representation(representation, len(lab), "labels")
    k = len(np.unique(lab)) if n_clusters is None else int(n_clusters)
    if k < 1 or k > rep.shape[0]:
        raise ValueError(f"n_clusters must be between 1 and the number of cells, got {k}")
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(rep)
    return float(adjusted_rand_score(lab, clusters))


def mixing_entropy(
    representation: np.ndarray,
    phases: Sequence | np.ndarray | pd.Series,
    k: int = 50,
    per_cell: bool = False,
) -> float | np.ndarray:
    """Mean entropy of the phase labels among each cell's ``k`` nearest neighbours.

    Neighbours are Euclidean and exclude the cell itself (appendix D.2). The
    entropy uses natural logarithms, so its maximum is ``log(number of phases)``
    (``log 3`` for G1/S/G2M) when phases are perfectly mixed.

    Parameters
    ----------
    representation
        Array of shape ``(n_cells, n_dims)``.
    phases
        Phase label of each cell.
    k
        Number of neighbours; must be smaller than the number of cells.
    per_cell
        Return the per-cell entropies instead of their mean.

    Returns
    -------
    float or numpy.ndarray
        The mean entropy (or the per-cell entropies).
    """
    lab = _as_labels(phases, "phases")
    rep = _as_representation(representation, len(lab), "phases")
    n = rep.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n_cells - 1 = {n - 1}, got {k}")
    codes, uniques = pd.factorize(lab)
    neighbours = _neighbours(rep, k)
    counts = np.zeros((n, len(uniques)))
    np.add.at(counts, (np.repeat(np.arange(n), k), codes[neighbours.ravel()]), 1.0)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h if per_cell else float(h.mean())


def neighbour_purity(
    representation: np.ndarray, labels: Sequence | np.ndarray | pd.Series, k: int = 15
) -> pd.Series:
    """Per label, the mean fraction of a cell's ``k`` nearest neighbours sharing its label.

    A label that a representation does not separate from the others scores about
    its share of the cells; a perfectly separated one scores 1. The report uses it
    to show which gene programs each model tells apart (e.g. compensatory ones).

    Parameters
    ----------
    representation
        ``(n_cells, n_dims)`` array.
    labels
        Label of each cell.
    k
        Number of neighbours (the cell itself excluded); must be below ``n_cells``.

    Returns
    -------
    pandas.Series
        Indexed by label.
    """
    lab = _as_labels(labels, "labels")
    rep = _as_representation(representation, len(lab), "labels")
    if not 1 <= k < rep.shape[0]:
        raise ValueError(f"k must be between 1 and n_cells - 1 = {rep.shape[0] - 1}, got {k}")
    same = (lab[_neighbours(rep, k)] == lab[:, None]).mean(axis=1)
    return pd.Series(same).groupby(lab).mean()


def log2_change_recovery(estimated: np.ndarray, truth: np.ndarray, threshold: float = 1.0) -> dict:
    """Agreement of estimated per-gene log2 changes with the simulator's truth.

    Parameters
    ----------
    estimated, truth
        Arrays of the same shape (e.g. programs x genes) of log2 fold changes.
    threshold
        Genes with ``|truth| >= threshold`` count as truly changed.

    Returns
    -------
    dict
        ``pearson`` (correlation over all entries), ``sign_agreement`` (fraction
        of truly changed entries whose estimate has the right sign) and
        ``n_true`` (number of truly changed entries).
    """
    est = np.asarray(estimated, dtype=np.float64).ravel()
    tru = np.asarray(truth, dtype=np.float64).ravel()
    if est.shape != tru.shape:
        raise ValueError(f"estimated and truth differ in size: {est.size} vs {tru.size}")
    changed = np.abs(tru) >= threshold
    pearson = float("nan")
    if est.size > 1 and tru.std() > 0 and est.std() > 0:
        pearson = float(np.corrcoef(est, tru)[0, 1])
    sign = float("nan")
    if changed.any():
        sign = float(np.mean(np.sign(est[changed]) == np.sign(tru[changed])))
    return {"pearson": pearson, "sign_agreement": sign, "n_true": int(changed.sum())}
