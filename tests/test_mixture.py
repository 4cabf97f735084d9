"""Pieces of the fused approximator against their definitions (float64; scipy, autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from pybivi.cme.mixture import _count_terms, _exp_


def _grid():
    m = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 40.0, 1e3, 2e5], dtype=torch.float64)
    r = torch.tensor([0.01, 0.3, 1.0, 7.9, 8.0, 30.0, 1e3, 1e6], dtype=torch.float64)
    mm, rr = torch.meshgrid(m, r, indexing="ij")
    return mm.reshape(-1), rr.reshape(-1)


def test_count_terms_match_lgamma_and_digamma():
    """``lgamma(m + r) - lgamma(r) - m log r - lgamma(m + 1)`` and ``r (psi(m + r) - psi(r)) - m``.

    Both branches of the evaluation (r below and above 8) are on the grid.

    The reference is scipy in float64, whose own cancellation error (terms of size
    ``lgamma(m + r)``, 1e7 at r = 1e6) sets the floor of the tolerance, elementwise;
    Stirling's series with three terms is accurate to 3e-10 at r = 8.
    """
    m, r = _grid()
    value, deriv = _count_terms(m, torch.log(r))
    mn, rn = m.numpy(), r.numpy()
    eps = np.finfo(np.float64).eps
    terms = [
        special.gammaln(mn + rn),
        special.gammaln(rn),
        mn * np.log(rn),
        special.gammaln(mn + 1),
    ]
    exact = terms[0] - terms[1] - terms[2] - terms[3]
    floor = 1e-9 + 10 * eps * sum(np.abs(t) for t in terms)
    assert np.all(np.abs(value.numpy() - exact) <= floor + 1e-12 * np.abs(exact))
    exact_deriv = rn * (special.digamma(mn + rn) - special.digamma(rn)) - mn
    floor_deriv = 1e-9 + 10 * eps * rn * (np.abs(special.digamma(mn + rn)) + 1.0)
    assert np.all(np.abs(deriv.numpy() - exact_deriv) <= floor_deriv + 1e-9 * np.abs(exact_deriv))


def test_count_terms_vanish_for_zero_and_one_molecule():
    m, r = _grid()
    value, deriv = _count_terms(m, torch.log(r))
    few = m <= 1
    assert bool((value[few] == 0).all()) and bool((deriv[few] == 0).all())
    assert bool((value[~few].abs() > 0).any())  # and not elsewhere


def test_count_terms_derivative_is_that_of_the_value():
    """The derivative is d/dlog r of the value (finite differences in float64).

    Steps stay on one side of the branch switch at r = 8 (the series' truncation, about
    3e-10 at r = 8, divided by a step of 1e-6 would dominate).
    """
    m, r = _grid()
    keep = (m >= 2) & (r < 1e5) & (r != 8.0)
    log_r = torch.log(r[keep])
    step = 1e-6
    up, _ = _count_terms(m[keep], log_r + step)
    down, _ = _count_terms(m[keep], log_r - step)
    _, deriv = _count_terms(m[keep], log_r)
    torch.testing.assert_close(deriv, (up - down) / (2 * step), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_by_powers_of_two_is_exp_for_non_positive_arguments(dtype):
    x = -torch.cat([torch.logspace(-8, math.log10(79.0), 2000), torch.tensor([0.0])]).to(dtype)
    got = _exp_(x.clone())
    want = torch.exp(x)
    assert bool(((got - want).abs() <= 3e-8 + 4 * torch.finfo(dtype).eps * want).all())
    far = _exp_(torch.tensor([-100.0, -1e4], dtype=dtype))
    torch.testing.assert_close(far, torch.full_like(far, math.exp(-80.0)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("slope", ["gamma", "lognormal"])
def test_moment_match_vjp_is_autograd_of_moment_base(slope):
    """The closed-form gradients equal autograd's through moment_base (float64, every regime)."""
    from pybivi.cme.moments import moment_base, moment_match, moment_match_vjp

    gen = torch.Generator().manual_seed(2)
    count = 5000

    def loguniform(lo, hi):
        return 10 ** (torch.rand(count, generator=gen, dtype=torch.float64) * (hi - lo) + lo)

    b, beta, gamma = loguniform(-4, 4), loguniform(-3, 3), loguniform(-4, 3)
    n = torch.randint(0, 3000, (count,), generator=gen).double()
    g_c, g_sigma = (torch.randn(count, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = [x.clone().requires_grad_(True) for x in (b, beta, gamma)]
    c, sigma = moment_base(n, *leaves, slope=slope)
    want = torch.autograd.grad((g_c * c + g_sigma * sigma).sum(), leaves)
    match = moment_match(n, b, beta, gamma, slope=slope)
    torch.testing.assert_close(match.c, c.detach())
    torch.testing.assert_close(match.sigma, sigma.detach())
    if slope == "lognormal":  # the gamma slope keeps sigma^2 <= s2m, far below the cap
        assert bool((match.sigma == 4.0).any())  # the spread cap is exercised
    for got, ref in zip(moment_match_vjp(match, g_c, g_sigma), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def _exact_conditional_means(b, beta, gamma):
    """P(n) and E[M | N = n] from the exact joint PMF."""
    from pybivi.cme.training_data import bursty_joint

    joint = np.asarray(bursty_joint(b, beta, gamma))
    p_n = joint.sum(1)
    mean = (joint * np.arange(joint.shape[1])).sum(1) / np.maximum(p_n, 1e-300)
    return p_n, mean


@pytest.mark.parametrize(
    "b, beta, gamma",
    [(30.0, 5.0, 8.0), (50.0, 3.0, 20.0), (10.0, 10.0, 4.0), (20.0, 2.0, 0.5)],
)
def test_gamma_slope_places_the_kernels_near_the_exact_conditional_mean(b, beta, gamma):
    """Where bursts are rare (beta >> 1) the Gamma-unit slope keeps the centre within a few
    nats of log E[M | n] on every row with mass, where the lognormal slope is off by up to
    tens of nats; the network corrects what is left."""
    from pybivi.cme.moments import moment_base

    p_n, exact = _exact_conditional_means(b, beta, gamma)
    rows = np.flatnonzero(p_n > 1e-3)
    n = torch.tensor(rows, dtype=torch.float64)
    params = [torch.full_like(n, v) for v in (b, beta, gamma)]
    errors = {}
    for slope in ("gamma", "lognormal"):
        c, sigma = moment_base(n, *params, slope=slope)
        # the lognormal's mean exp(c + sigma^2 / 2) against the exact conditional mean
        errors[slope] = np.abs((c + sigma**2 / 2).numpy() - np.log(exact[rows]))
    assert errors["gamma"].max() < 2.5
    weight = p_n[rows] / p_n[rows].sum()
    assert (weight * errors["gamma"]).sum() <= (weight * errors["lognormal"]).sum()


@pytest.mark.parametrize("b, beta, gamma", [(5.0, 0.1, 0.3), (3.0, 0.02, 1.0)])
def test_both_slopes_agree_with_the_exact_mean_when_bursts_overlap(b, beta, gamma):
    """For beta << 1 the nascent log-rate is close to normal and both slopes are accurate."""
    from pybivi.cme.moments import moment_base

    p_n, exact = _exact_conditional_means(b, beta, gamma)
    rows = np.flatnonzero(p_n > 1e-3)
    n = torch.tensor(rows, dtype=torch.float64)
    params = [torch.full_like(n, v) for v in (b, beta, gamma)]
    for slope in ("gamma", "lognormal"):
        c, sigma = moment_base(n, *params, slope=slope)
        assert np.abs((c + sigma**2 / 2).numpy() - np.log(exact[rows])).max() < 0.1
