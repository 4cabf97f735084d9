"""Scoring kinetic calls against the simulator's truth at the programs' real strengths."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pybivi import datasets


@pytest.fixture(scope="module")
def sim():
    import torch

    from pybivi import datasets

    torch.set_num_threads(1)
    return datasets.simulate_perturbseq(
        n_cells=240, n_genes=30, n_programs=2, seed=0, genes_per_program=6
    )


def test_program_strengths_are_cell_weighted_means(sim):
    table = pd.DataFrame(sim.uns["simulation"]["perturbations"])
    labels = sim.obs["perturbation"].astype(str)
    got = datasets.program_strengths(sim)
    for program in ("program1", "program2"):
        rows = table[(table["program"] == program) & table["annotated"]]
        counts = np.array([(labels == q).sum() for q in rows["perturbation"]])
        expected = np.sum(counts * rows["strength"]) / counts.sum()
        assert got[program] == pytest.approx(expected)
        # Every perturbation's strength is in [0.8, 1.2], so is their mean.
        assert 0.8 <= got[program] <= 1.2
    # Weak perturbations (strength 0.25, unassigned cells) are not part of any program.
    assert min(got.values()) >= 0.8


def test_truth_scores_at_mean_strength(sim):
    s = datasets.program_strengths(sim)["program1"]
    change = np.abs(sim.varm["log2_b_change"][:, 0])
    # Calls exactly on the genes whose pooled cells change >= 2x: perfect at "mean".
    called = s * change >= 1
    table = pd.DataFrame(
        {"group": "program1", "burst_size_is_de": called,
         "degradation_rate_is_de": np.zeros(sim.n_vars, bool)},
        index=pd.Index(sim.var_names, name="gene"),
    )
    mean = datasets.truth_scores(table, sim, strength="mean").set_index("target")
    assert mean.loc["burst_size", "n_true"] == called.sum()
    assert mean.loc["burst_size", "recall"] == 1.0 and mean.loc["burst_size", "precision"] == 1.0
    unit = datasets.truth_scores(table, sim).set_index("target")
    assert unit.loc["burst_size", "n_true"] == int(np.sum(change >= 1))
    assert unit.loc["burst_size", "recall"] == pytest.approx(called.sum() / np.sum(change >= 1))
    with pytest.raises(ValueError, match="strength"):
        datasets.truth_scores(table, sim, strength="median")


def test_recall_strong_counts_only_large_changes(sim):
    s = datasets.program_strengths(sim)["program2"]
    size = np.maximum(np.abs(sim.varm["log2_b_change"][:, 1]),
                      np.abs(sim.varm["log2_gamma_change"][:, 1])) * s
    # Call only the genes changing >= 2^1.5 (b for some, gamma/k for the others).
    strong = size >= 1.5
    table = pd.DataFrame(
        {"group": "program2", "burst_size_is_de": strong & (np.arange(sim.n_vars) % 2 == 0),
         "degradation_rate_is_de": strong & (np.arange(sim.n_vars) % 2 == 1)},
        index=pd.Index(sim.var_names, name="gene"),
    )
    row = datasets.truth_scores(table, sim, strength="mean").set_index("target").loc["any"]
    assert row["n_true_strong"] == strong.sum() and row["n_true"] == np.sum(size >= 1)
    if strong.any():
        assert row["recall_strong"] == 1.0
    assert row["recall"] == pytest.approx(strong.sum() / np.sum(size >= 1))
