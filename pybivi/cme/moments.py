"""The Poisson-lognormal moment match that places the approximator's kernels, and its VJP.

:func:`moment_base` gives the centre ``c`` and spread ``sigma`` of the mature log-rate
given ``N = n`` (see :mod:`pybivi.cme.approximator` for the derivation); it is plain
autograd-traceable torch, which training differentiates. :func:`moment_match` computes
the same values and keeps the intermediates that :func:`moment_match_vjp` needs for the
gradients with respect to ``(b, beta, gamma)`` in closed form: at run time this is a
third of the operations autograd records for the same graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_SIGMA_MAX = 4.0  # log-scale spread cap: beyond it the lognormal picture is meaningless
_VAR_MIN = 1e-12


def _digamma_trigamma(a: Tensor) -> tuple[Tensor, Tensor]:
    """Cheap smooth ``digamma(a)`` and ``trigamma(a)`` (one recurrence step + asymptotics).

    Accurate to about 1% at ``a -> 0`` and far better for ``a >= 1``; enough for the
    moment match, which the MLP corrects anyway. ``torch.polygamma(1, .)`` would make
    the backward pass call ``polygamma(2, .)``, about 100 times slower than a log. The
    returned trigamma is exactly the derivative of the returned digamma.
    """
    x = a + 1.0
    inv = 1.0 / x
    inv2 = inv * inv
    psi = torch.log(x) - 0.5 * inv - inv2 * (1.0 / 12.0 - inv2 / 120.0) - 1.0 / a
    tri = inv + inv2 * (0.5 + inv * (1.0 / 6.0 - inv2 / 30.0)) + 1.0 / (a * a)
    return psi, tri


def _trigamma_derivative(a: Tensor) -> Tensor:
    """The exact derivative of :func:`_digamma_trigamma`'s trigamma."""
    inv = 1.0 / (a + 1.0)
    inv2 = inv * inv
    return -inv2 * (1.0 + inv * (1.0 + inv * (0.5 - inv2 / 6.0))) - 2.0 / (a * a * a)


SLOPES = ("gamma", "lognormal")
"""How the mature log-rate is regressed on the nascent one (see :func:`moment_match`)."""


class MomentMatch(NamedTuple):
    """Values and intermediates of :func:`moment_match` (all of the pairs' shape)."""

    c: Tensor
    sigma: Tensor
    b: Tensor
    beta: Tensor
    gamma: Tensor
    s2n: Tensor
    q: Tensor
    s2m: Tensor
    kappa: Tensor
    shape0: Tensor
    a_n: Tensor
    tri_n: Tensor
    tri_0: Tensor
    shift: Tensor
    var: Tensor
    slope_scale: Tensor | None  # 1 / sqrt(s2n tri_0) for the "gamma" slope, else None
    slope: Tensor


def _check_slope(slope: str) -> None:
    if slope not in SLOPES:
        raise ValueError(f"slope must be one of {SLOPES}, got {slope!r}")


def moment_match(
    n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor, slope: str = "gamma"
) -> MomentMatch:
    """:func:`moment_base` with the intermediates :func:`moment_match_vjp` needs."""
    _check_slope(slope)
    s2n = torch.log1p(beta)
    q = beta * gamma / (beta + gamma)
    s2m = torch.log1p(q)
    kappa = s2m / s2n  # the lognormal regression slope of the mature log-rate, in (0, 1)
    shape0 = 1.0 / beta
    a_n = shape0 + n
    psi_n, tri_n = _digamma_trigamma(a_n)
    psi_0, tri_0 = _digamma_trigamma(shape0)
    # E[log Lambda_N | n] - E[log Lambda_N] under the exact Gamma prior and posterior
    shift = psi_n - psi_0 - torch.log1p(b)
    if slope == "gamma":
        # The shift and its variance are the Gamma's: regress on the nascent log-rate
        # in the Gamma's own units (log-variance tri_0, not the lognormal's s2n), keeping
        # the lognormal correlation sqrt(kappa). The two agree for small beta; for
        # beta >> 1 (rare bursts, 1/beta << 1) tri_0 ~ beta^2 >> s2n and the lognormal
        # slope would move the centre by tens of nats.
        slope_scale = torch.rsqrt(s2n * tri_0)
        slope_value = s2m * slope_scale
    else:
        slope_scale, slope_value = None, kappa
    c = torch.log(b / gamma) - 0.5 * s2m + slope_value * shift
    var = s2m * (1.0 - kappa) + slope_value**2 * tri_n
    sigma = torch.sqrt(var.clamp(min=_VAR_MIN)).clamp(max=_SIGMA_MAX)
    return MomentMatch(
        c, sigma, b, beta, gamma, s2n, q, s2m, kappa, shape0, a_n, tri_n, tri_0, shift, var,
        slope_scale, slope_value,
    )


