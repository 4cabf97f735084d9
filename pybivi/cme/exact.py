"""Exact steady-state joint PMFs of the two-species (nascent, mature) reaction schemes.

Public entry points
-------------------
* :func:`exact_pmf` -- the joint PMF on ``{0..n_max} x {0..m_max}`` (float64 numpy).
* :func:`exact_pmf_many` -- many parameter sets, optionally skipping huge state spaces.
* :func:`suggest_grid` -- the natural grid ``(n_max, m_max)`` of a parameter set.
* :func:`analytic_moments` -- closed-form means and covariance matrix.

Rates are in units of the burst frequency (``k = 1``); parameter names are the short
ones: bursty ``b, beta, gamma``; constitutive ``beta, gamma``; extrinsic
``alpha, beta, gamma``. The bursty law is computed from its generating function by a
2-D inverse FFT (:mod:`pybivi.cme.quadrature`); the other two are closed forms.

Accuracy: values are exact up to absolute errors of order ``1e-12`` (quadrature and
FFT round-off; tiny negative round-off is clipped to zero), and with the default grid
the mass outside the returned array is at most ``2e-12`` (``TAIL`` per species).
Relative accuracy of probabilities far below ``1e-12`` is not guaranteed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import fft as sp_fft
from scipy import special, stats

from pybivi.cme.quadrature import bursty_pmf_fft, log_gf, unit_circle_minus_one

KNOWN_SCHEMES: dict[str, tuple[str, ...]] = {
    "bursty": ("b", "beta", "gamma"),
    "constitutive": ("beta", "gamma"),
    "extrinsic": ("alpha", "beta", "gamma"),
}
TAIL = 1e-12  # mass left beyond the default crop, per species
ALIAS_TAIL = 1e-13  # mass beyond the FFT grid (folded back onto it), per species
MAX_FFT_POINTS = 30_000_000  # half-spectrum points (x 16 bytes) before refusing


def _check_scheme(scheme: str) -> str:
    if not isinstance(scheme, str) or scheme not in KNOWN_SCHEMES:
        raise ValueError(
            f"unknown reaction scheme {scheme!r}; known schemes: {', '.join(KNOWN_SCHEMES)}"
        )
    return scheme


def _check_params(scheme: str, params: Mapping[str, object]) -> dict[str, float]:
    """Validate the kinetic parameters of ``scheme``: exactly the expected names, finite, > 0."""
    names = KNOWN_SCHEMES[_check_scheme(scheme)]
    missing = [n for n in names if n not in params]
    extra = [n for n in params if n not in names]
    if missing or extra:
        raise ValueError(
            f"scheme {scheme!r} takes parameters {names}; "
            f"missing {missing}, unexpected {extra}"
        )
    out = {}
    for name in names:
        value = params[name]
        # Python/numpy scalars and 0-d arrays or tensors; not bools, sequences or complex.
        if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
            raise ValueError(f"parameter {name!r} must be a real scalar, got {value!r}")
        if np.iscomplexobj(value):
            raise ValueError(f"parameter {name!r} must be a real scalar, got {value!r}")
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise ValueError(f"parameter {name!r} must be a real scalar, got {value!r}") from err
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"parameter {name!r} must be positive and finite, got {value!r}")
        out[name] = value
    return out


def _check_size(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    return int(value)


def analytic_moments(scheme: str, **params: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form steady-state means and covariance matrix of (nascent, mature).

    Parameters
    ----------
    scheme
        ``"bursty"``, ``"constitutive"`` or ``"extrinsic"``.
    **params
        Short kinetic parameter names (see module docstring).

    Returns
    -------
    mean, cov
        Arrays of shape ``(2,)`` and ``(2, 2)``.
    """
    p = _check_params(scheme, params)
    beta, gamma = p["beta"], p["gamma"]
    if scheme == "bursty":
        b = p["b"]
        mean = np.array([b / beta, b / gamma])
        var_n = mean[0] * (1.0 + b)
        var_m = mean[1] * (1.0 + b * beta / (beta + gamma))
        cov_nm = b * b / (beta + gamma)
    elif scheme == "constitutive":
        mean = np.array([1.0 / beta, 1.0 / gamma])
        var_n, var_m, cov_nm = mean[0], mean[1], 0.0
    else:
        alpha = p["alpha"]
        mean = np.array([alpha / beta, alpha / gamma])
        var_n = mean[0] + mean[0] ** 2 / alpha
        var_m = mean[1] + mean[1] ** 2 / alpha
        cov_nm = mean[0] * mean[1] / alpha
    return mean, np.array([[var_n, cov_nm], [cov_nm, var_m]])


def _nb_isf(tail: float, shape: float, mean: float) -> int:
    """Smallest ``n`` with ``P(X > n) <= tail``, ``X ~ NB(shape, mean)`` (Poisson if shape huge)."""
    if shape > 1e12:
        return int(stats.poisson.isf(tail, mean))
    return int(stats.nbinom.isf(tail, shape, shape / (shape + mean)))


