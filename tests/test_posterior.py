"""Posterior export to ArviZ: structure, the paper's identities, Monte Carlo checks, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pybivi import datasets, posterior, schemes
from pybivi.models import SCVI, ContrastiveBiVI
from pybivi.schemes.extrinsic import ExtrinsicScheme


@pytest.fixture(scope="module")
def adata():
    torch.set_num_threads(1)
    return datasets.simulate_perturbseq(
        n_cells=240, n_genes=30, n_programs=2, seed=0, genes_per_program=6
    )


@pytest.fixture(scope="module")
def fitted(adata):
    a = adata.copy()
    ContrastiveBiVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    model = ContrastiveBiVI(a, scheme="extrinsic", n_hidden=32, seed=1)
    model.train(max_epochs=4, batch_size=64, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def bursty(adata):
    # Untrained is enough: the export only decodes; kinetic maps are those of the scheme.
    a = adata.copy()
    ContrastiveBiVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    return ContrastiveBiVI(a, scheme="bursty", n_hidden=16, seed=2)


def test_bursty_export_satisfies_the_paper_identities(bursty):
    idata = posterior.posterior(bursty, n_samples=3, indices=np.arange(50))
    post = idata.posterior
    for name in ("burst_size", "splicing_rate", "degradation_rate", "mean_nascent", "mean_mature"):
        assert post[name].dims == ("chain", "draw", "library", "cell", "gene")
    theta = idata.constant_data["theta"]
    mu_n, mu_m = post["mean_nascent"], post["mean_mature"]
    # Paper equation 3: b = mu_N / theta, beta/k = 1 / theta, gamma/k = mu_N / (theta mu_M).
    np.testing.assert_allclose(post["burst_size"], mu_n / theta, rtol=1e-5)
    np.testing.assert_allclose(post["splicing_rate"], (1 / theta).broadcast_like(mu_n), rtol=1e-5)
    np.testing.assert_allclose(post["degradation_rate"], mu_n / (theta * mu_m), rtol=1e-5)
    # Reference library: the same frequencies rho, scaled by the median training library.
    const = idata.constant_data
    ref = post["mean_mature"].sel(library="reference") / const["reference_library_mature"]
    obs = post["mean_mature"].sel(library="observed") / const["library_mature"]
    np.testing.assert_allclose(ref, obs, rtol=1e-4)
    np.testing.assert_allclose(ref.sum("gene"), 1.0, rtol=1e-4)  # rho sums to 1
    lib = np.asarray(bursty.adata.layers["spliced"][:50].sum(1)).ravel()
    np.testing.assert_allclose(const["library_mature"], lib)


def test_controls_have_zero_salient_and_draws_follow_the_guide(fitted):
    idx = np.arange(40)
    idata = posterior.posterior(fitted, indices=idx, n_samples=400, quantities=())
    t = idata.posterior["t"].values[0]
    ctrl = idata.constant_data["is_control"].values
    assert ctrl.any() and (~ctrl).any()
    assert np.all(t[:, ctrl] == 0) and np.all(t[:, ~ctrl] != 0)
    batch = next(fitted.make_batches(indices=idx, batch_size=40))
    fitted.module.eval()
    with torch.no_grad():
        loc, scale = (v.numpy() for v in fitted.module.encode(batch)["z"])
    z = idata.posterior["z"].values[0]
    # Monte Carlo: 400 draws, mean within 4 standard errors, sd within 15%.
    assert np.all(np.abs(z.mean(0) - loc) < 4 * scale / np.sqrt(400))
    np.testing.assert_allclose(z.std(0), scale, rtol=0.15)


def test_posterior_predictive_mean_matches_decoded_mean(fitted):
    idata = posterior.posterior(
        fitted, n_samples=6, posterior_predictive=True, libraries=("observed",), seed=3
    )
    x = idata.posterior_predictive["x"]
    assert x.dims == ("chain", "draw", "cell", "gene", "species")
    assert np.all(x.values >= 0) and np.all(x.values == np.round(x.values))
    # E[x | draw] = (mu_N, mu_M): pooled over 240 cells x 6 draws the totals agree.
    mu_n = idata.posterior["mean_nascent"].sel(library="observed").sum(("draw", "cell"))
    mu_m = idata.posterior["mean_mature"].sel(library="observed").sum(("draw", "cell"))
    rep = x.sum(("draw", "cell"))
    for mu, species in ((mu_n, "nascent"), (mu_m, "mature")):
        total, expected = float(rep.sel(species=species).sum()), float(mu.sum())
        assert abs(total / expected - 1) < 0.03
    obs = idata.observed_data["x"].sel(species="mature")
    np.testing.assert_array_equal(obs.values, fitted.adata.layers["spliced"].toarray())


def test_selection_coords_and_netcdf_round_trip(fitted, tmp_path):
    gene = fitted.registry.var_names[3]
    idata = posterior.posterior(
        fitted,
        n_samples=2,
        groupby="program",
        groups=["control", "program1"],
        max_cells_per_group=10,
        genes=[gene, fitted.registry.var_names[0]],
        seed=4,
    )
    assert idata.posterior.sizes["cell"] == 20
    groups = idata.constant_data["program"].values
    assert sorted(set(groups)) == ["control", "program1"]
    b = idata.posterior["alpha"].sel(gene=gene, library="reference")
    assert b.dims == ("chain", "draw", "cell")
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    import arviz as az

    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["alpha"].values, idata.posterior["alpha"].values)
    assert list(back.posterior["gene"].values) == [gene, fitted.registry.var_names[0]]
    assert list(back.constant_data["label"].values) == list(idata.constant_data["label"].values)


def test_seeded(fitted):
    a = posterior.posterior(fitted, indices=[0, 1], n_samples=3, seed=7)
    b = posterior.posterior(fitted, indices=[0, 1], n_samples=3, seed=7)
    state = torch.get_rng_state()
    c = posterior.posterior(fitted, indices=[0, 1], n_samples=3, seed=8)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    np.testing.assert_array_equal(a.posterior["z"].values, b.posterior["z"].values)
    assert not np.array_equal(a.posterior["z"].values, c.posterior["z"].values)


class _RenamedScheme(ExtrinsicScheme):
    """A user scheme: the extrinsic law with its own parameter names."""

    name = "test_renamed_extrinsic"
    kinetic_param_names = ("gamma_shape", "nascent_turnover")

    def kinetic_params(self, mu_nascent, mu_mature, theta):
        base = super().kinetic_params(mu_nascent, mu_mature, theta)
        return {"gamma_shape": base["alpha"], "nascent_turnover": base["splicing_rate"]}


def test_user_scheme_exports_its_own_names(adata):
    scheme = schemes.register(_RenamedScheme(), overwrite=True)
    a = adata.copy()
    ContrastiveBiVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    model = ContrastiveBiVI(a, scheme=scheme, n_hidden=8)
    idata = posterior.posterior(model, indices=np.arange(5), n_samples=2)
    names = set(idata.posterior.data_vars)
    assert {"gamma_shape", "nascent_turnover"} <= names and "alpha" not in names
    theta = idata.constant_data["theta"]
    np.testing.assert_allclose(
        idata.posterior["nascent_turnover"],
        1 / (idata.posterior["mean_nascent"] / theta),
        rtol=1e-5,
    )


def test_mature_only_model(adata):
    a = adata.copy()
    SCVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    model = SCVI(a, n_hidden=8)
    idata = posterior.posterior(model, indices=np.arange(8), n_samples=2, posterior_predictive=True)
    assert set(idata.posterior.data_vars) == {"mean_mature", "z"}
    assert idata.observed_data["x_mature"].dims == ("cell", "gene")
    assert idata.posterior_predictive["x_mature"].dims == ("chain", "draw", "cell", "gene")


def test_bad_input(fitted):
    with pytest.raises(KeyError, match="genes not in the model"):
        posterior.posterior(fitted, genes=["nope"])
    with pytest.raises(KeyError, match="groupby"):
        posterior.posterior(fitted, groupby="nope")
    with pytest.raises(ValueError, match="groups"):
        posterior.posterior(fitted, groupby="program", groups=["nope"])
    with pytest.raises(KeyError, match="not available"):
        posterior.posterior(fitted, quantities=["burst_size"])
    with pytest.raises(ValueError, match="indices"):
        posterior.posterior(fitted, indices=[10_000])
    with pytest.raises(ValueError, match="n_samples"):
        posterior.posterior(fitted, n_samples=0)


def test_model_method_is_the_posterior_function(fitted):
    """``model.posterior(...)`` gives the same seeded draws as ``pybivi.posterior.posterior``."""
    genes = list(fitted.adata.var_names[:5])
    kwargs = dict(indices=np.arange(12), n_samples=4, seed=3, genes=genes)
    by_method = fitted.posterior(**kwargs)
    by_function = posterior.posterior(fitted, **kwargs)
    for name in ("z", "t", "burst_size" if "burst_size" in by_method.posterior else "mean_mature"):
        np.testing.assert_array_equal(by_method.posterior[name], by_function.posterior[name])
    # The draws are random (not a deterministic function of the seed alone): a new seed differs.
    other = fitted.posterior(**{**kwargs, "seed": 4})
    assert not np.array_equal(other.posterior["z"], by_method.posterior["z"])


def test_predictive_returns_the_model_deterministic_sites_by_name(bursty):
    """Derived quantities are sites of the model: Predictive returns them, and they obey the
    scheme's maps, the library scaling and the control rule."""
    from pyro.infer import Predictive

    module = bursty.module
    ref = bursty.registry.reference_library
    batch = next(bursty.make_batches(indices=np.arange(32), batch_size=32))
    batch = {**batch, "reference_library_nascent": torch.tensor(ref["nascent"]),
             "reference_library_mature": torch.tensor(ref["mature"])}
    kinetic = list(module.scheme.kinetic_param_names)
    names = ["salient", "mean_nascent", "mean_mature", "rho_nascent", "rho_mature", *kinetic,
             *[f"{k}_reference" for k in ("mean_nascent", "mean_mature", *kinetic)]]
    module.eval()
    with torch.no_grad():
        out = Predictive(module.model, guide=module.guide, num_samples=4, return_sites=names)(
            batch
        )
    assert set(names) <= set(out)
    theta = module.theta.detach()
    for suffix, lib_n, lib_m in (
        ("", batch["library_nascent"][:, None], batch["library_mature"][:, None]),
        ("_reference", ref["nascent"], ref["mature"]),
    ):
        mu_n, mu_m = out[f"mean_nascent{suffix}"], out[f"mean_mature{suffix}"]
        assert mu_n.shape == (4, 32, bursty.registry.n_genes)
        torch.testing.assert_close(mu_n, lib_n * out["rho_nascent"])
        torch.testing.assert_close(mu_m, lib_m * out["rho_mature"])
        torch.testing.assert_close(out[f"burst_size{suffix}"], mu_n / theta)
        torch.testing.assert_close(out[f"splicing_rate{suffix}"], (1 / theta).expand_as(mu_n))
        torch.testing.assert_close(out[f"degradation_rate{suffix}"], mu_n / (theta * mu_m))
    control = batch["is_control"]
    assert control.any() and (~control).any()
    salient = out["salient"]
    assert torch.all(salient[:, control] == 0) and torch.all(salient[:, ~control] != 0)

