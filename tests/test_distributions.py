"""Pyro distributions: shapes, expand, support, validation, gradients, normalisation, GOF.

In the style of Pyro's own distribution tests: every claim is checked against an
independent fact (closed-form moments, SciPy's pmfs, a Monte Carlo goodness of fit).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import scipy.stats
import torch
from pyro.distributions.testing.gof import multinomial_goodness_of_fit

from pybivi import schemes
from pybivi.distributions import BivariateCME, NegativeBinomial, ZeroInflatedNegativeBinomial

TEST_FAILURE_RATE = 1e-3
CLOSED_FORM = ["constitutive", "extrinsic"]


def grid_log_prob(d: BivariateCME, size: int) -> torch.Tensor:
    """``d.log_prob`` over ``[0, size)^2`` for a scalar-batch ``d``: shape (size, size)."""
    n, m = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    value = torch.stack([n, m], -1).to(d.mu_nascent.dtype)
    return d.log_prob(value)


def pooled_gof(probs: np.ndarray, draws: np.ndarray, total: int, min_expected: float = 20.0):
    """Pearson p-value; ``probs``/``draws`` index the same cells, small ones pooled."""
    keep = probs * total >= min_expected
    p = np.append(probs[keep], max(1.0 - probs[keep].sum(), 0.0))
    c = np.append(draws[keep], total - draws[keep].sum())
    return multinomial_goodness_of_fit(torch.tensor(p), torch.tensor(c))


def pair_histogram(draws: torch.Tensor, size: int) -> np.ndarray:
    hist = np.zeros((size, size))
    x = draws.long().numpy()
    inside = (x[:, 0] < size) & (x[:, 1] < size)
    np.add.at(hist, (x[inside, 0], x[inside, 1]), 1.0)
    return hist


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("scheme", CLOSED_FORM + ["bursty"])
def test_shapes_and_broadcasting(scheme):
    mu_n = torch.tensor([1.0, 2.0, 3.0])
    mu_m = torch.tensor([[2.0], [4.0]])
    d = BivariateCME(mu_n, mu_m, torch.tensor(0.7), scheme=scheme)
    assert d.batch_shape == (2, 3) and d.event_shape == (2,)
    assert d.mean.shape == d.variance.shape == (2, 3, 2)
    torch.testing.assert_close(d.mean[..., 0], mu_n.expand(2, 3))
    torch.testing.assert_close(d.mean[..., 1], mu_m.expand(2, 3))
    x = d.sample((4,))
    assert x.shape == (4, 2, 3, 2) and x.dtype == mu_n.dtype
    assert bool(d.support.check(x).all())
    if scheme != "bursty":  # the default bursty backend is the (separate) neural one
        assert d.log_prob(x).shape == (4, 2, 3)
        assert d.log_prob(x[0, 0, 0]).shape == (2, 3)


@pytest.mark.parametrize("scheme", CLOSED_FORM)
def test_expand_keeps_scheme_and_values(scheme):
    obj = schemes.get(scheme)
    d = BivariateCME(torch.tensor([1.0, 5.0]), 3.0, torch.tensor([0.5, 2.0]), scheme=obj)
    e = d.expand((4, 2))
    assert e.batch_shape == (4, 2) and e.scheme is obj
    value = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(e.log_prob(value), d.log_prob(value).expand(4, 2))
    assert e.sample().shape == (4, 2, 2)
    with pytest.raises(ValueError):
        d.expand((3,))


def test_expand_keeps_bursty_backend():
    scheme = schemes.get("bursty", backend="exact")
    d = BivariateCME(2.0, 3.0, 1.0, scheme=scheme).expand((5,))
    assert d.scheme is scheme and d.batch_shape == (5,)


def test_support_rejects_non_counts():
    d = BivariateCME(1.0, 1.0, 1.0, scheme="extrinsic")
    values = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.5, 2.0]])
    assert d.support.check(values).tolist() == [True, False, False]


def test_pyro_plate_and_trace():
    mu_n = torch.rand(6, 3) + 0.5
    mu_m = torch.rand(6, 3) + 0.5
    theta = torch.rand(3) + 0.5
    obs = BivariateCME(mu_n, mu_m, theta, scheme="extrinsic").sample()

    def model():
        with pyro.plate("cells", 6):
            pyro.sample(
                "x", BivariateCME(mu_n, mu_m, theta, scheme="extrinsic").to_event(1), obs=obs
            )

    trace = poutine.trace(model).get_trace()
    expected = BivariateCME(mu_n, mu_m, theta, scheme="extrinsic").log_prob(obs).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "value, message",
    [
        ([-1.0, 2.0], "non-negative"),
        ([1.5, 2.0], "whole numbers"),
        ([float("nan"), 2.0], "NaN"),
        ([1.0, float("inf")], "infinite"),
        ([1.0, 2.0, 3.0], "size 2"),
    ],
)
def test_validate_values(value, message):
    d = BivariateCME(1.0, 2.0, 1.0, scheme="extrinsic", validate_args=True)
    with pytest.raises(ValueError, match=message):
        d.log_prob(torch.tensor(value))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mu_nascent": -1.0}, "mu_nascent must be positive"),
        ({"mu_mature": 0.0}, "mu_mature must be positive"),
        ({"theta": float("nan")}, "theta contains NaN"),
        ({"theta": float("inf")}, "theta must be positive and finite"),
    ],
)
def test_validate_parameters(kwargs, message):
    params = {"mu_nascent": 1.0, "mu_mature": 1.0, "theta": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        BivariateCME(**params, scheme="extrinsic", validate_args=True)


def test_validation_can_be_switched_off_and_bad_inputs_are_named():
    BivariateCME(-1.0, 1.0, 1.0, scheme="extrinsic", validate_args=False)  # no error
    with pytest.raises(KeyError, match="unknown reaction scheme"):
        BivariateCME(1.0, 1.0, 1.0, scheme="telegraph")
    with pytest.raises(ValueError, match="do not broadcast"):
        BivariateCME(torch.ones(3), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="mu must be positive"):
        NegativeBinomial(-2.0, 1.0, validate_args=True)
    with pytest.raises(ValueError, match="whole numbers"):
        ZeroInflatedNegativeBinomial(2.0, 1.0, 0.0, validate_args=True).log_prob(torch.tensor(0.5))
    with pytest.raises(ValueError, match="zi_logits contains NaN"):
        ZeroInflatedNegativeBinomial(2.0, 1.0, float("nan"), validate_args=True)


# ------------------------------------------------------------- normalisation and moments


@pytest.mark.parametrize("scheme", CLOSED_FORM)
@pytest.mark.parametrize("params", [(2.0, 5.0, 0.5), (10.0, 3.0, 4.0)])
def test_log_prob_normalises_with_analytic_moments(scheme, params):
    d = BivariateCME(*(torch.tensor(p, dtype=torch.float64) for p in params), scheme=scheme)
    pmf = grid_log_prob(d, 250).exp().numpy()
    assert pmf.sum() == pytest.approx(1.0, abs=1e-9)
    n, m = np.arange(250)[:, None], np.arange(250)[None, :]
    mean = np.array([(pmf * n).sum(), (pmf * m).sum()])
    var = np.array([(pmf * (n - mean[0]) ** 2).sum(), (pmf * (m - mean[1]) ** 2).sum()])
    cov = (pmf * (n - mean[0]) * (m - mean[1])).sum()
    np.testing.assert_allclose(mean, d.mean.numpy(), rtol=1e-8)
    np.testing.assert_allclose(var, d.variance.numpy(), rtol=1e-7)
    assert cov == pytest.approx(float(d.covariance), rel=1e-7, abs=1e-10)


def test_constitutive_is_two_poissons_and_ignores_theta():
    value = torch.tensor([[0.0, 4.0], [7.0, 1.0]])
    d1 = BivariateCME(torch.tensor(3.0), torch.tensor(2.5), 0.1, scheme="constitutive")
    d2 = BivariateCME(torch.tensor(3.0), torch.tensor(2.5), 50.0, scheme="constitutive")
    expected = scipy.stats.poisson(3.0).logpmf(value[:, 0]) + scipy.stats.poisson(2.5).logpmf(
        value[:, 1]
    )
    np.testing.assert_allclose(d1.log_prob(value), expected, rtol=1e-6)
    torch.testing.assert_close(d1.log_prob(value), d2.log_prob(value))


def test_extrinsic_is_a_gamma_mixture_of_poissons():
    # Integrate Poisson(n; lam mu_N/a) Poisson(m; lam mu_M/a) over lam ~ Gamma(a, 1) numerically.
    mu_n, mu_m, a = 4.0, 2.0, 1.7
    d = BivariateCME(torch.tensor(mu_n), torch.tensor(mu_m), torch.tensor(a), scheme="extrinsic")
    lam = np.linspace(1e-6, 40.0, 400_001)
    dens = scipy.stats.gamma(a).pdf(lam)
    for n, m in [(0, 0), (3, 1), (9, 6)]:
        integrand = dens * scipy.stats.poisson(lam * mu_n / a).pmf(n)
        integrand *= scipy.stats.poisson(lam * mu_m / a).pmf(m)
        expected = np.trapezoid(integrand, lam)
        assert float(d.log_prob(torch.tensor([n, m]).float()).exp()) == pytest.approx(
            expected, rel=1e-4
        )


# ---------------------------------------------------------------- goodness of fit


@pytest.mark.parametrize("scheme", CLOSED_FORM)
def test_sample_agrees_with_log_prob(scheme):
    torch.manual_seed(11)
    d = BivariateCME(torch.tensor(4.0), torch.tensor(6.0), torch.tensor(1.5), scheme=scheme)
    total = 20_000
    draws = d.sample((total,))
    probs = grid_log_prob(d, 80).exp().numpy()
    gof = pooled_gof(probs.ravel(), pair_histogram(draws, 80).ravel(), total)
    assert gof > TEST_FAILURE_RATE
    corr = float(d.covariance / d.variance.prod().sqrt())
    empirical = float(torch.corrcoef(draws.T)[0, 1])
    assert abs(empirical - corr) < 5 * (1 - corr**2) / math.sqrt(total) + 0.005


def test_scheme_sampler_generator_is_reproducible_and_leaves_global_state():
    scheme = schemes.get("extrinsic")
    args = (torch.tensor([2.0, 8.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.5, 4.0]))
    state = torch.get_rng_state()
    a = scheme.sample(*args, sample_shape=(3,), generator=torch.Generator().manual_seed(5))
    b = scheme.sample(*args, sample_shape=(3,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 2, 2)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("scheme", CLOSED_FORM)
def test_log_prob_gradients_are_correct(scheme):
    value = torch.tensor([[3.0, 0.0], [1.0, 7.0], [0.0, 0.0]], dtype=torch.float64)
    params = (
        torch.tensor([2.0, 0.3, 5.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([1.0, 4.0, 0.2], dtype=torch.float64, requires_grad=True),
        torch.tensor([0.7, 3.0, 1.1], dtype=torch.float64, requires_grad=True),
    )

    def f(mu_n, mu_m, theta):
        return BivariateCME(mu_n, mu_m, theta, scheme=scheme).log_prob(value)

    assert torch.autograd.gradcheck(f, params)


def test_gradient_flows_through_a_bursty_backend():
    class PoissonConditional:  # a valid differentiable conditional: M | n ~ Poisson(b / gamma)
        def log_prob_mature_given_nascent(self, nascent, mature, b, beta, gamma):
            return torch.distributions.Poisson(b / gamma).log_prob(mature)

    scheme = schemes.get("bursty", backend=PoissonConditional())
    params = [torch.tensor(v, requires_grad=True) for v in ([2.0, 6.0], [3.0, 1.5], [0.7, 2.5])]
    d = BivariateCME(*params, scheme=scheme)
    d.log_prob(torch.tensor([[1.0, 2.0], [8.0, 3.0]])).sum().backward()
    for p in params:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().min()) > 0


# ---------------------------------------------------------------- univariate laws


@pytest.mark.parametrize("mu, theta", [(0.3, 0.2), (5.0, 2.0), (40.0, 1e4)])
def test_negative_binomial_matches_scipy_and_normalises(mu, theta):
    d = NegativeBinomial(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64)
    )
    x = torch.arange(2000.0, dtype=torch.float64)
    logp = d.log_prob(x)
    expected = scipy.stats.nbinom(theta, theta / (theta + mu)).logpmf(x.numpy())
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-9, atol=1e-9)
    pmf = logp.exp()
    assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-10)
    assert float((pmf * x).sum()) == pytest.approx(float(d.mean), rel=1e-9)
    assert float((pmf * (x - mu) ** 2).sum()) == pytest.approx(float(d.variance), rel=1e-8)


def test_zinb_is_the_zero_inflated_mixture():
    mu, theta, logit = torch.tensor([3.0, 0.5]), torch.tensor([2.0, 0.8]), torch.tensor([0.4, -1.0])
    d = ZeroInflatedNegativeBinomial(mu, theta, logit)
    assert d.batch_shape == (2,) and isinstance(d.batch_shape, torch.Size)
    x = torch.arange(300.0).unsqueeze(-1)
    gate = torch.sigmoid(logit)
    nb = NegativeBinomial(mu, theta).log_prob(x).exp()
    expected = (1 - gate) * nb + gate * (x == 0)
    torch.testing.assert_close(d.log_prob(x).exp(), expected, rtol=1e-5, atol=1e-7)
    pmf = d.log_prob(x).exp()
    torch.testing.assert_close(pmf.sum(0), torch.ones(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((pmf * x).sum(0), d.mean, rtol=1e-4, atol=1e-5)
    var = (pmf * (x - d.mean) ** 2).sum(0)
    torch.testing.assert_close(var, d.variance, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.mu, mu)
    assert d.expand((3, 2)).batch_shape == (3, 2)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_univariate_sample_agrees_with_log_prob(zero_inflated):
    torch.manual_seed(5)
    mu, theta = torch.tensor(6.0), torch.tensor(1.3)
    d = (
        ZeroInflatedNegativeBinomial(mu, theta, 0.3)
        if zero_inflated
        else NegativeBinomial(mu, theta)
    )
    total = 20_000
    draws = d.sample((total,))
    assert draws.shape == (total,)
    support = torch.arange(300.0)
    probs = d.log_prob(support).exp().numpy()
    hist = np.bincount(draws.long().numpy(), minlength=300)[:300].astype(float)
    assert pooled_gof(probs, hist, total) > TEST_FAILURE_RATE


def test_univariate_gradients():
    mu = torch.tensor([2.0, 9.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([0.2, -2.0], dtype=torch.float64, requires_grad=True)
    value = torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: NegativeBinomial(a, b).log_prob(value), (mu, theta)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: ZeroInflatedNegativeBinomial(a, b, c).log_prob(value), (mu, theta, logits)
    )


# ------------------------------------------------------------------ bursty, exact backend


@pytest.fixture
def exact_bursty():
    """The bursty scheme with the exact backend (``pybivi.cme.exact_pmf``)."""
    return schemes.get("bursty", backend="exact")


def test_bursty_exact_log_prob_normalises(exact_bursty):
    # b = 2, beta = 1.25, gamma = 0.5
    d = BivariateCME(
        *(torch.tensor(v, dtype=torch.float64) for v in (1.6, 4.0, 0.8)), scheme=exact_bursty
    )
    pmf = grid_log_prob(d, 70).exp().numpy()
    assert pmf.sum() == pytest.approx(1.0, abs=1e-6)
    n, m = np.arange(70)[:, None], np.arange(70)[None, :]
    np.testing.assert_allclose([(pmf * n).sum(), (pmf * m).sum()], d.mean.numpy(), rtol=1e-4)
    nascent = pmf.sum(axis=1)
    expected = scipy.stats.nbinom(0.8, 0.8 / (0.8 + 1.6)).pmf(np.arange(70))
    np.testing.assert_allclose(nascent, expected, rtol=1e-6, atol=1e-12)


def test_bursty_sample_agrees_with_exact_log_prob(exact_bursty):
    torch.manual_seed(2)
    d = BivariateCME(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(1.0), scheme=exact_bursty)
    total = 20_000
    draws = d.sample((total,))
    probs = grid_log_prob(d.expand(()), 60).exp().numpy()
    gof = pooled_gof(probs.ravel(), pair_histogram(draws, 60).ravel(), total)
    assert gof > TEST_FAILURE_RATE
    corr = float(d.covariance / d.variance.prod().sqrt())
    assert abs(float(torch.corrcoef(draws.T)[0, 1]) - corr) < 5 * (1 - corr**2) / total**0.5 + 0.005


# ------------------------------------------------------------------ a user-written scheme


class IndependentNB(schemes.ReactionScheme):
    """A user scheme written against the protocol only: N and M independent NB(mu, theta)."""

    name = "independent_nb_test"
    kinetic_param_names = ("shape",)

    def kinetic_params(self, mu_nascent, mu_mature, theta):
        return {"shape": torch.broadcast_tensors(mu_nascent, mu_mature, theta)[2]}

    def log_prob(self, nascent, mature, mu_nascent, mu_mature, theta):
        return NegativeBinomial(mu_nascent, theta).log_prob(nascent) + NegativeBinomial(
            mu_mature, theta
        ).log_prob(mature)

    def sample(self, mu_nascent, mu_mature, theta, sample_shape=(), generator=None):
        n = NegativeBinomial(mu_nascent, theta).sample(sample_shape)
        m = NegativeBinomial(mu_mature, theta).sample(sample_shape)
        return torch.stack(torch.broadcast_tensors(n, m), -1)

    def variance(self, mu_nascent, mu_mature, theta):
        mu = self.mean(mu_nascent, mu_mature, theta)
        return mu + mu * mu / torch.as_tensor(theta).unsqueeze(-1)

    def covariance(self, mu_nascent, mu_mature, theta):
        return torch.zeros(
            torch.broadcast_shapes(
                *(torch.as_tensor(v).shape for v in (mu_nascent, mu_mature, theta))
            )
        )


def test_user_scheme_plugs_into_bivariate_cme(monkeypatch):
    monkeypatch.setattr(schemes, "_REGISTRY", dict(schemes._REGISTRY))
    schemes.register(IndependentNB())
    torch.manual_seed(3)
    d = BivariateCME(
        torch.tensor(3.0), torch.tensor(5.0), torch.tensor(2.0), scheme=IndependentNB.name
    )
    assert isinstance(d.scheme, IndependentNB) and d.expand((3,)).scheme is d.scheme
    pmf = grid_log_prob(d, 150).exp().numpy()
    assert pmf.sum() == pytest.approx(1.0, abs=1e-6)  # float32
    total = 20_000
    draws = d.sample((total,))
    assert pooled_gof(pmf.ravel(), pair_histogram(draws, 150).ravel(), total) > TEST_FAILURE_RATE
    torch.testing.assert_close(d.variance, torch.tensor([3.0 + 4.5, 5.0 + 12.5]))
