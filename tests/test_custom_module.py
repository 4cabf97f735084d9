"""A user's subclass of ContrastiveModule: built by the model class, trained, saved, loaded,
exported and tested, with its own parameters and its own guide honoured everywhere."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pybivi
from pybivi.module import ContrastiveModule
from pybivi.tl import de, ppc

torch.set_num_threads(1)

SHIFT = 3.0  # how far the custom guide moves z away from the encoder's mean


class ScaledPriorModule(ContrastiveModule):
    """``z ~ Normal(0, diag(s^2))`` with a learned ``s`` (an extra ``nn.Parameter``), and a
    guide that draws ``z`` around the encoder's mean plus a fixed ``shift``."""

    def __init__(self, *args, prior_scale: float = 1.0, shift: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.shift = float(shift)
        init = torch.full((self.n_background,), float(np.log(prior_scale)))
        self.log_prior_scale = nn.Parameter(init)

    def background_prior(self, batch):
        loc = batch["x_mature"].new_zeros(batch["x_mature"].shape[0], self.n_background)
        return dist.Normal(loc, self.log_prior_scale.exp().expand_as(loc)).to_event(1)

    def guide(self, batch, kl_weight=1.0, observe=True):
        pyro.module(self.pyro_name, self)
        params = self.encode(batch)
        loc, scale = params["z"]
        with self._plate(batch), poutine.scale(scale=kl_weight):
            z = pyro.sample("z", dist.Normal(loc + self.shift, scale).to_event(1))
            if self.n_salient:
                with poutine.mask(mask=~batch["is_control"]):
                    pyro.sample("t", dist.Normal(*params["t"]).to_event(1))
        return z


@pytest.fixture(scope="module")
def custom(make_adata):
    adata = make_adata(n_cells=48)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    model = pybivi.ContrastiveBiVI(
        adata, n_hidden=16, scheme="extrinsic", seed=0, module_cls=ScaledPriorModule,
        module_kwargs={"prior_scale": 0.5, "shift": SHIFT},
    )
    model.train(max_epochs=3, batch_size=16, lr=1e-2, progress_bar=False)
    return model, adata


def test_the_model_class_builds_and_trains_the_custom_module(custom):
    model, _ = custom
    module = model.module
    assert type(module) is ScaledPriorModule and module.shift == SHIFT
    # The extra parameter is seen by the optimiser: it moved away from log(0.5).
    start = np.full(module.n_background, np.log(0.5))
    assert not np.allclose(module.log_prior_scale.detach().numpy(), start)
    assert np.isfinite(model.history["train_loss"]).all()
    assert "module_cls=ScaledPriorModule" in repr(model)


def test_save_load_round_trips_the_custom_module(custom, tmp_path):
    model, adata = custom
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["module_cls"].endswith(":ScaledPriorModule")
    assert config["module_kwargs"] == {"prior_scale": 0.5, "shift": SHIFT}
    back = pybivi.ContrastiveBiVI.load(tmp_path / "m", adata)
    assert type(back.module) is ScaledPriorModule and back.module.shift == SHIFT
    before, after = model.module.state_dict(), back.module.state_dict()
    assert set(before) == set(after) and "log_prior_scale" in after
    for key, value in before.items():
        assert torch.equal(value.cpu(), after[key]), key
    # The same draws give the same ELBO: the loaded module is the same function.
    pyro.set_rng_seed(1)
    expected = model.elbo()
    pyro.set_rng_seed(1)
    assert back.elbo() == pytest.approx(expected, rel=1e-6)


def test_load_names_a_module_class_it_cannot_import(custom, tmp_path):
    model, adata = custom
    model.save(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["module_cls"] = "no_such_package.modules:Gone"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ImportError, match="no_such_package.modules:Gone"):
        pybivi.ContrastiveBiVI.load(tmp_path / "m", adata)
    # The user can still hand the class over explicitly.
    back = pybivi.ContrastiveBiVI.load(tmp_path / "m", adata, module_cls=ScaledPriorModule)
    assert torch.equal(back.module.log_prior_scale, model.module.log_prior_scale.detach())


def test_bad_module_arguments_are_named(make_adata):
    adata = make_adata(n_cells=16)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    with pytest.raises(TypeError, match="module_cls"):
        pybivi.ContrastiveBiVI(adata, module_cls=nn.Linear)
    with pytest.raises(ValueError, match="n_hidden"):
        pybivi.ContrastiveBiVI(adata, module_cls=ScaledPriorModule, module_kwargs={"n_hidden": 4})
    model = pybivi.ContrastiveBiVI(
        adata, n_hidden=8, module_cls=ScaledPriorModule, module_kwargs={"prior_scale": 2.0}
    )
    model._module_kwargs["not_json"] = object()
    with pytest.raises(ValueError, match="JSON"):
        model.save("unused-path-never-written")


def test_the_custom_module_goes_through_posterior_kinetic_tests_and_checks(custom):
    model, _ = custom
    idata = model.posterior(n_samples=3, indices=np.arange(12), seed=0)
    assert {"alpha", "mean_nascent", "z", "t"} <= set(idata.posterior.data_vars)
    assert np.isfinite(idata.posterior["alpha"].values).all()
    table = de.kinetic(
        model, groupby="perturbation", group="A", reference="control", n_samples=200,
        n_pairs=500,
    )
    assert set(table["group"]) == {"A"} and len(table) == model.registry.n_genes
    assert table.filter(like="_bayes_factor").notna().all().all()
    check = ppc.ppc(model, n_replicates=2, seed=0)
    assert check.summary["fraction_central_95"].between(0.0, 1.0).all()


def test_the_export_and_the_latents_use_the_custom_guide(custom):
    """The custom guide draws z around the encoder's mean + SHIFT: every consumer sees that."""
    model, _ = custom
    idx = np.arange(24)
    batch = next(model.make_batches(indices=idx, batch_size=24))
    model.module.eval()
    with torch.no_grad():
        loc, scale = (v.numpy() for v in model.module.encode(batch)["z"])
    n = 300
    post = model.posterior(
        indices=idx, n_samples=n, quantities=("mean_mature",), libraries=("observed",), seed=1
    ).posterior
    z = post["z"].values[0]
    # Monte Carlo: the mean of 300 draws within 4 standard errors of loc + SHIFT.
    assert np.all(np.abs(z.mean(0) - (loc + SHIFT)) < 4 * scale / np.sqrt(n))
    np.testing.assert_allclose(z.std(0), scale, rtol=0.2)
    state = torch.get_rng_state()
    mean = model.get_latent_representation(kind="background")[idx]
    assert torch.equal(torch.get_rng_state(), state)  # the mean draws nothing from the RNG
    np.testing.assert_allclose(mean, loc + SHIFT, rtol=1e-5, atol=1e-5)
    # The exported means decode the shifted draws: decoding one draw by hand agrees.
    with torch.no_grad():
        decoded = model.module.decode(
            torch.as_tensor(z[0]), torch.as_tensor(post["t"].values[0, 0]),
            batch["library_nascent"], batch["library_mature"],
        )
    exported = post["mean_mature"].values[0, 0, 0]
    np.testing.assert_allclose(exported, decoded["mu_mature"].numpy(), rtol=1e-5)
