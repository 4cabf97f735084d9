"""Figure 3 of the paper from fitted models: call counts, overlaps, posterior densities.

Builds on the Bayes-factor tests of :mod:`pybivi.tl.de` (:func:`pybivi.tl.de.kinetic`,
:func:`pybivi.tl.de.mean`) and adds what a report needs: the number of genes with strong
evidence per program and readout, the overlap of the kinetic and mean calls, posterior
densities for one gene, and, on simulated data, precision and recall of the kinetic calls
against the simulator's truth (computed by :mod:`pybivi.datasets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pybivi.datasets._truth import compensatory_summary, truth_arrays, truth_scores
from pybivi.pl import _de as plots
from pybivi.tl._de_sources import group_masks, model_labels
from pybivi.tl._de_summary import SHORT_NAMES, call_counts, overlap_table
from pybivi.tl.de import kinetic, mean

__all__ = ["figure3"]


# --------------------------------------------------------------------------- figure 3
def _pick_gene(kinetic_table, mean_table, adata) -> tuple[str, str]:
    """A compensatory gene: called for both b and gamma/k, shifts of the same sign, missed
    by the mean test (true compensatory genes first when the simulator's truth is there)."""
    t = kinetic_table[kinetic_table["call"] == "both"].copy()
    if mean_table is not None and len(t):
        mean_de = mean_table.set_index("group", append=True)["is_de"]
        keys = list(zip(t.index, t["group"], strict=True))
        t = t[~mean_de.reindex(keys).fillna(False).to_numpy(bool)]
    if len(t) and {"burst_size_lfc_mean", "degradation_rate_lfc_mean"} <= set(t.columns):
        t = t[np.sign(t["burst_size_lfc_mean"]) == np.sign(t["degradation_rate_lfc_mean"])]
    if adata is not None and len(t):
        try:
            programs, truth = truth_arrays(adata, t.index)
            col = [programs.index(g) if g in programs else -1 for g in t["group"]]
            kind = np.array([truth["kind"][i, c] if c >= 0 else "" for i, c in enumerate(col)])
            if np.any(kind == "compensatory"):
                t = t[kind == "compensatory"]
        except KeyError:
            pass
    if not len(t):
        t = kinetic_table
    bf = [c for c in t.columns if c.endswith("_bayes_factor")]
    best = int(np.argmax(t[bf].min(axis=1).to_numpy()))
    return str(t.index[best]), str(t["group"].iloc[best])


def figure3(
    contrastive_bivi: Any,
    scvi: Any = None,
    contrastive_vi: Any = None,
    groupby: str = "program",
    reference: str = "control",
    groups: Sequence[str] | None = None,
    truth: Any = None,
    gene: str | None = None,
    n_samples: int = 5_000,
    seed: int = 0,
    method: str = "group",
    estimate: str = "observed",
) -> dict[str, Any]:
    """Everything of the report's "figure 3" section, from fitted models.

    Parameters
    ----------
    contrastive_bivi
        Fitted ContrastiveBiVI (bursty scheme) for the kinetic tests.
    scvi, contrastive_vi
        Fitted mature-only models for the mean-expression tests (either may be ``None``).
    groupby, reference, groups
        Groups of cells (``obs`` column), the reference value, the groups to test
        (default: the simulator's programs when ``truth`` is given, else every group).
    truth
        The simulated AnnData (``uns["simulation"]``, ``varm``) for precision/recall.
    gene
        Gene for the posterior densities (default: a compensatory one, see the text).
    n_samples, seed
        Pooled posterior draws per group (``method="pairs"``); seed of every draw.
    method, estimate
        The tests' method and, for ``"group"``, where expression comes from (see
        :func:`pybivi.tl.de.kinetic`). With ``estimate="observed"`` the mean test reads the
        counts, which every model shares, so it runs once (label ``"counts"``); otherwise
        once per mature-only model.

    Returns
    -------
    dict
        ``"kinetic"`` and ``"mean"`` (``{label: table}``) tables, ``"counts"``
        (:func:`call_counts`), ``"overlap"`` (:func:`overlap_table`), ``"truth"``
        (:func:`truth_scores`) and ``"compensatory"`` (:func:`compensatory_summary`,
        ``None`` without truth), ``"gene"``/``"gene_group"``, ``"figures"`` (matplotlib
        figures ``counts``, ``overlap``, ``densities``) and ``"text"`` (Markdown summary).
    """
    if groups is None and truth is not None and "simulation" in truth.uns:
        groups = [str(p) for p in truth.uns["simulation"]["programs"]]
    kw = dict(groupby=groupby, group=groups, reference=reference, n_samples=n_samples, seed=seed,
              method=method)
    if method == "group":
        kw["estimate"] = estimate
    kin = kinetic(contrastive_bivi, **kw)
    means = {}
    if method == "group" and estimate == "observed":
        means["counts"] = mean(contrastive_bivi, **kw)
    else:
        for label, m in (("SCVI", scvi), ("ContrastiveVI", contrastive_vi)):
            if m is not None:
                means[label] = mean(m, **kw)
    first_mean = next(iter(means.values()), None)
    out: dict[str, Any] = {"kinetic": kin, "mean": means, "truth": None, "compensatory": None}
    out["counts"] = call_counts(kin, means)
    out["overlap"] = overlap_table(kin, means)
    if truth is not None:
        # Score against the change the program's pooled cells carry (varm x mean strength).
        out["truth"] = truth_scores(kin, truth, strength="mean")
        if first_mean is not None:
            out["compensatory"] = compensatory_summary(kin, first_mean, truth)
    if gene is None:
        gene, group = _pick_gene(kin, first_mean, truth)
    else:
        group = str(kin.loc[[gene], "group"].iloc[0])
    out["gene"], out["gene_group"] = gene, group
    out["figures"] = {
        "counts": plots.call_counts(out["counts"]),
        "overlap": plots.overlap(out["overlap"]),
        "densities": plots.posterior_densities(
            _density_samples(contrastive_bivi, scvi, gene, group, groupby, reference, seed),
            title=f"{gene}: {group} vs {reference}",
        ),
    }
    out["text"] = _figure3_text(out, reference)
    return out


def _density_samples(cbivi, scvi, gene, group, groupby, reference, seed, n=2_000):
    from pybivi._draws import pooled_samples

    samples: dict[str, dict[str, np.ndarray]] = {}
    for label, model, names in (
        ("SCVI", scvi, ("mean_mature",)),
        ("ContrastiveBiVI", cbivi, ("burst_size", "degradation_rate")),
    ):
        if model is None:
            continue
        labels, ctrl = model_labels(model, groupby)
        ref_mask, masks = group_masks(labels, ctrl, group, reference, groupby)
        for who, mask in ((group, masks[group]), (reference, ref_mask)):
            draws = pooled_samples(model, np.flatnonzero(mask), n, names, genes=[gene], seed=seed)
            for q in names:
                key = f"{SHORT_NAMES.get(q, 'mean' if q == 'mean_mature' else q)} ({label})"
                samples.setdefault(key, {})[who] = draws[q][:, 0]
    return samples


def _figure3_text(out: dict[str, Any], reference: str) -> str:
    kin = out["kinetic"]
    delta, fdr = kin.attrs.get("delta"), kin.attrs.get("fdr_target")
    if delta is not None and fdr is not None:
        rule = (
            f"group-level tests, |log2 FC| >= {delta:g}, calls at a posterior expected "
            f"FDR of {fdr:g}"
        )
    else:
        rule = "kinetic: BF > 3 at |log2 FC| >= 1; mean: BF > 2 at |log2 FC| >= 0.2"
    lines = [
        f"Genes with strong evidence of a shift versus {reference} ({rule}):",
        "",
        out["counts"].to_markdown() if _has_tabulate() else out["counts"].to_string(),
        "",
    ]
    null_cols = [c for c in kin.columns if c.endswith("_null_call_rate")]
    if null_cols:
        rates = kin.groupby("group", sort=False)[null_cols].first().max(axis=1)
        lines.append(
            "Null call rate (share of genes called on control-versus-control splits of the "
            f"same sizes, largest over parameters): {', '.join(f'{v:.3f}' for v in rates)}."
        )
    truth = out["truth"]
    if truth is not None and len(truth):
        lines.append(
            "Ground truth, per program (a call is false when the gene's true change of that "
            "parameter is 0; recall over genes whose true change is >= 2x at the program's "
            "mean perturbation strength):"
        )
        for target, label in (("burst_size", "b"), ("degradation_rate", "gamma/k")):
            t = truth[truth["target"] == target]
            lines.append(
                f"- {label}: precision {', '.join(_fmt(v) for v in t['precision'])}; "
                f"recall {', '.join(_fmt(v) for v in t['recall'])}."
            )
    comp = out["compensatory"]
    if comp is not None and len(comp):
        n, hit = int(comp["n_compensatory"].sum()), int(comp["kinetic_not_mean"].sum())
        frac = hit / n if n else float("nan")
        lines.append(
            f"Compensatory genes called by the kinetic test and missed by the mean test: "
            f"{hit}/{n} ({frac:.0%})."
        )
    lines.append(f"Posterior densities shown for {out['gene']} ({out['gene_group']}).")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.2f}"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
