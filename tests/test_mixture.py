"""Pieces of the fused mixture against their definitions (float64, scipy where it helps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from pybivi.cme.mixture import _exp_, _rising_ratio_and_dlogr


def _grid():
    m = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 40.0, 1e3, 2e5], dtype=torch.float64)
    r = torch.tensor([0.01, 0.3, 1.0, 7.9, 8.0, 30.0, 1e3, 1e6], dtype=torch.float64)
    mm, rr = torch.meshgrid(m, r, indexing="ij")
    return mm.reshape(-1), rr.reshape(-1)


def test_rising_ratio_and_its_derivative_match_lgamma_and_digamma():
    """``lgamma(m + r) - lgamma(r) - m log r`` and ``r (psi(m + r) - psi(r)) - m``, both branches.

    The reference is scipy in float64 (for r >= 8 Stirling's series is what avoids the
    cancellation; scipy's values at r = 1e6 are themselves cancelling, hence the
    absolute floor there).
    """
    m, r = _grid()
    value, deriv = _rising_ratio_and_dlogr(m, torch.log(r))
    mn, rn = m.numpy(), r.numpy()
    exact = special.gammaln(mn + rn) - special.gammaln(rn) - mn * np.log(rn)
    exact_deriv = rn * (special.digamma(mn + rn) - special.digamma(rn)) - mn
    floor = 1e-9 * np.maximum(1.0, mn * np.log(rn).clip(min=1.0)) * np.where(rn > 1e5, 1e3, 1.0)
    np.testing.assert_allclose(value.numpy(), exact, rtol=1e-9, atol=1e-9 + floor.max())
    np.testing.assert_allclose(deriv.numpy(), exact_deriv, rtol=1e-7, atol=1e-7 + floor.max())


def test_rising_ratio_vanishes_for_zero_and_one_molecule():
    m, r = _grid()
    value, deriv = _rising_ratio_and_dlogr(m, torch.log(r))
    few = m <= 1
    assert bool((value[few] == 0).all()) and bool((deriv[few] == 0).all())
    assert bool((value[~few].abs() > 0).any())  # and not elsewhere


def test_rising_ratio_matches_autograd_of_its_value():
    """The derivative is d/dlog r of the value (finite differences in float64).

    Steps stay on one side of the branch switch at r = 8 (the series' truncation, about
    3e-10 at r = 8, divided by a step of 1e-6 would dominate).
    """
    m, r = _grid()
    keep = (m >= 2) & (r < 1e5) & (r != 8.0)
    log_r = torch.log(r[keep])
    step = 1e-6
    up, _ = _rising_ratio_and_dlogr(m[keep], log_r + step)
    down, _ = _rising_ratio_and_dlogr(m[keep], log_r - step)
    _, deriv = _rising_ratio_and_dlogr(m[keep], log_r)
    torch.testing.assert_close(deriv, (up - down) / (2 * step), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_by_powers_of_two_is_exp_for_non_positive_arguments(dtype):
    x = -torch.cat([torch.logspace(-8, math.log10(79.0), 2000), torch.tensor([0.0])]).to(dtype)
    got = _exp_(x.clone())
    want = torch.exp(x)
    assert bool(((got - want).abs() <= 3e-8 + 4 * torch.finfo(dtype).eps * want).all())
    far = _exp_(torch.tensor([-100.0, -1e4], dtype=dtype))
    torch.testing.assert_close(far, torch.full_like(far, math.exp(-80.0)), rtol=1e-5, atol=0)
