"""Tests of the exact CME solvers against closed forms, analytic moments and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from montecarlo import chi_square_gof, sample_bursty, sample_extrinsic
from numpy.polynomial.legendre import leggauss
from scipy import fft as sp_fft
from scipy import integrate, stats

from pybivi.cme import analytic_moments, exact_pmf, exact_pmf_many, suggest_grid
from pybivi.cme import quadrature as quad

torch.set_num_threads(1)

MONOD = {"b": 100.0, "beta": 5.0, "gamma": 3.0}


@pytest.fixture(scope="module")
def monod_pmf() -> np.ndarray:
    """The large-b point where a fixed 60-node rule fails (computed once: ~5 s)."""
    return exact_pmf("bursty", **MONOD)


def _moments(pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(pmf.shape[0], dtype=np.float64)
    m = np.arange(pmf.shape[1], dtype=np.float64)
    pn, pm = pmf.sum(axis=1), pmf.sum(axis=0)
    mean = np.array([n @ pn, m @ pm])
    dn, dm = n - mean[0], m - mean[1]
    cov = np.array(
        [[dn**2 @ pn, dn @ pmf @ dm], [dn @ pmf @ dm, dm**2 @ pm]], dtype=np.float64
    )
    return mean, cov


def _assert_moments(pmf: np.ndarray, scheme: str, rtol: float = 1e-8, **params: float) -> None:
    mean, cov = _moments(pmf)
    mean_ref, cov_ref = analytic_moments(scheme, **params)
    np.testing.assert_allclose(mean, mean_ref, rtol=rtol, atol=0)
    np.testing.assert_allclose(np.diag(cov), np.diag(cov_ref), rtol=rtol, atol=0)
    # The covariance is checked on the correlation scale: an absolute PMF accuracy of
    # ~1e-13 cannot give 1e-8 relative accuracy on a covariance of, say, 1e-8.
    scale = np.sqrt(cov_ref[0, 0] * cov_ref[1, 1])
    assert abs(cov[0, 1] - cov_ref[0, 1]) <= rtol * max(abs(cov_ref[0, 1]), scale)


def _nb_pmf(n: np.ndarray, b: float, beta: float) -> np.ndarray:
    return stats.nbinom.pmf(n, 1.0 / beta, 1.0 / (1.0 + b))


# Spread over log10 b in [-3, 3], log10 beta in [-2, 2], log10 gamma in [-3, 2], kept to
# state spaces that are quick to transform.
DOMAIN_POINTS = [
    (1e-3, 1e-2, 1e-3),
    (1e-3, 100.0, 1e-3),
    (1e-3, 100.0, 100.0),
    (3.0, 1e-2, 100.0),
    (0.5, 100.0, 1e-3),
    (2.0, 50.0, 0.5),
    (2.0, 0.5, 50.0),
    (1.0, 1.0, 1.0),
    (20.0, 2.0, 0.2),
    (5.0, 0.05, 0.2),
]


@pytest.mark.parametrize(("b", "beta", "gamma"), DOMAIN_POINTS)
def test_bursty_nascent_marginal_is_negative_binomial(b, beta, gamma):
    pmf = exact_pmf("bursty", b=b, beta=beta, gamma=gamma)
    n = np.arange(pmf.shape[0])
    err = np.abs(pmf.sum(axis=1) - _nb_pmf(n, b, beta)).max()
    assert err < 1e-10
    # The default crop leaves at most TAIL = 1e-12 per species outside.
    assert 1.0 - pmf.sum() < 3e-12
    assert pmf.min() >= 0.0


@pytest.mark.parametrize(("b", "beta", "gamma"), DOMAIN_POINTS)
def test_bursty_moments_match_analytic(b, beta, gamma):
    # A grid reaching well past the default crop so that truncation is far below 1e-8.
    n_max, m_max = suggest_grid("bursty", tail=1e-16, b=b, beta=beta, gamma=gamma)
    pmf = exact_pmf("bursty", n_max=n_max, m_max=m_max, b=b, beta=beta, gamma=gamma)
    _assert_moments(pmf, "bursty", b=b, beta=beta, gamma=gamma)


@pytest.mark.parametrize(("b", "beta"), [(0.5, 2.0), (20.0, 3.0), (1e-3, 0.01)])
def test_bursty_continuous_through_beta_equal_gamma(b, beta):
    shape = suggest_grid("bursty", b=b, beta=beta, gamma=beta)
    kw = {"n_max": shape[0], "m_max": shape[1], "b": b, "beta": beta}
    at = exact_pmf("bursty", gamma=beta, **kw)
    above = exact_pmf("bursty", gamma=beta * (1 + 1e-9), **kw)
    below = exact_pmf("bursty", gamma=beta * (1 - 1e-9), **kw)
    # A 1e-9 relative change of gamma moves the PMF by O(1e-9), linearly: the second
    # difference vanishes to round-off, so no branch of the formula jumps at beta == gamma.
    assert np.abs(above - at).max() < 1e-8
    assert np.abs(above + below - 2.0 * at).max() < 1e-12
    _assert_moments(at, "bursty", rtol=1e-7, b=b, beta=beta, gamma=beta)


def _refined_rule(b: float, beta: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """About four times the default resolution: panels 5x narrower, 24 nodes each."""
    return quad.quadrature_rule(b, beta, gamma, step=0.3, panel_nodes=24, head_nodes=30)


def test_quadrature_matches_refined_rule_and_nb_closed_form():
    rng = np.random.default_rng(7)
    theta = np.concatenate([[0.0, 1e-5, 1e-3, 0.03, 0.5, 2.0, np.pi], rng.uniform(0, np.pi, 6)])
    u = -2.0 * np.sin(theta / 2) ** 2 - 1j * np.sin(theta)
    v = np.concatenate([u, np.conj(u[1:])])
    points = [tuple(10.0 ** rng.uniform([-3, -2, -3], [3, 2, 2])) for _ in range(12)]
    points += [(1000.0, 100.0, 1e-3), (685.0, 36.3, 12.9), (1000.0, 10.0, 10.0), (1e-3, 1e-2, 1e-3)]
    for b, beta, gamma in points:
        val = np.exp(quad.log_gf(u, v, b, beta, gamma))
        nodes, weights = _refined_rule(b, beta, gamma)
        ref = np.exp(quad.log_gf(u, v, b, beta, gamma, nodes, weights))
        assert np.abs(val - ref).max() < 1e-11, (b, beta, gamma)
        # v = 0: G(x, 1) is the NB generating function (1 - b u)^(-1/beta).
        nb = np.exp(-np.log1p(-b * u) / beta)
        assert np.abs(val[:, 0] - nb).max() < 1e-11, (b, beta, gamma)


def test_pole_subtraction_is_needed_at_large_burst_size():
    """Without it the Lorentzian of opposite-sign Im u, Im v is missed (here ~3e-7)."""
    b, beta, gamma = 685.0, 36.3, 12.9
    theta = np.array([1e-3, 0.03, 0.5, 2.0])
    u = -2.0 * np.sin(theta / 2) ** 2 - 1j * np.sin(theta)
    v = np.concatenate([u, np.conj(u)])
    ref = np.exp(quad.log_gf(u, v, b, beta, gamma, *_refined_rule(b, beta, gamma)))
    with_poles = np.exp(quad.log_gf(u, v, b, beta, gamma))
    without = np.exp(quad.log_gf(u, v, b, beta, gamma, subtract_poles=False))
    assert np.abs(with_poles - ref).max() < 1e-12
    assert np.abs(without - ref).max() > 1e-8
    # Independent of the rule and of the subtraction: scipy's adaptive quadrature on
    # 300 geometric pieces of [0, s_hi], at the near-pole pair (Im u < 0 < Im v).
    s_hi = quad.upper_limit(b, beta, gamma)
    cuts = np.concatenate([[0.0], np.geomspace(1e-7, s_hi, 300)])
    i, j = 1, 5  # theta_u = 0.03, theta_v = -0.03: the no-subtraction error is 3e-7 here

    def integrand(s: float, part: int) -> float:
        big_u = b * (u[i] * np.exp(-beta * s) + v[j] * quad.mature_fraction(s, beta, gamma))
        ratio = big_u / (1.0 - big_u)
        return float(ratio.real if part == 0 else ratio.imag)

    pieces = zip(cuts[:-1], cuts[1:], strict=True)
    total = sum(
        integrate.quad(integrand, lo, hi, args=(k,), epsabs=1e-17, epsrel=1e-13)[0] * (1j**k)
        for lo, hi in pieces
        for k in (0, 1)
    )
    assert abs(quad.log_gf(u[i : i + 1], v[j : j + 1], b, beta, gamma)[0, 0] - total) < 1e-12


def _fixed_rule_pmf(b: float, beta: float, gamma: float, shape: tuple[int, int]) -> np.ndarray:
    """Monod's default: 60-node Gauss-Legendre on [0, 10 (1/beta + 1/gamma + 1)], same GF."""
    x, w = leggauss(60)
    upper = 10.0 * (1.0 / beta + 1.0 / gamma + 1.0)
    nodes, weights = 0.5 * upper * (x + 1.0), 0.5 * upper * w
    len_n = sp_fft.next_fast_len(shape[0] + 200, real=True)
    len_m = sp_fft.next_fast_len(shape[1] + 200, real=True)
    u = quad.unit_circle_minus_one(len_n)
    v = quad.unit_circle_minus_one(len_m, len_m // 2 + 1)
    gf = np.exp(quad.log_gf(u, v, b, beta, gamma, nodes, weights, subtract_poles=False))
    pmf = np.clip(np.fft.irfft2(gf, s=(len_n, len_m)), 0.0, None)
    return pmf[: shape[0], : shape[1]]


def test_large_burst_where_fixed_60_node_rule_fails(monod_pmf):
    b, beta, gamma = MONOD["b"], MONOD["beta"], MONOD["gamma"]
    n = np.arange(monod_pmf.shape[0])
    assert np.abs(monod_pmf.sum(axis=1) - _nb_pmf(n, b, beta)).max() < 1e-10
    _assert_moments(monod_pmf, "bursty", **MONOD)
    naive = _fixed_rule_pmf(b, beta, gamma, monod_pmf.shape)
    hellinger = np.sqrt(0.5 * ((np.sqrt(naive) - np.sqrt(monod_pmf)) ** 2).sum())
    assert hellinger > 0.01  # about 0.02
    # Where the two differ, the generating function decides: at random points of the
    # FFT torus ours matches a 4x refined rule, the fixed rule does not. (Its moments
    # are right -- they only probe G near x = y = 1 -- so moments cannot show this.)
    rng = np.random.default_rng(3)
    u = quad.unit_circle_minus_one(4096)[rng.integers(0, 4096, 40)]
    v = quad.unit_circle_minus_one(2048)[rng.integers(0, 1025, 40)]
    nodes, weights = _refined_rule(b, beta, gamma)
    ref = np.exp(quad.log_gf(u, v, b, beta, gamma, nodes, weights))
    ours = np.exp(quad.log_gf(u, v, b, beta, gamma))
    x, w = leggauss(60)
    upper = 10.0 * (1.0 / beta + 1.0 / gamma + 1.0)
    fixed_rule = (0.5 * upper * (x + 1), 0.5 * upper * w)
    fixed = np.exp(quad.log_gf(u, v, b, beta, gamma, *fixed_rule, subtract_poles=False))
    assert np.abs(ours - ref).max() < 1e-11
    assert np.abs(fixed - ref).max() > 1e-4  # ~8e-4 here, 1e7 times our error


GOF_POINTS = [
    (0.01, 1.0, 1.0),  # small bursts
    (2.0, 50.0, 0.5),  # beta >> gamma
    (2.0, 0.5, 50.0),  # beta << gamma
    (1.0, 1.0, 1.0),  # beta == gamma
    (5.0, 0.05, 0.2),  # slow rates, wide distribution
    (0.3, 10.0, 0.01),  # very slow decay
]


@pytest.mark.parametrize(("b", "beta", "gamma"), GOF_POINTS)
def test_bursty_agrees_with_reaction_monte_carlo(b, beta, gamma):
    rng = np.random.default_rng(12345)
    samples = sample_bursty(b, beta, gamma, 4000, rng)
    pmf = exact_pmf("bursty", b=b, beta=beta, gamma=gamma)
    assert chi_square_gof(samples, pmf) > 1e-3


def test_large_burst_agrees_with_reaction_monte_carlo(monod_pmf):
    rng = np.random.default_rng(2024)
    samples = sample_bursty(MONOD["b"], MONOD["beta"], MONOD["gamma"], 20000, rng)
    assert chi_square_gof(samples, monod_pmf) > 1e-3


def test_goodness_of_fit_has_power():
    """The same test rejects a 10% error in gamma: a pass above is informative."""
    rng = np.random.default_rng(12345)
    samples = sample_bursty(2.0, 50.0, 0.5, 4000, rng)
    wrong = exact_pmf("bursty", b=2.0, beta=50.0, gamma=0.55)
    assert chi_square_gof(samples, wrong) < 1e-3


@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (0.05, 2.0), (20.0, 0.01)])
def test_constitutive_is_product_of_poissons(beta, gamma):
    pmf = exact_pmf("constitutive", beta=beta, gamma=gamma)
    assert 1.0 - pmf.sum() < 3e-12
    n, m = np.arange(pmf.shape[0]), np.arange(pmf.shape[1])
    np.testing.assert_allclose(pmf.sum(axis=1), stats.poisson.pmf(n, 1 / beta), atol=1e-12)
    np.testing.assert_allclose(pmf.sum(axis=0), stats.poisson.pmf(m, 1 / gamma), atol=1e-12)
    _assert_moments(pmf, "constitutive", rtol=1e-9, beta=beta, gamma=gamma)


