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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

__all__ = ["simulate_perturbseq", "read", "EFFECT_KINDS", "PROGRAM_KINDS"]

EFFECT_KINDS = ("none", "burst_size", "degradation", "compensatory", "frequency")
"""Codes of ``varm["effect_kind"]``: the index into this tuple."""

PROGRAM_KINDS = ("mixed", "burst_size", "degradation", "compensatory")
"""What a program changes: one kind for all its genes, or the three kinds in turn."""

PHASES = ("G1", "S", "G2M")

_DEFAULT_PROGRAM_KINDS = (
    "mixed", "mixed", "burst_size", "degradation", "compensatory", "compensatory"
)


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def _program_kinds(program_kinds: Sequence[str] | None, n_programs: int) -> list[str]:
    if program_kinds is None:
        base = list(_DEFAULT_PROGRAM_KINDS)
        return [base[i % len(base)] for i in range(n_programs)]
    kinds = list(program_kinds)
    if len(kinds) != n_programs:
        raise ValueError(f"program_kinds has {len(kinds)} entries but n_programs = {n_programs}")
    bad = sorted(set(kinds) - set(PROGRAM_KINDS))
    if bad:
        raise ValueError(f"unknown program kind(s) {bad}; choose from {PROGRAM_KINDS}")
    return kinds


def _gene_effects(
    rng: np.random.Generator,
    n_genes: int,
    kinds: list[str],
    genes_per_program: int,
    cell_cycle_genes: np.ndarray,
    effect_range: tuple[float, float],
    frequency_log2: float,
) -> dict[str, np.ndarray]:
    """Per gene and program log2 changes of b, gamma/k and burst frequency, and the kind."""
    n_programs = len(kinds)
    free = np.setdiff1d(np.arange(n_genes), cell_cycle_genes)
    if genes_per_program * n_programs > free.size:
        raise ValueError(
            f"{n_programs} programs x {genes_per_program} genes do not fit in the "
            f"{free.size} genes outside the cell-cycle subset; lower genes_per_program"
        )
    chosen = rng.permutation(free)[: genes_per_program * n_programs].reshape(n_programs, -1)
    log2_b = np.zeros((n_genes, n_programs))
    log2_gamma = np.zeros((n_genes, n_programs))
    log2_freq = np.zeros((n_genes, n_programs))
    kind = np.zeros((n_genes, n_programs), dtype=np.int8)
    gene_program = np.full(n_genes, "none", dtype=object)
    cycle = ("burst_size", "degradation", "compensatory")
    for p, genes in enumerate(chosen):
        gene_program[genes] = f"program{p + 1}"
        size = rng.uniform(*effect_range, size=genes.size) * rng.choice([-1.0, 1.0], genes.size)
        for j, g in enumerate(genes):
            k = cycle[j % 3] if kinds[p] == "mixed" else kinds[p]
            kind[g, p] = EFFECT_KINDS.index(k)
            if k in ("burst_size", "compensatory"):
                log2_b[g, p] = size[j]
            if k in ("degradation", "compensatory"):
                log2_gamma[g, p] = size[j]
        if frequency_log2:
            log2_freq[genes, p] = frequency_log2 * rng.choice([-1.0, 1.0], genes.size)
    return {
        "log2_b": log2_b,
        "log2_gamma": log2_gamma,
        "log2_frequency": log2_freq,
        "kind": kind,
        "gene_program": gene_program,
    }


def _perturbation_table(
    rng: np.random.Generator, n_programs: int, per_program: int, n_weak: int, weak_strength: float
) -> pd.DataFrame:
    """One row per perturbation: label, program index (-1: none), strength."""
    rows = []
    for p in range(n_programs):
        for j in range(per_program):
            # Target-gene-like labels (TF1A, TF1B, ...), as Perturb-seq guides name genes.
            rows.append((f"TF{p + 1}{chr(65 + j)}", p, float(rng.uniform(0.8, 1.2))))
    for w in range(n_weak):
        rows.append((f"WEAK{w + 1}", int(rng.integers(n_programs)), weak_strength))
    return pd.DataFrame(rows, columns=["perturbation", "program_index", "strength"])