def moment_base(
    n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor, slope: str = "gamma"
) -> tuple[Tensor, Tensor]:
    """Centre and spread of the Poisson-lognormal match of the mature log-rate given ``N = n``.

    Returns ``(c, sigma)`` such that ``log Lambda_M | n`` is about ``Normal(c, sigma^2)``:
    ``c = log(b / gamma) - s2m / 2 + a shift`` and ``sigma^2 = s2m (1 - kappa) + a^2
    tri_n``, where ``shift = psi(1/beta + n) - psi(1/beta) - log1p(b)`` and ``tri_n =
    psi'(1/beta + n)`` are the exact change of mean and the variance of the nascent
    log-rate given ``n`` (its prior is ``Gamma(1/beta, scale b)``), ``s2n = log1p(beta)``
    and ``s2m = log1p(beta gamma / (beta + gamma))`` the lognormal log-variances of the
    two rates (``s2m`` is also their log-covariance) and ``kappa = s2m / s2n``. The
    slope ``a`` is ``s2m / sqrt(s2n psi'(1/beta))`` for ``slope="gamma"`` (the default:
    the lognormal correlation, in the Gamma's units) or ``kappa`` for ``"lognormal"``
    (weights written before the option, such as the earlier shipped sha256 5202677a;
    off by up to tens of nats in the centre where ``beta >> 1``).
    """
    match = moment_match(n, b, beta, gamma, slope)
    return match.c, match.sigma


def moment_match_vjp(
    match: MomentMatch, g_c: Tensor, g_sigma: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(g_c * c + g_sigma * sigma)`` with respect to ``(b, beta, gamma)``.

    The chain rule through :func:`moment_match` written out (see :func:`moment_base` for
    the formulas); the clamps of the variance and of ``sigma`` stop the gradient where
    they act, as autograd's would.
    """
    m = match
    free = (m.var > _VAR_MIN) & (m.sigma < _SIGMA_MAX)
    g_var = g_sigma * 0.5 / m.sigma * free
    g_shift = g_c * m.slope
    g_slope = g_c * m.shift + g_var * (2.0 * m.slope * m.tri_n)
    g_kappa = -g_var * m.s2m
    g_tri_0 = None
    g_s2m = g_var * (1.0 - m.kappa) - 0.5 * g_c
    g_s2n = torch.zeros_like(g_c)
    if m.slope_scale is None:  # the slope is kappa itself
        g_kappa = g_kappa + g_slope
    else:  # slope = s2m / sqrt(s2n tri_0)
        g_s2m = g_s2m + g_slope * m.slope_scale
        half = 0.5 * g_slope * m.slope
        g_s2n = g_s2n - half / m.s2n
        g_tri_0 = -half / m.tri_0
    g_s2m = g_s2m + g_kappa / m.s2n
    g_s2n = g_s2n - g_kappa * m.kappa / m.s2n
    g_tri_n = g_var * m.slope**2
    # through psi(a_n) - psi(a_0), a_n = a_0 + n, a_0 = 1 / beta: d psi / da = tri
    g_a_0 = g_shift * (m.tri_n - m.tri_0) + g_tri_n * _trigamma_derivative(m.a_n)
    if g_tri_0 is not None:
        g_a_0 = g_a_0 + g_tri_0 * _trigamma_derivative(m.shape0)
    g_q = g_s2m / (1.0 + m.q)
    total = m.beta + m.gamma
    g_b = g_c / m.b - g_shift / (1.0 + m.b)
    g_beta = g_s2n / (1.0 + m.beta) - g_a_0 * m.shape0**2 + g_q * (m.gamma / total) ** 2
    g_gamma = g_q * (m.beta / total) ** 2 - g_c / m.gamma
    return g_b, g_beta, g_gamma
