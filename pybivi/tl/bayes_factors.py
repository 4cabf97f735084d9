"""The Bayes-factor arithmetic behind :mod:`pybivi.tl.de`, as pure functions on sample arrays.

Everything here takes posterior samples as ``(n_samples, n_genes)`` arrays and returns
per-gene arrays; nothing draws from a model. :mod:`pybivi.tl.de` draws the samples and
assembles the tables, and re-exports these functions (``pybivi.tl.de.kinetic_bayes_factors``
and so on). Tested against analytic cases in ``tests/test_de.py``.
"""

from __future__ import annotations

import numpy as np

# The group-level maths lives in pybivi.tl.bayes_factors; re-exported here beside the pair tests.
from pybivi.tl._joint_shrinkage import shrink_lfc_joint
from pybivi.tl._shrinkage import (
    HALF_COUNT,
    as_samples,
    fdr_calls,
    normal_mixture_tails,
    shrink_lfc,
    three_way_test,
)

__all__ = [
    "kinetic_bayes_factors",
    "change_bayes_factors",
    "estimate_pseudocounts",
    "combined_call",
    "median_ratio_normalize",
    "three_way_test",
    "fdr_calls",
    "shrink_lfc",
    "shrink_lfc_joint",
    "normal_mixture_tails",
]

# Pseudo-count added to both pair counts of the kinetic Bayes factor, so that a gene
# whose pairs all fall on one side gets a large finite BF, (n + 0.5) / 0.5, instead
# of an infinity or a division by zero (a Jeffreys-style half count).
KINETIC_PSEUDO_COUNT = HALF_COUNT
# Genes are processed in blocks so that the pair matrix (n_pairs x block) stays small.
_GENE_BLOCK = 256
# Same tiny constant scvi-tools adds inside its log-odds.
_LOG_EPS = 1e-8


def _pair_indices(n_a: int, n_b: int, n_pairs: int, rng: np.random.Generator):
    """Random pairs (with replacement) between two pools of samples."""
    if n_a == 0 or n_b == 0:
        raise ValueError("both groups need at least one posterior sample")
    return rng.integers(0, n_a, size=n_pairs), rng.integers(0, n_b, size=n_pairs)


def _lfc_blocks(a: np.ndarray, b: np.ndarray, ia, ib, pseudocount: float):
    """Yield ``(gene slice, lfc block of shape (n_pairs, block))``."""
    for start in range(0, a.shape[1], _GENE_BLOCK):
        sl = slice(start, min(start + _GENE_BLOCK, a.shape[1]))
        yield sl, np.log2(a[ia, sl] + pseudocount) - np.log2(b[ib, sl] + pseudocount)


def kinetic_bayes_factors(
    samples_a: np.ndarray,
    samples_b: np.ndarray,
    delta: float = 1.0,
    n_pairs: int = 10_000,
    seed: int | np.random.Generator = 0,
) -> dict[str, np.ndarray]:
    """biVI's kinetic Bayes factor between two pooled sets of positive samples.

    Parameters
    ----------
    samples_a, samples_b
        Positive posterior samples, shape ``(n_samples_a, n_genes)`` and
        ``(n_samples_b, n_genes)`` (samples of all cells of a group pooled).
    delta
        Effect-size threshold on ``|log2 fold change|``.
    n_pairs
        Number of random pairs ``(a, b)`` drawn with replacement.
    seed
        Seed or generator for the pairs.

    Returns
    -------
    dict
        Per gene: ``proba_de`` = ``P(|lfc| >= delta)``, ``bayes_factor`` =
        ``(#(|lfc| >= delta) + 0.5) / (#(|lfc| < delta) + 0.5)`` (see
        :data:`KINETIC_PSEUDO_COUNT`), ``lfc_mean``, ``lfc_median``, ``lfc_sd``.
    """
    a = as_samples(samples_a, "samples_a")
    b = as_samples(samples_b, "samples_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gene axes differ: {a.shape[1]} vs {b.shape[1]}")
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("kinetic parameters must be positive to take a log fold change")
    rng = np.random.default_rng(seed)
    ia, ib = _pair_indices(a.shape[0], b.shape[0], n_pairs, rng)
    out = {k: np.empty(a.shape[1]) for k in ("n_out", "lfc_mean", "lfc_median", "lfc_sd")}
    for sl, lfc in _lfc_blocks(a, b, ia, ib, 0.0):
        out["n_out"][sl] = np.sum(np.abs(lfc) >= delta, axis=0)
        out["lfc_mean"][sl] = lfc.mean(0)
        out["lfc_median"][sl] = np.median(lfc, 0)
        out["lfc_sd"][sl] = lfc.std(0)
    n_out = out.pop("n_out")
    c = KINETIC_PSEUDO_COUNT
    out["proba_de"] = n_out / n_pairs
    out["bayes_factor"] = (n_out + c) / (n_pairs - n_out + c)
    return out


