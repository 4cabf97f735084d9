"""Bayes-factor differential tests on posterior samples (paper appendix E, SPEC section 6).

Two tests, both on random pairs of posterior samples drawn from two groups of cells:

* :func:`kinetic` -- biVI's procedure on the kinetic parameters of a reaction scheme
  (for the bursty scheme the burst size ``b`` and the relative degradation rate
  ``gamma/k``) at a reference library. Samples are pooled per group, ``n_pairs``
  random pairs are drawn, ``lfc = log2(a) - log2(b)`` and the Bayes factor is the
  ratio of the number of pairs outside and inside ``[-delta, delta]``. Default
  ``delta = 1``, call where ``BF > 3`` (the paper's rule).
* :func:`mean` -- scvi-tools' ``change`` mode on the normalised mature expression
  ``rho_M`` (mature-only SCVI / ContrastiveVI, or any model): ``lfc = log2(a + eps) -
  log2(b + eps)``, ``P(DE) = max(P(lfc >= delta), P(lfc < -delta))`` and the Bayes
  factor is the odds ``P / (1 - P)``. Default ``delta = 0.2``, call where ``BF > 2``
  (the paper's rule as stated). scvi-tools reports the natural log of the odds in
  its ``bayes_factor`` column: our ``log_bayes_factor`` column is that number.

The maths lives in pure functions on arrays (:func:`kinetic_bayes_factors`,
:func:`change_bayes_factors`), tested against analytic cases; the model-facing
functions only draw samples (:mod:`pybivi.posterior`) and assemble tables.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "kinetic_bayes_factors",
    "change_bayes_factors",
    "estimate_pseudocounts",
    "combined_call",
]

# Pseudo-count added to both pair counts of the kinetic Bayes factor, so that a gene
# whose pairs all fall on one side gets a large finite BF, (n + 0.5) / 0.5, instead
# of an infinity or a division by zero (a Jeffreys-style half count).
KINETIC_PSEUDO_COUNT = 0.5
# Genes are processed in blocks so that the pair matrix (n_pairs x block) stays small.
_GENE_BLOCK = 256
# Same tiny constant scvi-tools adds inside its log-odds.
_LOG_EPS = 1e-8


def _pair_indices(n_a: int, n_b: int, n_pairs: int, rng: np.random.Generator):
    """Random pairs (with replacement) between two pools of samples."""
    if n_a == 0 or n_b == 0:
        raise ValueError("both groups need at least one posterior sample")
    return rng.integers(0, n_a, size=n_pairs), rng.integers(0, n_b, size=n_pairs)


def _as_samples(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n_samples, n_genes), got shape {x.shape}")
    return x


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
        Per gene: ``proba_de`` = P(|lfc| >= delta), ``bayes_factor`` =
        ``(#(|lfc| >= delta) + 0.5) / (#(|lfc| < delta) + 0.5)`` (see
        :data:`KINETIC_PSEUDO_COUNT`), ``lfc_mean``, ``lfc_median``, ``lfc_sd``.
    """
    a = _as_samples(samples_a, "samples_a")
    b = _as_samples(samples_b, "samples_b")
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
    pseudocounts: float = 1e-5,
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
        ``bayes_factor`` = P/(1-P), ``log_bayes_factor`` (scvi-tools' unsigned
        ``bayes_factor``), ``lfc_mean``/``lfc_median``/``lfc_sd`` (computed, as in
        scvi-tools, with ``1e-3 * pseudocounts``), ``scale_a``, ``scale_b`` (means).
    """
    a = _as_samples(scales_a, "scales_a")
    b = _as_samples(scales_b, "scales_b")
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
    """scvi-tools' pseudo-count: shrink the lfc of genes not expressed in a group.

    The offset is the ``quantile`` of the per-gene maximal scale among genes whose
    observed mean count in a group is below a threshold (``where_zero_*``), the larger
    of the two groups, and at least ``1e-5`` (also the value when no gene is silent).
    """
    eps = []
    for scales, zero in ((scales_a, where_zero_a), (scales_b, where_zero_b)):
        zero = np.asarray(zero, dtype=bool)
        top = np.max(np.asarray(scales), axis=0)
        eps.append(np.quantile(top[zero], quantile) if zero.any() else 1e-5)
    return float(max(1e-5, *eps))


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
