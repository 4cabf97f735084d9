"""Generating-function solver for the bursty two-species CME (docs: *Exact solutions*).

The steady-state probability generating function of the bursty scheme (rates in
units of the burst frequency, ``k = 1``) is, with ``u = x - 1`` and ``v = y - 1``,

.. math::

    \\log G(x, y) = \\int_0^\\infty \\frac{U(s)}{1 - U(s)}\\, ds, \\qquad
    U(s) = b\\,\\bigl(u\\, e^{-\\beta s} + v\\, \\beta\\, \\varphi(s)\\bigr),

where :math:`\\beta\\varphi(s) = \\beta (e^{-\\gamma s} - e^{-\\beta s}) / (\\beta - \\gamma)` is
the probability that a molecule born ``s`` ago is mature now. On the unit circle
``Re u <= 0`` and ``Re v <= 0``, so ``Re(1 - U) >= 1``: the integrand has no real
singularity and ``|U / (1 - U)| <= |U|``, which gives a rigorous tail bound.

The integrand does not oscillate in ``s`` but its scales span ``1 / (b max(beta, gamma))``
to ``log(b) / min(beta, gamma)`` (many decades at the edges of the domain). The rule is
composite Gauss-Legendre (16 nodes per panel) with panels sized to a lower bound on the
distance of the integrand's poles from the axis (geometric near the origin, ``~1/r``
wide through the logistic transitions at ``s ~ log(b) / r``), plus one piece on
``[0, s_lo]``; the upper end comes from the tail bound. Poles closer than that bound
(opposite-sign ``Im u``, ``Im v`` at large ``b``) are subtracted per grid point
(:mod:`pybivi.cme.poles`). Against a rule with ~4x the nodes, over the whole domain,
``|Delta G| <= 2e-14`` (tests/test_exact.py checks 1e-11). The nodes are shared by every
grid point, so the cost is ``nodes x grid``; Hermitian symmetry halves the grid.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial.legendre import leggauss

from pybivi.cme.poles import pole_correction, pole_distance_bound

# Rule parameters, chosen by measured error against a rule with four times as many
# nodes over the whole domain (see tests/test_exact.py and benchmarks/exact_solver.py).
PANEL_STEP = 1.5  # panel width / distance of the nearest unresolved pole
PANEL_NODES = 16  # Gauss-Legendre nodes per panel
HEAD_NODES = 12  # Gauss-Legendre nodes on [0, s_lo]
HEAD_SCALE = 0.5  # s_lo = HEAD_SCALE / (max(beta, gamma) (1 + 2 b))
TAIL_TOL = 1e-16  # bound on the neglected integral over [s_hi, inf)
# Elements per block of the vectorised (nodes x grid) evaluation: big enough to
# amortise numpy's per-call overhead on small grids, small enough for the cache.
BLOCK_ELEMENTS = 1 << 16
CHUNK_ELEMENTS = 1 << 13  # row chunk of large grids (128 KiB of complex128: stays in cache)
LIGHT_WEIGHT = 0.05  # nodes with larger weights use the cancellation-free quotient
NODE_GROUP = 8  # nodes whose weights are subtracted together from the accumulator


def mature_fraction(s: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Probability ``beta * phi(s)`` that a molecule of age ``s`` is mature.

    Computed as ``beta * exp(-min(beta, gamma) s) * (-expm1(-|beta - gamma| s)) / |beta - gamma|``,
    which is continuous through ``beta == gamma`` (limit ``beta s exp(-beta s)``) and
    never forms the large cancelling coefficients ``beta / (beta - gamma)``.
    """
    s = np.asarray(s, dtype=np.float64)
    rmin = min(beta, gamma)
    d = abs(beta - gamma)
    if d == 0.0:
        frac = s
    else:
        frac = -np.expm1(-d * s) / d
    return beta * np.exp(-rmin * s) * frac


def _tail_bound(s: float, b: float, beta: float, gamma: float) -> float:
    """Upper bound on ``int_s^inf |U/(1-U)| ds`` over the whole unit torus.

    ``|u|, |v| <= 2`` and ``|1 - U| >= 1`` give
    ``|U/(1-U)| <= 2 b (e^{-beta s} + beta phi(s))``, and
    ``beta phi(s) <= beta e^{-r s} min(s, 1/d)`` with ``r = min(beta, gamma)``,
    ``d = |beta - gamma|``.
    """
    r = min(beta, gamma)
    d = abs(beta - gamma)
    nascent = math.exp(-beta * s) / beta
    mature = beta * math.exp(-r * s) * (s / r + 1.0 / r**2)
    if d > 0.0:
        mature = min(mature, beta * math.exp(-r * s) / (r * d))
    return 2.0 * b * (nascent + mature)


