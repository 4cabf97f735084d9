"""Posterior-predictive checks: replicated datasets from a fitted model versus the data.

For each replicate ``r`` every cell gets one draw of its latents from the guide and one
draw of its counts from the model's likelihood (the scheme's exact sampler for CME
models, (ZI)NB otherwise, through :class:`pyro.infer.Predictive`). Per gene we compare
the observed and replicated

* mean and variance of the nascent and of the mature counts,
* fraction of zero counts of each species,
* nascent-mature Pearson correlation (models that see both species),

and summarise where the observed statistic falls among the replicates: the
posterior-predictive p-value ``ppp = (#(rep < obs) + 0.5 #(rep == obs)) / R``. A well
calibrated model puts few genes in the tails (``ppp < 0.025`` or ``> 0.975``): with ``R``
replicates, exactly :func:`expected_coverage` ``(R)`` of them inside (0.905 at ``R = 20``,
0.941 at ``R = 100``), the number to compare ``fraction_central_95`` with.

Statistics are accumulated over minibatches as sums, so memory is
``O(n_replicates x n_genes)`` plus one minibatch of replicated counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "STATISTICS",
    "expected_coverage",
    "calibration_bins",
    "CountMoments",
    "statistics",
    "ppp_values",
    "PPCResult",
    "summarise",
    "ppc",
]

STATISTICS = ("mean", "variance", "zero_fraction", "correlation")
# Tails that count as "observed statistic outside the replicates' bulk".
TAIL = 0.025


class CountMoments:
    """Per-gene running sums of count pairs, merged over minibatches.

    Parameters
    ----------
    n_genes
        Number of genes.
    leading
        Extra leading shape (e.g. ``(n_replicates,)``) of the accumulated statistics.
    """

    def __init__(self, n_genes: int, leading: tuple[int, ...] = ()):
        shape = (*leading, n_genes)
        self.n = 0
        self.sums = {k: np.zeros(shape) for k in ("n", "m", "nn", "mm", "nm", "zn", "zm")}
        self.has_nascent = False

    def add(self, nascent: np.ndarray | None, mature: np.ndarray) -> None:
        """Add cells: arrays ``(*leading, cells, genes)``; ``nascent`` may be ``None``."""
        mature = np.asarray(mature, dtype=np.float64)
        s = self.sums
        s["m"] += mature.sum(-2)
        s["mm"] += (mature**2).sum(-2)
        s["zm"] += (mature == 0).sum(-2)
        if nascent is not None:
            nascent = np.asarray(nascent, dtype=np.float64)
            self.has_nascent = True
            s["n"] += nascent.sum(-2)
            s["nn"] += (nascent**2).sum(-2)
            s["zn"] += (nascent == 0).sum(-2)
            s["nm"] += (nascent * mature).sum(-2)
        self.n += mature.shape[-2]

    def finalize(self) -> dict[str, np.ndarray]:
        """Statistics per gene: ``{"<stat>_<species>": array, "correlation": array}``.

        Variances use ``ddof = 1``; the correlation is ``nan`` where a species is constant.
        """
        if self.n < 2:
            raise ValueError("need at least two cells to compute variances")
        s, n = self.sums, self.n
        out = {}
        species = (("nascent", "n", "nn", "zn"),) if self.has_nascent else ()
        for name, k1, k2, kz in (*species, ("mature", "m", "mm", "zm")):
            mean = s[k1] / n
            out[f"mean_{name}"] = mean
            out[f"variance_{name}"] = np.maximum(s[k2] - n * mean**2, 0.0) / (n - 1)
            out[f"zero_fraction_{name}"] = s[kz] / n
        if self.has_nascent:
            cov = (s["nm"] - n * out["mean_nascent"] * out["mean_mature"]) / (n - 1)
            denom = np.sqrt(out["variance_nascent"] * out["variance_mature"])
            with np.errstate(invalid="ignore", divide="ignore"):
                out["correlation"] = np.where(denom > 0, cov / denom, np.nan)
        return out


def statistics(x_nascent: np.ndarray | None, x_mature: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene statistics of a cells x genes count matrix (pair).

    Parameters
    ----------
    x_nascent
        Nascent counts ``(cells, genes)``, or ``None`` for mature-only data.
    x_mature
        Mature counts ``(cells, genes)``.

    Returns
    -------
    dict
        ``mean_*``, ``variance_*`` (ddof 1), ``zero_fraction_*`` per species and
        ``correlation`` (when nascent counts are given), each of shape ``(genes,)``.
    """
    acc = CountMoments(np.shape(x_mature)[-1])
    acc.add(_dense(x_nascent), _dense(x_mature))
    return acc.finalize()


