"""Pole subtraction for the bursty generating-function integral.

Where ``Im u`` and ``Im v`` have opposite signs the integrand ``U/(1-U)`` of
:func:`pybivi.cme.quadrature.log_gf` has a simple pole just off the real ``s`` axis, as
close as ``~1 / (b |v| beta)`` at large ``b``: a Lorentzian far narrower than a rule
shared by all grid points can resolve. This module finds those poles per grid point and
returns the correction ``int c/(s - s_p) ds - rule(c/(s - s_p))``, which is exact for
any ``(c, s_p)`` off the path; subtracting the principal part leaves a smooth remainder.
"""

from __future__ import annotations

import math

import numpy as np

ANGLE = 0.8  # poles near the origin lie at least ANGLE * s away from s
BLOCK_ELEMENTS = 1 << 16  # (nodes x poles) elements per vectorised block


def _mature_fraction_complex(s: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """``beta * phi(s)`` for complex ``s`` (stable through ``beta == gamma``)."""
    rmin = min(beta, gamma)
    d = abs(beta - gamma)
    frac = s if d == 0.0 else -np.expm1(-d * s) / d
    return beta * np.exp(-rmin * s) * frac


def pole_distance_bound(s: np.ndarray, b: float, beta: float, gamma: float) -> np.ndarray:
    """Distance from ``s`` that the rule resolves: nearer poles must be subtracted.

    Poles near the origin lie at least ``ANGLE * s`` away (scale invariance), and those
    of the logistic transition of the part with rate ``r`` (``b c e^{-r s}`` crossing 1,
    over before ``(log(2 + 2 b) + 3) / r`` since ``|U| <= 2 b (e^{-beta s} + beta phi)``)
    lie ``pi / (2 r)`` off the axis; ``quadrature.panel_edges`` sizes panels to it.
    """
    s = np.asarray(s, dtype=np.float64)
    rmax, rmin = max(beta, gamma), min(beta, gamma)
    log_c = math.log(2.0 + 2.0 * b) + 3.0
    dist = ANGLE * s
    fast = np.minimum(dist, 0.5 * math.pi / rmax)
    slow = np.minimum(dist, 0.5 * math.pi / rmin)
    return np.where(s < log_c / rmax, fast, np.where(s < log_c / rmin, slow, dist))


def _near_poles(
    u: np.ndarray, v: np.ndarray, b: float, beta: float, gamma: float, iterations: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poles of ``1/(1-U(s))`` too near the positive axis for the rule, and residues.

    When ``Im u`` and ``Im v`` have opposite signs, ``Im U(s)`` crosses zero once, at
    ``s*`` where ``e^{-beta s} / (beta phi(s)) = -Im v / Im u`` (closed form below).
    Around ``s*`` the integrand is a Lorentzian of width ``~|1 - U(s*)| / |U'(s*)|``,
    which can be far narrower than any shared rule resolves when ``b`` is large; it
    comes from a simple pole just off the axis. One linearisation at ``s*`` screens the
    grid points whose pole is nearer than :func:`pole_distance_bound` (a few percent);
    Newton's method locates those poles. Subtracting ``c/(s - s_p)`` and adding its
    exact integral is exact for any ``(c, s_p)`` off the real axis, so a skipped or
    poorly converged pole only costs accuracy, never correctness.

    Returns
    -------
    index, s_p, residue
        Flat indices into the ``(len(u), len(v))`` grid and, for each, the pole and the
        residue ``c = -1 / U'(s_p)``.
    """
    im_u = np.broadcast_to(u.imag[:, None], (u.size, v.size))
    im_v = np.broadcast_to(v.imag[None, :], (u.size, v.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = -im_v / im_u  # e^{-beta s*} / (beta phi(s*)) at the crossing
        x = (beta - gamma) / (beta * ratio)
        # s* = log1p(x) / (beta - gamma) = log1p(x)/x / (beta ratio), continuous at beta == gamma
        lx = np.where(np.abs(x) < 1e-8, 1.0 - 0.5 * x, np.log1p(x) / np.where(x == 0, 1.0, x))
        s0 = lx / (beta * ratio)
    idx = np.flatnonzero((ratio > 0) & np.isfinite(s0) & (s0 > 0) & (x > -1.0))
    uu = u[idx // v.size]
    vv = v[idx % v.size]
    s_p = s0.ravel()[idx].astype(np.complex128)
    # Newton may wander off where no pole is near; overflow there is harmless because
    # such points fail the convergence test below.
    with np.errstate(all="ignore"):
        one_minus_u, du = _one_minus_u_and_slope(s_p, uu, vv, b, beta, gamma)
        near = np.abs(one_minus_u / du) < 2.0 * pole_distance_bound(s_p.real, b, beta, gamma)
        idx, uu, vv, s_p = idx[near], uu[near], vv[near], s_p[near]
        for _ in range(iterations):
            one_minus_u, du = _one_minus_u_and_slope(s_p, uu, vv, b, beta, gamma)
            s_p = s_p + one_minus_u / du
        one_minus_u, du = _one_minus_u_and_slope(s_p, uu, vv, b, beta, gamma)
        residue = -1.0 / du
        # Keep converged poles off the integration path (true poles always are:
        # |1 - U| >= 1 for real s >= 0).
        ok = np.isfinite(s_p) & np.isfinite(residue) & (np.abs(one_minus_u) < 1e-9)
        ok &= (s_p.imag != 0) | (s_p.real < 0)
    return idx[ok], s_p[ok], residue[ok]


def _one_minus_u_and_slope(
    s: np.ndarray, uu: np.ndarray, vv: np.ndarray, b: float, beta: float, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """``1 - U(s)`` and ``U'(s)`` at complex ``s``.

    Uses ``(beta phi)' = beta e^{-beta s} - gamma beta phi``.
    """
    a_s = np.exp(-beta * s)
    c_s = _mature_fraction_complex(s, beta, gamma)
    one_minus_u = 1.0 - b * (uu * a_s + vv * c_s)
    du = b * (-beta * uu * a_s + vv * (beta * a_s - gamma * c_s))
    return one_minus_u, du


def pole_correction(
    u: np.ndarray,
    v: np.ndarray,
    b: float,
    beta: float,
    gamma: float,
    nodes: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """Exact integral minus the rule's value of ``c/(s - s_p)`` over ``[0, s_end]``."""
    idx, sp, c = _near_poles(u, v, b, beta, gamma)
    out = np.zeros((u.size, v.size), dtype=np.complex128)
    if idx.size == 0:
        return out
    s_end = _rule_end(nodes, weights)
    # s - s_p keeps a constant non-zero imaginary part along the real path, so the
    # principal logarithm never crosses its branch cut.
    exact = c * (np.log(s_end - sp) - np.log(-sp))
    approx = np.zeros(idx.size, dtype=np.complex128)
    step = max(1, BLOCK_ELEMENTS // idx.size)
    for start in range(0, nodes.size, step):
        sl = slice(start, start + step)
        approx += (weights[sl, None] / (nodes[sl, None] - sp[None, :])).sum(axis=0)
    out.flat[idx] = exact - c * approx
    return out


def _rule_end(nodes: np.ndarray, weights: np.ndarray) -> float:
    """Upper end ``s_hi`` of the interval ``[0, s_hi]`` that a rule integrates.

    Every piece is Gauss-Legendre, exact for constants, so the weights sum to ``s_hi``.
    """
    return float(weights.sum())
