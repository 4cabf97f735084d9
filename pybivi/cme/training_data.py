"""Exact conditionals P(m | n) of the bursty CME for training and scoring the approximator.

The approximator is trained and scored on exact joints ``P(n, m)`` of the bursty
scheme. Everything here is numpy, float64, and independent of the network.

Domain
------
See :mod:`pybivi.cme.domain`: the box in ``(log10 b, log10 beta, log10 gamma)`` cut by
a state cap on the ``1 - 1e-10`` marginal quantiles (:func:`inside_state_cap`). The
cap excludes large bursts with heavy tails (most of ``b > 100``) and large means.
Outside it the approximator clamps its features (see :mod:`pybivi.cme.approximator`).

Data layout
-----------
One design (parameter set) gives a list of conditionals; each conditional is a row
``n`` of the joint with its weight (the nascent mass it stands for) and the
normalised vector ``P(m | n)`` on ``m_lo <= m < m_lo + len``. Arrays are flat and
concatenated (see :class:`ConditionalSet`), so that training code can index them
without Python loops.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import stats
from scipy.stats import qmc

from pybivi.cme.domain import BOX, STATE_CAP, TAIL_MASS

_DROP = 1e-15  # conditional probabilities below this (relative to the row) are not stored


def marginal_moments(b: np.ndarray, beta: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, ...]:
    """Means and variances of (N, M) of the bursty scheme (closed forms; see the docs)."""
    mu_n, mu_m = b / beta, b / gamma
    var_n = mu_n * (1.0 + b)
    var_m = mu_m * (1.0 + b * beta / (beta + gamma))
    return mu_n, mu_m, var_n, var_m


def _nb_quantile(mean: np.ndarray, var: np.ndarray, tail: float) -> np.ndarray:
    """Upper ``tail`` quantile of the NB with this mean and variance (Poisson if equal)."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.maximum(np.asarray(var, dtype=np.float64), mean * (1.0 + 1e-9))
    shape = mean**2 / (var - mean)
    return stats.nbinom(shape, mean / var).isf(tail)


def inside_state_cap(
    b: np.ndarray, beta: np.ndarray, gamma: np.ndarray, cap: int = STATE_CAP
) -> np.ndarray:
    """Whether each parameter set's ``1 - 1e-10`` marginal quantiles lie below ``cap``."""
    mu_n, mu_m, var_n, var_m = marginal_moments(b, beta, gamma)
    return (_nb_quantile(mu_n, var_n, TAIL_MASS) < cap) & (
        _nb_quantile(mu_m, var_m, TAIL_MASS) < cap
    )


def design(
    n_designs: int, seed: int, box: dict | None = None, sobol: bool = True, cap: int = STATE_CAP
) -> np.ndarray:
    """Space-filling parameter sets inside the domain, as an ``(n, 3)`` array of (b, beta, gamma).

    Parameters
    ----------
    n_designs
        Number of parameter sets returned.
    seed
        Seed of the scrambled Sobol sequence (or of the uniform sampler).
    box
        Box in log10 units, default :data:`BOX`.
    sobol
        Scrambled Sobol points (training) or independent uniform draws (held-out sets).
    cap
        State cap, see :func:`inside_state_cap`; points outside are skipped.
    """
    box = BOX if box is None else box
    lo = np.array([box[k][0] for k in ("log10_b", "log10_beta", "log10_gamma")])
    hi = np.array([box[k][1] for k in ("log10_b", "log10_beta", "log10_gamma")])
    rng = np.random.default_rng(seed)
    sampler = qmc.Sobol(3, scramble=True, seed=rng) if sobol else None
    kept: list[np.ndarray] = []
    total = 0
    while total < n_designs:
        m = 1 << max(6, math.ceil(math.log2(2 * (n_designs - total) + 1)))
        u = sampler.random(m) if sampler is not None else rng.random((m, 3))
        p = 10.0 ** (lo + u * (hi - lo))
        p = p[inside_state_cap(*p.T, cap=cap)]
        kept.append(p)
        total += len(p)
    return np.concatenate(kept)[:n_designs]


def grid_size(b: float, beta: float, gamma: float) -> tuple[int, int]:
    """FFT grid ``(L_N, L_M)`` past the ``1 - 1e-12`` NB quantiles: folded mass below 1e-12."""
    mu_n, mu_m, var_n, var_m = marginal_moments(np.float64(b), np.float64(beta), np.float64(gamma))
    ln = int(_nb_quantile(mu_n, var_n, 1e-12)) + 16
    lm = int(_nb_quantile(mu_m, var_m, 1e-12)) + 16
    return sfft.next_fast_len(ln, real=True), sfft.next_fast_len(lm, real=True)