def _mature_bound(tail: float, b: float, beta: float, gamma: float) -> int:
    """Quantile of an NB moment-matched to the bursty mature marginal.

    The mature tail decays like ``(1 + 1 / (b max_s beta phi(s)))^-m`` and
    ``max_s beta phi(s) <= beta / (beta + gamma)``, so asymptotically the matched NB
    (whose tail ratio uses ``beta / (beta + gamma)``) decays no faster; at finite
    quantiles it is an estimate, not a bound (about 5% short at b=30, beta=1,
    gamma=0.05). :func:`exact_pmf` sizes its grid from the exact 1-D marginal instead.
    """
    mean = b / gamma
    excess = b * beta / (beta + gamma)  # Var / mean - 1
    return _nb_isf(tail, mean / excess, mean)


def _natural_grid(scheme: str, p: dict[str, float], tail: float) -> tuple[int, int]:
    beta, gamma = p["beta"], p["gamma"]
    if scheme == "bursty":
        b = p["b"]
        return _nb_isf(tail, 1.0 / beta, b / beta), _mature_bound(tail, b, beta, gamma)
    if scheme == "constitutive":
        return int(stats.poisson.isf(tail, 1.0 / beta)), int(stats.poisson.isf(tail, 1.0 / gamma))
    alpha = p["alpha"]
    return _nb_isf(tail, alpha, alpha / beta), _nb_isf(tail, alpha, alpha / gamma)


def suggest_grid(scheme: str, tail: float = TAIL, **params: float) -> tuple[int, int]:
    """Natural grid ``(n_max, m_max)``: each species' mass beyond it is at most ``tail``.

    Cheap (no PMF is computed). Exact for the nascent species of every scheme and for
    both species of the constitutive and extrinsic schemes; for the bursty mature
    species it is a moment-matched estimate, usually a little above the exact
    quantile that :func:`exact_pmf` crops at (rarely a few percent below it).

    Parameters
    ----------
    scheme
        ``"bursty"``, ``"constitutive"`` or ``"extrinsic"``.
    tail
        Mass allowed beyond the grid, per species (``0 < tail < 1``).
    **params
        Short kinetic parameter names.
    """
    p = _check_params(scheme, params)
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail must be in (0, 1), got {tail!r}")
    return _natural_grid(scheme, p, tail)


def _quantile_from_pmf(marginal: np.ndarray, tail: float) -> int:
    """Smallest ``m`` with ``sum(marginal[m+1:]) <= tail``."""
    upper = np.cumsum(marginal[::-1])[::-1]  # upper[m] = sum(marginal[m:])
    above = np.flatnonzero(upper > tail)
    return int(above[-1]) if above.size else 0


