"""Expected coverage of a calibrated model, ppp-grid histogram bins, the summary's ratio."""

from __future__ import annotations

import numpy as np
import pytest

from pybivi.tl import ppc


@pytest.mark.parametrize("n_rep", [20, 40, 100])
def test_expected_coverage_matches_monte_carlo(n_rep):
    """Observed and R replicates from one continuous law: the share inside the central 95%."""
    rng = np.random.default_rng(n_rep)
    n_genes = 60_000
    obs = rng.standard_normal(n_genes)
    rep = rng.standard_normal((n_rep, n_genes))
    genes = [str(i) for i in range(n_genes)]
    res = ppc.summarise({"correlation": obs}, {"correlation": rep}, genes)
    got = res.summary.loc["correlation", "fraction_central_95"]
    exact = ppc.expected_coverage(n_rep)
    se = np.sqrt(exact * (1 - exact) / n_genes)
    assert abs(got - exact) < 4 * se
    assert res.summary.loc["correlation", "expected_central_95"] == exact


def test_expected_coverage_order_statistics():
    """(floor(0.975 R) - ceil(0.025 R) + 1) / (R + 1), and the limit 0.95."""
    for n_rep in (1, 7, 20, 39, 40, 100, 1000):
        lo, hi = np.ceil(0.025 * n_rep - 1e-9), np.floor(0.975 * n_rep + 1e-9)
        assert ppc.expected_coverage(n_rep) == pytest.approx((hi - lo + 1) / (n_rep + 1))
    assert ppc.expected_coverage(20) == pytest.approx(19 / 21)
    assert ppc.expected_coverage(100) == pytest.approx(95 / 101)
    assert abs(ppc.expected_coverage(100_000) - 0.95) < 1e-4
    with pytest.raises(ValueError, match="n_replicates"):
        ppc.expected_coverage(0)


@pytest.mark.parametrize("n_rep", [5, 20, 100])
def test_calibration_bins_hold_whole_grid_values(n_rep):
    edges, per_bin = ppc.calibration_bins(n_rep)
    grid = np.arange(n_rep + 1) / n_rep
    half = (np.arange(n_rep) + 0.5) / n_rep  # ties give half steps
    counts, _ = np.histogram(grid, bins=edges)
    np.testing.assert_array_equal(counts, per_bin)
    assert np.histogram(half, bins=edges)[0].sum() == n_rep
    assert len(per_bin) <= 25 and per_bin.sum() == n_rep + 1
    # under calibration (uniform ranks) the normalised heights are flat at 1 / (R + 1)
    rng = np.random.default_rng(0)
    ppp = rng.integers(0, n_rep + 1, 200_000) / n_rep
    heights = np.histogram(ppp, bins=edges)[0] / ppp.size / per_bin
    np.testing.assert_allclose(heights, 1 / (n_rep + 1), rtol=0.1)


def test_median_ratio_measures_a_planted_bias():
    """Replicates with 20% less variance than observed give a median ratio of about 0.8."""
    rng = np.random.default_rng(1)
    n_genes, n_rep = 400, 50
    obs_var = rng.uniform(1.0, 10.0, n_genes)
    rep_var = 0.8 * obs_var * (1 + 0.01 * rng.standard_normal((n_rep, n_genes)))
    res = ppc.summarise({"variance_mature": obs_var}, {"variance_mature": rep_var},
                        [str(i) for i in range(n_genes)])
    assert res.summary.loc["variance_mature", "median_ratio"] == pytest.approx(0.8, abs=0.005)
    assert res.summary.loc["variance_mature", "fraction_high_tail"] == 1.0