def _dense(x):
    if x is None:
        return None
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def ppp_values(observed: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Posterior-predictive p-values with mid-rank ties.

    Parameters
    ----------
    observed
        ``(genes,)`` observed statistic.
    replicates
        ``(n_replicates, genes)`` replicated statistic.

    Returns
    -------
    numpy.ndarray
        ``(#(rep < obs) + 0.5 #(rep == obs)) / R`` per gene (``nan`` where the observed
        or every replicated value is ``nan``).
    """
    observed = np.asarray(observed, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    valid = np.isfinite(replicates)
    below = np.sum((replicates < observed) & valid, axis=0)
    ties = np.sum((replicates == observed) & valid, axis=0)
    n = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ppp = (below + 0.5 * ties) / n
    return np.where(np.isfinite(observed) & (n > 0), ppp, np.nan)


def expected_coverage(n_replicates: int, tail: float = TAIL) -> float:
    """Share of genes a *calibrated* model puts inside the central ``1 - 2 tail``.

    Derivation: if the model is calibrated, the observed statistic ``Y`` and its ``R``
    replicates ``X_1..X_R`` are exchangeable draws of one continuous law, so the number
    ``K`` of replicates below ``Y`` (the rank of ``Y`` among the ``R + 1`` values) is
    uniform on ``{0, ..., R}``, and ``ppp = K / R``. A gene counts as inside when
    ``tail <= K / R <= 1 - tail``, i.e. when ``X_(i) <= Y < X_(j)`` for the order
    statistics ``i = ceil(tail R)``, ``j = floor((1 - tail) R) + 1``, which happens with
    probability ``(j - i) / (R + 1)``. For ``tail = 0.025``: ``19/21 = 0.905`` at
    ``R = 20``, ``39/41 = 0.951`` at ``R = 40``, ``95/101 = 0.941`` at ``R = 100``; it
    tends to 0.95 as ``R`` grows. Statistics with ties (mid-rank ``ppp``, e.g. a zero
    fraction over few cells) differ slightly.

    Parameters
    ----------
    n_replicates
        Number of replicated datasets ``R``.
    tail
        Tail probability on each side (0.025 for the central 95%).

    Returns
    -------
    float
        The probability, computed with the same comparison as :func:`summarise`.
    """
    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
    if not 0.0 <= tail < 0.5:
        raise ValueError(f"tail must be in [0, 0.5), got {tail}")
    grid = np.arange(n_replicates + 1) / n_replicates
    return float(np.mean(np.abs(grid - 0.5) <= 0.5 - tail))


def calibration_bins(n_replicates: int, max_bins: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Histogram bins of ``ppp`` values aligned to their grid ``k / R``.

    Every bin holds whole grid values ``k / R`` (with the half steps ``(k + 1/2) / R``
    that ties produce); at most ``max_bins`` bins of nearly equal numbers of grid
    values.

    Parameters
    ----------
    n_replicates
        Number of replicated datasets ``R``.
    max_bins
        Largest number of bins.

    Returns
    -------
    tuple
        ``(edges, values_per_bin)``: ``len(edges) = n_bins + 1`` and the number of grid
        values ``k / R`` in each bin (divide counts by it for a histogram that is flat,
        at ``1 / (R + 1)`` per value, under calibration).
    """
    if n_replicates < 1 or max_bins < 1:
        raise ValueError("n_replicates and max_bins must be >= 1")
    n_values = n_replicates + 1
    bounds = np.unique(np.round(np.linspace(0, n_values, min(max_bins, n_values) + 1)))
    edges = (bounds - 0.25) / n_replicates
    return edges, np.diff(bounds).astype(np.float64)


@dataclasses.dataclass
class PPCResult:
    """Outcome of a posterior-predictive check.

    Attributes
    ----------
    observed
        DataFrame genes x statistics of the data.
    replicates
        ``{statistic: array (n_replicates, genes)}``.
    table
        Per gene and statistic: observed value, replicate mean and sd, ``ppp``
        (long format: index gene, columns ``statistic``, ``observed``, ``replicate_mean``,
        ``replicate_sd``, ``ppp``).
    summary
        One row per statistic:

        * ``observed_overall``, ``replicate_overall``: the statistic averaged over genes,
          in the data and in the replicates;
        * ``ppp_overall``: the ``ppp`` of that gene average. It tests one number (the
          average level over all genes), not the genes' calibration: with many genes the
          replicates' average barely varies, so a bias of a few percent shared by the
          genes already gives 0 or 1. Read ``median_ratio`` for the size of such a bias
          and the ``fraction_*`` columns for calibration;
        * ``median_ratio``: median over genes of replicate mean / observed (genes with a
          positive observed value): 0.8 for a variance means the model predicts 20% less
          variance than observed for the typical gene;
        * ``fraction_low_tail`` / ``fraction_high_tail``: genes with ``ppp < 0.025`` /
          ``> 0.975``; ``fraction_central_95``: the rest;
        * ``expected_central_95``: what a calibrated model reaches with this number of
          replicates (:func:`expected_coverage`; 0.905 at 20, 0.941 at 100);
        * ``gene_correlation``: correlation across genes of observed and replicate-mean
          values (on log scale for means and variances).
    """

    observed: pd.DataFrame
    replicates: dict[str, np.ndarray]
    table: pd.DataFrame
    summary: pd.DataFrame


def summarise(
    observed: dict[str, np.ndarray], replicates: dict[str, np.ndarray], genes: list[str]
) -> PPCResult:
    """Build a :class:`PPCResult` from observed and replicated per-gene statistics."""
    rows, summary = [], []
    for name, obs in observed.items():
        rep = np.asarray(replicates[name], dtype=np.float64)
        ppp = ppp_values(obs, rep)
        with np.errstate(invalid="ignore"):
            rep_mean, rep_sd = np.nanmean(rep, 0), np.nanstd(rep, 0)
        rows.append(
            pd.DataFrame(
                {
                    "statistic": name,
                    "observed": obs,
                    "replicate_mean": rep_mean,
                    "replicate_sd": rep_sd,
                    "ppp": ppp,
                },
                index=pd.Index(genes, name="gene"),
            )
        )
        ok = np.isfinite(ppp)
        logscale = name.startswith(("mean", "variance"))
        x, y = obs[ok & np.isfinite(rep_mean)], rep_mean[ok & np.isfinite(rep_mean)]
        if logscale:
            x, y = np.log1p(x), np.log1p(y)
        corr = np.corrcoef(x, y)[0, 1] if len(x) > 2 and x.std() > 0 and y.std() > 0 else np.nan
        overall_rep = np.nanmean(rep, axis=1)
        positive = ok & np.isfinite(rep_mean) & (obs > 0)
        ratio = np.nan
        if positive.any():
            ratio = float(np.median(rep_mean[positive] / obs[positive]))
        summary.append(
            {
                "statistic": name,
                "observed_overall": float(np.nanmean(obs)),
                "replicate_overall": float(np.mean(overall_rep)),
                "ppp_overall": float(ppp_values(np.nanmean(obs)[None], overall_rep[:, None])[0]),
                "median_ratio": ratio,
                "fraction_low_tail": float(np.mean(ppp[ok] < TAIL)) if ok.any() else np.nan,
                "fraction_high_tail": float(np.mean(ppp[ok] > 1 - TAIL)) if ok.any() else np.nan,
                "fraction_central_95": float(np.mean(np.abs(ppp[ok] - 0.5) <= 0.5 - TAIL))
                if ok.any()
                else np.nan,
                "expected_central_95": expected_coverage(rep.shape[0]),
                "gene_correlation": float(corr),
            }
        )
    observed_df = pd.DataFrame(observed, index=pd.Index(genes, name="gene"))
    return PPCResult(
        observed=observed_df,
        replicates={k: np.asarray(v) for k, v in replicates.items()},
        table=pd.concat(rows),
        summary=pd.DataFrame(summary).set_index("statistic"),
    )


def ppc(
    model: Any,
    n_replicates: int = 20,
    adata: Any = None,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> PPCResult:
    """Posterior-predictive check of a fitted model (any scheme, any likelihood).

    Parameters
    ----------
    model
        A fitted pybivi model.
    n_replicates
        Replicated datasets ``R``: each draws every cell's latents from the guide once
        and its counts from the likelihood.
    adata
        AnnData to check (default: the training data); it must have the model's genes.
    indices
        Rows of ``adata`` to use (default: all).
    batch_size
        Upper bound on cells per minibatch; it is lowered so that one minibatch of
        replicated counts holds at most about 4 million numbers.
    seed
        Seed of the latent draws and of the replicated counts (global RNG restored).

    Returns
    -------
    PPCResult
        Tables per gene and statistic, the replicated statistics and the calibration
        summary (see :class:`PPCResult`).
    """
    from pybivi._draws import iter_draws
    from pybivi.posterior import predictive_counts

    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
    module = model.module
    n_genes = model.registry.n_genes
    species = tuple(getattr(module, "species", ("nascent", "mature")))
    cells = max(1, min(batch_size, 4_000_000 // (n_replicates * n_genes * len(species))))
    observed = CountMoments(n_genes)
    replicated = CountMoments(n_genes, leading=(n_replicates,))
    all_genes = np.arange(n_genes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = iter_draws(
            model,
            indices,
            n_replicates,
            quantities=(),
            libraries=(),
            adata=adata,
            batch_size=cells,
            seed=seed,
        )
        for batch, latent in draws:
            x = predictive_counts(model, batch, latent["z"], latent["t"], all_genes)
            nascent = batch.get("x_nascent")
            observed.add(
                None if nascent is None or "nascent" not in species else nascent.cpu().numpy(),
                batch["x_mature"].cpu().numpy(),
            )
            if x.ndim == 4:  # (R, B, G, 2): nascent, mature
                replicated.add(x[..., 0], x[..., 1])
            else:  # (R, B, G): mature only
                replicated.add(None, x)
    genes = [str(g) for g in model.registry.var_names]
    return summarise(observed.finalize(), replicated.finalize(), genes)