def upper_limit(b: float, beta: float, gamma: float, tol: float = TAIL_TOL) -> float:
    """Smallest ``s_hi`` (within a factor 1.01) whose tail bound is below ``tol``."""
    lo = 0.0
    hi = 1.0 / min(beta, gamma)
    while _tail_bound(hi, b, beta, gamma) > tol:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 0.01 * hi:
        mid = 0.5 * (lo + hi)
        if _tail_bound(mid, b, beta, gamma) > tol:
            lo = mid
        else:
            hi = mid
    return hi


def panel_edges(
    b: float, beta: float, gamma: float, s_lo: float, s_hi: float, step: float = PANEL_STEP
) -> np.ndarray:
    """Panel breakpoints on ``[s_lo, s_hi]`` sized to the distance to the nearest pole.

    The poles of ``U/(1-U)`` that the rule must resolve (those of the opposite-sign
    crossing are subtracted, see :mod:`pybivi.cme.poles`) lie at least ``~s`` away in angle
    (scale invariance near the origin) and at least ``pi / (2 r)`` off the axis where the
    exponential of rate ``r`` still matters (the logistic transition of ``b c e^{-r s}``
    through 1 at ``s ~ log(b) / r``). A panel of width ``step * D`` with ``D`` that distance
    bound puts the pole ``2 / step`` half-widths away: the Gauss-Legendre error then decays
    like ``(2/step + sqrt(1 + 4/step^2))^(-2 n)``.
    """
    edges = [s_lo]
    s = s_lo
    while s < s_hi:
        s = min(s + step * float(pole_distance_bound(s, b, beta, gamma)), s_hi)
        edges.append(s)
    return np.asarray(edges)


