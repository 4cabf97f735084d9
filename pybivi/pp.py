"""Preprocessing of a bimodal CRISPR screen: the paper's appendix B, as options.

:func:`prepare` validates the two count layers, drops doublets and listed
labels, keeps controls and program-annotated perturbed cells, scores the cell
cycle on the full transcriptome with the Tirosh et al. (2016) markers (shipped
in ``pybivi/data``; human and mouse symbols matched case-insensitively), selects
highly variable genes with scanpy and subsets both layers consistently.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["prepare", "cell_cycle_genes", "validate_counts", "score_phase"]

log = logging.getLogger(__name__)

_MARKERS = Path(__file__).resolve().parent / "data" / "tirosh2016_cell_cycle_genes.csv"
UNASSIGNED = ("", "nan", "none", "unassigned", "na")
"""Program values (case-insensitive) that mean 'no program annotation'."""


def cell_cycle_genes(var_names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The Tirosh et al. (2016) S and G2/M markers, optionally matched to a gene list.

    Parameters
    ----------
    var_names
        Gene names of a dataset. When given, each marker (or its current alias)
        is matched case-insensitively, so human (``MCM5``) and mouse (``Mcm5``)
        symbols both work, and the dataset's own spelling is returned.

    Returns
    -------
    dict
        ``{"S": [...], "G2M": [...]}``.
    """
    table = pd.read_csv(_MARKERS, comment="#", keep_default_na=False)
    if var_names is None:
        return {ph: table.loc[table.phase == ph, "gene"].tolist() for ph in ("S", "G2M")}
    lookup: dict[str, str] = {}
    for name in var_names:
        lookup.setdefault(str(name).upper(), str(name))
    out: dict[str, list[str]] = {"S": [], "G2M": []}
    for gene, phase, alias in table[["gene", "phase", "alias"]].itertuples(index=False):
        hit = lookup.get(gene.upper()) or (lookup.get(alias.upper()) if alias else None)
        if hit is not None and hit not in out[phase]:
            out[phase].append(hit)
    return out


def validate_counts(adata: ad.AnnData, layers: Sequence[str] = ("unspliced", "spliced")) -> None:
    """Check that the count layers exist and hold non-negative integers.

    Raises
    ------
    ValueError
        Naming the missing layer, or the first layer with negative, non-finite
        or non-integer values (for example already normalised data).
    """
    for name in layers:
        if name not in adata.layers:
            raise ValueError(
                f"AnnData has no {name!r} layer (its layers: {list(adata.layers.keys())}); "
                "pybivi needs raw nascent ('unspliced') and mature ('spliced') counts"
            )
        mat = adata.layers[name]
        values = mat.data if sp.issparse(mat) else np.asarray(mat)
        if values.size == 0:
            continue
        if not np.all(np.isfinite(values)):
            raise ValueError(f"layer {name!r} contains NaN or infinite values")
        if values.min() < 0:
            raise ValueError(f"layer {name!r} contains negative values; raw counts are needed")
        if not np.allclose(values, np.round(values)):
            raise ValueError(
                f"layer {name!r} is not integer-valued (normalised or log data?); "
                "pybivi needs raw counts"
            )


def _log_normalised(counts: np.ndarray | sp.spmatrix, target: float = 1e4) -> sp.csr_matrix:
    """log1p of counts scaled to ``target`` total per cell (what scanpy's scorers expect)."""
    mat = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(mat.sum(axis=1)).ravel()
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    mat = sp.diags(scale) @ mat
    mat.data = np.log1p(mat.data)
    return sp.csr_matrix(mat)


