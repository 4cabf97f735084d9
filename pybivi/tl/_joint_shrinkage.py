"""Joint adaptive shrinkage of several log fold changes per gene (multivariate ``ash``).

A gene's kinetic parameters are estimated from the same two pseudo-bulks, nascent and
mature, so their log fold changes are correlated, and a perturbation program moves them in
a few typical directions: burst size alone (both species follow), relative degradation
alone (mature only), both together with the mature mean held flat (compensation). The
per-parameter prior of :func:`~pybivi.tl._shrinkage.shrink_lfc` sees none of this. Here
every gene's vector of log fold changes ``x_j ~ N(beta_j, V_j)``, with ``V_j`` the
estimates' covariance, and the true effects share one prior: a point mass at 0 and
zero-mean normals ``N(0, w^2 U)`` whose covariance patterns ``U`` are

- each parameter changing alone, every pair of parameters changing together in the same
  and in opposite directions, and all changing independently (``U = I``);
- one pattern learned from the data, the empirical covariance of the clearly changed genes
  (the data-driven step of mash; Urbut et al. 2019, *Nature Genetics* 51:187),

on a grid of scales ``w``. The mixture weights are fitted to all genes at once by maximum
likelihood (EM, with the same Dirichlet penalty on the point mass as ``ash``). A gene whose
burst-size change is clear and whose mature mean is flat then borrows that pattern for its
noisier degradation-rate change. Each parameter's posterior is a normal mixture, so its
tail probabilities are exact (:func:`~pybivi.tl._shrinkage.normal_mixture_tails`).
"""

from __future__ import annotations

import itertools

import numpy as np

from pybivi.tl._shrinkage import fit_mixture_weights

__all__ = ["covariance_patterns", "shrink_lfc_joint"]


def covariance_patterns(lfc: np.ndarray, cov: np.ndarray, z_strong: float = 3.0) -> np.ndarray:
    """The prior's covariance patterns ``(n_patterns, P, P)``, each of largest diagonal 1.

    Canonical ones (each parameter alone, each pair together and opposite, identity) and,
    with two parameters or more and when at least ``P + 1`` genes have an estimate beyond
    ``z_strong`` standard errors in some parameter, their empirical covariance less the
    mean error covariance (clipped to be positive semi-definite).
    """
    n_params = lfc.shape[1]
    eye = np.eye(n_params)
    patterns = [np.outer(e, e) for e in eye]
    for i, j in itertools.combinations(range(n_params), 2):
        for sign in (1.0, -1.0):
            v = eye[i] + sign * eye[j]
            patterns.append(np.outer(v, v))
    if n_params > 1:
        patterns.append(eye)
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    strong = np.any(np.abs(lfc) > z_strong * se, axis=1)
    if n_params > 1 and strong.sum() > n_params:
        x = lfc[strong]
        learned = x.T @ x / len(x) - cov[strong].mean(0)
        values, vectors = np.linalg.eigh((learned + learned.T) / 2)
        learned = (vectors * np.maximum(values, 0.0)) @ vectors.T
        if np.max(np.diag(learned)) > 0:
            patterns.append(learned)
    return np.stack([p / np.max(np.diag(p)) for p in patterns])


def _gaussian_loglik(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``log N(x; 0, total)`` for ``x (G, P)`` and ``total (G, K, P, P)`` -> ``(G, K)``."""
    _, logdet = np.linalg.slogdet(total)
    solved = np.linalg.solve(total, np.broadcast_to(x[:, None, :, None], total.shape[:-1] + (1,)))
    quad = np.einsum("gp,gkp->gk", x, solved[..., 0])
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + logdet + quad)


def shrink_lfc_joint(
    lfc_hat: np.ndarray,
    lfc_cov: np.ndarray,
    null_weight: float = 10.0,
    max_iter: int = 500,
) -> dict[str, np.ndarray]:
    """Empirical-Bayes shrinkage of each gene's vector of log fold changes.

    Parameters
    ----------
    lfc_hat
        Estimates, ``(n_genes, n_params)``.
    lfc_cov
        Their covariance per gene, ``(n_genes, n_params, n_params)``, positive definite.
    null_weight
        Dirichlet penalty on the point mass (ash's default 10).
    max_iter
        EM iterations at most.

    Returns
    -------
    dict
        ``patterns`` ``(K, P, P)`` and ``scales`` ``(L,)`` of the prior's components
        (the point mass first, then every pattern at every scale), ``weights``, and per
        gene ``posterior_weights`` ``(n_genes, 1 + K L)``, ``component_means``
        ``(n_genes, 1 + K L, P)`` and ``component_sds`` (the marginal standard
        deviations, same shape).
    """
    x = np.asarray(lfc_hat, dtype=np.float64)
    v = np.asarray(lfc_cov, dtype=np.float64)
    if x.ndim != 2 or v.shape != x.shape + (x.shape[1],):
        raise ValueError(
            f"lfc_hat must be (n_genes, n_params) and lfc_cov (n_genes, n_params, n_params), "
            f"got {x.shape} and {v.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v))):
        raise ValueError("lfc_hat and lfc_cov must be finite")
    if np.any(np.linalg.eigvalsh(v) <= 0):
        raise ValueError("every gene's lfc_cov must be positive definite")
    n_genes, n_params = x.shape
    patterns = covariance_patterns(x, v)
    se = np.sqrt(np.diagonal(v, axis1=1, axis2=2))
    # Scales as in ash: a tenth of the smallest error to twice the largest plausible
    # effect, a factor sqrt(2) apart.
    top = 2.0 * np.sqrt(max(np.max(x * x - se * se), np.min(se) ** 2 * 4.0))
    low = np.min(se) / 10.0
    n_grid = int(np.ceil(np.log(top / low) / np.log(np.sqrt(2.0)))) + 1
    scales = low * np.sqrt(2.0) ** np.arange(n_grid)
    prior_covs = scales[None, :, None, None] ** 2 * patterns[:, None]
    prior_covs = prior_covs.reshape(-1, n_params, n_params)
    prior_covs = np.concatenate([np.zeros((1, n_params, n_params)), prior_covs])
    total = prior_covs[None] + v[:, None]
    weights, post = fit_mixture_weights(_gaussian_loglik(x, total), null_weight, max_iter)
    # Component posteriors: mean T (T + V)^-1 x and covariance T - T (T + V)^-1 T, which
    # hold for a singular prior covariance T (a pattern of rank one) too.
    gain = np.linalg.solve(total, np.broadcast_to(prior_covs[None], total.shape))
    gain = np.swapaxes(gain, -1, -2)  # T (T + V)^-1, as T and (T + V) are symmetric
    means = np.einsum("gkpq,gq->gkp", gain, x)
    post_cov = prior_covs[None] - gain @ prior_covs[None]
    sds = np.sqrt(np.maximum(np.diagonal(post_cov, axis1=-2, axis2=-1), 0.0))
    return {
        "patterns": patterns,
        "scales": scales,
        "weights": weights,
        "posterior_weights": post,
        "component_means": means,
        "component_sds": sds,
    }
