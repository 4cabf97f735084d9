"""The user-facing model classes: setup, training, latents, save/load, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pybivi
from pybivi import schemes

torch.set_num_threads(1)

FAST = dict(max_epochs=2, batch_size=16, progress_bar=False)


@pytest.fixture
def fitted(make_adata):
    """Factory: ``fit(cls, seed, train, **kwargs)``: a small (trained) model and its AnnData."""

    def fit(cls=pybivi.ContrastiveBiVI, seed=0, train=True, **kwargs):
        adata = make_adata(n_cells=48)
        cls.setup_anndata(adata)
        if cls in (pybivi.ContrastiveBiVI, pybivi.BiVI):
            kwargs.setdefault("scheme", "bursty")
        model = cls(adata, n_hidden=16, seed=seed, **kwargs)
        if train:
            model.train(seed=seed, **FAST)
        return model, adata

    return fit


@pytest.mark.parametrize(
    ("cls", "likelihood", "n_salient"),
    [
        (pybivi.ContrastiveBiVI, "cme", 10),
        (pybivi.BiVI, "cme", 0),
        (pybivi.SCVI, "zinb", 0),
        (pybivi.ContrastiveVI, "zinb", 10),
    ],
)
def test_the_four_models_are_one_module(fitted, cls, likelihood, n_salient):
    model, adata = fitted(cls)
    m = model.module
    assert type(m).__name__ == "ContrastiveModule"
    assert m.likelihood == likelihood and m.n_salient == n_salient and m.n_background == 10
    assert (m.scheme is None) == (likelihood != "cme")
    z = model.get_latent_representation(kind="background")
    assert z.shape == (48, 10) and np.isfinite(z).all()
    hist = model.history
    assert list(hist.columns) == ["epoch", "train_loss", "kl_weight", "validation_loss"]
    assert len(hist) == 2 and np.isfinite(hist["train_loss"]).all()
    if n_salient:
        t = model.get_latent_representation(kind="salient")
        control = adata.obs["perturbation"].to_numpy() == "NT"
        assert np.all(t[control] == 0) and np.all(np.abs(t[~control]).sum(1) > 0)
        assert np.array_equal(model.get_latent_representation(), t)  # default kind: salient
    else:
        with pytest.raises(ValueError, match="salient"):
            model.get_latent_representation(kind="salient")


def test_training_lowers_the_loss_and_reports_validation(fitted):
    model, _ = fitted(train=False)
    model.train(max_epochs=15, batch_size=16, lr=1e-2, progress_bar=False,
                validation_fraction=0.25, kl_warmup_epochs=0)
    h = model.history
    assert h["validation_loss"].notna().all() and (h["kl_weight"] == 1.0).all()
    assert h["train_loss"].iloc[-3:].mean() < h["train_loss"].iloc[:3].mean()
    assert h["validation_loss"].iloc[-3:].mean() < h["validation_loss"].iloc[:3].mean()
    # the reported validation loss is the full negative ELBO per cell of those cells
    assert model.elbo() == pytest.approx(h["train_loss"].iloc[-1], rel=0.2)


def test_kl_warmup_rises_linearly_to_one(fitted):
    model, _ = fitted(train=False)
    model.train(max_epochs=4, batch_size=16, kl_warmup_epochs=2, progress_bar=False)
    # 3 batches per epoch: the weight after epoch e is min(1, 1e-3 + (1 - 1e-3) * 3(e+1) / 6)
    expected = [min(1.0, 1e-3 + 0.999 * (e + 1) / 2) for e in range(4)]
    np.testing.assert_allclose(model.history["kl_weight"], expected)


def test_same_seed_same_result_and_other_seed_differs(fitted):
    a, _ = fitted(seed=3)
    b, _ = fitted(seed=3)
    c, _ = fitted(seed=4)
    za, zb, zc = (m.get_latent_representation(kind="background") for m in (a, b, c))
    np.testing.assert_array_equal(za, zb)
    assert not np.allclose(za, zc)


def test_save_load_round_trip_and_gene_check(fitted, tmp_path):
    model, adata = fitted()
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    loaded = pybivi.ContrastiveBiVI.load(tmp_path / "m", adata)
    for kind in ("salient", "background"):
        np.testing.assert_array_equal(model.get_latent_representation(kind=kind),
                                      loaded.get_latent_representation(kind=kind))
    assert loaded.registry == model.registry and len(loaded.history) == 2
    assert loaded.module.scheme.name == "bursty"
    with pytest.raises(ValueError, match="genes"):
        pybivi.ContrastiveBiVI.load(tmp_path / "m", adata[:, :-1].copy())
    with pytest.raises(ValueError, match="ContrastiveBiVI"):
        pybivi.BiVI.load(tmp_path / "m", adata)


def test_latents_of_new_data_and_a_gene_mismatch(fitted, make_adata):
    model, adata = fitted()
    other = make_adata(n_cells=20, seed=5)
    z = model.get_latent_representation(other, kind="background")
    assert z.shape == (20, 10)
    batches = list(model.make_batches(other, indices=[3, 1], batch_size=1))
    assert [b["index"].item() for b in batches] == [3, 1]
    with pytest.raises(ValueError, match="genes"):
        model.get_latent_representation(make_adata(n_genes=8))
    # a posterior draw differs from the mean but stays near it
    draw = model.get_latent_representation(kind="background", give_mean=False)
    mean = model.get_latent_representation(kind="background")
    assert not np.allclose(draw, mean) and np.abs(draw - mean).mean() < 3


def test_user_scheme_objects_and_unknown_names(fitted, tmp_path):
    class Copy(schemes.ExtrinsicScheme):
        name = "extrinsic_test_copy"

    scheme = Copy()
    model, adata = fitted(scheme=scheme)
    assert model.module.scheme is scheme
    model.save(tmp_path)
    with pytest.raises(KeyError, match="extrinsic_test_copy"):  # not registered
        pybivi.ContrastiveBiVI.load(tmp_path, adata)
    loaded = pybivi.ContrastiveBiVI.load(tmp_path, adata, scheme=scheme)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    with pytest.raises((KeyError, ValueError)):
        fitted(scheme="no_such_scheme", train=False)


def test_setup_must_match_the_model_and_early_stopping_stops(make_adata):
    adata = make_adata(n_cells=48)
    pybivi.SCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="setup_anndata"):
        pybivi.ContrastiveBiVI(adata)
    with pytest.raises(ValueError, match="likelihood"):
        pybivi.SCVI(adata, likelihood="cme")
    model = pybivi.SCVI(adata, n_hidden=8)
    # with lr = 0 the validation loss only fluctuates: it must stop well before 40 epochs
    model.train(max_epochs=40, batch_size=16, lr=0.0, early_stopping=True,
                early_stopping_patience=2, progress_bar=False)
    assert len(model.history) < 40 and model.history["validation_loss"].notna().all()
    with pytest.raises(ValueError, match="cuda"):
        if not torch.cuda.is_available():
            model.train(device="cuda", **FAST)
        else:
            raise ValueError("cuda present: nothing to refuse")


@pytest.mark.slow
def test_salient_space_beats_bivi_on_a_confounded_screen():
    """Controls and perturbed cells share a dominant cell-cycle confounder and
    the programs differ in kinetics; ContrastiveBiVI's salient space separates programs
    (ARI) and mixes phases (entropy) better than biVI's single latent space."""
    from pybivi.datasets import simulate_perturbseq
    from pybivi.tl.metrics import mixing_entropy, program_ari

    adata = simulate_perturbseq(
        n_cells=1000, n_genes=200, n_programs=3, seed=1, genes_per_program=10,
        effect_range=(1.0, 2.0), doublet_fraction=0.0, n_weak_perturbations=0,
        cell_cycle_log2=2.0,  # a dominant confounder, pinned so simulator defaults can move
    )
    program = adata.obs["program"].to_numpy()
    perturbed = program != "control"
    scores = {}
    for cls in (pybivi.ContrastiveBiVI, pybivi.BiVI):
        cls.setup_anndata(adata, perturbation_key="perturbation", control_labels="NT")
        model = cls(adata, scheme="bursty")
        model.train(max_epochs=30, progress_bar=False)
        rep = model.get_latent_representation()[perturbed]
        scores[cls.__name__] = (
            program_ari(rep, program[perturbed]),
            mixing_entropy(rep, adata.obs["phase"].to_numpy()[perturbed], k=30),
        )
    (ari_c, h_c), (ari_b, h_b) = scores["ContrastiveBiVI"], scores["BiVI"]
    # measured here: ContrastiveBiVI ARI 0.63, entropy 0.33; biVI ARI 0.00, entropy 0.01
    assert ari_c > 0.4 and ari_c > ari_b + 0.3, scores
    assert h_c > h_b + 0.15, scores