def score_phase(
    adata: ad.AnnData,
    layer: str = "spliced",
    phase_key: str = "phase",
    min_markers: int = 10,
    random_state: int = 0,
) -> bool:
    """Score S and G2/M with the Tirosh markers through scanpy; write obs columns in place.

    Writes ``S_score``, ``G2M_score`` and ``phase_key`` (``G1``/``S``/``G2M``).

    Returns
    -------
    bool
        ``True`` when scored; ``False`` (with a warning) when fewer than
        ``min_markers`` markers of either phase are among the genes.
    """
    import scanpy as sc

    markers = cell_cycle_genes(adata.var_names)
    found = {ph: len(g) for ph, g in markers.items()}
    if min(found.values()) < min_markers:
        warnings.warn(
            f"cell-cycle scoring skipped: only {found['S']} S and {found['G2M']} G2M Tirosh "
            f"markers among the genes (need {min_markers} of each)",
            stacklevel=2,
        )
        return False
    tmp = ad.AnnData(
        X=_log_normalised(adata.layers[layer]),
        obs=pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    sc.tl.score_genes_cell_cycle(
        tmp, s_genes=markers["S"], g2m_genes=markers["G2M"], random_state=random_state
    )
    adata.obs["S_score"] = tmp.obs["S_score"].to_numpy()
    adata.obs["G2M_score"] = tmp.obs["G2M_score"].to_numpy()
    phases = tmp.obs["phase"].astype(str)
    adata.obs[phase_key] = pd.Categorical(phases, categories=["G1", "S", "G2M"])
    return True


def _cell_filter(
    adata: ad.AnnData,
    perturbation_key: str | None,
    controls: list[str],
    program_key: str | None,
    drop_labels: Sequence[str],
    doublet_key: str | None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Boolean mask of the cells to keep, and how many each rule removed."""
    keep = np.ones(adata.n_obs, dtype=bool)
    removed: dict[str, int] = {}
    if doublet_key is not None and doublet_key in adata.obs:
        doublet = adata.obs[doublet_key].fillna(False).astype(bool).to_numpy()
        removed["doublets"] = int((keep & doublet).sum())
        keep &= ~doublet
    if perturbation_key is None:  # no labels: only the doublet rule applies
        return keep, removed
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    if drop_labels:
        listed = np.isin(labels, [str(x) for x in drop_labels])
        removed["dropped_labels"] = int((keep & listed).sum())
        keep &= ~listed
    is_control = np.isin(labels, controls)
    if program_key is not None:
        if program_key not in adata.obs:
            raise KeyError(f"program_key {program_key!r} is not a column of adata.obs")
        prog = adata.obs[program_key].astype(str).str.strip().str.lower().to_numpy()
        annotated = ~np.isin(prog, UNASSIGNED) & adata.obs[program_key].notna().to_numpy()
        unannotated = keep & ~is_control & ~annotated
        removed["no_program"] = int(unannotated.sum())
        keep &= is_control | annotated
    return keep, removed


def _checked_inputs(
    adata: object,
    layers: tuple[str, str],
    perturbation_key: str | None,
    control_labels: str | Sequence[str],
    hvg_flavor: str,
    program_key: str | None = None,
    drop_labels: Sequence[str] = (),
) -> list[str]:
    """Validate :func:`prepare`'s inputs (clear errors, nothing deep in scanpy); the controls."""
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"prepare expects an AnnData, got {type(adata).__name__}")
    validate_counts(adata, layers)
    if hvg_flavor not in ("seurat", "cell_ranger"):
        raise ValueError(f"hvg_flavor must be 'seurat' or 'cell_ranger', not {hvg_flavor!r}")
    if perturbation_key is None:
        if program_key is not None or len(drop_labels):
            raise ValueError(
                "program_key and drop_labels select cells by perturbation label; they need "
                "a perturbation_key (got perturbation_key=None)"
            )
        return []
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} is not a column of adata.obs "
            f"(columns: {list(adata.obs.columns)})"
        )
    controls = [control_labels] if isinstance(control_labels, str) else list(control_labels)
    labels = set(adata.obs[perturbation_key].astype(str))
    missing = [c for c in controls if c not in labels]
    if missing:
        raise ValueError(f"control label(s) {missing} not found in obs[{perturbation_key!r}]")
    return controls


def _top_variable_genes(adata: ad.AnnData, n_top_genes: int, hvg_flavor: str) -> ad.AnnData:
    """The ``n_top_genes`` most variable genes of the mature layer (scanpy's dispersions)."""
    import scanpy as sc  # imported when needed: it is slow to import

    tmp = ad.AnnData(X=_log_normalised(adata.layers["spliced"]))
    tmp.var_names = adata.var_names
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=hvg_flavor)
    # scanpy keeps every gene tied at the cut-off; rank instead to get exactly n_top_genes.
    disp = np.nan_to_num(tmp.var["dispersions_norm"].to_numpy(), nan=-np.inf)
    top = np.zeros(adata.n_vars, dtype=bool)
    top[np.argsort(-disp, kind="stable")[:n_top_genes]] = True
    adata.var["highly_variable"] = top
    adata.var["dispersions_norm"] = tmp.var["dispersions_norm"].to_numpy()
    return adata[:, top].copy()


