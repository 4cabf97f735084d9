"""Accuracy of the bursty conditional against exact CME solutions, pybivi beside biVI.

Usage: ``python benchmarks/approximator_accuracy.py [--n 500] [--cache .cache/approximator]
[--weights candidate.pt] [--only domain]``.

Two held-out sets of parameter sets, drawn uniformly in log space with seeds never used
in training: the whole domain (box cut by the state cap, see ``pybivi.cme.domain``) and
biVI's training box (b in [1, 300], beta and gamma in [0.05, 50]) cut by the same cap.
For each set, the joint ``KL(exact || NB x Phat)`` and the Hellinger distance are summed
over the nascent axis with 128 equal-mass strata of rows per parameter set (a quadrature
of the sums over every row; each row's mature axis is complete down to 1e-15 of its
mass) and summarised by median, 99th percentile and maximum. biVI's network is scored
in float64 (in float32 its kernels return invalid values: ``--bivi-float32`` counts them).
Exact solutions are cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import docs_output
import numpy as np
import torch
from approximator_common import BIVI_BOX, BIVI_WEIGHTS

from pybivi.cme import load_approximator, load_bivi_approximator, load_default_approximator
from pybivi.cme.scoring import HELDOUT_SEED, SCORE_ROWS, score, summarize
from pybivi.cme.training_data import build_dataset, design


def _row(name: str, s: dict) -> str:
    return (
        f"{name:<22}{s['kl_median']:>11.2e}{s['kl_p99']:>11.2e}{s['kl_max']:>11.2e}"
        f"{s['hellinger_median']:>10.4f}{s['hellinger_p99']:>10.4f}{s['hellinger_max']:>10.4f}"
        f"{s['designs_with_invalid']:>9d}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500, help="parameter sets per held-out set")
    ap.add_argument("--cache", default=".cache/approximator")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bivi-float32", action="store_true", help="also score biVI in float32")
    ap.add_argument("--only", choices=("domain", "biVI box"), help="score only this held-out set")
    ap.add_argument("--weights", help="score this weights file instead of the shipped one "
                    "(a candidate from `pybivi approximator train --out ...`)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    sets = {
        "domain": design(a.n, HELDOUT_SEED, sobol=False),
        "biVI box": design(a.n, HELDOUT_SEED + 1, box=BIVI_BOX, sobol=False),
    }
    ours = load_approximator(a.weights) if a.weights else load_default_approximator()
    if a.only:
        sets = {a.only: sets[a.only]}
    meta = ours.metadata
    print(
        f"weights trained on {meta.get('n_designs')} + {meta.get('n_large_burst', 0)} (b >= 1) "
        f"designs, seed {meta.get('seed')}; held-out seeds {HELDOUT_SEED}, {HELDOUT_SEED + 1}"
    )
    header = (
        f"{'set / backend':<22}{'KL med':>11}{'KL p99':>11}{'KL max':>11}"
        f"{'H med':>10}{'H p99':>10}{'H max':>10}{'invalid':>9}"
    )
    results = {}
    for label, params in sets.items():
        tag = "domain" if label == "domain" else "bivibox"
        t0 = time.time()
        cs = build_dataset(
            params,
            cache / f"heldout_{tag}_d{a.n}_r{SCORE_ROWS}",
            SCORE_ROWS,
            workers=a.workers,
            extras=False,
            log=lambda s: None,
        )
        print(
            f"\n{label}: {len(params)} parameter sets, {len(cs.values)} (n, m) pairs "
            f"(exact solutions {time.time() - t0:.0f} s)"
        )
        print(header)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = summarize(score(ours.log_prob_mature_given_nascent, cs))
        results[(label, "pybivi")] = s
        print(_row("pybivi (float32)", s))
        if BIVI_WEIGHTS.is_file():
            dtypes = [(torch.float64, "biVI (float64)")]
            if a.bivi_float32:
                dtypes.append((torch.float32, "biVI (float32)"))
            for dtype, name in dtypes:
                bivi = load_bivi_approximator(BIVI_WEIGHTS, dtype=dtype)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sb = summarize(score(bivi.log_prob_mature_given_nascent, cs, chunk=1 << 16))
                results[(label, name)] = sb
                print(_row(name, sb))
    for label in ("domain", "biVI box"):
        if (label, "pybivi") in results and (label, "biVI (float64)") in results:
            o, b = results[(label, "pybivi")], results[(label, "biVI (float64)")]
            ratios = ", ".join(
                f"{k} {b[k] / max(o[k], 1e-300):.3g}"
                for k in ("kl_median", "kl_p99", "hellinger_median", "hellinger_p99")
            )
            print(f"biVI / pybivi on {label}: {ratios}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    docs_output.run(main)