@pytest.mark.parametrize(
    ("alpha", "beta", "gamma"), [(0.5, 0.1, 0.05), (3.0, 1.0, 0.2), (50.0, 5.0, 2.0)]
)
def test_extrinsic_closed_form(alpha, beta, gamma):
    n_max, m_max = suggest_grid("extrinsic", tail=1e-16, alpha=alpha, beta=beta, gamma=gamma)
    pmf = exact_pmf("extrinsic", n_max=n_max, m_max=m_max, alpha=alpha, beta=beta, gamma=gamma)
    assert abs(1.0 - pmf.sum()) < 1e-12
    # Marginals of the bivariate NB are NB(alpha, mean alpha/beta) and NB(alpha, alpha/gamma).
    n, m = np.arange(pmf.shape[0]), np.arange(pmf.shape[1])
    pn = stats.nbinom.pmf(n, alpha, alpha / (alpha + alpha / beta))
    pm = stats.nbinom.pmf(m, alpha, alpha / (alpha + alpha / gamma))
    np.testing.assert_allclose(pmf.sum(axis=1), pn, atol=1e-12)
    np.testing.assert_allclose(pmf.sum(axis=0), pm, atol=1e-12)
    _assert_moments(pmf, "extrinsic", alpha=alpha, beta=beta, gamma=gamma)


