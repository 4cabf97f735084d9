"""The pooled random-pairs tests: ``method="pairs"`` of :func:`pybivi.tl.de.kinetic` and
:func:`pybivi.tl.de.mean`.

As in the ContrastiveBiVI paper (appendix E): each group's cells and the reference's give
pooled posterior samples (``n_samples`` per group, :class:`~pybivi.tl._de_sources.Sampler`),
random pairs of them give log2 fold changes per gene, and a Bayes factor decides.
:func:`kinetic_pairs` is biVI's procedure on the scheme's kinetic parameters
(:func:`~pybivi.tl.bayes_factors.kinetic_bayes_factors`), :func:`mean_pairs` scvi-tools'
``change`` mode on normalised mature expression
(:func:`~pybivi.tl.bayes_factors.change_bayes_factors`). The group-level default is in
:mod:`pybivi.tl._de_group`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pybivi.tl._de_sources import (
    Sampler,
    default_kinetic_params,
    group_masks,
    is_idata,
    mature_group_means,
)
from pybivi.tl._de_streams import DecodeSettings
from pybivi.tl._de_weights import thin_masks
from pybivi.tl.bayes_factors import (
    change_bayes_factors,
    combined_call,
    estimate_pseudocounts,
    kinetic_bayes_factors,
    median_ratio_normalize,
)

__all__ = ["kinetic_pairs", "mean_pairs"]


def _sampler_and_masks(
    model_or_idata: Any,
    groupby: str,
    group: str | Sequence[str] | None,
    reference: str,
    n_samples: int,
    batch_size: int,
    seed: int,
    decode: DecodeSettings,
) -> tuple[Sampler, np.ndarray, dict[str, np.ndarray]]:
    """The draws' sampler and the reference's and groups' cells, thinned by their weights."""
    sampler = Sampler(
        model_or_idata, groupby, n_samples, seed, batch_size, decode.transform_batch
    )
    ref_mask, masks = group_masks(sampler.labels, sampler.is_control, group, reference, groupby)
    ref_mask, masks = thin_masks(ref_mask, masks, decode.cell_weights, seed)
    return sampler, ref_mask, masks


def kinetic_pairs(
    model_or_idata: Any,
    groupby: str,
    group: str | Sequence[str] | None,
    reference: str,
    *,
    params: Sequence[str] | None,
    delta: float,
    bf_threshold: float,
    n_pairs: int,
    n_samples: int,
    normalize: str | None,
    batch_size: int,
    seed: int,
    decode: DecodeSettings,
) -> pd.DataFrame:
    """biVI's pooled-pairs kinetic test, :func:`pybivi.tl.de.kinetic` with ``method="pairs"``.

    Each cell is kept with probability equal to its weight in ``decode.cell_weights``
    (all cells for ``None``) and decoded at ``decode.transform_batch``; see
    :func:`pybivi.tl.de.kinetic` for the other arguments.
    """
    sampler, ref_mask, masks = _sampler_and_masks(
        model_or_idata, groupby, group, reference, n_samples, batch_size, seed, decode
    )
    names = tuple(params) if params is not None else default_kinetic_params(model_or_idata)
    ref_samples = sampler(ref_mask, names, salt=0)
    profiles = {}
    if normalize == "median_ratio":
        # The reference against its own per-gene median (this also validates its samples),
        # then every group against that same profile.
        for p in names:
            ref_samples[p], profiles[p] = median_ratio_normalize(
                ref_samples[p], return_profile=True
            )
    tables = []
    for k, (g, mask) in enumerate(masks.items()):
        samples = sampler(mask, names, salt=k + 1)
        if profiles:
            samples = {p: median_ratio_normalize(samples[p], profiles[p]) for p in names}
        cols: dict[str, Any] = {"group": g, "reference": reference}
        calls = {}
        for j, p in enumerate(names):
            res = kinetic_bayes_factors(
                samples[p], ref_samples[p], delta, n_pairs, seed=seed + 7919 * (k + 1) + j
            )
            for key in ("proba_de", "bayes_factor", "lfc_mean", "lfc_median", "lfc_sd"):
                cols[f"{p}_{key}"] = res[key]
            calls[p] = res["bayes_factor"] > bf_threshold
            cols[f"{p}_is_de"] = calls[p]
        cols["call"] = combined_call(calls)
        tables.append(pd.DataFrame(cols, index=pd.Index(sampler.genes, name="gene")))
    return pd.concat(tables)


def mean_pairs(
    model_or_idata: Any,
    groupby: str,
    group: str | Sequence[str] | None,
    reference: str,
    *,
    delta: float,
    bf_threshold: float,
    n_samples: int,
    n_pairs: int | None,
    pseudocounts: float | None,
    threshold_counts: float,
    batch_size: int,
    seed: int,
    decode: DecodeSettings,
) -> pd.DataFrame:
    """scvi-tools' ``change`` mode, :func:`pybivi.tl.de.mean` with ``method="pairs"``.

    Each cell is kept with probability equal to its weight in ``decode.cell_weights``
    (all cells for ``None``) and decoded at ``decode.transform_batch``; see
    :func:`pybivi.tl.de.mean` for the other arguments.
    """
    sampler, ref_mask, masks = _sampler_and_masks(
        model_or_idata, groupby, group, reference, n_samples, batch_size, seed, decode
    )
    ref_scales = sampler(ref_mask, ["rho_mature"], salt=0)["rho_mature"]
    observed = None
    if pseudocounts is None and not is_idata(model_or_idata):
        means = mature_group_means(model_or_idata, [ref_mask, *masks.values()])
        observed = {"reference": means[0], "groups": dict(zip(masks, means[1:], strict=True))}
    tables = []
    for k, (g, mask) in enumerate(masks.items()):
        scales = sampler(mask, ["rho_mature"], salt=k + 1)["rho_mature"]
        eps = pseudocounts
        if eps is None:
            if observed is None:
                eps = 1e-10  # no counts at hand: scvi-tools' floor
            else:
                zero_a = observed["groups"][g] < threshold_counts
                zero_b = observed["reference"] < threshold_counts
                eps = estimate_pseudocounts(scales, ref_scales, zero_a, zero_b)
        res = change_bayes_factors(scales, ref_scales, delta, eps, n_pairs, seed=seed + k + 1)
        cols = {"group": g, "reference": reference}
        keys = ("proba_de", "bayes_factor", "log_bayes_factor", "direction")
        cols.update({key: res[key] for key in (*keys, "lfc_mean", "lfc_median", "lfc_sd")})
        cols.update(scale_group=res["scale_a"], scale_reference=res["scale_b"], pseudocounts=eps)
        cols["is_de"] = res["bayes_factor"] > bf_threshold
        tables.append(pd.DataFrame(cols, index=pd.Index(sampler.genes, name="gene")))
    return pd.concat(tables)