def _mature_quantile(b: float, beta: float, gamma: float, tail: float) -> int:
    """Exact ``tail`` quantile of the bursty mature marginal, from a 1-D transform.

    ``G(1, y)`` costs ``nodes x L_M / 2`` (negligible next to the joint), so the joint's
    FFT grid can be sized to the true tail rather than to a moment-matched guess. The
    1-D grid starts at twice the matched-NB quantile and doubles until its last fifth
    holds no mass.
    """
    length = sp_fft.next_fast_len(2 * _mature_bound(tail, b, beta, gamma) + 16, real=True)
    for _ in range(8):
        v = unit_circle_minus_one(length, length // 2 + 1)
        gf = np.exp(log_gf(np.zeros(1), v, b, beta, gamma)[0])
        gf[0] = 1.0
        marginal = np.fft.irfft(gf, n=length)
        if abs(marginal[-(length // 5) :].sum()) <= 0.1 * tail:
            break
        length = sp_fft.next_fast_len(2 * length, real=True)
    return _quantile_from_pmf(np.clip(marginal, 0.0, None), tail)


def _bursty(p: dict[str, float], n_max: int | None, m_max: int | None) -> np.ndarray:
    b, beta, gamma = p["b"], p["beta"], p["gamma"]
    n_alias = _nb_isf(ALIAS_TAIL, 1.0 / beta, b / beta)
    len_n = sp_fft.next_fast_len(max(n_alias, n_max or 0) + 2, real=True)
    # Refuse hopeless sizes before any transform (the matched-NB estimate is within a
    # few percent of the exact quantile).
    m_guess = max(_mature_bound(ALIAS_TAIL, b, beta, gamma), m_max or 0)
    len_m = 0
    if len_n * (m_guess // 2 + 1) <= 2 * MAX_FFT_POINTS:
        m_alias = _mature_quantile(b, beta, gamma, ALIAS_TAIL)
        len_m = sp_fft.next_fast_len(max(m_alias, m_max or 0) + 2, real=True)
    if len_m == 0 or len_n * (len_m // 2 + 1) > MAX_FFT_POINTS:
        len_m = len_m or m_guess
        raise ValueError(
            f"state space too large for the exact bursty solver: FFT grid {len_n} x "
            f"{len_m} (b={b:g}, beta={beta:g}, gamma={gamma:g}); use suggest_grid to "
            "skip such parameter sets"
        )
    # Both axes reach past the ALIAS_TAIL quantile of their (exact) marginals, so the
    # mass folded back by the periodic transform is below 2 * ALIAS_TAIL.
    pmf, marginal = bursty_pmf_fft(b, beta, gamma, len_n, len_m)
    if n_max is None:
        n_max = _nb_isf(TAIL, 1.0 / beta, b / beta)
    if m_max is None:
        m_max = _quantile_from_pmf(np.clip(marginal, 0.0, None), TAIL)
    return pmf[: n_max + 1, : m_max + 1]


def _constitutive(p: dict[str, float], n_max: int, m_max: int) -> np.ndarray:
    pn = stats.poisson.pmf(np.arange(n_max + 1), 1.0 / p["beta"])
    pm = stats.poisson.pmf(np.arange(m_max + 1), 1.0 / p["gamma"])
    return np.outer(pn, pm)


def _extrinsic(p: dict[str, float], n_max: int, m_max: int) -> np.ndarray:
    a = p["alpha"]
    m1, m2 = a / p["beta"], a / p["gamma"]
    n = np.arange(n_max + 1, dtype=np.float64)[:, None]
    m = np.arange(m_max + 1, dtype=np.float64)[None, :]
    # The extrinsic closed form, in log space (gammaln, xlogy) so large counts do not overflow.
    logp = (
        special.xlogy(a, a)
        - (a + n + m) * np.log(a + m1 + m2)
        + n * np.log(m1)
        + m * np.log(m2)
        + special.gammaln(n + m + a)
        - special.gammaln(a)
        - special.gammaln(n + 1.0)
        - special.gammaln(m + 1.0)
    )
    return np.exp(logp)


def exact_pmf(
    scheme: str, n_max: int | None = None, m_max: int | None = None, **params: float
) -> np.ndarray:
    """Exact steady-state joint PMF ``P(n, m)`` of a reaction scheme.

    Parameters
    ----------
    scheme
        ``"bursty"``, ``"constitutive"`` or ``"extrinsic"``.
    n_max, m_max
        Largest nascent / mature count returned. ``None`` (default) crops where each
        species' remaining mass is at most ``TAIL = 1e-12``. The bursty solver always
        works on a grid large enough that aliasing is negligible and then crops, so a
        small ``n_max`` gives exact (not renormalised) values.
    **params
        Short kinetic parameter names, rates in units of the burst frequency: bursty
        ``b, beta, gamma``; constitutive ``beta, gamma``; extrinsic ``alpha, beta, gamma``.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(n_max + 1, m_max + 1)``; ``[n, m]`` is ``P(N=n, M=m)``.

    Raises
    ------
    ValueError
        Unknown scheme, missing/unexpected/non-positive parameters, bad sizes, or a
        bursty state space too large to transform.

    Examples
    --------
    >>> p = exact_pmf("bursty", b=2.0, beta=1.0, gamma=0.5)
    >>> abs(p.sum() - 1.0) < 1e-10
    True
    """
    p = _check_params(scheme, params)
    n_max = _check_size("n_max", n_max)
    m_max = _check_size("m_max", m_max)
    if scheme == "bursty":
        return _bursty(p, n_max, m_max)
    n_nat, m_nat = _natural_grid(scheme, p, TAIL)
    n_max = n_nat if n_max is None else n_max
    m_max = m_nat if m_max is None else m_max
    if scheme == "constitutive":
        return _constitutive(p, n_max, m_max)
    return _extrinsic(p, n_max, m_max)


def exact_pmf_many(
    scheme: str,
    params: Iterable[Mapping[str, float]],
    n_max: int | None = None,
    m_max: int | None = None,
    max_per_species: int | None = None,
) -> list[np.ndarray | None]:
    """:func:`exact_pmf` for many parameter sets (e.g. an approximator's training data).

    Parameters
    ----------
    scheme
        Scheme name shared by all sets.
    params
        Iterable of mappings of short parameter names.
    n_max, m_max
        As in :func:`exact_pmf`, applied to every set.
    max_per_species
        If given, sets whose :func:`suggest_grid` exceeds it on either species are
        skipped (``None`` in the output) without computing anything.

    Returns
    -------
    list
        One array (or ``None`` for a skipped set) per parameter set, in order.
    """
    _check_scheme(scheme)
    out: list[np.ndarray | None] = []
    for p in params:
        if max_per_species is not None and max(suggest_grid(scheme, **p)) > max_per_species:
            out.append(None)
            continue
        out.append(exact_pmf(scheme, n_max=n_max, m_max=m_max, **p))
    return out
