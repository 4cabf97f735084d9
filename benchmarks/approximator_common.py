"""Shared helpers of the approximator benchmarks: workloads, biVI's weights, timing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pybivi.cme.training_data import design, marginal_moments

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BIVI_WEIGHTS = SHARED / "reference" / "bivi-approximator-weights.zip"
BIVI_BOX = {
    "log10_b": (0.0, np.log10(300.0)),
    "log10_beta": (np.log10(0.05), np.log10(50.0)),
    "log10_gamma": (np.log10(0.05), np.log10(50.0)),
}


def realistic_pairs(n_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Parameters spread over the domain and counts drawn from them.

    Each pair gets its own parameter set (uniform in the log box, inside the state cap),
    ``n`` drawn from the exact nascent NB and ``m`` from an NB matched to the mature
    marginal: mostly small counts with a long tail, as in single-cell data.
    """
    rng = np.random.default_rng(seed)
    p = design(n_pairs, seed, sobol=False)
    b, beta, gamma = p.T
    mu_n, mu_m, _, var_m = marginal_moments(b, beta, gamma)
    n = rng.negative_binomial(1.0 / beta, 1.0 / (1.0 + b))
    r_m = mu_m**2 / np.maximum(var_m - mu_m, 1e-12)
    m = rng.negative_binomial(r_m, r_m / (r_m + mu_m))
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return {"n": f32(n), "m": f32(m), "b": f32(b), "beta": f32(beta), "gamma": f32(gamma)}


def time_forward_backward(model, pairs: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Seconds per forward + backward of the summed log-probability (gradient in b, beta, gamma)."""
    times = []
    for _ in range(repeats):
        b = pairs["b"].clone().requires_grad_(True)
        beta = pairs["beta"].clone().requires_grad_(True)
        gamma = pairs["gamma"].clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = model.log_prob_mature_given_nascent(pairs["n"], pairs["m"], b, beta, gamma)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return times
