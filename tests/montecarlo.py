"""Independent Monte Carlo samplers and a goodness-of-fit test (test helper, plain numpy).

The bursty sampler is written from the reactions only, not from the generating function:
bursts arrive at rate ``k = 1`` over the past ``[0, A]``; each brings a geometric number
of molecules (support ``{0, 1, ...}``, mean ``b``); every molecule independently waits
``T1 ~ Exp(beta)`` to be spliced and then ``T2 ~ Exp(gamma)`` to decay. At the
observation time a molecule of age ``a`` is nascent if ``T1 > a`` and mature if
``T1 <= a < T1 + T2``. ``A`` is chosen so that bursts older than ``A`` have a negligible
expected number of survivors (a crude bound that needs no solution of the model).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def burst_horizon(b: float, beta: float, gamma: float, n_cells: int, eps: float = 1e-3) -> float:
    """Horizon ``A`` with fewer than ``eps`` expected survivors from older bursts, all cells.

    A molecule of age ``a`` survives only if ``T1 > a/2`` or ``T2 > a/2``, so
    ``P(alive) <= 2 exp(-r a / 2)`` with ``r = min(beta, gamma)``; integrating over
    ``a > A`` with burst rate 1 and mean size ``b`` gives ``4 b exp(-r A / 2) / r`` per cell.
    """
    r = min(beta, gamma)
    return 2.0 / r * math.log(max(4.0 * b * n_cells / (r * eps), 2.0))


def sample_bursty(
    b: float,
    beta: float,
    gamma: float,
    n_cells: int,
    rng: np.random.Generator,
    max_molecules: int = 2_000_000,
) -> np.ndarray:
    """Exact draws of (nascent, mature) at steady state; shape ``(n_cells, 2)``, int64."""
    horizon = burst_horizon(b, beta, gamma, n_cells)
    # Cells are simulated in chunks so that the per-molecule arrays stay small.
    per_cell = max(1.0, horizon * b)
    chunk = max(1, int(max_molecules / per_cell))
    out = np.empty((n_cells, 2), dtype=np.int64)
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        out[start:stop] = _sample_chunk(b, beta, gamma, stop - start, horizon, rng)
    return out


def _sample_chunk(
    b: float, beta: float, gamma: float, n_cells: int, horizon: float, rng: np.random.Generator
) -> np.ndarray:
    n_bursts = rng.poisson(horizon, size=n_cells)
    burst_cell = np.repeat(np.arange(n_cells), n_bursts)
    burst_age = rng.uniform(0.0, horizon, size=burst_cell.size)
    # numpy's geometric lives on {1, 2, ...} with mean 1/p; shift to {0, 1, ...}, mean b.
    burst_size = rng.geometric(1.0 / (1.0 + b), size=burst_cell.size) - 1
    mol_cell = np.repeat(burst_cell, burst_size)
    mol_age = np.repeat(burst_age, burst_size)
    t_splice = rng.exponential(1.0 / beta, size=mol_age.size)
    t_decay = rng.exponential(1.0 / gamma, size=mol_age.size)
    nascent = t_splice > mol_age
    mature = (~nascent) & (mol_age < t_splice + t_decay)
    return np.stack(
        [
            np.bincount(mol_cell[nascent], minlength=n_cells),
            np.bincount(mol_cell[mature], minlength=n_cells),
        ],
        axis=1,
    )


def sample_extrinsic(
    alpha: float, beta: float, gamma: float, n_cells: int, rng: np.random.Generator
) -> np.ndarray:
    """Gamma-Poisson draws: rate ``lambda ~ Gamma(alpha, 1)``, ``N ~ Poi(lambda / beta)``,
    ``M ~ Poi(lambda / gamma)`` independently given ``lambda``."""
    lam = rng.gamma(alpha, 1.0, size=n_cells)
    return np.stack([rng.poisson(lam / beta), rng.poisson(lam / gamma)], axis=1)


def chi_square_gof(samples: np.ndarray, pmf: np.ndarray, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of ``samples`` (n, 2) against a joint ``pmf``.

    The bins depend on the PMF only: grid cells are taken in decreasing order of
    probability and pooled consecutively until each bin expects at least
    ``min_expected`` draws (a large cell is a bin on its own); the mass outside the grid
    and the samples falling there join the last bin, and a last bin that is too small
    is merged into the one before.
    """
    n_total = samples.shape[0]
    flat = n_total * pmf.ravel()
    order = np.argsort(-flat, kind="stable")
    before = np.cumsum(flat[order]) - flat[order]
    # A large cell makes floor() skip labels; renumber so that every bin is non-empty.
    _, labels = np.unique(np.floor(before / min_expected), return_inverse=True)
    group = np.empty(flat.size, dtype=np.int64)
    group[order] = labels
    n_groups = int(labels.max()) + 1
    expected = np.bincount(group, weights=flat, minlength=n_groups)
    inside = (samples[:, 0] < pmf.shape[0]) & (samples[:, 1] < pmf.shape[1])
    cell = samples[inside, 0] * pmf.shape[1] + samples[inside, 1]
    observed = np.bincount(group[cell], minlength=n_groups).astype(np.float64)
    expected[-1] += n_total - expected.sum()
    observed[-1] += n_total - observed.sum()
    if expected[-1] < min_expected and n_groups > 1:
        expected[-2] += expected[-1]
        observed[-2] += observed[-1]
        expected, observed = expected[:-1], observed[:-1]
    if expected.size < 2:
        raise ValueError("too few samples for a chi-square test: one bin only")
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(stat, df=expected.size - 1))