def _nodes(b: float, beta: float, gamma: float, per_decade: int = 2, order: int = 16):
    """Composite Gauss-Legendre rule on ``[0, s_max]``, panels geometric in ``s``.

    The integrand ``U/(1-U)`` is bounded by ``|U| <= 4 b e^{-min(beta, gamma) s}`` on
    the unit torus, so ``s_max`` makes the neglected tail below ``1e-16``. Geometric
    panels resolve both time scales ``1/beta`` and ``1/gamma``; two 16-node panels per
    decade agree with six per decade to about ``1e-11`` in every probability (measured at
    b = 100, beta = 5, gamma = 3, a hard case), ample for training and scoring.
    """
    slow, fast = min(beta, gamma), max(beta, gamma)
    s_max = (37.0 + math.log(4.0 * b / slow + 1.0)) / slow
    s_min = 0.05 / fast
    n_dec = max(1, math.ceil(math.log10(s_max / s_min) * per_decade))
    edges = np.concatenate([[0.0], np.geomspace(s_min, s_max, n_dec + 1)])
    x, w = np.polynomial.legendre.leggauss(order)
    half = 0.5 * np.diff(edges)[:, None]
    mid = 0.5 * (edges[:-1] + edges[1:])[:, None]
    return (mid + half * x).ravel(), (half * w).ravel()


