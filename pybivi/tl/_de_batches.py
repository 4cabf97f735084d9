"""Batch-aware comparisons of observed pseudo-bulks for the group-level tests.

When a model was set up with ``batch_key``, a group and its reference may be spread
unevenly over batches, and a batch effect would then pass for a perturbation effect.
The observed (``estimate="observed"``) group test therefore compares pseudo-bulks
*within* each batch and combines the per-batch log fold changes with inverse-variance
weights, the fixed-effect meta-analysis estimate (Cochran 1954, Biometrics 10:101;
the stratified comparison of Mantel & Haenszel 1959)::

    lfc = sum_j w_j lfc_j / sum_j w_j,   se = 1 / sqrt(sum_j w_j),   w_j = 1 / se_j^2

over the batches ``j`` holding cells of both sets. Any gene-wise batch effect shared by
the two sets cancels in each ``lfc_j``; a batch with few cells of either set weighs
little. Two sets with no batch in common cannot be compared (an error); a gene that
one of the sets never expresses in any shared batch has an unknown lfc (0 with a
standard error of 10, as without batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pybivi.tl._de_sources import is_idata

__all__ = ["batch_codes_of", "split_by_batch", "stratified_compare", "stratified_cross"]


def batch_codes_of(source: Any) -> np.ndarray | None:
    """Each training cell's batch index, or ``None`` (an InferenceData, no batch, or one)."""
    if is_idata(source):
        return None
    registry = source.registry
    if getattr(registry, "batch_key", None) is None or registry.n_batch < 2:
        return None
    from pybivi.data import covariate_arrays

    return covariate_arrays(source.adata, registry)["batch_index"]


def split_by_batch(sets: Mapping[str, np.ndarray], codes: np.ndarray) -> dict[str, np.ndarray]:
    """Every set cut into its batches: keys ``"<set>@<batch index>"`` (empty parts dropped)."""
    out = {}
    for key, rows in sets.items():
        rows = np.asarray(rows, dtype=np.int64)
        for j in np.unique(codes[rows]):
            out[f"{key}@{int(j)}"] = rows[codes[rows] == j]
    return out


def stratified_compare(
    estimates: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    a: str,
    b: str,
    param: str,
    n_batches: int,
    compare: Callable[..., tuple[np.ndarray, np.ndarray]],
    unknown_se: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean over batches of the within-batch lfc of ``a`` vs ``b``.

    ``estimates`` maps ``"<set>@<batch>"`` to ``{param: (log2 value, variance)}``;
    ``compare`` turns two such pairs into ``(lfc, se)`` (unknown genes get ``unknown_se``).
    """
    total_weight, weighted = 0.0, 0.0
    shared = False
    for j in range(n_batches):
        ka, kb = f"{a}@{j}", f"{b}@{j}"
        if ka not in estimates or kb not in estimates:
            continue
        shared = True
        lfc, se = compare(estimates[ka][param], estimates[kb][param])
        # A batch where either set never expresses the gene says nothing about it.
        weight = np.where(se < unknown_se, 1.0 / se**2, 0.0)
        total_weight = total_weight + weight
        weighted = weighted + weight * lfc
    if not shared:
        raise ValueError(
            f"the sets {a!r} and {b!r} share no batch, so they cannot be compared within "
            "batches; test groups that share a batch with the reference"
        )
    known = total_weight > 0
    safe = np.where(known, total_weight, 1.0)
    return np.where(known, weighted / safe, 0.0), np.where(known, 1.0 / np.sqrt(safe), unknown_se)


def stratified_cross(
    estimates: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    cross: Mapping[str, Mapping[tuple[str, str], np.ndarray]],
    a: str,
    b: str,
    pair: tuple[str, str],
    n_batches: int,
    unknown_se: float,
) -> np.ndarray:
    """Covariance of two parameters' :func:`stratified_compare` lfcs of ``a`` vs ``b``.

    Each parameter's lfc is ``sum_j w_pj lfc_pj / W_p`` with ``w_pj = 1 / se_pj^2``; the
    within-batch lfcs of different batches are independent, so the covariance is
    ``sum_j w_pj w_qj c_j / (W_p W_q)``, with ``c_j`` the two sets' summed sampling
    covariances in batch ``j`` (``cross``, keyed like ``estimates``).
    """
    p, q = pair
    total = {p: 0.0, q: 0.0}
    weighted = 0.0
    for j in range(n_batches):
        ka, kb = f"{a}@{j}", f"{b}@{j}"
        if ka not in estimates or kb not in estimates:
            continue
        weight = {}
        for name in (p, q):
            var = estimates[ka][name][1] + estimates[kb][name][1]
            known = np.isfinite(var) & (np.sqrt(np.where(np.isfinite(var), var, 0.0)) < unknown_se)
            weight[name] = np.where(known, 1.0 / np.maximum(np.where(known, var, 1.0), 1e-12), 0.0)
            total[name] = total[name] + weight[name]
        c = cross[ka][pair] + cross[kb][pair]
        weighted = weighted + weight[p] * weight[q] * np.where(np.isfinite(c), c, 0.0)
    denominator = np.asarray(total[p] * total[q])
    return np.where(denominator > 0, weighted / np.where(denominator > 0, denominator, 1.0), 0.0)
