"""Metrics on constructed cases with known answers (paper appendix D)."""

import numpy as np
import pytest

from pybivi.tl import metrics


def _blobs(n_groups: int, per_group: int, dims: int = 5, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=20.0, size=(n_groups, dims))
    labels = np.repeat(np.arange(n_groups), per_group)
    rep = centres[labels] + rng.normal(scale=spread, size=(len(labels), dims))
    return rep, labels


def test_ari_perfect_separation_is_one():
    rep, labels = _blobs(6, 40)
    names = np.array([f"program{i}" for i in labels])
    assert metrics.program_ari(rep, names) == pytest.approx(1.0)


def test_ari_uninformative_representation_is_near_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=1200)
    rep = rng.normal(size=(1200, 10))
    assert abs(metrics.program_ari(rep, labels)) < 0.02


def test_ari_merged_programs_matches_formula():
    # Two programs share one blob: k-means with k=2 splits the blobs exactly, so the
    # contingency table is known and the ARI follows from appendix D.1's formula.
    rep, blob = _blobs(2, 60)
    labels = np.where(blob == 0, "A", np.where(np.arange(120) % 2 == 0, "B", "C"))
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    nij = [60, 30, 30]
    a, b = [60, 30, 30], [60, 60]
    expected_index = sum(comb(x) for x in nij)
    prod = sum(comb(x) for x in a) * sum(comb(x) for x in b) / comb(120)
    max_index = 0.5 * (sum(comb(x) for x in a) + sum(comb(x) for x in b))
    expected = (expected_index - prod) / (max_index - prod)
    assert metrics.program_ari(rep, labels, n_clusters=2) == pytest.approx(expected)


def test_entropy_perfect_separation_is_zero():
    rep, labels = _blobs(3, 80)
    assert metrics.mixing_entropy(rep, labels, k=50) == pytest.approx(0.0, abs=1e-12)


def test_entropy_perfect_mixing_exact_value():
    # 10 far-apart blobs of 51 cells, 17 per phase: a cell's 50 neighbours are the rest of
    # its blob, i.e. 16 of its own phase and 17 of each other one.
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=50.0, size=(10, 4))
    blob = np.repeat(np.arange(10), 51)
    rep = centres[blob] + rng.normal(scale=0.01, size=(510, 4))
    phases = np.tile(np.repeat(["G1", "S", "G2M"], 17), 10)
    p = np.array([16, 17, 17]) / 50
    expected = -np.sum(p * np.log(p))
    per_cell = metrics.mixing_entropy(rep, phases, k=50, per_cell=True)
    np.testing.assert_allclose(per_cell, expected, rtol=1e-12)
    assert metrics.mixing_entropy(rep, phases, k=50) == pytest.approx(expected)


def test_entropy_random_labels_near_log3_and_matches_brute_force():
    rng = np.random.default_rng(3)
    rep = rng.normal(size=(300, 3))
    phases = rng.choice(["G1", "S", "G2M"], size=300)
    k = 20
    d = np.linalg.norm(rep[:, None] - rep[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nbrs = np.argsort(d, axis=1)[:, :k]
    brute = []
    for row in nbrs:
        _, c = np.unique(phases[row], return_counts=True)
        q = c / k
        brute.append(-np.sum(q * np.log(q)))
    ours = metrics.mixing_entropy(rep, phases, k=k, per_cell=True)
    np.testing.assert_allclose(ours, brute, rtol=1e-12)
    assert np.mean(brute) > np.log(3) - 0.1


def test_entropy_excludes_self_with_duplicate_points():
    # All cells at one point: every neighbour set is "all other cells" whatever the order.
    rep = np.zeros((4, 2))
    phases = ["G1", "G1", "S", "S"]
    # Each cell sees 1 of its own phase and 2 of the other among k=3 neighbours.
    p = np.array([1, 2]) / 3
    assert metrics.mixing_entropy(rep, phases, k=3) == pytest.approx(-np.sum(p * np.log(p)))


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="rows"):
        metrics.program_ari(np.zeros((5, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match="k must be"):
        metrics.mixing_entropy(np.zeros((5, 2)), list("aabbc"), k=5)
    with pytest.raises(ValueError, match="NaN"):
        metrics.mixing_entropy(np.full((5, 2), np.nan), list("aabbc"), k=2)


def test_log2_change_recovery():
    truth = np.array([[2.0, -1.5, 0.0, 0.1], [0.0, 1.0, -2.0, 0.0]])
    est = truth + np.array([[0.1, 0.2, -0.1, 0.0], [0.05, -0.3, 0.1, 0.0]])
    out = metrics.log2_change_recovery(est, truth)
    assert out["n_true"] == 4
    assert out["sign_agreement"] == 1.0
    assert out["pearson"] == pytest.approx(np.corrcoef(est.ravel(), truth.ravel())[0, 1])
    flipped = metrics.log2_change_recovery(-truth, truth)
    assert flipped["sign_agreement"] == 0.0 and flipped["pearson"] == pytest.approx(-1.0)


def test_neighbour_purity_separated_and_merged():
    rep, blob = _blobs(3, 400)
    # Labels a and b share blob 0 (alternating), c has blob 1, d has blob 2.
    labels = np.array(["x", "c", "d"])[blob].astype(object)
    zero = np.flatnonzero(blob == 0)
    labels[zero[::2]], labels[zero[1::2]] = "a", "b"
    purity = metrics.neighbour_purity(rep, labels, k=10)
    assert purity["c"] == 1.0
    # Within a blob neighbours are random: 199 of the 399 others share a cell's label.
    assert abs(purity["a"] - 199 / 399) < 0.06 and abs(purity["b"] - 199 / 399) < 0.06
    with pytest.raises(ValueError, match="k must be"):
        metrics.neighbour_purity(rep, labels, k=len(labels))
