"""The training split is kept and can be fixed apart from the seed; multi-particle ELBOs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pybivi

torch.set_num_threads(1)

FAST = dict(max_epochs=2, batch_size=16, progress_bar=False)


def _model(make_adata, seed=0):
    adata = make_adata(n_cells=48)
    pybivi.BiVI.setup_anndata(adata, perturbation_key=None)
    return pybivi.BiVI(adata, n_hidden=16, seed=seed, scheme="constitutive"), adata


def test_split_is_kept_and_paired_across_seeds(make_adata, tmp_path):
    runs = []
    for seed in (0, 1):
        model, adata = _model(make_adata, seed)
        model.train(seed=seed, validation_fraction=0.25, split_seed=7, **FAST)
        runs.append(model)
        train, val = model.train_indices, model.validation_indices
        assert len(val) == 12 and len(train) == 36
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(48))
    assert np.array_equal(runs[0].validation_indices, runs[1].validation_indices)
    # without split_seed the split follows the seed
    unpaired = []
    for seed in (0, 1):
        model, _ = _model(make_adata, seed)
        model.train(seed=seed, validation_fraction=0.25, **FAST)
        unpaired.append(set(model.validation_indices.tolist()))
    assert unpaired[0] != unpaired[1]
    runs[0].save(tmp_path / "m")
    loaded = pybivi.BiVI.load(tmp_path / "m", adata)
    assert np.array_equal(loaded.validation_indices, runs[0].validation_indices)
    assert np.array_equal(loaded.train_indices, runs[0].train_indices)


def test_more_particles_lower_the_variance_of_the_elbo_estimate(make_adata):
    """Across seeds, K particles divide the estimator's variance by about K."""
    model, _ = _model(make_adata)
    model.train(seed=0, **FAST)
    one = np.array([model.elbo(n_particles=1, seed=s) for s in range(16)])
    many = np.array([model.elbo(n_particles=16, seed=s) for s in range(16)])
    assert one.var(ddof=1) > 0
    # expected ratio 16; with 16 draws each the F-ratio is above 4 with probability > 0.99
    assert many.var(ddof=1) < one.var(ddof=1) / 4
    assert abs(many.mean() - one.mean()) < one.std(ddof=1)  # 4 standard errors of one's mean
    # the same seed gives the same estimate, and the global random state is untouched
    state = torch.get_rng_state()
    assert model.elbo(n_particles=2, seed=3) == model.elbo(n_particles=2, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_validation_particles_and_bad_values(make_adata):
    model, _ = _model(make_adata)
    hist = model.train(seed=0, validation_fraction=0.25, validation_particles=4, **FAST)
    assert np.isfinite(hist["validation_loss"]).all()
    held_out = model.elbo(indices=model.validation_indices, n_particles=8, seed=0)
    assert abs(held_out - hist["validation_loss"].iloc[-1]) < 0.1 * abs(held_out)
    with pytest.raises(ValueError, match="validation_particles"):
        model.train(validation_particles=0, **FAST)
    with pytest.raises(ValueError, match="n_particles"):
        model.elbo(n_particles=0)
