"""The pieces :func:`pybivi.datasets.simulate_perturbseq` is assembled from.

Kinds of effects and programs, the per-gene and per-cell design (program effects, cell
cycle, perturbation strengths, capture, doublets), the exact count sampler and the
AnnData assembly; batches and escapers are designed in ``_batches_escapers``. Private:
the public entry point and its documentation are in :mod:`pybivi.datasets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

EFFECT_KINDS = ("none", "burst_size", "degradation", "compensatory", "frequency")
"""Codes of ``varm["effect_kind"]``: the index into this tuple."""

PROGRAM_KINDS = ("mixed", "burst_size", "degradation", "compensatory")
"""What a program changes: one kind for all its genes, or the three kinds in turn."""

PHASES = ("G1", "S", "G2M")

_DEFAULT_PROGRAM_KINDS = (
    "mixed", "mixed", "burst_size", "degradation", "compensatory", "compensatory"
)


def log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def resolve_program_kinds(program_kinds: Sequence[str] | None, n_programs: int) -> list[str]:
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


def gene_effects(
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


def perturbation_table(
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


def sample_counts(
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


def cell_cycle_effects(
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


def cell_design(
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


def merge_doublets(n_doublets: int, **columns: np.ndarray) -> dict[str, np.ndarray]:
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
        elif key == "responder":  # a doublet responds when either of its cells does
            pair = value[first] | value[second]
        else:
            pair = value[first]
        out[key] = np.concatenate([single, pair])
    out["doublet"] = np.r_[np.zeros(n_single, bool), np.ones(n_doublets, bool)]
    return out


def to_anndata(cells: dict[str, np.ndarray], var: pd.DataFrame) -> ad.AnnData:
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


def cell_kinetics(
    design: dict[str, Any],
    table: pd.DataFrame,
    effects: dict[str, np.ndarray],
    cc_log2: np.ndarray,
    cell_cycle_mode: str,
    base_b: np.ndarray,
    beta: np.ndarray,
    base_gamma: np.ndarray,
    responder: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per drawn cell: its program (-1: control) and its ``b`` (after capture), ``beta/k``
    and ``gamma/k`` per gene: the base kinetics moved by the perturbation (its strength
    times its program's change) and by the cell-cycle phase. Perturbed cells that are not
    ``responder`` (escapers) keep their program but carry no change."""
    n_genes = base_b.size
    pert_idx, phase_idx = design["perturbation"], design["phase"]
    # Per cell log2 changes: perturbation strength x its program's change (controls: none).
    prog_of_cell = np.where(pert_idx >= 0, table["program_index"].to_numpy()[pert_idx], -1)
    strength = np.where(pert_idx >= 0, table["strength"].to_numpy()[pert_idx], 0.0)
    if responder is not None:
        strength = np.where(responder, strength, 0.0)

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
    b = base_b * design["capture"][:, None] * 2.0**log2_b
    return prog_of_cell, b, beta[None, :] / freq, base_gamma * 2.0**log2_gamma / freq


def gene_truth(base_b, beta, base_gamma, cc_genes, cc_log2, effects) -> pd.DataFrame:
    """``var``: each gene's base kinetics, cell-cycle effects and program."""
    n_genes = base_b.size
    return pd.DataFrame(
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


def settings(
    seed, kinds, table, n_annotated, control_label, cell_cycle_mode, frequency_log2,
    capture_median, capture_sigma,
) -> dict[str, Any]:
    """``uns["simulation"]``: the settings and the perturbation table."""
    n_programs = len(kinds)
    return {
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