@pytest.mark.parametrize(("alpha", "beta", "gamma"), [(0.5, 0.1, 0.05), (3.0, 1.0, 0.2)])
def test_extrinsic_agrees_with_gamma_poisson_monte_carlo(alpha, beta, gamma):
    rng = np.random.default_rng(99)
    samples = sample_extrinsic(alpha, beta, gamma, 5000, rng)
    pmf = exact_pmf("extrinsic", alpha=alpha, beta=beta, gamma=gamma)
    assert chi_square_gof(samples, pmf) > 1e-3


def test_requested_grid_crops_without_renormalising():
    params = {"b": 3.0, "beta": 0.7, "gamma": 0.4}
    full = exact_pmf("bursty", **params)
    small = exact_pmf("bursty", n_max=5, m_max=7, **params)
    assert small.shape == (6, 8)
    np.testing.assert_allclose(small, full[:6, :8], atol=1e-14, rtol=0)
    big = exact_pmf("bursty", n_max=full.shape[0] + 50, m_max=full.shape[1] + 50, **params)
    np.testing.assert_allclose(big[: full.shape[0], : full.shape[1]], full, atol=1e-14, rtol=0)
    assert big[full.shape[0] :].sum() < 1e-12


def test_suggest_grid_is_the_exact_nascent_quantile():
    b, beta, gamma = 4.0, 0.3, 1.5
    n_max, m_max = suggest_grid("bursty", b=b, beta=beta, gamma=gamma)
    sf = stats.nbinom.sf([n_max - 1, n_max], 1 / beta, 1 / (1 + b))
    assert sf[1] <= 1e-12 < sf[0]
    # The mature bound is generous: the exact 1e-12 crop is no larger.
    assert exact_pmf("bursty", b=b, beta=beta, gamma=gamma).shape[1] <= m_max + 1


