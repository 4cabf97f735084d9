"""Posterior-predictive statistics and calibration on arrays, then on fitted models."""

from __future__ import annotations

import numpy as np
import pytest

from pybivi import pl, report
from pybivi.tl import ppc


def _pairs(rng, n_cells, n_genes, dispersion=2.0):
    """Correlated NB-like count pairs: a shared gamma rate drives both species."""
    means = rng.uniform(0.5, 8.0, size=n_genes)
    rate = rng.gamma(dispersion, 1.0 / dispersion, size=(n_cells, n_genes)) * means
    return rng.poisson(rate), rng.poisson(2.0 * rate)


def test_statistics_match_numpy():
    rng = np.random.default_rng(0)
    n, m = _pairs(rng, 300, 6)
    s = ppc.statistics(n, m)
    np.testing.assert_allclose(s["mean_nascent"], n.mean(0))
    np.testing.assert_allclose(s["variance_mature"], m.var(0, ddof=1))
    np.testing.assert_allclose(s["zero_fraction_nascent"], (n == 0).mean(0))
    expected = [np.corrcoef(n[:, g], m[:, g])[0, 1] for g in range(6)]
    np.testing.assert_allclose(s["correlation"], expected)
    mature_only = ppc.statistics(None, m)
    assert "correlation" not in mature_only and "mean_nascent" not in mature_only


def test_moments_merge_over_minibatches_and_replicates():
    rng = np.random.default_rng(1)
    n, m = _pairs(rng, 250, 5)
    acc = ppc.CountMoments(5, leading=(2,))
    for start in range(0, 250, 64):
        sl = slice(start, start + 64)
        acc.add(np.stack([n[sl], n[sl] + 1]), np.stack([m[sl], m[sl]]))
    out = acc.finalize()
    full = ppc.statistics(n, m)
    np.testing.assert_allclose(out["variance_nascent"][0], full["variance_nascent"])
    np.testing.assert_allclose(out["mean_nascent"][1], full["mean_nascent"] + 1)
    np.testing.assert_allclose(out["correlation"][1], full["correlation"])


def test_constant_gene_has_nan_correlation():
    s = ppc.statistics(np.zeros((10, 1)), np.arange(10)[:, None])
    assert np.isnan(s["correlation"][0])


def test_ppp_is_uniform_when_replicates_come_from_the_truth():
    # Observed and replicated datasets from the same law: ppp ~ Uniform(0, 1) per gene.
    rng = np.random.default_rng(2)
    n_genes, n_rep = 300, 39
    means = rng.uniform(0.5, 5.0, n_genes)
    draw = lambda: ppc.statistics(None, rng.poisson(means, size=(200, n_genes)))  # noqa: E731
    obs = draw()
    reps = [draw() for _ in range(n_rep)]
    rep = {k: np.stack([r[k] for r in reps]) for k in obs}
    res = ppc.summarise(obs, rep, [f"g{i}" for i in range(n_genes)])
    ppp = res.table.query("statistic == 'mean_mature'")["ppp"].to_numpy()
    # Uniform: mean 1/2 (sd of the mean ~ 0.017), ~5% of genes in the two 2.5% tails.
    assert abs(ppp.mean() - 0.5) < 0.06
    assert res.summary.loc["mean_mature", "fraction_central_95"] > 0.88
    assert res.summary.loc["mean_mature", "gene_correlation"] > 0.95


def test_ppp_flags_underdispersed_replicates():
    # Observed counts are overdispersed; Poisson replicates with the same means are not.
    rng = np.random.default_rng(3)
    n_obs, m_obs = _pairs(rng, 400, 40, dispersion=1.0)
    obs = ppc.statistics(n_obs, m_obs)
    reps = []
    for _ in range(20):
        n_rep = rng.poisson(n_obs.mean(0), size=n_obs.shape)
        m_rep = rng.poisson(m_obs.mean(0), size=m_obs.shape)
        reps.append(ppc.statistics(n_rep, m_rep))
    rep = {k: np.stack([r[k] for r in reps]) for k in obs}
    res = ppc.summarise(obs, rep, [f"g{i}" for i in range(40)])
    assert res.summary.loc["variance_mature", "fraction_high_tail"] > 0.9
    assert res.summary.loc["correlation", "fraction_high_tail"] > 0.9
    assert res.summary.loc["variance_mature", "ppp_overall"] == 1.0