def _sample_counts(
    b: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    generator: torch.Generator,
    chunk: int,
    progress_bar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact bursty draws through the scheme's sampler, in chunks of cells."""
    from pybivi.schemes import get

    scheme = get("bursty")
    nascent = np.empty(b.shape, dtype=np.int64)
    mature = np.empty(b.shape, dtype=np.int64)
    from tqdm.auto import tqdm

    starts = range(0, b.shape[0], chunk)
    for start in tqdm(starts, desc="sampling counts", unit="chunk", disable=not progress_bar):
        sl = slice(start, start + chunk)
        bt = torch.as_tensor(b[sl], dtype=torch.float64)
        bet = torch.as_tensor(np.broadcast_to(beta, b.shape)[sl].copy(), dtype=torch.float64)
        gat = torch.as_tensor(gamma[sl], dtype=torch.float64)
        # Bursty map: mu_N = b / beta, mu_M = b / gamma, theta = 1 / beta.
        draws = scheme.sample(bt / bet, bt / gat, 1.0 / bet, generator=generator)
        nascent[sl] = draws[..., 0].round().long().numpy()
        mature[sl] = draws[..., 1].round().long().numpy()
    return nascent, mature


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
    chunk_cells: int = 1000,
    progress_bar: bool = False,
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
    chunk_cells
        Cells per call of the sampler (bounds memory).
    progress_bar
        Show a tqdm bar over the chunks.

    Returns
    -------
    anndata.AnnData
        Layers ``unspliced`` and ``spliced`` (sparse integer counts), ``X`` =
        spliced; ``obs`` columns ``perturbation``, ``program``, ``phase``,
        ``capture_efficiency``, ``doublet``; truth in ``var``, ``varm`` and
        ``uns["simulation"]``.
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
    kinds = _program_kinds(program_kinds, n_programs)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(seed))

    # Per gene base kinetics (rates in units of the burst frequency k).
    base_b = _log_uniform(rng, *burst_size_range, n_genes)
    beta = _log_uniform(rng, *splicing_range, n_genes)
    base_gamma = _log_uniform(rng, *degradation_range, n_genes)
    cc_genes, cc_log2 = _cell_cycle_effects(rng, n_genes, cell_cycle_fraction, cell_cycle_log2)
    gpp = genes_per_program if genes_per_program is not None else max(1, n_genes // 20)
    effects = _gene_effects(rng, n_genes, kinds, gpp, cc_genes, effect_range, frequency_log2)
    table = _perturbation_table(
        rng, n_programs, perturbations_per_program, n_weak_perturbations, weak_strength
    )
    design = _cell_design(
        rng, n_cells, len(table), control_fraction, doublet_fraction, probs,
        capture_median, capture_sigma,
    )
    pert_idx, phase_idx = design["perturbation"], design["phase"]

    # Per cell log2 changes: perturbation strength x its program's change (controls: none).
    prog_of_cell = np.where(pert_idx >= 0, table["program_index"].to_numpy()[pert_idx], -1)
    strength = np.where(pert_idx >= 0, table["strength"].to_numpy()[pert_idx], 0.0)

    def per_cell(change: np.ndarray) -> np.ndarray:
        padded = np.concatenate([change, np.zeros((n_genes, 1))], axis=1)  # column -1 = control
        return strength[:, None] * padded[:, prog_of_cell].T

    log2_b = per_cell(effects["log2_b"])
    log2_gamma = per_cell(effects["log2_gamma"])
    log2_freq = per_cell(effects["log2_frequency"])
    if cell_cycle_mode == "burst_size":
        log2_b += cc_log2[:, phase_idx].T
    else:
        log2_freq += cc_log2[:, phase_idx].T
    # A burst-frequency change f divides every rate in units of k by f: b is per burst.
    freq = 2.0**log2_freq
    nascent, mature = _sample_counts(
        base_b * design["capture"][:, None] * 2.0**log2_b,
        beta[None, :] / freq,
        base_gamma * 2.0**log2_gamma / freq,
        generator,
        chunk_cells,
        progress_bar,
    )

    names = table["perturbation"].to_numpy()
    labels = np.where(pert_idx >= 0, names[np.maximum(pert_idx, 0)], control_label)
    programs = np.array(
        [f"program{p + 1}" if p >= 0 else "control" for p in prog_of_cell], dtype=object
    )
    # Weak perturbations carry no program annotation (like Norman et al.'s unlabelled ones).
    programs[pert_idx >= n_programs * perturbations_per_program] = "unassigned"
    cells = _merge_doublets(
        design["n_doublets"],
        nascent=nascent, mature=mature, capture=design["capture"], perturbation=labels,
        program=programs, phase=np.array(PHASES)[phase_idx],
    )
    var = pd.DataFrame(
        {
            "burst_size": base_b,
            "splicing_rate": beta,
            "degradation_rate": base_gamma,
            "cell_cycle_gene": np.isin(np.arange(n_genes), cc_genes),
            "cell_cycle_log2_S": cc_log2[:, 1],
            "cell_cycle_log2_G2M": cc_log2[:, 2],
            "program": pd.Categorical(effects["gene_program"]),
        },
        index=[f"Gene{g:04d}" for g in range(n_genes)],
    )
    adata = _to_anndata(cells, var)
    for key in ("log2_b", "log2_gamma", "log2_frequency"):
        adata.varm[f"{key}_change"] = effects[key]
    adata.varm["effect_kind"] = effects["kind"]
    n_annotated = n_programs * perturbations_per_program
    adata.uns["simulation"] = {
        "seed": int(seed),
        "programs": [f"program{p + 1}" for p in range(n_programs)],
        "program_kinds": kinds,
        "effect_kinds": list(EFFECT_KINDS),
        "control_label": control_label,
        "cell_cycle_mode": cell_cycle_mode,
        "frequency_log2": float(frequency_log2),
        "capture_median": float(capture_median),
        "capture_sigma": float(capture_sigma),
        "perturbations": {
            "perturbation": table["perturbation"].tolist(),
            "program": [f"program{p + 1}" for p in table["program_index"]],
            "strength": table["strength"].to_numpy(),
            "annotated": [i < n_annotated for i in range(len(table))],
        },
        "note": "Rates in units of the burst frequency k; b is before capture (multiply "
        "by obs['capture_efficiency']). varm log2 changes are per gene x program for a "
        "perturbation of strength 1.",
    }
    return adata


def _cell_cycle_effects(
    rng: np.random.Generator, n_genes: int, fraction: float, log2: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cell-cycle genes and their log2 change per phase (G1, S, G2M columns)."""
    n_cc = int(round(fraction * n_genes))
    cc_genes = np.sort(rng.choice(n_genes, size=n_cc, replace=False))
    cc_log2 = np.zeros((n_genes, 3))
    # S-type genes go up in S, G2M-type genes in G2M; S-type genes stay half up in G2M
    # (DNA is replicated) so that S and G2M are not only "G1 plus one gene set".
    s_type = rng.random(n_cc) < 0.5
    mag = log2 * rng.uniform(0.75, 1.25, n_cc)
    cc_log2[cc_genes[s_type], 1] = mag[s_type]
    cc_log2[cc_genes[~s_type], 2] = mag[~s_type]
    cc_log2[cc_genes[s_type], 2] = 0.5 * mag[s_type]
    return cc_genes, cc_log2


def _cell_design(
    rng: np.random.Generator,
    n_cells: int,
    n_perturbations: int,
    control_fraction: float,
    doublet_fraction: float,
    phase_probabilities: np.ndarray,
    capture_median: float,
    capture_sigma: float,
) -> dict[str, Any]:
    """Labels (-1 = control), phases and capture of every drawn cell.

    Doublets need two drawn cells each: the last ``2 n_doublets`` draws are paired.
    """
    n_doublets = int(round(doublet_fraction * n_cells))
    n_draw = n_cells + n_doublets
    n_ctrl = int(round(control_fraction * n_draw))
    # Perturbations in equal shares after the controls, then shuffled.
    labels = np.concatenate([np.full(n_ctrl, -1), np.arange(n_draw - n_ctrl) % n_perturbations])
    return {
        "perturbation": rng.permutation(labels),
        "phase": rng.choice(3, size=n_draw, p=phase_probabilities),
        "capture": np.exp(np.log(capture_median) + capture_sigma * rng.standard_normal(n_draw)),
        "n_doublets": n_doublets,
    }


def _merge_doublets(n_doublets: int, **columns: np.ndarray) -> dict[str, np.ndarray]:
    """Sum the last ``2 n_doublets`` drawn cells in pairs (what a real doublet is).

    Counts and capture add up; labels are joined with ``_``; the program is
    ``"doublet"``; the phase is the first cell's. Adds a boolean ``doublet`` column.
    """
    n_single = len(columns["nascent"]) - 2 * n_doublets
    first = np.arange(n_single, n_single + n_doublets)
    second = first + n_doublets
    out = {}
    for key, value in columns.items():
        single = value[:n_single]
        if key in ("nascent", "mature", "capture"):
            pair = value[first] + value[second]
        elif key == "perturbation":
            pair = np.array([f"{a}_{c}" for a, c in zip(value[first], value[second], strict=True)])
        elif key == "program":
            pair = np.full(n_doublets, "doublet", dtype=object)
        else:
            pair = value[first]
        out[key] = np.concatenate([single, pair])
    out["doublet"] = np.r_[np.zeros(n_single, bool), np.ones(n_doublets, bool)]
    return out


def _to_anndata(cells: dict[str, np.ndarray], var: pd.DataFrame) -> ad.AnnData:
    """Sparse integer layers, ``X`` = spliced, and the cell annotations."""
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(cells["perturbation"]),
            "program": pd.Categorical(cells["program"]),
            "phase": pd.Categorical(cells["phase"], categories=list(PHASES)),
            "capture_efficiency": cells["capture"],
            "doublet": cells["doublet"],
        },
        index=[f"cell{i}" for i in range(len(cells["doublet"]))],
    )
    mature = sp.csr_matrix(cells["mature"].astype(np.int32))
    return ad.AnnData(
        X=mature.copy(),
        obs=obs,
        var=var,
        layers={"unspliced": sp.csr_matrix(cells["nascent"].astype(np.int32)), "spliced": mature},
    )


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
