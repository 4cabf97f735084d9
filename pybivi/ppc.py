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
calibrated model puts few genes in the tails (``ppp < 0.025`` or ``> 0.975``).

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
    "CountMoments",
    "statistics",
    "ppp_values",
    "PPCResult",
    "summarise",
    "ppc",
    "plot_ppc",
    "plot_calibration",
    "section",
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
        One row per statistic: the overall value (mean over genes) observed and in the
        replicates with its ``ppp``, the fraction of genes in each tail, the fraction
        inside the central 95%, and the correlation across genes of observed and
        replicate-mean values (on log scale for means and variances).
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
        summary.append(
            {
                "statistic": name,
                "observed_overall": float(np.nanmean(obs)),
                "replicate_overall": float(np.mean(overall_rep)),
                "ppp_overall": float(ppp_values(np.nanmean(obs)[None], overall_rep[:, None])[0]),
                "fraction_low_tail": float(np.mean(ppp[ok] < TAIL)) if ok.any() else np.nan,
                "fraction_high_tail": float(np.mean(ppp[ok] > 1 - TAIL)) if ok.any() else np.nan,
                "fraction_central_95": float(np.mean(np.abs(ppp[ok] - 0.5) <= 0.5 - TAIL))
                if ok.any()
                else np.nan,
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
    from pybivi.posterior import _predictive_counts, iter_draws

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
            x = _predictive_counts(model, batch, latent["z"], latent["t"], all_genes)
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


def plot_ppc(result: PPCResult, statistics: Sequence[str] | None = None):
    """Observed versus replicated statistics: per gene (top) and their distributions (bottom).

    Top row: each gene's observed statistic against the replicates' mean, with a bar of
    +-2 replicate sd and the identity line (log axes for means and variances). Bottom
    row: histogram over genes of the observed statistic and of the replicated one
    (all replicates pooled).
    """
    from matplotlib.figure import Figure

    names = list(statistics) if statistics is not None else list(result.observed.columns)
    fig = Figure(figsize=(3.0 * len(names), 5.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for j, name in enumerate(names):
        t = result.table[result.table["statistic"] == name]
        log = name.startswith(("mean", "variance"))
        ax = axes[0, j]
        ax.errorbar(
            t["observed"],
            t["replicate_mean"],
            yerr=2 * t["replicate_sd"],
            fmt=".",
            ms=3,
            alpha=0.6,
            elinewidth=0.5,
        )
        finite = np.concatenate([t["observed"], t["replicate_mean"]])
        finite = finite[np.isfinite(finite) & ((finite > 0) if log else True)]
        if finite.size:
            lo, hi = finite.min(), finite.max()
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.7)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(name.replace("_", " "), fontsize="medium")
        ax.set_xlabel("observed")
        rep = np.asarray(result.replicates[name]).ravel()
        obs = t["observed"].to_numpy()
        transform = (lambda v: np.log10(v[v > 0])) if log else (lambda v: v[np.isfinite(v)])
        bins = np.histogram_bin_edges(np.concatenate([transform(obs), transform(rep)]), 30)
        axes[1, j].hist(transform(rep), bins=bins, density=True, alpha=0.5, label="replicated")
        axes[1, j].hist(
            transform(obs), bins=bins, density=True, histtype="step", color="k", label="observed"
        )
        axes[1, j].set_xlabel(("log10 " if log else "") + name.replace("_", " "))
    axes[0, 0].set_ylabel("replicate mean (+-2 sd)")
    axes[1, 0].set_ylabel("density over genes")
    axes[1, 0].legend(fontsize="small", frameon=False)
    return fig


def plot_calibration(result: PPCResult):
    """Histograms of the per-gene posterior-predictive p-values, one panel per statistic.

    A calibrated model gives a roughly flat (or central) histogram; mass piled at 0 or 1
    means the observed statistic falls outside the replicates for many genes.
    """
    from matplotlib.figure import Figure

    names = list(result.observed.columns)
    fig = Figure(figsize=(2.6 * len(names), 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names, strict=True):
        ppp = result.table.loc[result.table["statistic"] == name, "ppp"].to_numpy()
        ax.hist(ppp[np.isfinite(ppp)], bins=np.linspace(0, 1, 21), color="0.4")
        ax.set_title(name.replace("_", " "), fontsize="medium")
        ax.set_xlabel("ppp")
    axes[0].set_ylabel("genes")
    return fig


def section(model_or_result: Any, n_replicates: int = 20, seed: int = 0) -> dict[str, Any]:
    """The report's posterior-predictive section: summary table, two figures, a short text.

    Parameters
    ----------
    model_or_result
        A fitted model (checked here with :func:`ppc`) or a :class:`PPCResult`.
    n_replicates, seed
        Passed to :func:`ppc` when a model is given.

    Returns
    -------
    dict
        ``"result"`` (:class:`PPCResult`), ``"summary"`` (DataFrame), ``"figures"``
        (``{"statistics": plot_ppc, "calibration": plot_calibration}``), ``"text"``.
    """
    if isinstance(model_or_result, PPCResult):
        result = model_or_result
    else:
        result = ppc(model_or_result, n_replicates=n_replicates, seed=seed)
    s = result.summary
    parts = [
        f"{name.replace('_', ' ')}: {100 * row['fraction_central_95']:.0f}% of genes inside the "
        f"replicates' central 95% (corr. across genes {row['gene_correlation']:.2f})"
        for name, row in s.iterrows()
    ]
    text = "Posterior-predictive check (observed statistic among replicated datasets): " + (
        "; ".join(parts) + "."
    )
    return {
        "result": result,
        "summary": s,
        "figures": {"statistics": plot_ppc(result), "calibration": plot_calibration(result)},
        "text": text,
    }