def change_bayes_factors(
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    delta: float = 0.2,
    pseudocounts: float = 1e-10,
    n_pairs: int | None = None,
    seed: int | np.random.Generator = 0,
) -> dict[str, np.ndarray]:
    """scvi-tools' ``change`` mode on normalised expression samples.

    Parameters
    ----------
    scales_a, scales_b
        Non-negative samples, ``(n_samples, n_genes)`` each.
    delta
        Effect-size threshold on the log2 fold change.
    pseudocounts
        ``eps`` in ``lfc = log2(a + eps) - log2(b + eps)`` (see
        :func:`estimate_pseudocounts` for scvi-tools' data-driven choice).
    n_pairs
        ``None`` pairs samples element-wise (scvi-tools' default, both groups must then
        have the same number of samples); an integer draws that many random pairs.
    seed
        Seed or generator for the pairs.

    Returns
    -------
    dict
        Per gene: ``proba_de`` = max(P(lfc >= delta), P(lfc < -delta)),
        ``bayes_factor`` = P/(1-P), ``log_bayes_factor`` (scvi-tools' ``bayes_factor``),
        ``lfc_mean``/``lfc_median``/``lfc_sd`` (computed, as in
        scvi-tools, with ``1e-3 * pseudocounts``), ``scale_a``, ``scale_b`` (means).
    """
    a = as_samples(scales_a, "scales_a")
    b = as_samples(scales_b, "scales_b")
    if n_pairs is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError("element-wise pairing needs as many samples in both groups")
        ia = ib = np.arange(a.shape[0])
    else:
        ia, ib = _pair_indices(a.shape[0], b.shape[0], n_pairs, np.random.default_rng(seed))
    n = len(ia)
    keys = ("plus", "minus", "lfc_mean", "lfc_median", "lfc_sd")
    out = {k: np.empty(a.shape[1]) for k in keys}
    for sl, lfc in _lfc_blocks(a, b, ia, ib, pseudocounts):
        out["plus"][sl] = np.sum(lfc >= delta, axis=0) / n
        out["minus"][sl] = np.sum(lfc < -delta, axis=0) / n
    for sl, lfc in _lfc_blocks(a, b, ia, ib, 1e-3 * pseudocounts):
        out["lfc_mean"][sl] = lfc.mean(0)
        out["lfc_median"][sl] = np.median(lfc, 0)
        out["lfc_sd"][sl] = lfc.std(0)
    plus, minus = out.pop("plus"), out.pop("minus")
    p = np.maximum(plus, minus)
    out["proba_de"] = p
    out["log_bayes_factor"] = np.log(p + _LOG_EPS) - np.log(1.0 - p + _LOG_EPS)
    out["bayes_factor"] = np.exp(out["log_bayes_factor"])
    out["direction"] = np.sign(plus - minus)
    out["scale_a"] = a.mean(0)
    out["scale_b"] = b.mean(0)
    return out


