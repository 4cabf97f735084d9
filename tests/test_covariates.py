"""Batches and covariates: registration, injection, errors, transform_batch, the simulator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pybivi
from pybivi import datasets
from pybivi.tl import de, metrics

MODELS = (pybivi.ContrastiveBiVI, pybivi.BiVI, pybivi.SCVI, pybivi.ContrastiveVI)


def _add_covariates(adata, n_batches: int = 2):
    n = adata.n_obs
    adata.obs["batch"] = [f"b{i % n_batches}" for i in range(n)]
    adata.obs["donor"] = [f"d{(i // 2) % 3}" for i in range(n)]
    adata.obs["pct_mito"] = np.linspace(0.0, 0.2, n)
    return adata


def _setup(cls, adata, **kwargs):
    cls.setup_anndata(
        adata, batch_key="batch", categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct_mito"], **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("cls", MODELS)
def test_covariates_reach_both_encoders_and_the_decoder(cls, make_adata):
    plain = make_adata()
    cls.setup_anndata(plain)
    base = cls(plain).module
    adata = _add_covariates(make_adata())
    _setup(cls, adata)
    model = cls(adata)
    reg = model.registry
    assert reg.batch_categories == ["b0", "b1"] and reg.categorical_covariate_categories == [
        ["d0", "d1", "d2"]
    ]
    assert reg.continuous_covariate_keys == ["pct_mito"]
    n_cov = 2 + 3 + 1
    module = model.module
    encoders = [module.z_encoder] + ([module.t_encoder] if module.t_encoder is not None else [])
    for enc, plain_enc in zip(encoders, [base.z_encoder, base.t_encoder], strict=False):
        assert enc.hidden[0].in_features == plain_enc.hidden[0].in_features + n_cov
    assert module.decoder.hidden[0].in_features == base.decoder.hidden[0].in_features + n_cov
    # Without covariates the networks are the paper's: counts in, latents into the decoder.
    assert base.z_encoder.hidden[0].in_features == len(base.species) * adata.n_vars
    assert base.decoder.hidden[0].in_features == base.n_background + base.n_salient
    batch = next(model.make_batches(batch_size=12))
    idx = batch["index"].numpy()
    cov = module.covariates(batch).numpy()
    assert cov.shape == (12, n_cov)
    np.testing.assert_array_equal(cov[:, :2].argmax(1), idx % 2)
    np.testing.assert_array_equal(cov[:, 2:5].argmax(1), (idx // 2) % 3)
    assert (cov[:, :5].sum(1) == 2).all()
    np.testing.assert_allclose(cov[:, 5], adata.obs["pct_mito"].to_numpy()[idx], rtol=1e-6)
    assert batch["batch_index"].dtype == torch.long
    assert batch["categorical_covariates"].shape == (12, 1)


@pytest.mark.parametrize(
    ("kwargs", "mutate", "error", "match"),
    [
        ({"batch_key": "lane"}, None, KeyError, "batch key 'lane'"),
        ({"categorical_covariate_keys": ["nope"]}, None, KeyError, "covariate 'nope'"),
        ({"continuous_covariate_keys": "nope"}, None, KeyError, "covariate 'nope'"),
        ({"continuous_covariate_keys": ["pct_mito"]},
         lambda a: a.obs.__setitem__("pct_mito", np.r_[np.nan, np.ones(a.n_obs - 1)]),
         ValueError, "NaN"),
        ({"continuous_covariate_keys": ["donor"]}, None, ValueError, "numeric"),
        ({"batch_key": "batch"},
         lambda a: a.obs.__setitem__("batch", [None] + ["b0"] * (a.n_obs - 1)),
         ValueError, "missing"),
        ({"categorical_covariate_keys": ["donor", "donor"]}, None, ValueError, "twice"),
        ({"batch_key": "donor", "categorical_covariate_keys": "donor"}, None, ValueError,
         "more than once"),
    ],
)  # fmt: skip
def test_bad_covariates_are_named(make_adata, kwargs, mutate, error, match):
    adata = _add_covariates(make_adata())
    if mutate is not None:
        mutate(adata)
    with pytest.raises(error, match=match):
        pybivi.ContrastiveBiVI.setup_anndata(adata, **kwargs)


def test_unseen_categories_and_missing_columns_of_new_data(make_adata):
    adata = _add_covariates(make_adata())
    _setup(pybivi.SCVI, adata)
    model = pybivi.SCVI(adata)
    model.train(max_epochs=1, batch_size=20, progress_bar=False, device="cpu")
    new = adata.copy()
    new.obs["batch"] = ["b7"] + list(new.obs["batch"][1:])
    with pytest.raises(ValueError, match="b7"):
        model.get_latent_representation(new)
    with pytest.raises(ValueError, match="b7"):
        model.posterior(new, n_samples=2)
    new = adata.copy()
    new.obs["donor"] = ["d9"] * new.n_obs
    with pytest.raises(ValueError, match="d9"):
        model.get_latent_representation(new)
    new = adata.copy()
    del new.obs["pct_mito"]
    with pytest.raises(KeyError, match="pct_mito"):
        model.get_latent_representation(new)
    with pytest.raises(ValueError, match="b5"):
        model.posterior(n_samples=2, transform_batch="b5")
    plain = make_adata()
    pybivi.SCVI.setup_anndata(plain)
    with pytest.raises(ValueError, match="without batch_key"):
        pybivi.SCVI(plain).posterior(n_samples=2, transform_batch="b0")


def test_save_and_load_keep_the_covariates(make_adata, tmp_path):
    adata = _add_covariates(make_adata())
    _setup(pybivi.ContrastiveBiVI, adata)
    model = pybivi.ContrastiveBiVI(adata)
    model.train(max_epochs=2, batch_size=20, progress_bar=False, device="cpu")
    model.save(tmp_path / "m")
    loaded = pybivi.ContrastiveBiVI.load(tmp_path / "m", adata)
    assert loaded.registry.to_dict() == model.registry.to_dict()
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5
    )
    a = loaded.posterior(n_samples=2, transform_batch="b1").posterior["burst_size"].values
    b = model.posterior(n_samples=2, transform_batch="b1").posterior["burst_size"].values
    np.testing.assert_allclose(a, b, rtol=1e-5)
    new = adata.copy()
    new.obs["batch"] = ["b3"] * new.n_obs
    with pytest.raises(ValueError, match="b3"):
        pybivi.ContrastiveBiVI.load(tmp_path / "m", new)


def test_the_simulator_plants_batches_without_changing_the_batch_free_screen():
    kwargs = dict(n_cells=400, n_genes=40, n_programs=2, seed=3)
    plain = datasets.simulate_perturbseq(**kwargs)
    one = datasets.simulate_perturbseq(**kwargs, n_batches=1, batch_effect=2.0)
    for layer in ("unspliced", "spliced"):
        assert (plain.layers[layer] != one.layers[layer]).nnz == 0
    assert "batch" not in one.obs and "batches" not in one.uns["simulation"]
    three = datasets.simulate_perturbseq(
        **kwargs, n_batches=3, batch_effect={"burst_size": 1.5}
    )
    # The batch draws use their own generator: labels and phases are those of the screen.
    for key in ("perturbation", "phase", "program"):
        assert (three.obs[key].astype(str) == plain.obs[key].astype(str)).all()
    truth = three.uns["simulation"]["batches"]
    assert list(three.obs["batch"].cat.categories) == truth["categories"] == [
        "batch1", "batch2", "batch3"
    ]
    assert truth["log2_burst_size"].shape == (3, 40) and not truth["log2_degradation"].any()
    controls = three.obs["perturbation"].astype(str) == "NT"
    assert (three.obs.loc[controls, "batch"].value_counts() > 0).all()


def _planted_batch_screen():
    """Genes 0-4 eight times higher and 5-9 eight times lower in batch b1; perturbation A
    raises genes 20-22 and lowers 23-25 fourfold; A's cells are 95% in b1, NT's 50%."""
    rng = np.random.default_rng(11)
    n_genes, base = 60, 5.0
    rows = [("NT", "b0", 100), ("NT", "b1", 100), ("A", "b0", 10), ("A", "b1", 190)]
    labels, batches, means = [], [], []
    for label, batch, n in rows:
        mu = np.full(n_genes, base)
        if batch == "b1":
            mu[:5] *= 8.0
            mu[5:10] /= 8.0
        if label == "A":
            mu[20:23] *= 4.0
            mu[23:26] /= 4.0
        labels += [label] * n
        batches += [batch] * n
        means.append(np.tile(mu, (n, 1)))
    mature = rng.poisson(np.concatenate(means)).astype(np.float32)
    nascent = rng.poisson(np.concatenate(means) / 2).astype(np.float32) + 1
    obs = pd.DataFrame({"perturbation": labels, "batch": batches})
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(mature.copy(), obs=obs, layers={"spliced": mature, "unspliced": nascent})


def test_the_observed_group_test_compares_within_batches():
    adata = _planted_batch_screen()
    called = {}
    for key in ("batch", None):
        a = adata.copy()
        pybivi.SCVI.setup_anndata(a, batch_key=key)
        table = de.mean(pybivi.SCVI(a), groupby="perturbation", group="A", reference="NT",
                        null_repeats=0)
        called[key] = table["is_de"].to_numpy()
        if key == "batch":
            lfc = table["lfc_estimate"].to_numpy()
            assert np.all(np.abs(lfc[20:23] - 2.0) < 0.4) and np.all(np.abs(lfc[23:26] + 2) < 0.4)
    truth = np.zeros(60, bool)
    truth[20:26] = True
    # Within batches: exactly the perturbation's genes; pooled, the batch genes pass too.
    np.testing.assert_array_equal(called["batch"], truth)
    assert called[None][:10].sum() >= 5


def _fit(adata, batch_key):
    pybivi.ContrastiveBiVI.setup_anndata(adata, "perturbation", "NT", batch_key=batch_key)
    model = pybivi.ContrastiveBiVI(adata, seed=0)
    model.train(max_epochs=40, batch_size=64, progress_bar=False, device="cpu")
    return model


@pytest.fixture(scope="module")
def batch_screen():
    """Three batches that change burst sizes (log2 s.d. 1); perturbations change nothing."""
    torch.set_num_threads(1)
    adata = datasets.simulate_perturbseq(
        n_cells=600, n_genes=40, n_programs=2, seed=5, n_batches=3, doublet_fraction=0.0,
        effect_range=(0.0, 0.0), batch_effect={"burst_size": 1.0},
    )  # fmt: skip
    return adata, _fit(adata.copy(), "batch")


def test_a_batch_only_effect_stays_out_of_the_salient_space(batch_screen):
    adata, model = batch_screen
    unaware = _fit(adata.copy(), None)
    perturbed = adata.obs["perturbation"].astype(str).to_numpy() != "NT"
    batch = adata.obs["batch"].astype(str).to_numpy()[perturbed]
    entropy = {
        name: metrics.mixing_entropy(m.get_latent_representation()[perturbed], batch, k=30)
        / np.log(3)
        for name, m in (("aware", model), ("unaware", unaware))
    }
    # Batches are shared by controls and perturbed cells: with batch_key the salient
    # neighbourhoods mix them (near the maximum), far better than without (measured 0.79
    # against 0.47 of log 3 in this 40-epoch fit).
    assert entropy["aware"] > 0.7, entropy
    assert entropy["aware"] > entropy["unaware"] + 0.15, entropy


def test_transform_batch_moves_the_decoded_means_by_the_planted_effect(batch_screen):
    adata, model = batch_screen
    truth = adata.uns["simulation"]["batches"]["log2_burst_size"]
    kw = dict(n_samples=5, libraries=("reference",), quantities=["mean_nascent"], seed=1)
    at = {b: model.posterior(transform_batch=b, **kw).posterior["mean_nascent"].values
          for b in ("batch1", "batch2")}  # fmt: skip
    both = model.posterior(transform_batch=["batch1", "batch2"], **kw).posterior
    # A list averages the decoded quantities over batches, for the same latent draws.
    np.testing.assert_allclose(both["mean_nascent"].values, (at["batch1"] + at["batch2"]) / 2,
                               rtol=1e-5)  # fmt: skip
    # mean_N = b / beta: decoding the same cells at the other batch moves log2 mean_N by the
    # planted log2 b difference (up to a shift shared by all genes: frequencies sum to 1).
    decoded = np.log2(at["batch2"].mean(axis=(0, 1, 2, 3))) - np.log2(
        at["batch1"].mean(axis=(0, 1, 2, 3))
    )
    planted = truth[1] - truth[0]
    decoded, planted = decoded - np.median(decoded), planted - np.median(planted)
    assert np.corrcoef(decoded, planted)[0, 1] > 0.9
    # A short fit leaves part of the batch in z, which shrinks the decoded change a little.
    slope = np.polyfit(planted, decoded, 1)[0]
    assert 0.5 < slope < 1.3, slope


def test_covariates_can_bypass_the_encoders(make_adata):
    adata = _add_covariates(make_adata())
    _setup(pybivi.ContrastiveVI, adata)
    model = pybivi.ContrastiveVI(adata, module_kwargs={"encode_covariates": False})
    module = model.module
    assert module.z_encoder.hidden[0].in_features == adata.n_vars
    assert module.decoder.hidden[0].in_features == module.n_background + module.n_salient + 6
    model.train(max_epochs=1, batch_size=20, progress_bar=False, device="cpu")
    assert np.isfinite(model.elbo())


def test_de_decodes_at_the_chosen_batch(batch_screen):
    adata, model = batch_screen
    truth = adata.uns["simulation"]["batches"]["log2_burst_size"]
    planted = truth[1] - truth[0]
    kw = dict(groupby="batch", group="batch2", reference="batch1", seed=2)
    own = de.mean(model, method="pairs", n_samples=400, **kw)
    same = de.mean(model, method="pairs", n_samples=400, transform_batch="batch1", **kw)
    # Decoded at their own batches the two batches differ as planted; decoded at one
    # batch, the same cells (same perturbation mix) barely differ.
    assert np.corrcoef(own["lfc_median"], planted)[0, 1] > 0.8
    assert np.abs(same["lfc_median"]).mean() < 0.3 * np.abs(own["lfc_median"]).mean()
    group = de.mean(model, estimate="decoded", n_draws=10, null_repeats=0,
                    transform_batch=["batch1", "batch2", "batch3"], **kw)  # fmt: skip
    assert np.abs(group["lfc_estimate"]).mean() < 0.3 * np.abs(own["lfc_median"]).mean()
    with pytest.raises(ValueError, match="estimate='decoded'"):
        de.mean(model, transform_batch="batch1", **kw)
