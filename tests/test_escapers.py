"""Cells that escape their perturbation: mixture prior, responder probabilities, weighted
differential tests and the simulator's escapers."""

from __future__ import annotations

import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from sklearn.metrics import roc_auc_score

import pybivi
from pybivi import datasets
from pybivi.module import ContrastiveModule
from pybivi.tl import de


def _screen(escape_fraction=0.4, seed: int = 0, n_cells: int = 240, n_genes: int = 40):
    """Two strong programs, one perturbation each, no doublets: a planted screen."""
    return datasets.simulate_perturbseq(
        n_cells=n_cells, n_genes=n_genes, n_programs=2, seed=seed,
        perturbations_per_program=1, n_weak_perturbations=0, genes_per_program=n_genes // 5,
        effect_range=(2.0, 3.0), cell_cycle_fraction=0.1, doublet_fraction=0.0,
        program_kinds=["burst_size", "degradation"], control_fraction=0.34,
        escape_fraction=escape_fraction,
    )  # fmt: skip


def _batch(module: ContrastiveModule, n: int = 6) -> dict[str, torch.Tensor]:
    label = torch.arange(n) % module.n_labels
    return {
        "x_mature": torch.ones(n, module.n_genes),
        "x_nascent": torch.ones(n, module.n_genes),
        "label": label,
        "is_control": label == 0,
        "index": torch.arange(n),
    }


