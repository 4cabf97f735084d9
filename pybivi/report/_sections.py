"""The demo report's sections: figure 2 (embeddings, ARI, mixing entropy, comparison) and the
recovery of the simulator's kinetics, built on :class:`pybivi.report.Report`.

:func:`pybivi.report.run_demo` calls these; they also work on any AnnData that carries
the fitted models' representations in ``obsm["X_<Model>"]``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pybivi.report._html import Report, table_html

__all__ = ["add_figure2", "kinetic_recovery", "add_kinetic_recovery"]


# ------------------------------------------------------------------ figure 2 sections
def _embeddings(adata, models, mask, method, quiet) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    from pybivi import pl

    wanted = [m for m in ("BiVI", "ContrastiveBiVI", "ContrastiveVI") if m in models]
    if not wanted:
        wanted = list(models)[:2]
    out = {}
    for name in tqdm(wanted, desc=f"{method} embeddings", disable=quiet):
        out[name] = pl.embed(adata.obsm[f"X_{name}"][mask], method=method)
    return out


def _comparison_html(table: pd.DataFrame) -> str:
    """ContrastiveBiVI's mean metrics over seeds against the other models' (differences)."""
    if "ari" not in table or "ContrastiveBiVI" not in set(table["model"]):
        return ""
    mean = table.groupby("model").mean(numeric_only=True)
    cb = mean.loc["ContrastiveBiVI"]
    lines = []
    others = mean.drop(index="ContrastiveBiVI")
    if len(others):
        best = others["ari"].idxmax()
        lines.append(
            f"ContrastiveBiVI salient ARI {cb['ari']:.3f}; the best other model ({best}) "
            f"{others['ari'].max():.3f} (difference {cb['ari'] - others['ari'].max():+.3f})."
        )
    if "BiVI" in mean.index:
        lines.append(f"ARI difference to biVI: {cb['ari'] - mean.loc['BiVI', 'ari']:+.3f}.")
    if "mixing_entropy" in mean:
        for other in ("BiVI", "SCVI"):
            if other in mean.index:
                d = cb["mixing_entropy"] - mean.loc[other, "mixing_entropy"]
                lines.append(f"Mixing entropy difference to {other}: {d:+.3f}.")
    return "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"


def add_figure2(
    report: Report,
    adata,
    table: pd.DataFrame,
    purity: pd.DataFrame,
    *,
    models: Sequence[str],
    program_key: str | None,
    phase_key: str | None,
    perturbed: np.ndarray,
    embedding: str = "umap",
    intro: str = "",
    display: dict[str, str] | None = None,
    quiet: bool = False,
) -> None:
    """Add the sections of the paper's figure 2 (and the compensatory-program check).

    Parameters
    ----------
    report
        The report to add to.
    adata
        Prepared data with ``obsm["X_<Model>"]`` representations.
    table
        Per model and seed metrics (columns ``model``, ``seed``, ``ari``, ``mixing_entropy``).
    purity
        Per model, seed and program neighbour purity (may be empty).
    models
        Fitted models, in display order.
    program_key, phase_key
        ``obs`` columns used for colouring (either may be ``None``).
    perturbed
        Boolean mask of the perturbed cells (the metrics' and figures' cells).
    embedding
        ``"umap"`` or ``"pca"``.
    intro
        HTML for the first section.
    display
        Display names of the models.
    quiet
        Hide progress bars.
    """
    from pybivi import pl

    display = display or {}
    report.add_section("Data and settings", intro + table_html(
        pd.DataFrame({"cells": [adata.n_obs], "genes": [adata.n_vars],
                      "perturbed cells": [int(perturbed.sum())]}), index=False), key="data")
    coords = _embeddings(adata, models, perturbed, embedding, quiet)
    obs = adata.obs.loc[perturbed]
    colour_by = [k for k in (phase_key, program_key) if k is not None and k in obs]
    panels = []
    shown = [n for n in ("BiVI", "ContrastiveBiVI") if n in coords] or list(coords)
    for name in shown:
        space = "salient" if name in ("ContrastiveBiVI", "ContrastiveVI") else "latent"
        for key in colour_by:
            panels.append((coords[name], obs[key].astype(str).to_numpy(),
                           f"{display.get(name, name)} {space}, by {key}"))
    figs = []
    if panels:
        fig = pl.embedding_grid(panels, ncols=max(1, len(colour_by)))
        rows = "; ".join(
            f"row {i + 1}: {display.get(n, n)}" for i, n in enumerate(shown)
        )
        figs.append((fig, "figure2_embeddings.png",
                     f"Figure 2a-d: {embedding.upper()} of the perturbed cells' representations "
                     f"({rows}; salient space for contrastive models), coloured by "
                     + " and by ".join(colour_by) + "."))
    report.add_section("Figure 2a-d: latent spaces", figures=figs, key="figure2_embeddings")

    labels = {m: display.get(m, m) for m in models}
    bars = []
    for metric, name, ylabel in (("ari", "figure2e_ari.png", "program ARI"),
                                 ("mixing_entropy", "figure2f_entropy.png",
                                  "entropy of phase mixing")):
        if metric in table and table[metric].notna().any():
            fig = pl.metric_bars(table, metric, order=models, labels=labels, ylabel=ylabel)
            bars.append((fig, name, f"{ylabel}: mean over seeds, bars = s.d., dots = seeds"))
    stats = table.groupby("model").agg(["mean", "std"]).drop(columns="seed", level=0)
    stats.columns = [f"{a} {b}" for a, b in stats.columns]
    stats = stats.reindex(models).rename(index=labels)
    report.add_section("Figure 2e-f: program separation and cell-cycle mixing",
                       table_html(stats) + _comparison_html(table), bars, key="figure2_metrics")
    _compensatory_section(report, adata, purity, coords, obs, program_key, models, labels)


def _compensatory_section(report, adata, purity, coords, obs, program_key, models, labels):
    """Programs whose only effect is kinetic: N+M models can tell them apart, M-only cannot."""
    from pybivi import pl

    if not len(purity) or program_key is None:
        return
    kinds = dict(adata.uns.get("program_kinds", {}))
    comp = [p for p, k in kinds.items() if k == "compensatory"]
    figs = [(pl.purity_bars(purity.replace({"model": labels}),
                                  order=[labels[m] for m in models], kinds=kinds),
             "programs_purity.png",
             "Fraction of each perturbed cell's 15 nearest neighbours from its own program, "
             "per program and model (mean over seeds).")]
    text = ("<p>Per-program neighbour purity in each model's representation. A compensatory "
            "program changes burst size and relative degradation together, so the mature mean "
            "is unchanged and only nascent counts move: mature-only models (M) cannot see it."
            "</p>")
    if comp:
        mean = purity.groupby(["model", "program"])["purity"].mean().unstack()
        shown = mean.reindex(columns=[c for c in comp if c in mean.columns]).reindex(models)
        text += table_html(shown.rename(index=labels))
        pair = [m for m in ("ContrastiveVI", "ContrastiveBiVI") if m in coords]
        if pair:
            names = " and ".join(labels[m] for m in pair)
            progs = obs[program_key].astype(str).to_numpy()
            panels = [(coords[m], progs, f"{labels[m]} salient") for m in pair]
            figs.append((pl.embedding_grid(panels, ncols=len(panels), highlight=comp),
                         "compensatory_embeddings.png",
                         f"Compensatory programs highlighted (others grey) in the salient "
                         f"spaces of {names}."))
    report.add_section("Kinetic-only (compensatory) programs", text, figs, key="compensatory")


def kinetic_recovery(adata, program_key: str, control_mask: np.ndarray) -> pd.DataFrame:
    """Estimated vs true program-vs-control log2 changes of ``b`` and ``gamma/k``.

    Uses ContrastiveBiVI's posterior-mean kinetic layers (at the reference library)
    and the simulator's truth (``varm``, ``uns["simulation"]``); the true change of a
    program is its ``varm`` change times the mean strength of its perturbations.

    Returns
    -------
    pandas.DataFrame
        One row per program and gene: ``program``, ``gene``, ``kind`` (code),
        ``true_b``, ``est_b``, ``true_gamma``, ``est_gamma``.
    """
    sim = adata.uns["simulation"]
    table = pd.DataFrame(sim["perturbations"])
    b = np.asarray(adata.layers["ContrastiveBiVI_burst_size"], dtype=np.float64)
    g = np.asarray(adata.layers["ContrastiveBiVI_degradation_rate"], dtype=np.float64)
    labels = adata.obs[program_key].astype(str).to_numpy()
    rows = []
    for p, prog in enumerate(sim["programs"]):
        cells = labels == prog
        if not cells.any():
            continue
        strength = table.loc[table["annotated"] & (table["program"] == prog), "strength"].mean()
        est_b = np.log2(b[cells].mean(0) / b[control_mask].mean(0))
        est_g = np.log2(g[cells].mean(0) / g[control_mask].mean(0))
        rows.append(pd.DataFrame({
            "program": prog, "gene": adata.var_names, "kind": adata.varm["effect_kind"][:, p],
            "true_b": strength * adata.varm["log2_b_change"][:, p], "est_b": est_b,
            "true_gamma": strength * adata.varm["log2_gamma_change"][:, p], "est_gamma": est_g,
        }))
    return pd.concat(rows, ignore_index=True)


def add_kinetic_recovery(report: Report, adata, program_key: str, control_mask: np.ndarray):
    """Section comparing ContrastiveBiVI's kinetic shifts with the simulated truth."""
    from pybivi import pl
    from pybivi.tl import metrics

    rec = kinetic_recovery(adata, program_key, control_mask)
    kind_names = list(adata.uns["simulation"]["effect_kinds"])
    changed = rec["kind"].to_numpy() > 0
    summary = {}
    for param in ("b", "gamma"):
        sub = rec.loc[changed]
        score = metrics.log2_change_recovery(sub[f"est_{param}"], sub[f"true_{param}"])
        unchanged = rec.loc[~changed, f"est_{param}"].abs()
        summary[param] = {**score, "median_abs_unchanged": float(unchanged.median())}
    table = pd.DataFrame(summary).T
    table.index = ["burst size b", "relative degradation gamma/k"]
    panels = [
        (rec["true_b"].to_numpy(), rec["est_b"].to_numpy(), rec["kind"].to_numpy(),
         "burst size b"),
        (rec["true_gamma"].to_numpy(), rec["est_gamma"].to_numpy(), rec["kind"].to_numpy(),
         "relative degradation gamma/k"),
    ]
    fig = pl.truth_scatter(panels, kind_names)
    text = (
        "<p>Program-vs-control log2 change of ContrastiveBiVI's posterior-mean kinetic "
        "parameters (reference library, seed 0) against the simulator's truth, for every "
        "program and gene. <i>pearson</i> and <i>sign_agreement</i> are over the genes each "
        "program changes (|true change| >= 1 for sign agreement); <i>median_abs_unchanged</i> "
        "is the median |estimate| over genes the program leaves alone.</p>"
    )
    report.add_section(
        "Kinetic parameters against the truth", text + table_html(table),
        [(fig, "kinetic_recovery.png", "Estimated vs true log2 changes, by kind of effect.")],
        key="kinetic_recovery",
    )
    return summary
