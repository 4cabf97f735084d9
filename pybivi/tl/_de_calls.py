"""From estimated log fold changes to shrunken posteriors, three-way tests and calls.

Used by the group-level tests (:mod:`pybivi.tl._de_group`): one parameter at a time with
:func:`~pybivi.tl._shrinkage.shrink_lfc`, or every kinetic parameter of a gene at once with
:func:`~pybivi.tl._joint_shrinkage.shrink_lfc_joint`. Either way each parameter's posterior
is a normal mixture per gene, read exactly for the probabilities and by draws for the lfc
summaries and the credible interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pybivi.tl._joint_shrinkage import shrink_lfc_joint
from pybivi.tl._shrinkage import (
    HALF_COUNT,
    fdr_calls,
    mixture_draws,
    normal_mixture_tails,
    shrink_lfc,
    three_way_test,
)

__all__ = ["UNKNOWN_SE", "CallSettings", "joint_calls", "separate_calls"]

# Standard error given to a gene a set never expresses: its lfc is unknown.
UNKNOWN_SE = 10.0


@dataclass(frozen=True)
class CallSettings:
    """How estimated lfcs become calls: shared by every comparison of one test."""

    delta: float
    shrink: bool
    normalize: str | None
    n_posterior: int
    credible_mass: float
    fdr_target: float | None
    bf_threshold: float
    rng: np.random.Generator

    def centred(self, lfc: np.ndarray, se: np.ndarray) -> np.ndarray:
        """``lfc`` less its median over the measured genes, under ``median_ratio``."""
        if self.normalize != "median_ratio":
            return lfc
        known = se < UNKNOWN_SE
        return lfc - np.median(lfc[known]) if np.any(known) else lfc


def _summarise(
    draws: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    sds: np.ndarray,
    lfc: np.ndarray,
    se: np.ndarray,
    settings: CallSettings,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    res = three_way_test(draws, settings.delta, settings.credible_mass)
    # The probabilities exactly, from the posterior's normal mixture; the draws give the
    # lfc summaries and the credible interval.
    up, down = normal_mixture_tails(weights, means, sds, settings.delta)
    p_de = np.minimum(up + down, 1.0)
    half = HALF_COUNT / settings.n_posterior  # as with draws: the Bayes factor stays finite
    res.update(
        proba_up=up,
        proba_down=down,
        proba_de=p_de,
        proba_null=1.0 - p_de,
        bayes_factor=(p_de + half) / (1.0 - p_de + half),
    )
    res["log_bayes_factor"] = np.log(res["bayes_factor"])
    res["lfc_estimate"], res["lfc_se"] = lfc, se
    if settings.fdr_target is None:
        calls = res["bayes_factor"] > settings.bf_threshold
    else:
        calls = fdr_calls(res["proba_de"], settings.fdr_target)
    return res, calls


def separate_calls(
    lfc: np.ndarray, se: np.ndarray, settings: CallSettings
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One parameter's test: ``ash`` shrinkage (or a flat prior), three-way test, calls."""
    lfc = settings.centred(lfc, se)
    if settings.shrink:
        draws, fit = shrink_lfc(lfc, se, n_draws=settings.n_posterior, seed=settings.rng)
        weights, means, sds = fit["posterior_weights"], fit["component_means"], fit["component_sds"]
    else:
        draws = lfc + se * settings.rng.standard_normal((settings.n_posterior, lfc.size))
        weights, means, sds = np.ones((lfc.size, 1)), lfc[:, None], se[:, None]
    return _summarise(draws, weights, means, sds, lfc, se, settings)


def joint_calls(
    lfc: np.ndarray, cov: np.ndarray, params: Sequence[str], settings: CallSettings
) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every parameter's test from one prior shared by a gene's parameters.

    ``lfc`` is ``(n_genes, n_params)`` and ``cov`` its covariance per gene; returns, per
    parameter, the same ``(results, calls)`` as :func:`separate_calls`.
    """
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    lfc = np.stack([settings.centred(lfc[:, i], se[:, i]) for i in range(len(params))], 1)
    fit = shrink_lfc_joint(lfc, cov)
    weights = fit["posterior_weights"]
    out = {}
    for i, p in enumerate(params):
        means, sds = fit["component_means"][..., i], fit["component_sds"][..., i]
        rng = np.random.default_rng(settings.rng.integers(2**32))
        draws = mixture_draws(weights, means, sds, settings.n_posterior, rng)
        out[p] = _summarise(draws, weights, means, sds, lfc[:, i], se[:, i], settings)
    return out
