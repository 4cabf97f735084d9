"""Bayes-factor maths against analytic cases, and the model-facing tests on tiny fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from pybivi import de


def _two_sided(m: float, s: float, delta: float) -> float:
    """P(|X| >= delta) for X ~ N(m, s^2)."""
    return norm.cdf((-delta - m) / s) + norm.sf((delta - m) / s)


@pytest.mark.parametrize("shift", [0.0, 0.8, 1.5, -2.5])
def test_kinetic_bf_matches_lognormal_closed_form(shift):
    # log2 a ~ N(shift, 0.6^2), log2 b ~ N(0, 0.6^2): lfc ~ N(shift, 2 * 0.36).
    rng = np.random.default_rng(1)
    s = 0.6
    a = 2.0 ** rng.normal(shift, s, size=(4000, 3))
    b = 2.0 ** rng.normal(0.0, s, size=(3000, 3))
    res = de.kinetic_bayes_factors(a, b, delta=1.0, n_pairs=20_000, seed=3)
    p = _two_sided(shift, s * np.sqrt(2), 1.0)
    mc_sd = np.sqrt(p * (1 - p) / 20_000) + 0.01  # pairs + finite pools
    np.testing.assert_allclose(res["proba_de"], p, atol=4 * mc_sd)
    np.testing.assert_allclose(res["lfc_mean"], shift, atol=0.05)
    np.testing.assert_allclose(res["lfc_sd"], s * np.sqrt(2), rtol=0.05)
    # BF is the pair-count ratio with the documented half pseudo-count.
    n_out = res["proba_de"] * 20_000
    np.testing.assert_allclose(res["bayes_factor"], (n_out + 0.5) / (20_000 - n_out + 0.5))


def test_kinetic_bf_is_seeded_and_pairs_are_random():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=(500, 4)), rng.lognormal(size=(700, 4))
    r1 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=5)
    r2 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=5)
    r3 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=6)
    np.testing.assert_array_equal(r1["bayes_factor"], r2["bayes_factor"])
    assert not np.array_equal(r1["lfc_mean"], r3["lfc_mean"])


def test_kinetic_bf_extremes_are_finite():
    a = np.full((100, 2), 8.0)
    b = np.full((100, 2), 1.0)
    res = de.kinetic_bayes_factors(a, b, delta=1.0, n_pairs=1000)
    np.testing.assert_allclose(res["bayes_factor"], 1000.5 / 0.5)
    res = de.kinetic_bayes_factors(b, b, delta=1.0, n_pairs=1000)
    np.testing.assert_allclose(res["bayes_factor"], 0.5 / 1000.5)


def test_kinetic_bf_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        de.kinetic_bayes_factors(np.zeros((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="gene axes"):
        de.kinetic_bayes_factors(np.ones((3, 2)), np.ones((3, 3)))


@pytest.mark.parametrize("shift", [0.1, 0.5, -0.4])
def test_change_mode_matches_closed_form(shift):
    # With eps = 0, lfc of element-wise pairs of independent lognormals is N(shift, 2 s^2).
    rng = np.random.default_rng(2)
    s, n, delta = 0.3, 20_000, 0.2
    a = 2.0 ** rng.normal(shift, s, size=(n, 2))
    b = 2.0 ** rng.normal(0.0, s, size=(n, 2))
    res = de.change_bayes_factors(a, b, delta=delta, pseudocounts=0.0)
    sd = s * np.sqrt(2)
    p = max(norm.sf((delta - shift) / sd), norm.cdf((-delta - shift) / sd))
    np.testing.assert_allclose(res["proba_de"], p, atol=4 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_allclose(
        res["bayes_factor"], res["proba_de"] / (1 - res["proba_de"]), rtol=1e-6
    )
    np.testing.assert_allclose(res["log_bayes_factor"], np.log(res["bayes_factor"]))
    assert np.all(res["direction"] == np.sign(shift))


def test_change_mode_pseudocount_shrinks_silent_genes():
    # Two silent genes with a 10x ratio of tiny scales: eps above them removes the call.
    a = np.full((200, 1), 1e-7)
    b = np.full((200, 1), 1e-8)
    assert de.change_bayes_factors(a, b, pseudocounts=0.0)["proba_de"][0] == 1.0
    assert de.change_bayes_factors(a, b, pseudocounts=1e-4)["proba_de"][0] == 0.0


def test_estimate_pseudocounts_uses_silent_genes_quantile():
    scales_a = np.tile(np.array([1e-3, 2e-3, 0.5]), (10, 1))
    zero = np.array([True, True, False])
    eps = de.estimate_pseudocounts(scales_a, scales_a, zero, zero, quantile=1.0)
    assert eps == pytest.approx(2e-3)
    assert de.estimate_pseudocounts(scales_a, scales_a, ~zero & False, ~zero & False) == 1e-5


def test_combined_call_labels():
    calls = {"burst_size": np.array([1, 0, 1, 0]), "degradation_rate": np.array([0, 1, 1, 0])}
    out = de.combined_call(calls)
    assert list(out) == ["burst_size only", "degradation_rate only", "both", "none"]