# ------------------------------------------------------------------ the prior
def test_mixture_prior_reduces_to_its_components_at_the_extreme_weights():
    torch.manual_seed(0)
    module = ContrastiveModule(5, 3, 10, n_salient=2, likelihood="nb", salient_prior="mixture")
    with torch.no_grad():
        module.salient_means.normal_()
    batch = _batch(module)
    t = torch.randn(6, 2)
    loc = module.salient_means[batch["label"]]
    control = batch["is_control"].unsqueeze(-1)
    for logit, centre in ((30.0, loc), (-30.0, torch.zeros_like(loc))):
        with torch.no_grad():
            module.responder_logits.fill_(logit)
        # Controls are escapers whatever the shares.
        centre = torch.where(control, torch.zeros_like(loc), centre)
        expected = dist.Normal(centre, 1.0).to_event(1).log_prob(t)
        got = module.salient_prior(batch).log_prob(t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_responder_probability_is_bayes_rule_and_zero_for_controls():
    torch.manual_seed(1)
    module = ContrastiveModule(5, 3, 10, n_salient=3, likelihood="nb", salient_prior="mixture")
    with torch.no_grad():
        module.salient_means.normal_()
        module.responder_logits.copy_(torch.tensor([0.0, 1.2, -0.7]))
    batch = _batch(module)
    t = torch.randn(4, 6, 3)
    label = batch["label"]
    w = torch.sigmoid(module.responder_logits[label])
    on = w * dist.Normal(module.salient_means[label], 1.0).to_event(1).log_prob(t).exp()
    off = (1 - w) * dist.Normal(torch.zeros(3), 1.0).to_event(1).log_prob(t).exp()
    expected = torch.where(batch["is_control"], torch.zeros_like(on), on / (on + off))
    torch.testing.assert_close(module.responder_probability(t, batch), expected)


def test_controls_are_certain_escapers_of_the_mixture_prior():
    from pyro import poutine

    torch.manual_seed(2)
    module = ContrastiveModule(5, 3, 10, n_salient=2, likelihood="nb", salient_prior="mixture")
    with torch.no_grad():
        module.salient_means.normal_()
        module.responder_logits.fill_(2.0)
    batch = _batch(module)
    batch["library_mature"] = torch.full((6,), 5.0)
    guide = poutine.trace(module.guide).get_trace(batch)
    model = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(batch)
    t, control = guide.nodes["t"]["value"], batch["is_control"]
    # Every cell's t enters the ELBO; a control's prior is the escaper component N(0, I) ...
    assert model.nodes["t"]["mask"] is True and guide.nodes["t"]["mask"] is True
    escaper = dist.Normal(torch.zeros(2), 1.0).to_event(1).log_prob(t)
    got = model.nodes["t"]["fn"].log_prob(t)
    torch.testing.assert_close(got[control], escaper[control], atol=1e-5, rtol=0)
    assert not torch.allclose(got[~control], escaper[~control])
    # ... and the decoder still sees t = 0 for controls.
    assert torch.all(model.nodes["salient"]["value"][control] == 0)
    # The paper's prior keeps the controls' t out of the ELBO.
    label = ContrastiveModule(5, 3, 10, n_salient=2, likelihood="nb")
    guide = poutine.trace(label.guide).get_trace(batch)
    assert torch.equal(guide.nodes["t"]["mask"], ~control)


def test_normal_prior_module_is_unchanged(make_adata):
    adata = make_adata()
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    model = pybivi.ContrastiveBiVI(adata, n_hidden=8, n_background=2, n_salient=2)
    assert model.salient_prior == "normal"
    assert model.module.salient_prior_kind == "label"
    assert not hasattr(model.module, "responder_logits")
    mixture = pybivi.ContrastiveBiVI(
        adata, n_hidden=8, n_background=2, n_salient=2, salient_prior="mixture"
    )
    extra = set(mixture.module.state_dict()) - set(model.module.state_dict())
    assert extra == {"responder_logits"}


# ------------------------------------------------------------ probabilities
def test_escapers_are_detected_on_a_planted_screen():
    adata = _screen()
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    model = pybivi.ContrastiveBiVI(
        adata, n_hidden=32, n_background=4, n_salient=2, salient_prior="mixture"
    )
    model.train(max_epochs=25, batch_size=64, lr=3e-3, progress_bar=False, device="cpu")
    prob = model.get_perturbation_probability(n_samples=10)
    control = (adata.obs["perturbation"] == "NT").to_numpy()
    assert prob.shape == (adata.n_obs,) and np.all(prob[control] == 0)
    assert np.all((prob >= 0) & (prob <= 1))
    auroc = roc_auc_score(adata.obs["responder"][~control], prob[~control])
    assert auroc > 0.8
    # The encoder places control cells near the escaper component's centre, 0, far closer
    # than the responders sit to theirs.
    with torch.no_grad():
        batch = next(model.make_batches(batch_size=adata.n_obs))
        loc = model.module.encode(batch)["t"][0].numpy()
    responders = adata.obs["responder"].to_numpy(bool) & ~control
    norm = np.linalg.norm(loc, axis=1)
    assert np.median(norm[control]) < 0.5 * np.median(norm[responders])
    # Rows follow indices: the controls among them get exactly 0, the others do not.
    rows = np.r_[np.flatnonzero(~control)[:3], np.flatnonzero(control)[:2]]
    some = model.get_perturbation_probability(indices=rows, n_samples=10)
    assert np.all(some[3:] == 0) and np.all(some[:3] > 0)


def test_save_and_load_keep_the_mixture_prior(make_adata, tmp_path):
    adata = make_adata()
    for cls in (pybivi.ContrastiveBiVI, pybivi.ContrastiveVI):
        cls.setup_anndata(adata)
        model = cls(adata, n_hidden=8, n_background=2, n_salient=2, salient_prior="mixture")
        with torch.no_grad():
            model.module.responder_logits.normal_()
            model.module.salient_means.normal_()
        path = tmp_path / cls.__name__
        model.save(path)
        back = cls.load(path, adata)
        assert back.salient_prior == "mixture"
        np.testing.assert_allclose(
            back.get_perturbation_probability(n_samples=4),
            model.get_perturbation_probability(n_samples=4),
        )


def test_errors(make_adata):
    adata = make_adata()
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="salient_prior"):
        pybivi.ContrastiveBiVI(adata, salient_prior="gaussian")
    model = pybivi.ContrastiveBiVI(adata, n_hidden=8, n_background=2, n_salient=2)
    with pytest.raises(ValueError, match="salient_prior='mixture'"):
        model.get_perturbation_probability()
    with pytest.raises(ValueError, match="salient_prior='mixture'"):
        de.mean(model, groupby="perturbation", reference="NT", responders=True)
    with pytest.raises(ValueError, match="not both"):
        de.mean(model, groupby="perturbation", reference="NT", weights=np.ones(40),
                responders=np.ones(40, bool))  # fmt: skip
    with pytest.raises(ValueError, match="one entry per cell"):
        de.mean(model, groupby="perturbation", reference="NT", weights=np.ones(39))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        de.mean(model, groupby="perturbation", reference="NT", weights=np.full(40, 1.5))
    with pytest.raises(ValueError, match="boolean"):
        de.mean(model, groupby="perturbation", reference="NT", responders=np.ones(40))
    no_a = (adata.obs["perturbation"] != "A").to_numpy()
    with pytest.raises(ValueError, match="no responders"):
        de.mean(model, groupby="perturbation", reference="NT", responders=no_a)
    with pytest.raises(ValueError, match="escape_fraction"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=20, escape_fraction=1.5)
    with pytest.raises(ValueError, match="unknown perturbation"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=20, escape_fraction={"TFX": 0.5})


