"""The Pyro model and guide (pybivi.module): bound, control masking, warm-up, Pyro interop."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pybivi import data
from pybivi.module import ContrastiveModule

torch.set_num_threads(1)


def extrinsic_log_prob(n, m, m1, m2, a):
    """The closed form of the extrinsic (bivariate NB) law, written independently."""
    lg = torch.lgamma
    return (
        a * torch.log(a) - (a + n + m) * torch.log(a + m1 + m2) + n * torch.log(m1)
        + m * torch.log(m2) + lg(n + m + a) - lg(a) - lg(n + 1) - lg(m + 1)
    )


@pytest.fixture
def make_module(make_adata):
    """Factory: ``build(n_salient, likelihood, n_cells)``: a module in eval mode, its cells."""

    def build(n_salient=3, likelihood="cme", n_cells=40):
        adata = make_adata(n_cells=n_cells)
        data.setup_anndata(adata, use_nascent=likelihood == "cme")
        reg = data.make_registry(adata)
        torch.manual_seed(0)
        module = ContrastiveModule(
            reg.n_genes, len(reg.labels), reg.n_cells, n_background=4, n_salient=n_salient,
            n_hidden=16, likelihood=likelihood, scheme="extrinsic",
        )
        with torch.no_grad():  # non-trivial label means and theta, so every term is exercised
            module.salient_means.normal_()
            module.log_theta.normal_(0.0, 0.5)
        module.eval()  # deterministic encoders (no dropout, running batch-norm statistics)
        return module, data.CellData(adata, reg)

    return build


def num(x: torch.Tensor) -> float:
    return float(x.detach())


def mean_field_loss(module, batch, kl_weight=1.0, seed=0):
    pyro.set_rng_seed(seed)
    return TraceMeanField_ELBO().differentiable_loss(module.model, module.guide, batch, kl_weight)


def manual_loss(module, batch, kl_weight=1.0, seed=0):
    """Negative ELBO of paper eqs. (4)-(5), scaled by n_cells / B, from the guide's draws."""
    pyro.set_rng_seed(seed)  # same draws as mean_field_loss: the guide samples z then t
    guide = poutine.trace(module.guide).get_trace(batch, kl_weight)
    control = batch["is_control"]
    enc = module.encode(batch)
    t = None
    if module.n_salient:
        t = torch.where(control[:, None], 0.0, guide.nodes["t"]["value"])
    dec = module.decode(guide.nodes["z"]["value"], t, batch["library_nascent"],
                        batch["library_mature"])
    theta = module.theta
    loglik = extrinsic_log_prob(batch["x_nascent"], batch["x_mature"], dec["mu_nascent"],
                                dec["mu_mature"], theta).sum(-1)
    qz = torch.distributions.Normal(*enc["z"])
    kl = kl_divergence(qz, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    if module.n_salient:
        prior_t = torch.distributions.Normal(module.salient_means[batch["label"]], 1.0)
        kl_t = kl_divergence(torch.distributions.Normal(*enc["t"]), prior_t).sum(-1)
        kl = kl + torch.where(control, 0.0, kl_t)  # controls: t = 0, no KL (eq. 5)
    scale = module.n_cells / len(batch["index"])
    return scale * (-loglik.sum() + kl_weight * kl.sum())


def test_mean_field_bound_matches_the_paper_equations(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(12))  # controls and perturbed cells mixed
    assert batch["is_control"].any() and (~batch["is_control"]).any()
    expected = manual_loss(module, batch)
    assert num(mean_field_loss(module, batch)) == pytest.approx(num(expected), rel=1e-5)


def test_trace_elbo_masks_t_in_model_and_guide(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(12))
    pyro.set_rng_seed(1)
    guide = poutine.trace(module.guide).get_trace(batch)
    model = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(batch)
    for tr in (guide, model):
        assert torch.equal(tr.nodes["t"]["mask"], ~batch["is_control"])
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().differentiable_loss(module.model, module.guide, batch)
    control = batch["is_control"]
    z, t = guide.nodes["z"], guide.nodes["t"]
    enc = module.encode(batch)
    dec = module.decode(z["value"], torch.where(control[:, None], 0.0, t["value"]),
                        batch["library_nascent"], batch["library_mature"])
    loglik = extrinsic_log_prob(batch["x_nascent"], batch["x_mature"], dec["mu_nascent"],
                                dec["mu_mature"], module.theta).sum(-1)
    log_qz = dist.Normal(*enc["z"]).log_prob(z["value"]).sum(-1)
    log_pz = dist.Normal(0.0, 1.0).log_prob(z["value"]).sum(-1)
    log_qt = dist.Normal(*enc["t"]).log_prob(t["value"]).sum(-1)
    log_pt = dist.Normal(module.salient_means[batch["label"]], 1.0).log_prob(t["value"]).sum(-1)
    per_cell = -loglik + log_qz - log_pz + torch.where(control, 0.0, log_qt - log_pt)
    expected = module.n_cells / len(batch["index"]) * per_cell.sum()
    assert num(loss) == pytest.approx(num(expected), rel=1e-5)


def test_control_loss_ignores_the_salient_encoder(make_module):
    module, cells = make_module()
    labels = cells.is_control
    controls, perturbed = np.flatnonzero(labels)[:6], np.flatnonzero(~labels)[:6]
    before = {k: num(mean_field_loss(module, cells.batch(i))) for k, i in
              (("control", controls), ("perturbed", perturbed))}
    with torch.no_grad():  # change what q(t | x) outputs
        module.t_encoder.loc.bias.add_(3.0)
        module.t_encoder.raw_scale.bias.sub_(2.0)
    after = {k: num(mean_field_loss(module, cells.batch(i))) for k, i in
             (("control", controls), ("perturbed", perturbed))}
    assert after["control"] == before["control"]
    assert abs(after["perturbed"] - before["perturbed"]) > 1e-3 * abs(before["perturbed"])
    # and no gradient reaches the salient encoder or the label means from controls
    module.zero_grad()
    mean_field_loss(module, cells.batch(controls)).backward()
    for p in [*module.t_encoder.parameters(), module.salient_means]:
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_kl_warmup_scales_only_the_latent_terms(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(16))
    losses = [num(mean_field_loss(module, batch, w)) for w in (0.01, 0.5, 1.0)]
    # L(w) = reconstruction + w * KL: linear in w with slope the analytic KL
    kl = num(manual_loss(module, batch, 1.0)) - num(manual_loss(module, batch, 1e-30))
    assert (losses[2] - losses[1]) / 0.5 == pytest.approx(kl, rel=1e-4)
    assert (losses[1] - losses[0]) / 0.49 == pytest.approx(kl, rel=1e-4)
    assert kl > 0


def test_plate_scales_a_minibatch_to_the_full_data(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(8))
    tr = poutine.trace(module.model).get_trace(batch)
    assert tr.nodes["x"]["scale"] == pytest.approx(module.n_cells / 8)
    assert tr.nodes["cells"]["value"].tolist() == list(range(8))
    assert tr.nodes["x"]["fn"].event_shape == (12, 2)  # genes x (nascent, mature)


def test_decoder_frequencies_and_library_broadcasting(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(5))
    z, t = torch.randn(2, 5, 4), torch.randn(5, 3)
    libs = torch.tensor([[10.0] * 5, [20.0] * 5])
    out = module.decode(z, t, libs, 7.0)
    for s in ("nascent", "mature"):
        torch.testing.assert_close(out[f"rho_{s}"].sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(out["mu_nascent"], libs[..., None] * out["rho_nascent"])
    torch.testing.assert_close(out["mu_mature"], 7.0 * out["rho_mature"])
    # t = None decodes like t = 0
    torch.testing.assert_close(module.decode(z, None, 1.0, 1.0)["rho_mature"],
                               module.decode(z, torch.zeros(5, 3), 1.0, 1.0)["rho_mature"])
    assert (module.theta > 0).all() and module.theta.shape == (batch["x_mature"].shape[1],)


def test_predictive_samples_counts_and_latents(make_module):
    module, cells = make_module()
    batch = cells.batch(np.arange(6))
    for parallel in (False, True):
        pred = Predictive(module.model, guide=module.guide, num_samples=3, parallel=parallel)
        out = pred(batch, observe=False)
        x = out["x"]
        assert x.shape == (3, 6, 12, 2)
        assert (x >= 0).all() and torch.equal(x, x.round())
        assert out["z"].shape == (3, 6, 4)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_mature_only_modules(make_module, likelihood):
    module, cells = make_module(n_salient=0, likelihood=likelihood)
    batch = cells.batch(np.arange(8))
    assert "x_nascent" not in batch and module.scheme is None
    tr = poutine.trace(module.model).get_trace(batch)
    assert "x_mature" in tr.nodes and "t" not in tr.nodes
    dec = module.decode(torch.zeros(8, 4), None, None, batch["library_mature"])
    assert ("zi_logits" in dec) == (likelihood == "zinb") and "mu_nascent" not in dec
    assert set(module.encode(batch)) == {"z"}
    # the NB term matches its closed form (ZINB adds the gate)
    mu, theta, x = dec["mu_mature"], module.theta, batch["x_mature"]
    nb = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
          + theta * torch.log(theta / (theta + mu)) + x * torch.log(mu / (theta + mu)))
    if likelihood == "zinb":
        pi = torch.sigmoid(dec["zi_logits"])
        nb = torch.where(x == 0, torch.log(pi + (1 - pi) * nb.exp()), torch.log1p(-pi) + nb)
    torch.testing.assert_close(module.likelihood_dist(dec).log_prob(x), nb.sum(-1),
                               rtol=1e-4, atol=1e-3)


def test_a_subclass_replaces_the_prior_without_copying_the_model(make_module):
    class WidePrior(ContrastiveModule):
        def background_prior(self, batch):
            loc = batch["x_mature"].new_zeros(len(batch["index"]), self.n_background)
            return dist.Normal(loc, 2.0 * torch.ones_like(loc)).to_event(1)

    module, cells = make_module(n_salient=0)
    wide = WidePrior(12, 3, 40, n_background=4, n_salient=0, n_hidden=16, scheme="extrinsic")
    wide.load_state_dict(module.state_dict())
    wide.eval()
    batch = cells.batch(np.arange(10))
    enc = module.encode(batch)["z"]
    q = torch.distributions.Normal(*enc)
    delta_kl = (kl_divergence(q, torch.distributions.Normal(0.0, 2.0))
                - kl_divergence(q, torch.distributions.Normal(0.0, 1.0))).sum()
    diff = mean_field_loss(wide, batch) - mean_field_loss(module, batch)
    assert num(diff) == pytest.approx(num(delta_kl) * 40 / 10, rel=1e-4)


def test_bad_arguments_are_refused(make_module):
    with pytest.raises(ValueError, match="likelihood"):
        ContrastiveModule(5, 2, 10, likelihood="poisson")
    with pytest.raises(ValueError, match="salient_prior"):
        ContrastiveModule(5, 2, 10, salient_prior="flat")
    module, cells = make_module()
    batch = cells.batch(np.arange(4))
    batch["label"][1] = -1  # a perturbed cell with an unseen label
    with pytest.raises(ValueError, match="label"):
        module.model(batch)


def test_a_subclass_replaces_the_likelihood(make_module):
    class Poissons(ContrastiveModule):
        def likelihood_dist(self, decoded):
            rates = torch.stack([decoded["mu_nascent"], decoded["mu_mature"]], dim=-1)
            return dist.Poisson(rates).to_event(2)

    module, cells = make_module()
    pois = Poissons(12, 3, 40, n_background=4, n_salient=3, n_hidden=16, scheme="extrinsic")
    pois.load_state_dict(module.state_dict())
    pois.eval()
    batch = cells.batch(np.arange(10))
    pyro.set_rng_seed(0)
    guide = poutine.trace(pois.guide).get_trace(batch)
    model = poutine.trace(poutine.replay(pois.model, trace=guide)).get_trace(batch)
    t = torch.where(batch["is_control"][:, None], 0.0, guide.nodes["t"]["value"])
    dec = pois.decode(guide.nodes["z"]["value"], t, batch["library_nascent"],
                      batch["library_mature"])
    x = torch.stack([batch["x_nascent"], batch["x_mature"]], -1)
    rate = torch.stack([dec["mu_nascent"], dec["mu_mature"]], -1)
    expected = (x * rate.log() - rate - torch.lgamma(x + 1)).sum((-1, -2))
    torch.testing.assert_close(model.nodes["x"]["fn"].log_prob(x), expected, rtol=1e-5, atol=1e-3)


def test_plain_pyro_svi_trains_the_module(make_module):
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pybivi.training import forget_params

    module, cells = make_module()
    module.train()
    batch = cells.batch(np.arange(40))
    svi = SVI(module.model, module.guide, Adam({"lr": 0.05}), TraceMeanField_ELBO())
    theta0 = module.log_theta.detach().clone()
    losses = [svi.step(batch) for _ in range(30)]
    assert not torch.equal(theta0, module.log_theta.detach())  # Pyro's optimiser moved them
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    forget_params(module)
    assert not any(k.startswith(module.pyro_name) for k in pyro.get_param_store().keys())
