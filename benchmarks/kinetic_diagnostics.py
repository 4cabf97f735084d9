"""Diagnostics of the kinetic calls that ``benchmarks/kinetic_calls.py`` prints: where the
spread of the pooled lfc comes from, how the salient space sits, whether the likelihood
itself is biased, and the compositional shift of normalised parameters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def _latents(model, adata):
    """Posterior means of ``t`` and ``z`` per cell, and the program and perturbation labels."""
    t = torch.as_tensor(model.get_latent_representation())
    z = torch.as_tensor(model.get_latent_representation(kind="background"))
    obs = adata.obs
    return t, z, obs["program"].astype(str).to_numpy(), obs["perturbation"].astype(str).to_numpy()


def _log2_rho_nascent(model, z: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """Decoded log2 ``rho_N`` (cells x genes) at the reference library."""
    ref = model.registry.reference_library
    with torch.no_grad():
        rho = model.module.decode(z, t, ref["nascent"], ref["mature"])["rho_nascent"]
    return np.log2(rho.numpy())


def spread_parts(model, adata, programs: list[str], truth: dict, seed: int) -> pd.DataFrame:
    """Where the pooled spread of log2 b comes from: within a cell (draws of q) or between
    cells (posterior means), in each program's cells and in the controls, for the genes
    the program changes (whose truth is one value for all cells of a group)."""
    from pybivi.posterior import iter_draws

    labels = adata.obs["program"].astype(str).to_numpy()

    def parts(idx: np.ndarray, genes: np.ndarray) -> tuple[float, float]:
        draws = [np.log2(d["reference"]["burst_size"].numpy()[..., genes]) for _, d in
                 iter_draws(model, idx, 20, quantities=("burst_size",),
                            libraries=("reference",), batch_size=256, seed=seed)]
        x = np.concatenate(draws, axis=1)  # (draws, cells, genes)
        return (float(np.median(np.sqrt(x.var(0).mean(0)))),
                float(np.median(np.sqrt(x.mean(0).var(0)))))

    rows = []
    for j, p in enumerate(programs):
        genes = np.flatnonzero((truth["burst_size"][:, j] != 0)
                               | (truth["degradation_rate"][:, j] != 0))
        within, between = parts(np.flatnonzero(labels == p), genes)
        c_within, c_between = parts(np.flatnonzero(labels == "control"), genes)
        rows.append({"program": p, "group_within": within, "group_between": between,
                     "control_within": c_within, "control_between": c_between})
    return pd.DataFrame(rows)


def likelihood_check(adata, programs: list[str], n_genes: int, seed: int) -> pd.DataFrame:
    """Is the bursty likelihood itself biased on compensatory genes? For a few true genes
    of each compensatory program, the simulator's per-cell kinetics with the program's
    change scaled by ``e`` (``e = 1``: the truth) are scored on 120 of the program's cells
    with the neural and with the exact conditional ``P(m | n)``; printed is the ``e`` of
    highest likelihood (grid step 0.1). A model that fits the data can only be as biased
    as this maximum."""
    from pybivi.schemes import BurstyScheme

    sim = adata.uns["simulation"]
    strength = dict(zip(sim["perturbations"]["perturbation"],
                        np.asarray(sim["perturbations"]["strength"], float), strict=True))
    obs, var = adata.obs, adata.var
    labels, pert = obs["program"].astype(str).to_numpy(), obs["perturbation"].astype(str)
    counts = {k: adata.layers[k].toarray() for k in ("unspliced", "spliced")}
    rng = np.random.default_rng(seed)
    grid = np.round(np.arange(0.4, 1.45, 0.1), 2)
    rows = []
    for j, p in enumerate(programs):
        if sim["program_kinds"][j] != "compensatory":
            continue
        change = np.asarray(adata.varm["log2_b_change"])[:, j]
        cells = rng.choice(np.flatnonzero(labels == p), 120, replace=False)
        s = np.array([strength[q] for q in pert.to_numpy()[cells]])
        phase = obs["phase"].astype(str).to_numpy()[cells]
        for g in rng.choice(np.flatnonzero(np.abs(change) >= 1), n_genes, replace=False):
            cycle = (np.where(phase == "S", var["cell_cycle_log2_S"].iloc[g], 0.0)
                     + np.where(phase == "G2M", var["cell_cycle_log2_G2M"].iloc[g], 0.0))
            base_b = np.log2(var["burst_size"].iloc[g] * obs["capture_efficiency"].to_numpy()
                             [cells]) + cycle
            x = [torch.as_tensor(counts[k][cells, g], dtype=torch.float64)
                 for k in ("unspliced", "spliced")]
            row = {"program": p, "gene": adata.var_names[g], "true_log2": change[g]}
            for name in ("neural", "exact"):
                scheme, ll = BurstyScheme(name), []
                for e in grid:
                    b = torch.as_tensor(2.0 ** (base_b + e * s * change[g]))
                    gamma = torch.as_tensor(var["degradation_rate"].iloc[g] * 2.0 ** (
                        e * s * change[g]))
                    beta = torch.as_tensor(float(var["splicing_rate"].iloc[g]),
                                           dtype=torch.float64)
                    mu_n, mu_m, theta = scheme.from_kinetic_params(b, beta, gamma)
                    ll.append(float(scheme.log_prob(*x, mu_n, mu_m, theta).sum()))
                row[f"argmax_e_{name}"] = grid[int(np.argmax(ll))]
            rows.append(row)
    return pd.DataFrame(rows)


def salient_centres(model, adata, programs: list[str], truth: dict) -> pd.DataFrame:
    """Per program: share of its cells whose salient mean is nearest its own centre, the
    nascent change decoded at that centre (t = centre, each cell's own z) over the truth,
    and the norms of the learned prior means ``mu_c`` and of the encoder's label centres."""
    t, z, labels, pert = _latents(model, adata)
    ctrl = labels == "control"
    base = _log2_rho_nascent(model, z[ctrl], torch.zeros_like(t[ctrl])).mean(0)
    centres = torch.stack([t[labels == p].mean(0) for p in programs])
    nearest = torch.cdist(t, centres).argmin(1).numpy()
    rows = []
    for j, p in enumerate(programs):
        cells = labels == p
        change = truth["burst_size_effective"][:, j]
        genes = np.abs(change) >= 1
        row = {"program": p, "nearest_own_centre": float(np.mean(nearest[cells] == j))}
        if genes.any():
            at_centre = centres[j].expand(int(cells.sum()), -1)
            decoded = _log2_rho_nascent(model, z[cells], at_centre).mean(0)
            row["rhoN_at_centre/true"] = float(np.median((decoded - base)[genes] / change[genes]))
        means = model.module.salient_means
        mus = [means[model.registry.labels.index(q)] for q in np.unique(pert[cells])]
        row["|mu_c|"] = float(np.mean([float(m.detach().norm()) for m in mus]))
        row["|centre|"] = float(centres[j].norm())
        rows.append(row)
    return pd.DataFrame(rows)


def spread_sources(model, adata, programs: list[str]) -> pd.DataFrame:
    """Which latent makes the program's cells differ: between-cell sd of the decoded log2
    ``rho_N`` (so of log2 ``b``, which is proportional to it at the reference library) for
    the genes whose ``b`` the program moves (not cell-cycle genes), at each cell's
    posterior means of ``z`` and ``t`` ("full"), with ``t`` replaced by its perturbation's
    mean ("t fixed") and with ``z`` replaced by the group's mean ("z fixed"). Within a
    perturbation these genes have one true value, so every bit of the spread is the model's.
    """
    t, z, labels, pert = _latents(model, adata)
    cycle = adata.var["cell_cycle_gene"].to_numpy(bool)

    def sd(zz, tt, genes) -> float:
        return float(np.median(_log2_rho_nascent(model, zz, tt)[:, genes].std(0)))

    rows = []
    for j, p in enumerate(programs):
        genes = np.flatnonzero((np.abs(np.asarray(adata.varm["log2_b_change"])[:, j]) >= 1)
                               & ~cycle)
        cells = np.flatnonzero(labels == p)
        if genes.size == 0 or cells.size == 0:
            continue
        zc, tc = z[cells], t[cells]
        t_mean = tc.clone()
        for q in np.unique(pert[cells]):
            t_mean[pert[cells] == q] = tc[pert[cells] == q].mean(0)
        rows.append({"program": p, "full": sd(zc, tc, genes), "t fixed": sd(zc, t_mean, genes),
                     "z fixed": sd(zc.mean(0).expand_as(zc), tc, genes),
                     "rms |t - perturbation mean|": float((tc - t_mean).norm(dim=1)
                                                          .pow(2).mean().sqrt()),
                     "|perturbation mean|": float(t_mean.norm(dim=1).mean())})
    return pd.DataFrame(rows)


def composition_shift(model, adata, seed: int) -> pd.DataFrame:
    """Mean log2 ``b`` (reference library, posterior means) of the control cells by cell-
    cycle phase, over the genes that nothing changes (no program, no cell cycle), relative
    to all controls. Their truth is the same in every phase: a non-zero shift is
    compositional (cell-cycle genes rise in S and G2M, so every other gene's share falls)."""
    from pybivi.posterior import iter_draws

    labels = adata.obs["program"].astype(str).to_numpy()
    phase = adata.obs["phase"].astype(str).to_numpy()
    moved = (np.abs(np.asarray(adata.varm["log2_b_change"])).sum(1)
             + np.abs(np.asarray(adata.varm["log2_gamma_change"])).sum(1)) > 0
    null = np.flatnonzero(~moved & ~adata.var["cell_cycle_gene"].to_numpy(bool))
    cells = np.flatnonzero(labels == "control")
    means = np.concatenate(
        [np.log2(d["reference"]["burst_size"].numpy()[..., null]).mean(0) for _, d in
         iter_draws(model, cells, 20, quantities=("burst_size",), libraries=("reference",),
                    batch_size=256, seed=seed)], axis=0)
    centre = means.mean(0)
    rows = [{"phase": ph, "cells": int(np.sum(phase[cells] == ph)),
             "mean log2 b shift": float((means[phase[cells] == ph] - centre).mean())}
            for ph in ("G1", "S", "G2M")]
    return pd.DataFrame(rows)


def group_level_calls(
    model, adata, programs: list[str], table: pd.DataFrame, n_draws: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The kinetic test on group means instead of pairs of cells: an experiment.

    For each of ``n_draws`` posterior draws of every cell, the mean over a group's cells of
    log2 b and log2 gamma/k (at the reference library); ``lfc`` is the difference of a
    program's and the controls' means, draw by draw, and a gene is called where
    ``(#(|lfc| >= 1) + 0.5) / (#(|lfc| < 1) + 0.5) > 3``, as in :func:`pybivi.tl.de.kinetic`.
    The between-cell spread no longer enters; what remains is the latents' posterior
    uncertainty of the group mean. Returns ``table`` with its ``*_is_de`` columns replaced,
    and, per program, the mean nascent and mature counts of the false calls and of the
    uncalled unchanged genes.
    """
    from pybivi.datasets._truth import truth_arrays
    from pybivi.posterior import iter_draws

    names = ("burst_size", "degradation_rate")
    labels = adata.obs["program"].astype(str).to_numpy()

    def mean_log2(mask: np.ndarray) -> dict[str, np.ndarray]:
        total = {q: np.zeros((n_draws, adata.n_vars)) for q in names}
        for _, draws in iter_draws(model, np.flatnonzero(mask), n_draws, quantities=names,
                                   libraries=("reference",), batch_size=256, seed=seed):
            for q in names:
                total[q] += np.log2(draws["reference"][q].cpu().numpy()).sum(axis=1)
        return {q: v / mask.sum() for q, v in total.items()}

    reference = mean_log2(labels == "control")
    out = table.copy()
    nascent = np.asarray(adata.layers["unspliced"].mean(0)).ravel()
    mature = np.asarray(adata.layers["spliced"].mean(0)).ravel()
    rows = []
    for p in programs:
        group = mean_log2(labels == p)
        sel = (out["group"] == p).to_numpy()
        for q in names:
            n_out = (np.abs(group[q] - reference[q]) >= 1.0).sum(axis=0)
            out.loc[sel, f"{q}_is_de"] = (n_out + 0.5) / (n_draws - n_out + 0.5) > 3.0
        t = out[sel]
        found, truth = truth_arrays(adata, t.index)
        j = found.index(p)
        unchanged = (truth["burst_size"][:, j] == 0) & (truth["degradation_rate"][:, j] == 0)
        called = t["burst_size_is_de"].to_numpy(bool) | t["degradation_rate_is_de"].to_numpy(bool)
        false, quiet = called & unchanged, ~called & unchanged
        rows.append({
            "program": p, "false_calls_of_unchanged": int(false.sum()),
            "nascent_false": np.median(nascent[false]) if false.any() else np.nan,
            "mature_false": np.median(mature[false]) if false.any() else np.nan,
            "nascent_uncalled": np.median(nascent[quiet]),
            "mature_uncalled": np.median(mature[quiet]),
        })
    return out, pd.DataFrame(rows)
