"""Group-level calls: three-way test, posterior FDR control and adaptive shrinkage.

Pure functions on arrays, used by :mod:`pybivi.tl.de` and re-exported by
:mod:`pybivi.tl.bayes_factors`: :func:`three_way_test` summarises posterior draws of log fold
changes, :func:`fdr_calls` calls genes under posterior expected FDR control,
:func:`shrink_lfc` fits an empirical-Bayes prior shared by all genes (Stephens 2017) and
:func:`normal_mixture_tails` gives its exact tail probabilities. Tested against closed
forms, brute force and Monte Carlo in ``tests/test_de_group.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "HALF_COUNT",
    "as_samples",
    "three_way_test",
    "fdr_calls",
    "shrink_lfc",
    "normal_mixture_tails",
    "fit_mixture_weights",
    "mixture_draws",
]

#: Half count added to both sides of a Bayes factor computed from draws, so that one with
#: every draw on one side is large and finite, (n + 0.5) / 0.5 (a Jeffreys-style half count).
HALF_COUNT = 0.5


def as_samples(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a float64 ``(n_samples, n_genes)`` array (a vector is one gene)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n_samples, n_genes), got shape {x.shape}")
    return x


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
        draws (the half counts of :data:`HALF_COUNT` keep it finite) and
        ``log_bayes_factor``, its natural log.
    """
    x = as_samples(lfc_draws, "lfc_draws")
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
    c = HALF_COUNT
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
    prior, post = fit_mixture_weights(log_lik, null_weight, max_iter)
    shrink = scales[None, :] ** 2 / var
    mean_k = b[:, None] * shrink
    sd_k = np.sqrt(shrink * s[:, None] ** 2)
    draws = mixture_draws(post, mean_k, sd_k, n_draws, np.random.default_rng(seed))
    fit = {
        "scales": scales,
        "weights": prior,
        "posterior_mean": (post * mean_k).sum(axis=1),
        "posterior_weights": post,
        "component_means": mean_k,
        "component_sds": sd_k,
    }
    return draws, fit


def fit_mixture_weights(
    log_lik: np.ndarray, null_weight: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood mixture weights of a prior whose first component is the null.

    ``log_lik`` is ``(n_genes, n_components)``: each gene's log-likelihood under each
    component. EM from uniform weights, with a Dirichlet(``null_weight``, 1, ...) penalty
    on the first component (ash's). Returns the weights and each gene's posterior weights.
    """
    lik = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
    weights = np.full(lik.shape[1], 1.0 / lik.shape[1])
    penalty = np.zeros(lik.shape[1])
    penalty[0] = null_weight - 1.0
    for _ in range(max_iter):
        post = lik * weights
        post /= post.sum(axis=1, keepdims=True)
        new = post.sum(axis=0) + penalty
        new /= new.sum()
        done = np.max(np.abs(new - weights)) < 1e-8
        weights = new
        if done:
            break
    post = lik * weights
    return weights, post / post.sum(axis=1, keepdims=True)


def mixture_draws(
    weights: np.ndarray, means: np.ndarray, sds: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` draws per gene of normal mixtures given as ``(n_genes, n_components)`` arrays:
    one component per draw and gene, then a normal draw within it; ``(n, n_genes)``."""
    u = rng.random((n, weights.shape[0]))
    component = (u[..., None] > np.cumsum(weights, axis=1)[None]).sum(-1)
    component = np.minimum(component, weights.shape[1] - 1)
    genes = np.arange(weights.shape[0])[None, :]
    return means[genes, component] + sds[genes, component] * rng.standard_normal(u.shape)


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