def test_exact_pmf_many_matches_single_calls_and_skips_large():
    sets = [{"b": 1.0, "beta": 2.0, "gamma": 0.5}, {"b": 300.0, "beta": 1.0, "gamma": 0.01}]
    out = exact_pmf_many("bursty", sets, max_per_species=500)
    assert out[1] is None
    np.testing.assert_array_equal(out[0], exact_pmf("bursty", **sets[0]))


@pytest.mark.parametrize(
    ("scheme", "params", "match"),
    [
        ("telegraph", {"beta": 1.0, "gamma": 1.0}, "known schemes"),
        ("bursty", {"beta": 1.0, "gamma": 1.0}, "missing \\['b'\\]"),
        ("bursty", {"b": 1.0, "beta": 1.0, "gamma": 1.0, "k": 1.0}, "unexpected \\['k'\\]"),
        ("bursty", {"b": -1.0, "beta": 1.0, "gamma": 1.0}, "'b' must be positive"),
        ("constitutive", {"beta": float("nan"), "gamma": 1.0}, "'beta' must be positive"),
        ("extrinsic", {"alpha": np.inf, "beta": 1.0, "gamma": 1.0}, "'alpha' must be positive"),
        ("bursty", {"b": True, "beta": 1.0, "gamma": 1.0}, "real scalar"),
        ("bursty", {"b": [1.0], "beta": 1.0, "gamma": 1.0}, "real scalar"),
        ("bursty", {"b": "2", "beta": 1.0, "gamma": 1.0}, "real scalar"),
    ],
)
def test_bad_input_raises_value_error(scheme, params, match):
    with pytest.raises(ValueError, match=match):
        exact_pmf(scheme, **params)


def test_bad_sizes_and_huge_state_spaces_raise():
    with pytest.raises(ValueError, match="n_max"):
        exact_pmf("bursty", n_max=-1, b=1.0, beta=1.0, gamma=1.0)
    with pytest.raises(ValueError, match="state space too large"):
        exact_pmf("bursty", b=1000.0, beta=0.01, gamma=0.001)