def test_ppp_ties_and_nan():
    p = ppc.ppp_values(np.array([1.0, 2.0, np.nan]), np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]))
    np.testing.assert_allclose(p[:2], [0.5, 0.75])
    assert np.isnan(p[2])


def test_too_few_cells():
    with pytest.raises(ValueError, match="two cells"):
        ppc.statistics(None, np.ones((1, 3)))


# ---------------------------------------------------------------------- fitted models
from pathlib import Path  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def sim():
    import torch

    from pybivi import datasets

    torch.set_num_threads(1)
    return datasets.simulate_perturbseq(
        n_cells=200, n_genes=25, n_programs=2, seed=1, genes_per_program=5
    )


def _library_identity(result, n_genes):
    # rho sums to one and mu = l * rho, so E[total replicated count of a cell] = l exactly:
    # summed over genes, replicated and observed mean counts agree whatever the fit.
    for name in [c for c in result.observed.columns if c.startswith("mean_")]:
        obs = result.observed[name].sum()
        rep = result.replicates[name].sum(axis=1)
        # Replicates are independent: 4 standard errors of their mean.
        assert abs(rep.mean() - obs) < 4 * rep.std(ddof=1) / np.sqrt(len(rep)), name


def test_ppc_on_a_bimodal_model(sim):
    from pybivi.models import ContrastiveBiVI

    a = sim.copy()
    ContrastiveBiVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    model = ContrastiveBiVI(a, scheme="extrinsic", n_hidden=16, seed=0)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    res = ppc.ppc(model, n_replicates=8, seed=1, batch_size=50)
    assert set(res.observed.columns) == {
        "mean_nascent",
        "mean_mature",
        "variance_nascent",
        "variance_mature",
        "zero_fraction_nascent",
        "zero_fraction_mature",
        "correlation",
    }
    assert res.replicates["correlation"].shape == (8, 25)
    np.testing.assert_allclose(
        res.observed["mean_mature"], np.asarray(a.layers["spliced"].mean(0)).ravel()
    )
    ppp = res.table["ppp"].dropna()
    assert ppp.between(0, 1).all()
    _library_identity(res, 25)
    again = ppc.ppc(model, n_replicates=8, seed=1, batch_size=50)
    np.testing.assert_array_equal(res.replicates["mean_mature"], again.replicates["mean_mature"])
    fig = pl.ppc(res, statistics=["mean_mature", "correlation"])
    assert len(fig.axes) == 4
    assert len(pl.calibration(res).axes) == 7
    sec = report.ppc_section(res)
    assert sec["summary"] is res.summary and set(sec["figures"]) == {"statistics", "calibration"}
    assert "correlation" in sec["text"]


def test_ppc_on_a_mature_only_model(sim):
    from pybivi.models import SCVI

    a = sim.copy()
    SCVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    model = SCVI(a, n_hidden=16, likelihood="zinb")
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    res = ppc.ppc(model, n_replicates=5, indices=np.arange(120))
    assert set(res.observed.columns) == {"mean_mature", "variance_mature", "zero_fraction_mature"}
    assert list(res.summary.index) == list(res.observed.columns)


@pytest.mark.shared
@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
def test_ppc_on_real_pancreas_cells():
    path = SHARED / "data" / "pancreas_100obs.h5ad"
    if not path.exists():
        pytest.skip("../shared/data/pancreas_100obs.h5ad not available")
    import anndata as ad

    from pybivi.models import BiVI

    adata = ad.read_h5ad(path)
    total = np.asarray((adata.layers["spliced"] + adata.layers["unspliced"]).sum(0)).ravel()
    adata = adata[:, np.argsort(total)[-12:]].copy()  # a handful of well-expressed genes
    libs = [np.asarray(adata.layers[k].sum(1)).ravel() for k in ("spliced", "unspliced")]
    adata = adata[(libs[0] > 0) & (libs[1] > 0)].copy()
    BiVI.setup_anndata(adata, perturbation_key=None)
    # A fast closed-form scheme: the test is about the check, not about the bursty law.
    model = BiVI(adata, scheme="extrinsic", n_hidden=16)
    model.train(max_epochs=5, batch_size=32, progress_bar=False)
    res = ppc.ppc(model, n_replicates=10)
    assert res.observed.shape == (12, 7)
    assert np.isfinite(res.summary["gene_correlation"]).all()
    _library_identity(res, 12)