# --------------------------------------------------------- differential tests
@pytest.fixture(scope="module")
def escaper_model():
    """An untrained model on a screen with half escapers (the observed tests need no fit)."""
    adata = _screen(escape_fraction=0.5, seed=3, n_cells=320)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    model = pybivi.ContrastiveBiVI(adata, n_hidden=8, n_background=2, n_salient=2)
    return adata, model


SMALL = dict(n_posterior=200, null_repeats=1, group=["TF1A", "TF2A"], reference="NT")


@pytest.mark.parametrize("estimate", ["observed", "decoded"])
def test_zero_one_weights_equal_the_test_on_the_subset(escaper_model, estimate):
    adata, model = escaper_model
    responder = adata.obs["responder"].to_numpy(bool)
    control = (adata.obs["perturbation"] == "NT").to_numpy()
    adata.obs["tested"] = np.where(responder | control, adata.obs["perturbation"], "escaped")
    options = dict(SMALL, estimate=estimate, n_draws=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        weighted = de.kinetic(model, groupby="perturbation", weights=responder.astype(float),
                              **options)  # fmt: skip
        masked = de.kinetic(model, groupby="perturbation", responders=responder, **options)
        subset = de.kinetic(model, groupby="tested", **options)
    numeric = weighted.select_dtypes("number").columns
    for table in (masked, weighted):
        np.testing.assert_allclose(table[numeric].to_numpy(), subset[numeric].to_numpy())
    pairs = dict(group=["TF1A"], reference="NT", method="pairs", n_samples=200)
    np.testing.assert_allclose(
        de.mean(model, groupby="perturbation", responders=responder, **pairs)["lfc_mean"],
        de.mean(model, groupby="tested", **pairs)["lfc_mean"],
    )


def test_unit_weights_change_nothing(escaper_model):
    adata, model = escaper_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = de.mean(model, groupby="perturbation", **SMALL)
        ones = de.mean(model, groupby="perturbation", weights=np.ones(adata.n_obs), **SMALL)
    np.testing.assert_allclose(plain["lfc_estimate"], ones["lfc_estimate"])
    np.testing.assert_allclose(plain["lfc_se"], ones["lfc_se"])


def test_escapers_dilute_the_fold_change_as_a_mixture_of_pseudobulks(escaper_model):
    adata, model = escaper_model
    responder = adata.obs["responder"].to_numpy(bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pooled = de.mean(model, groupby="perturbation", **SMALL)
        responders = de.mean(model, groupby="perturbation", responders=responder, **SMALL)
    truth = adata.varm["log2_b_change"] - adata.varm["log2_gamma_change"]  # mature mean
    for k, g in enumerate(SMALL["group"]):
        changed = np.abs(truth[:, k]) >= 2
        lfc_all = pooled[pooled["group"] == g]["lfc_estimate"].to_numpy()[changed]
        lfc_resp = responders[responders["group"] == g]["lfc_estimate"].to_numpy()[changed]
        assert np.all(np.abs(lfc_all) < np.abs(lfc_resp))
        # Half the cells sit at the controls' level: the pooled mean is the average of the
        # responders' and the controls' means.
        expected = np.log2(0.5 * 2.0**lfc_resp + 0.5)
        assert np.median(np.abs(lfc_all - expected)) < 0.25


# ------------------------------------------------------------------ simulator
def test_simulator_escape_fraction():
    base = datasets.simulate_perturbseq(n_cells=300, n_genes=40, seed=2)
    zero = datasets.simulate_perturbseq(n_cells=300, n_genes=40, seed=2, escape_fraction=0.0)
    assert "responder" not in zero.obs and "escape_fraction" not in zero.uns["simulation"]
    assert (base.layers["spliced"] != zero.layers["spliced"]).nnz == 0
    assert (base.layers["unspliced"] != zero.layers["unspliced"]).nnz == 0
    some = datasets.simulate_perturbseq(
        n_cells=300, n_genes=40, seed=2, escape_fraction={"TF1A": 0.5, "TF2B": 1.0}
    )
    obs = some.obs[~some.obs["doublet"]]
    assert (obs["perturbation"] == base.obs["perturbation"][obs.index]).all()
    share = obs.groupby("perturbation", observed=True)["responder"].mean()
    assert share["NT"] == 0.0 and share["TF2B"] == 0.0 and share["TF1B"] == 1.0
    n_tf1a = int((obs["perturbation"] == "TF1A").sum())
    assert abs(share["TF1A"] * n_tf1a - n_tf1a / 2) <= 1  # round(0.5 n) of the drawn cells
    assert some.uns["simulation"]["escape_fraction"] == {"TF1A": 0.5, "TF2B": 1.0}