def prepare(
    adata: ad.AnnData,
    perturbation_key: str | None = "perturbation",
    control_labels: str | Sequence[str] = ("NT",),
    *,
    program_key: str | None = None,
    drop_labels: Sequence[str] = (),
    doublet_key: str | None = "doublet",
    score_cell_cycle: bool = True,
    phase_key: str = "phase",
    n_top_genes: int | None = 2000,
    hvg_flavor: str = "seurat",
    min_counts: int = 1,
    nascent_layer: str = "unspliced",
    mature_layer: str = "spliced",
) -> ad.AnnData:
    """Prepare a screen for the models (paper appendix B); returns a new AnnData.

    Steps, in order: validate the count layers; drop doublets (cells flagged in
    ``obs[doublet_key]``) and cells whose label is in ``drop_labels``; when
    ``program_key`` is given keep controls and perturbed cells with a program
    annotation; score cell-cycle phase on the full transcriptome with the Tirosh
    markers (skipped with a warning when too few are present, e.g. simulated
    gene names); select the ``n_top_genes`` most variable genes of the mature
    layer with scanpy; subset both layers to them; drop cells left with fewer
    than ``min_counts`` nascent or mature counts (a zero library size has no
    likelihood).

    Parameters
    ----------
    adata
        Cells x genes with raw count layers ``nascent_layer`` and ``mature_layer``.
    perturbation_key
        ``obs`` column of perturbation labels, or ``None`` for data without
        perturbations (e.g. a tissue or a time course, fitted with
        :class:`pybivi.BiVI`): then no cell is selected by label, ``control_labels``
        is ignored, ``program_key`` and ``drop_labels`` must be left unset and no
        ``is_control`` column is written.
    control_labels
        Label(s) of the control cells (e.g. ``"NT"`` or non-targeting guides).
    program_key
        Optional ``obs`` column of gene-program labels; see above.
    drop_labels
        Perturbation labels to remove (appendix B removes
        ``NegCtrl1.NegCtrl0.NegCtrl1.NegCtrl0``).
    doublet_key
        Boolean ``obs`` column flagging doublets; ignored when absent.
    score_cell_cycle
        Score phases with :func:`score_phase` (writes ``obs[phase_key]``).
    phase_key
        ``obs`` column for the scored phase.
    n_top_genes
        Number of highly variable genes; ``None`` or at least the number of
        genes keeps every gene.
    hvg_flavor
        scanpy flavor, on log-normalised mature counts: ``"seurat"`` (default)
        or ``"cell_ranger"``. (``"seurat_v3"`` needs scikit-misc, not a
        dependency of pybivi.)
    min_counts
        Minimum nascent and mature total per cell after gene selection.
    nascent_layer, mature_layer
        Names of the count layers; the result always uses ``unspliced`` and
        ``spliced``, with ``X`` = mature counts.

    Returns
    -------
    anndata.AnnData
        The prepared copy; ``uns["pybivi_prepare"]`` records what each step did.
    """
    controls = _checked_inputs(
        adata, (nascent_layer, mature_layer), perturbation_key, control_labels, hvg_flavor,
        program_key, drop_labels,
    )

    keep, removed = _cell_filter(
        adata, perturbation_key, controls, program_key, drop_labels, doublet_key
    )
    out = adata[keep].copy()
    out.layers["unspliced"] = sp.csr_matrix(out.layers[nascent_layer])
    out.layers["spliced"] = sp.csr_matrix(out.layers[mature_layer])
    if perturbation_key is not None and not np.isin(
        out.obs[perturbation_key].astype(str), controls
    ).any():
        raise ValueError("no control cells left after filtering")

    scored = False
    if score_cell_cycle:
        scored = score_phase(out, layer="spliced", phase_key=phase_key)

    n_genes_in = out.n_vars
    expressed = np.asarray(out.layers["spliced"].sum(axis=0)).ravel() > 0
    out = out[:, expressed].copy()
    if n_top_genes is not None and n_top_genes < out.n_vars:
        out = _top_variable_genes(out, n_top_genes, hvg_flavor)

    totals_n = np.asarray(out.layers["unspliced"].sum(axis=1)).ravel()
    totals_m = np.asarray(out.layers["spliced"].sum(axis=1)).ravel()
    enough = (totals_n >= min_counts) & (totals_m >= min_counts)
    removed["low_counts"] = int((~enough).sum())
    out = out[enough].copy()
    out.X = out.layers["spliced"].copy()
    for extra in {nascent_layer, mature_layer} - {"unspliced", "spliced"}:
        del out.layers[extra]
    if perturbation_key is not None:
        out.obs["is_control"] = np.isin(out.obs[perturbation_key].astype(str), controls)
    out.uns["pybivi_prepare"] = {
        "perturbation_key": perturbation_key if perturbation_key is not None else "",
        "control_labels": controls,
        "program_key": program_key if program_key is not None else "",
        "cells_in": int(adata.n_obs),
        "cells_out": int(out.n_obs),
        "removed": removed,
        "cell_cycle_scored": scored,
        "genes_in": int(n_genes_in),
        "genes_out": int(out.n_vars),
        "hvg_flavor": hvg_flavor,
    }
    log.info(
        "prepare: %d -> %d cells, %d -> %d genes", adata.n_obs, out.n_obs, n_genes_in, out.n_vars
    )
    return out