def quadrature_rule(
    b: float,
    beta: float,
    gamma: float,
    step: float = PANEL_STEP,
    panel_nodes: int = PANEL_NODES,
    head_nodes: int = HEAD_NODES,
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights in ``s`` for ``int_0^s_hi f(s) ds`` at the given parameters.

    Parameters
    ----------
    b, beta, gamma
        Burst size and splicing/degradation rates (units of the burst frequency).
    step, panel_nodes, head_nodes
        Rule resolution (defaults are the calibrated values): panel width relative to
        the pole-distance bound, Gauss-Legendre nodes per panel and on ``[0, s_lo]``.

    Returns
    -------
    nodes, weights
        Float64 arrays of equal length, nodes increasing; the weights sum to ``s_hi``.
    """
    # Near s = 0 the integrand varies on the scale 1 / (b max(beta, gamma))
    # (U ~ b u + b v beta s), so the panels reach down to there.
    s_lo = HEAD_SCALE / (max(beta, gamma) * (1.0 + 2.0 * b))
    s_hi = max(upper_limit(b, beta, gamma), 2.0 * s_lo)
    x, w = leggauss(head_nodes)
    head_s = 0.5 * s_lo * (x + 1.0)
    head_w = 0.5 * s_lo * w
    edges = panel_edges(b, beta, gamma, s_lo, s_hi, step)
    half = 0.5 * np.diff(edges)[:, None]
    mid = 0.5 * (edges[:-1] + edges[1:])[:, None]
    xp, wp = leggauss(panel_nodes)
    nodes = (mid + half * xp[None, :]).ravel()
    weights = (half * wp[None, :]).ravel()
    return np.concatenate([head_s, nodes]), np.concatenate([head_w, weights])


def unit_circle_minus_one(length: int, count: int | None = None) -> np.ndarray:
    """``exp(-2 pi i k / length) - 1`` for ``k < count``, accurate for small angles."""
    k = np.arange(length if count is None else count, dtype=np.float64)
    theta = 2.0 * np.pi * k / length
    return -2.0 * np.sin(0.5 * theta) ** 2 - 1j * np.sin(theta)


def log_gf(
    u: np.ndarray,
    v: np.ndarray,
    b: float,
    beta: float,
    gamma: float,
    nodes: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    subtract_poles: bool = True,
) -> np.ndarray:
    """``log G`` on the outer grid ``(u[i], v[j])``: shape ``(len(u), len(v))``, complex128.

    ``u`` and ``v`` must satisfy ``Re u <= 0``, ``Re v <= 0`` (points of the unit
    torus minus one); the tail bound and the absence of real poles rely on it.
    """
    if nodes is None or weights is None:
        nodes, weights = quadrature_rule(b, beta, gamma)
    u = np.asarray(u, dtype=np.complex128)
    v = np.asarray(v, dtype=np.complex128)
    a_k = np.exp(-beta * nodes)
    c_k = mature_fraction(nodes, beta, gamma)
    bu = b * a_k[:, None] * u[None, :]
    bv = b * c_k[:, None] * v[None, :]
    # Light nodes: w U/(1-U) = w/(1-U) - w. Dividing (1-U) by w first folds the weight
    # into the reciprocal (three array passes per node); the cancellation costs
    # ~1e-16 w per node, negligible while w is small. Heavy nodes (far out in s, where U
    # is tiny and w large) use the four-pass quotient w U / (1 - U), free of it.
    light = weights <= LIGHT_WEIGHT
    w_l, w_h = weights[light], weights[~light]
    acc = _accumulate(None, None, (1.0 - bu[light]) / w_l[:, None], -bv[light] / w_l[:, None], w_l)
    acc += _accumulate(
        w_h[:, None] * bu[~light], w_h[:, None] * bv[~light], 1.0 - bu[~light], -bv[~light], None
    )
    if subtract_poles:
        acc += pole_correction(u, v, b, beta, gamma, nodes, weights)
    return acc


def _accumulate(
    num_u: np.ndarray | None,
    num_v: np.ndarray | None,
    den_u: np.ndarray,
    den_v: np.ndarray,
    offset: np.ndarray | None,
) -> np.ndarray:
    """``sum_k (num_u[k, i] + num_v[k, j]) / (den_u[k, i] + den_v[k, j]) - offset[k]``.

    ``num_u is None`` means a numerator of 1; ``offset is None`` means no offset. Small
    grids are vectorised over blocks of nodes (amortising numpy's per-call cost); large
    ones loop over nodes inside cache-sized row chunks. Offsets are subtracted per group
    of ``NODE_GROUP`` nodes, so the accumulator stays of the size of ``log G``.
    """
    n_k, n_u, n_v = den_u.shape[0], den_u.shape[1], den_v.shape[1]
    acc = np.zeros((n_u, n_v), dtype=np.complex128)
    if n_k == 0:
        return acc
    if n_u * n_v <= BLOCK_ELEMENTS:
        step = max(1, BLOCK_ELEMENTS // (n_u * n_v))
        for start in range(0, n_k, step):
            sl = slice(start, start + step)
            t = den_u[sl, :, None] + den_v[sl, None, :]
            if num_u is None:
                np.reciprocal(t, out=t)
            else:
                np.divide(num_u[sl, :, None] + num_v[sl, None, :], t, out=t)
            if offset is not None:
                t -= offset[sl, None, None]
            acc += t.sum(axis=0)
        return acc
    rows = max(1, CHUNK_ELEMENTS // n_v)
    t = np.empty((rows, n_v), dtype=np.complex128)
    t2 = np.empty((rows, n_v), dtype=np.complex128)
    group = None if offset is None else np.add.reduceat(offset, np.arange(0, n_k, NODE_GROUP))
    for r0 in range(0, n_u, rows):
        r1 = min(r0 + rows, n_u)
        out, tt, tn = acc[r0:r1], t[: r1 - r0], t2[: r1 - r0]
        for k in range(n_k):
            np.add(den_u[k, r0:r1, None], den_v[k, None, :], out=tt)
            if num_u is None:
                np.reciprocal(tt, out=tt)
            else:
                np.add(num_u[k, r0:r1, None], num_v[k, None, :], out=tn)
                np.divide(tn, tt, out=tt)
            out += tt
            if group is not None and (k % NODE_GROUP == NODE_GROUP - 1 or k == n_k - 1):
                out -= group[k // NODE_GROUP]
    return acc


def bursty_pmf_fft(
    b: float, beta: float, gamma: float, len_nascent: int, len_mature: int
) -> tuple[np.ndarray, np.ndarray]:
    """Joint PMF on the periodic grid ``(len_nascent, len_mature)`` by a 2-D inverse FFT.

    The result is the aliased PMF ``sum_{j,l} P(n + j L_N, m + l L_M)``; callers choose
    the grid so that the folded mass is negligible. Round-off of the FFT leaves values of
    order ``1e-17`` that may be negative; they are clipped to zero in the joint PMF.

    Returns
    -------
    pmf
        Shape ``(len_nascent, len_mature)``, clipped at zero.
    mature_marginal
        The unclipped 1-D inverse FFT of ``G(1, y)``: sums of its entries are free of
        the clipping bias, which makes it the right tool for tail-mass checks.
    """
    u = unit_circle_minus_one(len_nascent)
    v = unit_circle_minus_one(len_mature, len_mature // 2 + 1)
    gf = np.exp(log_gf(u, v, b, beta, gamma))
    gf[0, 0] = 1.0  # G(1, 1) = 1 exactly (the integrand vanishes at u = v = 0)
    pmf = np.fft.irfft2(gf, s=(len_nascent, len_mature))
    np.clip(pmf, 0.0, None, out=pmf)
    return pmf, np.fft.irfft(gf[0], n=len_mature)
