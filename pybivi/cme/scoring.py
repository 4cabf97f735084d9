"""Accuracy of a CME approximator against exact solutions: joint KL and Hellinger per design.

Used by training (held-out metrics written beside the weights), by the tests and by
``benchmarks/approximator_accuracy.py``, for pybivi's network and biVI's alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pybivi.cme.training_data import ConditionalSet

LogProbFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]

HELDOUT_SEED = 20_250_101  # never used for training designs (those use ``seed``)
SCORE_ROWS = 128  # nascent strata per held-out design (see :func:`score`)


def score(log_prob: LogProbFn, cs: ConditionalSet, chunk: int = 1 << 18) -> dict[str, np.ndarray]:
    """Joint KL(exact || approx) and Hellinger distance per parameter set.

    Parameters
    ----------
    log_prob
        ``f(n, m, b, beta, gamma) -> log Phat(m | n)`` on float64 tensors of pairs.
    cs
        Exact conditionals weighted by the nascent mass they stand for: every row
        (``n_rows=None``, the exact joint sums) or equal-mass strata of rows (a
        quadrature in ``n`` of the same sums, used to keep biVI's slow network affordable).

    Returns
    -------
    dict
        ``kl`` and ``hellinger`` (arrays over designs) and ``invalid`` (number of
        non-finite approximate log-probabilities per design; they count as ``q = 0``).
    """
    idx, m, p = cs.pairs()
    d = cs.cond_design[idx]
    par = cs.params[d]
    n = cs.cond_n[idx]
    w = cs.cond_weight[idx]
    logq = np.empty(len(p))
    for s in range(0, len(p), chunk):
        sl = slice(s, s + chunk)
        args = [
            torch.from_numpy(np.ascontiguousarray(x[sl], dtype=np.float64))
            for x in (n, m, par[:, 0], par[:, 1], par[:, 2])
        ]
        with torch.no_grad():
            logq[sl] = log_prob(*args).double().numpy()
    bad = ~np.isfinite(logq) | (logq > 1e-6)
    logq_safe = np.where(bad, -np.inf, np.minimum(logq, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_terms = np.where(p > 0, w * p * (np.log(p) - logq_safe), 0.0)
    bc_terms = w * np.sqrt(p * np.exp(logq_safe))
    n_d = len(cs.params)
    total = np.bincount(cs.cond_design, cs.cond_weight, minlength=n_d)  # about 1 per design
    kl = np.bincount(d, kl_terms, minlength=n_d) / total
    bc = np.bincount(d, bc_terms, minlength=n_d) / total
    return {
        "kl": kl,
        "hellinger": np.sqrt(np.clip(1.0 - bc, 0.0, None)),
        "invalid": np.bincount(d, bad.astype(float), minlength=n_d),
    }


def summarize(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Median/99th percentile/max of the per-design KL and Hellinger."""
    kl, h = scores["kl"], scores["hellinger"]
    return {
        "n_designs": len(kl),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(np.max(kl)),
        "hellinger_median": float(np.median(h)),
        "hellinger_p99": float(np.quantile(h, 0.99)),
        "hellinger_max": float(np.max(h)),
        "designs_with_invalid": int((scores["invalid"] > 0).sum()),
    }
