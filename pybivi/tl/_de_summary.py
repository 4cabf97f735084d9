"""Summaries of differential-test tables: calls per group and overlaps between readouts.

Used by figure 3 of the ContrastiveBiVI paper (the number of genes with strong evidence per
program and readout, and the overlap of the kinetic and mean calls).
"""

from __future__ import annotations

import pandas as pd

__all__ = ["call_counts", "overlap_table", "SHORT_NAMES"]

#: short labels of the kinetic parameters in tables and figures
SHORT_NAMES = {"burst_size": "b", "degradation_rate": "gamma/k"}


def call_counts(kinetic_table: pd.DataFrame, mean_tables: dict[str, pd.DataFrame] | None = None):
    """Genes with strong evidence per group (paper figure 3a): ``b``, ``gamma/k``, both, means.

    Columns ``b`` and ``gamma/k`` count every gene called for that parameter (so a gene
    called for both counts in both and in ``both``); ``mean (<label>)`` counts the genes
    called by each mean-expression table.
    """
    out = {}
    for g, t in kinetic_table.groupby("group", sort=False):
        row = {}
        for p in [c[: -len("_is_de")] for c in t.columns if c.endswith("_is_de")]:
            row[SHORT_NAMES.get(p, p)] = int(t[f"{p}_is_de"].sum())
        row["both"] = int((t["call"] == "both").sum())
        for label, m in (mean_tables or {}).items():
            row[f"mean ({label})"] = int(m.loc[m["group"] == g, "is_de"].sum())
        out[g] = row
    return pd.DataFrame(out).T.rename_axis("group")


def _call_sets(kinetic_table, mean_tables) -> dict[str, set]:
    sets = {}
    for p in [c[: -len("_is_de")] for c in kinetic_table.columns if c.endswith("_is_de")]:
        t = kinetic_table[kinetic_table[f"{p}_is_de"]]
        sets[SHORT_NAMES.get(p, p)] = set(zip(t["group"], t.index, strict=True))
    for label, m in (mean_tables or {}).items():
        t = m[m["is_de"]]
        sets[f"mean ({label})"] = set(zip(t["group"], t.index, strict=True))
    return sets


def overlap_table(kinetic_table, mean_tables=None) -> pd.DataFrame:
    """Pairwise overlaps of the called (group, gene) sets: entry (i, j) = ``len(S_i & S_j)``."""
    sets = _call_sets(kinetic_table, mean_tables)
    names = list(sets)
    return pd.DataFrame(
        [[len(sets[a] & sets[b]) for b in names] for a in names], index=names, columns=names
    )
