"""Where the shipped approximator is least accurate, and whether it is a fit or a gap.

Usage: ``python benchmarks/approximator_worst_sets.py [--cache .cache/approx] [--worst 4]``
(run from ``benchmarks/``; the held-out and training solutions are those cached by
``approximator_accuracy.py`` and ``pybivi approximator train``).

Prints the held-out domain sets with the largest joint Hellinger distance, the exact and
approximate mean of ``m`` given ``n`` at the nascent rows that cost most, and, for the
training design nearest each of them, the Hellinger distance of the rows the network was
trained on against the rows between them (if both are far off, the network does not fit
that region; if only the rows between, it interpolates badly in ``n``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import docs_output
import numpy as np
import torch

from pybivi.cme import load_default_approximator
from pybivi.cme.scoring import HELDOUT_SEED, SCORE_ROWS, score
from pybivi.cme.training_data import ConditionalSet, build_dataset, bursty_joint, design


def _conditionals(model, b: float, beta: float, gamma: float, rows: int):
    """Exact and approximate P(m | n) for n < rows, and the exact P(n)."""
    joint = np.asarray(bursty_joint(b, beta, gamma))
    p_n = joint.sum(1)
    n_max, m_max = min(rows, joint.shape[0]), joint.shape[1]
    n = torch.arange(n_max, dtype=torch.float64)[:, None].expand(n_max, m_max).reshape(-1)
    m = torch.arange(m_max, dtype=torch.float64)[None, :].expand(n_max, m_max).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = (torch.full_like(n, v) for v in (b, beta, gamma))
        log_q = model.log_prob_mature_given_nascent(n, m, *params).reshape(n_max, m_max)
    exact = joint[:n_max] / np.maximum(p_n[:n_max, None], 1e-300)
    return exact, np.exp(log_q.numpy()), p_n[:n_max]


def _row_hellinger(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(1.0 - np.sqrt(exact * approx).sum(1), 0.0, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="../.cache/approx")
    ap.add_argument("--worst", type=int, default=4)
    ap.add_argument("--rows", type=int, default=40, help="nascent rows examined per design")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cache, model = Path(a.cache), load_default_approximator()
    held = build_dataset(
        design(500, HELDOUT_SEED, sobol=False),
        cache / f"heldout_domain_d500_r{SCORE_ROWS}",
        SCORE_ROWS,
        workers=1,
        extras=False,
        log=lambda s: None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hellinger = score(model.log_prob_mature_given_nascent, held)["hellinger"]
    train_dir = cache / "train_s0_large2048_r24"
    train_params = None
    if (train_dir / "params.npy").exists():
        train_params = np.load(train_dir / "params.npy")
    else:
        print(f"(no training solutions in {train_dir}: comparing trained rows with the rows "
              "between them needs `pybivi approximator train --cache` first)")
    for i in np.argsort(-hellinger)[: a.worst]:
        b, beta, gamma = held.params[i]
        print(
            f"held-out set log10 (b, beta/k, gamma/k) = {np.round(np.log10(held.params[i]), 2)}: "
            f"Hellinger {hellinger[i]:.4f}"
        )
        exact, approx, p_n = _conditionals(model, b, beta, gamma, a.rows)
        grid = np.arange(exact.shape[1])
        cost = p_n * _row_hellinger(exact, approx) ** 2
        for n in sorted(np.argsort(-cost)[:3]):
            print(
                f"  n = {n:3d}: mean of m exact {exact[n] @ grid:7.2f}, "
                f"approx {approx[n] @ grid:7.2f}"
            )
        if train_params is None:
            continue
        j = int(np.argmin(np.abs(np.log10(train_params) - np.log10(held.params[i])).sum(1)))
        chunk = ConditionalSet.load(train_dir / f"chunk_{j // 8:05d}.npz")
        trained = {int(n) for n in chunk.cond_n[chunk.cond_design == j % 8]}
        exact, approx, _ = _conditionals(model, *train_params[j], a.rows)
        rows = _row_hellinger(exact, approx)
        on = [n for n in range(len(rows)) if n in trained and n > 0]
        off = [n for n in range(len(rows)) if n not in trained]
        print(
            f"  nearest training design {np.round(np.log10(train_params[j]), 2)}: row Hellinger "
            f"median {np.median(rows[on]):.3f} on its {len(on)} trained rows n = 1..{a.rows - 1}, "
            f"{np.median(rows[off]):.3f} on the {len(off)} rows between"
        )


if __name__ == "__main__":
    docs_output.run(main)