def bursty_joint(b: float, beta: float, gamma: float, shape: tuple[int, int] | None = None):
    """Exact bursty joint PMF on an FFT grid (generating function), float64 ``(L_N, L_M)``.

    The generating function is evaluated on the roots of unity by the quadrature of
    :func:`_nodes` and inverted by a real 2-D FFT (Hermitian symmetry halves the work).
    ``beta == gamma`` is handled by ``expm1`` without a special case.
    """
    ln, lm = grid_size(b, beta, gamma) if shape is None else shape
    s, w = _nodes(b, beta, gamma)
    a = np.exp(-beta * s)
    d = abs(beta - gamma)
    # (e^{-gamma s} - e^{-beta s}) / (beta - gamma) = e^{-min(beta, gamma) s} (1 - e^{-d s}) / d:
    # no overflow, and continuous through beta == gamma (limit s e^{-beta s})
    frac = -np.expm1(-d * s) / d if d > 0.0 else s
    c = beta * np.exp(-min(beta, gamma) * s) * frac
    theta_n = 2.0 * np.pi * np.arange(ln) / ln
    theta_m = 2.0 * np.pi * np.arange(lm // 2 + 1) / lm
    u = -2.0 * np.sin(0.5 * theta_n) ** 2 - 1j * np.sin(theta_n)  # exp(-i theta) - 1
    v = -2.0 * np.sin(0.5 * theta_m) ** 2 - 1j * np.sin(theta_m)
    log_g = np.empty((ln, lm // 2 + 1), dtype=np.complex128)
    rows = max(1, (1 << 21) // ((lm // 2 + 1) * len(s)))
    bu, bv = b * a, b * c
    for i in range(0, ln, rows):
        big_u = u[i : i + rows, None, None] * bu + v[None, :, None] * bv
        log_g[i : i + rows] = (big_u / (1.0 - big_u)) @ w
    log_g[0, 0] = 0.0
    pmf = np.fft.irfft2(np.exp(log_g), s=(ln, lm))
    np.clip(pmf, 0.0, None, out=pmf)
    return pmf


@dataclass
class ConditionalSet:
    """Flat storage of exact conditionals ``P(m | n)`` for many designs.

    Attributes
    ----------
    params
        ``(D, 3)`` float64 (b, beta, gamma) per design.
    cond_design, cond_n, cond_weight, cond_start, cond_len, cond_mlo
        Per conditional: its design index, ``n``, weight (nascent mass it stands for;
        sums to about 1 per design), offset and length in ``values``, first ``m``.
    values
        Concatenated float64 ``P(m | n)``.
    """

    params: np.ndarray
    cond_design: np.ndarray
    cond_n: np.ndarray
    cond_weight: np.ndarray
    cond_start: np.ndarray
    cond_len: np.ndarray
    cond_mlo: np.ndarray
    values: np.ndarray

    def save(self, path: Path) -> None:
        """Write to an ``.npz`` file."""
        np.savez(path, **self.__dict__)

    @classmethod
    def load(cls, path: Path) -> ConditionalSet:
        """Read a file written by :meth:`save`."""
        with np.load(path) as f:
            return cls(**{k: f[k] for k in cls.__dataclass_fields__})

    @classmethod
    def concat(cls, parts: list[ConditionalSet]) -> ConditionalSet:
        """Join sets, renumbering designs and offsets."""
        d_off, v_off, fields = 0, 0, {k: [] for k in cls.__dataclass_fields__}
        for p in parts:
            for k in fields:
                x = getattr(p, k)
                if k == "cond_design":
                    x = x + d_off
                elif k == "cond_start":
                    x = x + v_off
                fields[k].append(x)
            d_off += len(p.params)
            v_off += len(p.values)
        return cls(**{k: np.concatenate(v) for k, v in fields.items()})

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per stored value: conditional index, ``m``, and exact ``P(m | n)``."""
        idx = np.repeat(np.arange(len(self.cond_n)), self.cond_len)
        m = self.cond_mlo[idx] + (np.arange(len(self.values)) - self.cond_start[idx])
        return idx, m, self.values


def _strata(p_n: np.ndarray, n_rows: int, extras: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pick at most ``n_rows`` values of ``n`` and the nascent mass each stands for.

    Small supports keep every row. Otherwise the CDF is cut into equal-mass strata
    (plus the extreme tails, so that the network also sees rare large ``n``); each row
    belongs to the stratum holding the midpoint of its CDF step, and each stratum is
    represented by its most probable row, weighted by the stratum's mass. With
    ``extras`` a few rows spread geometrically over the support are added with weight
    ``1e-4`` (training only: scoring sets must keep the weights equal to the masses).
    """
    keep = np.flatnonzero(p_n > 1e-14)
    if len(keep) <= n_rows:
        return keep, p_n[keep]
    cuts = np.concatenate([np.linspace(0.0, 1.0, n_rows - 3)[1:-1], [1 - 1e-5, 1 - 1e-8]])
    mid = np.cumsum(p_n) - 0.5 * p_n
    stratum = np.searchsorted(cuts, mid[keep])
    weights = np.bincount(stratum, weights=p_n[keep])
    rows = []
    for k in np.flatnonzero(weights > 0):
        members = keep[stratum == k]
        rows.append(members[np.argmax(p_n[members])])
    weights = weights[weights > 0]
    if not extras:
        return np.asarray(rows), weights
    # A few rows spread geometrically over the support, with a small weight, so that
    # the network also learns the shape of P(m | n) between the strata of a skewed P(n).
    extra = np.setdiff1d(np.unique(np.geomspace(1, keep[-1] + 1, 6).astype(int) - 1), rows)
    rows = np.concatenate([rows, extra])
    weights = np.concatenate([weights, np.full(len(extra), 1e-4)])
    order = np.argsort(rows)
    return rows[order], weights[order]


def conditionals_of(params: np.ndarray, n_rows: int | None, extras: bool = True) -> ConditionalSet:
    """Exact conditionals of one or more designs.

    Parameters
    ----------
    params
        ``(D, 3)`` array of (b, beta, gamma).
    n_rows
        Rows kept per design (stratified, see :func:`_strata`); ``None`` keeps every row
        holding mass, with weight ``P(n)``, as needed to score the whole joint exactly.
    extras
        Add the low-weight geometric rows of :func:`_strata` (for training sets).
    """
    parts = []
    for b, beta, gamma in np.atleast_2d(params):
        joint = bursty_joint(b, beta, gamma)
        p_n = joint.sum(axis=1)
        if n_rows is None:
            order = np.argsort(p_n)
            dropped = np.cumsum(p_n[order]) <= 0.1 * TAIL_MASS
            rows = np.sort(order[~dropped])
            weights = p_n[rows]
        else:
            rows, weights = _strata(p_n, n_rows, extras)
        vals, starts, lens, mlos = [], [], [], []
        offset = 0
        for r in rows:
            cond = joint[r] / p_n[r]
            nz = np.flatnonzero(cond > _DROP * cond.max())
            lo, hi = nz[0], nz[-1] + 1
            c = cond[lo:hi]
            vals.append(c / c.sum())
            starts.append(offset)
            lens.append(hi - lo)
            mlos.append(lo)
            offset += hi - lo
        k = len(rows)
        parts.append(
            ConditionalSet(
                params=np.array([[b, beta, gamma]]),
                cond_design=np.zeros(k, dtype=np.int64),
                cond_n=np.asarray(rows, dtype=np.int64),
                cond_weight=np.asarray(weights, dtype=np.float64),
                cond_start=np.asarray(starts, dtype=np.int64),
                cond_len=np.asarray(lens, dtype=np.int64),
                cond_mlo=np.asarray(mlos, dtype=np.int64),
                values=np.concatenate(vals),
            )
        )
    return ConditionalSet.concat(parts)


def _work(args: tuple[np.ndarray, int | None, bool, str]) -> str:
    params, n_rows, extras, path = args
    if not os.path.exists(path):
        part = conditionals_of(params, n_rows, extras)
        tmp = path + ".tmp.npz"
        part.save(Path(tmp))
        os.replace(tmp, path)  # atomic: an interrupted run leaves no half-written chunk
    return path


def build_dataset(
    params: np.ndarray,
    cache_dir: Path,
    n_rows: int | None,
    workers: int = 2,
    chunk: int = 8,
    log=print,
    extras: bool = True,
) -> ConditionalSet:
    """Exact conditionals of every design, computed in parallel chunks and cached.

    Resumable: finished chunks are files in ``cache_dir`` (named by chunk index) and are
    not recomputed; delete the folder after changing ``params``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache_dir / "params.npy", params)
    jobs = [
        (params[i : i + chunk], n_rows, extras, str(cache_dir / f"chunk_{i // chunk:05d}.npz"))
        for i in range(0, len(params), chunk)
    ]
    paths = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for k, path in enumerate(pool.map(_work, jobs)):
                paths.append(path)
                if (k + 1) % max(1, len(jobs) // 10) == 0:
                    log(f"exact conditionals: {k + 1}/{len(jobs)} chunks")
    else:
        paths = [_work(j) for j in jobs]
    return ConditionalSet.concat([ConditionalSet.load(Path(p)) for p in paths])
