"""The Bayes-factor arithmetic behind :mod:`pybivi.de`, as pure functions on sample arrays.

Everything here takes posterior samples as ``(n_samples, n_genes)`` arrays and returns
per-gene arrays; nothing draws from a model. :mod:`pybivi.de` draws the samples and
assembles the tables, and re-exports these functions (``pybivi.de.kinetic_bayes_factors``
and so on). Tested against analytic cases in ``tests/test_de.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "kinetic_bayes_factors",
    "change_bayes_factors",
    "estimate_pseudocounts",
    "combined_call",
    "median_ratio_normalize",
    "three_way_test",
    "fdr_calls",
    "shrink_lfc",
    "normal_mixture_tails",
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
        Per gene: ``proba_de`` = ``P(|lfc| >= delta)``, ``bayes_factor`` =
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
    x = _as_samples(samples, "samples")
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


def three_way_test(
    lfc_draws: np.ndarray,
    delta: float,
    credible_mass: float = 0.95,
) -> dict[str, np.ndarray]:
    """Three-way test of a posterior over log2 fold changes (scvi-tools' change mode).

    Parameters
    ----------
    lfc_draws
        Posterior draws of one log2 fold change per gene, ``(n_draws, n_genes)``.
    delta
        Half-width of the region of practical equivalence, ``|lfc| < delta``.
    credible_mass
        Mass of the equal-tailed credible interval.

    Returns
    -------
    dict
        Per gene: ``lfc_mean``, ``lfc_median``, ``lfc_sd``, ``lfc_low``, ``lfc_high``
        (the credible interval), ``proba_up`` = ``P(lfc >= delta)``, ``proba_down`` =
        ``P(lfc <= -delta)``, ``proba_null`` = ``P(|lfc| < delta)``, ``proba_de`` =
        ``1 - proba_null``, ``bayes_factor`` = ``(#DE + 0.5) / (#null + 0.5)`` over the
        draws (the half counts of :data:`KINETIC_PSEUDO_COUNT` keep it finite) and
        ``log_bayes_factor``, its natural log.
    """
    x = _as_samples(lfc_draws, "lfc_draws")
    if not np.all(np.isfinite(x)):
        raise ValueError("lfc_draws must be finite")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if not 0.0 < credible_mass < 1.0:
        raise ValueError(f"credible_mass must be in (0, 1), got {credible_mass}")
    n = x.shape[0]
    n_up = np.sum(x >= delta, axis=0)
    n_down = np.sum(x <= -delta, axis=0)
    # With delta = 0 a draw at exactly 0 counts on both sides: count it once.
    n_de = np.minimum(n_up + n_down, n)
    tail = (1.0 - credible_mass) / 2.0
    low, high = np.quantile(x, [tail, 1.0 - tail], axis=0)
    c = KINETIC_PSEUDO_COUNT
    bf = (n_de + c) / (n - n_de + c)
    return {
        "lfc_mean": x.mean(0),
        "lfc_median": np.median(x, 0),
        "lfc_sd": x.std(0),
        "lfc_low": low,
        "lfc_high": high,
        "proba_up": n_up / n,
        "proba_down": n_down / n,
        "proba_null": 1.0 - n_de / n,
        "proba_de": n_de / n,
        "bayes_factor": bf,
        "log_bayes_factor": np.log(bf),
    }


def fdr_calls(proba_de: np.ndarray, fdr_target: float = 0.05) -> np.ndarray:
    """Calls under posterior expected false-discovery-rate control.

    Genes are sorted by ``P(DE)``, most probable first, and the largest leading set whose
    mean ``1 - P(DE)`` (the posterior expected proportion of false discoveries among the
    calls) is at most ``fdr_target`` is called (Newton et al. 2004, *Biostatistics*
    5:155; scvi-tools' ``fdr_target``).

    Parameters
    ----------
    proba_de
        Posterior probability that each gene is differential, ``(n_genes,)``.
    fdr_target
        Bound on the posterior expected FDR of the called set, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Boolean calls, ``(n_genes,)``.
    """
    p = np.asarray(proba_de, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"proba_de must be one value per gene, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("proba_de must lie in [0, 1]")
    if not 0.0 <= fdr_target <= 1.0:
        raise ValueError(f"fdr_target must be in [0, 1], got {fdr_target}")
    order = np.argsort(-p, kind="stable")
    expected_fdr = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    # Sorted by decreasing P(DE), the running mean of 1 - P(DE) never decreases, so the
    # largest admissible set is a prefix.
    n_called = int(np.sum(expected_fdr <= fdr_target + 1e-12))
    calls = np.zeros(p.size, dtype=bool)
    calls[order[:n_called]] = True
    return calls


def _normal_logpdf(x: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2.0 * np.pi * var) + x * x / var)


def shrink_lfc(
    lfc_hat: np.ndarray,
    lfc_se: np.ndarray,
    n_draws: int = 1000,
    null_weight: float = 10.0,
    seed: int | np.random.Generator = 0,
    max_iter: int = 500,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Empirical-Bayes shrinkage of many genes' log fold changes (adaptive shrinkage).

    Stephens' ``ash`` (2017, *Biostatistics* 18:275) with a normal likelihood: every
    gene's estimate is ``lfc_hat ~ N(beta, lfc_se^2)``, and the true effects ``beta``
    share one prior, a point mass at 0 and zero-mean normals on a grid of scales,
    whose weights are fitted to all genes at once by maximum likelihood (EM, with a
    Dirichlet(``null_weight``, 1, ...) penalty that favours the point mass). Most genes
    of a screen do not change, so the fitted prior shrinks noisy estimates of silent
    genes towards 0 and keeps large, well-measured ones: posterior probabilities taken
    from it are calibrated across genes, which is what posterior FDR control assumes.

    Parameters
    ----------
    lfc_hat, lfc_se
        Estimates and their standard errors, ``(n_genes,)``; ``lfc_se > 0``.
    n_draws
        Draws of each gene's posterior to return.
    null_weight
        Dirichlet penalty on the point mass (ash's default 10).
    seed
        Seed or generator of the draws.
    max_iter
        EM iterations at most.

    Returns
    -------
    tuple
        ``(draws, fit)``: posterior draws ``(n_draws, n_genes)`` and a dict with the
        prior's ``scales`` (0 first) and ``weights``, and each gene's ``posterior_mean``
        and ``posterior_weights`` ``(n_genes, n_scales)``.
    """
    b = np.asarray(lfc_hat, dtype=np.float64)
    s = np.asarray(lfc_se, dtype=np.float64)
    if b.ndim != 1 or s.shape != b.shape:
        raise ValueError(f"lfc_hat and lfc_se must be (n_genes,), got {b.shape} and {s.shape}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("lfc_hat must be finite and lfc_se finite and > 0")
    # Scales from a tenth of the smallest error to twice the largest plausible effect,
    # a factor sqrt(2) apart (ash's default grid).
    top = 2.0 * np.sqrt(max(np.max(b * b - s * s), np.min(s) ** 2 * 4.0))
    low = np.min(s) / 10.0
    n_grid = int(np.ceil(np.log(top / low) / np.log(np.sqrt(2.0)))) + 1
    scales = np.concatenate([[0.0], low * np.sqrt(2.0) ** np.arange(n_grid)])
    var = s[:, None] ** 2 + scales[None, :] ** 2
    log_lik = _normal_logpdf(b[:, None], var)
    log_lik -= log_lik.max(axis=1, keepdims=True)
    lik = np.exp(log_lik)
    prior = np.full(scales.size, 1.0 / scales.size)
    penalty = np.zeros(scales.size)
    penalty[0] = null_weight - 1.0
    for _ in range(max_iter):
        post = lik * prior
        post /= post.sum(axis=1, keepdims=True)
        new = post.sum(axis=0) + penalty
        new /= new.sum()
        done = np.max(np.abs(new - prior)) < 1e-8
        prior = new
        if done:
            break
    post = lik * prior
    post /= post.sum(axis=1, keepdims=True)
    shrink = scales[None, :] ** 2 / var
    mean_k = b[:, None] * shrink
    sd_k = np.sqrt(shrink * s[:, None] ** 2)
    rng = np.random.default_rng(seed)
    # One mixture component per draw and gene, then a normal draw within it.
    u = rng.random((n_draws, b.size))
    component = (u[..., None] > np.cumsum(post, axis=1)[None]).sum(-1)
    component = np.minimum(component, scales.size - 1)
    genes = np.arange(b.size)[None, :]
    draws = mean_k[genes, component] + sd_k[genes, component] * rng.standard_normal(u.shape)
    fit = {
        "scales": scales,
        "weights": prior,
        "posterior_mean": (post * mean_k).sum(axis=1),
        "posterior_weights": post,
        "component_means": mean_k,
        "component_sds": sd_k,
    }
    return draws, fit


def normal_mixture_tails(
    weights: np.ndarray, means: np.ndarray, sds: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``P(x >= delta)`` and ``P(x <= -delta)`` of per-gene normal mixtures.

    Parameters
    ----------
    weights, means, sds
        ``(n_genes, n_components)`` mixture weights (rows summing to 1), means and standard
        deviations (0: a point mass at the mean).
    delta
        The threshold, ``>= 0``.

    Returns
    -------
    tuple
        ``(proba_up, proba_down)``, each ``(n_genes,)``.
    """
    from scipy.special import ndtr

    w, m, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sds))
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(s > 0, ndtr((m - delta) / s), (m >= delta).astype(float))
        down = np.where(s > 0, ndtr((-delta - m) / s), (m <= -delta).astype(float))
    return (w * up).sum(axis=1), (w * down).sum(axis=1)
