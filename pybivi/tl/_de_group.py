"""Group-level differential tests: population effects, shrinkage, FDR control, a null.

The default of :func:`pybivi.tl.de.kinetic` and an option of :func:`pybivi.tl.de.mean`. For each
group of cells and the reference:

1. **Population-level values.** Each species' normalised expression of the group at the
   reference library (its pseudo-bulk), mapped through the reaction scheme's kinetic map
   (bursty: ``b = mu_N / theta``, ``gamma/k = b / mu_M``), on the log2 scale.
   ``estimate="observed"`` takes the observed counts: the species' summed counts over its
   summed library sizes, times the reference library; ``estimate="decoded"`` takes them
   from the model's posterior draws (each draw's mean over the cells of the decoded means,
   see :func:`group_log2_draws`).
2. **Uncertainty.** The sampling variance of the group's pseudo-bulks, from the spread of
   its cells' counts (linearisation variance of the ratio, then the delta method,
   covariance of the two species included); for ``"decoded"`` the variance of the
   posterior draws is added.
3. **Shrinkage.** The log2 fold changes of all genes of a comparison share an
   empirical-Bayes prior, a point mass at 0 and normals (Stephens' ``ash``,
   :func:`~pybivi.tl.bayes_factors.shrink_lfc`), so that posterior probabilities are
   calibrated across genes: most genes do not change.
4. **Three-way test and calls** on the posterior draws (:func:`three_way_test`), calls
   under posterior expected FDR control (:func:`fdr_calls`).
5. **Empirical null.** Steps 1-4 on control-versus-control splits: random reference
   subsets, size-matched to each group, against the rest of the reference.

Everything streams one minibatch of cells at a time; memory holds per-set sums of shape
``(n_genes,)`` (``(n_draws, n_genes)`` for ``"decoded"``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pybivi.tl._de_batches import (
    batch_codes_of,
    split_by_batch,
    stratified_compare,
    stratified_cross,
)
from pybivi.tl._de_calls import UNKNOWN_SE, CallSettings, joint_calls, separate_calls
from pybivi.tl._de_sources import Sampler, default_kinetic_params, group_masks, scheme_and_theta
from pybivi.tl._de_streams import (
    DecodeSettings,
    group_log2_draws,
    null_splits,
    pseudobulk_moments,
)
from pybivi.tl._de_weights import effective_sizes, restrict_masks
from pybivi.tl.bayes_factors import combined_call

__all__ = ["ESTIMATES", "GROUP_DELTA", "group_test"]

ESTIMATES = ("observed", "decoded")
#: Default half-width of the region of practical equivalence of the group-level tests
#: (log2 units), chosen by measurement: see the user guide, "Kinetic calls".
GROUP_DELTA = 0.5
_LN2 = float(np.log(2.0))
#: Values of ``shrink``: ``True`` (joint when there are several parameters), "joint",
#: "separate" (one prior per parameter) and ``False`` (a flat prior).
SHRINKAGE = (True, False, "joint", "separate")



def _kinetic_map(scheme: Any, theta: np.ndarray, params: Sequence[str]) -> Callable:
    """``(log mu_N, log mu_M) -> {param: (log2 value, d/dlog mu_N, d/dlog mu_M)}``."""
    import torch

    theta_t = torch.as_tensor(np.asarray(theta, dtype=np.float64))

    def apply(log_n: np.ndarray, log_m: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
        with torch.enable_grad():  # callers may run under torch.no_grad()
            return _apply(log_n, log_m)

    def _apply(log_n: np.ndarray, log_m: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
        ln = torch.as_tensor(log_n, dtype=torch.float64).requires_grad_(True)
        lm = torch.as_tensor(log_m, dtype=torch.float64).requires_grad_(True)
        kin = scheme.kinetic_params(ln.exp(), lm.exp(), theta_t)
        missing = [p for p in params if p not in kin]
        if missing:
            raise KeyError(f"the scheme has no kinetic parameter(s) {missing} (has: {sorted(kin)})")
        out = {}
        for p in params:
            value = torch.log(kin[p].expand_as(ln))
            if not value.requires_grad:  # a parameter fixed per gene (e.g. beta/k)
                zero = np.zeros(ln.shape)
                out[p] = (value.detach().numpy() / _LN2, zero, zero)
                continue
            # Each gene's parameter depends on that gene only: the gradient of the sum
            # is every gene's own derivative.
            dn, dm = torch.autograd.grad(
                value.sum(), (ln, lm), allow_unused=True, retain_graph=True
            )
            dn = torch.zeros_like(ln) if dn is None else dn
            dm = torch.zeros_like(lm) if dm is None else dm
            out[p] = (value.detach().numpy() / _LN2, dn.numpy(), dm.numpy())
        return out

    return apply


def _observed_estimates(
    moments: dict[str, np.ndarray], params: Sequence[str], kinetic: Callable | None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[tuple[str, str], np.ndarray]]:
    """Per parameter: log2 value and its sampling variance, from the moments; and per
    pair of parameters the sampling covariance of their log2 values (delta method)."""
    with np.errstate(divide="ignore"):
        if kinetic is None:  # normalised mature expression only
            value = np.log2(moments["mean_mature"])
            return {p: (value, moments["var_log_mature"] / _LN2**2) for p in params}, {}
        log_n, log_m = np.log(moments["mean_nascent"]), np.log(moments["mean_mature"])
    mapped = kinetic(np.nan_to_num(log_n, neginf=0.0), np.nan_to_num(log_m, neginf=0.0))

    def covariance(p: str, q: str) -> np.ndarray:
        (_, dn_p, dm_p), (_, dn_q, dm_q) = mapped[p], mapped[q]
        return (
            dn_p * dn_q * moments["var_log_nascent"]
            + dm_p * dm_q * moments["var_log_mature"]
            + (dn_p * dm_q + dm_p * dn_q) * moments["cov_log"]
        ) / _LN2**2

    out = {}
    for p, (value, dn, dm) in mapped.items():
        unknown = (~np.isfinite(log_n) & (dn != 0)) | (~np.isfinite(log_m) & (dm != 0))
        out[p] = (np.where(unknown, np.nan, value), np.where(unknown, np.nan, covariance(p, p)))
    cross = {(p, q): covariance(p, q) for p, q in itertools.combinations(params, 2)}
    return out, cross


def _compare(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    extra_var: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """lfc estimate and standard error of two independent sets (unknown genes: 0 +- 10)."""
    lfc = a[0] - b[0]
    se = np.sqrt(a[1] + b[1] + extra_var)
    unknown = ~np.isfinite(lfc) | ~np.isfinite(se)
    se = np.where(unknown, UNKNOWN_SE, np.maximum(se, 1e-6))
    return np.where(unknown, 0.0, lfc), se


_COLUMNS = (
    "lfc_mean",
    "lfc_median",
    "lfc_sd",
    "lfc_low",
    "lfc_high",
    "lfc_estimate",
    "lfc_se",
    "proba_up",
    "proba_down",
    "proba_null",
    "proba_de",
    "bayes_factor",
    "log_bayes_factor",
)


def group_test(
    source: Any,
    groupby: str,
    group: str | Sequence[str] | None,
    reference: str,
    *,
    kind: str = "kinetic",
    params: Sequence[str] | None = None,
    estimate: str = "observed",
    delta: float = GROUP_DELTA,
    fdr_target: float | None = 0.05,
    shrink: bool | str = True,
    aggregate: str = "pseudobulk",
    n_draws: int = 100,
    n_posterior: int = 1000,
    null_repeats: int = 3,
    credible_mass: float = 0.95,
    bf_threshold: float = 3.0,
    normalize: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    decode: DecodeSettings | None = None,
) -> pd.DataFrame:
    """The group-level test behind :func:`pybivi.tl.de.kinetic` and :func:`pybivi.tl.de.mean`.

    ``kind="kinetic"`` tests the scheme's kinetic parameters ``params``;
    ``kind="mean"`` tests normalised mature expression (one parameter, whose columns
    carry no prefix). ``decode`` (:class:`~pybivi.tl._de_streams.DecodeSettings`, default
    all cells alike, each decoded at its own batch) holds the cell weights (one per
    cell, see :func:`pybivi.tl._de_weights.resolve_cell_weights`), which make every
    pseudo-bulk a weighted mean; cells of weight 0 leave the test, and the
    control-versus-control splits are size-matched to each group's effective number of
    cells. See :func:`pybivi.tl.de.kinetic` for the other arguments.

    For a model set up with ``batch_key`` (two batches or more), the observed
    pseudo-bulks are compared within each batch and combined with inverse-variance
    weights (:mod:`pybivi.tl._de_batches`); ``estimate="decoded"`` decodes at
    ``decode.transform_batch`` (each cell's own batch by default) and adds the pooled
    pseudo-bulks' sampling variance.
    """
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, not {estimate!r}")
    if null_repeats < 0:
        raise ValueError(f"null_repeats must be >= 0, got {null_repeats}")
    if shrink not in SHRINKAGE:
        raise ValueError(f"shrink must be one of {SHRINKAGE}, not {shrink!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    decode = DecodeSettings() if decode is None else decode
    cell_weights = decode.cell_weights
    sampler = Sampler(source, groupby, 1, seed, batch_size)
    ref_mask, masks = group_masks(sampler.labels, sampler.is_control, group, reference, groupby)
    ref_mask, masks = restrict_masks(ref_mask, masks, cell_weights)
    if kind == "kinetic":
        scheme, theta = scheme_and_theta(source, len(sampler.genes))
        names = tuple(params) if params is not None else default_kinetic_params(scheme)
        kinetic = _kinetic_map(scheme, theta, names)
    else:
        names, kinetic = ("rho_mature",), None
    sets = {"reference": np.flatnonzero(ref_mask)}
    sets.update({f"group:{g}": np.flatnonzero(m) for g, m in masks.items()})
    rng = np.random.default_rng([seed, 7919])
    splits = {}
    if null_repeats:
        sizes = effective_sizes(masks, cell_weights)
        splits = null_splits(sets["reference"], sizes, null_repeats, rng)
        for key, (inside, rest) in splits.items():
            sets[f"null:{key}"], sets[f"rest:{key}"] = inside, rest
    # Observed pseudo-bulks are compared within batches; decoded ones are corrected by
    # decoding (transform_batch), and their added sampling variance is the pooled one.
    codes = batch_codes_of(source) if estimate == "observed" else None
    counted = sets if codes is None else split_by_batch(sets, codes)
    moments = pseudobulk_moments(source, counted, batch_size, weights=cell_weights)
    observed, cross = {}, {}
    for k, m in moments.items():
        observed[k], cross[k] = _observed_estimates(m, names, kinetic)
    n_batches = 0 if codes is None else int(codes.max()) + 1
    decoded = None
    if estimate == "decoded":
        decoded, decoded_cross = _decoded_estimates(
            source, sets, names, kind, kinetic, aggregate, n_draws, batch_size, seed, decode
        )
        cross.update({f"decoded:{k}": c for k, c in decoded_cross.items()})
    elif decode.transform_batch is not None:
        raise ValueError(
            "transform_batch= applies to decoded quantities: use estimate='decoded' (the "
            "observed test already compares within batches)"
        )
    settings = CallSettings(
        delta,
        shrink=bool(shrink),
        normalize=normalize,
        n_posterior=n_posterior,
        credible_mass=credible_mass,
        fdr_target=fdr_target,
        bf_threshold=bf_threshold,
        rng=rng,
    )
    joint = shrink in (True, "joint") and len(names) > 1

    def estimate_lfc(a: str, b: str, p: str) -> tuple[np.ndarray, np.ndarray]:
        if decoded is not None:
            # The draws' spread plus the cells' sampling variance of the observed means.
            sampling = observed[a][p][1] + observed[b][p][1]
            sampling = np.where(np.isfinite(sampling), sampling, 0.0)
            return _compare(decoded[a][p], decoded[b][p], sampling)
        if codes is None:
            return _compare(observed[a][p], observed[b][p])
        return stratified_compare(observed, a, b, p, n_batches, _compare, UNKNOWN_SE)

    def estimate_cov(a: str, b: str, p: str, q: str) -> np.ndarray:
        if codes is not None and decoded is None:
            return stratified_cross(observed, cross, a, b, (p, q), n_batches, UNKNOWN_SE)
        sets = (a, b) if decoded is None else (a, b, f"decoded:{a}", f"decoded:{b}")
        total = sum(cross[k][(p, q)] for k in sets)
        return np.where(np.isfinite(total), total, 0.0)

    def compare(a: str, b: str) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
        estimates = {p: estimate_lfc(a, b, p) for p in names}
        if not joint:
            return {p: separate_calls(*estimates[p], settings) for p in names}
        lfc = np.stack([estimates[p][0] for p in names], 1)
        se = np.stack([estimates[p][1] for p in names], 1)
        cov = np.zeros(lfc.shape + (len(names),))
        for i, j in itertools.combinations(range(len(names)), 2):
            # Unknown genes (either se at UNKNOWN_SE) keep independent errors.
            known = (se[:, i] < UNKNOWN_SE) & (se[:, j] < UNKNOWN_SE)
            c = np.where(known, estimate_cov(a, b, names[i], names[j]), 0.0)
            # Correlations are kept inside (-1, 1), so every covariance stays invertible.
            limit = 0.999 * se[:, i] * se[:, j]
            cov[:, i, j] = cov[:, j, i] = np.clip(c, -limit, limit)
        cov[:, range(len(names)), range(len(names))] = se**2
        return joint_calls(lfc, cov, names, settings)

    null_rows = []
    for key in splits:
        g, r = key.rsplit("/", 1)
        for p, (_, calls) in compare(f"null:{key}", f"rest:{key}").items():
            null_rows.append(
                {
                    "group": g,
                    "repeat": int(r),
                    "param": p,
                    "n_cells": len(splits[key][0]),
                    "null_call_rate": float(np.mean(calls)),
                }
            )
    null = pd.DataFrame(
        null_rows, columns=["group", "repeat", "param", "n_cells", "null_call_rate"]
    )
    rates = null.groupby(["group", "param"])["null_call_rate"].mean() if len(null) else None
    tables = []
    for g in masks:
        cols: dict[str, Any] = {"group": g, "reference": reference}
        calls = {}
        for p, (res, calls[p]) in compare(f"group:{g}", "reference").items():
            prefix = f"{p}_" if kind == "kinetic" else ""
            cols.update({f"{prefix}{c}": res[c] for c in _COLUMNS})
            cols[f"{prefix}is_de"] = calls[p]
            cols[f"{prefix}null_call_rate"] = np.nan if rates is None else rates[(g, p)]
        if kind == "kinetic":
            cols["call"] = combined_call(calls)
        tables.append(pd.DataFrame(cols, index=pd.Index(sampler.genes, name="gene")))
    out = pd.concat(tables)
    out.attrs.update(
        null_call_rates=null, delta=float(delta), fdr_target=fdr_target, estimate=estimate
    )
    _warn_on_null(null, fdr_target, delta)
    return out


def _decoded_estimates(
    source: Any, sets: dict[str, np.ndarray], names: Sequence[str], kind: str,
    kinetic: Callable | None, aggregate: str, n_draws: int, batch_size: int, seed: int,
    decode: DecodeSettings,
) -> tuple[dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], dict[str, dict]]:
    """Per set and parameter: mean and variance over the posterior draws of the log2 value;
    and per set and pair of parameters, the covariance of the draws."""
    if kind == "mean":
        quantities: tuple[str, ...] = ("mean_mature",)
    elif aggregate == "pseudobulk":
        quantities = ("mean_nascent", "mean_mature")
    else:
        quantities = tuple(names)
    draws = group_log2_draws(
        source,
        sets,
        quantities,
        aggregate=aggregate,
        n_draws=n_draws,
        batch_size=batch_size,
        seed=seed,
        decode=decode,
    )
    out, cross = {}, {}
    for k, d in draws.items():
        if kind == "mean":
            per = {"rho_mature": d["mean_mature"]}
        elif aggregate == "pseudobulk":
            mapped = kinetic(d["mean_nascent"] * _LN2, d["mean_mature"] * _LN2)
            per = {p: v[0] for p, v in mapped.items()}
        else:
            per = d
        out[k] = {p: (v.mean(0), v.var(0)) for p, v in per.items()}
        centred = {p: v - v.mean(0) for p, v in per.items()}
        cross[k] = {
            (p, q): (centred[p] * centred[q]).mean(0)
            for p, q in itertools.combinations(names, 2)
        }
    return out, cross


def _warn_on_null(null: pd.DataFrame, fdr_target: float | None, delta: float) -> None:
    """Warn when control-versus-control splits call more genes than the FDR bound allows."""
    if fdr_target is None or null.empty:
        return
    rates = null.groupby(["group", "param"])["null_call_rate"].mean()
    bad = rates[rates > fdr_target]
    if len(bad):
        worst = ", ".join(f"{g}/{p}: {v:.3f}" for (g, p), v in bad.head(5).items())
        warnings.warn(
            f"control-versus-control splits call more than fdr_target={fdr_target} of the "
            f"genes at delta={delta} ({worst}); the calls of these groups are not "
            "calibrated: raise delta or check the fit",
            UserWarning,
            stacklevel=4,
        )