def estimate_pseudocounts(
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    where_zero_a: np.ndarray,
    where_zero_b: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """scvi-tools' (1.4) pseudo-count: shrink the lfc of genes not expressed in a group.

    For each group, the ``quantile`` of the per-gene maximal scale among genes whose
    observed mean count in that group is below a threshold (``where_zero_*``; ``1e-10``
    when there is none); the larger of the two, divided by the number of genes, and at
    least ``1e-10`` -- as ``scvi.model.base._differential.estimate_pseudocounts_offset``.
    """
    eps = []
    for scales, zero in ((scales_a, where_zero_a), (scales_b, where_zero_b)):
        zero = np.asarray(zero, dtype=bool)
        top = np.max(np.asarray(scales), axis=0)
        eps.append(np.quantile(top[zero], quantile) if zero.any() else 1e-10)
    n_genes = np.shape(scales_a)[-1]
    return float(max(1e-10, max(eps) / n_genes))


def combined_call(calls: dict[str, np.ndarray]) -> np.ndarray:
    """One label per gene from the per-parameter calls.

    ``"none"``; ``"<param> only"`` when exactly one parameter is called; ``"both"``
    when two parameters are tested and both are called; otherwise the called names
    joined by ``"+"`` (``"all"`` when every one of three or more is called).
    """
    names = list(calls)
    stacked = np.stack([np.asarray(calls[n], dtype=bool) for n in names], axis=0)
    labels = []
    for col in stacked.T:
        hit = [n for n, c in zip(names, col, strict=True) if c]
        if not hit:
            labels.append("none")
        elif len(hit) == 1:
            labels.append(f"{hit[0]} only")
        elif len(hit) == len(names):
            labels.append("both" if len(names) == 2 else "all")
        else:
            labels.append("+".join(hit))
    return np.asarray(labels, dtype=object)


def median_ratio_normalize(
    samples: np.ndarray,
    reference_profile: np.ndarray | None = None,
    return_profile: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Rescale each sample so that its median ratio to a reference profile is 1.

    A composition-robust size factor (DESeq2's median of ratios) applied to posterior
    samples of a positive per-gene quantity. Parameters read at a reference library are
    proportional to normalised expression, which is compositional: when a minority of
    genes rises (the cell cycle, a perturbation's program) every other gene's share
    falls, and an unchanged gene seems to change. Dividing each sample (one cell, one
    draw) by the median over genes of its ratio to the profile removes such shifts,
    provided that most genes do not change.

    Parameters
    ----------
    samples
        Positive samples, ``(n_samples, n_genes)``.
    reference_profile
        Positive per-gene profile, ``(n_genes,)``; default the per-gene median of
        ``samples`` itself. Pass the reference group's profile to put two groups on one
        scale.
    return_profile
        Also return the profile used (with ``reference_profile=None``, the per-gene
        median of ``samples`` taken on the log scale), to put other groups on the same
        scale.

    Returns
    -------
    numpy.ndarray or tuple
        The rescaled samples, same shape; with ``return_profile``, ``(rescaled,
        profile)``.
    """
    x = as_samples(samples, "samples")
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError("median-ratio normalisation needs positive, finite samples")
    log_x = np.log(x)
    if reference_profile is None:
        log_profile = np.median(log_x, axis=0)
    else:
        profile = np.asarray(reference_profile, dtype=np.float64)
        if profile.shape != (x.shape[1],):
            raise ValueError(
                f"reference_profile must have one value per gene ({x.shape[1]}), "
                f"got shape {profile.shape}"
            )
        if not np.all(np.isfinite(profile)) or np.any(profile <= 0):
            raise ValueError("reference_profile must be positive and finite")
        log_profile = np.log(profile)
    offset = np.median(log_x - log_profile, axis=1, keepdims=True)
    out = np.exp(log_x - offset)
    return (out, np.exp(log_profile)) if return_profile else out
