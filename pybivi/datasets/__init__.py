"""A simulator of bimodal CRISPR screens with known kinetics, and a reader for user data.

:func:`simulate_perturbseq` draws nascent and mature counts exactly from the
steady state of the bursty two-species CME (through the bursty scheme's exact
sampler, never through the neural approximator) for a screen with

* non-targeting controls (label ``"NT"``) and perturbations grouped into gene
  programs; each program shifts the kinetics of its own gene subset in three
  kinds: burst size only, relative degradation ``gamma/k`` only, and
  *compensatory* (``b`` and ``gamma/k`` multiplied by the same factor, so the
  mature mean ``b / gamma`` is unchanged while the nascent mean ``b / beta`` moves,
  as for NECTIN4 in the paper);
* a cell-cycle confounder shared by all cells (phase G1/S/G2M changes the burst
  size, or optionally the burst frequency, of a gene subset) that dominates the
  variance, and weak perturbations without a program annotation;
* a per-cell capture efficiency ``p`` (lognormal): thinning the geometric bursts
  of mean ``b`` keeps the bursty law with ``b' = p b`` (the generating function
  depends on ``b`` and the dummy variables only through ``b u`` and ``b v``);
* optional misspecification knobs (burst-frequency changes per program) for
  robustness studies.

The truth is kept in the returned AnnData: ``var`` holds the base kinetics and
cell-cycle effects, ``varm`` the per gene and program log2 changes of ``b`` and
``gamma/k`` and the effect kind, ``uns["simulation"]`` the settings and tables.
``EFFECT_KINDS`` lists the codes of ``varm["effect_kind"]`` (an index into it) and
``PROGRAM_KINDS`` what a program may change. The simulator's building blocks are in
``pybivi.datasets._simulation`` (batches and escapers in
``pybivi.datasets._batches_escapers``); the scoring of differential calls against the
truth (:func:`truth_scores`, :func:`compensatory_summary`) in ``pybivi.datasets._truth``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from pybivi.datasets._batches_escapers import (
    batch_design,
    batch_truth,
    draw_responders,
    resolve_batch_effect,
)
from pybivi.datasets._simulation import (
    EFFECT_KINDS,
    PHASES,
    PROGRAM_KINDS,
    cell_cycle_effects,
    cell_design,
    cell_kinetics,
    gene_effects,
    gene_truth,
    log_uniform,
    merge_doublets,
    perturbation_table,
    resolve_program_kinds,
    sample_counts,
    settings,
    to_anndata,
)
from pybivi.datasets._truth import compensatory_summary, program_strengths, truth_scores

__all__ = [
    "simulate_perturbseq",
    "read",
    "EFFECT_KINDS",
    "PROGRAM_KINDS",
    "truth_scores",
    "program_strengths",
    "compensatory_summary",
]



def simulate_perturbseq(
    n_cells: int = 3000,
    n_genes: int = 800,
    n_programs: int = 6,
    seed: int = 0,
    *,
    perturbations_per_program: int = 3,
    n_weak_perturbations: int = 2,
    weak_strength: float = 0.25,
    control_fraction: float = 0.3,
    control_label: str = "NT",
    program_kinds: Sequence[str] | None = None,
    genes_per_program: int | None = None,
    effect_range: tuple[float, float] = (1.0, 2.0),
    cell_cycle_fraction: float = 0.25,
    cell_cycle_log2: float = 1.0,
    cell_cycle_mode: str = "burst_size",
    phase_probabilities: Sequence[float] = (0.5, 0.3, 0.2),
    burst_size_range: tuple[float, float] = (0.3, 30.0),
    splicing_range: tuple[float, float] = (0.5, 5.0),
    degradation_range: tuple[float, float] = (0.1, 3.0),
    capture_median: float = 0.3,
    capture_sigma: float = 0.35,
    frequency_log2: float = 0.0,
    doublet_fraction: float = 0.02,
    n_batches: int = 1,
    batch_effect: float | dict[str, float] = 0.5,
    chunk_cells: int = 1000,
    progress_bar: bool = False,
    escape_fraction: float | Mapping[str, float] = 0.0,
) -> ad.AnnData:
    """Simulate a bimodal CRISPR screen with known kinetics (exact CME draws).

    Parameters
    ----------
    n_cells
        Number of cells (doublets included).
    n_genes
        Number of genes.
    n_programs
        Number of gene programs.
    seed
        Seed of every random choice and of the count sampler.
    perturbations_per_program
        Perturbations (target-gene-like labels) sharing each program's effect.
    n_weak_perturbations
        Extra perturbations whose effect is ``weak_strength`` times a program's;
        their cells carry no program annotation (``program = "unassigned"``).
    weak_strength
        Multiplier of the log2 changes of a weak perturbation.
    control_fraction
        Fraction of cells that are non-targeting controls.
    control_label
        Perturbation label of the controls.
    program_kinds
        One entry per program from :data:`PROGRAM_KINDS`; the default gives two
        mixed programs, one burst-size, one degradation and two compensatory ones
        (the latter invisible to mature-only models).
    genes_per_program
        Size of each program's gene subset (disjoint); default 5% of the genes.
    effect_range
        Range of ``|log2 change|`` of a program's genes (random sign).
    cell_cycle_fraction
        Fraction of genes acted on by the cell cycle.
    cell_cycle_log2
        Typical ``|log2|`` change of those genes in S or G2M (per gene it is drawn
        from ``U(0.75, 1.25) x cell_cycle_log2``). At the default 1.0 the phases
        separate completely in single-latent models (biVI, scVI); at 1.5 to 2 the
        contrastive models' salient spaces were measured to pick up phase as well.
    cell_cycle_mode
        ``"burst_size"`` (within the model family) or ``"burst_frequency"``
        (frequency changes: every rate in units of ``k`` moves, a misspecification).
    phase_probabilities
        Probabilities of G1, S and G2M.
    burst_size_range, splicing_range, degradation_range
        Log-uniform ranges of the base ``b`` (before capture), ``beta/k``, ``gamma/k``.
    capture_median, capture_sigma
        Lognormal capture efficiency per cell (multiplies ``b``).
    frequency_log2
        Misspecification knob: each program gene also changes its burst frequency
        by ``+-frequency_log2`` (log2); 0 keeps the simulation inside the model.
    doublet_fraction
        Fraction of cells that are doublets (sum of two cells' counts, joined
        labels, ``obs["doublet"] = True``).
    n_batches
        Number of batches (e.g. sequencing lanes or days). Cells are assigned at random;
        controls and perturbed cells share each batch's effects. With 1 (default) the
        simulation is exactly the batch-free one.
    batch_effect
        Log2 standard deviation of the batch effects: per batch and gene normal log2
        shifts of the burst size ``b`` (both species) and of ``gamma/k`` (mature), and
        per batch a log-normal capture factor. A number sets all three; a dict sets
        ``"burst_size"``, ``"degradation"`` and ``"capture"`` (missing keys: 0). The
        batch draws use their own generator, so the rest of the screen (genes, labels,
        phases, program effects) is the same as with ``n_batches=1`` and the same seed.
    chunk_cells
        Cells per call of the sampler (bounds memory).
    progress_bar
        Show a tqdm bar over the chunks.
    escape_fraction
        Share of the cells of each targeting perturbation that escape it (carry the
        guide, keep their label and program, show no effect), as CRISPRi/a cells with
        too little knock-down do; a number for every perturbation or a mapping from
        perturbation label to share (missing labels: 0). Beyond the ContrastiveBiVI
        paper's simulation. When positive, ``obs["responder"]`` records which cells
        respond (controls: ``False``; a doublet responds when either cell does) and
        ``uns["simulation"]["escape_fraction"]`` the shares. The escapers are drawn from
        a generator of their own, so the design (labels, phases, capture, kinetics of
        every other cell) equals the screen without them; the counts are fresh draws.
        The default 0 gives exactly the data of earlier releases for the same seed.

    Returns
    -------
    anndata.AnnData
        Layers ``unspliced`` and ``spliced`` (sparse integer counts), ``X`` =
        spliced; ``obs`` columns ``perturbation``, ``program``, ``phase``,
        ``capture_efficiency``, ``doublet`` (and ``batch`` with ``n_batches > 1``,
        doublets taking their first cell's batch); truth in ``var``, ``varm`` and
        ``uns["simulation"]`` (``uns["simulation"]["batches"]``: the batch effects).
    """
    if n_cells < 10 or n_genes < 10:
        raise ValueError(f"need at least 10 cells and 10 genes, got {n_cells} x {n_genes}")
    if not 0.0 <= control_fraction < 1.0 or not 0.0 <= doublet_fraction < 0.5:
        raise ValueError("control_fraction must be in [0, 1) and doublet_fraction in [0, 0.5)")
    if cell_cycle_mode not in ("burst_size", "burst_frequency"):
        raise ValueError(
            f"cell_cycle_mode must be 'burst_size' or 'burst_frequency', not {cell_cycle_mode!r}"
        )
    probs = np.asarray(phase_probabilities, dtype=float)
    if probs.shape != (3,) or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
        raise ValueError("phase_probabilities must be three non-negative numbers summing to 1")
    if int(n_batches) != n_batches or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches}")
    effect = resolve_batch_effect(batch_effect)
    kinds = resolve_program_kinds(program_kinds, n_programs)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(seed))

    # Per gene base kinetics (rates in units of the burst frequency k).
    base_b = log_uniform(rng, *burst_size_range, n_genes)
    beta = log_uniform(rng, *splicing_range, n_genes)
    base_gamma = log_uniform(rng, *degradation_range, n_genes)
    cc_genes, cc_log2 = cell_cycle_effects(rng, n_genes, cell_cycle_fraction, cell_cycle_log2)
    gpp = genes_per_program if genes_per_program is not None else max(1, n_genes // 20)
    effects = gene_effects(rng, n_genes, kinds, gpp, cc_genes, effect_range, frequency_log2)
    table = perturbation_table(
        rng, n_programs, perturbations_per_program, n_weak_perturbations, weak_strength
    )
    design = cell_design(
        rng, n_cells, len(table), control_fraction, doublet_fraction, probs,
        capture_median, capture_sigma,
    )
    pert_idx, phase_idx = design["perturbation"], design["phase"]
    names = table["perturbation"].to_numpy()
    escape = dict(escape_fraction) if isinstance(escape_fraction, Mapping) else escape_fraction
    responder = draw_responders(pert_idx, names, escape, seed)
    batches = None
    if n_batches > 1:
        batches = batch_design(seed, len(pert_idx), n_genes, int(n_batches), effect)
        design["capture"] = design["capture"] * 2.0 ** batches["log2_capture"][batches["batch"]]
    prog_of_cell, cell_b, cell_beta, cell_gamma = cell_kinetics(
        design, table, effects, cc_log2, cell_cycle_mode, base_b, beta, base_gamma, responder
    )
    if batches is not None:
        cell_b = cell_b * 2.0 ** batches["log2_burst_size"][batches["batch"]]
        cell_gamma = cell_gamma * 2.0 ** batches["log2_degradation"][batches["batch"]]
    nascent, mature = sample_counts(cell_b, cell_beta, cell_gamma, generator, chunk_cells,
                                     progress_bar)

    labels = np.where(pert_idx >= 0, names[np.maximum(pert_idx, 0)], control_label)
    programs = np.array(
        [f"program{p + 1}" if p >= 0 else "control" for p in prog_of_cell], dtype=object
    )
    # Weak perturbations carry no program annotation (like Norman et al.'s unlabelled ones).
    n_annotated = n_programs * perturbations_per_program  # the weak ones come after these
    programs[pert_idx >= n_annotated] = "unassigned"
    extra = {} if responder is None else {"responder": responder}
    if batches is not None:
        extra["batch"] = batches["batch"]
    cells = merge_doublets(
        design["n_doublets"],
        nascent=nascent, mature=mature, capture=design["capture"], perturbation=labels,
        program=programs, phase=np.array(PHASES)[phase_idx], **extra,
    )
    adata = to_anndata(cells, gene_truth(base_b, beta, base_gamma, cc_genes, cc_log2, effects))
    if batches is not None:
        truth = batch_truth(batches, effect)
        adata.obs["batch"] = pd.Categorical(
            np.asarray(truth["categories"])[cells["batch"]], categories=truth["categories"]
        )
    for key in ("log2_b", "log2_gamma", "log2_frequency"):
        adata.varm[f"{key}_change"] = effects[key]
    adata.varm["effect_kind"] = effects["kind"]
    adata.uns["simulation"] = settings(
        seed, kinds, table, n_annotated, control_label,
        cell_cycle_mode, frequency_log2, capture_median, capture_sigma,
    )
    if responder is not None:
        adata.obs["responder"] = cells["responder"]
        adata.uns["simulation"]["escape_fraction"] = (
            {str(k): float(v) for k, v in escape.items()}
            if isinstance(escape, dict)
            else float(escape)
        )
    if batches is not None:
        adata.uns["simulation"]["batches"] = truth
    return adata


# Layer names used by common velocity/nascent quantifiers, mapped to pybivi's names.
_LAYER_ALIASES = {
    "unspliced": ("unspliced", "nascent", "intron", "U", "u"),
    "spliced": ("spliced", "mature", "exon", "S", "s"),
}


def read(path: str | Path, **kwargs: Any) -> ad.AnnData:
    """Read an AnnData with nascent and mature counts from ``.h5ad`` or ``.loom``.

    Layers written by velocyto and STARsolo (``spliced``/``unspliced``) and by
    kb-python's nac workflow (``mature``/``nascent``) are accepted; the latter
    are renamed to ``spliced``/``unspliced``.

    Parameters
    ----------
    path
        File to read.
    **kwargs
        Passed to :func:`anndata.read_h5ad` or :func:`anndata.read_loom`.

    Returns
    -------
    anndata.AnnData
        With layers ``unspliced`` and ``spliced``.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the format is unknown or a species' layer is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        adata = ad.read_h5ad(path, **kwargs)
    elif suffix == ".loom":
        adata = ad.read_loom(path, **kwargs)
    else:
        raise ValueError(f"cannot read {path.name}: expected a .h5ad or .loom file")
    for target, aliases in _LAYER_ALIASES.items():
        if target in adata.layers:
            continue
        found = next((a for a in aliases if a in adata.layers), None)
        if found is None:
            raise ValueError(
                f"{path.name} has no {target!r} layer (looked for {list(aliases)}); "
                f"its layers are {list(adata.layers.keys())}"
            )
        adata.layers[target] = adata.layers[found]
        del adata.layers[found]
    return adata
