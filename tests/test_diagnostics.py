"""Domain diagnostics of bursty models: planted out-of-domain pairs, one warning per model."""

from __future__ import annotations

import warnings

import pytest
import torch

import pybivi
from pybivi.cme import load_default_approximator
from pybivi.cme.approximator import DEFAULT_WEIGHTS, load_approximator
from pybivi.cme.domain import STATE_CAP
from pybivi.cme.regions import DOMAIN_REGIONS, domain_regions

torch.set_num_threads(1)

# Planted kinetic regimes, one per gene group: (mu_nascent, mu_mature, theta) with
# b = mu_N / theta, beta = 1 / theta, gamma = mu_N / (theta mu_M).
PLANTED = {
    "small_burst": (1.0, 1.0, 1e8),  # b = 1e-8
    "clamped_b": (10.0, 10.0, 1e-3),  # b = 1e4 (beta = 1e3 too: b takes priority)
    "clamped_rates": (10.0, 10.0, 1e3),  # b = 1e-2, beta = 1e-3 < 1e-2
    "state_cap": (500.0, 1000.0, 1.0),  # b = 500, mean 500 + 10 sd (about 5000) > cap
    "inside": (5.0, 10.0, 1.0),  # b = 5, beta = 1, gamma = 0.5
}
GROUPS = {"small_burst": [0, 1], "clamped_b": [2], "clamped_rates": [3, 4, 5],
          "state_cap": [6], "inside": [7, 8, 9, 10, 11]}
HUGE_CELLS = [3, 17, 30]  # cells whose nascent count of gene 8 (an 'inside' gene) is > cap


def _planted_model(make_adata, cls=pybivi.BiVI, backend="neural"):
    adata = make_adata(n_cells=40, n_genes=12)
    nascent = adata.layers["unspliced"]
    nascent[HUGE_CELLS, 8] = STATE_CAP + 1000
    cls.setup_anndata(adata, **({} if cls is pybivi.ContrastiveBiVI else
                               {"perturbation_key": None}))
    model = cls(adata, n_hidden=8, scheme=pybivi.schemes.BurstyScheme(backend), seed=0)
    mu_n, mu_m, theta = (torch.zeros(12) for _ in range(3))
    for region, genes in GROUPS.items():
        for j, value in enumerate(PLANTED[region]):
            (mu_n, mu_m, theta)[j][genes] = value
    with torch.no_grad():
        model.module.log_theta.copy_(theta.log())

    def planted_decode(z, t, library_nascent, library_mature):
        shape = (*z.shape[:-1], 12)
        # mu independent of the latent and the library: the regions are known exactly
        return {"mu_nascent": mu_n.expand(shape) + 0.0 * z.sum(-1, keepdim=True),
                "mu_mature": mu_m.expand(shape) + 0.0 * z.sum(-1, keepdim=True)}

    model.module.decode = planted_decode
    return model, adata


@pytest.mark.parametrize("cls", [pybivi.BiVI, pybivi.ContrastiveBiVI])
def test_planted_out_of_domain_pairs_give_the_right_shares(make_adata, cls):
    model, adata = _planted_model(make_adata, cls)
    table = model.diagnostics()
    n_cells, n_pairs = adata.n_obs, adata.n_obs * adata.n_vars
    expected = {r: len(GROUPS[r]) * n_cells for r in DOMAIN_REGIONS}
    expected["state_cap"] += len(HUGE_CELLS)
    for region in DOMAIN_REGIONS:
        assert table.loc[region, "pairs"] == expected[region], region
        assert table.loc[region, "share"] == pytest.approx(expected[region] / n_pairs)
    assert table.loc["outside", "pairs"] == sum(expected.values())
    assert table.loc["state_cap", "genes"] == 2 and table.loc["clamped_rates", "genes"] == 3
    by_gene = model.diagnostics(by="gene")
    assert by_gene.loc["g8", "state_cap"] == pytest.approx(len(HUGE_CELLS) / n_cells)
    assert by_gene.loc["g0", "small_burst"] == 1.0 and by_gene.loc["g9", "outside"] == 0.0


def test_regions_match_the_approximators_own_tally(make_adata):
    """Disjoint masks whose union is what the approximator counts as outside its domain."""
    gen = torch.Generator().manual_seed(0)
    size = 4000
    logs = [torch.empty(size).uniform_(lo, hi, generator=gen) for lo, hi in
            ((-5, 5), (-3, 3), (-4, 3))]
    b, beta, gamma = (10.0 ** x for x in logs)
    n = torch.randint(0, 3000, (size,), generator=gen).double()
    masks = domain_regions(n, b, beta, gamma)
    stacked = torch.stack([masks[r] for r in (*DOMAIN_REGIONS, "inside")]).long()
    assert torch.all(stacked.sum(0) == 1)  # each pair in exactly one region
    assert torch.equal(masks["small_burst"], b < 1e-3)
    approx = load_default_approximator()
    outside, small = approx._count_outside(n.float(), b.float(), beta.float(), gamma.float())
    assert small == int(masks["small_burst"].sum())
    assert abs(outside - int((~masks["inside"]).sum())) <= 2  # float32 at the boundaries


def test_each_model_warns_once_and_the_approximator_keeps_its_warning(make_adata):
    shared = load_approximator(DEFAULT_WEIGHTS)  # a fresh copy: nothing warned yet
    for seed in (0, 1):
        model, _ = _planted_model(make_adata, backend=shared)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train(max_epochs=1, batch_size=16, progress_bar=False, seed=seed)
            model.train(max_epochs=1, batch_size=16, progress_bar=False, seed=seed)
        ours = [w for w in caught if "once per model" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "small_burst" in str(ours[0].message)
        assert model.training_diagnostics.loc["outside", "share"] > 0.5
    # training counted the pairs but left the approximator's own warning to direct users
    assert shared.outside_count > 0 and not shared._warned
    with pytest.warns(UserWarning, match="outside the approximator's domain"):
        shared.log_prob_mature_given_nascent(
            torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1e-5]),
            torch.tensor([1.0]), torch.tensor([1.0])
        )


def test_models_without_the_approximator_get_an_empty_table(make_adata):
    adata = make_adata(n_cells=16)
    pybivi.SCVI.setup_anndata(adata, perturbation_key=None)
    model = pybivi.SCVI(adata, n_hidden=8)
    assert model.diagnostics().empty
    pybivi.BiVI.setup_anndata(adata, perturbation_key=None)
    model = pybivi.BiVI(adata, n_hidden=8, scheme="constitutive")
    assert model.diagnostics().empty
    with pytest.raises(ValueError, match="by must be"):
        model.diagnostics(by="cell")
