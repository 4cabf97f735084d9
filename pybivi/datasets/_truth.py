"""Kinetic calls against the simulator's truth: precision and recall per program.

Only simulated data allow it: :func:`pybivi.datasets.simulate_perturbseq` records each
gene's true log2 changes of burst size and relative degradation per program. Used by the
demo report (figure 3's ground-truth section, :mod:`pybivi.report`) and by
``benchmarks/kinetic_calls.py``; reachable as ``pybivi.tl.de.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["truth_scores", "program_strengths", "compensatory_summary"]


def truth_arrays(adata: Any, genes: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Simulator truth aligned to ``genes``: programs and per gene x program arrays."""
    sim = adata.uns.get("simulation") if hasattr(adata, "uns") else None
    if sim is None or "log2_b_change" not in adata.varm:
        raise KeyError("no simulator truth: adata.uns['simulation'] / varm['log2_b_change']")
    rows = pd.Index(adata.var_names).get_indexer(list(genes))
    if np.any(rows < 0):
        raise KeyError("the table's genes are not all in the AnnData")
    kinds = np.asarray(sim["effect_kinds"], dtype=object)
    return [str(p) for p in sim["programs"]], {
        "burst_size": np.asarray(adata.varm["log2_b_change"])[rows],
        "degradation_rate": np.asarray(adata.varm["log2_gamma_change"])[rows],
        "kind": kinds[np.asarray(adata.varm["effect_kind"])[rows]],
    }


def program_strengths(adata: Any) -> dict[str, float]:
    """Mean perturbation strength of each simulated program, weighted by its cells.

    ``adata.varm`` holds each program's log2 changes for a perturbation of strength 1;
    a program's cells carry them times their own perturbation's strength (0.8 to 1.2 in
    :func:`pybivi.datasets.simulate_perturbseq`), so the change that a program's pooled
    cells show is the varm value times this mean. Weights are the program's annotated
    perturbations' cell counts in ``adata.obs["perturbation"]`` (equal weights when that
    column or the cells are missing).
    """
    sim = adata.uns["simulation"]
    table = pd.DataFrame({k: list(v) for k, v in sim["perturbations"].items()})
    table = table[table["annotated"].astype(bool)]
    labels = adata.obs["perturbation"].astype(str) if "perturbation" in adata.obs else None
    out = {}
    for program, rows in table.groupby("program", sort=False):
        weights = np.ones(len(rows))
        if labels is not None:
            counts = np.array([(labels == q).sum() for q in rows["perturbation"]], dtype=float)
            weights = counts if counts.sum() > 0 else weights
        out[str(program)] = float(np.average(rows["strength"].astype(float), weights=weights))
    return out


def truth_scores(
    kinetic_table: pd.DataFrame,
    adata: Any,
    min_log2: float = 1.0,
    strength: str = "unit",
    strong_log2: float = 1.5,
) -> pd.DataFrame:
    """Precision and recall of kinetic calls against the simulator's truth, per program.

    A gene truly changes a parameter in a program when ``|log2 change| >= min_log2``
    (default: at least 2x) in ``adata.varm`` (see :func:`pybivi.datasets.simulate_perturbseq`).

    Parameters
    ----------
    kinetic_table
        A table of :func:`pybivi.tl.de.kinetic` with programs as groups.
    adata
        The simulated AnnData (``uns["simulation"]``, ``varm``).
    min_log2
        Threshold on the true ``|log2 change|``.
    strength
        ``"unit"``: the varm change (a perturbation of strength 1); ``"mean"``: times the
        program's mean perturbation strength (:func:`program_strengths`), the change its
        pooled cells actually carry. With ``"mean"`` a gene listed at ``|log2| = 1.05``
        in a program of mean strength 0.9 (a true change of 1.9x) is not a >= 2x change.
    strong_log2
        Second threshold for ``recall_strong``: the recall among genes changing at least
        this much. A change just above ``delta`` cannot give a Bayes factor above 3 unless
        the pooled lfc spread is small (for ``lfc ~ N(L, s^2)`` it needs about
        ``L >= delta + 0.67 s``), so the two recalls tell spread from bias apart.

    Returns
    -------
    pandas.DataFrame
        One row per program and target (``burst_size``, ``degradation_rate`` and ``any``:
        the gene is called for either parameter / truly changes either), with ``n_true``,
        ``n_called``, ``true_positives``, ``false_calls`` (calls of a gene whose true
        change of that target is exactly 0), ``precision`` = ``1 - false_calls /
        n_called`` (``nan`` without calls; a call of a gene that changes by less than
        ``min_log2`` is not false), ``precision_strict`` = ``true_positives / n_called``
        (every call outside the ``>= min_log2`` genes counts as false), ``recall``,
        ``n_true_strong`` and ``recall_strong`` (genes with ``|log2| >= strong_log2``).
    """
    if strength not in ("unit", "mean"):
        raise ValueError(f"strength must be 'unit' or 'mean', not {strength!r}")
    scale = program_strengths(adata) if strength == "mean" else {}
    rows = []
    for program, table in kinetic_table.groupby("group", sort=False):
        programs, truth = truth_arrays(adata, table.index)
        if program not in programs:
            continue
        p, s = programs.index(program), scale.get(program, 1.0)
        size = {k: np.abs(s * truth[k][:, p]) for k in ("burst_size", "degradation_rate")}
        size["any"] = np.maximum(size["burst_size"], size["degradation_rate"])
        called = {k: table[f"{k}_is_de"].to_numpy(bool) for k in size if k != "any"}
        called["any"] = called["burst_size"] | called["degradation_rate"]
        for k in ("burst_size", "degradation_rate", "any"):
            true, strong = size[k] >= min_log2, size[k] >= strong_log2
            tp = int(np.sum(true & called[k]))
            false = int(np.sum(called[k] & (size[k] == 0)))
            n_called, n_true, n_strong = int(called[k].sum()), int(true.sum()), int(strong.sum())
            rows.append(
                {
                    "program": program,
                    "target": k,
                    "n_true": n_true,
                    "n_called": n_called,
                    "true_positives": tp,
                    "false_calls": false,
                    "precision": 1.0 - false / n_called if n_called else np.nan,
                    "precision_strict": tp / n_called if n_called else np.nan,
                    "recall": tp / n_true if n_true else np.nan,
                    "n_true_strong": n_strong,
                    "recall_strong": (
                        np.sum(strong & called[k]) / n_strong if n_strong else np.nan
                    ),
                }
            )
    return pd.DataFrame(rows)


def compensatory_summary(
    kinetic_table: pd.DataFrame, mean_table: pd.DataFrame, adata: Any
) -> pd.DataFrame:
    """Per program: how many true compensatory genes the kinetic test calls and the mean misses."""
    rows = []
    for program, table in kinetic_table.groupby("group", sort=False):
        programs, truth = truth_arrays(adata, table.index)
        if program not in programs:
            continue
        comp = truth["kind"][:, programs.index(program)] == "compensatory"
        kin = (table["call"] != "none").to_numpy()
        mean_calls = mean_table[mean_table["group"] == program]["is_de"].reindex(table.index)
        mean_de = mean_calls.fillna(False).to_numpy(bool)
        n = int(comp.sum())
        hit = int(np.sum(comp & kin & ~mean_de))
        rows.append(
            {
                "program": program,
                "n_compensatory": n,
                "called_kinetic": int(np.sum(comp & kin)),
                "called_mean": int(np.sum(comp & mean_de)),
                "kinetic_not_mean": hit,
                "fraction_kinetic_not_mean": hit / n if n else np.nan,
            }
        )
    return pd.DataFrame(rows)
