"""Median-ratio normalisation of posterior samples (pybivi.tl.bayes_factors) and its use in
pybivi.tl.de.kinetic: compositional shifts removed, true changes kept."""

from __future__ import annotations

import numpy as np
import pytest

from pybivi.tl import de
from pybivi.tl.bayes_factors import median_ratio_normalize


def test_median_ratio_removes_per_sample_factors_and_keeps_minority_changes():
    rng = np.random.default_rng(0)
    n_samples, n_genes = 200, 50
    profile = np.exp(rng.normal(0.0, 2.0, n_genes))
    changed = np.zeros(n_genes, bool)
    changed[:10] = True  # a minority (20%) of genes rise 8x
    factors = 2.0 ** rng.normal(0.0, 1.0, (n_samples, 1))  # compositional / library shifts
    samples = factors * profile * np.where(changed, 8.0, 1.0)
    out = median_ratio_normalize(samples, profile)
    lfc = np.log2(out / profile)
    np.testing.assert_allclose(lfc[:, ~changed], 0.0, atol=1e-10)
    np.testing.assert_allclose(lfc[:, changed], 3.0, atol=1e-10)
    # Without a profile, each gene's own median across samples is the reference.
    own, own_profile = median_ratio_normalize(samples, return_profile=True)
    assert np.ptp(np.log2(own[:, ~changed]), axis=0).max() < 1e-10
    np.testing.assert_allclose(own_profile, np.exp(np.median(np.log(samples), axis=0)), rtol=1e-12)
    np.testing.assert_array_equal(median_ratio_normalize(samples), own)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[1.0, -1.0]]), "positive"),
        (np.array([[1.0, np.nan]]), "positive"),
        (np.ones((2, 2, 2)), r"\(n_samples, n_genes\)"),
    ],
)
def test_median_ratio_rejects_bad_samples(bad, match):
    with pytest.raises(ValueError, match=match):
        median_ratio_normalize(bad)


def test_median_ratio_rejects_bad_profile():
    with pytest.raises(ValueError, match="one value per gene"):
        median_ratio_normalize(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        median_ratio_normalize(np.ones((3, 4)), np.zeros(4))


def _composition_idata(rng, n_genes=40, n_changed=6, shift=1.5, n_cells=80, n_draws=20):
    """Draws of b whose program group is shifted by ``-shift`` log2 on every gene (a
    composition effect) and by ``+3`` more on the first ``n_changed`` genes."""
    import arviz as az
    import xarray as xr

    labels = np.array(["control"] * (n_cells // 2) + ["program1"] * (n_cells - n_cells // 2))
    prog = (labels == "program1")[None, None, :, None]
    base = rng.normal(0.0, 2.0, n_genes)
    true = np.where(np.arange(n_genes) < n_changed, 3.0, 0.0)
    shape = (1, n_draws, n_cells, n_genes)
    log2 = base + rng.normal(0.0, 0.2, shape) + prog * (true - shift)
    post = {name: (("chain", "draw", "cell", "gene"), 2.0**log2)
            for name in ("burst_size", "degradation_rate")}
    coords = {"chain": [0], "draw": np.arange(n_draws), "cell": np.arange(n_cells),
              "gene": [f"g{i}" for i in range(n_genes)]}
    const = xr.Dataset({"program": (("cell",), labels)}, coords={"cell": np.arange(n_cells)})
    return az.InferenceData(posterior=xr.Dataset(post, coords=coords), constant_data=const), true


def test_kinetic_median_ratio_calls_only_true_changes():
    idata, true = _composition_idata(np.random.default_rng(1))
    kw = dict(groupby="program", reference="control", method="pairs")
    raw = de.kinetic(idata, **kw)
    norm = de.kinetic(idata, normalize="median_ratio", **kw)
    changed = true != 0
    # Raw: the common -1.5 log2 shift makes every unchanged gene look changed.
    assert raw["burst_size_is_de"].to_numpy()[~changed].all()
    np.testing.assert_allclose(raw["burst_size_lfc_median"].to_numpy()[~changed], -1.5, atol=0.1)
    # Normalised: the shift is gone, the true +3 (raw +1.5) changes are recovered.
    assert not norm["burst_size_is_de"].to_numpy()[~changed].any()
    assert norm["burst_size_is_de"].to_numpy()[changed].all()
    np.testing.assert_allclose(norm["burst_size_lfc_median"].to_numpy(), true, atol=0.1)


def test_kinetic_rejects_unknown_normalization():
    idata, _ = _composition_idata(np.random.default_rng(2))
    with pytest.raises(ValueError, match="normalize"):
        de.kinetic(idata, groupby="program", normalize="tmm")
